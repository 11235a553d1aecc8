"""Toy ``video_classifier`` role: a tiny ``VideoMAEForVideoClassification`` over the toy world's moving-scene
classes, trained on whole clips (all ``F`` frames) of the TRAINING split.

Classes (:func:`video_class_names`): main object category x its motion direction (left/right/up/down, from the
caption) [x its speed class (slow/fast: |v| below / above the midpoint of the world's speed range), when the recipe's
``speed_classes`` is set] x background, e.g. 6 x 4 x 6 = 144 for the ``toy``/``smoke`` worlds (288 with speed);
labels from the world's annotations (:func:`~models.foundation.frame_classifier.toy.load_factors`).

How it learns the motion (a plain VideoMAE trained from scratch on the 720 toy clips stays at chance on direction):

* motion-energy tubelet embedding: the first channels of the tubelet embedding (kernel = the whole clip x ``patch``)
  start as fixed derivative filters on ``motion_blocks^2`` sub-blocks of every patch, per colour: the difference of
  each pair of consecutive frames and the x and y ramps of the clip mean (:func:`motion_filters`). They stay frozen
  during training; the ReLU^2 MLPs (``hidden_act="relu2"``) turn their products into local motion energy
  (temporal x spatial derivative), which is what tells the direction regardless of the object's contrast.
* a motion curriculum: the first ``motion_steps`` steps train only the motion factors (direction, speed), then all.
* a factorised head (:class:`~models.foundation.frame_classifier.toy.FactorisedHead`) folded into the model's single
  ``classifier`` Linear after training, and random time reversals, left/right and up/down flips and transposes with
  the direction label remapped (without them the model memorises each training shot's direction).

The saved model is a plain ``VideoMAEForVideoClassification``. Training uses the input mapping of the saved
``VideoMAEImageProcessor`` (uint8, shortest edge and centre crop at the world's resolution, mean/std 0.5).

The main object looks like the other objects of its clip except where it occludes them, so with k objects its
category (and direction) is identifiable about 1/k of the time: on the ``toy`` test split the top-1 ceiling is near
0.53 and the direction accuracy is high on single-object clips but not on crowded ones.

Files in ``weights_root/video_classifier/``: ``save_pretrained`` of the model and of the processor, ``manifest.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.foundation.common import count_params
from models.foundation.frame_classifier.toy import (
    DIRECTIONS,
    SPEEDS,
    FactorisedHead,
    SceneFactors,
    ToyClassifierRecipe,
    factorised_ce,
    fold_classifier,
    joint_index,
    load_factors,
    processor_inputs,
    random_dihedral,
)
from models.foundation.toy.common import TrainRecipe, batch_indices, generator, load_hf_model, save_hf_model, train
from models.foundation.toy.data import Stimuli
from models.foundation.video_classifier import VideoClassifierRole

if TYPE_CHECKING:
    from transformers import VideoMAEForVideoClassification

log = logging.getLogger(__name__)

FACTORS = ("category", "direction", "speed", "background")  # the video factors, in joint-index order
MOTION_FACTORS = ("direction", "speed")


def video_factor_names(speed: bool) -> tuple[str, ...]:
    """The factors of the video classes, in joint-index order (``speed`` only with speed classes)."""
    return tuple(f for f in FACTORS if speed or f != "speed")


def video_sizes(factors: SceneFactors, speed: bool = False) -> tuple[int, ...]:
    sizes = {"category": len(factors.categories), "direction": len(DIRECTIONS), "speed": len(SPEEDS)}
    return tuple(sizes.get(f, len(factors.backgrounds)) for f in video_factor_names(speed))


def video_class_names(factors: SceneFactors, speed: bool = False) -> list[str]:
    """Names of the video classes in joint-index order (category, direction, [speed,] background), e.g. "red ball
    moving left on water" or "red ball moving left (fast) on water"."""
    return [
        f"{colour} {cat} moving {d}{f' ({s})' if s else ''} on {bg}"
        for cat, colour in zip(factors.categories, factors.colours, strict=True)
        for d in DIRECTIONS
        for s in (SPEEDS if speed else ("",))
        for bg in factors.backgrounds
    ]


