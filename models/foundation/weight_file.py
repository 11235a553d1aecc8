"""``WeightFile``: one file of the ``paper`` profile, as each role's package lists it (``<role>.WEIGHTS``).

:mod:`models.foundation.catalog` gathers every role's entries into ``CATALOG``. Layout under ``weights_root``: single
upstream files keep their upstream names (``unclip6_epoch0_step110000.ckpt``, ``animatediff/v3_sd15_mm.ckpt``);
Hugging Face model repos live in ``<org>/<name>/`` exactly as ``hf download <org>/<name> --local-dir
<weights_root>/<org>/<name>`` writes them. A file whose place differs from its path in the repo (MindEye2's
``train_logs/final_subj01_pretrained_40sess_24bs/last.pth``, read as ``weights_root/last.pth``) is fetched into
``weights_root`` and then moved into place (:meth:`WeightFile.download_hint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GB = 1_000_000_000
MB = 1_000_000
KB = 1_000

# transformers checkpoints: the single-file name first, then the other layouts the hub uses
_HF_WEIGHT_ALTS = ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class WeightFile:
    """One file of the paper profile.

    ``relpath`` is relative to ``weights_root``. ``alternatives`` are other names that satisfy the entry (e.g. a
    ``.bin`` instead of a ``.safetensors``); an ``*.index.json`` alternative counts only when every shard it names is
    there. ``repo``/``filename``/``revision`` say where to get it (text only; nothing here downloads).
    """

    role: str
    relpath: str
    repo: str
    filename: str
    approx_bytes: int
    repo_type: str = "model"
    revision: str | None = None
    alternatives: tuple[str, ...] = ()
    note: str = ""

    @property
    def source(self) -> str:
        kind = "hf dataset" if self.repo_type == "dataset" else "hf"
        rev = f"@{self.revision[:8]}" if self.revision else ""
        return f"{kind} {self.repo}{rev}: {self.filename}"

    @property
    def moved(self) -> bool:
        """True when ``relpath`` does not end with the repo path ``filename``: the download lands in
        ``weights_root/<filename>`` and must be moved to ``weights_root/<relpath>``."""
        return not (self.relpath == self.filename or self.relpath.endswith("/" + self.filename))

    def local_dir(self, weights_root: str | Path) -> Path:
        """The ``--local-dir`` of the download: ``hf download`` writes the file to ``<local_dir>/<filename>``."""
        if self.moved:
            return Path(weights_root)
        return Path(weights_root) / self.relpath[: len(self.relpath) - len(self.filename)].rstrip("/")

    def download_hint(self, weights_root: str | Path) -> str:
        """A command that fetches this file into place, ``weights_root/<relpath>`` (shown to the user, never run)."""
        local_dir = self.local_dir(weights_root)
        opts = f" --repo-type {self.repo_type}" if self.repo_type != "model" else ""
        opts += f" --revision {self.revision}" if self.revision else ""
        hint = f"hf download {self.repo} {self.filename}{opts} --local-dir {local_dir}"
        if self.moved:
            hint += f" && mv {local_dir / self.filename} {Path(weights_root) / self.relpath}"
        return hint

    def candidates(self) -> tuple[str, ...]:
        return (self.relpath, *self.alternatives)


def hf_model(
    role: str,
    repo: str,
    files: dict[str, int],
    *,
    revision: str | None = None,
    alternatives: dict[str, tuple[str, ...]] | None = None,
) -> tuple[WeightFile, ...]:
    """The entries of Hugging Face model repo ``repo``: ``files`` maps each file name to its approximate size."""
    alternatives = alternatives or {}
    return tuple(
        WeightFile(
            role, f"{repo}/{name}", repo, name, size, revision=revision, alternatives=alternatives.get(name, ())
        )
        for name, size in files.items()
    )


def repo_files(repo: str, *names: str) -> tuple[str, ...]:
    """``names`` as paths under ``repo``'s folder (for ``alternatives``)."""
    return tuple(f"{repo}/{n}" for n in names)


def weights_alts(repo: str) -> tuple[str, ...]:
    """The other layouts of a transformers checkpoint in ``repo`` (``.bin``, sharded)."""
    return repo_files(repo, *_HF_WEIGHT_ALTS)
