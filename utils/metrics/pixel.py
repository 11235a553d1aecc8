"""Pixel-level frame metrics: SSIM and PSNR per frame, from float videos ``(N, F, 3, H, W)`` in [0, 1].

Both are vectorised re-implementations of scikit-image 0.26 (``skimage.metrics.structural_similarity`` /
``peak_signal_noise_ratio``) in float64 torch; ``tests/test_metrics.py`` checks them against skimage itself.
skimage filters the whole image (reflect borders) and then crops ``(win - 1) // 2`` pixels at every border before
averaging the SSIM map; a *valid* convolution computes exactly that cropped interior, so borders never matter.

protocol="neurons" (upstream ``eval_metrics.py``, spec §7, defect 29):
  frames -> uint8 by truncation (as the GIFs were written) -> ``rgb2gray`` (0.2125 R + 0.7154 G + 0.0721 B, /255)
  -> ``structural_similarity(gray, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1.0)``. With a 2-D grey image ``channel_axis=-1`` turns every image *column* into a channel, so the score
  is the mean of 1-D SSIMs down the columns (11-tap Gaussian, σ 1.5, population covariance), not a 2-D SSIM.
  PSNR: ``peak_signal_noise_ratio(uint8 pred, uint8 gt, data_range=255)`` on RGB.
protocol="standard" (MinD-Video / Mind-Animator ``ssim(img1, img2, data_range=255, channel_axis=-1)``):
  2-D SSIM on each RGB channel with skimage's defaults — 7×7 uniform window, sample covariance (49/48), K1 0.01,
  K2 0.03 — averaged over the 3 channels; computed on the float frames with data_range 1.0 (no uint8 quantisation,
  otherwise identical to their data_range=255 on uint8). PSNR on the float frames with data_range 1.0.
Identical frames give PSNR = inf in both protocols (as skimage / torchmetrics do). uint8 frames (e.g. the halves of
upstream's GIF grids, :mod:`utils.gif_grid`) are scored as stored: no truncation under "neurons", x / 255 under
"standard".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from utils.metrics._common import (
    FRAME_CHUNK,
    Protocol,
    check_min_size,
    check_protocol,
    check_videos,
    flat_frames,
    to_uint8_truncate,
    to_unit_float64,
)

GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray
K1, K2 = 0.01, 0.03
GAUSS_SIGMA, GAUSS_TRUNCATE = 1.5, 3.5  # skimage gaussian_weights=True
UNIFORM_WIN = 7  # skimage default window without gaussian_weights
FrameScore = Callable[[torch.Tensor, torch.Tensor, Protocol], torch.Tensor]  # (M, 3, H, W) twice → (M,)


def gaussian_window_1d(sigma: float = GAUSS_SIGMA, truncate: float = GAUSS_TRUNCATE) -> torch.Tensor:
    """scipy.ndimage's normalised 1-D Gaussian kernel, radius ``int(truncate·σ + 0.5)`` → (2r+1,) float64."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _valid_filter(t: torch.Tensor, wh: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
    """Separable correlation over valid positions: (B, C, H, W) → (B, C, H−kh+1, W−kw+1); wh (kh,), ww (kw,)."""
    h, w = t.shape[-2] - wh.numel() + 1, t.shape[-1] - ww.numel() + 1
    rows = t[..., :h, :] * wh[0].item()
    for k in range(1, wh.numel()):
        rows.add_(t[..., k : k + h, :], alpha=wh[k].item())
    out = rows[..., :w] * ww[0].item()
    for k in range(1, ww.numel()):
        out.add_(rows[..., k : k + w], alpha=ww[k].item())
    return out