def video_parts(factors: SceneFactors, speed: bool = False) -> list[torch.Tensor]:
    """The per-clip factors ``[(N,), ...]`` in joint-index order."""
    parts = {"category": factors.category, "direction": factors.direction, "speed": factors.speed}
    return [parts.get(f, factors.background) for f in video_factor_names(speed)]


def video_labels(factors: SceneFactors, speed: bool = False) -> torch.Tensor:
    """``(N,)`` video class of every clip."""
    return joint_index(video_parts(factors, speed), video_sizes(factors, speed))


def has_speed_classes(num_classes: int, factors: SceneFactors) -> bool:
    """Whether a classifier with ``num_classes`` classes over ``factors``' world has the speed factor."""
    if num_classes == math.prod(video_sizes(factors, True)):
        return True
    if num_classes == math.prod(video_sizes(factors, False)):
        return False
    raise ValueError(f"{num_classes} video classes fit neither the world's classes with nor without speed")


@dataclass(frozen=True)
class ToyVideoClassifierRecipe(ToyClassifierRecipe):
    """Architecture and training of the toy VideoMAE (``(F / tubelet) * (R / patch)^2`` tokens, mean pooled).

    ``motion_blocks``: sub-blocks per patch side that get fixed motion-energy filters (0 = none; they take
    ``3 * motion_blocks^2 * (tubelet + 1)`` of the ``hidden_size`` embedding channels). ``motion_steps``: steps of
    the motion-only curriculum. ``speed_classes``: add the slow/fast factor to the classes."""

    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 256
    tubelet_size: int | None = None  # None = the clip length: every token sees its patch in every frame
    layers: int = 2
    hidden_act: str = "relu2"
    motion_blocks: int = 2
    motion_gain: float = 4.0
    motion_steps: int = 600
    speed_classes: bool = False
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=1200, batch_size=32, lr=2e-3, weight_decay=0.05, warmup=30)
    )

    def video_config(self, resolution: int, num_frames: int, names: list[str]) -> dict[str, Any]:
        """Keyword arguments of ``VideoMAEConfig``."""
        tubelet = self.tubelet_size or num_frames
        return {**self.hf_config(resolution, names), "num_frames": num_frames, "tubelet_size": tubelet}

    def motion_channels(self, tubelet: int) -> int:
        return 3 * self.motion_blocks**2 * (tubelet + 1)


