"""Toy ``video_classifier`` role: a tiny ``VideoMAEForVideoClassification`` over the toy world's moving-scene
classes, trained on whole clips (all ``F`` frames) of the TRAINING split.

Classes (:func:`video_class_names`): main object category x its motion direction (left/right/up/down, from the
caption) x background, e.g. 6 x 4 x 6 = 144 for the ``toy``/``smoke`` worlds; labels from the world's annotations
(:func:`~models.foundation.frame_classifier.toy.load_factors`). Training uses the input mapping of the saved
``VideoMAEImageProcessor`` (uint8, shortest edge and centre crop at the world's resolution, mean/std 0.5), the same
factorised cross-entropy as the frame classifier, and random time reversals and left/right flips with the direction
label remapped (without them the model memorises each training shot's direction instead of reading the motion).

Files in ``weights_root/video_classifier/``: ``save_pretrained`` of the model and of the processor, ``manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.foundation.frame_classifier.toy import (
    DIRECTIONS,
    SceneFactors,
    ToyClassifierRecipe,
    factorised_ce,
    joint_index,
    load_factors,
    processor_inputs,
)
from models.foundation.toy.common import TrainRecipe, batch_indices, generator, load_hf_model, save_hf_model, train
from models.foundation.toy.data import Stimuli
from models.foundation.video_classifier import VideoClassifierRole

if TYPE_CHECKING:
    from transformers import VideoMAEForVideoClassification

log = logging.getLogger(__name__)


def video_sizes(factors: SceneFactors) -> tuple[int, int, int]:
    return len(factors.categories), len(DIRECTIONS), len(factors.backgrounds)


def video_class_names(factors: SceneFactors) -> list[str]:
    """Names of the video classes in joint-index order (category, direction, background)."""
    return [
        f"{colour} {cat} moving {d} on {bg}"
        for cat, colour in zip(factors.categories, factors.colours, strict=True)
        for d in DIRECTIONS
        for bg in factors.backgrounds
    ]


def video_parts(factors: SceneFactors) -> list[torch.Tensor]:
    return [factors.category, factors.direction, factors.background]


def video_labels(factors: SceneFactors) -> torch.Tensor:
    """``(N,)`` video class of every clip."""
    return joint_index(video_parts(factors), video_sizes(factors))


@dataclass(frozen=True)
class ToyVideoClassifierRecipe(ToyClassifierRecipe):
    """Architecture and training of the toy VideoMAE (``(F / tubelet) * (R / patch)^2`` tokens, mean pooled)."""

    tubelet_size: int | None = None  # None = the clip length: tokens see their patch in every frame (3x faster than
    # a tubelet of 2 and as accurate in the trials)
    layers: int = 2
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=400, batch_size=32, lr=2e-3, weight_decay=0.05, warmup=30)
    )

    def video_config(self, resolution: int, num_frames: int, names: list[str]) -> dict[str, Any]:
        """Keyword arguments of ``VideoMAEConfig``."""
        tubelet = self.tubelet_size or num_frames
        return {**self.hf_config(resolution, names), "num_frames": num_frames, "tubelet_size": tubelet}


RECIPES: dict[str, ToyVideoClassifierRecipe] = {
    "toy": ToyVideoClassifierRecipe(),  # ~15 s on 1 thread
    "smoke": ToyVideoClassifierRecipe(
        patch_size=8,
        hidden_size=32,
        layers=1,
        heads=2,
        intermediate_size=64,
        train=TrainRecipe(steps=120, batch_size=16, lr=4e-3, weight_decay=0.05, warmup=12),
    ),
}


def make_processor(resolution: int) -> Any:
    """``VideoMAEImageProcessor`` at the world's resolution with mean/std 0.5."""
    from transformers import VideoMAEImageProcessor

    return VideoMAEImageProcessor(
        size={"shortest_edge": resolution},
        crop_size={"height": resolution, "width": resolution},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


REVERSED = torch.tensor([1, 0, 3, 2])  # direction index after playing the clip backwards (see DIRECTIONS)
MIRRORED = torch.tensor([1, 0, 2, 3])  # ... after a left/right flip


def augment(clips: torch.Tensor, direction: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random time reversal and left/right flip of ``(B, F, 3, R, R)`` clips with their direction labels ``(B,)``
    remapped. The same scene then carries opposite directions, so the direction must be read from the motion."""
    reverse = torch.rand(len(clips), generator=gen) < 0.5
    mirror = torch.rand(len(clips), generator=gen) < 0.5
    clips = torch.where(reverse[:, None, None, None, None], clips.flip(1), clips)
    clips = torch.where(mirror[:, None, None, None, None], clips.flip(-1), clips)
    direction = torch.where(reverse, REVERSED[direction], direction)
    return clips, torch.where(mirror, MIRRORED[direction], direction)


def train_video_classifier(
    stim: Stimuli, factors: SceneFactors, recipe: ToyVideoClassifierRecipe, seed: int, progress: bool
) -> tuple[VideoMAEForVideoClassification, dict[str, Any]]:
    """Train on (training clip ``(F, 3, R, R)``, its class)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    gen = generator(seed)
    names = video_class_names(factors)
    config = VideoMAEConfig(**recipe.video_config(stim.resolution, stim.n_frames, names))
    model = VideoMAEForVideoClassification(config)

    def loss_fn(step: int) -> torch.Tensor:
        clips = batch_indices(stim.n_clips, recipe.train.batch_size, gen)
        x, direction = augment(stim.frames[clips], factors.direction[clips], gen)
        labels = [factors.category[clips], direction, factors.background[clips]]
        logits = model(pixel_values=processor_inputs(x)).logits
        return factorised_ce(logits, labels, video_sizes(factors), recipe.joint_weight)

    stats = train(model, loss_fn, recipe.train, "toy video_classifier", progress)
    return model, {**stats, "num_classes": len(names)}


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool, world_root: Path) -> dict[str, Any]:
    """Train the toy VideoMAE on the training split of ``world_root``; save model and processor into ``folder``."""
    model, stats = train_video_classifier(stim, load_factors(world_root, "train"), RECIPES[scale], seed, progress)
    save_hf_model(model, make_processor(stim.resolution), folder)
    return stats


def build_toy(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> VideoClassifierRole:
    """The toy/smoke VideoMAE from ``weights_root/video_classifier/`` (``num_frames`` = the world's clip length)."""
    from transformers import VideoMAEForVideoClassification, VideoMAEImageProcessor

    classes = (VideoMAEForVideoClassification, VideoMAEImageProcessor)
    parts = load_hf_model(weights_root, "video_classifier", "video classifier", classes, device, dtype)
    return VideoClassifierRole(*parts)
