"""Simulated fMRI: a ground-truth voxel-wise encoding model, the HRF, TR sampling and measurement noise.

Per subject, voxels are of four kinds (shuffled in voxel order):

* retinotopic: a Gaussian pRF over four feature maps - luminance, red-green and blue-yellow opponency and edge energy
  (gradient magnitude of luminance) - with a random channel mixture;
* motion energy: a Gaussian pRF over directional motion energy (right, left, down, up; the temporal difference times
  the spatial gradient of luminance) plus undirected flicker energy, with a preferred direction;
* category-selective: tuned to the visible area of one object category (or to one background scene), with weak
  random tuning to the others;
* pure noise: no signal.

Time: the neural time course is computed per frame (``fps``), demeaned per segment, convolved with nilearn's canonical
double-gamma HRF (``glover``/``spm``) and sampled once per TR at the centre of the volume's acquisition window. Volume
``k`` of a segment is paired with clip ``k - hrf_lag_trs``: like the NeuroClips release, which bakes a 4 s (2 TR) delay
into its tensors, we remove a ``hrf_lag_trs`` x TR lag (the stimulus is blank after the segment ends).

Noise: the noise-free signal ``s`` is z-scored per voxel and segment; one repeat is ``gain * s + N(0, 1)`` with
``gain**2 = snr * g``, ``g ~ U(0.25, 1.75)`` per voxel (0 for noise voxels), then z-scored per voxel, segment and
repeat as real preprocessing does per run. The model's prediction of a measurement (the "noise-free response" saved
with the data) is ``gain * s / sqrt(gain**2 + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import fftconvolve

from utils.toy_world import ToyWorldConfig

VOXEL_TYPES = {"noise": 0, "retinotopic": 1, "motion": 2, "category": 3}
COLOUR_CHANNELS = ("luminance", "red_green", "blue_yellow", "edge_energy")
MOTION_CHANNELS = ("right", "left", "down", "up", "flicker")


@dataclass
class EncodingModel:
    """Ground-truth parameters of one subject. V voxels, G = prf_grid, K + B = categories + backgrounds."""

    voxel_type: np.ndarray  # (V,) int64, codes in VOXEL_TYPES
    prf_x: np.ndarray  # (V,) float32 pRF centre, fraction of the frame width (left = 0)
    prf_y: np.ndarray  # (V,) float32 (top = 0)
    prf_sigma: np.ndarray  # (V,) float32 pRF size, fraction of the frame side
    colour_weights: np.ndarray  # (V, 4) float32 over COLOUR_CHANNELS (retinotopic voxels, else 0)
    motion_weights: np.ndarray  # (V, 5) float32 over MOTION_CHANNELS (motion voxels, else 0)
    category_tuning: np.ndarray  # (V, K + B) float32 (category voxels, else 0)
    gain: np.ndarray  # (V,) float32 signal amplitude per repeat, noise std is 1 (0 = noise voxel)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vars(self).items()}


def draw_encoding_model(cfg: ToyWorldConfig, subject: int) -> EncodingModel:
    """Random ground-truth tuning of ``subject`` (1-based), drawn from ``(seed, subject)``."""
    rng = np.random.default_rng([cfg.seed, 100, subject])
    v = cfg.voxels[subject - 1]
    counts = [round(f * v) for f in (cfg.frac_retinotopic, cfg.frac_motion, cfg.frac_category)]
    types = np.zeros(v, dtype=np.int64)
    types[: sum(counts)] = np.repeat([1, 2, 3], counts)
    types = rng.permutation(types)
    is_ret, is_mot, is_cat = types == 1, types == 2, types == 3
    sig_lo, sig_hi = np.where(is_mot[:, None], cfg.motion_sigma_range, cfg.prf_sigma_range).T
    sigma = np.exp(rng.uniform(np.log(sig_lo), np.log(sig_hi)))
    centre = rng.uniform(0.0, 1.0, size=(v, 2))
    colour = _dominant_mixture(rng, v, [0.35, 0.2, 0.2, 0.25], spread=0.3) * is_ret[:, None]
    motion = _dominant_mixture(rng, v, [0.25, 0.25, 0.25, 0.25, 0.0], spread=0.2)
    motion[:, 4] = rng.uniform(0.0, 0.5, size=v)
    motion *= is_mot[:, None]
    n_items = cfg.n_categories + cfg.n_backgrounds
    p_item = np.r_[
        np.full(cfg.n_categories, 0.75 / cfg.n_categories), np.full(cfg.n_backgrounds, 0.25 / cfg.n_backgrounds)
    ]
    tuning = _dominant_mixture(rng, v, p_item, spread=0.15) * is_cat[:, None]
    gain = np.sqrt(cfg.snr * rng.uniform(0.25, 1.75, size=v)) * (types > 0)
    f32 = np.float32
    return EncodingModel(
        types,
        centre[:, 0].astype(f32),
        centre[:, 1].astype(f32),
        sigma.astype(f32),
        colour.astype(f32),
        motion.astype(f32),
        tuning.astype(f32).reshape(v, n_items),
        gain.astype(f32),
    )


def _dominant_mixture(rng: np.random.Generator, v: int, p: list[float] | np.ndarray, spread: float) -> np.ndarray:
    """(v, len(p)) weights: one dominant channel (drawn with probabilities p) at 1, the others N(0, spread)."""
    p = np.asarray(p, dtype=np.float64)
    w = rng.normal(0.0, spread, size=(v, len(p)))
    w[np.arange(v), rng.choice(len(p), size=v, p=p / p.sum())] = 1.0
    return w


# ---------------------------------------------------------------------------------------------------------------------
# stimulus features per frame


def frame_features(frames: np.ndarray, segment_starts: np.ndarray, grid: int, chunk: int = 256) -> tuple:
    """Pooled feature maps of consecutive frames.

    frames: (T, 3, R, R) float32 in [0,1], consecutive in time; segment_starts: frame indices where a new segment
    starts (no motion signal across segments). Returns colour maps (T, 4, G*G) and motion maps (T, 5, G*G).
    """
    colour, motion = [], []
    starts = set(int(s) for s in segment_starts)
    prev_lum = None
    for c0 in range(0, len(frames), chunk):
        x = torch.from_numpy(frames[c0 : c0 + chunk])
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        lum = 0.299 * r + 0.587 * g + 0.114 * b
        gy, gx = torch.gradient(lum, dim=(1, 2))
        col = torch.stack([lum, r - g, b - 0.5 * (r + g), torch.sqrt(gx**2 + gy**2)], dim=1)
        before = torch.cat([lum[:1] if prev_lum is None else prev_lum, lum[:-1]])
        for s in starts:  # first frame of a segment: no previous frame
            if c0 <= s < c0 + len(lum):
                before[s - c0] = lum[s - c0]
        diff = lum - before
        mot = torch.stack(
            [F.relu(-diff * gx), F.relu(diff * gx), F.relu(-diff * gy), F.relu(diff * gy), diff.abs()], 1
        )
        colour.append(F.adaptive_avg_pool2d(col, grid).flatten(2))
        motion.append(F.adaptive_avg_pool2d(mot, grid).flatten(2))
        prev_lum = lum[-1:]
    return torch.cat(colour).numpy(), torch.cat(motion).numpy()


def prf_matrix(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, grid: int) -> np.ndarray:
    """Gaussian pRF weights (G*G, V), each column summing to 1."""
    centres = (np.arange(grid) + 0.5) / grid
    gy, gx = np.meshgrid(centres, centres, indexing="ij")
    d2 = (gx.reshape(-1, 1) - x[None]) ** 2 + (gy.reshape(-1, 1) - y[None]) ** 2
    w = np.exp(-d2 / (2 * sigma[None].astype(np.float64) ** 2))
    return (w / w.sum(axis=0, keepdims=True)).astype(np.float32)


def neural_response(model: EncodingModel, colour: np.ndarray, motion: np.ndarray, items: np.ndarray, grid: int):
    """Neural time course (T, V) from colour (T, 4, G*G), motion (T, 5, G*G) and item features (T, K + B).

    Each pRF voxel's channel mixture and pRF are folded into one weight vector over (channel, grid cell), so a voxel
    type costs a single matrix product over its own voxels.
    """
    prf = prf_matrix(model.prf_x, model.prf_y, model.prf_sigma, grid)  # (G*G, V)
    out = items @ model.category_tuning.T
    for code, feats, weights in ((1, colour, model.colour_weights), (2, motion, model.motion_weights)):
        sel = model.voxel_type == code
        w = weights[sel][:, :, None] * prf[:, sel].T[:, None, :]  # (V_sel, channels, G*G)
        out[:, sel] += feats.reshape(len(feats), -1) @ w.reshape(int(sel.sum()), -1).T
    return out


def item_features(category_area: np.ndarray, background_per_frame: np.ndarray, n_backgrounds: int) -> np.ndarray:
    """(T, K + B): square-root visible area of each category, one-hot background."""
    onehot = np.eye(n_backgrounds, dtype=np.float32)[background_per_frame]
    return np.concatenate([np.sqrt(category_area), onehot], axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# hemodynamics and measurement


def hrf_kernel(cfg: ToyWorldConfig) -> np.ndarray:
    """The canonical HRF sampled at the frame rate (nilearn), unit sum."""
    from nilearn.glm.first_level import glover_hrf, spm_hrf

    fn = glover_hrf if cfg.hrf_model == "glover" else spm_hrf
    return fn(t_r=1.0 / cfg.fps, oversampling=1, time_length=32.0)


def bold_per_clip(neural: np.ndarray, n_clips: int, cfg: ToyWorldConfig, hrf: np.ndarray) -> np.ndarray:
    """One segment: neural (n_clips*F, V) -> lag-aligned BOLD (n_clips, V), volume i + lag paired with clip i."""
    x = neural - neural.mean(axis=0, keepdims=True)
    extra = int(np.ceil((cfg.hrf_lag_trs + 1) * cfg.tr * cfg.fps))
    x = np.concatenate([x, np.zeros((extra, x.shape[1]), dtype=x.dtype)])
    bold = fftconvolve(x, hrf[:, None], mode="full", axes=0)[: len(x)]
    volume_times = (np.arange(n_clips) + cfg.hrf_lag_trs + 0.5) * cfg.tr
    return bold[np.round(volume_times * cfg.fps).astype(int)]


def zscore(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Z-score along ``axis``; constant series become 0."""
    sd = x.std(axis=axis, keepdims=True)
    return np.where(sd > 0, (x - x.mean(axis=axis, keepdims=True)) / np.where(sd > 0, sd, 1), 0).astype(np.float32)


def measure(
    signal: np.ndarray,
    gain: np.ndarray,
    n_repeats: int,
    segment_bounds: list[tuple[int, int]],
    rng: np.random.Generator,
) -> np.ndarray:
    """Noisy repeats (N, n_repeats, V) of z-scored signal (N, V), z-scored per voxel, segment and repeat."""
    out = np.empty((signal.shape[0], n_repeats, signal.shape[1]), dtype=np.float32)
    for r in range(n_repeats):
        noisy = gain[None] * signal + rng.standard_normal(signal.shape, dtype=np.float32)
        for a, b in segment_bounds:
            out[a:b, r] = zscore(noisy[a:b])
    return out


def expected_response(signal: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The model's prediction of a z-scored measurement: gain * s / sqrt(gain^2 + 1), (N, V)."""
    return (signal * (gain / np.sqrt(gain**2 + 1))[None]).astype(np.float32)
