"""Upstream's stage-5 GIF grid (spec §6 step 6) and the way upstream's stage 6 reads it back (spec §7, defect 29).

Upstream calls AnimateDiff's ``save_videos_grid`` on a ``(2, 3, 6, 256, 256)`` batch — the ground-truth clip (frames
0..5 resized 224→256) and the generated frames 4, 6, …, 14 — rearranged to ``t b c h w``. For every frame index t,
``torchvision.utils.make_grid(x_t, nrow=6, padding=2)`` lays out the **two** images of that time step: ``nrow`` is the
number of images per row, so 2 images with ``nrow=6`` make one row of two, black (0) padding of 2 px around and
between them: ``(3, 2 + 256 + 2, 2 + 256 + 2 + 256 + 2) = (3, 260, 518)``. (Twelve images with ``nrow=6`` would give
518×1550, not the 260×518 the spec states.) The grid is cast with ``(x * 255).numpy().astype(np.uint8)`` — a
truncation, not a rounding — and ``imageio.mimsave(path, frames, fps=8)`` palette-quantises every frame.

Reading (``run_metrics.py``): ``imageio.v3.imread`` → ``(6, 260, 518, 3)`` uint8, split in half along the width:
GT = columns 0..258 (2 px padding left, 1 px right), prediction = columns 259..517 (1 px left, 2 px right), both with
2 px of padding at the top and the bottom. The two halves are therefore misaligned by one pixel horizontally.

File names: upstream's stage 5 names each grid ``<idx>-<prompt words joined by '-'>.gif`` (the test-clip index, then
the prompt, slashes removed; spec §6 step 6), this project's stage 5 ``<idx>.gif`` (:func:`gif_grid_path`); the
folder scorer :mod:`pipeline.score_videos` reads either. :func:`upstream_gif_halves` makes, without a file, the halves
that upstream's stage 6 would read from the grid of a GT clip and a prediction (the same writer and reader in memory).
"""

from __future__ import annotations

import logging
from pathlib import Path

import imageio.v2 as iio2
import imageio.v3 as iio3
import numpy as np
import torch
from torchvision.utils import make_grid

from utils.errors import ConfigError, DataError
from utils.io import atomic_write_bytes
from utils.resize import resize_frames_bilinear

log = logging.getLogger(__name__)

GRID_SIZE = 256  # side of each image in the grid (upstream's generation resolution)
GRID_FRAMES = 6  # frames per GIF (the clip length)
GRID_NROW = 6  # make_grid's nrow (images per row; with 2 images per time step it only fixes one row)
GRID_PADDING = 2  # make_grid's default padding (pad value 0: black)
GRID_HEIGHT = GRID_SIZE + 2 * GRID_PADDING  # 260
GRID_WIDTH = 2 * GRID_SIZE + 3 * GRID_PADDING  # 518
HALF_WIDTH = GRID_WIDTH // 2  # 259: upstream's split point
GRID_FPS = 8.0
GIF_GRID_DIR = "gif_grid"  # under stage5_<mode>/: one <clip>.gif per test clip (stage5.video.write_gif_grid)
REWRITE_FIX = "rewrite the stage-5 GIF grids (stage5.video.write_gif_grid)"


