"""Brain-decoding sub-task metrics of NEURONS: concept recognition (multi-label F1), key-object segmentation (Dice)
and scene description (caption BLEU). Same in both protocols (upstream stage 6 scores none of them; its stage-2 Dice
pools the whole batch, defect 23 — here Dice is per sample).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal, TypedDict

import torch

from utils.errors import DataError
from utils.metrics._common import check_finite, check_min_size, check_same_shape


def _check_binary(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype != torch.bool and not ((x == 0) | (x == 1)).all():
        raise DataError(f"{what} has values other than 0 and 1", "binarise first, e.g. (probs > 0.5)")
    return x.bool()


# ---- concept recognition -------------------------------------------------------------------------------------------
F1Average = Literal["micro", "macro"]


class ConceptF1(TypedDict):
    """What :func:`concept_f1` returns: the averages, and (C,) per-class scores (NaN where undefined)."""

    micro: float
    macro: float
    per_class_f1: torch.Tensor
    per_class_recall: torch.Tensor
    per_class_precision: torch.Tensor


def concept_f1_counts(
    scores: torch.Tensor, targets: torch.Tensor, *, threshold: float = 0.5, from_logits: bool = False
) -> torch.Tensor:
    """Per-sample true positives, false positives and false negatives of each class, which add up over samples.

    scores: (N, C) probabilities in [0, 1], or logits with ``from_logits``; targets: (N, C) multi-hot {0, 1}.
    Returns (N, 3, C) float64 ({0, 1}): TP, FP, FN.
    """
    check_same_shape(scores, targets, "concept recognition")
    if scores.ndim != 2:
        raise DataError(f"concept recognition: scores of shape {tuple(scores.shape)}", "pass (N, classes)")
    check_finite(scores, "concept scores")
    probs = scores.double().sigmoid() if from_logits else scores.double()
    if not from_logits and (probs.min() < 0 or probs.max() > 1):
        raise DataError("concept scores lie outside [0, 1]", "pass probabilities, or logits with from_logits=True")
    pred, true = probs > threshold, _check_binary(targets, "concept targets")
    return torch.stack([pred & true, pred & ~true, ~pred & true], dim=1).double()


def f1_averages(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(micro, macro) F1 from class counts (..., C) float64 → (...) each; the rules of :func:`concept_f1`."""
    denom = 2 * tp + fp + fn
    micro_denom = denom.sum(dim=-1)
    micro = torch.where(micro_denom > 0, 2 * tp.sum(dim=-1) / micro_denom.clamp(min=1), 0.0)
    occurs = denom > 0
    per_class = torch.where(occurs, 2 * tp / denom.clamp(min=1), 0.0)
    counted = occurs.sum(dim=-1)
    macro = torch.where(counted > 0, per_class.sum(dim=-1) / counted.clamp(min=1), 0.0)
    return micro, macro


def concept_f1(
    scores: torch.Tensor, targets: torch.Tensor, *, threshold: float = 0.5, from_logits: bool = False
) -> ConceptF1:
    """Multi-label F1 of concept recognition (NEURONS' 51 classes; upstream predicts σ(logit) > 0.5).

    scores: (N, C) probabilities in [0, 1], or logits with ``from_logits``; targets: (N, C) multi-hot {0, 1}.
    Returns "micro" (pooled TP/FP/FN) and "macro" (mean over the classes that occur in targets or predictions, as
    sklearn ``f1_score(average="macro", zero_division=nan)``; torchmetrics would count absent classes as 0; 0.0 if no
    class occurs), "per_class_f1" (C,), "per_class_recall" (C,) and "per_class_precision" (C,) (NaN where
    undefined; recall is what upstream's stage ``e`` prints per class).
    """
    tp, fp, fn = concept_f1_counts(scores, targets, threshold=threshold, from_logits=from_logits).sum(dim=0)
    denom = 2 * tp + fp + fn
    per_class = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.nan)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.nan)
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.nan)
    micro, macro = f1_averages(tp, fp, fn)
    return {
        "micro": micro.item(),
        "macro": macro.item(),
        "per_class_f1": per_class,
        "per_class_recall": recall,
        "per_class_precision": precision,
    }


