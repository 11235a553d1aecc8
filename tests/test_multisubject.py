"""One brain model for a subject set (issue 18): the config and CLI of ``run.subj`` sets, the batch plan that draws
every subject in a fixed proportion, and stage 1 trained on subjects 1-3 of the smoke world (one process and two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.smoke_env import SmokeEnv, smoke_env

REPO = Path(__file__).resolve().parents[1]
SET = ["run.subj=[1,2,3]", "train.batch_size=6", "train.num_epochs=1", "train.log_every=1"]


# ---- config and CLI ------------------------------------------------------------------------------------------------
def test_subject_sets_in_the_config_and_on_the_command_line() -> None:
    import argparse

    from utils.cli import subject_arg
    from utils.config import load_config, run_dir
    from utils.errors import ConfigError
    from utils.stage_configs import RunConfig, Stage1Config, parse_subjects

    assert parse_subjects("2") == 2 and parse_subjects("1,2,3") == (1, 2, 3) and parse_subjects("3, 1") == (3, 1)
    assert RunConfig(subj=(2,)) == RunConfig(subj=2), "a set of one is a single-subject run (same config and hash)"
    run = RunConfig(subj=(1, 2, 3))
    assert run.subjects == (1, 2, 3) and run.subj_text == "1,2,3"
    with pytest.raises(ConfigError, match="one subject"):
        _ = run.subject
    with pytest.raises(ConfigError, match="twice"):
        RunConfig(subj=(1, 1))
    cfg = load_config(Stage1Config, "smoke", ["run.subj=[1,3]"], {"exp": "x"})
    assert cfg.run.subjects == (1, 3) and run_dir(cfg).name == "subj_1-3"
    assert run_dir(load_config(Stage1Config, "smoke", [], {"exp": "x"})).name == "subj_1", "unchanged for one subject"
    assert subject_arg("1,2") == (1, 2) and subject_arg("3") == 3
    for bad in ("4", "1,x", "1,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            subject_arg(bad)


def test_the_paper_multisubject_profile() -> None:
    """``configs/paper_multisubject.yaml``: the paper's recipe for subjects 1-3, with batch sizes that split evenly."""
    from utils.config import load_config, run_dir
    from utils.stage_configs import STAGE_CONFIGS
    from utils.training import SubjectBatchPlan

    profile = str(REPO / "configs" / "paper_multisubject.yaml")
    for key, cls in STAGE_CONFIGS.items():
        cfg = load_config(cls, profile, [], {"exp": "shared"})
        assert cfg.run.subjects == (1, 2, 3) and cfg.model.size == "paper" and run_dir(cfg).name == "subj_1-2-3"
        if key in ("1", "2"):
            plan = SubjectBatchPlan.equal_shares((3888,) * 3, cfg.train.batch_size)  # 4320 less validation
            assert plan.per_subject * 3 == cfg.train.batch_size == {"1": 120, "2": 12}[key]


