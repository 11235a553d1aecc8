"""Reporting: ``summarise`` turns per-sample values into the metrics-JSON triple {"mean", "std", "n"};
``evaluate_videos`` runs every video metric of stage 6 under one protocol.

protocol="neurons" (upstream ``run_metrics.py``): frame-level values (N, F) are summarised per frame index and the
  F means and F stds are averaged ("± = mean over frames of std over videos"); with ``per_sample_std`` (the N-way
  binomial std) the ± is the mean of the per-sample stds instead. std is numpy's population std (ddof 0).
protocol="standard": frame-level values are first averaged per sample (N,), then mean and population std over the N
  samples; ``per_sample_std`` is ignored (the ± is the spread over samples, never a binomial error).
The means agree between protocols; only the ± differs. Non-finite values (PSNR of identical frames) propagate.
With ``bootstrap`` (resamples, and ``seed``) every entry also gets ``"ci95"``: the clip-bootstrap 95 % interval of the
mean (:mod:`utils.metrics.intervals`; the same in both protocols), and N-way entries ``"above_chance"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from utils.errors import DataError
from utils.metrics._common import Protocol, check_protocol, check_same_shape, check_videos
from utils.metrics.intervals import CI_KEY, mark_chance, mark_shuffled, mean_interval
from utils.metrics.pixel import blurry_video_ssim, psnr, ssim
from utils.metrics.semantic import chance_level, n_way_accuracy, shuffled_n_way_accuracy
from utils.metrics.temporal import clip_pcc


def summarise(
    values: torch.Tensor,
    per_sample_std: torch.Tensor | None = None,
    protocol: Protocol = "standard",
    *,
    bootstrap: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """values: (N,) per-sample or (N, F) per-frame metric values → {"mean": float, "std": float, "n": N}, plus
    ``"ci95"`` ([lo, hi] or None) when ``bootstrap`` (resamples of the clips, seeded with ``seed``) is given."""
    protocol = check_protocol(protocol)
    if values.ndim not in (1, 2) or values.shape[0] == 0:
        raise DataError(f"summarise: values of shape {tuple(values.shape)}", "pass (N,) or (N, F) with N ≥ 1")
    v = values.double()
    if protocol == "standard":
        per_sample = v if v.ndim == 1 else v.mean(dim=1)
        mean, std = per_sample.mean(), per_sample.std(correction=0)
    elif per_sample_std is not None:
        check_same_shape(values, per_sample_std, "summarise per-sample std")
        mean, std = v.mean(), per_sample_std.double().mean()
    else:
        cols = v if v.ndim == 2 else v[:, None]
        mean, std = cols.mean(dim=0).mean(), cols.std(dim=0, correction=0).mean()
    out: dict[str, Any] = {"mean": mean.item(), "std": std.item(), "n": int(values.shape[0])}
    if bootstrap is not None:
        out[CI_KEY] = mean_interval(v, bootstrap, seed)
    return out


def n_way_entries(
    prefix: str,
    scores: tuple[torch.Tensor, torch.Tensor],
    n_ways: Iterable[int],
    protocol: Protocol,
    bootstrap: int | None,
    shuffles: int = 0,
    **rule: int,
) -> dict[str, dict[str, Any]]:
    """``{prefix}_{n}way`` entries of the N-way accuracy of scores = (gt, pred), each with its analytic chance and,
    with ``bootstrap`` and ``shuffles`` > 0, its shuffled chance (:func:`utils.metrics.intervals.mark_shuffled`)."""
    out = {}
    for n in n_ways:
        acc, std = n_way_accuracy(scores[0], scores[1], n, **rule)
        entry = mark_chance(summarise(acc, std, protocol, bootstrap=bootstrap, seed=rule["seed"]),
                            chance_level(n, rule["gt_top_k"], rule["top_k"]))  # fmt: skip
        if bootstrap is not None and shuffles > 0:
            shuffled = shuffled_n_way_accuracy(scores[0], scores[1], n, shifts=shuffles, **rule)
            entry = mark_shuffled(entry, acc, shuffled, bootstrap, rule["seed"])
        out[f"{prefix}_{n}way"] = entry
    return out


def _check_leading(
    nf: torch.Size,
    video_scores: tuple[torch.Tensor, torch.Tensor] | None,
    frame_scores: tuple[torch.Tensor, torch.Tensor] | None,
    clip_features: torch.Tensor | None,
) -> None:
    """The optional inputs must describe the same N videos (and F frames) as the pixels."""
    expected = [(video_scores, nf[:1]), (frame_scores, nf), (clip_features, nf)]
    for x, lead in expected:
        for t in x if isinstance(x, tuple) else (x,):
            if t is not None and t.shape[: len(lead)] != lead:
                raise DataError(
                    f"evaluate_videos: input of shape {tuple(t.shape)} does not start with (N, F) = {tuple(nf)}",
                    "compute classifier scores / CLIP features for the same videos and frames as pred",
                )


def evaluate_videos(
    pred: torch.Tensor,
    gt: torch.Tensor,
    *,
    protocol: Protocol = "standard",
    video_scores: tuple[torch.Tensor, torch.Tensor] | None = None,
    frame_scores: tuple[torch.Tensor, torch.Tensor] | None = None,
    clip_features: torch.Tensor | None = None,
    blurry: torch.Tensor | None = None,
    n_ways: Iterable[int] = (2, 50),
    trials: int = 100,
    gt_top_k: int = 3,
    top_k: int = 1,
    seed: int = 0,
    bootstrap: int | None = None,
    shuffles: int = 0,
) -> dict[str, dict[str, Any]]:
    """All stage-6 video metrics as {"name": {"mean", "std", "n"[, "chance"]}}, with ``bootstrap`` also "ci95" (and
    "above_chance" beside "chance"): the clip-bootstrap interval of ``bootstrap`` resamples seeded with ``seed``; with
    ``shuffles`` > 0 too, the N-way entries' shuffled chance (:func:`n_way_entries`).

    pred, gt: (N, F, 3, H, W) float in [0, 1]. Optional inputs from the foundation roles, skipped when None:
    video_scores (gt (N, C), pred (N, C)) of ``video_classifier``; frame_scores (gt (N, F, C), pred (N, F, C)) of
    ``frame_classifier``; clip_features (N, F, D) of ``clip_pcc`` on the predicted frames; blurry (N, F, 3, H, W)
    stage-3 blurry videos at the ground truth's resolution.
    """
    protocol = check_protocol(protocol)
    check_videos(pred, gt)
    rule = {"trials": trials, "gt_top_k": gt_top_k, "top_k": top_k, "seed": seed}
    n_ways = tuple(n_ways)
    _check_leading(pred.shape[:2], video_scores, frame_scores, clip_features)

    def summary(values: torch.Tensor) -> dict[str, Any]:
        return summarise(values, None, protocol, bootstrap=bootstrap, seed=seed)

    out: dict[str, dict[str, Any]] = {}
    if video_scores is not None:
        out.update(n_way_entries("video", video_scores, n_ways, protocol, bootstrap, shuffles, **rule))
    if clip_features is not None:
        out["clip_pcc"] = summary(clip_pcc(clip_features, protocol))
    if frame_scores is not None:
        out.update(n_way_entries("frame", frame_scores, n_ways, protocol, bootstrap, shuffles, **rule))
    out["ssim"] = summary(ssim(pred, gt, protocol))
    out["psnr"] = summary(psnr(pred, gt, protocol))
    if blurry is not None:
        out["blurry_ssim"] = summary(blurry_video_ssim(blurry, gt, protocol))
    return out
