"""Stimuli: continuous movie segments made of shots, rendered to clips of frames with exact object label maps.

A split (train or test) is a sequence of movie segments (``segment_clips`` clips each, like scanner runs). A segment is
a sequence of shots of ``shot_min_clips..shot_max_clips`` TRs; a cut starts a new shot. A shot is a background scene
plus 1 to 3 objects of distinct categories, each moving with its own constant velocity and bouncing off an inner box,
so neighbouring clips of a shot are strongly correlated as in real films.

Randomness: the shot list of a segment is drawn from ``(seed, split, segment)``; a shot's background texture from
``(seed, split, shot)``. Rendering itself is deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tasks_construction.toy_cortex.shapes import SHAPES, texture_gain
from utils.toy_world import BACKGROUNDS, CATEGORIES, ToyWorldConfig

SPLIT_CODES = {"train": 1, "test": 2}
BOX_MARGIN = 0.15  # object centres stay inside [margin, 1 - margin] of the frame (they bounce off this box)


@dataclass(frozen=True)
class ObjectSpec:
    category: int  # index into CATEGORIES
    label: int  # track id within the shot, 1..3 (0 is the background)
    x0: float  # centre at the shot's first frame, pixels
    y0: float
    vx: float  # pixels per frame
    vy: float
    radius: float  # pixels
    rgb: tuple[float, float, float]  # the category colour with a small per-instance jitter


@dataclass(frozen=True)
class Shot:
    index: int  # shot index within the split
    segment: int
    start_clip: int  # first clip of the shot (split-global index)
    n_clips: int
    background: int  # index into BACKGROUNDS
    texture_seed: int
    objects: tuple[ObjectSpec, ...] = field(default_factory=tuple)  # front to back: objects[0] is drawn on top

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RenderedSplit:
    """A rendered split. N clips, F frames per clip, R pixels, K = n_categories, B = n_backgrounds."""

    frames: np.ndarray  # (N, F, 3, R, R) float32 in [0,1]
    labels: np.ndarray  # (N, F, R, R) uint8: 0 background, else the object's track label
    category_area: np.ndarray  # (N*F, K) float32 visible area fraction of each category per frame
    background: np.ndarray  # (N,) int background index per clip
    shots: list[Shot]
    clip_shot: np.ndarray  # (N,) int shot index of each clip


def split_shots(cfg: ToyWorldConfig, split: str) -> list[Shot]:
    """Draw the shot list of a split: segments of ``segment_clips`` clips cut into shots."""
    n_clips = cfg.n_train_clips if split == "train" else cfg.n_test_clips
    shots: list[Shot] = []
    start = 0
    for segment, seg_start in enumerate(range(0, n_clips, cfg.segment_clips)):
        seg_end = min(seg_start + cfg.segment_clips, n_clips)
        rng = np.random.default_rng([cfg.seed, SPLIT_CODES[split], segment])
        while start < seg_end:
            length = min(int(rng.integers(cfg.shot_min_clips, cfg.shot_max_clips + 1)), seg_end - start)
            shots.append(_draw_shot(cfg, rng, len(shots), segment, start, length))
            start += length
    return shots


def _draw_shot(cfg: ToyWorldConfig, rng: np.random.Generator, index: int, segment: int, start: int, n: int) -> Shot:
    size = cfg.resolution
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cats = rng.choice(cfg.n_categories, size=n_objects, replace=False)
    objects: list[ObjectSpec] = []
    for k, cat in enumerate(cats):
        category = CATEGORIES[int(cat)]
        speed = rng.uniform(cfg.min_speed_frac, cfg.max_speed_frac) * size
        angle = rng.uniform(0, 2 * np.pi)
        x0, y0 = _place(rng, objects, size)
        jitter = rng.uniform(-0.05, 0.05, size=3)
        rgb = tuple(float(c) for c in np.clip(np.asarray(category.rgb) + jitter, 0.0, 1.0))
        radius = cfg.min_radius_frac * size * category.size * rng.uniform(1.0, 1.1)
        objects.append(
            ObjectSpec(
                int(cat),
                k + 1,
                float(x0),
                float(y0),
                float(speed * np.cos(angle)),
                float(speed * np.sin(angle)),
                float(radius),
                rgb,
            )
        )
    background = int(rng.integers(cfg.n_backgrounds))
    texture_seed = int(rng.integers(2**31))
    return Shot(index, segment, start, n, background, texture_seed, tuple(objects))


def _place(rng: np.random.Generator, placed: list[ObjectSpec], size: int, tries: int = 20) -> np.ndarray:
    """A start position away from the objects already placed (best of ``tries`` draws: farthest from the nearest)."""
    best, best_gap = None, -np.inf
    for _ in range(tries):
        xy = rng.uniform(BOX_MARGIN, 1 - BOX_MARGIN, size=2) * size
        gap = min((np.hypot(xy[0] - o.x0, xy[1] - o.y0) / o.radius for o in placed), default=np.inf)
        if gap > best_gap:
            best, best_gap = xy, gap
        if gap >= 2.0:
            break
    return best


def bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions at frames ``t`` of a point starting at ``p0`` with velocity ``v`` reflecting off ``[lo, hi]``."""
    span = hi - lo
    u = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def object_track(obj: ObjectSpec, t: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) in pixels of an object at shot frames ``t``."""
    lo, hi = BOX_MARGIN * size, (1 - BOX_MARGIN) * size
    return bounce(obj.x0, obj.vx, t, lo, hi), bounce(obj.y0, obj.vy, t, lo, hi)


def background_image(bg_index: int, texture_seed: int, size: int, t: np.ndarray) -> np.ndarray:
    """Background frames ``(len(t), 3, R, R)`` of one shot; water waves and the road's lane marks move with t."""
    bg = BACKGROUNDS[bg_index]
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    grad = np.asarray(bg.top)[:, None, None] * (1 - y) + np.asarray(bg.bottom)[:, None, None] * y  # (3, R, R)
    rng = np.random.default_rng(texture_seed)
    out = np.repeat(grad[None], len(t), axis=0)
    tt = np.asarray(t, dtype=np.float64)[:, None, None]
    if bg.pattern == "waves":
        out *= (1 + 0.12 * np.sin(2 * np.pi * (4 * y + 0.3 * np.sin(2 * np.pi * x)) - 0.4 * tt))[:, None]
    elif bg.pattern == "blades":
        out *= (1 + 0.12 * np.sin(2 * np.pi * 7 * x + 4 * y + rng.uniform(0, 2 * np.pi)))[None, None]
    elif bg.pattern == "lane":
        dash = (np.abs(y - 0.5) < 0.03) & (np.mod(x * 4 + 0.1 * tt, 1.0) < 0.5)
        out = np.where(dash[:, None], 0.9, out)
    elif bg.pattern == "grain":
        out *= (1 + 0.08 * rng.standard_normal((size, size)))[None, None]
    elif bg.pattern == "stars":
        out = np.where((rng.random((size, size)) < 0.02)[None, None], 0.95, out)
    return np.clip(out, 0.0, 1.0)


