"""One project error type with subclasses. Entry points print them as one line and exit non-zero.

Every message names the cause and the fix, e.g.
``DataError: missing data/toy_cortex/subj01_train_fmri.pt; build it with `python download_dataset.py --toy```.
The catalogue of expected failures and what each one prints is ``docs/failures.md``.
"""

from __future__ import annotations


class NeuronsError(Exception):
    """Base of all expected failures. ``exit_code`` is what the entry point returns."""

    exit_code = 1

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.cause if not self.fix else f"{self.cause}; fix: {self.fix}"
        return " ".join(text.split())  # never more than one line


class ConfigError(NeuronsError):
    """Bad profile, YAML, unknown key or ill-typed override."""

    exit_code = 2


class DataError(NeuronsError):
    """Missing or malformed dataset files."""


class WeightsError(NeuronsError):
    """Missing, corrupt or mismatched weights and checkpoints."""


class StageOrderError(NeuronsError):
    """An upstream stage's outputs are missing or stale."""


class RunLockedError(NeuronsError):
    """Another process is writing into the same run folder."""


class TrainingError(NeuronsError):
    """Training cannot go on, e.g. a non-finite loss; the last good checkpoint is kept."""


class StorageError(NeuronsError):
    """An output cannot be written: disk full, quota, read-only or permission denied. Nothing partial is left."""
