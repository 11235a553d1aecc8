"""The three spatial resizes of the project, one function each, named by what they do.

* :func:`resize_maps_nearest`: any maps (masks, soft masks, latents), nearest neighbour (PyTorch's ``nearest``: output
  pixel i reads input pixel ⌊i · in / out⌋). Upstream's resize of its mask and latent maps.
* :func:`resize_masks_majority`: binary masks → binary masks at a new size, a pixel set when at least half of the area
  it covers is set (area average, then ≥ 0.5). The ground-truth key-object masks of every stage go through it
  (``docs/fidelity.md``).
* :func:`resize_frames_bilinear`: frames in [0, 1], bilinear (antialiased when shrinking), clamped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAJORITY = 0.5  # the covered fraction of a pixel's area from which a resized mask pixel is set


def resize_maps_nearest(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., C, H, W)`` (at least 3 axes) → ``(..., C, size, size)``, nearest neighbour, in the input's dtype.

    Axes before ``C`` are folded into the batch axis as a view, so the interpolation sees the input's own memory
    layout (a channels-last map stays channels-last, and the convolutions that read the result take the same path)."""
    if maps.dim() < 3:
        raise ValueError(f"resize_maps_nearest needs (..., C, H, W), got shape {tuple(maps.shape)}")
    flat = maps.flatten(0, -4) if maps.dim() > 4 else maps.unsqueeze(0) if maps.dim() == 3 else maps  # (N, C, H, W)
    out = F.interpolate(flat, size=(size, size), mode="nearest")
    return out.view(*maps.shape[:-2], size, size)


def resize_masks_majority(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Binary ``(..., H, W)`` (any non-zero value is set) → ``(..., size, size)`` float {0, 1}: a pixel is 1 when at
    least half of the input area it covers is set (a majority vote when shrinking, replication when growing by an
    integer factor)."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return (masks > 0).float()
    lead = masks.shape[:-2]
    x = F.interpolate(masks.reshape(-1, 1, *masks.shape[-2:]).float(), size=(size, size), mode="area")
    return (x >= MAJORITY).float().reshape(*lead, size, size)


def resize_frames_bilinear(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., 3, H, W)`` in [0, 1] → float32 ``(..., 3, size, size)``: bilinear (antialiased when shrinking),
    clamped to [0, 1]; unchanged (as float32) when already ``size``."""
    if frames.shape[-1] == size and frames.shape[-2] == size:
        return frames.float()
    lead = frames.shape[:-3]
    x = F.interpolate(frames.reshape(-1, *frames.shape[-3:]).float(), size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)  # fmt: skip
    return x.clamp(0.0, 1.0).reshape(*lead, *x.shape[1:])
