"""The CLIP-target cache: the image tokens that stages 1 and 2 train against, computed once and stored in fp16.

    python -m tasks_construction.cache_clip_targets --profile toy
    python -m tasks_construction.cache_clip_targets --profile paper --set data.clip_cache_frames=[2,3]   # stage 1 only

Upstream runs the bigG image tower on every training frame at every step, the most expensive part of a step. This
tool runs it once per cached frame and writes, into ``data_root/clip_targets/``:

    <source>_tokens.npy   float16 (N, K, T, D): N clips of GT_<source>_3fps.pt (every clip of the file, in file
                          order), K cached frames, T tokens, D width; a NumPy file read as a memory map
    manifest.json         the frames cached, the shape of each file, and the size and mtime of the frames file and
                          of the clip weights each was computed from

Stages 1 and 2 read it with ``data.clip_targets=cache`` and check first that it covers the frames they need and that
neither the frames nor the clip weights changed since; otherwise they stop and name this command. The cache does not
depend on the subject (the clips are the same for all three).

Which frames: ``data.clip_cache_frames`` (default ``()``, every frame). Stage 1 needs ``train.target_frame`` and, with
``alternate_target_frame``, the next frame (frames 2 and 3 by default); stage 2 needs every frame (its video SoftCLIP
compares all of them). ``data.clip_cache_splits`` chooses the source files (train: training and validation clips;
test: stage 1's final identification scores).

Disk cost: T·D·2 bytes per frame, 256 × 1664 × 2 = 851,968 bytes ≈ 0.85 MB at paper scale. All 6 frames of the
4,320 training clips take 22.1 GB, frames 2 and 3 only 7.4 GB, the 1,200 test clips 6.1 GB (all frames) or 1.0 GB
(frame 2). The toy world: 64 × 96 × 2 = 12 KB per frame, 62 MB in all.
"""

from __future__ import annotations

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


def frames_file(data_root: str | Path, source: str) -> Path:
    return Path(data_root) / f"GT_{source}_3fps.pt"


def clip_fingerprint(kind: str, weights_root: str | Path) -> dict[str, dict[str, Any]]:
    """Size and mtime of every file the clip role of ``kind`` is built from (paths relative to ``weights_root``)."""
    root = Path(weights_root)
    if kind == "paper":
        from models.foundation.catalog import entries, resolve

        files = [p for p in (resolve(e, root) for e in entries(["clip"])) if p is not None]
    else:
        files = sorted(p for p in (root / "clip").rglob("*") if p.is_file())
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
        self.fix = f"run `{self.command}`, or --set data.clip_targets=compute"
        path = cache_dir(data_root) / MANIFEST
        if not path.is_file():
            raise DataError(f"data.clip_targets=cache but there is no CLIP-target cache at {path.parent}", self.fix)
        self.manifest = load_json(path, self.fix)
        if self.manifest.get("version") != VERSION or self.manifest.get("dtype") != "float16":
            raise DataError(f"{path} is not a version-{VERSION} fp16 CLIP-target cache", self.fix)
        if self.manifest.get("clip") != clip_fingerprint(kind, weights_root):
            raise DataError(f"the CLIP-target cache {path.parent} was made with other clip weights", self.fix)
        self.frames: list[int] = list(self.manifest["frames"])
        self._arrays: dict[str, np.ndarray] = {}

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

    def array(self, source: str) -> np.ndarray:
        """The (N, K, T, D) float16 memory map of ``source``."""
        if source not in self._arrays:
            path = tokens_file(self.root, source)
            arr = np.load(path, mmap_mode="r")
            if list(arr.shape) != self.manifest["sources"][source]["shape"]:
                raise DataError(f"{path} holds {arr.shape}, its manifest says otherwise", self.fix)
            self._arrays[source] = arr
        return self._arrays[source]

    def read(self, source: str, rows: np.ndarray, frames: int | Sequence[int]) -> torch.Tensor:
        """fp16 tokens of source-file rows ``rows``: (b, T, D) for one frame, (b, k, T, D) for a sequence."""
        single = isinstance(frames, int | np.integer)
        pos = np.asarray([self.frames.index(int(f)) for f in ([frames] if single else frames)], dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        out = torch.from_numpy(np.ascontiguousarray(self.array(source)[rows[:, None], pos[None, :]]))
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
) -> Path:
    """Compute the image tokens of ``frames`` (all when empty) of every clip of ``sources`` with ``clip`` and write
    the cache; returns its manifest. The old manifest is removed first, so a half-written cache is never read."""
    from utils.data import load_tensor

    root = Path(data_root)
    folder = cache_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    manifest: dict[str, Any] = {"version": VERSION, "dtype": "float16", "clip": clip_fingerprint(kind, weights_root)}
    manifest["sources"] = {}
    for source in sources:
        fix = "python download_dataset.py (or --toy for the toy world)"
        video = load_tensor(frames_file(root, source), fix, mmap=True)  # (N, F, 3, R, R)
        keep = list(frames) or list(range(video.shape[1]))
        if min(keep) < 0 or max(keep) >= video.shape[1]:
            raise DataError(f"data.clip_cache_frames {keep} outside the {video.shape[1]} frames", "pick valid frames")
        manifest["frames"] = keep
        shape = (video.shape[0], len(keep), clip.num_tokens, clip.token_dim)
        log.info("caching CLIP targets of %s: %s fp16, %.2f GB", source, shape, np.prod(shape) * 2 / 1e9)
        with atomic_path(tokens_file(root, source)) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            for a in range(0, shape[0], batch_size):
                chunk = video[a : a + batch_size][:, keep]  # (b, K, 3, R, R)
                out[a : a + len(chunk)] = clip.image_tokens(chunk).to(torch.float16).cpu().numpy()
            out.flush()
            del out
        fingerprint = file_fingerprint(frames_file(root, source))
        manifest["sources"][source] = {"shape": list(shape), "frames_file": fingerprint}
    return atomic_write_json(folder / MANIFEST, manifest)


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
        path = write_cache(cfg.paths.data_root, clip, kind, weights, d.clip_cache_frames, d.clip_cache_splits,
                           args.batch_size)  # fmt: skip
        print(f"wrote {path}")
    except NeuronsError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
