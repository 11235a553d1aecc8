"""Copies of a finished run that share its first stages, and the driver run of the later stages on a copy (used by
``bench/stage5_init.py`` and ``bench/info_ladder.py``).

A copy links (or copies, across file systems) the shared stage folders and the saved configs into a fresh run folder,
keeping every file's bytes and modification time, so the copied manifests stay fresh. The later stages then run
through ``train_neurons.sh`` with the copy's own overrides, and their manifests record them.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.config import load_config  # noqa: E402
from utils.runs import RunPaths  # noqa: E402
from utils.stage_configs import Stage6Config  # noqa: E402

log = logging.getLogger("run_copies")


def paths_of(profile: str, exp: str, subj: int, mode: str, overrides: list[str]) -> RunPaths:
    cli = {"subj": subj, "exp": exp, "mode": mode}
    return RunPaths.from_config(load_config(Stage6Config, profile, [*overrides, "run.device=cpu"], cli))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same bytes and mtime, no space; a rerun replaces the file (atomic rename), not the inode
    except OSError:
        shutil.copy2(src, dst)


def copy_stages(src: RunPaths, dst: RunPaths, stages: tuple[str, ...]) -> None:
    """``stages`` and the saved configs of ``src`` into ``dst`` (a fresh run folder; an existing one is kept)."""
    if dst.root.exists():
        log.info("%s exists: reusing its stages %s", dst.root, ", ".join(stages))
        return
    for stage in stages:
        folder = src.stage_dir(stage)
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is missing; run stages {', '.join(stages)} of {src.root} first")
        shutil.copytree(folder, dst.stage_dir(stage), copy_function=_link_or_copy)
    shutil.copytree(src.config_dir, dst.config_dir)


def run_stages(profile: str, exp: str, subj: int, mode: str, stages: str, overrides: list[str]) -> float:
    """``bash train_neurons.sh cpu <exp> <stages> <mode> <subj> <profile>`` with ``overrides``; wall seconds."""
    env = {**os.environ, "NEURONS_SET": shlex.join(overrides), "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "train_neurons.sh"), "cpu", exp, stages, mode, str(subj), profile]
    log.info("running %s with %s", " ".join(cmd), overrides)
    t0 = time.time()
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        raise SystemExit(f"error: stages {stages} of exp {exp} failed; see its logs/")
    return time.time() - t0


def run_copy(
    base: tuple[str, str, int, str], exp: str, shared: tuple[str, ...], stages: str, base_set: list[str],
    overrides: list[str],
) -> dict[str, Any]:
    """Copy ``shared`` stages of run ``base`` = (profile, exp, subj, mode) to ``exp`` and run ``stages`` there with
    ``overrides`` (``base_set`` resolves the source run); -> ``{exp, wall_s, protocols}`` of its stage 6."""
    profile, src_exp, subj, mode = base
    dst = paths_of(profile, exp, subj, mode, overrides)
    copy_stages(paths_of(profile, src_exp, subj, mode, base_set), dst, shared)
    wall = run_stages(profile, exp, subj, mode, stages, overrides)
    report = json.loads(dst.metrics_file.read_text())
    return {"exp": exp, "wall_s": round(wall, 1), "protocols": report["protocols"]}
