"""The CLIP-target cache: the image tokens that stages 1 and 2 train against, computed once and stored in fp16.

    python -m tasks_construction.cache_clip_targets --profile toy
    python -m tasks_construction.cache_clip_targets --profile paper --set data.clip_cache_frames=[2,3]   # stage 1 only

Upstream runs the bigG image tower on every training frame at every step, the most expensive part of a step. This
tool runs it once per cached frame and writes, into ``data_root/clip_targets/``:

    <source>_tokens.npy   float16 (N, K, T, D): N clips of GT_<source>_3fps.pt (every clip of the file, in file
                          order), K cached frames, T tokens, D width; a NumPy file read as a memory map
    <source>_latents.npy  float16 (N, F, C, h, w): the VAE latents (posterior mode) of every frame, stage 2's
                          blurry-video targets (``data.clip_cache_latents``, on by default)
    manifest.json         the frames cached, the shape of each file, and the size and mtime of the frames file and
                          of the clip (and VAE) weights each was computed from

Stages 1 and 2 read it with ``data.clip_targets=cache`` and check first that it covers the frames they need and that
neither the frames nor the clip weights changed since; otherwise they stop and name this command. The cache does not
depend on the subject (the clips are the same for all three).

Which frames: ``data.clip_cache_frames`` (default ``()``, every frame). Stage 1 needs ``train.target_frame`` and, with
``alternate_target_frame``, the next frame (frames 2 and 3 by default); stage 2 needs every frame (its video SoftCLIP
compares all of them). ``data.clip_cache_splits`` chooses the source files (train: training and validation clips;
test: stage 1's final identification scores).

Disk cost: T·D·2 bytes per frame, 256 × 1664 × 2 = 851,968 bytes ≈ 0.85 MB at paper scale. All 6 frames of the
4,320 training clips take 22.1 GB, frames 2 and 3 only 7.4 GB, the 1,200 test clips 6.1 GB (all frames) or 1.0 GB
(frame 2). The toy world: 64 × 96 × 2 = 12 KB per frame, 62 MB in all. VAE latents: 4 × 28 × 28 × 2 = 6,272 bytes
per frame at paper scale, 163 MB for every training frame.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import DataError, NeuronsError
from utils.io import atomic_path, atomic_write_json, file_fingerprint

log = logging.getLogger(__name__)

CACHE_DIR = "clip_targets"
MANIFEST = "manifest.json"
VERSION = 1
SOURCES = ("train", "test")


def cache_dir(data_root: str | Path) -> Path:
    return Path(data_root) / CACHE_DIR


def tokens_file(data_root: str | Path, source: str) -> Path:
    return cache_dir(data_root) / f"{source}_tokens.npy"


def latents_file(data_root: str | Path, source: str) -> Path:
    return cache_dir(data_root) / f"{source}_latents.npy"


def frames_file(data_root: str | Path, source: str) -> Path:
    return Path(data_root) / f"GT_{source}_3fps.pt"


def role_fingerprint(role: str, kind: str, weights_root: str | Path) -> dict[str, dict[str, Any]]:
    """Size and mtime of every file foundation ``role`` of ``kind`` is built from (paths relative to
    ``weights_root``)."""
    root = Path(weights_root)
    if kind == "paper":
        from models.foundation.catalog import entries, resolve

        files = [p for p in (resolve(e, root) for e in entries([role])) if p is not None]
    else:
        files = sorted(p for p in (root / role).rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): file_fingerprint(p) for p in files}


def rebuild_command(profile: str) -> str:
    return f"python -m tasks_construction.cache_clip_targets --profile {profile}"


class ClipTargetCache:
    """Read access to a cache written by :func:`write_cache`, checked against the frames and the clip weights.

    ``kind``/``weights_root`` name the clip role the stage would otherwise run; ``profile`` goes into the messages.
    """

    def __init__(self, data_root: str | Path, kind: str, weights_root: str | Path, profile: str = "<profile>"):
        from utils.data import load_json

        self.root, self.command = Path(data_root), rebuild_command(profile)
        self.kind, self.weights_root = kind, weights_root
        self.fix = f"run `{self.command}`, or --set data.clip_targets=compute"
        path = cache_dir(data_root) / MANIFEST
        if not path.is_file():
            raise DataError(f"data.clip_targets=cache but there is no CLIP-target cache at {path.parent}", self.fix)
        self.manifest = load_json(path, self.fix)
        if self.manifest.get("version") != VERSION or self.manifest.get("dtype") != "float16":
            raise DataError(f"{path} is not a version-{VERSION} fp16 CLIP-target cache", self.fix)
        if self.manifest.get("clip") != role_fingerprint("clip", kind, weights_root):
            raise DataError(f"the CLIP-target cache {path.parent} was made with other clip weights", self.fix)
        self.frames: list[int] = list(self.manifest["frames"])
        self._arrays: dict[Path, np.ndarray] = {}
        self._latents: dict[str, bool] = {}

    def require(self, source: str, frames: Sequence[int]) -> None:
        """Raise unless ``source`` is cached, current, and holds every frame of ``frames``."""
        entry = self.manifest.get("sources", {}).get(source)
        if entry is None:
            raise DataError(f"the CLIP-target cache {cache_dir(self.root)} has no {source!r} clips", self.fix)
        if entry["frames_file"] != file_fingerprint(frames_file(self.root, source)):
            raise DataError(f"{frames_file(self.root, source)} changed after its CLIP targets were cached", self.fix)
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
            if cached and self.manifest.get("vae") != role_fingerprint("vae", self.kind, self.weights_root):
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
        pos = np.asarray([self.frames.index(int(f)) for f in ([frames] if single else frames)], dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        arr = self.array(tokens_file(self.root, source), self.manifest["sources"][source]["shape"])
        out = torch.from_numpy(np.ascontiguousarray(arr[rows[:, None], pos[None, :]]))
        return out[:, 0] if single else out


@torch.no_grad()
def write_cache(
    data_root: str | Path,
    clip: Any,
    kind: str,
    weights_root: str | Path,
    frames: Sequence[int] = (),
    sources: Sequence[str] = SOURCES,
    batch_size: int = 32,
    vae: Any = None,
) -> Path:
    """Compute the image tokens of ``frames`` (all when empty) of every clip of ``sources`` with ``clip`` (and, with
    ``vae``, the latents of every frame) and write the cache; returns its manifest. The old manifest is removed
    first, so a half-written cache is never read."""
    from utils.data import load_tensor

    root = Path(data_root)
    folder = cache_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    manifest: dict[str, Any] = {"version": VERSION, "dtype": "float16", "sources": {}}
    manifest["clip"] = role_fingerprint("clip", kind, weights_root)
    if vae is not None:
        manifest["vae"] = role_fingerprint("vae", kind, weights_root)
    for source in sources:
        fix = "python download_dataset.py (or --toy for the toy world)"
        video = load_tensor(frames_file(root, source), fix, mmap=True)  # (N, F, 3, R, R)
        keep = list(frames) or list(range(video.shape[1]))
        if min(keep) < 0 or max(keep) >= video.shape[1]:
            raise DataError(f"data.clip_cache_frames {keep} outside the {video.shape[1]} frames", "pick valid frames")
        manifest["frames"] = keep
        entry = {"frames_file": file_fingerprint(frames_file(root, source))}
        tokens = functools.partial(image_tokens, clip, keep)
        entry["shape"] = write_array(tokens_file(root, source), video, batch_size, tokens)
        if vae is not None:
            entry["latents_shape"] = write_array(latents_file(root, source), video, batch_size, vae.encode)
        manifest["sources"][source] = entry
    return atomic_write_json(folder / MANIFEST, manifest)


def image_tokens(clip: Any, frames: list[int], chunk: torch.Tensor) -> torch.Tensor:
    """(b, F, 3, R, R) clips → (b, K, T, D) tokens of their ``frames``."""
    return clip.image_tokens(chunk[:, frames])


def write_array(path: Path, video: torch.Tensor, batch_size: int, encode: Any) -> list[int]:
    """``encode`` every ``batch_size`` clips of ``video`` (N, F, 3, R, R) into an fp16 NumPy file at ``path``
    (written atomically); returns its shape."""
    first = encode(video[:1])
    shape = (video.shape[0], *first.shape[1:])
    log.info("caching %s: %s fp16, %.1f MB", path.name, shape, np.prod(shape) * 2 / 1e6)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        for a in range(0, shape[0], batch_size):
            chunk = video[a : a + batch_size]
            out[a : a + len(chunk)] = encode(chunk).to(torch.float16).cpu().numpy()
        out.flush()
        del out
    return list(shape)


def main(argv: Sequence[str] | None = None) -> int:
    from models.foundation import build_role
    from utils.cli import OneLineParser, report_error
    from utils.config import load_config
    from utils.runs import setup_logging

    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="toy", help="paper, toy, smoke or a YAML path (default toy)")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per image-tower call")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        cfg = load_config("1", args.profile, args.overrides)
        device = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
        kind, weights = cfg.model.size, cfg.paths.weights_root
        clip = build_role("clip", kind, weights, device)
        d = cfg.data
        vae = build_role("vae", kind, weights, device) if d.clip_cache_latents else None
        path = write_cache(cfg.paths.data_root, clip, kind, weights, d.clip_cache_frames, d.clip_cache_splits,
                           args.batch_size, vae)  # fmt: skip
        print(f"wrote {path}")
    except NeuronsError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
