"""Role ``frame_classifier``: ViT-B/16 ImageNet-1k (``google/vit-base-patch16-224``) for the frame-based n-way
semantic metric (upstream §7).

``probs(frames01)``: ``(N, 3, H, W)`` in [0, 1] (or uint8) -> ``(N, num_classes)`` softmax probabilities, through the
model's own image processor (resize 224, mean/std 0.5).

A toy builder returns ``FrameClassifierRole(ViTForImageClassification(tiny ViTConfig), ViTImageProcessor(size=...))``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.foundation.common import ModuleRole, to_uint8_images
from models.foundation.weight_file import KB, MB, WeightFile, hf_model, weights_alts

VIT_REPO = "google/vit-base-patch16-224"
# ViT-B/16 ImageNet-1k (frame-based n-way metric)
WEIGHTS: tuple[WeightFile, ...] = hf_model(
    "frame_classifier",
    VIT_REPO,
    {"config.json": 70 * KB, "model.safetensors": 346 * MB, "preprocessor_config.json": 1 * KB},
    alternatives={"model.safetensors": weights_alts(VIT_REPO)},
)


class FrameClassifierRole(ModuleRole):
    """Image classifier. Attributes: ``num_classes`` (1000), ``labels`` (id -> name)."""

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model
        self.processor = processor
        self.num_classes = int(model.config.num_labels)
        self.labels = {int(k): v for k, v in model.config.id2label.items()}

    @torch.no_grad()
    def probs(self, frames01: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, num_classes)`` float32 probabilities."""
        pixels = self.processor(images=to_uint8_images(frames01), return_tensors="pt")["pixel_values"]
        logits = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits
        return logits.float().softmax(dim=-1)
