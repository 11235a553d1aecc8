"""Every loss against a naive loop-based reference written here, plus the schedules and the weighted total."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from utils.errors import ConfigError
from utils.losses import (
    caption_ce,
    caption_token_accuracy,
    concept_bce,
    dice_loss,
    latent_l1,
    mixco,
    mixco_nce,
    mixco_soft_labels,
    progressive_weight,
    progressive_weights,
    soft_clip_loss,
    softclip_temperature,
    symmetric_infonce,
    total_loss,
    upstream_progressive_windows,
)

# ---- naive references (python loops over floats) -----------------------------------------------------------------


def _unit_rows(x: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in x.flatten(1).double().tolist():
        norm = math.sqrt(sum(v * v for v in row))
        rows.append([v / norm for v in row])
    return rows


def _sim(a: torch.Tensor, b: torch.Tensor, temp: float) -> list[list[float]]:
    ua, ub = _unit_rows(a), _unit_rows(b)
    return [[sum(x * y for x, y in zip(ra, rb)) / temp for rb in ub] for ra in ua]


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in _log_softmax(row)]


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


def _soft_ce(logits: list[list[float]], labels: list[list[float]]) -> float:
    total = 0.0
    for lrow, yrow in zip(logits, labels):
        total += -sum(lp * y for lp, y in zip(_log_softmax(lrow), yrow))
    return total / len(logits)


def _ref_mixco_labels(perm: list[int], betas: list[float], quirk: bool) -> list[list[float]]:
    n = len(perm)
    labels = [[0.0] * n for _ in range(n)]
    for i in range(n):
        labels[i][i] = betas[i]
        if quirk:
            labels[i][perm[i]] = 1 - betas[i]
        else:
            labels[i][perm[i]] += 1 - betas[i]
    return labels


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# ---- BiMixCo / MixCo ---------------------------------------------------------------------------------------------


def test_mixco_mixes_selected_samples_with_their_partner():
    x = torch.randn(8, 5, dtype=torch.float64)
    out = mixco(x.clone(), beta=0.15, s_thresh=0.5, generator=torch.Generator().manual_seed(3))
    assert sorted(out.perm.tolist()) == list(range(8))
    for i in range(8):
        if out.select[i]:
            expect = [
                out.betas[i].item() * a + (1 - out.betas[i].item()) * b
                for a, b in zip(x[i].tolist(), x[out.perm[i]].tolist())
            ]
            assert out.voxels[i].tolist() == pytest.approx(expect)
            assert 0.0 <= out.betas[i].item() <= 1.0
        else:
            assert out.voxels[i].tolist() == x[i].tolist() and out.betas[i].item() == 1.0
    again = mixco(x.clone(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.voxels, out.voxels) and torch.equal(again.perm, out.perm)


@pytest.mark.parametrize("quirk", [False, True])
def test_mixco_nce_matches_loop_reference_including_self_partner(quirk):
    torch.manual_seed(0)
    preds, targs = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    perm = torch.tensor([2, 1, 0, 4, 3])  # sample 1 is its own partner
    betas = torch.tensor([0.7, 0.6, 0.2, 1.0, 0.9], dtype=torch.float64)
    labels = _ref_mixco_labels(perm.tolist(), betas.tolist(), quirk)
    got_labels = mixco_soft_labels(perm, betas, quirk)
    assert torch.allclose(got_labels, torch.tensor(labels, dtype=torch.float64))
    sim = _sim(preds, targs, 0.006)
    ref = (_soft_ce(sim, labels) + _soft_ce(_transpose(sim), _transpose(labels))) / 2
    got = mixco_nce(preds, targs, 0.006, perm=perm, betas=betas, self_partner_quirk=quirk)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    # the fix keeps a self-partner row a distribution; the quirk does not
    assert sum(labels[1]) == pytest.approx(0.4 if quirk else 1.0)


def test_mixco_nce_without_mixing_is_hard_label_infonce():
    torch.manual_seed(1)
    preds, targs = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    sim = _sim(preds, targs, 0.05)
    eye = [[float(i == j) for j in range(6)] for i in range(6)]
    ref = (_soft_ce(sim, eye) + _soft_ce(_transpose(sim), eye)) / 2
    assert mixco_nce(preds, targs, 0.05).item() == pytest.approx(ref, rel=1e-9)
    assert mixco_nce(preds, targs, 0.05, bidirectional=False).item() == pytest.approx(_soft_ce(sim, eye), rel=1e-9)


# ---- InfoNCE / SoftCLIP ------------------------------------------------------------------------------------------


def test_symmetric_infonce_matches_loop_reference():
    torch.manual_seed(2)
    a, b = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    sim = _sim(a, b, 0.1)
    ref = 0.0
    for i in range(7):
        ref += -_log_softmax(sim[i])[i] - _log_softmax([sim[j][i] for j in range(7)])[i]
    assert symmetric_infonce(a, b, 0.1).item() == pytest.approx(ref / 14, rel=1e-9)


def test_symmetric_infonce_soft_labels_match_loop_reference():
    torch.manual_seed(3)
    a, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    labels = _ref_mixco_labels([1, 0, 3, 2], [0.8, 0.5, 1.0, 0.3], quirk=False)
    sim = _sim(a, b, 0.1)
    ref = (_soft_ce(sim, labels) + _soft_ce(_transpose(sim), _transpose(labels))) / 2
    got = symmetric_infonce(a, b, 0.1, soft_labels=torch.tensor(labels, dtype=torch.float64))
    assert got.item() == pytest.approx(ref, rel=1e-9)


def test_soft_clip_loss_matches_loop_reference():
    torch.manual_seed(4)
    preds, targs = torch.randn(6, 2, 5, dtype=torch.float64), torch.randn(6, 2, 5, dtype=torch.float64)
    temp = 0.3
    soft = [_softmax(row) for row in _sim(targs, targs, temp)]  # target-target similarity
    sim = _sim(preds, targs, temp)
    ref = (_soft_ce(sim, soft) + _soft_ce(_transpose(sim), soft)) / 2
    assert soft_clip_loss(preds, targs, temp).item() == pytest.approx(ref, rel=1e-9)


def test_softclip_temperature_cosine_ramp():
    n = 50
    ref = [0.0075 + (0.004 - 0.0075) / 2 * (1 + math.cos(math.pi * e / (n - 1))) for e in range(n)]
    got = [softclip_temperature(e, n) for e in range(n)]
    assert got == pytest.approx(ref)
    assert got[0] == pytest.approx(0.004) and got[-1] == pytest.approx(0.0075)
    assert all(x < y for x, y in zip(got, got[1:]))
    assert softclip_temperature(0, 1) == 0.004


# ---- Dice / BCE / CE / L1 ----------------------------------------------------------------------------------------


def _ref_dice(probs: list[list[float]], masks: list[list[float]], eps: float) -> float:
    inter = sum(p * m for p, m in zip(probs, masks))
    return 1 - (2 * inter + eps) / (sum(probs) + sum(masks) + eps)


def test_dice_per_sample_and_batch_match_loop_reference():
    torch.manual_seed(5)
    logits = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    masks = (torch.rand(4, 1, 3, 3) > 0.5).double()
    masks[2] = 0  # a frame without the key object
    probs = [[_sigmoid(v) for v in row] for row in logits.flatten(1).tolist()]
    rows = masks.flatten(1).tolist()
    per_sample = sum(_ref_dice(p, m, 1e-7) for p, m in zip(probs, rows)) / 4
    whole = _ref_dice([v for p in probs for v in p], [v for m in rows for v in m], 1e-7)
    assert dice_loss(logits, masks).item() == pytest.approx(per_sample, rel=1e-9)
    assert dice_loss(logits, masks, reduction="batch").item() == pytest.approx(whole, rel=1e-9)
    assert abs(per_sample - whole) > 1e-3
    with pytest.raises(ConfigError):
        dice_loss(logits, masks, reduction="clip")


def test_concept_bce_matches_loop_reference():
    torch.manual_seed(6)
    logits = torch.randn(3, 5, dtype=torch.float64)
    targets = (torch.rand(3, 5) > 0.6).double()
    ref = 0.0
    for lrow, trow in zip(logits.tolist(), targets.tolist()):
        for z, y in zip(lrow, trow):
            ref += -(y * math.log(_sigmoid(z)) + (1 - y) * math.log(1 - _sigmoid(z)))
    assert concept_bce(logits, targets).item() == pytest.approx(ref / 15, rel=1e-9)


def test_caption_ce_label_smoothing_and_ignore_index_match_loop_reference():
    torch.manual_seed(7)
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    labels = torch.tensor([[3, 0, 5, -100], [1, -100, -100, -100]])  # id 0 is a real token here
    eps, total, count = 0.1, 0.0, 0
    for b in range(2):
        for i in range(4):
            y = labels[b, i].item()
            if y == -100:
                continue
            logp = _log_softmax(logits[b, i].tolist())
            total += (1 - eps) * -logp[y] + eps * sum(-v for v in logp) / 6
            count += 1
    assert caption_ce(logits, labels, label_smoothing=eps).item() == pytest.approx(total / count, rel=1e-6)
    hits = [
        logits[b, i].argmax().item() == labels[b, i].item() for b in range(2) for i in range(4) if labels[b, i] != -100
    ]
    assert caption_token_accuracy(logits, labels) == pytest.approx(sum(hits) / len(hits))


def test_latent_l1_matches_loop_reference():
    torch.manual_seed(8)
    a, b = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref = sum(abs(x - y) for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert latent_l1(a, b).item() == pytest.approx(ref, rel=1e-9)


# ---- progressive weights and the total -----------------------------------------------------------------------------


def test_progressive_weights_follow_upstream_windows():
    starts, window = upstream_progressive_windows(50)
    assert starts == {"dice": 0, "concepts": 10, "caption": 20, "latent": 30} and window == 20
    nb = 432
    for task, s in starts.items():
        for epoch in (s - 1, s, s + 5, s + 10, s + 19, s + 20):
            for b in (0, 100, 431):
                inside = s <= epoch < s + 20
                ref = 1 + 9 * abs(math.sin(math.pi * ((epoch - s) * nb + b) / (20 * nb))) if inside else 1.0
                assert progressive_weight(epoch, b, nb, s, window) == pytest.approx(ref), (task, epoch, b)
    peaks = {task: progressive_weights(s + 10, 0, nb, starts, window)[task] for task, s in starts.items()}
    assert peaks == pytest.approx({t: 10.0 for t in starts})  # dice peaks at 10, concepts 20, caption 30, latent 40
    assert progressive_weights(25, 7, nb, starts, window)["dice"] == 1.0  # after its window
    assert progressive_weights(29, 431, nb, starts, window)["latent"] == 1.0  # before its window


def test_total_loss_composes_named_weights_and_multipliers():
    losses = {"prior": torch.tensor(2.0), "dice": torch.tensor(0.5), "text_nce": torch.tensor(1.5)}
    weights = {"prior": 30.0, "dice": 1.0, "text_nce": 1.0, "latent": 1.0}
    total, terms = total_loss(losses, weights, multipliers={"dice": 4.0})
    assert total.item() == pytest.approx(30 * 2.0 + 4.0 * 0.5 + 1.5)
    assert terms["prior"].item() == pytest.approx(60.0)

    @dataclass(frozen=True)
    class Weights:
        prior: float = 30.0
        dice: float = 2.0
        text_nce: float = 1.0

    assert total_loss(losses, Weights())[0].item() == pytest.approx(60 + 1.0 + 1.5)
    with pytest.raises(ConfigError):
        total_loss({"mystery": torch.tensor(1.0)}, weights)
