"""Toy ``unclip`` role: a tiny latent ``UNet2DConditionModel`` that decodes toy-CLIP image tokens into a frame.

Recipe (``/work/shared/spec/toy-feasibility.md``, run C): v-prediction on the ``squaredcos_cap_v2`` schedule, the
tokens ``(B, T, D)`` as cross-attention context AND pooled tokens added to the time embedding
(``class_embed_type="projection"``; pooled = tokens averaged onto a 2x2 grid and flattened, ``4 D``, which keeps the
coarse layout), 10 % condition dropout to zeros, EMA. It runs in the toy VAE's latent space (``(4, 8, 8)`` at 32 px;
a copy of the ``vae`` role's weights is stored in ``unclip/vae/`` so the role is self-contained like unclip6).
Latents and tokens of every training frame are computed once up front, so a step costs only the UNet.

Sampling (:class:`ToyUnclipRole`): DPM-Solver++ with ``timestep_spacing="leading"``, ``steps_offset=1`` (the default
"linspace" spacing starts at t=999 where the cosine schedule's alpha_bar is ~2e-9 and blows up), 10 steps, CFG 3
against the zero condition; VAE decode; output remap ``x / 2 + 0.5`` (the paper role's MindEye2 remap
``0.8 x + 0.2`` belongs to unclip6's training convention, not to ours).

Files in ``weights_root/unclip/``: ``unet/`` and ``vae/`` (diffusers ``save_pretrained``),
``scheduler/scheduler_config.json``, ``sampling.json`` (steps, guidance), ``manifest.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from models.foundation.clip import ClipRole
from models.foundation.common import finish
from models.foundation.toy.common import (
    COSINE_V_SCHEDULE,
    TrainRecipe,
    batch_indices,
    chunked,
    generator,
    noise_scheduler,
    read_sampling,
    require_toy_files,
    save_parts,
    train,
    v_prediction_batch,
)
from models.foundation.toy.data import Stimuli
from models.foundation.unclip import Generators, UnclipRole, _randn
from models.foundation.vae import VaeRole
from models.foundation.vae.toy import load_autoencoder

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel

log = logging.getLogger(__name__)

POOL_GRID = 2  # pooled condition = tokens averaged onto POOL_GRID x POOL_GRID cells


@dataclass(frozen=True)
class ToyUnclipRecipe:
    """Architecture, training and sampling of the toy unCLIP (cross-attention at every level and the mid block)."""

    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 16
    cond_drop: float = 0.1
    num_steps: int = 10
    guidance: float = 3.0
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=1200, batch_size=32, lr=2e-3, warmup=100, ema=0.995)
    )

    def diffusers_config(self, latent_channels: int, latent_size: int, token_dim: int) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "sample_size": latent_size,
            "in_channels": latent_channels,
            "out_channels": latent_channels,
            "down_block_types": ["CrossAttnDownBlock2D"] * levels,
            "up_block_types": ["CrossAttnUpBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_heads,
            "norm_num_groups": self.norm_num_groups,
            "cross_attention_dim": token_dim,
            "class_embed_type": "projection",
            "projection_class_embeddings_input_dim": POOL_GRID * POOL_GRID * token_dim,
        }


RECIPES: dict[str, ToyUnclipRecipe] = {
    "toy": ToyUnclipRecipe(),
    "smoke": ToyUnclipRecipe(
        block_out_channels=(32, 64),
        attention_heads=2,
        norm_num_groups=8,
        num_steps=6,
        train=TrainRecipe(steps=200, batch_size=16, lr=2e-3, warmup=20, ema=0.9),
    ),
}


def scheduler_config() -> dict[str, Any]:
    """DPM-Solver++ (2nd order multistep) on the cosine schedule, v-prediction, "leading" spacing."""
    return {
        **COSINE_V_SCHEDULE,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, T, D)`` tokens on a square grid -> ``(B, 4 D)`` means over a 2x2 grid of cells (row-major)."""
    b, t, d = tokens.shape
    side = math.isqrt(t)
    grid = tokens.transpose(1, 2).reshape(b, d, side, side)
    return F.adaptive_avg_pool2d(grid, POOL_GRID).flatten(2).transpose(1, 2).reshape(b, POOL_GRID * POOL_GRID * d)


