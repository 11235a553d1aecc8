"""N-way identification accuracy and the ridge-regression baseline decoder (voxels -> per-clip features).

Identification: each query (e.g. a brain-predicted feature vector or a measured response) is compared by Pearson
correlation with its own target and ``ways - 1`` distinct random other targets; it is correct when its own target
correlates strictly best. Averaged over all queries and ``n_trials`` seeded draws; all-way compares with every target.

:func:`ridge_baseline` fits the decoder on one subject's training clips and identifies its val and test clips (the
CLI over several subjects is ``python -m tasks_construction.ridge_baseline``; the run report reads it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from utils.data import BrainVideoData

DEFAULT_ALPHAS = tuple(np.logspace(0, 7, 15).tolist())  # ridge penalties searched by CV


def correlation_matrix(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Pearson correlations (N, M) between rows of queries (N, D) and targets (M, D); constant rows give 0."""

    def standardise(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        x = x - x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    return standardise(queries) @ standardise(targets).T


def identification_accuracy(
    queries: np.ndarray, targets: np.ndarray, ways: Sequence[int] = (2, 50), n_trials: int = 100, seed: int = 0
) -> dict[str, Any]:
    """Top-1 identification of query i among target i and ``ways - 1`` random distractors.

    queries, targets: (N, D), row i of each belongs to clip i. Ways larger than N are capped at N. Returns
    ``{"top1": {"2-way": acc, ..., "all-way": acc}, "chance": {...}, "n_candidates": N, "n_trials", "seed"}``.
    """
    corr = correlation_matrix(queries, targets)
    n = corr.shape[0]
    if n < 2:
        raise ValueError("identification needs at least 2 clips")
    own = np.diag(corr)
    off = corr.copy()
    np.fill_diagonal(off, -np.inf)
    top1: dict[str, float] = {}
    chance: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    for w in sorted({min(int(w), n) for w in ways}):
        if w == n:
            acc = float(np.mean(own > off.max(axis=1)))
        else:
            hits = 0.0
            for _ in range(n_trials):
                keys = rng.random((n, n))
                np.fill_diagonal(keys, np.inf)
                picks = np.argpartition(keys, w - 2, axis=1)[:, : w - 1]
                hits += np.mean(own > np.take_along_axis(off, picks, axis=1).max(axis=1))
            acc = float(hits / n_trials)
        top1[f"{w}-way"], chance[f"{w}-way"] = acc, 1.0 / w
    top1["all-way"] = float(np.mean(own > off.max(axis=1)))
    chance["all-way"] = 1.0 / n
    return {"top1": top1, "chance": chance, "n_candidates": n, "n_trials": n_trials, "seed": seed}


# ---------------------------------------------------------------------------------------------------------------------
# per-clip features and the ridge decoder


def pixel_features(frames: torch.Tensor, grid: int = 8) -> np.ndarray:
    """Frames (B, F, 3, H, W) in [0,1] -> the clip's mean frame pooled to grid x grid, flattened (B, 3*grid*grid)."""
    mean_frame = frames.float().mean(dim=1)
    return F.adaptive_avg_pool2d(mean_frame, grid).flatten(1).numpy()


def fit_ridge(x: np.ndarray, y: np.ndarray, alphas: Sequence[float], cv_folds: int = 5) -> Any:
    """Ridge from voxels x (N, V) to features y (N, D); one penalty per feature, chosen by contiguous K-fold
    cross-validation on the training clips only (neighbouring clips are correlated, so folds are not shuffled).

    himalaya ``RidgeCV``; when N < V its exact dual, ``KernelRidgeCV`` with a linear kernel (same solution, faster).
    BLAS runs single-threaded: on a shared 2-core machine OpenBLAS threads spin and slow the fit down 10-20x.
    """
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV
    from sklearn.model_selection import KFold
    from threadpoolctl import threadpool_limits

    set_backend("numpy", on_error="raise")
    alpha_grid = np.asarray(alphas, dtype=np.float64)
    folds = KFold(cv_folds, shuffle=False)
    if x.shape[0] < x.shape[1]:
        model = KernelRidgeCV(alphas=alpha_grid, kernel="linear", fit_intercept=True, cv=folds)
    else:
        model = RidgeCV(alphas=alpha_grid, fit_intercept=True, cv=folds)
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return model


def ridge_identification(
    x_train: np.ndarray,
    y_train: np.ndarray,
    evals: dict[str, tuple[np.ndarray, np.ndarray]],
    alphas: Sequence[float],
    ways: Sequence[int] = (2, 50),
    n_trials: int = 100,
    seed: int = 0,
    cv_folds: int = 5,
) -> dict[str, Any]:
    """Fit the ridge decoder on (x_train (N, V), y_train (N, D)) and identify the clips of each eval set.

    evals: name -> (voxels (M, V), true features (M, D)). Features are z-scored with the training statistics.
    Returns per eval set the identification result plus the mean feature correlation, and the chosen penalties.
    """
    mu, sd = y_train.mean(axis=0), y_train.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    model = fit_ridge(x_train, (y_train - mu) / sd, alphas, cv_folds)
    out: dict[str, Any] = {}
    for name, (x, y) in evals.items():
        pred = np.asarray(model.predict(np.asarray(x, dtype=np.float64)))
        target = (y - mu) / sd
        result = identification_accuracy(pred, target, ways, n_trials, seed)
        result["mean_clip_correlation"] = float(np.mean(np.diag(correlation_matrix(pred, target))))
        out[name] = result
    chosen = np.asarray(model.best_alphas_)
    out["alpha"] = {"median": float(np.median(chosen)), "min": float(chosen.min()), "max": float(chosen.max())}
    out["solver"] = type(model).__name__
    return out


def clip_features(data: BrainVideoData, split: str, kind: str, grid: int, batch_size: int = 64) -> np.ndarray:
    """Per-clip features (n, D) of a split; frames are read ``batch_size`` clips at a time."""
    parts = []
    if "pixels" in kind:
        parts.append(np.concatenate([pixel_features(f, grid) for _, f in data.frame_batches(split, batch_size)]))
    if "concepts" in kind:
        parts.append(data.concept_labels(split).numpy())
    return np.concatenate(parts, axis=1)


def ridge_baseline(
    data: BrainVideoData,
    features: str = "pixels",
    grid: int = 8,
    ways: Sequence[int] = (2, 50),
    n_trials: int = 100,
    seed: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> dict[str, Any]:
    """Fit on train, identify val and test clips of one subject; returns the ridge_identification result."""
    evals = {}
    for split in ("val", "test"):
        if data.n_clips(split) >= 2:
            evals[split] = (data.voxels(split).numpy(), clip_features(data, split, features, grid))
    x_train = data.fmri("train").mean(dim=1).numpy()
    result = ridge_identification(
        x_train, clip_features(data, "train", features, grid), evals, alphas, ways, n_trials, seed
    )
    result["n_clips"] = {s: data.n_clips(s) for s in ("train", "val", "test")}
    result["n_voxels"] = data.n_voxels
    return result
