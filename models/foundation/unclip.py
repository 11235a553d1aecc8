"""Role ``unclip``: MindEye2's SDXL unCLIP (``unclip6_epoch0_step110000.ckpt``) on diffusers, for the stage-3 keyframe.

The Lightning checkpoint holds an sgm ``DiffusionEngine``. The key maps below convert its LDM/sgm names:
``model.diffusion_model.*`` -> ``UNet2DConditionModel`` (config ``configs/unclip6_unet.json``: SDXL topology,
cross-attention 1664 = bigG tokens, ``class_embed_type="projection"`` taking the 1024-d size vector) and
``first_stage_model.*`` -> ``AutoencoderKL`` (``configs/unclip6_vae.json``, scale 0.13025). The frozen bigG image tower
(``conditioner.embedders.0.model.*``, the ``clip`` role's model) and ``denoiser.sigmas`` (recomputed by the scheduler;
checked against it when present) are dropped with a log line.

Sampling = MindEye2 ``utils.unclip_recon`` (fixtures README, upstream §4 step 6):
* start ``x = z + sigma_0 * (n + 0.04 * o)`` with ``z, n ~ N(0, I)`` ``(B, 4, 96, 96)`` and one offset ``o ~ N(0, 1)``
  per sample; random-normal tokens shaped like the condition as the unconditional context, the same size vector;
* Euler (EDM, no churn) on the DDPM ``scaled_linear`` sigmas at timesteps ``linspace(999, 0, 38, endpoint=False)``
  (999, 972, ..., 26) via ``EulerDiscreteScheduler(timesteps=...)``; eps prediction; CFG 5 on [uncond, cond];
* VAE decode of ``z / 0.13025`` and the output remap ``clamp(0.8 x + 0.2, 0, 1)`` -> ``(B, 3, 768, 768)``.

A toy builder returns ``UnclipRole(tiny UNet2DConditionModel(class_embed_type="projection"), tiny AutoencoderKL)``;
token width and vector width come from the UNet config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.foundation.catalog import entries, resolve
from models.foundation.common import (
    build_empty,
    finish,
    load_strict,
    log_dropped,
    read_checkpoint,
    read_json_config,
    unwrap_state_dict,
)
from utils.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
DROPPED_PREFIXES = ("conditioner.embedders.0.model.", "denoiser.sigmas")

Generators = torch.Generator | Sequence[torch.Generator] | None

# ---------------------------------------------------------------------------------------------------------------------
# key maps


_RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_DOWNSAMPLE_RENAMES = {"op": "conv"}


def unet_block_map(config: Mapping) -> dict[str, tuple[str, dict[str, str]]]:
    """LDM UNet block prefix -> (diffusers prefix, renames of the part before ``.weight``/``.bias``), from the
    diffusers config (levels, ``layers_per_block``, which blocks have cross-attention, class embedding)."""
    levels = len(config["block_out_channels"])
    per = int(config["layers_per_block"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    m: dict[str, tuple[str, dict[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", {}),
        "time_embed.2": ("time_embedding.linear_2", {}),
        "input_blocks.0.0": ("conv_in", {}),
        "out.0": ("conv_norm_out", {}),
        "out.2": ("conv_out", {}),
        "middle_block.0": ("mid_block.resnets.0", _RESNET_RENAMES),
        "middle_block.1": ("mid_block.attentions.0", {}),
        "middle_block.2": ("mid_block.resnets.1", _RESNET_RENAMES),
    }
    if config.get("class_embed_type") == "projection":
        m["label_emb.0.0"] = ("class_embedding.linear_1", {})
        m["label_emb.0.2"] = ("class_embedding.linear_2", {})
    for b in range(levels):
        for layer in range(per):
            i = 1 + b * (per + 1) + layer
            m[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{layer}", _RESNET_RENAMES)
            if down_attn[b]:
                m[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{layer}", {})
        if b < levels - 1:
            m[f"input_blocks.{(b + 1) * (per + 1)}.0"] = (f"down_blocks.{b}.downsamplers.0", _DOWNSAMPLE_RENAMES)
        for layer in range(per + 1):
            i = b * (per + 1) + layer
            m[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{layer}", _RESNET_RENAMES)
            if up_attn[b]:
                m[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{layer}", {})
            if layer == per and b < levels - 1:
                m[f"output_blocks.{i}.{2 if up_attn[b] else 1}"] = (f"up_blocks.{b}.upsamplers.0", {})
    return m


def _map_key(key: str, block_map: Mapping[str, tuple[str, dict[str, str]]], max_parts: int = 3) -> str | None:
    parts = key.split(".")
    for n in range(min(max_parts, len(parts) - 1), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in block_map:
            new_prefix, renames = block_map[prefix]
            rest = parts[n:]
            head = ".".join(rest[:-1])
            head = renames.get(head, head)
            return ".".join(p for p in (new_prefix, head, rest[-1]) if p)
    return None


def convert_unet(ldm: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """sgm/LDM UNet state dict (prefix already stripped) -> diffusers ``UNet2DConditionModel`` keys. Spatial
    transformer internals keep their names. Unmapped keys raise :class:`WeightsError`."""
    block_map = unet_block_map(config)
    out, unmapped = {}, []
    for key, value in ldm.items():
        new = _map_key(key, block_map)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise WeightsError(
            f"unclip UNet: {len(unmapped)} keys have no mapping, e.g. {sorted(unmapped)[:3]}",
            "the checkpoint is not MindEye2's unclip6 (or the UNet config does not match it)",
        )
    return out


_VAE_ATTN_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}


def _vae_block(parts: list[str], levels: int) -> tuple[str, int] | None:
    """(diffusers prefix, number of LDM key parts consumed) for an ``encoder.``/``decoder.`` key, or None."""
    side = parts[0]
    if parts[1] in ("conv_in", "conv_out"):
        return f"{side}.{parts[1]}", 2
    if parts[1] == "norm_out":
        return f"{side}.conv_norm_out", 2
    if parts[1] == "mid":
        sub = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}.get(parts[2])
        return (f"{side}.mid_block.{sub}", 3) if sub else None
    if parts[1] in ("down", "up") and len(parts) > 4:
        level = int(parts[2]) if parts[1] == "down" else levels - 1 - int(parts[2])
        group = f"{side}.{parts[1]}_blocks.{level}"
        if parts[3] == "block":
            return f"{group}.resnets.{parts[4]}", 5
        if parts[3] in ("downsample", "upsample"):
            return f"{group}.{parts[3]}rs.0", 4
    return None


def convert_vae(ldm: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM ``AutoencoderKL`` state dict (prefix stripped) -> diffusers ``AutoencoderKL``. Mid-block attention
    1x1-conv weights become linear weights."""
    levels = len(config["block_out_channels"])
    out, unmapped = {}, []
    for key, value in ldm.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        found = _vae_block(parts, levels) if parts[0] in ("encoder", "decoder") and len(parts) > 2 else None
        if found is None:
            unmapped.append(key)
            continue
        prefix, used = found
        head = ".".join(parts[used:-1])
        is_attn = prefix.endswith("attentions.0")
        head = (_VAE_ATTN_RENAMES if is_attn else _VAE_RESNET_RENAMES).get(head, head)
        if is_attn and head.startswith("to_") and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[".".join(p for p in (prefix, head, parts[-1]) if p)] = value
    if unmapped:
        raise WeightsError(
            f"unclip VAE: {len(unmapped)} keys have no mapping, e.g. {sorted(unmapped)[:3]}",
            "the checkpoint is not MindEye2's unclip6",
        )
    return out