# ---- key-object segmentation ---------------------------------------------------------------------------------------
def dice_per_sample(pred_masks: torch.Tensor, gt_masks: torch.Tensor, empty_score: float = 1.0) -> torch.Tensor:
    """Dice 2|A∩B| / (|A| + |B|) of binary masks, one value per sample.

    pred_masks, gt_masks: (N, ...) binary (bool or {0, 1}); everything after the first axis is one sample (e.g.
    (N, F, H, W) pools a clip's frames; reshape to (N·F, H, W) for per-frame Dice). Both masks empty → ``empty_score``.
    Returns (N,) float64.
    """
    check_same_shape(pred_masks, gt_masks, "Dice masks")
    check_min_size(pred_masks.ndim, 2, "Dice mask dimensions", "pass (N, H, W) or (N, F, H, W) masks")
    a = _check_binary(pred_masks, "predicted masks").flatten(1)
    b = _check_binary(gt_masks, "ground-truth masks").flatten(1)
    inter = (a & b).sum(dim=1).double()
    total = (a.sum(dim=1) + b.sum(dim=1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.full_like(total, empty_score))


# ---- scene description ---------------------------------------------------------------------------------------------
def normalise_caption(text: str) -> str:
    """Lower-case, punctuation (except apostrophes) to spaces, single spaces — close to the COCO caption tokeniser."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _caption_inputs(
    preds: Sequence[str], refs: Sequence[str | Sequence[str]], normalise: bool
) -> tuple[list[str], list[list[str]]]:
    if len(preds) != len(refs):
        raise DataError(f"captions: {len(preds)} predictions vs {len(refs)} references", "pair one entry per clip")
    check_min_size(len(preds), 1, "captions", "score at least one caption")
    ref_lists = [[r] if isinstance(r, str) else list(r) for r in refs]
    if not normalise:
        return list(preds), ref_lists
    return [normalise_caption(p) for p in preds], [[normalise_caption(r) for r in rs] for rs in ref_lists]


def caption_bleu(
    preds: Sequence[str], refs: Sequence[str | Sequence[str]], *, n_gram: int = 4, normalise: bool = True
) -> float:
    """Corpus-level BLEU-n (default BLEU-4) by ``torchmetrics.functional.text.bleu_score`` (whitespace tokens, no
    smoothing). preds: N captions; refs: N references, each a string or a list of strings."""
    from torchmetrics.functional.text import bleu_score

    p, r = _caption_inputs(preds, refs, normalise)
    return float(bleu_score(p, r, n_gram=n_gram))


def _ngrams(tokens: list[str], n_gram: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[j : j + i]) for i in range(1, n_gram + 1) for j in range(len(tokens) - i + 1))


def caption_bleu_counts(
    preds: Sequence[str], refs: Sequence[str | Sequence[str]], *, n_gram: int = 4, normalise: bool = True
) -> torch.Tensor:
    """The corpus statistics of :func:`caption_bleu` per caption, which add up over captions (torchmetrics'
    ``bleu_score`` bookkeeping: whitespace tokens, n-gram matches clipped by the references' maximum counts, the
    reference length closest to the prediction's, the first on ties). Returns (N, 2·n_gram + 2) float64: matches of
    orders 1..n, the prediction's n-grams of orders 1..n, its length, the reference length."""
    p, r = _caption_inputs(preds, refs, normalise)
    rows = []
    for pred, targets in zip(p, r, strict=True):
        tokens, ref_tokens = pred.split(), [t.split() for t in targets]
        diffs = [abs(len(tokens) - len(t)) for t in ref_tokens]
        ref_counts: Counter[tuple[str, ...]] = Counter()
        for t in ref_tokens:
            ref_counts |= _ngrams(t, n_gram)
        own = _ngrams(tokens, n_gram)
        row = [0.0] * (2 * n_gram + 2)
        for gram, count in (own & ref_counts).items():
            row[len(gram) - 1] += count
        for gram, count in own.items():
            row[n_gram + len(gram) - 1] += count
        row[-2], row[-1] = len(tokens), len(ref_tokens[diffs.index(min(diffs))])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def bleu_from_counts(counts: torch.Tensor, n_gram: int = 4) -> torch.Tensor:
    """Corpus BLEU-n (uniform weights, no smoothing) from summed :func:`caption_bleu_counts` (..., 2·n_gram + 2)
    → (...) float64; 0 where some order has no match, as torchmetrics."""
    matches, total = counts[..., :n_gram], counts[..., n_gram : 2 * n_gram]
    pred_len, ref_len = counts[..., -2], counts[..., -1]
    hit = matches.min(dim=-1).values > 0
    precision = torch.where(hit[..., None], matches / total.clamp(min=1), 1.0)
    geometric = precision.log().mean(dim=-1).exp()
    brevity = torch.where(pred_len > ref_len, 1.0, (1 - ref_len / pred_len.clamp(min=1)).exp())
    return torch.where(hit, brevity * geometric, 0.0)


def caption_bleu_per_sample(
    preds: Sequence[str],
    refs: Sequence[str | Sequence[str]],
    *,
    n_gram: int = 4,
    smooth: bool = False,
    normalise: bool = True,
) -> torch.Tensor:
    """Sentence-level BLEU-n per caption (torchmetrics), (N,) float64. Note torchmetrics returns 0 whenever some n-gram
    order has no match, even with ``smooth``; report ``caption_bleu`` (corpus) as the headline number."""
    from torchmetrics.functional.text import bleu_score

    p, r = _caption_inputs(preds, refs, normalise)
    return torch.tensor([float(bleu_score([a], [b], n_gram=n_gram, smooth=smooth)) for a, b in zip(p, r)])
