"""Toy ``clip_pcc`` role: a tiny transformers ``CLIPModel`` trained contrastively on the toy world's training
frame/caption pairs; its projected image features feed the CLIP-pcc temporal-consistency metric.

Why a separately trained model and not the toy ``clip`` role's weights: the paper role is a transformers
``CLIPModel`` (OpenAI ViT-L/14: CLS-token pooling, ``get_image_features``), while the toy ``clip`` role is an
``open_clip.CLIP`` with average pooling, which ``CLIPVisionModel`` cannot express. Training the same library class
keeps the role honest (``ClipPccRole(CLIPModel, CLIPImageProcessor)``).

* Text side: SD-1.5 / OpenAI CLIP BPE built in memory (:func:`models.foundation.video.sd15_tokenizer`), so
  ``bos/eos/pad`` are 49406/49407/49407 and the EOS pooling of ``CLIPTextModel`` finds the first 49407.
* Image side: ``CLIPImageProcessor`` at the world's resolution (shortest edge + centre crop = identity on toy frames)
  with mean/std 0.5; training feeds exactly that mapping. The loss is the toy ``clip`` role's symmetric InfoNCE with
  soft targets over the batch items that share a caption.

Files in ``weights_root/clip_pcc/``: ``save_pretrained`` of the model and of the image processor, ``manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from models.foundation.clip.toy import CLIP_VOCAB, EOT, SOT, contrastive_loss
from models.foundation.clip_pcc import ClipPccRole
from models.foundation.frame_classifier.toy import processor_inputs
from models.foundation.toy.common import (
    TrainRecipe,
    generator,
    load_hf_model,
    random_frames,
    save_hf_model,
    train,
)
from models.foundation.toy.data import Stimuli
from models.foundation.video import sd15_tokenizer

if TYPE_CHECKING:
    from transformers import CLIPModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyClipPccRecipe:
    """Architecture and training of the toy transformers CLIP (``(R / patch_size)^2`` patches + CLS)."""

    projection_dim: int = 64
    patch_size: int = 4
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 1
    heads: int = 4
    context_length: int = 32
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=250, batch_size=64, lr=2e-3, weight_decay=0.05, warmup=25)
    )

    def hf_config(self, resolution: int) -> dict[str, Any]:
        """Keyword arguments of ``CLIPConfig`` (JSON-able)."""
        return {
            "projection_dim": self.projection_dim,
            "vision_config": {
                "hidden_size": self.vision_width,
                "intermediate_size": 2 * self.vision_width,
                "num_attention_heads": self.heads,
                "num_hidden_layers": self.vision_layers,
                "image_size": resolution,
                "patch_size": self.patch_size,
            },
            "text_config": {
                "hidden_size": self.text_width,
                "intermediate_size": 2 * self.text_width,
                "num_attention_heads": self.heads,
                "num_hidden_layers": self.text_layers,
                "vocab_size": CLIP_VOCAB,
                "max_position_embeddings": self.context_length,
                "bos_token_id": SOT,
                "eos_token_id": EOT,
                "pad_token_id": EOT,
            },
        }


RECIPES: dict[str, ToyClipPccRecipe] = {
    "toy": ToyClipPccRecipe(),
    "smoke": ToyClipPccRecipe(
        projection_dim=32,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        text_width=32,
        heads=2,
        train=TrainRecipe(steps=200, batch_size=32, lr=4e-3, weight_decay=0.05, warmup=20),
    ),
}


def make_processor(resolution: int) -> Any:
    """``CLIPImageProcessor`` at the world's resolution with mean/std 0.5."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": resolution},
        crop_size={"height": resolution, "width": resolution},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def image_embed(model: CLIPModel, frames01: torch.Tensor) -> torch.Tensor:
    """``(B, 3, R, R)`` -> ``(B, E)`` L2-normalised projected image features (with gradients)."""
    out = model.get_image_features(pixel_values=processor_inputs(frames01))
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def text_embed(model: CLIPModel, ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` token ids -> ``(B, E)`` L2-normalised projected text features (with gradients)."""
    out = model.get_text_features(input_ids=ids)
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def caption_ids(captions: list[str], context_length: int) -> torch.Tensor:
    """-> ``(N, context_length)`` CLIP-BPE ids padded with EOT."""
    tok = sd15_tokenizer(max_length=context_length)
    return tok(
        list(captions), padding="max_length", max_length=context_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_clip_pcc(
    stim: Stimuli, recipe: ToyClipPccRecipe, seed: int, progress: bool
) -> tuple[CLIPModel, dict[str, Any]]:
    """Contrastive pretraining on (random frame of a clip, its caption) pairs -> (model in eval mode, stats)."""
    from transformers import CLIPConfig, CLIPModel

    gen = generator(seed)
    model = CLIPModel(CLIPConfig(**recipe.hf_config(stim.resolution)))
    ids = caption_ids(stim.captions, recipe.context_length)
    _, caption_id = torch.unique(ids, dim=0, return_inverse=True)

    def loss_fn(step: int) -> torch.Tensor:
        clips, frames = random_frames(stim, recipe.train.batch_size, gen)
        img, txt = image_embed(model, frames), text_embed(model, ids[clips])
        return contrastive_loss(img, txt, caption_id[clips], model.logit_scale)

    return model, train(model, loss_fn, recipe.train, "toy clip_pcc", progress)


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
    """Train the toy transformers CLIP; save model and image processor into ``folder``."""
    model, stats = train_clip_pcc(stim, RECIPES[scale], seed, progress)
    save_hf_model(model, make_processor(stim.resolution), folder)
    return {**stats, "embed_dim": int(model.config.projection_dim)}


def build_toy(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> ClipPccRole:
    """The toy/smoke transformers CLIP from ``weights_root/clip_pcc/``."""
    from transformers import CLIPImageProcessor, CLIPModel

    classes = (CLIPModel, CLIPImageProcessor)
    return ClipPccRole(*load_hf_model(weights_root, "clip_pcc", "CLIP-pcc", classes, device, dtype))
