"""Write the CLIP-target cache: the image tokens that stages 1 and 2 train against, computed once and stored in fp16.

    python -m tasks_construction.cache_clip_targets --profile toy
    python -m tasks_construction.cache_clip_targets --profile paper --set data.clip_cache_frames=[2,3]   # stage 1 only

Upstream runs the bigG image tower on every training frame at every step, the most expensive part of a step. This
tool runs it once per cached frame and writes the cache into ``data_root/clip_targets/``; its format and its reader
(which stages 1 and 2 use with ``data.clip_targets=cache``) are in :mod:`utils.clip_target_cache`.

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

from models.foundation import Impl, build_role, foundation_impl, role_fingerprint
from utils.cli import OneLineParser, report_error
from utils.clip_target_cache import MANIFEST, VERSION, cache_dir, latents_file, tokens_file
from utils.config import load_config
from utils.data import load_tensor
from utils.data_catalog import SOURCES, frames_file
from utils.errors import DataError, NeuronsError
from utils.io import atomic_path, atomic_write_json, file_fingerprint
from utils.runs import setup_logging
from utils.stage_configs import Stage1Config

log = logging.getLogger(__name__)


@torch.no_grad()
def write_cache(
    data_root: str | Path,
    clip: Any,
    impl: Impl,
    weights_root: str | Path,
    frames: Sequence[int] = (),
    sources: Sequence[str] = SOURCES,
    batch_size: int = 32,
    vae: Any = None,
) -> Path:
    """Compute the image tokens of ``frames`` (all when empty) of every clip of ``sources`` with ``clip`` (and, with
    ``vae``, the latents of every frame) and write the cache; returns its manifest. The old manifest is removed
    first, so a half-written cache is never read."""
    root = Path(data_root)
    folder = cache_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    manifest: dict[str, Any] = {"version": VERSION, "dtype": "float16", "sources": {}}
    manifest["clip"] = role_fingerprint("clip", impl, weights_root)
    if vae is not None:
        manifest["vae"] = role_fingerprint("vae", impl, weights_root)
    for source in sources:
        fix = "python download_dataset.py (or --toy for the toy world)"
        video = load_tensor(root / frames_file(source), fix, mmap=True)  # (N, F, 3, R, R)
        keep = list(frames) or list(range(video.shape[1]))
        if min(keep) < 0 or max(keep) >= video.shape[1]:
            raise DataError(f"data.clip_cache_frames {keep} outside the {video.shape[1]} frames", "pick valid frames")
        manifest["frames"] = keep
        entry = {"frames_file": file_fingerprint(root / frames_file(source))}
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
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="toy", help="paper, toy, smoke or a YAML path (default toy)")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per image-tower call")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        cfg = load_config(Stage1Config, args.profile, args.overrides)
        device = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
        impl, weights = foundation_impl(cfg.model.size), cfg.paths.weights_root
        clip = build_role("clip", impl, weights, device)
        d = cfg.data
        vae = build_role("vae", impl, weights, device) if d.clip_cache_latents else None
        path = write_cache(cfg.paths.data_root, clip, impl, weights, d.clip_cache_frames, d.clip_cache_splits,
                           args.batch_size, vae)  # fmt: skip
        print(f"wrote {path}")
    except NeuronsError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
