"""Role ``gpt2``: pretrained GPT-2 (124M) that stage 2 fine-tunes into the scene-description decoder.

Stages use ``role.model`` (a ``GPT2LMHeadModel``, trainable) with CLIP-BPE token ids (upstream §3.5 step 8); GPT-2's
own tokenizer is never used. ``hidden_size`` (768) sizes the prefix projection, ``vocab_size`` (50257) bounds the ids,
``max_positions`` (1024) the prefix + caption length.

A toy builder returns ``Gpt2Role(GPT2LMHeadModel(GPT2Config(tiny)))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.foundation.weight_file import KB, MB, WeightFile, hf_model, weights_alts

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

GPT2_REPO = "openai-community/gpt2"
# scene-description decoder, fine-tuned in stage 2; tokens are CLIP BPE ids, so no GPT-2 tokenizer
WEIGHTS: tuple[WeightFile, ...] = hf_model(
    "gpt2",
    GPT2_REPO,
    {"config.json": 1 * KB, "model.safetensors": 548 * MB},
    alternatives={"model.safetensors": weights_alts(GPT2_REPO)},
)


class Gpt2Role:
    """Holds the language model; stages build their prefix decoder around ``model``."""

    def __init__(self, model: GPT2LMHeadModel):
        self.model = model
        self.hidden_size = int(model.config.n_embd)
        self.vocab_size = int(model.config.vocab_size)
        self.max_positions = int(model.config.n_positions)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` int64 -> ``(B, L, hidden_size)`` input embeddings (wte)."""
        return self.model.get_input_embeddings()(ids)