def _ssim_valid(
    x: torch.Tensor, y: torch.Tensor, wh: torch.Tensor, ww: torch.Tensor, cov_norm: float, data_range: float
) -> torch.Tensor:
    """Mean SSIM map over valid windows of the separable window wh ⊗ ww (each summing to 1).
    x, y: (B, C, H, W) float64 → (B,)."""
    ux, uy = _valid_filter(x, wh, ww), _valid_filter(y, wh, ww)
    vx = cov_norm * (_valid_filter(x * x, wh, ww) - ux * ux)
    vy = cov_norm * (_valid_filter(y * y, wh, ww) - uy * uy)
    vxy = cov_norm * (_valid_filter(x * y, wh, ww) - ux * uy)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)  # equal-sized channels: mean over channels of per-channel means


def rgb2gray_uint8(frames_u8: torch.Tensor) -> torch.Tensor:
    """skimage ``rgb2gray`` of uint8 frames: (B, 3, H, W) uint8 → (B, 1, H, W) float64 in [0, 1]."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    return (frames_u8.double() / 255 * w).sum(dim=1, keepdim=True)


def _ssim_frames(pred: torch.Tensor, gt: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] or uint8 → (B,) float64."""
    if protocol == "neurons":
        wh, ww = gaussian_window_1d(), torch.ones(1, dtype=torch.float64)  # (11,) down each column only
        check_min_size(pred.shape[-2], wh.numel(), "SSIM (neurons) frame height", "use frames ≥ 11 px high")
        x, y = rgb2gray_uint8(to_uint8_truncate(pred)), rgb2gray_uint8(to_uint8_truncate(gt))
        return _ssim_valid(x, y, wh, ww, cov_norm=1.0, data_range=1.0)
    check_min_size(min(pred.shape[-2:]), UNIFORM_WIN, "SSIM (standard) frame side", "use frames ≥ 7×7 px")
    box = torch.full((UNIFORM_WIN,), 1.0 / UNIFORM_WIN, dtype=torch.float64)
    np_ = UNIFORM_WIN**2
    x, y = to_unit_float64(pred), to_unit_float64(gt)
    return _ssim_valid(x, y, box, box, cov_norm=np_ / (np_ - 1), data_range=1.0)


def _psnr_frames(pred: torch.Tensor, gt: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] → (B,) float64 dB."""
    if protocol == "neurons":
        x, y, data_range = to_uint8_truncate(pred).double(), to_uint8_truncate(gt).double(), 255.0
    else:
        x, y, data_range = to_unit_float64(pred), to_unit_float64(gt), 1.0
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)  # mse 0 → inf


def _per_frame(pred: torch.Tensor, gt: torch.Tensor, fn: FrameScore, protocol: str, what: str) -> torch.Tensor:
    protocol = check_protocol(protocol)
    check_videos(pred, gt, what)
    n, f = pred.shape[:2]
    p, g = flat_frames(pred), flat_frames(gt)
    out = [fn(p[i : i + FRAME_CHUNK], g[i : i + FRAME_CHUNK], protocol) for i in range(0, p.shape[0], FRAME_CHUNK)]
    return torch.cat(out).reshape(n, f) if out else torch.empty(n, f, dtype=torch.float64)


def ssim(pred: torch.Tensor, gt: torch.Tensor, protocol: Protocol = "standard") -> torch.Tensor:
    """Per-frame SSIM. pred, gt: (N, F, 3, H, W) float in [0, 1] → (N, F) float64. See the module doc for protocols."""
    return _per_frame(pred, gt, _ssim_frames, protocol, "SSIM")


def psnr(pred: torch.Tensor, gt: torch.Tensor, protocol: Protocol = "standard") -> torch.Tensor:
    """Per-frame PSNR in dB. pred, gt: (N, F, 3, H, W) float in [0, 1] → (N, F) float64 (inf where identical)."""
    return _per_frame(pred, gt, _psnr_frames, protocol, "PSNR")


def blurry_video_ssim(blurry: torch.Tensor, gt: torch.Tensor, protocol: Protocol = "standard") -> torch.Tensor:
    """SSIM of the stage-3 blurry videos against the ground truth: the same ``ssim`` (kept as its own name for the
    metrics JSON). blurry, gt: (N, F, 3, H, W) float in [0, 1] → (N, F) float64."""
    return ssim(blurry, gt, protocol)
