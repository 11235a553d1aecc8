"""Paper loader of role ``clip``: OpenCLIP ViT-bigG/14 from its local ``open_clip_model.safetensors``, strict."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.foundation.catalog import entries, resolve
from models.foundation.clip import ClipRole
from models.foundation.common import build_empty, finish, load_strict, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)

ARCH = "ViT-bigG-14"


def bigg_config() -> dict:
    import open_clip

    return open_clip.get_model_config(ARCH)


def _strip_module_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        log.info("stripping 'module.' prefix from %d keys", len(sd))
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> ClipRole:
    """OpenCLIP ViT-bigG/14 from ``<weights_root>/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k/``; strict load."""
    import open_clip

    (entry,) = entries(["clip"])
    path = resolve(entry, weights_root)
    model = build_empty(lambda: open_clip.CLIP(**bigg_config()))
    sd = _strip_module_prefix(unwrap_state_dict(read_checkpoint(path), path))
    load_strict(model, sd, f"clip {path.name}")
    model = finish(model, device, dtype)
    return ClipRole(model, open_clip.SimpleTokenizer(context_length=model.context_length))
