"""Image and video previews: [0, 1] float tensors to PNG / GIF files (imageio), panels side by side.

Previews are for people; stages hand tensors to each other in safetensors files, never through these images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.io import atomic_path


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` or ``(..., 1, H, W)`` in [0, 1] → ``(..., H, W, 3)`` uint8 (grey is repeated to RGB)."""
    x = images01.detach().float().cpu().clamp(0.0, 1.0)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return (x * 255.0).round().to(torch.uint8).movedim(-3, -1).numpy()


def fit_height(images: torch.Tensor, height: int) -> torch.Tensor:
    """``(N, C, H, W)`` → ``(N, C, height, W·height/H)``; bilinear (antialiased when shrinking), unchanged if equal."""
    if images.shape[-2] == height:
        return images
    width = max(1, round(images.shape[-1] * height / images.shape[-2]))
    return F.interpolate(images.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def side_by_side(*panels: torch.Tensor) -> torch.Tensor:
    """Panels ``(N, C_i, H_i, W_i)`` (C_i 1 or 3) → ``(N, 3, H, ΣW)`` at the height of the first panel."""
    height = panels[0].shape[-2]
    rgb = [p.float().expand(-1, 3, -1, -1) if p.shape[1] == 1 else p.float() for p in panels]
    return torch.cat([fit_height(p, height) for p in rgb], dim=-1).clamp(0.0, 1.0)


def save_png(path: str | os.PathLike, image01: torch.Tensor) -> Path:
    """One image ``(3, H, W)`` in [0, 1] → PNG (written atomically)."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, to_uint8(image01), extension=".png")
    return Path(path)


def save_gif(path: str | os.PathLike, frames01: torch.Tensor, fps: float) -> Path:
    """Frames ``(F, 3, H, W)`` in [0, 1] → a looping GIF at ``fps`` (written atomically)."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, to_uint8(frames01), extension=".gif", duration=1000.0 / fps, loop=0)
    return Path(path)
