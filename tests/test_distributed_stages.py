"""Stages 3 to 6 on 2 torchrun CPU processes (gloo) against 1 process, on the smoke world.

Each process decodes, captions, generates or scores its round-robin share of the test clips (5 clips: shares of 3
and 2); the main process merges the shares in clip order. Every clip has its own seeds, so the 2-process run must
give the 1-process outputs: the same captions, concept and mask names, tensors up to float rounding (a CPU matmul of
a different batch need not round alike) and the same metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.smoke_env import REPO, SmokeEnv, copy_stages, run_paths, smoke_env, stage_config, with_toy_roles

ROLES = ("clip", "vae", "gpt2", "unclip", "blip2", "video", "frame_classifier", "video_classifier", "clip_pcc")
STAGE3_TENSORS = ("keyframes", "blurry_videos", "masks", "concept_probs", "prior_tokens")
ENTRY = """
import sys

from pipeline import stage3, stage4, stage5, stage6
from utils.config import load_config
from utils.stage_configs import STAGE_CONFIGS

profile, exp = sys.argv[1:3]
for stage, run in (("3", stage3.reconstruct), ("4", stage4.caption), ("5", stage5.generate), ("6", stage6.evaluate)):
    run(load_config(STAGE_CONFIGS[stage], profile, [], {"exp": exp, "mode": "enhance"}))
"""


def missing_roles(env: SmokeEnv) -> tuple[str, ...]:
    from models.foundation.toy.build import role_hashes
    from models.foundation.toy.common import is_complete, role_dir
    from models.foundation.toy.data import world_hash

    hashes = role_hashes(world_hash(env.world), "smoke", 0)
    return tuple(r for r in ROLES if not is_complete(role_dir(env.weights, r), hashes[r]))


@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> SmokeEnv:
    """The smoke env with every role; 5 test clips in batches of 2, small stage-5 and stage-6 settings."""
    base = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    scratch = tmp_path_factory.mktemp("distributed")
    missing = missing_roles(base)
    if missing:
        base = with_toy_roles(base, missing, scratch)
    profile = scratch / "distributed.yaml"
    profile.write_text(
        f"extends: {base.profile}\n"
        "stage3: {sample: {num_clips: 5, batch_size: 2, num_previews: 1}}\n"
        "stage4: {caption: {batch_size: 2}}\n"
        "stage5: {video: {steps: 4, strength: 0.5, num_previews: 0}}\n"
        "stage6: {eval: {batch_size: 2, bootstrap: 10}}\n"
    )
    return SmokeEnv(base.world, base.weights, base.exp_root, profile)


@pytest.fixture(scope="module")
def one(env: SmokeEnv) -> Path:
    """Stages 1 to 6 of run ``one`` in this process (stages 1 and 2 for one epoch); returns the run folder."""
    from pipeline import stage1, stage2, stage3, stage4, stage5, stage6

    stage1.train(stage_config(env, "1", "one", "train.num_epochs=1"))
    stage2.train(stage_config(env, "2", "one", "train.batch_size=8", "train.num_epochs=1"))
    for stage, run in (("3", stage3.reconstruct), ("4", stage4.caption), ("5", stage5.generate),
                       ("6", stage6.evaluate)):  # fmt: skip
        run(stage_config(env, stage, "one"))
    return run_paths(env, "one").root


@pytest.fixture(scope="module")
def two(env: SmokeEnv, one: Path, tmp_path_factory) -> Path:
    """Run ``one``'s stages 1 and 2, then stages 3 to 6 under torchrun with 2 processes; returns the run folder."""
    root = run_paths(env, "two").root
    copy_stages(one, root)
    entry = tmp_path_factory.mktemp("entry") / "stages_3_to_6.py"
    entry.write_text(ENTRY)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*launcher, str(entry), str(env.profile), "two"], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow
def test_stage3_shares_merge_into_the_one_process_outputs(one: Path, two: Path) -> None:
    a, b = one / "stage3_enhance", two / "stage3_enhance"
    for name in STAGE3_TENSORS:
        x, y = (load_file(d / f"{name}.safetensors")[name] for d in (a, b))
        assert x.shape == y.shape and x.shape[0] == 5, name
        torch.testing.assert_close(y.float(), x.float(), atol=5e-3, rtol=1e-2, msg=name)
    for name in ("captions.json", "concepts.json"):
        assert json.loads((b / name).read_text()) == json.loads((a / name).read_text()), name
    assert manifest(b)["processes"] == 2 and manifest(a)["processes"] == 1
    assert not list(b.glob("shard_*")), "shards are merged and removed"
    assert sorted(p.name for p in (b / "previews").iterdir()) == sorted(p.name for p in (a / "previews").iterdir())


@pytest.mark.slow
def test_stage4_and_5_follow_the_one_process_run(one: Path, two: Path) -> None:
    captions = [json.loads((r / "stage4_enhance" / "captions.json").read_text()) for r in (one, two)]
    assert len(captions[0]) == 5 and captions[1] == captions[0]
    assert manifest(two / "stage4_enhance")["processes"] == 2
    videos = [load_file(r / "stage5_enhance" / "videos.safetensors")["videos"].float() for r in (one, two)]
    torch.testing.assert_close(videos[1], videos[0], atol=2e-2, rtol=0)


@pytest.mark.slow
def test_stage6_on_two_processes_reports_what_one_process_reports(env: SmokeEnv, one: Path, two: Path) -> None:
    """The 2-process metrics of run ``two`` against stage 6 rerun on 1 process over the same inputs (the classifiers
    see other batches: float rounding only), and against run ``one`` (inputs that differ by rounding)."""
    from pipeline.stage6 import evaluate

    path = two / "metrics_enhance.json"
    distributed = json.loads(path.read_text())
    assert manifest(two / "eval_enhance")["processes"] == 2
    single = json.loads(evaluate(stage_config(env, "6", "two")).read_text())
    m1 = json.loads((one / "metrics_enhance.json").read_text())
    assert distributed["metrics"].keys() == single["metrics"].keys() == m1["metrics"].keys()
    for name, entry in single["metrics"].items():
        other = distributed["metrics"][name]
        assert other["n"] == entry["n"] == 5, name
        assert other["mean"] == pytest.approx(entry["mean"], abs=1e-4), name
        assert other["mean"] == pytest.approx(m1["metrics"][name]["mean"], abs=0.1), name
    assert distributed["chance_levels"] == single["chance_levels"]
    assert manifest(two / "eval_enhance")["processes"] == 1
