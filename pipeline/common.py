"""What every stage needs: the subject's data, the foundation roles, the brain-model config and its weights."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from models.sizes import PAPER_FOUNDATION_DIMS, FoundationDims, GPT2Dims, brain_config
from utils.data import BrainVideoData, DataOptions, load_tensor
from utils.errors import DataError

log = logging.getLogger(__name__)

TOKENS_PROJ_FILE = "coco_tokens_avg_proj.pth"  # frozen CLIP tokens -> caption space map, in data_root


def load_data(cfg: Any, fields: tuple[str, ...]) -> BrainVideoData:
    """The subject's data, with ``fields`` validated before any work starts."""
    data = BrainVideoData(cfg.paths.data_root, cfg.run.subj, DataOptions.from_config(cfg.data))
    data.validate(fields)
    return data


def data_files(data: BrainVideoData, names: tuple[str, ...]) -> list[Path]:
    """Existing input files of ``data`` among ``names`` (for the manifest)."""
    return [p for p in (data.root / n for n in names) if p.exists()]


def foundation_kind(cfg: Any) -> str:
    """The foundation-role implementation of this profile: ``paper`` weights or the ``toy`` / ``smoke`` models."""
    return cfg.model.size


def foundation_dims(cfg: Any, clip: Any, data: BrainVideoData, vae: Any = None, gpt2: Any = None) -> FoundationDims:
    """Dimensions fixed by the foundation models: the paper's constants, or read from the toy models."""
    if foundation_kind(cfg) == "paper":
        return PAPER_FOUNDATION_DIMS
    latent_size = data.resolution // vae.downsample if vae is not None else 1
    gpt = GPT2Dims(gpt2.hidden_size, gpt2.model.config.n_layer, gpt2.model.config.n_head, gpt2.vocab_size,
                   gpt2.max_positions) if gpt2 is not None else GPT2Dims()  # fmt: skip
    latent_channels = vae.latent_channels if vae is not None else 4
    return FoundationDims(clip.num_tokens, clip.token_dim, clip.text_dim, latent_channels, latent_size, gpt)


def make_brain_config(cfg: Any, data: BrainVideoData, dims: FoundationDims, parts: tuple[str, ...], **kw: Any):
    brain = _brain_config(cfg, data, dims, parts, **kw)
    if cfg.model.backbone_dropout is not None:
        brain = replace(brain, widths=replace(brain.widths, backbone_dropout=cfg.model.backbone_dropout))
    return brain


def _brain_config(cfg: Any, data: BrainVideoData, dims: FoundationDims, parts: tuple[str, ...], **kw: Any):
    return brain_config(
        cfg.model.size,
        n_voxels=(data.n_voxels,),
        n_classes=data.n_concepts if "classifier" in parts else 1,
        dims=None if cfg.model.size == "paper" else dims,
        n_frames=data.n_frames,
        parts=parts,
        **kw,
    )


def load_tokens_proj(data_root: str | Path, expect: tuple[int, int]) -> torch.Tensor:
    """The frozen ``(D, Dt)`` map of ``coco_tokens_avg_proj.pth`` (key ``proj``), shape-checked."""
    path = Path(data_root) / TOKENS_PROJ_FILE
    fix = (
        "real data: python download_dataset.py; toy world: python -m tasks_construction.gen_GT_clip_embeds "
        "--profile <profile>"
    )
    state = load_tensor(path, fix)
    proj = state.get("proj") if isinstance(state, dict) else None
    if not isinstance(proj, torch.Tensor) or tuple(proj.shape) != tuple(expect):
        got = tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(state).__name__
        raise DataError(f"{path} must hold 'proj' of shape {expect}, found {got}", fix)
    return proj.float()
