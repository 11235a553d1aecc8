"""Paper loader of role ``video``: the four AnimateDiff v3 / RealisticVision files, with their key maps.

Paper weights (fixtures/ANIMATEDIFF.md):
* ``realisticVisionV60B1_v51VAE.safetensors`` (LDM single file) -> UNet image layers, VAE and CLIP text encoder via
  ``StableDiffusionPipeline.from_single_file(config=configs/sd15_single_file, local_files_only=True)``; the tokenizer
  is SD-1.5's CLIP BPE, rebuilt in memory from the BPE file inside the open_clip wheel (no hub).
* ``v3_sd15_adapter.ckpt`` (domain-adapter LoRA, rank 128, old processor key format, no ``unet.`` prefix): merged
  exactly as AnimateDiff does, ``W[<attn>.<proj>] += scale * up @ down`` (``to_out`` = ``to_out.0``), into the UNet
  image layers only (not SparseCtrl). ``lora_peft_state_dict`` gives the ``unet.``-prefixed dict that diffusers'
  ``load_lora_weights`` would take if peft were installed.
* ``v3_sd15_mm.ckpt`` -> ``MotionAdapter`` and ``v3_sd15_sparsectrl_rgb.ckpt`` -> ``SparseControlNetModel`` through
  :func:`convert_animatediff` (explicit renames, ``pos_encoder.pe`` -> ``pos_embed.pe``) and a strict load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.foundation.catalog import entries, resolve
from models.foundation.common import (
    build_empty,
    config_path,
    finish,
    load_strict,
    log_dropped,
    read_checkpoint,
    read_json_config,
    unwrap_state_dict,
)
from models.foundation.video import VideoRole, sd15_tokenizer
from utils.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import MotionAdapter, SparseControlNetModel

log = logging.getLogger(__name__)

MM_FILE = "v3_sd15_mm.ckpt"
ADAPTER_FILE = "v3_sd15_adapter.ckpt"
SPARSECTRL_FILE = "v3_sd15_sparsectrl_rgb.ckpt"
BASE_FILE = "realisticVisionV60B1_v51VAE.safetensors"

# ---------------------------------------------------------------------------------------------------------------------
# key maps: AnimateDiff (0.11-era) motion modules -> diffusers 0.42


_MOTION_RENAMES = (
    (".temporal_transformer.", "."),
    (".attention_blocks.0.pos_encoder.pe", ".pos_embed.pe"),
    (".norms.0.", ".norm1."),
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),
    (".attention_blocks.0.", ".attn1."),
    (".attention_blocks.1.", ".attn2."),
)
# diffusers keeps one sinusoid table per transformer block; AnimateDiff's second copy is identical
_DROP_RE = re.compile(r"\.attention_blocks\.[1-9]\.pos_encoder\.pe$")


def convert_animatediff_key(key: str) -> str | None:
    """One AnimateDiff motion-module / SparseCtrl key -> diffusers key (None: dropped on purpose). Keys outside the
    motion modules (SparseCtrl image layers) keep their names."""
    if _DROP_RE.search(key):
        return None
    for old, new in _MOTION_RENAMES:
        key = key.replace(old, new)
    return key


def convert_animatediff(sd: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Motion-module or SparseCtrl state dict -> diffusers ``MotionAdapter`` / ``SparseControlNetModel`` keys."""
    out, dropped = {}, []
    for key, value in sd.items():
        new = convert_animatediff_key(key)
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    log_dropped(what, dropped)
    return out


_LORA_RE = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$")


