"""Toy ``video`` role: a tiny AnimateDiff + SparseCtrl-RGB on the toy VAE, trained on the toy world's TRAINING clips
conditioned on their caption and their first frame (the keyframe).

Parts (the paper role's library classes): ``UNetMotionModel.from_unet2d(UNet2DConditionModel, MotionAdapter)``, a
``SparseControlNetModel`` in RGB mode (keyframe VAE latents + mask, ``use_simplified_condition_embedding=True``), a
``CLIPTextModel`` with the CLIP BPE tokenizer built in memory (:func:`models.foundation.video.sd15_tokenizer`), and a
copy of the toy ``vae`` role (``video/vae/``, so the role is self-contained; latents ``(4, R/4, R/4)``).

Recipe (``/work/shared/spec/toy-feasibility.md``): v-prediction on the cosine schedule, and the condition also added
to the time embedding: the keyframe latent average-pooled to a ``pool_grid`` x ``pool_grid`` grid and flattened is
the UNet's ``timestep_cond`` (:meth:`ToyVideoRole.time_condition`; the paper role passes none). Captions are
dropped to ``""`` 10 % of the time (the unconditional branch of CFG). A motion module trained for minutes on CPU does
not learn motion; stage 5 carries the motion in from the blurry video through its img2img start, so what this model
must get right is keyframe fidelity and temporal consistency. The per-frame GroupNorm parity patch of the paper role
is on during training and sampling alike.

Sampling: the role's DDIM loop with a DDIM scheduler on the same cosine schedule, ``prediction_type="v_prediction"``,
"leading" spacing with ``steps_offset=1`` (never t=999, where the cosine alpha_bar is ~0).

Files in ``weights_root/video/``: ``unet/``, ``controlnet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (``save_pretrained``), ``sampling.json`` (``num_frames``), ``manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.foundation.clip.toy import CLIP_VOCAB, EOT, SOT
from models.foundation.common import count_params, finish
from models.foundation.toy.common import (
    COSINE_V_SCHEDULE,
    SAMPLING_FILE,
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
from models.foundation.vae import VaeRole
from models.foundation.vae.toy import load_autoencoder
from models.foundation.video import VideoRole, sd15_tokenizer

log = logging.getLogger(__name__)

PARTS = ("unet", "controlnet", "text_encoder")


@dataclass(frozen=True)
class ToyVideoRecipe:
    """Architecture and training of the toy AnimateDiff (cross-attention + motion modules in the first level)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    motion_heads: int = 2
    text_width: int = 32
    text_layers: int = 1
    context_length: int = 32
    pool_grid: int = 4
    cond_drop: float = 0.1
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=300, batch_size=8, lr=2e-3, warmup=30, ema=0.98)
    )

    def unet_config(self, latent_channels: int, latent_size: int) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "sample_size": latent_size,
            "in_channels": latent_channels,
            "out_channels": latent_channels,
            "down_block_types": ["CrossAttnDownBlock2D"] + ["DownBlock2D"] * (levels - 1),
            "up_block_types": ["UpBlock2D"] * (levels - 1) + ["CrossAttnUpBlock2D"],
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": 1,
            "norm_num_groups": self.norm_num_groups,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": self.text_width,
            "time_cond_proj_dim": latent_channels * self.pool_grid**2,
        }

    def adapter_config(self, max_frames: int) -> dict[str, Any]:
        return {
            "block_out_channels": list(self.block_out_channels),
            "motion_layers_per_block": 1,
            "motion_norm_num_groups": self.norm_num_groups,
            "motion_num_attention_heads": self.motion_heads,
            "motion_max_seq_length": max(32, max_frames),
        }

    def controlnet_config(self, latent_channels: int) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "in_channels": latent_channels,
            "conditioning_channels": latent_channels,
            "down_block_types": ["CrossAttnDownBlockMotion"] + ["DownBlockMotion"] * (levels - 1),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": 1,
            "norm_num_groups": self.norm_num_groups,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": self.text_width,
            "motion_num_attention_heads": self.motion_heads,
            "use_simplified_condition_embedding": True,
            "concat_conditioning_mask": True,
        }

    def text_config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.text_width,
            "intermediate_size": 2 * self.text_width,
            "num_attention_heads": 2,
            "num_hidden_layers": self.text_layers,
            "vocab_size": CLIP_VOCAB,
            "max_position_embeddings": self.context_length,
            "bos_token_id": SOT,
            "eos_token_id": EOT,
            "pad_token_id": EOT,
        }


RECIPES: dict[str, ToyVideoRecipe] = {
    "toy": ToyVideoRecipe(),
    "smoke": ToyVideoRecipe(
        block_out_channels=(16, 32),
        norm_num_groups=4,
        attention_head_dim=4,
        train=TrainRecipe(steps=40, batch_size=4, lr=3e-3, warmup=4),
    ),
}


def scheduler_config() -> dict[str, Any]:
    """DDIM on the cosine schedule, v-prediction, "leading" spacing with ``steps_offset=1``."""
    return {
        **COSINE_V_SCHEDULE,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": True,
    }


