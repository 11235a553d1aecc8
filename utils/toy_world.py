"""The toy cortex world's definition: its vocabulary (object categories, background scenes, concept classes) and
its configuration (one flat frozen dataclass, plus the ``toy`` and ``smoke`` presets).

The generator (:mod:`tasks_construction.toy_cortex`) renders and simulates from this; the toy foundation models read
the vocabulary to name what they classify. Categories differ in shape, colour, size and texture so that tiny models
can tell them apart. A world uses the first ``n_categories`` categories and the first ``n_backgrounds`` backgrounds;
the order puts the most distinct shapes first.

Every config knob has a default (the defaults are the ``toy`` preset). Sizes are relative to the resolution where they
are geometric (``*_frac`` = fraction of the frame side), so one config renders at 32 px or 224 px alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from utils.errors import ConfigError


# ---- vocabulary ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Category:
    name: str  # noun used in captions, tags and mask labels
    shape: str  # key of tasks_construction.toy_cortex.shapes.SHAPES
    colour_name: str
    rgb: tuple[float, float, float]
    size: float  # radius multiplier over the world's minimum radius
    texture: str  # "plain" | "stripes" | "checker" | "dots"
    verb: str
    concepts: tuple[str, ...]


@dataclass(frozen=True)
class Background:
    name: str  # caption phrase, e.g. "blue water"
    noun: str  # mask category, e.g. "water"
    top: tuple[float, float, float]  # colour at the top of the frame
    bottom: tuple[float, float, float]  # colour at the bottom
    pattern: str  # "waves" | "blades" | "lane" | "grain" | "stars" | "plain"
    preposition: str
    concepts: tuple[str, ...]


CATEGORIES: tuple[Category, ...] = (
    Category("ball", "disk", "red", (0.90, 0.10, 0.10), 1.00, "plain", "rolls", ("toy", "sports equipment")),
    Category("bird", "triangle", "yellow", (1.00, 0.85, 0.10), 1.00, "plain", "flies", ("animal", "bird")),
    Category("box", "square", "purple", (0.55, 0.20, 0.75), 1.30, "checker", "slides", ("container",)),
    Category("flower", "star", "pink", (1.00, 0.45, 0.75), 1.20, "dots", "sways", ("plant",)),
    Category("fish", "ellipse", "orange", (1.00, 0.50, 0.00), 1.15, "stripes", "swims", ("animal", "fish")),
    Category("kite", "diamond", "cyan", (0.10, 0.90, 0.90), 1.15, "checker", "flies", ("toy",)),
    Category("donut", "ring", "brown", (0.55, 0.30, 0.10), 1.15, "plain", "rolls", ("food",)),
    Category("cactus", "cross", "lime", (0.50, 1.00, 0.20), 1.20, "stripes", "hops", ("plant",)),
    Category("boat", "bowl", "white", (0.98, 0.98, 0.98), 1.30, "stripes", "sails", ("vehicle",)),
    Category("car", "wide_rect", "blue", (0.10, 0.20, 0.90), 1.30, "plain", "drives", ("vehicle",)),
    Category("moon", "crescent", "pale yellow", (0.95, 0.95, 0.60), 1.15, "plain", "drifts", ("celestial body",)),
    Category("turtle", "hexagon", "dark green", (0.10, 0.40, 0.15), 1.15, "checker", "crawls", ("animal", "reptile")),
)

BACKGROUNDS: tuple[Background, ...] = (
    Background("blue water", "water", (0.25, 0.45, 0.80), (0.08, 0.22, 0.55), "waves", "over", ("water body",)),
    Background("green grass", "grass", (0.35, 0.65, 0.30), (0.15, 0.45, 0.12), "blades", "on", ("plant",)),
    Background("grey road", "road", (0.50, 0.50, 0.50), (0.35, 0.35, 0.35), "lane", "on", ("roadway",)),
    Background("yellow sand", "sand", (0.90, 0.82, 0.55), (0.78, 0.66, 0.40), "grain", "on", ("landscape feature",)),
    Background("night sky", "sky", (0.02, 0.02, 0.12), (0.10, 0.10, 0.30), "stars", "in", ("sky",)),
    Background("white snow", "snow", (0.95, 0.95, 0.98), (0.82, 0.85, 0.92), "plain", "on", ("landscape feature",)),
)

#: Categories that find_key_obj treats as people/animals (displacement doubled, preferred as key objects).
PRIORITY_NAMES: tuple[str, ...] = ("bird", "fish", "turtle")


def concept_classes(n_categories: int, n_backgrounds: int) -> list[str]:
    """The concept classes of a world, in first-use order over its categories then backgrounds."""
    names: list[str] = []
    items: tuple[Category | Background, ...] = (*CATEGORIES[:n_categories], *BACKGROUNDS[:n_backgrounds])
    for item in items:
        names += [c for c in item.concepts if c not in names]
    return names


# ---- configuration -------------------------------------------------------------------------------------------------
#: Generator version: bump when the output for a given config changes, so old worlds are not mistaken for current.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ToyWorldConfig:
    """Knobs of the procedurally generated movie world and its simulated fMRI."""

    seed: int = 0
    # stimuli
    resolution: int = 32  # frame side R (pixels), up to 224
    n_frames: int = 6  # frames per clip (3 fps x TR 2 s)
    fps: float = 3.0
    tr: float = 2.0  # seconds per clip / fMRI volume
    n_train_clips: int = 720
    n_test_clips: int = 120
    segment_clips: int = 120  # clips per continuous movie segment (one scanner run)
    shot_min_clips: int = 2  # a shot lasts this many TRs at least ...
    shot_max_clips: int = 5  # ... and at most (a cut starts a new shot)
    n_categories: int = 6  # object categories used, 6..12 (first n of the vocabulary)
    n_backgrounds: int = 6  # background scenes used, 1..6
    min_objects: int = 1
    max_objects: int = 3
    min_radius_frac: float = 0.22  # smallest object radius / R (7 px at 32 px)
    max_speed_frac: float = 0.06  # largest speed / R per frame
    min_speed_frac: float = 0.015
    # simulated fMRI
    n_subjects: int = 3
    voxels: tuple[int, ...] = (1344, 1482, 911)  # per subject; cc2017's 13447/14828/9114 scaled by 1/10
    frac_retinotopic: float = 0.4
    frac_motion: float = 0.2
    frac_category: float = 0.25  # the rest are pure-noise voxels
    prf_grid: int = 16  # feature maps are pooled to this grid before pRF weighting
    prf_sigma_range: tuple[float, ...] = (0.06, 0.25)  # pRF size range (fraction of the frame side)
    motion_sigma_range: tuple[float, ...] = (0.15, 0.4)
    snr: float = 0.01  # signal variance / noise variance of one repeat (per-voxel gains scatter around it)
    hrf_model: str = "glover"  # nilearn "glover" or "spm"
    hrf_lag_trs: int = 2  # clip i is paired with volume i + lag (NeuroClips removes a 4 s delay)
    n_train_repeats: int = 2
    n_test_repeats: int = 10
    # noise ceiling
    ceiling_ways: tuple[int, ...] = (2, 50)  # plus all-way; ways above the test size are capped
    ceiling_trials: int = 200


#: ``toy``: several hundred training clips, 120 test clips; builds in well under 2 minutes on 2 cores.
TOY_PRESET: dict[str, Any] = {"n_train_clips": 720, "n_test_clips": 120, "segment_clips": 120}

#: ``smoke``: a few dozen clips and few voxels; builds in a few seconds, for tests.
SMOKE_PRESET: dict[str, Any] = {
    "n_train_clips": 48,
    "n_test_clips": 24,
    "segment_clips": 24,
    "voxels": (300, 340, 220),
    "ceiling_trials": 100,
}

PRESETS: dict[str, dict[str, Any]] = {"toy": TOY_PRESET, "smoke": SMOKE_PRESET}


def make_config(preset: str = "toy", **overrides: Any) -> ToyWorldConfig:
    """The named preset with ``overrides`` applied, validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown toy world preset {preset!r}", f"use one of {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(ToyWorldConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown toy world key(s) {unknown}", "see utils/toy_world.py")
    cfg = ToyWorldConfig(**{**PRESETS[preset], **overrides})
    validate_config(cfg)
    return cfg


def validate_config(cfg: ToyWorldConfig) -> None:
    """Raise :class:`ConfigError` for values the generator cannot honour."""
    checks = [
        (8 <= cfg.resolution <= 224, "world.resolution must be in 8..224"),
        (cfg.n_frames >= 2, "world.n_frames must be >= 2"),
        (cfg.n_frames == round(cfg.tr * cfg.fps), "world.n_frames must equal tr * fps (frames cover one TR)"),
        (cfg.n_train_clips >= 4 and cfg.n_test_clips >= 2, "world needs >= 4 train and >= 2 test clips"),
        (cfg.segment_clips >= 2, "world.segment_clips must be >= 2"),
        (1 <= cfg.shot_min_clips <= cfg.shot_max_clips, "world.shot_min_clips must be in 1..shot_max_clips"),
        (6 <= cfg.n_categories <= len(CATEGORIES), f"world.n_categories must be in 6..{len(CATEGORIES)}"),
        (1 <= cfg.n_backgrounds <= len(BACKGROUNDS), f"world.n_backgrounds must be in 1..{len(BACKGROUNDS)}"),
        (1 <= cfg.min_objects <= cfg.max_objects <= 3, "world needs 1 <= min_objects <= max_objects <= 3"),
        (0.05 <= cfg.min_radius_frac <= 0.3, "world.min_radius_frac must be in 0.05..0.3"),
        (0 < cfg.min_speed_frac <= cfg.max_speed_frac, "world needs 0 < min_speed_frac <= max_speed_frac"),
        (len(cfg.voxels) == cfg.n_subjects >= 1, "world.voxels needs one voxel count per subject"),
        (all(v >= 20 for v in cfg.voxels), "world.voxels must be >= 20 each"),
        (cfg.frac_retinotopic + cfg.frac_motion + cfg.frac_category <= 1.0, "world voxel fractions exceed 1"),
        (min(cfg.frac_retinotopic, cfg.frac_motion, cfg.frac_category) >= 0, "world voxel fractions must be >= 0"),
        (len(cfg.prf_sigma_range) == 2 and len(cfg.motion_sigma_range) == 2, "world sigma ranges need 2 values"),
        (cfg.snr > 0, "world.snr must be > 0"),
        (cfg.hrf_model in ("glover", "spm"), "world.hrf_model must be 'glover' or 'spm'"),
        (cfg.hrf_lag_trs >= 0, "world.hrf_lag_trs must be >= 0"),
        (cfg.n_train_repeats >= 1 and cfg.n_test_repeats >= 1, "world repeats must be >= 1"),
        (all(w >= 2 for w in cfg.ceiling_ways) and cfg.ceiling_trials >= 1, "world.ceiling_ways must be >= 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message, "fix the world section of the profile or the --set override")


def config_dict(cfg: ToyWorldConfig) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_hash(cfg: ToyWorldConfig) -> str:
    """Stable hash of the config and the generator version (identifies a world's content)."""
    text = json.dumps({"config": config_dict(cfg), "generator_version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
