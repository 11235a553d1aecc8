"""Stage hand-offs: every stage folder holds a ``manifest.json`` that the next stage checks before it reads.

A manifest records the stage, its config hash, the fingerprint (size and mtime) of every input file, the fingerprint,
shape and dtype of every output file, the stages it depends on and the wall time. A consumer calls
:func:`require_stage`, which refuses outputs that are missing, were modified after they were written, or are stale
because one of their inputs changed since (for instance a newer stage-2 checkpoint under old stage-3 outputs).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.errors import StageOrderError
from utils.io import atomic_write_json, file_fingerprint

if TYPE_CHECKING:  # manifests are read by light tools too: no torch import at run time
    import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


@dataclass
class StageRecorder:
    """Collects a stage's inputs and outputs and writes its manifest when the stage succeeds.

    ``begin()`` removes the previous manifest first, so that a stage that dies half way never leaves a folder that
    looks complete. Validate inputs *before* ``begin()``: a stage that refuses bad input must not touch old outputs.
    """

    stage: str
    out_dir: Path
    config_hash: str
    config: dict[str, Any] = field(default_factory=dict)
    depends_on: Sequence[str] = ()
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _t0: float = 0.0

    def begin(self) -> StageRecorder:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        old = self.out_dir / MANIFEST
        if old.exists():
            log.info("replacing the outputs of a previous stage-%s run in %s", self.stage, self.out_dir)
            old.unlink()
        self._t0 = time.time()
        return self

    def add_input(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.inputs[str(path.resolve())] = file_fingerprint(path)

    def add_inputs(self, paths: Iterable[str | os.PathLike]) -> None:
        for path in paths:
            self.add_input(path)

    def add_output(
        self, path: str | os.PathLike, shape: Sequence[int] | None = None, dtype: str | torch.dtype | None = None
    ) -> None:
        path = Path(path)
        entry: dict[str, Any] = file_fingerprint(path)
        if shape is not None:
            entry["shape"] = [int(s) for s in shape]
        if dtype is not None:
            entry["dtype"] = str(dtype).replace("torch.", "")
        self.outputs[_rel(path, self.out_dir)] = entry

    def finish(self) -> Path:
        manifest = {
            "schema": SCHEMA_VERSION,
            "stage": self.stage,
            "config_hash": self.config_hash,
            "config": self.config,
            "depends_on": list(self.depends_on),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self._t0)),
            "wall_time_s": round(time.time() - self._t0, 3),
            **self.extra,
        }
        return atomic_write_json(self.out_dir / MANIFEST, manifest)


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def stale_reasons(stage_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Why a stage's outputs can't be trusted: missing/modified outputs or changed inputs (empty if fresh)."""
    reasons = []
    for rel, want in manifest.get("outputs", {}).items():
        path = Path(rel) if Path(rel).is_absolute() else Path(stage_dir) / rel
        if not path.exists():
            reasons.append(f"output {path} is missing")
        elif _changed(path, want):
            reasons.append(f"output {path} was modified after the stage wrote it")
    for src, want in manifest.get("inputs", {}).items():
        path = Path(src)
        if not path.exists():
            reasons.append(f"input {path} no longer exists")
        elif _changed(path, want):
            reasons.append(f"input {path} changed after the stage ran")
    return reasons


def _changed(path: Path, want: dict[str, Any]) -> bool:
    have = file_fingerprint(path)
    return have["size"] != want.get("size") or have["mtime_ns"] != want.get("mtime_ns")


def require_stage(stage: str, stage_dir: Path, stage_dirs: dict[str, Path], rerun_hint: str) -> dict[str, Any]:
    """Return the manifest of ``stage`` if its outputs are complete and fresh, recursively through its dependencies.

    ``stage_dirs`` maps every stage key to its folder (to follow ``depends_on``); ``rerun_hint`` is a format string
    with ``{stage}`` that tells the user how to rerun a stage.
    """
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise StageOrderError(
            f"stage {stage} outputs not found in {stage_dir} (no valid {MANIFEST})", rerun_hint.format(stage=stage)
        )
    reasons = stale_reasons(stage_dir, manifest)
    if reasons:
        raise StageOrderError(
            f"stage {stage} outputs in {stage_dir} are stale: {reasons[0]}", rerun_hint.format(stage=stage)
        )
    for dep in manifest.get("depends_on", []):
        if dep in stage_dirs:
            require_stage(dep, stage_dirs[dep], stage_dirs, rerun_hint)
    return manifest
