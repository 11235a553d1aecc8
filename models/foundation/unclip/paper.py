"""Paper loader of role ``unclip``: MindEye2's ``unclip6_epoch0_step110000.ckpt`` (an sgm ``DiffusionEngine``).

The key maps below convert its LDM/sgm names:
``model.diffusion_model.*`` -> ``UNet2DConditionModel`` (config ``configs/unclip6_unet.json``: SDXL topology,
cross-attention 1664 = bigG tokens, ``class_embed_type="projection"`` taking the 1024-d size vector) and
``first_stage_model.*`` -> ``AutoencoderKL`` (``configs/unclip6_vae.json``, scale 0.13025). The frozen bigG image tower
(``conditioner.embedders.0.model.*``, the ``clip`` role's model) and ``denoiser.sigmas`` (recomputed by the scheduler;
checked against it when present) are dropped with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

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
from models.foundation.unclip import UnclipRole
from utils.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import EulerDiscreteScheduler

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
DROPPED_PREFIXES = ("conditioner.embedders.0.model.", "denoiser.sigmas")

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
    renamed = {key: _map_key(key, block_map) for key in ldm}
    unmapped = [key for key, new in renamed.items() if new is None]
    if unmapped:
        raise WeightsError(
            f"unclip UNet: {len(unmapped)} keys have no mapping, e.g. {sorted(unmapped)[:3]}",
            "the checkpoint is not MindEye2's unclip6 (or the UNet config does not match it)",
        )
    return {new: ldm[key] for key, new in renamed.items() if new is not None}


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
