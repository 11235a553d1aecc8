"""Stage 1 (brain model) on the smoke world: outputs, finite losses, exact resume after an interruption."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.smoke_env import SmokeEnv, smoke_env
from utils.data_catalog import SOURCES, TOKENS_PROJ_FILE, caption_emb_file, fmri_file, frames_file

COMMON = ["train.batch_size=8", "train.num_epochs=2", "train.log_every=1"]
INTERRUPT_AT = 7  # mid-way through epoch 1 (5 steps per epoch)


@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    torch.set_num_threads(threads)


def config(env: SmokeEnv, exp: str, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import Stage1Config

    return load_config(Stage1Config, str(env.profile), [*COMMON, *overrides], {"exp": exp})


@pytest.fixture(scope="module")
def run_a(env: SmokeEnv) -> Path:
    from pipeline.stage1 import train

    return train(config(env, "s1_a"))


def records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_checkpoints_and_manifest_with_finite_losses(env: SmokeEnv, run_a: Path) -> None:
    from utils.manifest import read_manifest

    for name in ("best", "last"):
        assert (run_a / "checkpoints" / name / "model.safetensors").is_file()
    manifest = read_manifest(run_a)
    assert manifest["stage"] == "1" and manifest["depends_on"] == []
    assert manifest["selected_on"] == "val", "the default selects on the held-out validation clips"
    read = [*(fmri_file(1, s) for s in SOURCES), *map(frames_file, SOURCES), *map(caption_emb_file, SOURCES)]
    assert sorted(manifest["inputs"]) == sorted(str((env.world / f).resolve()) for f in (*read, TOKENS_PROJ_FILE))
    rows = records(run_a)
    assert all(math.isfinite(r[k]) for r in rows if r["split"] == "train" for k in ("loss", "image", "text"))
    assert [r["epoch"] for r in rows if r["split"] == "val"] == [0, 1]


def test_resume_after_interruption_matches_an_uninterrupted_run(
    env: SmokeEnv, run_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import stage1
    from utils.checkpoint import read_weights

    real, calls = stage1.step_loss, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == INTERRUPT_AT:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage1, "step_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        stage1.train(config(env, "s1_b"))
    monkeypatch.setattr(stage1, "step_loss", real)
    out_b = stage1.train(config(env, "s1_b", "train.resume=true"))
    want, _ = read_weights(run_a / "checkpoints" / "last")
    got, _ = read_weights(out_b / "checkpoints" / "last")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert records(out_b) == records(run_a)


def test_two_processes_follow_the_one_process_run(env: SmokeEnv) -> None:
    """torchrun with 2 CPU processes (gloo) at the same global batch: the same LR schedule, losses and weights as
    1 process.

    Dropout is off because each process draws dropout masks for its own share of the batch.
    """
    import os
    import subprocess
    import sys

    from models.brain import inert_parameters
    from utils.checkpoint import read_weights

    repo = Path(__file__).resolve().parents[1]
    args = ["--profile", str(env.profile), *(f"--set={o}" for o in (*COMMON, "model.backbone_dropout=0"))]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    runs = {}
    for n in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        done = subprocess.run([*launcher, str(repo / "train_neurons.py"), *args, "--exp", f"ddp{n}"],
                              cwd=repo, env=environ, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs[n] = env.exp_root / f"exp_ddp{n}" / "subj_1" / "stage1"
    one, two = records(runs[1]), records(runs[2])
    assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
    for a, b in zip(one, two):
        assert a.get("lr") == b.get("lr")  # the same schedule, step for step
        for key in ("loss", "image", "text", "metric"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)
    w1, _ = read_weights(runs[1] / "checkpoints" / "last")
    w2, _ = read_weights(runs[2] / "checkpoints" / "last")
    assert w1.keys() == w2.keys()
    inert = set(inert_parameters(smoke_stage1_model()))
    for name in sorted(set(w1) - inert):  # the same final weights, to float rounding
        assert (w2[name] - w1[name]).abs().max() <= 1e-5 * w1[name].abs().max() + 1e-7, name
    # Parameters that cannot affect the output get rounding noise for gradients, which Adam turns into steps of
    # about lr (models.brain.inert_parameters): they may drift by up to lr per step, no more.
    bound = config(env, "bound").train.max_lr * len([r for r in one if r["split"] == "train"])  # lr x steps
    assert max((w1[k] - w2[k]).abs().max().item() for k in inert) <= bound


def test_upstream_validation_trains_on_every_clip_and_selects_on_the_test_clips(
    env: SmokeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.validation=test_upstream`` (defect 16, spec §3.7): no holdout, the partial batch kept
    (``train.drop_last=false``), the best epoch picked on the test clips; the manifest and the report say so."""
    from pipeline import report, stage1
    from utils.config import load_config
    from utils.data import BrainVideoData
    from utils.manifest import read_manifest
    from utils.runs import RunPaths
    from utils.stage_configs import Stage6Config

    cfg = config(env, "s1_up", "data.validation=test_upstream", "train.drop_last=false", "train.batch_size=7")
    n_all = BrainVideoData(env.world, 1).n_source("train")
    scored, real = [], stage1.evaluate
    monkeypatch.setattr(stage1, "evaluate", lambda s, split="val", **kw: scored.append(split) or real(s, split, **kw))
    out = stage1.train(cfg)
    assert scored == ["test", "test"], "each epoch's selection scores the test clips"
    manifest = read_manifest(out)
    assert manifest["selected_on"] == "test (upstream, defect 16)" and manifest["train_clips"] == n_all
    rows = records(out)
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 2 * math.ceil(n_all / 7), "every clip, the last partial batch included"
    assert [r["epoch"] for r in rows if r["split"] == "test"] == [0, 1]
    assert not [r for r in rows if r["split"] == "val"]
    assert set(json.loads((out / "identification.json").read_text())) == {"test"}, "no val split to report"
    cfg6 = load_config(Stage6Config, str(env.profile), [], {"exp": "s1_up"})
    warnings = report.selection_warnings(RunPaths.from_config(cfg6))
    assert len(warnings) == 1 and "stage 1 selected its best epoch on the TEST clips" in warnings[0]
    assert warnings[0] in report.write_report(cfg6).read_text()


