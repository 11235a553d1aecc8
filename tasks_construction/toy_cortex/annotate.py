"""Annotations of a rendered split in cc2017/NEURONS formats: captions, noun tags, concept multi-hots, object masks.

Captions name the main (front) object, its motion over the clip and the background, then the other objects, e.g.
"a red ball rolls left over blue water with a yellow bird". Masks are the exact visible (after occlusion) pixels of
each object per frame; label "0" is the background region, named by the background noun (e.g. "water").
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks_construction.toy_cortex.render import RenderedSplit, Shot, object_track
from utils.data_catalog import mask_frame_key, mask_png_dir
from utils.toy_world import BACKGROUNDS, CATEGORIES, PRIORITY_NAMES, ToyWorldConfig


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _direction(dx: float, dy: float) -> str:
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def clip_annotation(shot: Shot, clip_in_shot: int, cfg: ToyWorldConfig, concepts: list[str]) -> dict[str, Any]:
    """Caption, tags and concept multi-hot of one clip of a shot."""
    bg = BACKGROUNDS[shot.background]
    t = np.array([clip_in_shot * cfg.n_frames, (clip_in_shot + 1) * cfg.n_frames - 1])
    phrases = []
    for k, obj in enumerate(shot.objects):
        cat = CATEGORIES[obj.category]
        if k == 0:
            x, y = object_track(obj, t, cfg.resolution)
            phrases.append(f"{_a(cat.colour_name)} {cat.name} {cat.verb} {_direction(x[1] - x[0], y[1] - y[0])}")
            phrases.append(f"{bg.preposition} {bg.name}")
        else:
            phrases.append(("with " if k == 1 else "and ") + f"{_a(cat.colour_name)} {cat.name}")
    tags = [CATEGORIES[o.category].name for o in shot.objects] + [bg.noun]
    present = {c for o in shot.objects for c in CATEGORIES[o.category].concepts} | set(bg.concepts)
    return {"caption": " ".join(phrases), "tags": tags, "category_id": [int(c in present) for c in concepts]}


def split_annotations(rendered: RenderedSplit, cfg: ToyWorldConfig, concepts: list[str]) -> list[dict[str, Any]]:
    """Per-clip ``{"idx", "caption", "tags", "category_id"}`` in clip order."""
    items = []
    for shot in rendered.shots:
        for c in range(shot.n_clips):
            items.append({"idx": shot.start_clip + c, **clip_annotation(shot, c, cfg, concepts)})
    return items


def mask_label_names(shot: Shot) -> dict[int, str]:
    """Track label -> category name in a shot (0 is the background)."""
    return {0: BACKGROUNDS[shot.background].noun, **{o.label: CATEGORIES[o.category].name for o in shot.objects}}


def png_bytes(mask: np.ndarray) -> bytes:
    """A single-channel PNG of a boolean mask (object = 255). PIL writes no timestamps, so bytes are deterministic."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_masks(rendered: RenderedSplit, split: str, data_root: Path, progress: bool = False) -> dict[str, Any]:
    """Write ``masks/mask_cls_<split>_qwen_video/`` PNGs and return the ``mask_cls_dict`` (visible pixels only).

    The PNG folder is filled under a temporary name and renamed into place, so it appears complete or not at all.
    """
    from tqdm import tqdm

    final = data_root / mask_png_dir(split)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    mask_dict: dict[str, dict[str, str]] = {}
    try:
        for shot in tqdm(rendered.shots, desc=f"masks {split}", unit="shot", disable=not progress, leave=False):
            names = mask_label_names(shot)
            for clip in range(shot.start_clip, shot.start_clip + shot.n_clips):
                for f, label_map in enumerate(rendered.labels[clip]):
                    entry = {}
                    for label in np.unique(label_map).tolist():
                        (tmp / f"{mask_frame_key(clip, f)}_{label}.png").write_bytes(png_bytes(label_map == label))
                        entry[str(label)] = names[label]
                    mask_dict[mask_frame_key(clip, f)] = entry
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return mask_dict


def key_object_categories(cfg: ToyWorldConfig) -> dict[str, list[str]]:
    """The toy's find_key_obj lists: backgrounds are the background nouns, priority the animals in the world."""
    used = {c.name for c in CATEGORIES[: cfg.n_categories]}
    return {
        "background": sorted({b.noun for b in BACKGROUNDS[: cfg.n_backgrounds]}),
        "priority": [n for n in PRIORITY_NAMES if n in used],
    }