def lora_pairs(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Domain-adapter LoRA -> ``{target weight key: (up, down)}`` with targets named as in
    ``UNet2DConditionModel`` / ``UNetMotionModel`` (``<attn>.to_q.weight`` ... ``<attn>.to_out.0.weight``)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in sd.items():
        match = _LORA_RE.match(key)
        if match is None:
            bad.append(key)
            continue
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        parts.setdefault(f"{match['attn']}.{proj}.weight", {})[match["which"]] = value
    incomplete = sorted(k for k, v in parts.items() if set(v) != {"up", "down"})
    if bad or incomplete:
        raise WeightsError(
            f"domain-adapter LoRA: {len(bad)} unknown keys (e.g. {bad[:2]}), {len(incomplete)} "
            f"incomplete up/down pairs (e.g. {incomplete[:2]})",
            "the file is not v3_sd15_adapter.ckpt",
        )
    return {k: (v["up"], v["down"]) for k, v in parts.items()}


def lora_peft_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``unet.``-prefixed dict that ``pipe.load_lora_weights(d)`` expects (needs peft; not used here)."""
    return {f"unet.{k}": v for k, v in sd.items()}


def check_lora_targets(model_sd: Mapping[str, torch.Tensor], pairs: Mapping[str, tuple]) -> None:
    """Every LoRA target must be a weight of the model with shape ``(up.out, down.in)``; raise otherwise."""
    missing = sorted(k for k in pairs if k not in model_sd)
    shapes = sorted(
        k
        for k, (up, down) in pairs.items()
        if k in model_sd and tuple(model_sd[k].shape) != (up.shape[0], down.shape[1])
    )
    ranks = sorted(k for k, (up, down) in pairs.items() if up.shape[1] != down.shape[0])
    if missing or shapes or ranks:
        raise WeightsError(
            f"domain-adapter LoRA: {len(missing)} targets not in the UNet (e.g. {missing[:2]}), "
            f"{len(shapes)} shape and {len(ranks)} rank mismatches",
            "check the adapter file",
        )


@torch.no_grad()
def merge_lora(model: nn.Module, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> int:
    """``W += scale * up @ down`` for every pair (computed in fp32); returns the number of merged layers."""
    check_lora_targets(model.state_dict(), pairs)
    for key, (up, down) in pairs.items():
        weight = model.get_parameter(key)
        delta = scale * (up.float() @ down.float())
        weight.copy_(weight.float() + delta.to(weight.device))
    return len(pairs)


# ---------------------------------------------------------------------------------------------------------------------
# paper builder


def motion_adapter_config() -> dict:
    return read_json_config("motion_adapter_v3", "config.json")


def sparsectrl_config() -> dict:
    return read_json_config("sparsectrl_rgb", "config.json")


def load_motion_adapter(path: Path) -> MotionAdapter:
    from diffusers import MotionAdapter

    sd = convert_animatediff(unwrap_state_dict(read_checkpoint(path), path), f"motion module {path.name}")
    return load_strict(
        build_empty(lambda: MotionAdapter.from_config(motion_adapter_config())), sd, f"motion module {path.name}"
    )


def load_sparsectrl(path: Path) -> SparseControlNetModel:
    from diffusers import SparseControlNetModel

    raw = unwrap_state_dict(read_checkpoint(path), path, wrappers=("state_dict", "controlnet"))
    sd = convert_animatediff(raw, f"SparseCtrl {path.name}")
    return load_strict(
        build_empty(lambda: SparseControlNetModel.from_config(sparsectrl_config())), sd, f"SparseCtrl {path.name}"
    )


def load_base_pipeline(path: Path, tokenizer: Any) -> Any:
    """RealisticVision LDM single file -> diffusers ``StableDiffusionPipeline`` (UNet2D, VAE, text encoder)."""
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_path("sd15_single_file")),
            local_files_only=True,
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise WeightsError(
            f"cannot load {path} as an SD-1.5 single file ({type(err).__name__}: {str(err)[:200]})",
            "delete it and download it again with `python download_dataset.py --weights`",
        ) from err


def build_paper(
    weights_root: Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    per_frame_norm: bool = True,
    lora_scale: float = 1.0,
    num_frames: int = 16,
    **_: object,
) -> VideoRole:
    """Assemble the NeuroClips stage-5 generator from the four local files (see the module docstring)."""
    from diffusers import UNetMotionModel

    paths = {e.filename: resolve(e, weights_root) for e in entries(["video"])}
    tokenizer = sd15_tokenizer()
    pipe = load_base_pipeline(paths[BASE_FILE], tokenizer)
    adapter_path = paths[ADAPTER_FILE]
    n = merge_lora(pipe.unet, lora_pairs(unwrap_state_dict(read_checkpoint(adapter_path), adapter_path)), lora_scale)
    log.info("merged %d domain-adapter LoRA layers at scale %.2f", n, lora_scale)
    unet = UNetMotionModel.from_unet2d(pipe.unet, load_motion_adapter(paths[MM_FILE]))
    controlnet = load_sparsectrl(paths[SPARSECTRL_FILE])
    return VideoRole(
        finish(unet, device, dtype),
        finish(controlnet, device, dtype),
        finish(pipe.vae, device, dtype),
        finish(pipe.text_encoder, device, dtype),
        tokenizer,
        num_frames=num_frames,
        per_frame_norm=per_frame_norm,
    )
