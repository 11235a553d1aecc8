"""Learning canaries (``pytest -k canary``): stage 1 and each stage-2 head, trained for seconds, must beat chance or
an input-blind baseline on the 24 held-out TEST clips, and breaking the matching loss must make the canary fail.

World: the smoke world with ``world.snr=1.0`` instead of 0.01 (same stimuli, so the same smoke toy weights). At 0.01
the 38 training clips (single repeats) carry too little signal to learn from in seconds: stage 1 stayed at chance for
30 epochs (test 2-way 0.47-0.53, 3 seeds) where the ridge baseline reaches 0.63; at 1.0 the ridge reaches 0.79. A
canary is about learning, not about the world's difficulty.

Recipes (overrides of the smoke profile): stage 1 runs 20 epochs of 5 steps (batch 8); stage 2 runs 6 epochs of 5
steps at a constant learning rate of 1e-2 without progressive weights (at the profile's 1e-3 the heads barely leave
their initialisation in 30 steps). Both are scored on their ``last`` checkpoint: ``best`` is picked on 5 validation
clips, too few to select on (in 2 of 8 seeds stage 1 kept an epoch-1 checkpoint at test 2-way 0.55).

Each canary is one rule (``STAGE1_RULE``, ``STAGE2_RULES``), asserted to hold on the real run and to fail with its
loss broken. Thresholds from 7 seeds (42 = the profile's, 0, 1, 2, 3, 5, 7) of exactly these runs; trained / broken:

* stage 1, test 2-way identification (chance 0.5): 0.636-0.793 / 0.443-0.529 with the image loss's prediction
  detached (and the text loss off; detaching the image prediction alone also gave 0.496-0.542, 3 seeds) → 0.60;
* key-object Dice (soft, clips with a key object): 0.248-0.264 / 0.176-0.192 with the Dice loss off; an all-one mask
  scores 0.200, an empty one 0 → all-one + 0.02;
* caption token accuracy (teacher-forced): 0.182-0.436 / 0.078-0.110 with the caption loss off; the most frequent
  training token scores 0.110 → that + 0.03 (the most frequent token of each position scores 0.309; beaten in 5 of 7);
* concepts: no held-out score separates a trained head from an untrained one here, so this canary checks that the
  head learned the training label frequencies: the correlation of its test logits' class means with the training
  log-odds is 0.937-0.991 / -0.536-0.399 with the concept loss off → 0.8. Micro F1 at 0.5 (the stage's score) is
  0.319-0.487 / 0.287-0.540: an untrained head's logits sit near 0, which beats the most frequent label set (0.234);
  the all-positive rule (0.504) was beaten by no run, nor by logistic regression on the ground-truth CLIP tokens
  (0.47, 38 training clips). Micro AUROC is 0.594-0.653 / 0.379-0.623, around the training-frequency prior's 0.618.

Seconds on 2 quiet cores: stage 1 1-2 (each run), stage 2 12-14 (each run), the module about 37 with the world builds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.smoke_env import SmokeEnv, copy_stages, fmri_variant, smoke_env

SNR = 1.0
STAGE1 = ["train.batch_size=8", "train.num_epochs=20", "train.log_every=5"]
STAGE2 = ["train.batch_size=8", "train.num_epochs=6", "train.max_lr=1e-2", "train.lr_scheduler=constant",
          "progressive.enabled=false", "train.log_every=5"]  # fmt: skip
BROKEN_HEADS = ["loss_weights.concepts=0", "loss_weights.dice=0", "loss_weights.caption=0"]


@dataclass(frozen=True)
class Rule:
    """One canary: ``scores[key]`` must be at least ``margin`` above the best of its ``baselines`` (score keys of the
    input-blind predictors, or chance as a number)."""

    what: str
    key: str
    baselines: tuple[str | float, ...]
    margin: float

    def check(self, scores: dict[str, float]) -> tuple[bool, str]:
        floor = max(scores[b] if isinstance(b, str) else b for b in self.baselines) + self.margin
        value = scores[self.key]
        return value >= floor, f"{self.what} {value:.3f} (needs >= {floor:.3f}); scores {scores}"


STAGE1_RULE = Rule("stage-1 test 2-way identification", "2-way", (0.5,), 0.10)
STAGE2_RULES = {
    "concepts": Rule("r(concept logits' class means, training log-odds)", "concept_prior_r", (0.0,), 0.8),
    "dice": Rule("key-object Dice", "dice", ("dice_ones", "dice_empty"), 0.02),
    "caption": Rule("caption token accuracy", "caption_acc", ("caption_acc_mode",), 0.03),
}


# ---- runs ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")  # the session's smoke weights
    yield fmri_variant(base, tmp_path_factory.mktemp("canary"), snr=SNR)
    torch.set_num_threads(threads)


def config(env: SmokeEnv, stage: str, exp: str, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    return load_config(STAGE_CONFIGS[stage], str(env.profile), list(overrides), {"exp": exp})


def trained(module: Any, cfg: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``module.train(cfg)`` and return the stage object it built (``module.setup``'s result, kept by a spy)
    holding the ``last`` checkpoint's weights."""
    from utils.checkpoint import load_checkpoint

    real, kept = module.setup, []
    monkeypatch.setattr(module, "setup", lambda c: kept.append(real(c)) or kept[-1])
    out = module.train(cfg)
    monkeypatch.setattr(module, "setup", real)
    load_checkpoint(out / "checkpoints" / "last", kept[0].model, cfg)  # stage 1 reloads best to report it
    return kept[0]


