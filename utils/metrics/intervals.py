"""95 % intervals of the stage-6 metrics, and whether a metric lies above chance.

Clip bootstrap (every stage-6 metric): ``resamples`` draws of the N clips with replacement, all from one
``numpy.random.default_rng(seed).integers(0, N, (resamples, N))`` array, so every metric of one evaluation is
resampled on the same draws. The statistic is recomputed on each draw, vectorised: the (resamples, N) matrix of how
often each clip is drawn times per-clip values or counts. The interval is the 2.5th and 97.5th percentile of the
resampled statistic (numpy's linear interpolation): a percentile interval of the test-set value over clip sampling.

* per-clip metrics (SSIM, PSNR, CLIP-pcc, blurry-video SSIM, key-object Dice, N-way accuracy): the statistic is the
  mean over clips of the per-clip value; frame-level values (N, F) are first averaged per clip (the same mean in both
  protocols). For N-way accuracy the per-clip value is the clip's hit rate over its ``n_trials`` seeded trials, so the
  interval covers the clips (with their trial noise), not the trials of one fixed clip.
* corpus metrics (concept F1, caption BLEU): the corpus value of each draw from the per-clip counts
  (:func:`utils.metrics.tasks.concept_f1_counts`, :func:`utils.metrics.tasks.caption_bleu_counts`).

No interval (None) when ``resamples`` is 0 or some per-clip value is not finite (PSNR of identical frames = inf).
``above_chance`` is True only when the interval exists and its lower bound is above the chance level.
``above_shuffled`` (N-way entries, :func:`mark_shuffled`) is the same test against the shuffled chance, on the paired
per-clip differences: the clip-bootstrap interval of their mean lies above 0.

Identification rates (brain-side top-1 of N test clips): :func:`wilson_interval` with n = the number of clips. For the
all-way rate (a fraction of clips) that is the usual binomial interval; for N-way rates averaged over trials it is
conservative, since a per-clip rate r in [0, 1] with mean p has variance at most p(1 − p).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

CI_LEVEL = 0.95
CI_KEY = "ci95"


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float64: how often each of n clips is drawn in each seeded bootstrap draw (rows sum to n)."""
    if resamples <= 0 or n <= 0:
        return np.zeros((0, max(n, 0)))
    idx = np.random.default_rng(seed).integers(0, n, (resamples, n))
    flat = (idx + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def percentile_interval(samples: np.ndarray | torch.Tensor, level: float = CI_LEVEL) -> list[float] | None:
    """[lo, hi] percentile interval of resampled statistics (B,); None when there are none or one is not finite."""
    s = np.asarray(samples, dtype=np.float64)
    if s.size == 0 or not np.isfinite(s).all():
        return None
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def mean_interval(values: torch.Tensor | np.ndarray, resamples: int, seed: int, level: float = CI_LEVEL
                  ) -> list[float] | None:  # fmt: skip
    """Clip-bootstrap interval of the mean over clips. values: (N,) per clip or (N, F) per frame (averaged per
    clip first)."""
    v = np.asarray(values, dtype=np.float64)
    v = v.mean(axis=1) if v.ndim == 2 else v
    if resamples <= 0 or not np.isfinite(v).all():
        return None
    counts = resample_counts(len(v), resamples, seed)  # (B, N)
    return percentile_interval(counts @ v / len(v), level)


def corpus_entry(value: float, resampled: np.ndarray | torch.Tensor, n: int) -> dict[str, Any]:
    """A corpus metric's entry: ``value`` on all n clips, ``std`` (population) and ``ci95`` of its values on the
    bootstrap draws (B,), both None without draws."""
    r = np.asarray(resampled, dtype=np.float64)
    return {"mean": float(value), "std": float(r.std()) if r.size else None, "n": n, CI_KEY: percentile_interval(r)}


def is_above_chance(interval: list[float] | None, chance: float) -> bool:
    return interval is not None and interval[0] > chance


def mark_chance(entry: dict[str, Any], chance: float) -> dict[str, Any]:
    """Add ``chance`` and, when the entry has an interval field, ``above_chance`` (lower bound > chance)."""
    entry["chance"] = chance
    if CI_KEY in entry:
        entry["above_chance"] = is_above_chance(entry[CI_KEY], chance)
    return entry


def mark_shuffled(entry: dict[str, Any], acc: torch.Tensor, shuffled: torch.Tensor | None, resamples: int,
                  seed: int) -> dict[str, Any]:  # fmt: skip
    """Add an N-way entry's shuffled chance (:func:`utils.metrics.semantic.shuffled_n_way_accuracy`):
    ``chance_shuffled`` (its mean), ``ci95_vs_shuffled`` (clip-bootstrap interval of the mean paired difference
    accuracy − shuffled accuracy) and ``above_shuffled`` (that interval's lower bound > 0). acc, shuffled: (N,) or
    (N, F); nothing is added when ``shuffled`` is None."""
    if shuffled is None:
        return entry
    ci = mean_interval((acc - shuffled).double(), resamples, seed)
    entry["chance_shuffled"] = float(shuffled.double().mean())
    entry[f"{CI_KEY}_vs_shuffled"] = ci
    entry["above_shuffled"] = is_above_chance(ci, 0.0)
    return entry


def wilson_interval(p: float, n: int, level: float = CI_LEVEL) -> list[float] | None:
    """Wilson score interval [lo, hi] of a rate p over n trials (None when n < 1 or p is not in [0, 1])."""
    if n < 1 or not 0.0 <= p <= 1.0:
        return None
    z = NormalDist().inv_cdf((1 + level) / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]
