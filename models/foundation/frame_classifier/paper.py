"""Paper loader of role ``frame_classifier``: ViT-B/16 ImageNet-1k (``google/vit-base-patch16-224``), local."""

from __future__ import annotations

from pathlib import Path

import torch

from models.foundation.catalog import hf_dir
from models.foundation.common import hf_model_and_processor
from models.foundation.frame_classifier import FrameClassifierRole


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> FrameClassifierRole:
    from transformers import AutoImageProcessor, ViTForImageClassification

    local = hf_dir(weights_root, "frame_classifier")
    parts = hf_model_and_processor(local, ViTForImageClassification, AutoImageProcessor, "ViT-B/16", device, dtype)
    return FrameClassifierRole(*parts)