def stage1_scores(env: SmokeEnv, exp: str, *overrides: str) -> dict[str, float]:
    from pipeline import stage1

    with pytest.MonkeyPatch.context() as mp:
        s = trained(stage1, config(env, "1", exp, *STAGE1, *overrides), mp)
    return stage1.identification(s, "test")["top1"]


def stage2_scores(env: SmokeEnv, exp: str, *overrides: str) -> dict[str, float]:
    """Brain-only test scores of the ``last`` stage-2 checkpoint (``pipeline.stage2.evaluate``), the concept logits'
    micro AUROC and the correlation of their class means with the training log-odds (``concept_prior_r``), beside the
    input-blind baselines (``pipeline.stage2.trivial_scores``)."""
    from pipeline import stage2

    with pytest.MonkeyPatch.context() as mp:
        s = trained(stage2, config(env, "2", exp, *STAGE2, *overrides), mp)
    stage2.add_split(s, "test")
    logits, labels = stage2.concept_outputs(s, "test")  # (n, C) each
    n_train = s.data.n_clips("train")
    freq = s.data.concept_labels("train").mean(0).clamp(0.5 / n_train, 1 - 0.5 / n_train)  # (C,)
    pair = torch.stack([logits.mean(0), torch.log(freq / (1 - freq))])  # (2, C)
    return {**stage2.evaluate(s, "test"), "concept_auroc": stage2.auroc(logits.flatten(), labels.flatten()),
            "concept_prior_r": float(torch.corrcoef(pair)[0, 1]), **stage2.trivial_scores(s, "test")}  # fmt: skip


@pytest.fixture(scope="module")
def stage1_run(env: SmokeEnv) -> dict[str, float]:
    return stage1_scores(env, "canary")


@pytest.fixture(scope="module")
def stage2_run(env: SmokeEnv, stage1_run: dict[str, float]) -> dict[str, float]:
    return stage2_scores(env, "canary")


# ---- the canaries --------------------------------------------------------------------------------------------------
def test_stage1_canary_beats_chance_identification(stage1_run: dict[str, float]) -> None:
    ok, message = STAGE1_RULE.check(stage1_run)
    assert ok, message


@pytest.mark.parametrize("head", sorted(STAGE2_RULES))
def test_stage2_canary_each_head_beats_its_baseline(stage2_run: dict[str, float], head: str) -> None:
    ok, message = STAGE2_RULES[head].check(stage2_run)
    assert ok, message


def test_stage1_canary_detects_a_detached_prediction(env: SmokeEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image losses (BiMixCo, SoftCLIP) see a detached prediction and the text loss is weighted 0: the run learns
    nothing, and the stage-1 canary fails (at chance, not merely below the threshold)."""
    from pipeline import stage1

    for name in ("mixco_nce", "soft_clip_loss"):
        real = getattr(stage1, name)
        monkeypatch.setattr(stage1, name, lambda preds, *a, _real=real, **k: _real(preds.detach(), *a, **k))
    scores = stage1_scores(env, "canary_detached", "train.text_weight=0")
    ok, message = STAGE1_RULE.check(scores)
    assert not ok, message
    assert abs(scores["2-way"] - 0.5) < 0.1, scores


def test_stage2_canary_detects_zeroed_head_losses(env: SmokeEnv, stage1_run: dict[str, float]) -> None:
    """The concept, Dice and caption losses weighted 0 (the same stage-1 model): every head's canary fails."""
    from utils.runs import RunPaths

    root = RunPaths.from_config(config(env, "2", "canary")).root
    copy_stages(root, RunPaths.from_config(config(env, "2", "canary_zeroed")).root, ("stage1",))
    scores = stage2_scores(env, "canary_zeroed", *BROKEN_HEADS)
    for head, rule in STAGE2_RULES.items():
        ok, message = rule.check(scores)
        assert not ok, f"{head} canary passed without its loss: {message}"
