"""Role ``clip_pcc``: OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) image features for the "CLIP-pcc"
spatio-temporal consistency metric (upstream §7).

``image_features(frames01)``: ``(N, 3, H, W)`` in [0, 1] (or uint8) -> ``(N, embed_dim)`` projected, unnormalised
features (768-d), via ``CLIPImageProcessor`` (resize 224 shortest side, centre crop).

A toy builder returns ``ClipPccRole(CLIPModel(tiny CLIPConfig), CLIPImageProcessor(size=..., crop_size=...))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.foundation.common import finish, hf_dir, hf_from_pretrained, hf_processor, to_uint8_images

if TYPE_CHECKING:
    from transformers import CLIPModel


class ClipPccRole:
    """Attribute: ``embed_dim`` (768)."""

    def __init__(self, model: CLIPModel, processor: Any):
        self.model = model
        self.processor = processor
        self.embed_dim = int(model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, frames01: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, embed_dim)`` float32."""
        pixels = self.processor(images=to_uint8_images(frames01), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, next(self.model.parameters()).dtype))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return feats.float()


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> ClipPccRole:
    from transformers import CLIPImageProcessor, CLIPModel

    local = hf_dir(weights_root, "clip_pcc")
    model = hf_from_pretrained(CLIPModel, local, "CLIP ViT-L/14", dtype)
    return ClipPccRole(finish(model, device, dtype), hf_processor(CLIPImageProcessor, local, "CLIP ViT-L/14"))
