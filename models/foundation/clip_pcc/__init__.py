"""Role ``clip_pcc``: OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) image features for the "CLIP-pcc"
spatio-temporal consistency metric (upstream §7).

``image_features(frames01)``: ``(N, 3, H, W)`` in [0, 1] (or uint8) -> ``(N, embed_dim)`` projected, unnormalised
features (768-d), via ``CLIPImageProcessor`` (resize 224 shortest side, centre crop).

A toy builder returns ``ClipPccRole(CLIPModel(tiny CLIPConfig), CLIPImageProcessor(size=..., crop_size=...))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from models.foundation.common import ModuleRole, to_uint8_images
from models.foundation.weight_file import KB, MB, WeightFile, hf_model, weights_alts

if TYPE_CHECKING:
    from transformers import CLIPModel

CLIPL_REPO = "openai/clip-vit-large-patch14"
# CLIP ViT-L/14 image features (CLIP-pcc metric)
WEIGHTS: tuple[WeightFile, ...] = hf_model(
    "clip_pcc",
    CLIPL_REPO,
    {"config.json": 5 * KB, "model.safetensors": 1_710 * MB, "preprocessor_config.json": 1 * KB},
    alternatives={"model.safetensors": weights_alts(CLIPL_REPO)},
)


class ClipPccRole(ModuleRole):
    """Attribute: ``embed_dim`` (768)."""

    def __init__(self, model: CLIPModel, processor: Any):
        self.model = model
        self.processor = processor
        self.embed_dim = int(model.config.projection_dim)

    @torch.no_grad()
    def image_features(self, frames01: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, embed_dim)`` float32."""
        pixels = self.processor(images=to_uint8_images(frames01), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return feats.float()
