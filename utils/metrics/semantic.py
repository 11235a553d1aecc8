"""N-way top-k identification: semantic classification (frame / video classifier outputs) and brain↔image retrieval,
plus their chance levels. Pure functions on score tensors; the classifiers run in ``models/foundation/``.

Rule (MinD-Video ``n_way_top_k_acc``, kept by Mind-Animator and NEURONS, spec §7 / dataset-and-metrics §2.2): the
positives of a sample are the ground truth's ``gt_top_k`` highest-scoring classes (3 upstream). Each trial draws
``n_way − 1`` distinct distractor classes uniformly from the other classes; it succeeds if some positive ranks in the
top ``top_k`` of {that positive} ∪ distractors by the *prediction's* score, i.e. if fewer than ``top_k`` distractors
score ≥ the best positive. Ties count against the positive (a constant prediction earns nothing; upstream's unstable
``argsort`` left them undefined). Per-sample accuracy p = successes / trials, per-sample std √(p(1−p)/trials).
Upstream drew with unseeded ``np.random``; here every draw comes from a ``torch.Generator`` seeded with ``seed``, so
both protocols are reproducible. Only the order of scores within a row matters: probabilities or logits both work.

Chance (``chance_levels``): if the prediction's class scores are exchangeable (unrelated to the ground truth), the
ranking of the k positives and n−1 distractors is a uniformly random permutation, so
P(success) = 1 − C(n−1, t) / C(n+k−1, t) for top_k = t; for t = 1 that is k / (n+k−1): 0.75 for 2-way and 3/52 ≈ 0.058
for 50-way with k = 3, and 1/n for retrieval (k = 1). Analytic; the tests confirm it by enumeration and simulation.
Shuffled chance (``shuffled_n_way_accuracy``): the same rule on mismatched (prediction, ground truth) pairs, the
chance level of this particular set of predictions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from utils.errors import DataError
from utils.metrics._common import check_finite, check_min_size, check_same_shape

ROW_CHUNK = 64  # rows per vectorised trial block: ROW_CHUNK × trials × classes random keys


def _check_rule(n_classes: int, n_way: int, positives: int, top_k: int, trials: int, what: str) -> None:
    if n_way < 2 or not 1 <= top_k < n_way or trials < 1:
        raise DataError(
            f"{what}: invalid rule n_way={n_way}, top_k={top_k}, trials={trials}",
            "use n_way ≥ 2, 1 ≤ top_k < n_way and trials ≥ 1",
        )
    check_min_size(
        n_classes - positives,
        n_way - 1,
        f"{what}: candidates left for {n_way - 1} distractors after excluding {positives} positive(s)",
        "lower n_way or gt_top_k, or score more classes/samples",
    )


def _hit_rate(
    scores: torch.Tensor, positives: torch.Tensor, n_way: int, top_k: int, trials: int, generator: torch.Generator
) -> torch.Tensor:
    """scores: (M, C); positives: (M, k) class indices → (M,) float64 fraction of successful trials."""
    m, c = scores.shape
    best = scores.gather(1, positives).max(dim=1).values  # (M,)
    if n_way - 1 == c - positives.shape[1]:  # every trial uses all other classes: deterministic
        others_above = (scores >= best[:, None]).sum(dim=1) - (scores.gather(1, positives) >= best[:, None]).sum(dim=1)
        return (others_above < top_k).double()
    rates = []
    for i in range(0, m, ROW_CHUNK):
        s, pos, b = scores[i : i + ROW_CHUNK], positives[i : i + ROW_CHUNK], best[i : i + ROW_CHUNK]
        keys = torch.rand(s.shape[0], trials, c, generator=generator)
        keys.scatter_(2, pos[:, None, :].expand(-1, trials, -1), 2.0)  # positives never drawn as distractors
        picked = keys.topk(n_way - 1, dim=2, largest=False).indices  # uniform (n−1)-subsets, (m, T, n−1)
        d = s[:, None, :].expand(-1, trials, -1).gather(2, picked)
        rates.append(((d >= b[:, None, None]).sum(dim=2) < top_k).double().mean(dim=1))
    return torch.cat(rates)


def n_way_accuracy(
    gt_scores: torch.Tensor,
    pred_scores: torch.Tensor,
    n_way: int,
    *,
    trials: int = 100,
    gt_top_k: int = 3,
    top_k: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N-way top-k semantic classification accuracy (rule in the module doc).

    gt_scores, pred_scores: classifier probabilities (or logits) of ground truth and prediction, (N, C) for the
    video classifier or (N, F, C) for the frame classifier (each frame index scored separately).
    Returns per-sample accuracy and binomial std √(p(1−p)/trials), both (N,) or (N, F) float64.
    """
    check_same_shape(pred_scores, gt_scores, f"{n_way}-way classification scores")
    if gt_scores.ndim not in (2, 3):
        raise DataError(
            f"{n_way}-way classification: scores of shape {tuple(gt_scores.shape)}",
            "pass (N, classes) or (N, frames, classes)",
        )
    check_finite(gt_scores, "ground-truth classifier scores")
    check_finite(pred_scores, "prediction classifier scores")
    check_min_size(gt_scores.shape[0], 1, f"{n_way}-way classification samples", "score at least one sample")
    c = gt_scores.shape[-1]
    _check_rule(c, n_way, gt_top_k, top_k, trials, f"{n_way}-way classification over {c} classes")
    gt2, pred2 = gt_scores.reshape(-1, c).double(), pred_scores.reshape(-1, c).double()
    positives = gt2.topk(gt_top_k, dim=1).indices
    acc = _hit_rate(pred2, positives, n_way, top_k, trials, torch.Generator().manual_seed(seed))
    acc = acc.reshape(gt_scores.shape[:-1])
    return acc, (acc * (1 - acc) / trials).sqrt()