def split_checkpoint(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """unclip6 ``state_dict`` -> (UNet part, VAE part, dropped part), prefixes stripped from the first two."""
    unet, vae, dropped, unknown = {}, {}, {}, []
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX) :]] = value
        elif key.startswith(DROPPED_PREFIXES):
            dropped[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(
            f"unclip checkpoint: {len(unknown)} unexpected keys, e.g. {sorted(unknown)[:3]}",
            "the file is not MindEye2's unclip6_epoch0_step110000.ckpt",
        )
    log_dropped("unclip6 (bigG tower is the clip role; sigmas are recomputed)", dropped)
    return unet, vae, dropped


def convert_checkpoint(
    sd: Mapping[str, torch.Tensor], unet_config: Mapping | None = None, vae_config: Mapping | None = None
) -> tuple[dict, dict, dict]:
    """Full unclip6 ``state_dict`` -> (diffusers UNet dict, diffusers VAE dict, dropped entries)."""
    unet_config = unet_config or unet_config_paper()
    vae_config = vae_config or vae_config_paper()
    unet, vae, dropped = split_checkpoint(sd)
    return convert_unet(unet, unet_config), convert_vae(vae, vae_config), dropped


def unet_config_paper() -> dict:
    return read_json_config("unclip6_unet.json")


def vae_config_paper() -> dict:
    return read_json_config("unclip6_vae.json")


# ---------------------------------------------------------------------------------------------------------------------
# sampler


def euler_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """sgm LegacyDDPMDiscretization grid: ``linspace(T-1, 0, n, endpoint=False).astype(int)`` (999, 972, ..., 26)."""
    return np.linspace(num_train_timesteps - 1, 0, num_steps, endpoint=False).astype(int).tolist()


def make_scheduler() -> EulerDiscreteScheduler:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


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


class UnclipRole:
    """Keyframe decoder from bigG tokens. Attributes: ``token_dim`` (1664), ``vector_dim`` (1024), ``latent_size``
    (96), ``latent_channels`` (4), ``num_steps`` (38), ``guidance`` (5.0), ``vae_scale`` (0.13025)."""

    REMAP = (0.8, 0.2)

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        *,
        num_steps: int = 38,
        guidance: float = 5.0,
        offset_noise: float = 0.04,
        latent_size: int | None = None,
        original_size: tuple[int, int] | None = None,
    ):
        self.unet, self.vae = unet, vae
        self.num_steps, self.guidance, self.offset_noise = num_steps, guidance, offset_noise
        self.token_dim = int(unet.config.cross_attention_dim)
        self.vector_dim = int(unet.config.projection_class_embeddings_input_dim)
        self.latent_channels = int(unet.config.in_channels)
        self.latent_size = int(latent_size or unet.config.sample_size)
        downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        side = self.latent_size * downsample
        self.original_size = original_size or (side, side)
        self.vae_scale = float(vae.config.scaling_factor)
        self.scheduler = make_scheduler()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

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
        uncond = _randn(tuple(tokens.shape), generator, self.device, self.dtype)
        noise = _randn(lat_shape, generator, self.device, torch.float32)
        offset = _randn((b, 1, 1, 1), generator, self.device, torch.float32)
        sched = self.scheduler
        sched.set_timesteps(timesteps=self.timesteps(), device=self.device)
        x = z + sched.sigmas[0].to(self.device) * (noise + self.offset_noise * offset)
        context = torch.cat([uncond, tokens])
        vector = self.vector(2 * b)
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), t).to(self.dtype)
            eps = self.unet(x_in, t, encoder_hidden_states=context, class_labels=vector).sample.float()
            eps_u, eps_c = eps.chunk(2)
            x = sched.step(eps_u + self.guidance * (eps_c - eps_u), t, x).prev_sample
        return x

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


