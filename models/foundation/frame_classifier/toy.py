"""Toy ``frame_classifier`` role: a tiny ``ViTForImageClassification`` over the toy world's scene classes, trained on
single frames of the TRAINING split.

Classes (:func:`frame_class_names`): main object category x background x number of objects (1..3), e.g. 6 x 6 x 3 =
108 for the ``toy``/``smoke`` worlds. Labels come from the world's annotations (``tags`` of
``qwen_annotation/qwen_train_caption_tag_category_id.json``: main object first, background noun last) and the world's
vocabulary; the class list is the full product, so it does not depend on which combinations the training split holds.

Training uses exactly the input mapping of :class:`ViTImageProcessor` (uint8, resize to the world's resolution, mean
and std 0.5), a factorised cross-entropy (the joint class plus each factor's marginal, which shares evidence across
the sparse joint classes), random flips and transposes (no frame class depends on orientation) and a factorised
head: during training the joint logits are the sum of one linear head per factor (:class:`FactorisedHead`), so every
training frame teaches its category, background and count rows instead of one sparse joint row; the heads are then
folded into the model's single ``classifier`` Linear (exactly the same logits), so the saved model is a plain
``ViTForImageClassification``.

The "category" is the world's main object (``tags[0]``, the object the caption is about). It is drawn in front of the
others but otherwise looks like them, so in a frame with k objects it is identifiable only where it occludes another:
the top-1 ceiling on the test split is near the mean of 1/k (0.53 for the ``toy`` world), not 1.

Files in ``weights_root/frame_classifier/``: ``save_pretrained`` of the model (``config.json`` with ``id2label``,
``model.safetensors``) and of the processor (``preprocessor_config.json``), ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from models.foundation.common import count_params
from models.foundation.frame_classifier import FrameClassifierRole
from models.foundation.toy.common import TrainRecipe, generator, load_hf_model, random_frames, save_hf_model, train
from models.foundation.toy.data import Stimuli
from utils.data_catalog import WORLD_FILE, annotation_file, toy_scenes_file
from utils.errors import DataError
from utils.toy_world import BACKGROUNDS, CATEGORIES, ToyWorldConfig

if TYPE_CHECKING:
    from transformers import ViTForImageClassification

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")  # the main object's |v| below / at or above the midpoint of the world's speed range
MAX_OBJECTS = 3


# ---------------------------------------------------------------------------------------------------------------------
# labels of the toy world (shared with the video classifier)


@dataclass(frozen=True)
class SceneFactors:
    """Per-clip factors of one split, each ``(N,)`` int64: main object ``category``, ``background``, ``count - 1`` of
    objects, motion ``direction`` of the main object (index into :data:`DIRECTIONS`) and its ``speed`` class (index
    into :data:`SPEEDS`). ``categories`` / ``colours`` / ``backgrounds`` name the world's vocabulary in index order."""

    category: torch.Tensor
    background: torch.Tensor
    count: torch.Tensor
    direction: torch.Tensor
    speed: torch.Tensor
    categories: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]