def shuffled_n_way_accuracy(
    gt_scores: torch.Tensor,
    pred_scores: torch.Tensor,
    n_way: int,
    *,
    shifts: int = 5,
    trials: int = 100,
    gt_top_k: int = 3,
    top_k: int = 1,
    seed: int = 0,
) -> torch.Tensor | None:
    """The N-way accuracy of mismatched pairs: each clip's prediction scored against the ground truth of the clips
    1..``shifts`` places before it (cyclic; row i of ``gt_scores`` with row i − s of ``pred_scores``), averaged over
    the shifts. Shapes as :func:`n_way_accuracy`; returns the per-sample mean, (N,) or (N, F) float64, or None when
    ``shifts`` is 0 or there is one sample.

    The empirical chance of this prediction set: the analytic chance assumes that the prediction's class scores are
    exchangeable, which a decoder whose outputs favour some classes (for every clip alike) breaks, in either
    direction. A prediction that carries clip-specific information beats its own shuffled pairs."""
    n = gt_scores.shape[0]
    shifts = min(shifts, n - 1)
    if shifts < 1:
        return None
    rule = {"trials": trials, "gt_top_k": gt_top_k, "top_k": top_k, "seed": seed}
    acc = [n_way_accuracy(gt_scores, pred_scores.roll(s, dims=0), n_way, **rule)[0] for s in range(1, shifts + 1)]
    return torch.stack(acc).mean(dim=0)


def retrieval_accuracy(
    brain: torch.Tensor,
    image: torch.Tensor,
    n_way: int | None = None,
    *,
    trials: int = 100,
    top_k: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Top-k brain→image and image→brain retrieval by cosine similarity of flattened features.

    brain, image: (N, ...) paired features (row i of each is the same clip). n_way None = all N candidates
    (deterministic); otherwise each query competes with n_way − 1 distractors drawn per trial from the other N − 1
    samples (seeded). Returns {"brain_to_image": (N,), "image_to_brain": (N,)} per-query hit rates, float64.
    """
    check_same_shape(brain, image, "retrieval features")
    check_finite(brain, "brain features")
    check_finite(image, "image features")
    n = brain.shape[0]
    n_way = n if n_way is None else n_way
    _check_rule(n, n_way, 1, top_k, trials, f"{n_way}-way retrieval over {n} samples")
    sim = F.normalize(brain.flatten(1).double(), dim=1) @ F.normalize(image.flatten(1).double(), dim=1).T
    positives = torch.arange(n)[:, None]
    gen = torch.Generator().manual_seed(seed)
    return {
        "brain_to_image": _hit_rate(sim, positives, n_way, top_k, trials, gen),
        "image_to_brain": _hit_rate(sim.T.contiguous(), positives, n_way, top_k, trials, gen),
    }


def chance_level(n_way: int, gt_top_k: int = 3, top_k: int = 1) -> float:
    """Expected accuracy of a prediction unrelated to the ground truth under the N-way rule (analytic, module doc)."""
    _check_rule(n_way - 1 + gt_top_k, n_way, gt_top_k, top_k, 1, f"{n_way}-way chance level")
    return 1.0 - math.comb(n_way - 1, top_k) / math.comb(n_way - 1 + gt_top_k, top_k)


def chance_levels(n_ways: Iterable[int] = (2, 50), gt_top_k: int = 3, top_k: int = 1) -> dict[str, float]:
    """{"2-way": 0.75, "50-way": 0.0577, ...} for the classification rule (gt_top_k 3); gt_top_k=1 gives retrieval's
    1/n."""
    return {f"{n}-way": chance_level(n, gt_top_k, top_k) for n in n_ways}
