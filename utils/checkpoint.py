"""Checkpoints: one folder per checkpoint, weights in safetensors, training state beside them, swapped in atomically.

Layout of ``<stage_dir>/checkpoints/<name>/``::

    model.safetensors   the weights (metadata: config hash, profile, subject, model size, step)
    state.pt            optimizer, scheduler, step, epoch, RNG states, metrics (torch.load(weights_only=True) safe)
    config.yaml         the resolved config that produced it

A new checkpoint is written into a temporary folder and swapped in with two renames; if the process dies between
them, :func:`resolve_checkpoint` falls back to the previous folder (``<name>.old``), so a ``kill -9`` during a save
never loses the last good checkpoint. Loading is strict: every key and shape must match, and a mismatch is one line
naming the offending keys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from utils.config import config_hash, to_dict, to_yaml
from utils.errors import WeightsError
from utils.io import storage_errors
from utils.stage_configs import SharedConfig

log = logging.getLogger(__name__)

MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "state.pt", "config.yaml"
IDENTITY_KEYS = ("subj", "model_size")


def identity(cfg: SharedConfig) -> dict[str, str]:
    """What a checkpoint must agree on with the run that loads it (the profile may differ: a profile that
    ``extends:`` another one loads its checkpoints; a different model size or world shows up here or in the shapes)."""
    return {"profile": str(cfg.run.profile), "subj": cfg.run.subj_text, "model_size": str(cfg.model.size)}


def save_checkpoint(
    folder: Path, state_dict: Mapping[str, torch.Tensor], cfg: SharedConfig, state: Mapping[str, Any] | None = None
) -> Path:
    """Write ``folder`` (model weights + training ``state`` + config) atomically, replacing an older one."""
    folder = Path(folder)
    with storage_errors(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            meta = {**identity(cfg), "config_hash": config_hash(cfg), "step": str((state or {}).get("step", 0))}
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
            save_file(tensors, str(tmp / MODEL_FILE), metadata=meta)
            torch.save({**(state or {}), "config": to_dict(cfg)}, tmp / STATE_FILE)
            (tmp / CONFIG_FILE).write_text(to_yaml(cfg))
            for path in tmp.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            _swap_in(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return folder


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary folders of earlier saves of ``folder`` that were killed mid-write (the run lock
    guarantees that no other process is saving into this run)."""
    for stale in folder.parent.glob(f".{folder.name}.*"):
        if stale.is_dir():
            log.info("removing %s, left by a save that was interrupted", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _swap_in(tmp: Path, folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)  # an ``old`` left by a save killed between the renames is kept until this point
    if old.exists():
        shutil.rmtree(old)


def resolve_checkpoint(folder: Path) -> Path:
    """The folder to load: ``folder`` if complete, else the ``.old`` copy left by an interrupted save."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / MODEL_FILE).is_file() and (candidate / STATE_FILE).is_file():
            return candidate
    raise WeightsError(f"checkpoint {folder} not found or incomplete", "run the stage that writes it first")


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint's ``model.safetensors`` (one-line error if it is corrupt)."""
    path = Path(folder) / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as err:
        raise WeightsError(
            f"checkpoint weights {path} are corrupt or truncated ({str(err).splitlines()[0][:80]})",
            "delete that checkpoint folder and rerun the stage that writes it",
        ) from None


def check_identity(meta: Mapping[str, str], cfg: SharedConfig, path: Path) -> None:
    want = identity(cfg)
    bad = [f"{k}={meta.get(k)!r} (run has {want[k]!r})" for k in IDENTITY_KEYS if meta.get(k) != want[k]]
    if bad:
        raise WeightsError(
            f"checkpoint {path} was made for another run: {', '.join(bad)}",
            "load a checkpoint of this profile, subject and model size, or rerun the stage that writes it",
        )


def load_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line report of missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(tensors))
        if tensors[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise WeightsError(
            f"{source} does not fit the model: {'; '.join(problems)}",
            "check that the profile and model size match the ones that made the checkpoint",
        )
    module.load_state_dict(tensors, strict=True)


def load_parts(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], parts: Iterable[str], source: str) -> None:
    """Strictly load each submodule ``model.<part>`` from the ``<part>.``-prefixed ``tensors`` (load_strict)."""
    for part in parts:
        prefix = f"{part}."
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_strict(getattr(model, part), sub, f"{source} ({part})")


def load_checkpoint(
    folder: Path, module: torch.nn.Module, cfg: SharedConfig, check_run: bool = True
) -> dict[str, Any]:
    """Load weights strictly into ``module`` and return the training state (optimizer, scheduler, step, ...)."""
    path = resolve_checkpoint(folder)
    tensors, meta = read_weights(path)
    if check_run:
        check_identity(meta, cfg, path)
    load_strict(module, tensors, f"checkpoint {path}")
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"training state {path / STATE_FILE} is unreadable ({type(err).__name__})",
            "delete that checkpoint folder and rerun the stage that writes it",
        ) from None