class ToyVideoRole(VideoRole):
    """:class:`VideoRole` whose UNet also gets the keyframe latent in its time embedding (see the module doc)."""

    def __init__(self, *args: Any, pool_grid: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pool_grid = pool_grid

    def time_condition(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """``cond (B, C, F, h, w)``, ``cond_mask (B, 1, F, h, w)`` -> ``(B, C * g * g)``: the mean of the
        conditioning frames' latents, average-pooled to a g x g grid."""
        key = (cond * cond_mask).sum(dim=2) / cond_mask.sum(dim=2).clamp(min=1.0)  # (B, C, h, w)
        return F.adaptive_avg_pool2d(key, self.pool_grid).flatten(1)


def make_parts(recipe: ToyVideoRecipe, vae: VaeRole, latent_size: int, num_frames: int) -> tuple[nn.Module, ...]:
    """Fresh ``(UNetMotionModel, SparseControlNetModel, CLIPTextModel)``."""
    from diffusers import MotionAdapter, SparseControlNetModel, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    c = vae.latent_channels
    unet2d = UNet2DConditionModel.from_config(recipe.unet_config(c, latent_size))
    unet = UNetMotionModel.from_unet2d(unet2d, MotionAdapter.from_config(recipe.adapter_config(num_frames)))
    controlnet = SparseControlNetModel.from_config(recipe.controlnet_config(c))
    return unet, controlnet, CLIPTextModel(CLIPTextConfig(**recipe.text_config()))


@torch.no_grad()
def encode_clips(vae: VaeRole, stim: Stimuli, chunk: int = 512) -> torch.Tensor:
    """-> scaled posterior-mode latents of every training clip ``(N, C, F, h, w)``."""
    z = chunked(vae.encode, stim.flat_frames(), chunk)  # (N*F, C, h, w)
    return z.reshape(stim.n_clips, stim.n_frames, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous().float()


def make_role(
    parts: tuple[nn.Module, ...],
    vae: Any,
    tokenizer: Any,
    num_frames: int,
    pool_grid: int,
    per_frame_norm: bool = True,
) -> ToyVideoRole:
    from diffusers import DDIMScheduler

    unet, controlnet, text_encoder = parts
    return ToyVideoRole(
        unet,
        controlnet,
        vae,
        text_encoder,
        tokenizer,
        DDIMScheduler.from_config(scheduler_config()),
        num_frames=num_frames,
        per_frame_norm=per_frame_norm,
        pool_grid=pool_grid,
    )


def train_video(
    role: ToyVideoRole, latents: torch.Tensor, captions: list[str], recipe: ToyVideoRecipe, seed: int, progress: bool
) -> dict[str, Any]:
    """v-prediction training of the role's UNet, SparseCtrl and text encoder on ``latents (N, C, F, h, w)``."""
    gen = generator(seed)
    noise_sched = noise_scheduler()
    tok = role.tokenizer
    ids = tok(
        list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    null = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    module = nn.ModuleDict({"unet": role.unet, "controlnet": role.controlnet, "text_encoder": role.text_encoder})
    module.requires_grad_(True)
    frames = latents.shape[2]

    def loss_fn(step: int) -> torch.Tensor:
        rows = batch_indices(len(latents), recipe.train.batch_size, gen)
        z0 = latents[rows]
        drop = torch.rand(len(rows), generator=gen) < recipe.cond_drop
        text = torch.where(drop[:, None], null, ids[rows])
        embeds = role.text_encoder(text)[0].repeat_interleave(frames, dim=0)  # (B*F, L, D)
        zt, t, target = v_prediction_batch(noise_sched, z0, gen)
        cond, mask = role.keyframe_condition(z0[:, :, 0], frames)
        down, mid = role.controlnet(
            zt, t, encoder_hidden_states=embeds, controlnet_cond=cond, conditioning_mask=mask, return_dict=False
        )
        v = role.unet(
            zt,
            t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            timestep_cond=role.time_condition(cond, mask),
        ).sample
        return F.mse_loss(v, target)

    stats = train(module, loss_fn, recipe.train, "toy video", progress)
    return {**stats, "params": {k: count_params(m) for k, m in module.items()}}


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool, vae: VaeRole) -> dict[str, Any]:
    """Train the toy AnimateDiff on the frozen toy ``vae``; save every part, the VAE copy and the scheduler."""
    recipe = RECIPES[scale]
    generator(seed)  # module init
    latents = encode_clips(vae, stim)
    parts = make_parts(recipe, vae, latents.shape[-1], stim.n_frames)
    role = make_role(parts, vae.vae, sd15_tokenizer(recipe.context_length), stim.n_frames, recipe.pool_grid)
    stats = train_video(role, latents, stim.captions, recipe, seed, progress)
    parts = {name: getattr(role, name) for name in (*PARTS, "tokenizer", "scheduler")} | {"vae": vae.vae}
    save_parts(folder, parts, {"num_frames": stim.n_frames, "pool_grid": recipe.pool_grid})
    return stats


def load_video(
    folder: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    per_frame_norm: bool = True,
    num_frames: int | None = None,
) -> ToyVideoRole:
    from diffusers import DDIMScheduler, SparseControlNetModel, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    sampling = read_sampling(require_toy_files(folder, "video", SAMPLING_FILE))
    return ToyVideoRole(
        finish(UNetMotionModel.from_pretrained(folder / "unet"), device, dtype),
        finish(SparseControlNetModel.from_pretrained(folder / "controlnet"), device, dtype),
        finish(load_autoencoder(folder / "vae"), device, dtype),
        finish(CLIPTextModel.from_pretrained(folder / "text_encoder"), device, dtype),
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        DDIMScheduler.from_pretrained(folder / "scheduler"),
        num_frames=int(num_frames or sampling["num_frames"]),
        per_frame_norm=per_frame_norm,
        pool_grid=int(sampling["pool_grid"]),
    )


def build_toy(
    weights_root: Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    per_frame_norm: bool = True,
    num_frames: int | None = None,
    **_: object,
) -> ToyVideoRole:
    """The toy/smoke AnimateDiff from ``weights_root/video/`` (``num_frames`` defaults to the world's clip length)."""
    return load_video(Path(weights_root) / "video", device, dtype, per_frame_norm, num_frames)
