"""The CLIP-target cache: its format and its reader (the writer is :mod:`tasks_construction.cache_clip_targets`).

The cache holds the image tokens that stages 1 and 2 train against, computed once and stored in fp16, in
``data_root/clip_targets/``:

    <source>_tokens.npy   float16 (N, K, T, D): N clips of GT_<source>_3fps.pt (every clip of the file, in file
                          order), K cached frames, T tokens, D width; a NumPy file read as a memory map
    <source>_latents.npy  float16 (N, F, C, h, w): the VAE latents (posterior mode) of every frame, stage 2's
                          blurry-video targets (``data.clip_cache_latents``, on by default)
    manifest.json         the frames cached, the shape of each file, and the size and mtime of the frames file and
                          of the clip (and VAE) weights each was computed from

Stages 1 and 2 read it with ``data.clip_targets=cache`` and check first that it covers the frames they need and that
neither the frames nor the clip weights changed since; otherwise they stop and name the command that rebuilds it. The
cache does not depend on the subject (the clips are the same for all three).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.data import load_json
from utils.data_catalog import frames_file
from utils.errors import DataError
from utils.io import file_fingerprint

CACHE_DIR = "clip_targets"
MANIFEST = "manifest.json"
VERSION = 1

# role -> {path relative to weights_root: size and mtime} of the weight files the role is built from
WeightsFingerprint = Callable[[str], dict[str, dict[str, Any]]]


def cache_dir(data_root: str | Path) -> Path:
    return Path(data_root) / CACHE_DIR


def tokens_file(data_root: str | Path, source: str) -> Path:
    return cache_dir(data_root) / f"{source}_tokens.npy"


def latents_file(data_root: str | Path, source: str) -> Path:
    return cache_dir(data_root) / f"{source}_latents.npy"


def rebuild_command(profile: str) -> str:
    return f"python -m tasks_construction.cache_clip_targets --profile {profile}"


class ClipTargetCache:
    """Read access to a cache, checked against the frames and the weights of the clip (and VAE) role.

    ``fingerprint`` gives the current fingerprint of a role's weights (the roles the stage would otherwise run);
    ``profile`` goes into the messages.
    """

    def __init__(self, data_root: str | Path, fingerprint: WeightsFingerprint, profile: str = "<profile>"):
        self.root, self.command, self.fingerprint = Path(data_root), rebuild_command(profile), fingerprint
        self.fix = f"run `{self.command}`, or --set data.clip_targets=compute"
        path = cache_dir(data_root) / MANIFEST
        if not path.is_file():
            raise DataError(f"data.clip_targets=cache but there is no CLIP-target cache at {path.parent}", self.fix)
        self.manifest = load_json(path, self.fix)
        if self.manifest.get("version") != VERSION or self.manifest.get("dtype") != "float16":
            raise DataError(f"{path} is not a version-{VERSION} fp16 CLIP-target cache", self.fix)
        if self.manifest.get("clip") != fingerprint("clip"):
            raise DataError(f"the CLIP-target cache {path.parent} was made with other clip weights", self.fix)
        self.frames: list[int] = list(self.manifest["frames"])
        self._arrays: dict[Path, np.ndarray] = {}
        self._latents: dict[str, bool] = {}

    def require(self, source: str, frames: Sequence[int]) -> None:
        """Raise unless ``source`` is cached, current, and holds every frame of ``frames``."""
        entry = self.manifest.get("sources", {}).get(source)
        if entry is None:
            raise DataError(f"the CLIP-target cache {cache_dir(self.root)} has no {source!r} clips", self.fix)
        video = self.root / frames_file(source)
        if entry["frames_file"] != file_fingerprint(video):
            raise DataError(f"{video} changed after its CLIP targets were cached", self.fix)
        missing = sorted(set(frames) - set(self.frames))
        if missing:
            raise DataError(
                f"the CLIP-target cache holds frames {self.frames}, not {missing}",
                f"add them to data.clip_cache_frames (or leave it empty for all frames) and run `{self.command}`",
            )

    def array(self, path: Path, shape: list[int]) -> np.ndarray:
        """The float16 memory map at ``path``, checked against the ``shape`` its manifest records."""
        if path not in self._arrays:
            arr = np.load(path, mmap_mode="r")
            if list(arr.shape) != shape:
                raise DataError(f"{path} holds {arr.shape}, its manifest says {shape}", self.fix)
            self._arrays[path] = arr
        return self._arrays[path]

    def has_latents(self, source: str) -> bool:
        """Whether the VAE latents of ``source`` are cached (raises when they were made with other VAE weights)."""
        if source not in self._latents:
            cached = "latents_shape" in self.manifest.get("sources", {}).get(source, {})
            if cached and self.manifest.get("vae") != self.fingerprint("vae"):
                raise DataError(f"the VAE latents in {cache_dir(self.root)} come from other VAE weights", self.fix)
            self._latents[source] = cached
        return self._latents[source]

    def read_latents(self, source: str, rows: np.ndarray) -> torch.Tensor:
        """fp16 VAE latents (b, F, C, h, w) of every frame of source-file rows ``rows``."""
        arr = self.array(latents_file(self.root, source), self.manifest["sources"][source]["latents_shape"])
        return torch.from_numpy(np.ascontiguousarray(arr[np.asarray(rows, dtype=np.int64)]))

    def read(self, source: str, rows: np.ndarray, frames: int | Sequence[int]) -> torch.Tensor:
        """fp16 tokens of source-file rows ``rows``: (b, T, D) for one frame, (b, k, T, D) for a sequence."""
        single = isinstance(frames, int | np.integer)
        pos = np.asarray([self.frames.index(int(f)) for f in np.atleast_1d(frames)], dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        arr = self.array(tokens_file(self.root, source), self.manifest["sources"][source]["shape"])
        out = torch.from_numpy(np.ascontiguousarray(arr[rows[:, None], pos[None, :]]))
        return out[:, 0] if single else out
