"""Toy ``frame_classifier`` role: a tiny ``ViTForImageClassification`` over the toy world's scene classes, trained on
single frames of the TRAINING split.

Classes (:func:`frame_class_names`): main object category x background x number of objects (1..3), e.g. 6 x 6 x 3 =
108 for the ``toy``/``smoke`` worlds. Labels come from the world's annotations (``tags`` of
``qwen_annotation/qwen_train_caption_tag_category_id.json``: main object first, background noun last) and the world's
vocabulary; the class list is the full product, so it does not depend on which combinations the training split holds.

Training uses exactly the input mapping of :class:`ViTImageProcessor` (uint8, resize to the world's resolution, mean
and std 0.5), a factorised cross-entropy (the joint class plus each factor's marginal, which shares evidence across
the sparse joint classes) and horizontal flips (no class depends on left/right).

Files in ``weights_root/frame_classifier/``: ``save_pretrained`` of the model (``config.json`` with ``id2label``,
``model.safetensors``) and of the processor (``preprocessor_config.json``), ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from models.foundation.frame_classifier import FrameClassifierRole
from models.foundation.toy.common import TrainRecipe, generator, load_hf_model, random_frames, save_hf_model, train
from models.foundation.toy.data import Stimuli
from utils.data_catalog import WORLD_FILE, annotation_file
from utils.errors import DataError
from utils.toy_world import BACKGROUNDS, CATEGORIES

if TYPE_CHECKING:
    from transformers import ViTForImageClassification

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")
MAX_OBJECTS = 3


# ---------------------------------------------------------------------------------------------------------------------
# labels of the toy world (shared with the video classifier)


@dataclass(frozen=True)
class SceneFactors:
    """Per-clip factors of one split, each ``(N,)`` int64: main object ``category``, ``background``, ``count - 1`` of
    objects and motion ``direction`` of the main object (index into :data:`DIRECTIONS`). ``categories`` / ``colours``
    / ``backgrounds`` name the world's vocabulary in index order."""

    category: torch.Tensor
    background: torch.Tensor
    count: torch.Tensor
    direction: torch.Tensor
    categories: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]


def world_vocabulary(world_root: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """-> (category names, their colour names, background nouns) of the categories/backgrounds the world uses."""
    try:
        cfg = json.loads((world_root / WORLD_FILE).read_text(encoding="utf-8"))["config"]
        n_cat, n_bg = int(cfg["n_categories"]), int(cfg["n_backgrounds"])
    except (OSError, ValueError, KeyError):
        n_cat, n_bg = len(CATEGORIES), len(BACKGROUNDS)
    cats = CATEGORIES[:n_cat]
    return tuple(c.name for c in cats), tuple(c.colour_name for c in cats), tuple(b.noun for b in BACKGROUNDS[:n_bg])


def _direction(caption: str) -> int:
    words = [w for w in caption.split() if w in DIRECTIONS]
    return DIRECTIONS.index(words[0]) if words else 0


def load_factors(world_root: str | Path, split: str = "train") -> SceneFactors:
    """Read the scene factors of every clip of ``split`` from its annotations (:class:`DataError` if unreadable)."""
    root = Path(world_root)
    path = root / annotation_file(split)
    try:
        items = sorted(json.loads(path.read_text(encoding="utf-8")), key=lambda it: int(it["idx"]))
        categories, colours, backgrounds = world_vocabulary(root)
        rows = [
            (
                categories.index(it["tags"][0]),
                backgrounds.index(it["tags"][-1]),
                min(len(it["tags"]) - 1, MAX_OBJECTS) - 1,
                _direction(str(it["caption"])),
            )
            for it in items
        ]
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise DataError(f"cannot read toy scene labels from {path} ({err})", "rebuild the toy world") from err
    cols = torch.tensor(rows, dtype=torch.long).T
    return SceneFactors(cols[0], cols[1], cols[2], cols[3], categories, colours, backgrounds)


def joint_index(factors: list[torch.Tensor], sizes: tuple[int, ...]) -> torch.Tensor:
    """Row-major joint class of factor indices: ``[(N,), ...]`` with ``sizes`` -> ``(N,)``."""
    out = torch.zeros_like(factors[0])
    for f, size in zip(factors, sizes, strict=True):
        out = out * size + f
    return out


def factorised_ce(
    logits: torch.Tensor, factors: list[torch.Tensor], sizes: tuple[int, ...], joint_weight: float = 1.0
) -> torch.Tensor:
    """``joint_weight`` x cross-entropy of the joint class + the NLL of each factor's marginal (logsumexp of the joint
    log-probabilities over the other factors). The marginal terms let the joint scores generalise to combinations
    the training split lacks. ``logits (B, prod(sizes))``, ``factors [(B,), ...]`` -> scalar."""
    logp = logits.float().log_softmax(dim=-1)
    loss = joint_weight * F.nll_loss(logp, joint_index(factors, sizes))
    grid = logp.reshape(-1, *sizes)
    dims = list(range(1, len(sizes) + 1))
    for k, f in enumerate(factors):
        marginal = grid.logsumexp(dim=[d for d in dims if d != k + 1])  # (B, sizes[k])
        loss = loss + F.nll_loss(marginal, f)
    return loss


def frame_sizes(factors: SceneFactors) -> tuple[int, int, int]:
    return len(factors.categories), len(factors.backgrounds), MAX_OBJECTS


def frame_class_names(factors: SceneFactors) -> list[str]:
    """Names of the frame classes in joint-index order (category, background, count)."""
    return [
        f"{colour} {cat} on {bg}, {n} object{'s' if n > 1 else ''}"
        for cat, colour in zip(factors.categories, factors.colours, strict=True)
        for bg in factors.backgrounds
        for n in range(1, MAX_OBJECTS + 1)
    ]


def frame_labels(factors: SceneFactors) -> torch.Tensor:
    """``(N,)`` frame class of every clip (every frame of a clip has its clip's class)."""
    return joint_index([factors.category, factors.background, factors.count], frame_sizes(factors))


def processor_inputs(frames01: torch.Tensor) -> torch.Tensor:
    """What a mean/std-0.5 image processor makes of ``(N, 3, R, R)`` frames at their own size: uint8 truncation,
    then ``2 x - 1``. ``(N, 3, R, R)`` -> same."""
    return (frames01.clamp(0, 1) * 255).to(torch.uint8).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class ToyClassifierRecipe:
    """Architecture and training of a toy transformers classifier over the scene classes (frame and video)."""

    patch_size: int = 4
    hidden_size: int = 64
    layers: int = 3
    heads: int = 4
    intermediate_size: int = 128
    joint_weight: float = 0.5
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=300, batch_size=64, lr=2e-3, weight_decay=0.05, warmup=30)
    )

    def hf_config(self, resolution: int, names: list[str]) -> dict[str, Any]:
        return {
            "image_size": resolution,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.intermediate_size,
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }


