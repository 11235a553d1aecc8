"""Role ``video_classifier``: VideoMAE-B fine-tuned on Kinetics-400 (``MCG-NJU/videomae-base-finetuned-kinetics``),
loaded with ``num_frames=6`` as upstream does (its position table is the fixed sinusoid, so no weight changes), for the
video-based n-way semantic metric (upstream §7).

``probs(videos01)``: ``(N, F, 3, H, W)`` in [0, 1] (or uint8), F = ``num_frames`` -> ``(N, num_classes)`` softmax.

A toy builder returns ``VideoClassifierRole(VideoMAEForVideoClassification(tiny), VideoMAEImageProcessor(size=...))``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.foundation.common import ModuleRole, to_uint8_images
from models.foundation.weight_file import KB, MB, WeightFile, hf_model, repo_files

PAPER_NUM_FRAMES = 6

VIDEOMAE_REPO = "MCG-NJU/videomae-base-finetuned-kinetics"
# VideoMAE-B Kinetics-400 (video-based n-way metric)
WEIGHTS: tuple[WeightFile, ...] = hf_model(
    "video_classifier",
    VIDEOMAE_REPO,
    {"config.json": 30 * KB, "pytorch_model.bin": 346 * MB, "preprocessor_config.json": 1 * KB},
    alternatives={"pytorch_model.bin": repo_files(VIDEOMAE_REPO, "model.safetensors")},
)


class VideoClassifierRole(ModuleRole):
    """Video classifier. Attributes: ``num_classes`` (400), ``num_frames`` (6), ``labels``."""

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model
        self.processor = processor
        self.num_classes = int(model.config.num_labels)
        self.num_frames = int(model.config.num_frames)
        self.labels = {int(k): v for k, v in model.config.id2label.items()}

    @torch.no_grad()
    def probs(self, videos01: torch.Tensor) -> torch.Tensor:
        """``(N, F, 3, H, W)`` -> ``(N, num_classes)`` float32 probabilities."""
        if videos01.shape[1] != self.num_frames:
            raise ValueError(f"video classifier expects {self.num_frames} frames, got {videos01.shape[1]}")
        videos = [to_uint8_images(v) for v in videos01]
        pixels = self.processor(videos, return_tensors="pt")["pixel_values"]
        logits = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits
        return logits.float().softmax(dim=-1)
