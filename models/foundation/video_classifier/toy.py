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

from models.foundation.common import finish
from models.foundation.frame_classifier.toy import (
    DIRECTIONS,
    SceneFactors,
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
class ToyVideoClassifierRecipe:
    """Architecture and training of the toy VideoMAE (``(F / tubelet) * (R / patch)^2`` tokens, mean pooled)."""

    patch_size: int = 4
    tubelet_size: int | None = None  # None = the clip length: tokens see their patch in every frame (3x faster than
    # a tubelet of 2 and as accurate in the trials)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128
    joint_weight: float = 0.5
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=400, batch_size=32, lr=2e-3, weight_decay=0.05, warmup=30)
    )

    def hf_config(self, resolution: int, num_frames: int, names: list[str]) -> dict[str, Any]:
        return {
            "image_size": resolution,
            "patch_size": self.patch_size,
            "num_frames": num_frames,
            "tubelet_size": self.tubelet_size or num_frames,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.intermediate_size,
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }


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
    model = VideoMAEForVideoClassification(VideoMAEConfig(**recipe.hf_config(stim.resolution, stim.n_frames, names)))

    def loss_fn(step: int) -> torch.Tensor:
        clips = batch_indices(stim.n_clips, recipe.train.batch_size, gen)
        x, direction = augment(stim.frames[clips], factors.direction[clips], gen)
        labels = [factors.category[clips], direction, factors.background[clips]]
        logits = model(pixel_values=processor_inputs(x)).logits
        return factorised_ce(logits, labels, video_sizes(factors), recipe.joint_weight)

    stats = train(model, loss_fn, recipe.train, "toy video_classifier", progress)
    model.requires_grad_(False)
    return model, {**stats, "params": sum(p.numel() for p in model.parameters()), "num_classes": len(names)}


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
    model, processor = load_hf_model(weights_root, "video_classifier", *classes)
    return VideoClassifierRole(finish(model, device, dtype), processor)
