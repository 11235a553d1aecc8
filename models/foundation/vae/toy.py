"""Toy ``vae`` role: a tiny diffusers ``AutoencoderKL`` trained to reconstruct the toy world's training frames.

Two downsampling levels: 32 px -> ``(4, 8, 8)`` latents (``VaeRole.downsample`` = 4; the paper's SD-1.5 VAE has 8).
Loss = L1 + MSE on ``2x - 1`` images + a tiny KL weight (SD-style: latents are close to deterministic). After
training, ``scaling_factor`` is set to ``1 / std`` of the training latents (posterior mode), as SD did with 0.18215,
so scaled latents have unit variance for the blurry-video head and the unCLIP diffusion.

Files in ``weights_root/vae/``: diffusers ``save_pretrained`` (``config.json``,
``diffusion_pytorch_model.safetensors``) and ``manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from models.foundation.common import finish
from models.foundation.toy.common import TrainRecipe, batch_indices, chunked, generator, require_toy_files, train
from models.foundation.toy.data import Stimuli
from models.foundation.vae import VaeRole

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyVaeRecipe:
    """Architecture and training of the toy VAE (``len(block_out_channels) - 1`` downsamplings)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    kl_weight: float = 1e-6
    train: TrainRecipe = field(default_factory=lambda: TrainRecipe(steps=800, batch_size=32, lr=1e-3, warmup=50))

    def diffusers_config(self, sample_size: int) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": sample_size,
            "scaling_factor": 1.0,
        }


RECIPES: dict[str, ToyVaeRecipe] = {
    "toy": ToyVaeRecipe(),
    "smoke": ToyVaeRecipe(
        block_out_channels=(16, 32, 32),
        norm_num_groups=8,
        train=TrainRecipe(steps=120, batch_size=16, lr=3e-3, warmup=10),
    ),
}


def vae_loss(vae: AutoencoderKL, frames01: torch.Tensor, kl_weight: float, gen: torch.Generator) -> torch.Tensor:
    """``(B, 3, R, R)`` in [0, 1] -> L1 + MSE reconstruction of ``2x - 1`` + ``kl_weight`` * KL (mean per element)."""
    x = frames01 * 2.0 - 1.0
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
    rec = vae.decode(z).sample
    kl = dist.kl().mean() / dist.mean[0].numel()
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl


@torch.no_grad()
def latent_std(vae: AutoencoderKL, frames01: torch.Tensor, chunk: int = 512) -> float:
    """Std of the posterior-mode latents of ``(N, 3, R, R)`` frames."""
    return float(chunked(lambda f: vae.encode(f * 2.0 - 1.0).latent_dist.mode(), frames01, chunk).std())


def train_vae(stim: Stimuli, recipe: ToyVaeRecipe, seed: int, progress: bool) -> tuple[AutoencoderKL, dict[str, Any]]:
    from diffusers import AutoencoderKL

    gen = generator(seed)
    vae = AutoencoderKL.from_config(recipe.diffusers_config(stim.resolution))
    frames = stim.flat_frames()

    def loss_fn(step: int) -> torch.Tensor:
        return vae_loss(vae, frames[batch_indices(len(frames), recipe.train.batch_size, gen)], recipe.kl_weight, gen)

    stats = train(vae, loss_fn, recipe.train, "toy vae", progress)
    std = latent_std(vae, frames)
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, {**stats, "latent_std": std, "scaling_factor": 1.0 / std}


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
    """Train the toy VAE and ``save_pretrained`` it into ``folder`` -> stats."""
    vae, stats = train_vae(stim, RECIPES[scale], seed, progress)
    vae.save_pretrained(folder, safe_serialization=True)
    return stats


def load_autoencoder(folder: Path) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(require_toy_files(folder, "VAE", "config.json"))


def build_toy(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> VaeRole:
    """The toy/smoke VAE from ``weights_root/vae/``."""
    return VaeRole(finish(load_autoencoder(Path(weights_root) / "vae"), device, dtype))