def gif_grid_path(stage5_dir: Path, clip: int) -> Path:
    """Where stage 5 writes, and stage 6 reads, the GIF grid of test clip ``clip``."""
    return stage5_dir / GIF_GRID_DIR / f"{clip}.gif"


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) float in [0, 1] → uint8 by truncation (upstream's ``(x * 255).numpy().astype(np.uint8)``);
    uint8 passes unchanged (a float round trip k / 255 · 255 could truncate k to k − 1)."""
    return x if x.dtype == torch.uint8 else (x.detach().cpu().float().clamp(0.0, 1.0) * 255).to(torch.uint8)


def upstream_grid_frames(gt: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """The uint8 frames ``save_videos_grid`` hands to imageio, before quantisation.

    gt: (F, 3, H, W) in [0, 1] (resized to S × S, bilinear, when H or W differ); pred: (F, 3, S, S) in [0, 1] or uint8
    → (F, S + 4, 2·S + 6, 3) uint8 (truncated, as upstream's ``astype(np.uint8)``; truncating each image before
    ``make_grid`` equals truncating the grid, whose padding is 0); upstream: F = 6, S = 256 → (6, 260, 518, 3).
    Smaller S (the toy worlds) keep the same layout.
    """
    if gt.ndim != 4 or pred.ndim != 4 or gt.shape[:2] != pred.shape[:2] or gt.shape[1] != 3:
        raise ConfigError(
            f"GIF grid: ground truth {tuple(gt.shape)}, prediction {tuple(pred.shape)}: both must be (F, 3, H, W)",
            "pass the clip's frames and the matching generated frames",
        )
    size = int(pred.shape[-1])
    if int(pred.shape[-2]) != size:
        raise ConfigError(f"GIF grid: the prediction is {tuple(pred.shape[-2:])}, not square",
                          "generate square frames (stage5 video.resolution)")  # fmt: skip
    gt8 = _to_uint8(resize_frames_bilinear(gt.detach().cpu(), size))
    pred8 = _to_uint8(pred.detach().cpu())
    frames = []
    for g, p in zip(gt8, pred8, strict=True):  # one time step: the two images side by side
        grid = make_grid(torch.stack([g, p]), nrow=GRID_NROW, padding=GRID_PADDING)  # (3, 260, 518) uint8
        frames.append(grid.permute(1, 2, 0).numpy())
    return np.stack(frames)


def encode_gif(frames: np.ndarray, fps: float = GRID_FPS) -> bytes:
    """(F, H, W, 3) uint8 → GIF bytes, palette-quantised by imageio's GIF writer as ``imageio.mimsave`` does."""
    return bytes(iio2.mimsave("<bytes>", list(frames), format="GIF", duration=1000.0 / fps, loop=0))


def write_upstream_gif(path: Path, gt: torch.Tensor, pred: torch.Tensor, fps: float = GRID_FPS) -> None:
    """Write upstream's stage-5 GIF grid: gt (6, 3, H, W), pred (6, 3, 256, 256), both in [0, 1] → ``path``, each
    frame 260 × 518 [GT | prediction] (any square S: (S + 4) × (2·S + 6)), palette-quantised by imageio's GIF writer
    (Pillow's adaptive palette, as a real GIF write does); written atomically."""
    frames = upstream_grid_frames(gt, pred)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_gif(frames, fps))
    log.debug("GIF grid %s: %s", path, frames.shape)


def upstream_gif_halves(gt: torch.Tensor, pred: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What upstream's stage 6 reads from the grid that its stage 5 writes of ``gt`` (F, 3, H, W) in [0, 1] and
    ``pred`` (F, 3, S, S) in [0, 1] or uint8, made in memory by the same writer and reader as
    :func:`write_upstream_gif` and :func:`read_upstream_gif` → (GT, prediction) halves, each (F, S + 4, S + 3, 3)."""
    return read_upstream_gif(encode_gif(upstream_grid_frames(gt, pred)))


def read_upstream_gif(path: Path | bytes, fix: str = REWRITE_FIX) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's stage-6 read: ``imageio.v3.imread`` → (F, 260, 518, 3) uint8, split in half along the width →
    (GT (F, 260, 259, 3), prediction (F, 260, 259, 3)) uint8, padding included (any S: halves (F, S + 4, S + 3, 3)).
    ``path``: a file or the GIF's bytes; ``fix``: the fix a malformed grid's error names."""
    where = "the GIF bytes" if isinstance(path, bytes) else str(path)
    try:
        video = np.asarray(iio3.imread(path, extension=".gif") if isinstance(path, bytes) else iio3.imread(path))
    except (OSError, ValueError, SyntaxError) as err:  # Pillow: not a GIF, truncated
        raise DataError(f"{where} is not a readable GIF ({str(err).splitlines()[0][:80]})", fix) from err
    if video.ndim == 3:  # a one-frame GIF
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[2] != 2 * video.shape[1] - 2:
        raise ConfigError(
            f"{where}: a GIF grid of shape {video.shape}, expected (F, S + 4, 2·S + 6, 3), e.g. (6, {GRID_HEIGHT}, "
            f"{GRID_WIDTH}, 3)",
            fix,
        )
    half = video.shape[2] // 2
    return video[:, :, :half].copy(), video[:, :, half:].copy()


def grid_images(gt_half: np.ndarray, pred_half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two S × S images inside the halves (F, S + 4, S + 3, 3) of :func:`read_upstream_gif`, padding removed:
    rows 2 .. S + 1 of both, columns 2 .. S + 1 of the GT half, 1 .. S of the prediction half → (F, S, S, 3) twice."""
    size = int(gt_half.shape[1]) - 2 * GRID_PADDING
    rows = slice(GRID_PADDING, GRID_PADDING + size)
    gt_left, pred_left = GRID_PADDING, GRID_PADDING - 1  # the split falls 1 px into the middle padding
    return (gt_half[:, rows, gt_left : gt_left + size].copy(), pred_half[:, rows, pred_left : pred_left + size].copy())
