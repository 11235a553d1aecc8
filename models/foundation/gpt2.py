"""Role ``gpt2``: pretrained GPT-2 (124M) that stage 2 fine-tunes into the scene-description decoder.

Stages use ``role.model`` (a ``GPT2LMHeadModel``, trainable) with CLIP-BPE token ids (upstream §3.5 step 8); GPT-2's
own tokenizer is never used. ``hidden_size`` (768) sizes the prefix projection, ``vocab_size`` (50257) bounds the ids,
``max_positions`` (1024) the prefix + caption length.

A toy builder returns ``Gpt2Role(GPT2LMHeadModel(GPT2Config(tiny)))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.foundation.common import finish, hf_dir, hf_from_pretrained

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel


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


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> Gpt2Role:
    """``openai-community/gpt2`` from its local folder; left trainable (stage 2 fine-tunes all of it)."""
    from transformers import GPT2LMHeadModel

    model = hf_from_pretrained(GPT2LMHeadModel, hf_dir(weights_root, "gpt2"), "GPT-2", dtype)
    return Gpt2Role(finish(model, device, dtype, frozen=False))
