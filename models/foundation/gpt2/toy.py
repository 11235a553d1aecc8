"""Toy ``gpt2`` role: a tiny ``GPT2LMHeadModel`` pretrained as a language model on the training captions.

Token ids are CLIP-BPE ids, exactly as stage 2 feeds them (upstream §3.2: CLIP ids go straight into GPT-2's ``wte``):
each caption is ``open_clip.SimpleTokenizer`` output ``[49406, ..., 49407, 0, 0, ...]``. The vocabulary is therefore
the CLIP vocabulary (49408 rows; the paper GPT-2 has 50257 >= 49408, so stage 2 must read ``role.vocab_size`` and
never assume 50257). ``bos/eos/pad`` in the config are 49406 / 49407 / 0. Padding after the first EOT is excluded
from the loss by position (id 0 is also the real token "!").

Files in ``weights_root/gpt2/``: transformers ``save_pretrained`` (``config.json``, ``model.safetensors``,
``generation_config.json``) and ``manifest.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from models.foundation.clip.toy import CLIP_VOCAB, EOT, SOT, make_tokenizer
from models.foundation.common import finish
from models.foundation.gpt2 import Gpt2Role
from models.foundation.toy.common import TrainRecipe, batch_indices, generator, require_toy_files, role_dir, train
from models.foundation.toy.data import Stimuli

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

log = logging.getLogger(__name__)

PAD = 0  # open_clip's SimpleTokenizer pads with zeros


@dataclass(frozen=True)
class ToyGpt2Recipe:
    """Architecture and training of the toy GPT-2 (``n_positions`` leaves room for a prefix + ``context_length``)."""

    n_embd: int = 96
    n_layer: int = 3
    n_head: int = 4
    n_positions: int = 64
    context_length: int = 32
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=250, batch_size=32, lr=2e-3, weight_decay=0.01, warmup=30)
    )

    def hf_config(self) -> dict[str, Any]:
        return {
            "vocab_size": CLIP_VOCAB,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "bos_token_id": SOT,
            "eos_token_id": EOT,
            "pad_token_id": PAD,
        }


RECIPES: dict[str, ToyGpt2Recipe] = {
    "toy": ToyGpt2Recipe(),
    "smoke": ToyGpt2Recipe(
        n_embd=32,
        n_layer=1,
        n_head=2,
        train=TrainRecipe(steps=40, batch_size=16, lr=4e-3, weight_decay=0.01, warmup=5),
    ),
}


def caption_ids(captions: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> CLIP-BPE ids ``(N, L)`` and labels ``(N, L)`` (ids up to and including the first EOT, else -100)."""
    ids = make_tokenizer(context_length)(list(captions))
    after_eot = (ids == EOT).long().cumsum(dim=1) - (ids == EOT).long() > 0
    return ids, ids.masked_fill(after_eot, -100)


def lm_loss(model: GPT2LMHeadModel, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions. The 49408-way head is applied only where a label
    exists (about 60 % of the positions): the logits dominate the cost of a step."""
    hidden = model.transformer(input_ids=ids).last_hidden_state[:, :-1]  # (B, L-1, E)
    target = labels[:, 1:]
    keep = target != -100
    return F.cross_entropy(model.lm_head(hidden[keep]), target[keep])


def train_gpt2(
    stim: Stimuli, recipe: ToyGpt2Recipe, seed: int, progress: bool
) -> tuple[GPT2LMHeadModel, dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    gen = generator(seed)
    model = GPT2LMHeadModel(GPT2Config(**recipe.hf_config()))
    ids, labels = caption_ids(stim.captions, recipe.context_length)

    def loss_fn(step: int) -> torch.Tensor:
        rows = batch_indices(len(ids), recipe.train.batch_size, gen)
        return lm_loss(model, ids[rows], labels[rows])

    return model, train(model, loss_fn, recipe.train, "toy gpt2", progress)


@torch.no_grad()
def perplexity(model: GPT2LMHeadModel, captions: list[str], context_length: int) -> float:
    """exp(mean token NLL) of ``captions`` (uniform guessing gives the vocabulary size)."""
    ids, labels = caption_ids(captions, context_length)
    logits = model(input_ids=ids.to(model.device)).logits.float()[:, :-1]
    target = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    return math.exp(float(nll))


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
    """Pretrain the toy GPT-2 and ``save_pretrained`` it into ``folder`` -> stats."""
    model, stats = train_gpt2(stim, RECIPES[scale], seed, progress)
    model.save_pretrained(folder, safe_serialization=True)
    return stats


def build_toy(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> Gpt2Role:
    """The toy/smoke GPT-2 from ``weights_root/gpt2/``; left trainable like the paper one."""
    from transformers import GPT2LMHeadModel

    folder = require_toy_files(role_dir(weights_root, "gpt2"), "GPT-2", "config.json")
    return Gpt2Role(finish(GPT2LMHeadModel.from_pretrained(folder), device, dtype, frozen=False))
