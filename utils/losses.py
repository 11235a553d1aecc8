"""NEURONS stage-1/2 losses, their schedules and the weighted total, one named function each.

Contrastive losses take un-normalised embeddings of any shape (B, ...) and compare the L2-normalised flattened vectors
(B, K), as MindEye2 / NEURONS do for (B, 256, 1664) token grids and (B, 1280) caption embeddings.

Stage 1: ``mixco_nce`` (BiMixCo, image tokens, τ 0.006) + 0.25 · ``symmetric_infonce`` (caption embeddings, τ 0.1).
Stage 2: 30 · prior MSE + ``soft_clip_loss`` (all frames, τ from ``softclip_temperature``) + ``symmetric_infonce`` +
progressive-weighted ``dice_loss``, ``concept_bce``, ``caption_ce`` and ``latent_l1``; combine with ``total_loss``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F

from utils.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

IGNORE_INDEX = -100


def _flat_normalized(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B, K) unit vectors."""
    return F.normalize(x.flatten(1), dim=-1)


# ---- BiMixCo -----------------------------------------------------------------------------------------------------
class MixcoBatch(NamedTuple):
    voxels: torch.Tensor  # (B, ...) mixed voxels
    perm: torch.Tensor  # (B,) partner index of each sample
    betas: torch.Tensor  # (B,) own-sample coefficient; 1 for unmixed samples
    select: torch.Tensor  # (B,) bool, which samples were mixed


def mixco(
    voxels: torch.Tensor, beta: float = 0.15, s_thresh: float = 0.5, generator: torch.Generator | None = None
) -> MixcoBatch:
    """MixCo on voxels (before the ridge): sample i is mixed with probability `s_thresh` as
    β_i·x_i + (1−β_i)·x_perm(i), β ~ Beta(beta, beta), perm a random permutation. Returns a new tensor."""
    b, device, dtype = voxels.shape[0], voxels.device, voxels.dtype
    perm = torch.randperm(b, generator=generator).to(device)
    # Beta(a, a) as G1 / (G1 + G2) from seeded Gamma draws (torch.distributions takes no generator).
    gammas = torch._standard_gamma(torch.full((2, b), float(beta), dtype=torch.float64), generator=generator)
    betas = (gammas[0] / (gammas[0] + gammas[1])).nan_to_num(0.5).to(device=device, dtype=dtype)
    select = (torch.rand(b, generator=generator) <= s_thresh).to(device)
    shape = (-1,) + (1,) * (voxels.ndim - 1)
    mixed = voxels * betas.view(shape) + voxels[perm] * (1 - betas.view(shape))
    voxels = torch.where(select.view(shape), mixed, voxels)
    betas = torch.where(select, betas, torch.ones_like(betas))
    return MixcoBatch(voxels, perm, betas, select)


def mixco_soft_labels(perm: torch.Tensor, betas: torch.Tensor, self_partner_quirk: bool = False) -> torch.Tensor:
    """(B, B) targets: β_i on the diagonal and 1−β_i at column perm(i).

    Fixed: when perm(i) = i both parts add up (the row sums to 1). With `self_partner_quirk` (MindEye, defect 17)
    the diagonal is overwritten by 1−β_i instead.
    """
    b = perm.shape[0]
    rows = torch.arange(b, device=perm.device)
    probs = torch.diag(betas)
    if self_partner_quirk:
        probs[rows, perm] = 1 - betas
    else:
        probs[rows, perm] += 1 - betas
    return probs