RECIPES: dict[str, ToyVideoClassifierRecipe] = {
    "toy": ToyVideoClassifierRecipe(),  # 1200 steps, ~30 s on 1 thread
    "smoke": ToyVideoClassifierRecipe(
        hidden_size=48,
        layers=1,
        heads=2,
        intermediate_size=96,
        motion_blocks=1,
        motion_steps=60,
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


# direction index (see DIRECTIONS: left, right, up, down) after each augmentation
REVERSED = torch.tensor([1, 0, 3, 2])  # playing the clip backwards
MIRRORED = torch.tensor([1, 0, 2, 3])  # a left/right flip
VFLIPPED = torch.tensor([0, 1, 3, 2])  # an up/down flip
TRANSPOSED = torch.tensor([2, 3, 0, 1])  # swapping x and y


def augment(clips: torch.Tensor, direction: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random time reversal, left/right and up/down flips and transposes of ``(B, F, 3, R, R)`` clips with their
    direction labels ``(B,)`` remapped. The same scene then carries every direction, so the direction must be read
    from the motion. Category, background and speed do not change."""
    reverse = torch.rand(len(clips), generator=gen) < 0.5
    clips = torch.where(reverse[:, None, None, None, None], clips.flip(1), clips)
    direction = torch.where(reverse, REVERSED[direction], direction)
    clips, mirror, vflip, transpose = random_dihedral(clips, gen)
    for draw, table in ((mirror, MIRRORED), (vflip, VFLIPPED), (transpose, TRANSPOSED)):
        direction = torch.where(draw, table[direction], direction)
    return clips, direction


@torch.no_grad()
def motion_filters(conv: nn.Conv3d, blocks: int, gain: float) -> int:
    """Set the first output channels of a tubelet embedding ``conv`` (weight ``(H, 3, T, P, P)``) to derivative
    filters on each of ``blocks x blocks`` sub-blocks of the patch, per colour: the T-1 consecutive frame
    differences and the x and y ramps (T frames averaged), each with L1 norm ``2 * gain``; zero bias. Returns the
    number of channels set."""
    _, _, frames, patch, _ = conv.weight.shape
    side = patch // blocks
    ramp = torch.linspace(-1.0, 1.0, side)
    temporal = [torch.eye(frames)[t + 1] - torch.eye(frames)[t] for t in range(frames - 1)]
    kernels = [d[:, None, None].expand(frames, side, side) for d in temporal]
    kernels += [ramp[None, None, :].expand(frames, side, side), ramp[None, :, None].expand(frames, side, side)]
    k = 0
    for colour in range(3):
        for by in range(blocks):
            for bx in range(blocks):
                for kernel in kernels:
                    conv.weight[k] = 0.0
                    block = conv.weight[k, colour, :, by * side : (by + 1) * side, bx * side : (bx + 1) * side]
                    block.copy_(2.0 * gain * kernel / kernel.abs().sum())
                    conv.bias[k] = 0.0
                    k += 1
    return k


class FrozenRows:
    """Keeps the first ``n`` rows of a parameter fixed while an optimiser trains the rest: their gradients are zeroed
    (so Adam leaves them alone) and :meth:`restore` undoes AdamW's weight decay on them."""

    def __init__(self, param: nn.Parameter, n: int):
        self.param, self.n = param, n
        self.value = param.detach()[:n].clone()
        mask = torch.ones_like(param)
        mask[:n] = 0.0
        self.handle = param.register_hook(lambda grad: grad * mask)

    @torch.no_grad()
    def restore(self) -> None:
        self.param[: self.n] = self.value

    def release(self) -> None:
        self.restore()
        self.handle.remove()


def freeze_motion_filters(model: Any, recipe: ToyVideoClassifierRecipe) -> list[FrozenRows]:
    """Motion filters in the tubelet embedding of a fresh VideoMAE (:func:`motion_filters`), frozen; [] if none."""
    if recipe.motion_blocks <= 0:
        return []
    conv = model.videomae.embeddings.patch_embeddings.projection
    wanted = recipe.motion_channels(int(conv.weight.shape[2]))
    if wanted > recipe.hidden_size or recipe.patch_size % recipe.motion_blocks:
        raise ValueError(
            f"{wanted} motion channels on {recipe.motion_blocks}^2 blocks do not fit hidden_size "
            f"{recipe.hidden_size} / patch_size {recipe.patch_size}"
        )
    n = motion_filters(conv, recipe.motion_blocks, recipe.motion_gain)
    return [FrozenRows(conv.weight, n), FrozenRows(conv.bias, n)]


def train_video_classifier(
    stim: Stimuli, factors: SceneFactors, recipe: ToyVideoClassifierRecipe, seed: int, progress: bool
) -> tuple[VideoMAEForVideoClassification, dict[str, Any]]:
    """Train on (training clip ``(F, 3, R, R)``, its class)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    gen = generator(seed)
    speed = recipe.speed_classes
    names = video_class_names(factors, speed)
    sizes = video_sizes(factors, speed)
    config = VideoMAEConfig(**recipe.video_config(stim.resolution, stim.n_frames, names))
    model = VideoMAEForVideoClassification(config)
    model.classifier = FactorisedHead(recipe.hidden_size, sizes)
    frozen = freeze_motion_filters(model, recipe)
    motion_only = tuple(float(f in MOTION_FACTORS) for f in video_factor_names(speed))
    parts, at_direction = video_parts(factors, speed), video_factor_names(speed).index("direction")

    def loss_fn(step: int) -> torch.Tensor:
        for rows in frozen:
            rows.restore()
        clips = batch_indices(stim.n_clips, recipe.train.batch_size, gen)
        x, direction = augment(stim.frames[clips], factors.direction[clips], gen)
        labels = [direction if i == at_direction else p[clips] for i, p in enumerate(parts)]
        logits = model(pixel_values=processor_inputs(x)).logits
        if step < recipe.motion_steps:
            return factorised_ce(logits, labels, sizes, 0.0, motion_only)
        return factorised_ce(logits, labels, sizes, recipe.joint_weight)

    stats = train(model, loss_fn, recipe.train, "toy video_classifier", progress)
    for rows in frozen:
        rows.release()
    fold_classifier(model)
    return model, {**stats, "params": count_params(model), "num_classes": len(names)}


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
