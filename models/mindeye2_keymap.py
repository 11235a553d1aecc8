"""Explicit key map from MindEye2's `last.pth` (`model_state_dict`) onto the NEURONS brain model.

NEURONS initialises its backbone (stage 1) and its diffusion prior (stage 2) from MindEye2's subject-1 model. Every
source key falls under exactly one rule below: mapped onto a target submodule, or dropped with a stated reason. A key
matching no rule is an error (the file is not the MindEye2 checkpoint we think it is). Each target submodule present
on the model is then loaded with ``strict=True``, so missing or unexpected keys, or shape mismatches, raise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.foundation.catalog import MINDEYE2_WEIGHTS
from utils.errors import WeightsError

log = logging.getLogger(__name__)

MINDEYE2_FILE = MINDEYE2_WEIGHTS.relpath  # under weights_root; the catalogue entry says where to get it

# (source prefix, target submodule, target prefix inside that submodule). Names are kept, so the map is 1:1.
MINDEYE2_KEY_MAP: tuple[tuple[str, str, str], ...] = (
    ("backbone.mixer_blocks1.", "backbone", "mixer_blocks1."),
    ("backbone.mixer_blocks2.", "backbone", "mixer_blocks2."),
    ("backbone.backbone_linear.", "backbone", "backbone_linear."),
    ("backbone.clip_proj.", "backbone", "clip_proj."),
    ("diffusion_prior.net.", "diffusion_prior", "net."),
    ("diffusion_prior.noise_scheduler.", "diffusion_prior", "noise_scheduler."),
)

# Source prefixes NEURONS does not use, with the reason reported for each dropped key.
MINDEYE2_DROPPED: tuple[tuple[str, str], ...] = (
    ("ridge.", "MindEye2's NSD ridge (15724 voxels); NEURONS trains a fresh ridge for its own voxels"),
    ("backbone.blin1.", "MindEye2 blurry branch (not in NEURONS)"),
    ("backbone.bnorm.", "MindEye2 blurry branch (not in NEURONS)"),
    ("backbone.bupsampler.", "MindEye2 blurry branch (not in NEURONS)"),
    ("backbone.b_maps_projector.", "MindEye2 blurry branch / ConvNeXt feature head (not in NEURONS)"),
)


@dataclass
class LoadReport:
    """What `load_mindeye2_backbone_prior` did.

    loaded: target submodule → the keys loaded into it (target names, relative to the submodule).
    dropped: source key → why it was not loaded.
    missing / unexpected: what ``load_state_dict`` returned per submodule (empty after a successful strict load).
    """

    loaded: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_loaded(self) -> int:
        return sum(len(v) for v in self.loaded.values())

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {len(v)}" for k, v in self.loaded.items())
        return f"loaded {self.n_loaded} keys ({parts}); dropped {len(self.dropped)}"


def map_mindeye2_keys(
    state_dict: Mapping[str, torch.Tensor], targets: tuple[str, ...]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Split a MindEye2 state dict into {target submodule: {key: tensor}} and {dropped source key: reason}.

    Keys of a mappable submodule not in `targets` are dropped with the reason "model has no <target>".
    """
    mapped: dict[str, dict[str, torch.Tensor]] = {t: {} for t in targets}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        rule = next((r for r in MINDEYE2_KEY_MAP if key.startswith(r[0])), None)
        if rule is not None:
            src, target, dst = rule
            if target in targets:
                mapped[target][dst + key[len(src) :]] = tensor
            else:
                dropped[key] = f"model has no {target} (not built for this stage)"
            continue
        reason = next((why for prefix, why in MINDEYE2_DROPPED if key.startswith(prefix)), None)
        if reason is None:
            unknown.append(key)
        else:
            dropped[key] = reason
    if unknown:
        raise WeightsError(
            f"{len(unknown)} keys of the MindEye2 checkpoint match no mapping rule, e.g. {unknown[:3]}",
            "check that the file is MindEyeV2 final_subj01_pretrained_40sess_24bs/last.pth",
        )
    return mapped, dropped


def load_mindeye2_backbone_prior(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, assign: bool = False
) -> LoadReport:
    """Load MindEye2's backbone (and prior, if the model has one) into `model`, strictly, and report what was dropped.

    state_dict: MindEye2's ``model_state_dict`` (a full checkpoint dict with that key is unwrapped).
    assign: passed to ``load_state_dict`` (use True for a model built on the meta device).
    """
    if "model_state_dict" in state_dict:
        state_dict = state_dict["model_state_dict"]
    targets = tuple(t for t in ("backbone", "diffusion_prior") if hasattr(model, t))
    if "backbone" not in targets:
        raise WeightsError("the model has no backbone to load MindEye2 weights into", "build it with that part")
    mapped, dropped = map_mindeye2_keys(state_dict, targets)
    report = LoadReport(dropped=dropped)
    for target in targets:
        try:
            result = getattr(model, target).load_state_dict(mapped[target], strict=True, assign=assign)
        except RuntimeError as err:
            raise WeightsError(
                f"MindEye2 weights do not fit the model's {target}: {err}",
                "build the model with the paper size and MindEye2's prior config",
            ) from err
        report.loaded[target] = sorted(mapped[target])
        report.missing[target] = list(result.missing_keys)
        report.unexpected[target] = list(result.unexpected_keys)
    log.info("MindEye2 weights: %s", report.summary())
    for prefix in sorted({_prefix_of(k) for k in dropped}):
        n = sum(1 for k in dropped if _prefix_of(k) == prefix)
        log.info(
            "MindEye2 weights: dropped %d keys under %s (%s)",
            n,
            prefix,
            next(v for k, v in dropped.items() if _prefix_of(k) == prefix),
        )
    return report


def _prefix_of(key: str) -> str:
    return ".".join(key.split(".")[:2])


def require_mindeye2(weights_root: str | Path) -> Path:
    """The path of MindEye2's ``last.pth`` under ``weights_root``; a one-line WeightsError when it is missing."""
    path = Path(weights_root) / MINDEYE2_FILE
    if not path.is_file():
        hint = MINDEYE2_WEIGHTS.download_hint(weights_root)
        raise WeightsError(
            f"missing MindEye2 weights {path}",
            f"get them with `{hint}` (or `python download_dataset.py --weights`), "
            "or --set train.init_from_mindeye2=false",
        )
    return path


def load_mindeye2(weights_root: str | Path, model: nn.Module) -> LoadReport:
    """Read ``weights_root/last.pth`` and load its backbone (and prior) into ``model`` through the key map."""
    state = torch.load(require_mindeye2(weights_root), map_location="cpu", weights_only=True)
    return load_mindeye2_backbone_prior(state, model)
