"""The brain-model config a stage builds from its run config (stages 1-3 and the upstream importer share it)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from models.sizes import BrainConfig, FoundationDims, brain_config
from utils.data import BrainVideoData
from utils.stage_configs import SharedConfig, UpstreamFlags


def make_brain_config(
    cfg: SharedConfig, data: BrainVideoData, dims: FoundationDims, parts: tuple[str, ...],
    n_voxels: tuple[int, ...] | None = None, **kw: Any,
) -> BrainConfig:  # fmt: skip
    """The brain config of a stage; ``n_voxels``: one count per ridge slot (default: ``data``'s subject alone)."""
    brain = _brain_config(cfg, data, dims, parts, n_voxels or (data.n_voxels,), **kw)
    if cfg.model.backbone_dropout is not None:
        brain = replace(brain, widths=replace(brain.widths, backbone_dropout=cfg.model.backbone_dropout))
    return brain


# the upstream flags that shape the stage-2 model (stage 3 rebuilds it with stage 2's values)
MODEL_FLAGS = ("text_attention", "text_attention_residual", "text_attention_null_kv", "temporal_scope",
               "caption_pad", "prior_condition", "head_input")  # fmt: skip


def model_flags(up: UpstreamFlags) -> dict[str, Any]:
    """The keyword arguments of :func:`make_brain_config` that :data:`MODEL_FLAGS` set (defects 14-21, head input)."""
    decoder = {"text_attention_residual": up.text_attention_residual,
               "text_attention_null_kv": up.text_attention_null_kv}  # fmt: skip
    return {"text_attention": up.text_attention, "temporal_scope": up.temporal_scope, "caption_pad": up.caption_pad,
            "prior_condition": up.prior_condition, "head_input": up.head_input,
            "decoder_overrides": decoder}  # fmt: skip


def _brain_config(
    cfg: SharedConfig, data: BrainVideoData, dims: FoundationDims, parts: tuple[str, ...], n_voxels: tuple[int, ...],
    **kw: Any,
) -> BrainConfig:
    return brain_config(
        cfg.model.size,
        n_voxels=n_voxels,
        n_classes=data.n_concepts if "classifier" in parts else 1,
        dims=None if cfg.model.size == "paper" else dims,
        n_frames=data.n_frames,
        parts=parts,
        **kw,
    )
