"""Role ``vae``: the frozen SD-1.5 VAE (``stable-diffusion-v1-5`` subfolder ``vae``), scale 0.18215.

* ``encode(frames01)``: ``(..., 3, H, W)`` in [0, 1] -> ``(..., 4, H/8, W/8)`` = posterior mode (or a sample) of
  ``2x - 1``, times the scale (stage 2 targets: 224 px -> 4x28x28).
* ``decode(latents)``: ``(..., 4, h, w)`` -> ``(..., 3, 8h, 8w)`` = ``(vae.decode(z / scale) / 2 + 0.5).clamp(0, 1)``
  (stage 3 blurry video).

A toy builder returns ``VaeRole(AutoencoderKL(tiny config))``; the scale comes from ``vae.config.scaling_factor``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.foundation.common import ModuleRole
from models.foundation.weight_file import MB, WeightFile, repo_files

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# SD-1.5 VAE (diffusers layout; the config ships in models/foundation/configs/sd15_single_file/vae)
WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        "vae",
        f"{SD15_REPO}/vae/diffusion_pytorch_model.safetensors",
        SD15_REPO,
        "vae/diffusion_pytorch_model.safetensors",
        335 * MB,
        alternatives=repo_files(SD15_REPO, "vae/diffusion_pytorch_model.bin"),
    ),
)


class VaeRole(ModuleRole):
    """Frozen KL autoencoder with [0, 1] images and scaled latents. Attributes: ``scale``, ``latent_channels``,
    ``downsample`` (8)."""

    MAIN = "vae"

    def __init__(self, vae: AutoencoderKL, scale: float | None = None):
        self.vae = vae
        self.scale = float(scale if scale is not None else vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(
        self, frames01: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(..., 3, H, W)`` in [0, 1] -> ``(..., C, H/8, W/8)`` scaled latents (mode unless ``sample``)."""
        lead = frames01.shape[:-3]
        x = frames01.reshape(-1, *frames01.shape[-3:]).to(device=self.device, dtype=self.dtype) * 2.0 - 1.0
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        z = z * self.scale
        return z.reshape(*lead, *z.shape[1:])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(..., C, h, w)`` scaled latents -> ``(..., 3, 8h, 8w)`` in [0, 1]."""
        lead = latents.shape[:-3]
        z = latents.reshape(-1, *latents.shape[-3:]).to(device=self.device, dtype=self.dtype) / self.scale
        x = self.vae.decode(z).sample
        x = (x / 2.0 + 0.5).clamp(0.0, 1.0)
        return x.reshape(*lead, *x.shape[1:])