class ToyUnclipRole(UnclipRole):
    """:class:`UnclipRole` with the toy sampler (see the module docstring); same ``reconstruct`` interface."""

    REMAP = (0.5, 0.5)

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DPMSolverMultistepScheduler,
        *,
        num_steps: int,
        guidance: float,
    ):
        super().__init__(unet, vae, num_steps=num_steps, guidance=guidance, offset_noise=0.0)
        self.scheduler = scheduler

    def timesteps(self) -> list[int]:
        self.scheduler.set_timesteps(self.num_steps)
        return [int(t) for t in self.scheduler.timesteps]

    @torch.no_grad()
    def sample_latents(self, tokens: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """``(B, T, D)`` tokens → ``(B, C, L, L)`` scaled latents (CFG against ``uncond_context``)."""
        tokens = tokens.to(self.device, self.dtype)
        b = tokens.shape[0]
        x = _randn(
            (b, self.latent_channels, self.latent_size, self.latent_size), generator, self.device, torch.float32
        )
        sched = self.scheduler
        sched.set_timesteps(self.num_steps, device=self.device)
        x = x * sched.init_noise_sigma
        context = torch.cat([self.uncond_context(tokens, generator), tokens])  # drawn after x: x never moves
        return self.guided_denoise(x, context, pool_tokens(context))


@torch.no_grad()
def encode_training_set(
    clip: ClipRole, vae: VaeRole, stim: Stimuli, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> scaled VAE latents ``(N*F, C, L, L)`` and CLIP tokens ``(N*F, T, D)`` of every training frame."""
    frames = stim.flat_frames()
    return chunked(vae.encode, frames, chunk).float(), chunked(clip.image_tokens, frames, chunk).float()


def train_unclip(
    latents: torch.Tensor, tokens: torch.Tensor, recipe: ToyUnclipRecipe, seed: int, progress: bool
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """v-prediction training of the UNet on precomputed ``latents (M, C, L, L)`` and ``tokens (M, T, D)``."""
    from diffusers import UNet2DConditionModel

    gen = generator(seed)
    unet = UNet2DConditionModel.from_config(
        recipe.diffusers_config(latents.shape[1], latents.shape[-1], tokens.shape[-1])
    )
    noise_sched = noise_scheduler()

    def loss_fn(step: int) -> torch.Tensor:
        rows = batch_indices(len(latents), recipe.train.batch_size, gen)
        z0, cond = latents[rows], tokens[rows]
        keep = (torch.rand(len(rows), generator=gen) >= recipe.cond_drop).float()
        cond = cond * keep[:, None, None]
        zt, t, target = v_prediction_batch(noise_sched, z0, gen)
        v = unet(zt, t, encoder_hidden_states=cond, class_labels=pool_tokens(cond)).sample
        return F.mse_loss(v, target)

    return unet, train(unet, loss_fn, recipe.train, "toy unclip", progress)


def build(
    stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool, clip: ClipRole, vae: VaeRole
) -> dict[str, Any]:
    """Train the toy unCLIP on the frozen toy ``clip`` and ``vae`` roles; save UNet, VAE copy and scheduler."""
    from diffusers import DPMSolverMultistepScheduler

    recipe = RECIPES[scale]
    latents, tokens = encode_training_set(clip, vae, stim)
    unet, stats = train_unclip(latents, tokens, recipe, seed, progress)
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config())
    parts = {"unet": unet, "vae": vae.vae, "scheduler": scheduler}
    save_parts(folder, parts, {"num_steps": recipe.num_steps, "guidance": recipe.guidance})
    return stats


def load_unclip(
    folder: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    guidance: float | None = None,
    num_steps: int | None = None,
) -> ToyUnclipRole:
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    require_toy_files(folder, "unCLIP", "unet/config.json")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    sched = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")
    sampling = read_sampling(folder)
    return ToyUnclipRole(
        finish(unet, device, dtype),
        finish(load_autoencoder(folder / "vae"), device, torch.float32),
        sched,
        num_steps=int(num_steps or sampling["num_steps"]),
        guidance=float(sampling["guidance"] if guidance is None else guidance),
    )


def build_toy(
    weights_root: Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    guidance: float | None = None,
    num_steps: int | None = None,
    **_: object,
) -> ToyUnclipRole:
    """The toy/smoke unCLIP from ``weights_root/unclip/`` (``num_steps``/``guidance`` override the recipe)."""
    return load_unclip(Path(weights_root) / "unclip", device, dtype, guidance, num_steps)
