"""Paper loader of role ``vae``: the SD-1.5 VAE in diffusers layout, config shipped in the repo, strict load."""

from __future__ import annotations

from pathlib import Path

import torch

from models.foundation.catalog import entries, resolve
from models.foundation.common import build_empty, finish, load_strict, read_checkpoint, read_json_config
from models.foundation.vae import VaeRole


def sd15_vae_config() -> dict:
    return read_json_config("sd15_single_file", "vae", "config.json")


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> VaeRole:
    """SD-1.5 VAE in diffusers layout; the config ships in the repo, the weights are loaded strictly."""
    from diffusers import AutoencoderKL

    (entry,) = entries(["vae"])
    path = resolve(entry, weights_root)
    vae = build_empty(lambda: AutoencoderKL.from_config(sd15_vae_config()))
    load_strict(vae, read_checkpoint(path), f"vae {path.name}")
    return VaeRole(finish(vae, device, dtype))
