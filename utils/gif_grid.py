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
"""

from __future__ import annotations

import logging
from pathlib import Path

import imageio.v2 as iio2
import imageio.v3 as iio3
import numpy as np
import torch
from torchvision.utils import make_grid

from utils.errors import ConfigError
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


def gif_grid_path(stage5_dir: Path, clip: int) -> Path:
    """Where stage 5 writes, and stage 6 reads, the GIF grid of test clip ``clip``."""
    return stage5_dir / GIF_GRID_DIR / f"{clip}.gif"


def upstream_grid_frames(gt: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """The uint8 frames ``save_videos_grid`` hands to imageio, before quantisation.

    gt: (F, 3, H, W) in [0, 1] (resized to S × S, bilinear, when H or W differ); pred: (F, 3, S, S) in [0, 1]
    → (F, S + 4, 2·S + 6, 3) uint8 (truncated, as upstream's ``astype(np.uint8)``); upstream: F = 6, S = 256 →
    (6, 260, 518, 3). Smaller S (the toy worlds) keep the same layout.
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
    gt = resize_frames_bilinear(gt.detach().cpu(), size)
    pred = pred.detach().cpu().float().clamp(0.0, 1.0)
    frames = []
    for g, p in zip(gt, pred, strict=True):  # one time step: the two images side by side
        grid = make_grid(torch.stack([g, p]), nrow=GRID_NROW, padding=GRID_PADDING)  # (3, 260, 518)
        frames.append((grid.permute(1, 2, 0) * 255).numpy().astype(np.uint8))
    return np.stack(frames)


def write_upstream_gif(path: Path, gt: torch.Tensor, pred: torch.Tensor, fps: float = GRID_FPS) -> None:
    """Write upstream's stage-5 GIF grid: gt (6, 3, H, W), pred (6, 3, 256, 256), both in [0, 1] → ``path``, each
    frame 260 × 518 [GT | prediction] (any square S: (S + 4) × (2·S + 6)), palette-quantised by imageio's GIF writer
    (Pillow's adaptive palette, as a real GIF write does)."""
    frames = upstream_grid_frames(gt, pred)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio2.mimsave(path, list(frames), format="GIF", duration=1000.0 / fps, loop=0)  # duration in ms per frame
    log.debug("GIF grid %s: %s", path, frames.shape)


def read_upstream_gif(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's stage-6 read: ``imageio.v3.imread`` → (F, 260, 518, 3) uint8, split in half along the width →
    (GT (F, 260, 259, 3), prediction (F, 260, 259, 3)) uint8, padding included (any S: halves (F, S + 4, S + 3, 3))."""
    video = np.asarray(iio3.imread(path))
    if video.ndim == 3:  # a one-frame GIF
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[2] != 2 * video.shape[1] - 2:
        raise ConfigError(
            f"{path}: a GIF grid of shape {video.shape}, expected (F, S + 4, 2·S + 6, 3), e.g. (6, {GRID_HEIGHT}, "
            f"{GRID_WIDTH}, 3)",
            "rewrite the stage-5 GIF grids (stage5.video.write_gif_grid)",
        )
    half = video.shape[2] // 2
    return video[:, :, :half].copy(), video[:, :, half:].copy()