def _world_config(world_root: Path) -> dict[str, Any]:
    """The ``config`` of the world's ``world.json`` ({} if unreadable)."""
    try:
        cfg = json.loads((world_root / WORLD_FILE).read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def world_vocabulary(world_root: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """-> (category names, their colour names, background nouns) of the categories/backgrounds the world uses."""
    cfg = _world_config(world_root)
    try:
        n_cat, n_bg = int(cfg["n_categories"]), int(cfg["n_backgrounds"])
    except (KeyError, TypeError, ValueError):
        n_cat, n_bg = len(CATEGORIES), len(BACKGROUNDS)
    cats = CATEGORIES[:n_cat]
    return tuple(c.name for c in cats), tuple(c.colour_name for c in cats), tuple(b.noun for b in BACKGROUNDS[:n_bg])


def _direction(caption: str) -> int:
    words = [w for w in caption.split() if w in DIRECTIONS]
    return DIRECTIONS.index(words[0]) if words else 0


def speed_threshold(world_root: Path) -> float:
    """The slow/fast boundary in pixels per frame: the midpoint of the world's speed range (``min_speed_frac`` ..
    ``max_speed_frac`` x ``resolution``; the generator's defaults where ``world.json`` lacks them)."""
    cfg, default = _world_config(world_root), ToyWorldConfig()
    lo = float(cfg.get("min_speed_frac", default.min_speed_frac))
    hi = float(cfg.get("max_speed_frac", default.max_speed_frac))
    return 0.5 * (lo + hi) * float(cfg.get("resolution", default.resolution))


def main_object_speeds(world_root: Path, split: str, n_clips: int) -> torch.Tensor:
    """``(n_clips,)`` float |v| (pixels per frame) of each clip's main object (label 1) from ``toy_scenes_<split>``."""
    speed = torch.full((n_clips,), float("nan"))
    for shot in json.loads((world_root / toy_scenes_file(split)).read_text(encoding="utf-8")):
        main = min(shot["objects"], key=lambda o: int(o["label"]))
        start = int(shot["start_clip"])
        speed[start : start + int(shot["n_clips"])] = math.hypot(float(main["vx"]), float(main["vy"]))
    if bool(speed.isnan().any()):
        raise ValueError(f"{toy_scenes_file(split)} does not cover all {n_clips} clips")
    return speed


def load_factors(world_root: str | Path, split: str = "train") -> SceneFactors:
    """Read the scene factors of every clip of ``split`` from its annotations and ``toy_scenes_<split>.json``
    (:class:`DataError` if unreadable)."""
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
        speed = (main_object_speeds(root, split, len(rows)) >= speed_threshold(root)).long()
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise DataError(f"cannot read toy scene labels of {root} ({split}: {err})", "rebuild the toy world") from err
    cols = torch.tensor(rows, dtype=torch.long).T
    return SceneFactors(cols[0], cols[1], cols[2], cols[3], speed, categories, colours, backgrounds)


def joint_index(factors: list[torch.Tensor], sizes: tuple[int, ...]) -> torch.Tensor:
    """Row-major joint class of factor indices: ``[(N,), ...]`` with ``sizes`` -> ``(N,)``."""
    out = torch.zeros_like(factors[0])
    for f, size in zip(factors, sizes, strict=True):
        out = out * size + f
    return out


def factorised_ce(
    logits: torch.Tensor,
    factors: list[torch.Tensor],
    sizes: tuple[int, ...],
    joint_weight: float = 1.0,
    factor_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """``joint_weight`` x cross-entropy of the joint class + the NLL of each factor's marginal (logsumexp of the joint
    log-probabilities over the other factors), weighted by ``factor_weights`` (default 1 each). The marginal terms
    let the joint scores generalise to combinations the training split lacks. ``logits (B, prod(sizes))``,
    ``factors [(B,), ...]`` -> scalar."""
    weights = factor_weights or (1.0,) * len(sizes)
    logp = logits.float().log_softmax(dim=-1)
    loss = joint_weight * F.nll_loss(logp, joint_index(factors, sizes))
    grid = logp.reshape(-1, *sizes)
    dims = list(range(1, len(sizes) + 1))
    for k, (f, w) in enumerate(zip(factors, weights, strict=True)):
        if w:
            marginal = grid.logsumexp(dim=[d for d in dims if d != k + 1])  # (B, sizes[k])
            loss = loss + w * F.nll_loss(marginal, f)
    return loss


class FactorisedHead(nn.Module):
    """Joint logits as a sum of per-factor linear heads: ``(B, H)`` -> ``(B, prod(sizes))`` with
    ``logit[i, j, ...] = head_0(h)[i] + head_1(h)[j] + ...`` (row-major, as :func:`joint_index`). Every example then
    trains its factors' rows, not one row of a sparse joint class. :meth:`fold` turns it into the one equivalent
    ``nn.Linear(H, prod(sizes))``."""

    def __init__(self, hidden: int, sizes: tuple[int, ...]):
        super().__init__()
        self.sizes = tuple(sizes)
        self.heads = nn.ModuleList(nn.Linear(hidden, s) for s in self.sizes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(h.shape[0], *([1] * len(self.sizes)), dtype=h.dtype, device=h.device)
        for k, head in enumerate(self.heads):
            shape = [h.shape[0]] + [1] * len(self.sizes)
            shape[k + 1] = self.sizes[k]
            out = out + head(h).reshape(shape)
        return out.reshape(h.shape[0], -1)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The single Linear with the same logits."""
        rest = torch.arange(math.prod(self.sizes))
        index = []
        for size in reversed(self.sizes):
            index.append(rest % size)
            rest = rest // size
        pairs = list(zip(self.heads, reversed(index), strict=True))
        linear = nn.Linear(self.heads[0].in_features, math.prod(self.sizes))
        linear.weight.copy_(sum(head.weight[i] for head, i in pairs))
        linear.bias.copy_(sum(head.bias[i] for head, i in pairs))
        return linear.requires_grad_(False)


def fold_classifier(model: nn.Module) -> None:
    """Replace a trained :class:`FactorisedHead` ``model.classifier`` by its folded Linear (in place)."""
    head = model.classifier
    if isinstance(head, FactorisedHead):
        model.classifier = head.fold().to(next(head.parameters()).device)


def random_dihedral(
    x: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random left/right flips, up/down flips and transposes (x <-> y), applied in that order, of ``x (B, ..., R, R)``
    -> the images and the three ``(B,)`` bool draws (mirror, vflip, transpose)."""
    mirror, vflip, transpose = (torch.rand(len(x), generator=gen) < 0.5 for _ in range(3))
    view = (len(x),) + (1,) * (x.ndim - 1)
    x = torch.where(mirror.view(view), x.flip(-1), x)
    x = torch.where(vflip.view(view), x.flip(-2), x)
    x = torch.where(transpose.view(view), x.transpose(-1, -2), x)
    return x, mirror, vflip, transpose


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
    hidden_act: str = "gelu"
    joint_weight: float = 0.5
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=600, batch_size=64, lr=2e-3, weight_decay=0.05, warmup=30)
    )

    def hf_config(self, resolution: int, names: list[str]) -> dict[str, Any]:
        return {
            "image_size": resolution,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }


@dataclass(frozen=True)
class ToyFrameClassifierRecipe(ToyClassifierRecipe):
    """Architecture and training of the toy ViT (``(R / patch_size)^2`` patch tokens + CLS)."""


RECIPES: dict[str, ToyFrameClassifierRecipe] = {
    "toy": ToyFrameClassifierRecipe(),  # 600 steps, ~40 s on 1 thread
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
    """Train on (random frame of a random training clip, its class), randomly flipped and transposed, through a
    :class:`FactorisedHead` that is folded into the model's classifier afterwards."""
    from transformers import ViTConfig, ViTForImageClassification

    gen = generator(seed)
    names = frame_class_names(factors)
    model = ViTForImageClassification(ViTConfig(**recipe.hf_config(stim.resolution, names)))
    model.classifier = FactorisedHead(recipe.hidden_size, frame_sizes(factors))
    parts = [factors.category, factors.background, factors.count]

    def loss_fn(step: int) -> torch.Tensor:
        clips, x = random_frames(stim, recipe.train.batch_size, gen)
        logits = model(pixel_values=processor_inputs(random_dihedral(x, gen)[0])).logits
        return factorised_ce(logits, [p[clips] for p in parts], frame_sizes(factors), recipe.joint_weight)

    stats = train(model, loss_fn, recipe.train, "toy frame_classifier", progress)
    fold_classifier(model)
    return model, {**stats, "params": count_params(model), "num_classes": len(names)}


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
