"""Paper loader of role ``clip_pcc``: OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``), local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from models.foundation.catalog import hf_dir
from models.foundation.clip_pcc import ClipPccRole
from models.foundation.common import hf_model_and_processor


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> ClipPccRole:
    from transformers import CLIPImageProcessor, CLIPModel

    local = hf_dir(weights_root, "clip_pcc")
    parts = hf_model_and_processor(local, CLIPModel, CLIPImageProcessor, "CLIP ViT-L/14", device, dtype)
    return ClipPccRole(*parts)
