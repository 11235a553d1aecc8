"""Role ``unclip``: MindEye2's SDXL unCLIP (``unclip6_epoch0_step110000.ckpt``) on diffusers, for the stage-3 keyframe.

Sampling = MindEye2 ``utils.unclip_recon`` (fixtures README, upstream §4 step 6):
* start ``x = z + sigma_0 * (n + 0.04 * o)`` with ``z, n ~ N(0, I)`` ``(B, 4, 96, 96)`` and one offset ``o ~ N(0, 1)``
  per sample; the unconditional context (``uncond``, defect 24): all-zero tokens (``"null"``, the dropped condition
  sgm's conditioner trains with; our default) or random-normal tokens shaped like the condition (``"random_noise"``,
  MindEye2 / upstream; drawn in both cases so the other draws do not move); the same size vector;
* Euler (EDM, no churn) on the DDPM ``scaled_linear`` sigmas at timesteps ``linspace(999, 0, 38, endpoint=False)``
  (999, 972, ..., 26) via ``EulerDiscreteScheduler(timesteps=...)``; eps prediction; CFG 5 on [uncond, cond];
* VAE decode of ``z / 0.13025`` and the output remap ``clamp(0.8 x + 0.2, 0, 1)`` -> ``(B, 3, 768, 768)``.

A toy builder returns ``UnclipRole(tiny UNet2DConditionModel(class_embed_type="projection"), tiny AutoencoderKL)``;
token width and vector width come from the UNet config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from models.foundation.common import SD_BETAS, ModuleRole
from models.foundation.weight_file import MB, WeightFile
from utils.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

# MindEye2 SDXL unCLIP (UNet + VAE + frozen bigG image tower), Lightning checkpoint
WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        "unclip",
        "unclip6_epoch0_step110000.ckpt",
        "pscotti/mindeyev2",
        "unclip6_epoch0_step110000.ckpt",
        17_980 * MB,
        repo_type="dataset",
    ),
)

Generators = torch.Generator | Sequence[torch.Generator] | None
UncondContext = Literal["null", "random_noise"]  # defect 24: CFG's unconditional context

# ---------------------------------------------------------------------------------------------------------------------
# sampler


def euler_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """sgm LegacyDDPMDiscretization grid: ``linspace(T-1, 0, n, endpoint=False).astype(int)`` (999, 972, ..., 26)."""
    return np.linspace(num_train_timesteps - 1, 0, num_steps, endpoint=False).astype(int).tolist()


def make_scheduler() -> EulerDiscreteScheduler:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SD_BETAS, beta_schedule="scaled_linear", prediction_type="epsilon")


def size_vector(dim: int, original_size: tuple[int, int] = (768, 768), crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """sgm ``ConcatTimestepEmbedderND(outdim=dim/4)`` of (original H, W) and crop (top, left) -> ``(1, dim)``:
    for each scalar ``[cos(s f), sin(s f)]`` with ``f = 10000^(-k/half)``, concatenated."""
    each = dim // 4
    half = each // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.tensor([*original_size, *crop], dtype=torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(1, 4 * each)


def _randn(shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(B, ...)`` normal draw; a list of generators draws each sample from its own (batch-size independent)."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        return torch.cat([d.to(device) for d in draws]).to(dtype)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device).to(device=device, dtype=dtype)


class UnclipRole(ModuleRole):
    """Keyframe decoder from bigG tokens. Attributes: ``token_dim`` (1664), ``vector_dim`` (1024), ``latent_size``
    (96), ``latent_channels`` (4), ``num_steps`` (38), ``guidance`` (5.0), ``vae_scale`` (0.13025)."""

    MAIN = "unet"
    REMAP = (0.8, 0.2)

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        *,
        num_steps: int = 38,
        guidance: float = 5.0,
        offset_noise: float = 0.04,
        uncond: UncondContext = "null",
        latent_size: int | None = None,
        original_size: tuple[int, int] | None = None,
    ):
        self.unet, self.vae = unet, vae
        self.num_steps, self.guidance, self.offset_noise = num_steps, guidance, offset_noise
        self.uncond = uncond
        self.token_dim = int(unet.config.cross_attention_dim)
        self.vector_dim = int(unet.config.projection_class_embeddings_input_dim)
        self.latent_channels = int(unet.config.in_channels)
        self.latent_size = int(latent_size or unet.config.sample_size)
        downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        side = self.latent_size * downsample
        self.original_size = original_size or (side, side)
        self.vae_scale = float(vae.config.scaling_factor)
        self.scheduler = make_scheduler()

    def timesteps(self) -> list[int]:
        return euler_timesteps(self.num_steps, self.scheduler.config.num_train_timesteps)

    def vector(self, batch: int) -> torch.Tensor:
        """``(B, vector_dim)`` size/crop conditioning, the same for every image."""
        return size_vector(self.vector_dim, self.original_size).expand(batch, -1).to(self.device, self.dtype)

    @torch.no_grad()
    def sample_latents(self, tokens: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """``(B, T, D)`` conditioning tokens -> ``(B, C, L, L)`` denoised latents (unscaled VAE space x scale)."""
        tokens = tokens.to(self.device, self.dtype)
        b = tokens.shape[0]
        lat_shape = (b, self.latent_channels, self.latent_size, self.latent_size)
        z = _randn(lat_shape, generator, self.device, torch.float32)
        uncond = self.uncond_context(tokens, generator)  # (B, T, D)
        noise = _randn(lat_shape, generator, self.device, torch.float32)
        offset = _randn((b, 1, 1, 1), generator, self.device, torch.float32)
        sched = self.scheduler
        sched.set_timesteps(timesteps=self.timesteps(), device=self.device)
        x = z + sched.sigmas[0].to(self.device) * (noise + self.offset_noise * offset)
        return self.guided_denoise(x, torch.cat([uncond, tokens]), self.vector(2 * b))

    def guided_denoise(self, x: torch.Tensor, context: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over the timesteps already set on ``self.scheduler``: latents ``x (B, C, L, L)``,
        ``context (2B, T, D)`` and ``class_labels (2B, E)``, both [unconditional; conditional] -> ``(B, C, L, L)``."""
        sched = self.scheduler
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), t).to(self.dtype)
            out = self.unet(x_in, t, encoder_hidden_states=context, class_labels=class_labels).sample.float()
            out_u, out_c = out.chunk(2)
            x = sched.step(out_u + self.guidance * (out_c - out_u), t, x).prev_sample
        return x

    def uncond_context(self, tokens: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """The unconditional cross-attention context of CFG for ``tokens`` (B, T, D) → (B, T, D) (defect 24):
        zeros for ``uncond="null"``, N(0, 1) tokens for ``"random_noise"``. The noise is drawn either way."""
        if self.uncond not in ("null", "random_noise"):
            raise ConfigError(f"bad unCLIP uncond {self.uncond!r}", "use 'null' or 'random_noise'")
        noise = _randn(tuple(tokens.shape), generator, self.device, self.dtype)
        return noise if self.uncond == "random_noise" else torch.zeros_like(tokens)

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, L, L)`` -> VAE output ``(B, 3, H, W)`` in about [-1, 1] (decoded from ``latents / scale``)."""
        return self.vae.decode(latents.to(self.device, self.vae.dtype) / self.vae_scale).sample.float()

    @classmethod
    def remap(cls, x: torch.Tensor) -> torch.Tensor:
        """MindEye2 output convention: ``clamp(0.8 x + 0.2, 0, 1)``."""
        return (x * cls.REMAP[0] + cls.REMAP[1]).clamp(0.0, 1.0)

    def reconstruct(self, tokens: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """``(B, T, D)`` tokens -> keyframes ``(B, 3, H, W)`` in [0, 1] (768 px for the paper model)."""
        return self.remap(self.decode_raw(self.sample_latents(tokens, generator)))
