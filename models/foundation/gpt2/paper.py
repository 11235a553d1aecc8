"""Paper loader of role ``gpt2``: ``openai-community/gpt2`` from its local folder, left trainable."""

from __future__ import annotations

from pathlib import Path

import torch

from models.foundation.catalog import hf_dir
from models.foundation.common import finish, hf_from_pretrained
from models.foundation.gpt2 import Gpt2Role


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> Gpt2Role:
    """``openai-community/gpt2`` from its local folder; left trainable (stage 2 fine-tunes all of it)."""
    from transformers import GPT2LMHeadModel

    model = hf_from_pretrained(GPT2LMHeadModel, hf_dir(weights_root, "gpt2"), "GPT-2", dtype)
    return Gpt2Role(finish(model, device, dtype, frozen=False))
