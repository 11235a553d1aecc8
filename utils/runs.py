"""Run folders, the run lock and logging.

``run = <exp_root>/exp_<EXP>/subj_<SUBJ>/`` holds ``config/stage<k>.yaml`` (``config/stage<k>_<mode>.yaml`` for the
mode-dependent stages), ``logs/``, and one folder per stage:
``stage1/``, ``stage2/`` (mode-independent) and ``stage3_<mode>/`` ... ``diagnostics_<mode>/`` (mode-dependent, so
modes never overwrite each other).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.config import config_hash, run_dir, to_dict, to_yaml
from utils.errors import RunLockedError
from utils.io import atomic_write_text
from utils.stage_configs import SharedConfig
from utils.stages import STAGE_BY_KEY, STAGES

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Output files that a later stage, the report or bench/ reads too (writer → readers).
VIDEOS_FILE = "videos.safetensors"  # stage 5 → stage 6, the report
PROMPTS_FILE = "prompts.json"  # stage 5 → stage 6, the report
DIAGNOSTICS_FILE = "diagnostics.json"  # stage e → the report
TOY_QUALITY_FILE = "toy_quality.json"  # run root: bench/toy_quality.py → the report
IDENTIFICATION_FILE = "identification.json"  # stage 1 → stage 6, the report, bench/
BRAIN_STAGES = tuple(s.key for s in STAGES if not s.mode_dependent)  # a subject set trains these once, for all


@dataclass(frozen=True)
class RunPaths:
    root: Path
    mode: str
    brain_root: Path | None = None  # where stages 1-2 live when not in ``root``: a subject set's decoding pass

    @classmethod
    def from_config(cls, cfg: SharedConfig) -> RunPaths:
        root = run_dir(cfg)
        return cls(root, cfg.run.mode, root.parent if cfg.run.decode_subj else None)

    def stage_dir(self, stage: str) -> Path:
        root = self.brain_root if self.brain_root is not None and stage in BRAIN_STAGES else self.root
        return root / STAGE_BY_KEY[stage].folder_name(self.mode)

    def stage_dirs(self) -> dict[str, Path]:
        return {key: self.stage_dir(key) for key in STAGE_BY_KEY}

    @property
    def metrics_file(self) -> Path:
        """Stage 6's scores of this mode, at the run root (the report reads every mode's)."""
        return self.root / f"metrics_{self.mode}.json"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"


def read_identification(paths: RunPaths, subject: int) -> dict[str, Any] | None:
    """Stage 1's identification scores of ``subject`` ({split: scores}), or None before stage 1 has written them. A
    subject set's file holds one entry per subject (``{"subjects": {"<k>": {split: scores}}}``)."""
    path = paths.stage_dir("1") / IDENTIFICATION_FILE
    if not path.is_file():
        return None
    scores = json.loads(path.read_text())
    return scores.get("subjects", {}).get(str(subject)) if "subjects" in scores else scores


def rerun_hint(cfg: SharedConfig) -> str:
    """Format string (``{stage}``) telling the user how to rerun a stage of this run."""
    r = cfg.run
    return f"rerun stage {{stage}}: bash train_neurons.sh <GPU> {r.exp} {{stage}} {r.mode} {r.subj_text} {r.profile}"


def save_resolved_config(cfg: SharedConfig, stage: str, paths: RunPaths) -> Path:
    """Write ``config/stage<k>.yaml`` (``stage<k>_<mode>.yaml`` for the mode-dependent stages, so that the enhance
    and motion runs keep their own) atomically, and say so when it replaces a different config."""
    name = f"stage{stage}_{paths.mode}.yaml" if STAGE_BY_KEY[stage].mode_dependent else f"stage{stage}.yaml"
    target = paths.config_dir / name
    text = f"# resolved config of stage {stage}, hash {config_hash(cfg)}\n" + to_yaml(cfg)
    if target.exists() and target.read_text() != text:
        logging.getLogger(__name__).info("stage %s config changed since the last run; %s is replaced", stage, target)
    return atomic_write_text(target, text)


@contextlib.contextmanager
def run_lock(root: Path, stage: str) -> Iterator[Path]:
    """Hold an exclusive lock on the run folder; a second writer fails at once. The OS frees it if we die."""
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / ".lock"
    fh = open(lock_path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunLockedError(
            f"run folder {root} is in use by {holder}", "wait for it to finish or use another --exp"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} (stage {stage})\n")
        fh.flush()
        yield lock_path
    finally:
        fh.seek(0)
        fh.truncate()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def setup_logging(level: str, log_file: Path | None = None) -> None:
    """Log to stdout, and to ``log_file`` when given (the driver tees stdout itself and passes none)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers, force=True)
    for noisy in ("urllib3", "PIL", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_log_path(paths: RunPaths, stage: str) -> Path:
    return paths.logs_dir / f"stage{stage}_{time.strftime('%Y%m%d-%H%M%S')}.log"


def config_record(cfg: SharedConfig) -> dict[str, Any]:
    """What a manifest or checkpoint stores about the config."""
    return {"hash": config_hash(cfg), "config": to_dict(cfg)}
