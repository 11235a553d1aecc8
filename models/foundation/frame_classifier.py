"""Role ``frame_classifier``: ViT-B/16 ImageNet-1k (``google/vit-base-patch16-224``) for the frame-based n-way
semantic metric (upstream §7).

``probs(frames01)``: ``(N, 3, H, W)`` in [0, 1] (or uint8) -> ``(N, num_classes)`` softmax probabilities, through the
model's own image processor (resize 224, mean/std 0.5).

A toy builder returns ``FrameClassifierRole(ViTForImageClassification(tiny ViTConfig), ViTImageProcessor(size=...))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.foundation.common import finish, hf_dir, hf_from_pretrained, hf_processor, to_uint8_images


class FrameClassifierRole:
    """Image classifier. Attributes: ``num_classes`` (1000), ``labels`` (id -> name)."""

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model
        self.processor = processor
        self.num_classes = int(model.config.num_labels)
        self.labels = {int(k): v for k, v in model.config.id2label.items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def probs(self, frames01: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, num_classes)`` float32 probabilities."""
        pixels = self.processor(images=to_uint8_images(frames01), return_tensors="pt")["pixel_values"]
        logits = self.model(pixel_values=pixels.to(self.device, next(self.model.parameters()).dtype)).logits
        return logits.float().softmax(dim=-1)


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> FrameClassifierRole:
    from transformers import AutoImageProcessor, ViTForImageClassification

    local = hf_dir(weights_root, "frame_classifier")
    model = hf_from_pretrained(ViTForImageClassification, local, "ViT-B/16", dtype)
    return FrameClassifierRole(finish(model, device, dtype), hf_processor(AutoImageProcessor, local, "ViT"))