def mixco_nce(
    preds: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    perm: torch.Tensor | None = None,
    betas: torch.Tensor | None = None,
    bidirectional: bool = True,
    self_partner_quirk: bool = False,
) -> torch.Tensor:
    """MixCo NCE between brain predictions and CLIP targets, (B, ...) each → scalar.

    logits = p̂·t̂ᵀ / τ; soft cross-entropy against `mixco_soft_labels` (hard identity labels without perm/betas),
    averaged with the transposed direction when `bidirectional`.
    """
    logits = _flat_normalized(preds) @ _flat_normalized(targets).T / temperature  # (B, B)
    if perm is None or betas is None:
        labels = torch.eye(len(logits), device=logits.device, dtype=logits.dtype)
    else:
        labels = mixco_soft_labels(perm, betas.to(logits.dtype), self_partner_quirk)
    loss = -(logits.log_softmax(-1) * labels).sum(-1).mean()
    if bidirectional:
        loss_t = -(logits.T.log_softmax(-1) * labels.T).sum(-1).mean()
        loss = (loss + loss_t) / 2
    return loss


# ---- contrastive alignment ---------------------------------------------------------------------------------------
def symmetric_infonce(
    a: torch.Tensor, b: torch.Tensor, temperature: float, soft_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE between (B, ...) and (B, ...) → scalar: mean of CE(a→b) and CE(b→a).

    Hard labels (the diagonal) by default; pass `mixco_soft_labels(...)` when `a` comes from MixCo-mixed voxels
    (upstream uses hard labels there, defect 17).
    """
    logits = _flat_normalized(a) @ _flat_normalized(b).T / temperature  # (B, B)
    if soft_labels is None:
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    fwd = -(logits.log_softmax(-1) * soft_labels).sum(-1).mean()
    bwd = -(logits.T.log_softmax(-1) * soft_labels.T).sum(-1).mean()
    return (fwd + bwd) / 2


def soft_clip_loss(preds: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """SoftCLIP (MindEye2): (N, ...) each → scalar.

    Soft labels softmax(t̂·t̂ᵀ/τ) from target-target similarity; the loss is the mean of the soft cross-entropies of
    log-softmax(p̂·t̂ᵀ/τ) and of its transpose against those labels.
    """
    p, t = _flat_normalized(preds), _flat_normalized(targets)
    labels = (t @ t.T / temperature).softmax(-1)  # (N, N)
    logits = p @ t.T / temperature
    loss1 = -(logits.log_softmax(-1) * labels).sum(-1).mean()
    loss2 = -(logits.T.log_softmax(-1) * labels).sum(-1).mean()
    return (loss1 + loss2) / 2


def softclip_temperature(epoch: int, n_epochs: int, start: float = 0.004, end: float = 0.0075) -> float:
    """Cosine ramp from `start` (epoch 0) to `end` (last epoch): τ_e = end + (start − end)/2·(1 + cos(π e/(n−1)))."""
    if n_epochs <= 1:
        return start
    return end + (start - end) / 2 * (1 + math.cos(math.pi * epoch / (n_epochs - 1)))


# ---- task heads --------------------------------------------------------------------------------------------------
def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: Literal["sample", "batch"] = "sample",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Soft Dice loss on σ(logits) vs binary targets, both (N, ...) → scalar.

    "sample": 1 − (2Σp·m + eps)/(Σp + Σm + eps) per sample (sums over all but dim 0), then the mean over samples.
    "batch": upstream (defect 23), one Dice over the whole batch at once.
    """
    probs = torch.sigmoid(logits)
    targets = targets.to(probs.dtype)
    if reduction == "batch":
        return 1 - (2 * (probs * targets).sum() + eps) / (probs.sum() + targets.sum() + eps)
    if reduction != "sample":
        raise ConfigError(f"bad dice reduction {reduction!r}", "use 'sample' or 'batch'")
    p, m = probs.flatten(1), targets.flatten(1)
    return (1 - (2 * (p * m).sum(1) + eps) / (p.sum(1) + m.sum(1) + eps)).mean()


def concept_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label concept loss: BCE-with-logits, (B, n_classes) each → scalar (mean over all entries)."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def caption_ce(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Teacher-forced caption loss: logits (B, L, V), labels (B, L) → scalar.

    Label-smoothed cross-entropy averaged over the positions whose label is not `ignore_index`.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index, label_smoothing=label_smoothing
    )