def test_the_driver_accepts_a_subject_set_and_refuses_a_bad_one() -> None:
    done = subprocess.run(["bash", str(REPO / "train_neurons.sh"), "cpu", "t", "1", "enhance", "1,4", "smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "1,4" in done.stderr and "1,2,3" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr


# ---- batch plan ----------------------------------------------------------------------------------------------------
def test_subject_batch_plan_draws_every_subject_in_a_fixed_proportion() -> None:
    from utils.errors import ConfigError
    from utils.training import SubjectBatchPlan

    plan = SubjectBatchPlan.equal_shares((20, 14, 17), 6, num_processes=2, seed=3)
    assert plan.per_subject == 2 and plan.global_batch == 6 and plan.steps_per_epoch == 7  # min(20, 14, 17) // 2
    assert plan.proportions == {0: pytest.approx(1 / 3), 1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3)}
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(plan.steps_per_epoch):
        glob = plan.batch_at(0, step)
        slots, clips = plan.decode(glob)
        assert slots.tolist() == [0, 0, 1, 1, 2, 2], "the same share of every subject in every global batch"
        assert all(c < n for c, n in zip(clips, np.repeat(plan.n_items, 2)))
        for k in range(3):
            seen[k] += clips[slots == k].tolist()
        halves = [plan.batch_at(0, step)[plan.share(r)] for r in (0, 1)]
        assert np.array_equal(np.concatenate(halves), glob), "the processes' shares tile the global batch"
    assert all(len(set(v)) == len(v) for v in seen.values()), "no clip twice in an epoch"
    assert np.array_equal(plan.batch_at(1, 0), SubjectBatchPlan.equal_shares((20, 14, 17), 6, 2, 3).batch_at(1, 0))
    assert not np.array_equal(plan.batch_at(0, 0), plan.batch_at(1, 0)), "a new order each epoch"
    with pytest.raises(ConfigError, match="multiple of 3"):
        SubjectBatchPlan.equal_shares((20, 20, 20), 8)


# ---- stage 1 on subjects 1-3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    torch.set_num_threads(threads)


def records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def driver_stage1(env: SmokeEnv, exp: str, nproc: int, *overrides: str) -> Path:
    """Stage 1 of subjects 1-3 through ``train_neurons.py`` under torchrun with ``nproc`` CPU processes."""
    args = ["--profile", str(env.profile), "--subj", "1,2,3", *(f"--set={o}" for o in (*SET[1:], *overrides))]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    done = subprocess.run([*launcher, str(REPO / "train_neurons.py"), *args, "--exp", exp], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return env.exp_root / f"exp_{exp}" / "subj_1-2-3" / "stage1"


@pytest.fixture(scope="module")
def set_run(env: SmokeEnv) -> Path:
    return driver_stage1(env, "set1", 1, "model.backbone_dropout=0")


def test_stage1_trains_one_ridge_per_subject_and_scores_each(env: SmokeEnv, set_run: Path) -> None:
    from utils.checkpoint import read_weights
    from utils.data import BrainVideoData
    from utils.data_catalog import SOURCES, fmri_file
    from utils.manifest import read_manifest

    weights, _ = read_weights(set_run / "checkpoints" / "best")
    ridges = sorted(k for k in weights if k.startswith("ridge.linears.") and k.endswith(".weight"))
    assert ridges == [f"ridge.linears.{i}.weight" for i in range(3)], "one ridge per subject, MindEye2's key layout"
    for slot, subj in enumerate((1, 2, 3)):
        n_vox = BrainVideoData(env.world, subj).n_voxels
        assert weights[f"ridge.linears.{slot}.weight"].shape[1] == n_vox, "slot k is subject subj[k]"
    assert not any(k.startswith("ridge.linears.3") for k in weights)
    ident = json.loads((set_run / "identification.json").read_text())
    assert sorted(ident["subjects"]) == ["1", "2", "3"]
    for scores in ident["subjects"].values():
        assert set(scores) == {"val", "test"} and 0 <= scores["test"]["top1"]["2-way"] <= 1
    val = [r for r in records(set_run) if r["split"] == "val"]
    for r in val:  # selection on the mean over subjects, each subject's score beside it
        per = [r[f"subj{k}/fwd_top1"] for k in (1, 2, 3)]
        assert r["fwd_top1"] == pytest.approx(float(np.mean(per)))
    manifest = read_manifest(set_run)
    assert manifest["subjects"] == [1, 2, 3]
    fmri = {str((env.world / fmri_file(k, s)).resolve()) for k in (1, 2, 3) for s in SOURCES}
    assert fmri <= set(manifest["inputs"]), "every subject's fMRI is recorded as an input"
    logs = list((set_run.parent / "logs").glob("stage1_*.log"))
    assert logs and "(proportion 0.333 / 0.333 / 0.333)" in logs[-1].read_text(), "the proportion is logged"


def test_stage1_of_a_subject_set_on_two_processes_follows_one_process(env: SmokeEnv, set_run: Path) -> None:
    from utils.checkpoint import read_weights

    two = driver_stage1(env, "set2", 2, "model.backbone_dropout=0")
    a, b = records(set_run), records(two)
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "image", "text", "metric"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra, rb)
    w1, _ = read_weights(set_run / "checkpoints" / "last")
    w2, _ = read_weights(two / "checkpoints" / "last")
    for k in (f"ridge.linears.{i}.weight" for i in range(3)):
        assert (w2[k] - w1[k]).abs().max() <= 1e-5 * w1[k].abs().max() + 1e-7, k


# ---- a new subject from a subject set's model ----------------------------------------------------------------------
def stage1_config(env: SmokeEnv, exp: str, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import Stage1Config

    return load_config(Stage1Config, str(env.profile), [*SET[1:], *overrides], {"exp": exp})


def test_train_fraction_keeps_whole_leading_segments() -> None:
    from utils.data import contiguous_val_split, leading_segments
    from utils.errors import DataError

    train, _ = contiguous_val_split(720, 0.1, 20, 1, 0)
    kept = leading_segments(train, 0.125, 30)
    assert abs(len(kept) - 0.125 * len(train)) <= 30 and set(kept) <= set(train)
    assert set(kept // 30) == set(range(kept.max() // 30 + 1)), "whole leading segments, none skipped"
    assert all(set(train[train // 30 == seg]) <= set(kept) for seg in set(kept // 30)), "segments are whole"
    assert len(leading_segments(train, 0.001, 30)) > 0 and np.array_equal(leading_segments(train, 1.0, 30), train)
    with pytest.raises(DataError, match="train_fraction"):
        leading_segments(train, 0.0, 30)


def drive(profile: Path, exp: str, stages: str, subj: str, sets: str = "") -> Path:
    """``bash train_neurons.sh cpu <exp> <stages> enhance <subj> <profile>`` with the fast pipeline settings (batches
    of 6: two or three subjects share them evenly) plus ``sets``; returns the run folder."""
    from tests.test_driver import FAST_PIPELINE

    overrides = f"{FAST_PIPELINE} stage1.train.batch_size=6 stage2.train.batch_size=6 {sets}"
    done = subprocess.run(["bash", str(REPO / "train_neurons.sh"), "cpu", exp, stages, "enhance", subj, str(profile)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "NEURONS_SET": overrides,
                               "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return profile.parent / "EXP" / f"exp_{exp}" / f"subj_{subj.replace(',', '-')}"


@pytest.fixture(scope="module")
def drive_profile(env: SmokeEnv, tmp_path_factory) -> Path:
    """The smoke env's profile with an exp_root of this module's own (beside the profile)."""
    profile = tmp_path_factory.mktemp("sets") / "sets.yaml"
    profile.write_text(f"extends: {env.profile}\npaths:\n  exp_root: {profile.parent / 'EXP'}\n")
    return profile


@pytest.fixture(scope="module")
def pair(drive_profile: Path) -> Path:
    """Stages 1-2 of one model for subjects 1 and 2 (the source of the adaptations to subject 3)."""
    return drive(drive_profile, "pair", "12", "1,2")


def test_adaptation_starts_from_the_shared_weights_and_trains_the_new_ridge_first(
    env: SmokeEnv, pair: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import stage1
    from utils.checkpoint import read_weights
    from utils.errors import ConfigError
    from utils.manifest import read_manifest

    source_dir = pair / "stage1"
    source, _ = read_weights(source_dir / "checkpoints" / "best")
    adapt = ["run.subj=3", f"train.init_from={source_dir.parent}", "data.train_fraction=0.25",
             "train.adapt_ridge_epochs=1", "train.num_epochs=2"]  # fmt: skip
    s = stage1.setup(stage1_config(env, "adapt", *adapt))
    own = s.model.state_dict()
    shared = [k for k in own if not k.startswith("ridge.")]
    assert shared and all(torch.equal(own[k], source[k]) for k in shared), "shared parts start as the source's"
    assert s.subjects.members[0].n_voxels == own["ridge.linears.0.weight"].shape[1]
    assert "ridge.linears.1.weight" not in own, "one ridge: the new subject's"
    assert s.data.n_clips("train") == 12, "a quarter of the 41 training clips, as two whole segments of 6"

    after_ridge_phase: dict[str, bool] = {}
    real_evaluate = stage1.evaluate

    def watching(s1, split="val", chunk=100):
        if not after_ridge_phase:  # end of epoch 0: only the ridge has moved
            now = s1.model.state_dict()
            after_ridge_phase["shared"] = all(torch.equal(now[k], source[k]) for k in shared)
            after_ridge_phase["ridge"] = not torch.equal(now["ridge.linears.0.weight"], own["ridge.linears.0.weight"])
        return real_evaluate(s1, split, chunk)

    monkeypatch.setattr(stage1, "evaluate", watching)
    out = stage1.train(stage1_config(env, "adapt", *adapt))
    assert after_ridge_phase == {"shared": True, "ridge": True}
    final, _ = read_weights(out / "checkpoints" / "last")
    assert any(not torch.equal(final[k], source[k]) for k in shared), "then everything trains"
    assert (out / "identification.json").is_file() and (out / "curves.png").is_file()
    manifest = read_manifest(out)
    assert manifest["init_from"].startswith(str(source_dir)) and manifest["train_fraction"] == 0.25
    assert manifest["train_clips"] == 12
    with pytest.raises(ConfigError, match="trained on"):
        stage1.setup(stage1_config(env, "again", "run.subj=2", f"train.init_from={source_dir.parent}"))


def test_init_from_on_the_command_line(env: SmokeEnv, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "train_neurons.py"), "--profile", str(env.profile), "--subj",
                           "3", "--exp", "cli", "--init-from", str(tmp_path), "--print-config"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"init_from: {tmp_path.resolve()}" in done.stdout
    done = subprocess.run([sys.executable, str(REPO / "train_neurons.py"), "--profile", str(env.profile), "--subj",
                           "3", "--exp", "cli", "--init-from", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "no stage-1 checkpoint under" in done.stderr


# ---- every stage of a subject set through the driver ---------------------------------------------------------------
def test_the_driver_runs_every_stage_for_a_subject_set(drive_profile: Path) -> None:
    """``bash train_neurons.sh cpu t 123456 enhance 1,2,3``: stages 1-2 train one model for the set, stages 3-6
    decode and score each subject from its own test fMRI (``subj_1-2-3/subj_<k>/``), and the report has a column
    per subject and their mean."""
    from safetensors.torch import load_file

    from utils.manifest import read_manifest

    run = drive(drive_profile, "t", "123456", "1,2,3")
    assert read_manifest(run / "stage2")["subjects"] == [1, 2, 3]
    val = [r for r in records(run / "stage2") if r["split"] == "val"]
    assert val and all(r["dice"] == pytest.approx(np.mean([r[f"subj{k}/dice"] for k in (1, 2, 3)])) for r in val)
    ident = json.loads((run / "stage1" / "identification.json").read_text())["subjects"]
    tokens = {}
    for k in (1, 2, 3):
        metrics = json.loads((run / f"subj_{k}" / "metrics_enhance.json").read_text())
        assert metrics["n_clips"] == 4 and metrics["brain_identification"] == ident[str(k)]["test"]
        assert read_manifest(run / f"subj_{k}" / "stage5_enhance") is not None
        tokens[k] = load_file(run / f"subj_{k}" / "stage3_enhance" / "prior_tokens.safetensors")
    assert not torch.equal(tokens[1]["prior_tokens"], tokens[2]["prior_tokens"]), "each subject's own fMRI"
    assert not (run / "stage3_enhance").exists(), "no decoding outside the subjects' folders"
    summary = subprocess.run([sys.executable, "-m", "pipeline.report", "--profile", str(drive_profile), "--exp", "t",
                              "--subj", "1,2,3"], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert summary.returncode == 0, summary.stderr
    header = next(line for line in summary.stdout.splitlines() if line.startswith("| metric"))
    assert header.split("|")[2:6] == [" subj 1 ", " subj 2 ", " subj 3 ", " mean of 3 "]
    row = next(line for line in summary.stdout.splitlines() if line.startswith("| video_2way |")).split("|")
    per = [float(json.loads((run / f"subj_{k}" / "metrics_enhance.json").read_text())["metrics"]["video_2way"]
                 ["mean"]) for k in (1, 2, 3)]  # fmt: skip
    assert float(row[5]) == pytest.approx(np.mean(per), abs=1e-3), "the mean column is the mean of the subjects"
    page = (run / "report.html").read_text()
    assert all(f'href="subj_{k}/report.html"' in page for k in (1, 2, 3)) and "mean of 3" in page
    assert "ours: stage 1" in (run / "subj_2" / "report.html").read_text(), "each subject's stage-1 identification"


def test_a_new_subject_adapts_through_every_stage(env: SmokeEnv, drive_profile: Path, pair: Path) -> None:
    """Subject 3 from a subjects-1-2 model on a quarter of its training clips, through the driver: stage 1 trains
    the new ridge alone (at its own LR), then everything; stage 2 starts its prior and heads from the set's; stages
    3-6 write every output. The shared parts start out equal to the source's."""
    from pipeline import stage2
    from utils.checkpoint import read_weights
    from utils.config import load_config
    from utils.manifest import read_manifest
    from utils.stage_configs import Stage1Config, Stage2Config

    profile, source = drive_profile, pair
    adapt = (f"data.train_fraction=0.25 stage1.train.init_from={source} stage2.train.init_from={source} "
             "stage1.train.num_epochs=2 stage1.train.adapt_ridge_epochs=1 "
             "stage1.train.adapt_ridge_lr=1e-2")  # fmt: skip
    run = drive(profile, "adapt", "123456", "3", adapt)
    assert read_manifest(run / "stage1")["train_clips"] == 12
    assert json.loads((run / "metrics_enhance.json").read_text())["n_clips"] == 4
    assert read_manifest(run / "stage5_enhance") is not None and (run / "report.html").is_file()
    train = [r for r in records(run / "stage1") if r["split"] == "train"]
    max_lr = load_config(Stage1Config, str(profile), [], {"exp": "x"}).train.max_lr
    assert {r["epoch"] for r in train} == {0, 1}
    for r in train:  # the ridge-only epoch at adapt_ridge_lr, then the schedule's own LR
        assert r.get("lr_scale", 1.0) == (pytest.approx(1e-2 / max_lr) if r["epoch"] == 0 else 1.0), r

    cfg = load_config(Stage2Config, str(profile), ["run.subj=3", f"train.init_from={source}",
                                                   "data.train_fraction=0.25"], {"exp": "adapt"})  # fmt: skip
    s = stage2.setup(cfg)
    heads, _ = read_weights(source / "stage2" / "checkpoints" / "best")
    own = s.model.state_dict()
    keys = [k for k in own if k.split(".")[0] in stage2.HEAD_PARTS]
    assert keys and all(torch.equal(own[k], heads[k]) for k in keys), "the prior and heads start as the set's"
    stage1, _ = read_weights(run / "stage1" / "checkpoints" / "best")
    assert torch.equal(own["ridge.linears.0.weight"], stage1["ridge.linears.0.weight"]), "stage 1 is this run's"
