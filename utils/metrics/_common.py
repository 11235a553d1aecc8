"""Shared input checks and small conversions of the metric library (no metric lives here)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from utils.errors import ConfigError, DataError

Protocol = Literal["neurons", "standard"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
FRAME_CHUNK = 16  # frames per vectorised SSIM/PSNR step (bounds float64 temporaries to a few hundred MB at 256²)


def check_protocol(protocol: str) -> Protocol:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown metric protocol {protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
    return protocol


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise DataError(
            f"{what}: prediction shape {tuple(a.shape)} != ground-truth shape {tuple(b.shape)}",
            "pass predictions and ground truth for the same samples, frames and resolution (resize beforehand)",
        )


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise DataError(f"{what} contains NaN or inf", "fix the producer of these values before scoring")


def check_videos(pred: torch.Tensor, gt: torch.Tensor, what: str = "videos") -> None:
    """Both ``(N, F, 3, H, W)`` with the same shape: floating point in [0, 1], or uint8 (0..255)."""
    check_same_shape(pred, gt, what)
    if pred.ndim != 5 or pred.shape[2] != 3:
        raise DataError(
            f"{what}: expected (N, F, 3, H, W) RGB videos, got shape {tuple(pred.shape)}",
            "stack frames as (videos, frames, channels, height, width); add a frame axis of 1 for still images",
        )
    for name, x in (("prediction", pred), ("ground truth", gt)):
        if x.dtype == torch.uint8:  # frames as stored (e.g. read from upstream's GIF grids): always in range
            continue
        if not x.is_floating_point():
            raise DataError(f"{what}: {name} has dtype {x.dtype}", "pass float frames in [0, 1] or uint8 frames")
        check_finite(x, f"{what} {name}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise DataError(
                f"{what}: {name} values span [{x.min().item():.4g}, {x.max().item():.4g}], outside [0, 1]",
                "map decoder outputs to [0, 1] first, e.g. (x / 2 + 0.5).clamp(0, 1)",
            )


def check_min_size(n: int, need: int, what: str, fix: str) -> None:
    if n < need:
        raise DataError(f"{what}: have {n}, need at least {need}", fix)


def to_uint8_truncate(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 as upstream writes its GIFs (AnimateDiff ``save_videos_grid``: float32 ``x*255`` cast to
    uint8, i.e. truncation, not rounding); uint8 frames pass through unchanged."""
    return x if x.dtype == torch.uint8 else (x.float() * 255).to(torch.uint8)


def to_unit_float64(x: torch.Tensor) -> torch.Tensor:
    """Frames as float64 in [0, 1]: uint8 divided by 255, floats cast."""
    return x.double() / 255 if x.dtype == torch.uint8 else x.double()


def flat_frames(videos: torch.Tensor) -> torch.Tensor:
    """(N, F, C, H, W) -> (N·F, C, H, W)."""
    return videos.reshape(-1, *videos.shape[2:])