def render_shot(shot: Shot, cfg: ToyWorldConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a shot: frames ``(T, 3, R, R)``, labels ``(T, R, R)`` uint8, category areas ``(T, K)``; T = clips*F."""
    size = cfg.resolution
    t = np.arange(shot.n_clips * cfg.n_frames)
    frames = background_image(shot.background, shot.texture_seed, size, t)
    labels = np.zeros((len(t), size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for obj in reversed(shot.objects):  # back to front
        category = CATEGORIES[obj.category]
        cx, cy = object_track(obj, t, size)
        dx = (xx[None] - cx[:, None, None]) / obj.radius
        dy = (yy[None] - cy[:, None, None]) / obj.radius
        inside = SHAPES[category.shape](dx, dy)  # (T, R, R)
        colour = np.asarray(obj.rgb)[None, :, None, None] * texture_gain(category.texture, dx, dy)[:, None]
        frames = np.where(inside[:, None], colour, frames)
        labels[inside] = obj.label
    area = np.zeros((len(t), cfg.n_categories), dtype=np.float32)
    for obj in shot.objects:
        area[:, obj.category] += (labels == obj.label).mean(axis=(1, 2))
    return np.clip(frames, 0.0, 1.0).astype(np.float32), labels, area


def render_split(cfg: ToyWorldConfig, split: str, progress: bool = False) -> RenderedSplit:
    """Render every clip of a split (see :class:`RenderedSplit` for shapes)."""
    from tqdm import tqdm

    shots = split_shots(cfg, split)
    n, f, r = shots[-1].start_clip + shots[-1].n_clips, cfg.n_frames, cfg.resolution
    frames = np.empty((n, f, 3, r, r), dtype=np.float32)
    labels = np.empty((n, f, r, r), dtype=np.uint8)
    area = np.empty((n * f, cfg.n_categories), dtype=np.float32)
    background = np.empty(n, dtype=np.int64)
    clip_shot = np.empty(n, dtype=np.int64)
    for shot in tqdm(shots, desc=f"render {split}", unit="shot", disable=not progress, leave=False):
        sl = slice(shot.start_clip, shot.start_clip + shot.n_clips)
        shot_frames, shot_labels, shot_area = render_shot(shot, cfg)
        frames[sl] = shot_frames.reshape(shot.n_clips, f, 3, r, r)
        labels[sl] = shot_labels.reshape(shot.n_clips, f, r, r)
        area[sl.start * f : sl.stop * f] = shot_area
        background[sl], clip_shot[sl] = shot.background, shot.index
    return RenderedSplit(frames, labels, area, background, shots, clip_shot)
