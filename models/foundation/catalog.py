"""The weights catalog: every file the ``paper`` profile reads from ``weights_root``, where to get it, how big it is.

Each role's package lists its own files (``<role>.WEIGHTS``, :class:`~models.foundation.weight_file.WeightFile`);
``CATALOG`` gathers them in role order, after MindEye2's ``last.pth`` (role ``mindeye2``: the brain model's starting
point in stages 1 and 2 when ``train.init_from_mindeye2`` is on, not a foundation role with a builder).

Nothing here downloads. ``missing_weights`` / ``describe_missing`` / ``require_weights`` let a stage stop before any
work with one line naming every missing file; ``catalog_rows`` / ``catalog_table`` feed ``download_dataset.py
--weights`` (sizes on disk for the files present, the catalogue's for the others).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from models.foundation import (
    blip2,
    clip,
    clip_pcc,
    frame_classifier,
    gpt2,
    unclip,
    vae,
    video,
    video_classifier,
)
from models.foundation.weight_file import GB, KB, MB, WeightFile
from utils.errors import WeightsError

log = logging.getLogger(__name__)

# MindEye2's subject-1 model (spec mindeye2.md §10: 8.91 GB, fp32 weights only). The code reads weights_root/last.pth
# (models.mindeye2_keymap); the hub keeps it under train_logs/, so its download is moved into place.
MINDEYE2_WEIGHTS = WeightFile(
    "mindeye2",
    "last.pth",
    "pscotti/mindeyev2",
    "train_logs/final_subj01_pretrained_40sess_24bs/last.pth",
    8_910 * MB,
    repo_type="dataset",
)

CATALOG: tuple[WeightFile, ...] = (
    MINDEYE2_WEIGHTS,
    *clip.WEIGHTS,
    *vae.WEIGHTS,
    *unclip.WEIGHTS,
    *video.WEIGHTS,
    *gpt2.WEIGHTS,
    *blip2.WEIGHTS,
    *frame_classifier.WEIGHTS,
    *video_classifier.WEIGHTS,
    *clip_pcc.WEIGHTS,
)

ROLES: tuple[str, ...] = tuple(dict.fromkeys(e.role for e in CATALOG))


def entries(roles: list[str] | tuple[str, ...] | None = None) -> list[WeightFile]:
    """Catalog entries of ``roles`` (all roles when None)."""
    if roles is not None:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise WeightsError(f"unknown foundation role(s) {unknown}", f"use one of {list(ROLES)}")
    return [e for e in CATALOG if roles is None or e.role in roles]


def _index_complete(index: Path) -> bool:
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((index.parent / s).is_file() for s in shards)


def resolve(entry: WeightFile, weights_root: str | Path) -> Path | None:
    """The local file satisfying ``entry``, or None."""
    for rel in entry.candidates():
        path = Path(weights_root) / rel
        if path.is_file() and (not rel.endswith(".index.json") or _index_complete(path)):
            return path
    return None


def hf_dir(weights_root: str | Path, role: str) -> Path:
    """Local directory of a Hugging Face repo role (the folder of its catalog entries)."""
    first = entries([role])[0]
    return Path(weights_root) / first.relpath[: len(first.relpath) - len(first.filename)].rstrip("/")


def missing_weights(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> list[WeightFile]:
    """Entries of ``roles`` with no local file under ``weights_root``."""
    return [e for e in entries(roles) if resolve(e, weights_root) is None]


def _human(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.0f} MB" if n >= MB else f"{max(n // KB, 1)} KB"


def _missing_cause_and_fix(missing: list[WeightFile], weights_root: str | Path) -> tuple[str, str]:
    """What is missing (every file, its source and size) and how to get it, for a one-line error."""
    total = sum(e.approx_bytes for e in missing)
    files = ", ".join(f"{e.relpath} [{e.role}, {e.source}, ~{_human(e.approx_bytes)}]" for e in missing)
    cause = f"missing {len(missing)} weight file(s) under {weights_root} (~{_human(total)}): {files}"
    fix = (f"run `python download_dataset.py --weights` (or `hf download <repo> <file> --local-dir "
           f"{weights_root}/<dir>` per file)")  # fmt: skip
    return cause, fix


def describe_missing(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> str:
    """One line naming every missing file (with its source) and the fix; empty string when nothing is missing."""
    missing = missing_weights(weights_root, roles)
    if not missing:
        return ""
    return WeightsError(*_missing_cause_and_fix(missing, weights_root)).one_line()


def require_weights(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> None:
    """Raise :class:`WeightsError` (one line, every missing file) unless all files of ``roles`` are present."""
    missing = missing_weights(weights_root, roles)
    if missing:
        raise WeightsError(*_missing_cause_and_fix(missing, weights_root))


def human_bytes(n: int) -> str:
    """``n`` bytes for a person: ``9.9 GB``, ``548 MB``, ``70 KB``, ``432 B``."""
    return f"{n} B" if n < KB else _human(n)


def size_column(found: Path | None, approx_bytes: int) -> str:
    """The size of the file on disk when it is there; else ``~`` and the catalogue's size."""
    return human_bytes(found.stat().st_size) if found is not None else f"~{human_bytes(approx_bytes)}"


def catalog_rows(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """One row per file: role, file, source, size (on disk when present, else ``~`` the catalogue's), local path,
    present ("yes"/"no"), download command."""
    rows = []
    for e in entries(roles):
        found = resolve(e, weights_root)
        rows.append(
            {
                "role": e.role,
                "file": e.relpath,
                "source": e.source,
                "size": size_column(found, e.approx_bytes),
                "local_path": str(found or Path(weights_root) / e.relpath),
                "present": "yes" if found else "no",
                "download": e.download_hint(weights_root),
            }
        )
    return rows


def catalog_table(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> str:
    """The catalog as aligned text rows (header first): role, file, source, size, present, local path."""
    cols = ("role", "file", "source", "size", "present", "local_path")
    rows = [dict(zip(cols, cols))] + catalog_rows(weights_root, roles)
    widths = {c: max(len(r[c]) for r in rows) for c in cols}
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() for r in rows)