@dataclass(frozen=True)
class ToyFrameClassifierRecipe(ToyClassifierRecipe):
    """Architecture and training of the toy ViT (``(R / patch_size)^2`` patch tokens + CLS)."""


RECIPES: dict[str, ToyFrameClassifierRecipe] = {
    "toy": ToyFrameClassifierRecipe(),
    "smoke": ToyFrameClassifierRecipe(
        patch_size=8,
        hidden_size=32,
        layers=1,
        heads=2,
        intermediate_size=64,
        train=TrainRecipe(steps=120, batch_size=32, lr=4e-3, weight_decay=0.05, warmup=12),
    ),
}


def make_processor(resolution: int) -> Any:
    """``ViTImageProcessor`` resizing to the world's resolution with mean/std 0.5 (the paper ViT's normalisation)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        size={"height": resolution, "width": resolution}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def train_frame_classifier(
    stim: Stimuli, factors: SceneFactors, recipe: ToyFrameClassifierRecipe, seed: int, progress: bool
) -> tuple[ViTForImageClassification, dict[str, Any]]:
    """Train on (random frame of a random training clip, its class), flipped left/right half the time."""
    from transformers import ViTConfig, ViTForImageClassification

    gen = generator(seed)
    names = frame_class_names(factors)
    model = ViTForImageClassification(ViTConfig(**recipe.hf_config(stim.resolution, names)))
    parts = [factors.category, factors.background, factors.count]

    def loss_fn(step: int) -> torch.Tensor:
        clips, x = random_frames(stim, recipe.train.batch_size, gen)
        flip = torch.rand(len(clips), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        logits = model(pixel_values=processor_inputs(x)).logits
        return factorised_ce(logits, [p[clips] for p in parts], frame_sizes(factors), recipe.joint_weight)

    stats = train(model, loss_fn, recipe.train, "toy frame_classifier", progress)
    return model, {**stats, "num_classes": len(names)}


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool, world_root: Path) -> dict[str, Any]:
    """Train the toy ViT on the training split of ``world_root``; save model and processor into ``folder``."""
    model, stats = train_frame_classifier(stim, load_factors(world_root, "train"), RECIPES[scale], seed, progress)
    save_hf_model(model, make_processor(stim.resolution), folder)
    return stats


def build_toy(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> FrameClassifierRole:
    """The toy/smoke ViT from ``weights_root/frame_classifier/``."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    classes = (ViTForImageClassification, ViTImageProcessor)
    parts = load_hf_model(weights_root, "frame_classifier", "frame classifier", classes, device, dtype)
    return FrameClassifierRole(*parts)