# ---- defect 17 through the stage: the losses of the first steps (docs/fidelity.md) ---------------------------------
class SelfPartnerStep(Exception):
    """Stops a stage-1 run after the first step where a sample is its own MixCo partner."""


def steps_to_self_partner(env: SmokeEnv, exp: str, *overrides: str) -> list[dict[str, float]]:
    """The losses of every step of ``stage1.train`` up to the first whose MixCo permutation has a fixed point (where
    the defect-17 quirk acts); the run is stopped right after it."""
    from pipeline import stage1

    got: list[dict[str, float]] = []
    real_step, real_mixco = stage1.step_loss, stage1.mixco
    fixed = {"point": False}

    def counted(*args, **kwargs):
        out = real_step(*args, **kwargs)
        got.append({k: float(out[k].detach()) for k in ("image", "text")})
        if fixed["point"]:
            raise SelfPartnerStep
        return out

    def mixco(*args, **kwargs):
        mixed = real_mixco(*args, **kwargs)
        fixed["point"] = bool((mixed.perm == torch.arange(len(mixed.perm))).any())
        return mixed

    stage1.step_loss, stage1.mixco = counted, mixco
    try:
        with pytest.raises(SelfPartnerStep):
            stage1.train(config(env, exp, *overrides))
    finally:
        stage1.step_loss, stage1.mixco = real_step, real_mixco
    return got


@pytest.fixture(scope="module")
def default_steps(env: SmokeEnv) -> list[dict[str, float]]:
    return steps_to_self_partner(env, "s1_flag_default")


def test_text_nce_hard_labels_change_the_text_loss_through_the_stage(
    env: SmokeEnv, default_steps: list[dict[str, float]]
) -> None:
    """``train.text_nce_soft_labels=false`` (upstream, defect 17) through ``stage1.train``: the first step's text NCE
    on the BiMixCo-mixed voxels differs from the default run's, the image loss is bit-identical."""
    got = steps_to_self_partner(env, "s1_flag_hard", "train.text_nce_soft_labels=false")
    assert {k for k in got[0] if got[0][k] != default_steps[0][k]} == {"text"}, (got[0], default_steps[0])


def test_mixco_self_partner_quirk_changes_the_losses_of_a_self_partner_step_through_the_stage(
    env: SmokeEnv, default_steps: list[dict[str, float]]
) -> None:
    """``train.mixco_self_partner_quirk=true`` (MindEye's overwrite, defect 17) through ``stage1.train``: every step
    until a sample is its own MixCo partner is bit-identical to the default run; that step's losses (image, and text
    through the same soft labels) differ."""
    got = steps_to_self_partner(env, "s1_flag_quirk", "train.mixco_self_partner_quirk=true")
    assert len(got) == len(default_steps) > 1 and got[:-1] == default_steps[:-1]
    assert {k for k in got[-1] if got[-1][k] != default_steps[-1][k]} == {"image", "text"}


def smoke_stage1_model():
    """A stage-1 model of the smoke size (the parameter names of the runs above; the dims do not matter)."""
    from models.brain import NeuronsBrainModel
    from models.sizes import STAGE1_PARTS, FoundationDims, brain_config

    dims = FoundationDims(clip_tokens=4, clip_dim=4, text_dim=4, latent_channels=4, latent_size=4)
    return NeuronsBrainModel(brain_config("smoke", n_voxels=(4,), n_classes=1, dims=dims, parts=STAGE1_PARTS))