def check_sigmas(dropped: Mapping[str, torch.Tensor], scheduler: EulerDiscreteScheduler) -> None:
    """Compare the checkpoint's ``denoiser.sigmas`` (1000 DDPM sigmas) with the scheduler's table; warn on mismatch."""
    stored = dropped.get("denoiser.sigmas")
    if stored is None or stored.is_meta:
        return
    ac = scheduler.alphas_cumprod.double()
    ours = ((1 - ac) / ac).sqrt()
    rel = ((stored.double() - ours).abs() / ours).max().item()
    (log.info if rel < 1e-4 else log.warning)("unclip denoiser.sigmas vs scheduler: max rel diff %.2e", rel)


def build_paper(
    weights_root: Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    allow_unsafe_pickle: bool = False,
    **_: object,
) -> UnclipRole:
    """unclip6 -> diffusers UNet + VAE (strict). The VAE stays fp32 (``disable_first_stage_autocast``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    (entry,) = entries(["unclip"])
    path = resolve(entry, weights_root)
    sd = unwrap_state_dict(read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle), path)
    unet_sd, vae_sd, dropped = convert_checkpoint(sd)
    del sd
    unet = build_empty(lambda: UNet2DConditionModel.from_config(unet_config_paper()))
    vae = build_empty(lambda: AutoencoderKL.from_config(vae_config_paper()))
    load_strict(unet, unet_sd, f"unclip UNet {path.name}")
    load_strict(vae, vae_sd, f"unclip VAE {path.name}")
    role = UnclipRole(finish(unet, device, dtype), finish(vae, device, torch.float32))
    check_sigmas(dropped, role.scheduler)
    return role