def caption_token_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Teacher-forced top-1 token accuracy over the non-ignored positions."""
    keep = labels != ignore_index
    if not keep.any():
        return 0.0
    return (logits.argmax(-1)[keep] == labels[keep]).float().mean().item()


def latent_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Blurry-video latent loss: mean absolute error, same shapes → scalar."""
    return F.l1_loss(pred, target)


# ---- schedules and composition -----------------------------------------------------------------------------------
def progressive_weight(
    epoch: int, batch_idx: int, batches_per_epoch: int, start_epoch: int, window_epochs: int, peak: float = 10.0
) -> float:
    """One task's progressive weight: 1 + (peak−1)·|sin(π·s / (window·n_b))| inside its window, else 1.

    s = (epoch − start)·n_b + batch_idx; the window is [start, start + window_epochs) epochs.
    """
    if window_epochs <= 0 or not start_epoch <= epoch < start_epoch + window_epochs:
        return 1.0
    step = (epoch - start_epoch) * batches_per_epoch + batch_idx
    return 1.0 + (peak - 1.0) * abs(math.sin(math.pi * step / (window_epochs * batches_per_epoch)))


def progressive_weights(
    epoch: int,
    batch_idx: int,
    batches_per_epoch: int,
    starts: Mapping[str, int],
    window_epochs: int,
    peak: float = 10.0,
) -> dict[str, float]:
    """Progressive weights of all tasks named in `starts` (e.g. {"dice": 0, "concepts": 10, ...})."""
    return {
        name: progressive_weight(epoch, batch_idx, batches_per_epoch, s, window_epochs, peak)
        for name, s in starts.items()
    }


def upstream_progressive_windows(
    n_epochs: int, tasks: tuple[str, ...] = ("dice", "concepts", "caption", "latent")
) -> tuple[dict[str, int], int]:
    """Upstream's windows for `n_epochs`: starts k·(n//5), length 2·(n//5) → ({task: start}, window_epochs)."""
    unit = n_epochs // 5
    return {task: k * unit for k, task in enumerate(tasks)}, 2 * unit


def total_loss(
    losses: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | DataclassInstance,
    multipliers: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_name weight[name] · multiplier[name] · loss[name] → (total, {name: weighted term}).

    weights: a mapping or a dataclass of named weights (e.g. the stage-2 `loss_weights`, prior=30). Every loss
      needs a weight; weights of losses not computed in this step are ignored.
    multipliers: per-step factors such as `progressive_weights(...)`; missing names mean 1.
    """
    table = weights if isinstance(weights, Mapping) else dataclasses.asdict(weights)
    unweighted = sorted(set(losses) - set(table))
    if unweighted:
        raise ConfigError(f"losses without a weight: {unweighted}", "add them to loss_weights")
    multipliers = multipliers or {}
    terms = {name: float(table[name]) * float(multipliers.get(name, 1.0)) * value for name, value in losses.items()}
    if not terms:
        raise ConfigError("no losses to combine", "compute at least one loss")
    return cast(torch.Tensor, sum(terms.values())), terms  # a Tensor: terms is not empty


def scatter_positions(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Values (K,) of the K True positions of ``keep`` (B, L) → (B, L), 0 elsewhere (differentiable)."""
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)


def caption_token_losses(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, label_smoothing: float
                         ) -> torch.Tensor:  # fmt: skip
    """``utils.losses.caption_ce`` before its mean: label-smoothed CE of the K labelled positions' logits (K, V) and
    labels (K,), placed at ``keep`` (B, L) and 0 where ignored, so that the mean can be taken over the tokens of the
    global batch."""
    flat = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="none")  # (K,)
    return scatter_positions(flat, keep)


# The per-clip outputs of a stage-2 step that its losses differentiate through (pipeline.stage2.share_outputs; the
# gradient cache of train.micro_batch, utils.grad_cache, replays exactly these)
STAGE2_OUTPUTS = ("prior_tokens", "motion", "text", "mask_logits", "concept_logits", "pred_latents", "token_loss")
