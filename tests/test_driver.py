"""The shell driver, exercised through a subprocess.

Argument checks run against the real checkout. Stage selection, ordering, logging and failure propagation run in a
scratch copy of the driver whose stage scripts are small probe stages built on the real entry-point code
(``utils.cli.run_stage``): each records that it ran, and one fails on a missing data root set by a test profile.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys
from pathlib import Path
from utils.cli import run_stage
from utils.errors import DataError
from utils.stage_configs import STAGE_CONFIGS

def main(cfg):
    if not Path(cfg.paths.data_root).exists():
        raise DataError(f"data root {cfg.paths.data_root} does not exist", "build it with download_dataset.py")
    with open(Path(cfg.paths.exp_root) / "order.txt", "a") as fh:
        fh.write("STAGE " + str(cfg.run.subj) + " " + cfg.run.mode + "\\n")
    print("probe stage STAGE ran")
    if hasattr(cfg, "video"):  # a string override with spaces, passed through NEURONS_SET
        print("prompt suffix", repr(cfg.video.prompt_suffix))

if __name__ == "__main__":
    sys.exit(run_stage(STAGE_CONFIGS["STAGE"], main))
"""


def drive(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", str(cwd / "train_neurons.sh"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def probe_repo(tmp_path: Path) -> Path:
    """A copy of the driver and its packages with probe stage scripts, plus a profile whose data root exists."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "train_neurons.sh", repo)
    for package in ("utils", "configs", "tasks_construction"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    for stage in STAGES:
        (repo / stage.script).write_text(re.sub(r"\bSTAGE\b", stage.key, PROBE))
    (tmp_path / "data").mkdir()
    (repo / "ok.yaml").write_text(
        f"extends: smoke\npaths:\n  data_root: {tmp_path / 'data'}\n  exp_root: {tmp_path}\n"
    )
    return repo


def test_usage():
    help_run = drive("-h")
    assert help_run.returncode == 0 and help_run.stdout.startswith("usage: bash train_neurons.sh")
    bare = drive()
    assert bare.returncode == 2 and "usage:" in bare.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gpu0", "x", "1", "enhance", "1"], "bad GPU 'gpu0'; valid: cpu"),
        (["0,,1", "x", "1", "enhance", "1"], "bad GPU '0,,1'"),
        (["cpu", "x y", "1", "enhance", "1"], "bad EXP 'x y'"),
        (["cpu", "x", "12z", "enhance", "1"], "bad STAGES '12z' (unknown: 'z'); valid characters: 1 2 3 4 5 6 e"),
        (["cpu", "x", "", "enhance", "1"], "bad STAGES ''"),
        (["cpu", "x", "1", "self", "1"], "bad MODE 'self'; valid: enhance, motion"),
        (["cpu", "x", "1", "enhance", "0"], "bad SUBJ '0'; valid: 1, 2, 3"),
        (["cpu", "x", "1", "enhance", "1", "big"],
         "bad PROFILE 'big'; valid: paper, paper_upstream, toy, smoke, smoke_upstream"),
        (["cpu", "x", "1", "enhance", "1", "missing.yaml"], "bad PROFILE 'missing.yaml': file not found"),
        (["cpu", "x", "1", "enhance"], "expected 5 or 6 arguments"),
    ],
)
def test_invalid_arguments(args, message):
    result = drive(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_stages_run_in_fixed_order_with_logs(probe_repo: Path, tmp_path: Path):
    result = drive("cpu", "demo", "e61", "motion", "2", "ok.yaml", cwd=probe_repo)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "order.txt").read_text().split("\n")[:-1] == ["1 2 motion", "6 2 motion", "e 2 motion"]
    logs = sorted((tmp_path / "exp_demo" / "subj_2" / "logs").iterdir())
    names = [p.name for p in logs]
    assert all(re.fullmatch(r"stage[16e]_\d{8}-\d{6}\.log", n) for n in names) and len(names) == 3
    assert "probe stage 6 ran" in next(p for p in logs if p.name.startswith("stage6")).read_text()


def test_a_failing_stage_stops_the_run(probe_repo: Path, tmp_path: Path):
    broken = probe_repo / "broken.yaml"
    broken.write_text(f"extends: ok.yaml\nstage2:\n  paths:\n    data_root: {tmp_path / 'nowhere'}\n")
    result = drive("cpu", "demo", "123", "enhance", "1", "broken.yaml", cwd=probe_repo)
    assert result.returncode != 0
    assert (tmp_path / "order.txt").read_text() == "1 1 enhance\n"  # stage 3 never ran
    match = re.search(r"error: stage 2 \(decoupler\) failed with exit status 1; see (\S+)", result.stderr)
    assert match, result.stderr
    log = Path(match.group(1))
    assert "DataError: data root" in log.read_text() and log.name.startswith("stage2_")


def test_missing_stage_script_is_refused_before_anything_runs(probe_repo: Path, tmp_path: Path):
    (probe_repo / "recon_video.py").unlink()
    result = drive("cpu", "demo", "15", "enhance", "1", "ok.yaml", cwd=probe_repo)
    assert result.returncode == 2 and "stage 5 (video reconstruction) is not available" in result.stderr
    assert not (tmp_path / "order.txt").exists()


def test_gpu_list_uses_accelerate_for_multi_device_stages(probe_repo: Path, tmp_path: Path):
    """With a fake interpreter we can see the command lines without any GPU."""
    fake = tmp_path / "fakepy"
    real = f'if [[ "$1" == "-c" || "$2" == "utils.stages" ]]; then exec {sys.executable} "$@"; fi\n'  # queries run
    fake.write_text(f'#!/usr/bin/env bash\necho "$CUDA_VISIBLE_DEVICES :: $*" >> {tmp_path}/calls.txt\n{real}')
    fake.chmod(0o755)
    result = drive("0,1", "demo", "16e", "enhance", "1", "ok.yaml", cwd=probe_repo, env={"PYTHON": str(fake)})
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    for script in ("train_neurons.py", "eval_metrics.py"):  # stages 1 to 6 shard their work over processes
        call = next(c for c in calls if script in c)
        assert call.startswith("0,1 :: -m accelerate.commands.launch --num_processes 2"), call
        assert re.search(r" --main_process_port [1-9]\d* ", call), call  # a port the OS reported free
    stage_e = next(c for c in calls if "gen_decoupled_outputs.py" in c)
    assert stage_e.startswith("0,1 :: -u ") and "accelerate.commands" not in stage_e


def test_neurons_set_overrides_may_be_quoted(probe_repo: Path, tmp_path: Path):
    env = {"NEURONS_SET": "run.seed=3 'stage5.video.prompt_suffix=, 8k uhd' stage5.video.steps=2"}
    result = drive("cpu", "demo", "5", "enhance", "1", "ok.yaml", cwd=probe_repo, env=env)
    assert result.returncode == 0, result.stderr
    assert "prompt suffix ', 8k uhd'" in result.stdout
    bad = drive("cpu", "demo", "5", "enhance", "1", "ok.yaml", cwd=probe_repo, env={"NEURONS_SET": "'unclosed"})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: bad NEURONS_SET (No closing quotation)")
    assert (tmp_path / "order.txt").read_text() == "5 1 enhance\n"  # only the first run reached the stage


def test_stage_script_runs_on_its_own(probe_repo: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(probe_repo)}
    cmd = [sys.executable, "train_neurons.py", "--profile", "ok.yaml", "--subj", "3", "--exp", "solo"]
    result = subprocess.run(
        [*cmd, "--set", "train.batch_size=2"], cwd=probe_repo, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exp_solo" / "subj_3" / "logs").is_dir()  # a standalone run logs into the run folder
    bad = subprocess.run([*cmd, "--set", "train.batchsize=2"], cwd=probe_repo, env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: ConfigError: unknown config key 'train.batchsize' in --set train.batchsize=2; "
        "fix: did you mean 'train.batch_size'?"
    )


# ---- the whole pipeline at the smoke scale (what `make demo PROFILE=smoke` runs) ------------------------------------
FAST_PIPELINE = (
    "stage1.train.num_epochs=1 stage2.train.num_epochs=1 stage3.sample.num_clips=4 stage3.sample.num_previews=1 "
    "stage5.video.num_previews=1 stage6.eval.bootstrap=5 stage6.eval.report_samples=2 stagee.sample.num_panels=1"
)


def all_smoke_roles(world: Path) -> Path:
    """A weights folder with every smoke toy role: the repository's when up to date, else the session's build."""
    from models.foundation.toy.build import ROLES
    from tests.smoke_env import smoke_weights

    return smoke_weights(world, ROLES)


def test_driver_runs_every_stage_at_smoke_scale(smoke_world: Path, tmp_path_factory):
    """Stages 1-6 and e through the driver on the smoke world (4 test clips), then the report summary that ends
    `make demo`: metrics, diagnostics, the report and one log per stage."""
    import json

    from tests.smoke_env import smoke_env

    env = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    scratch = tmp_path_factory.mktemp("driver_all")
    weights = all_smoke_roles(smoke_world)
    profile = scratch / "all.yaml"
    profile.write_text(f"extends: {env.profile}\npaths:\n  weights_root: {weights}\n  exp_root: {scratch / 'EXP'}\n")
    env_vars = {"NEURONS_SET": FAST_PIPELINE, "OMP_NUM_THREADS": "1"}
    result = drive("cpu", "all", "123456e", "enhance", "1", str(profile), env=env_vars, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NEURONS: done (stages 123456e)" in result.stdout
    run = scratch / "EXP" / "exp_all" / "subj_1"
    metrics = json.loads((run / "metrics_enhance.json").read_text())
    assert metrics["n_clips"] == 4 and {"video_2way", "ssim", "key_object_dice"} <= set(metrics["metrics"])
    ident = json.loads((run / "stage1" / "identification.json").read_text())["test"]
    assert metrics["brain_identification"] == ident and set(ident["top1"]) >= {"2-way"}
    assert (run / "diagnostics_enhance" / "manifest.json").exists()
    assert "Diagnostics (stage e, enhance)" in (run / "report.html").read_text()
    assert sorted(p.name.split("_")[0] for p in (run / "logs").iterdir()) == [f"stage{k}" for k in "123456e"]
    from utils.manifest import read_manifest

    assert read_manifest(run / "stage2")["depends_on"] == ["1"]
    summary = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "--profile", str(profile), "--exp", "all", "--subj", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert summary.returncode == 0, summary.stderr
    assert "| video 2-way |" in summary.stdout and f"report: {(run / 'report.html').resolve()}" in summary.stdout

    # motion mode reuses stages 1-2 and writes its own folders; a rerun with the same seed gives identical videos
    import torch
    from safetensors.torch import load_file

    result = drive("cpu", "all", "3456", "motion", "1", str(profile), env=env_vars, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run / "metrics_motion.json").read_text())["mode"] == "motion"
    stage3 = read_manifest(run / "stage3_motion")  # motion mode reads the same stage 2
    assert stage3["depends_on"] == ["2"] and stage3["outputs"]["keyframes.safetensors"]["shape"][0] == 4
    first = load_file(run / "stage5_motion" / "videos.safetensors")["videos"]
    assert first.shape[0] == 4 and first.ndim == 5  # (clips, frames, 3, H, W)
    result = drive("cpu", "all", "5", "motion", "1", str(profile), env=env_vars, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = load_file(run / "stage5_motion" / "videos.safetensors")["videos"]
    assert torch.equal(first, again)
    enhance = load_file(run / "stage5_enhance" / "videos.safetensors")["videos"]
    assert enhance.shape == first.shape and not torch.equal(enhance, first)


def test_driver_runs_the_upstream_profile_at_smoke_scale(smoke_world: Path, tmp_path_factory):
    """`smoke_upstream` (the smoke world with configs/upstream_behaviour.yaml) through stages 1-6: stage 3 reads the
    last stage-2 checkpoint, stage 5 starts from upstream's noisy init with seed 0 for every clip and writes the GIF
    grids, and stage 6's headline protocol scores those GIFs."""
    import json

    from tests.smoke_env import smoke_env

    env = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    scratch = tmp_path_factory.mktemp("driver_upstream")
    weights = all_smoke_roles(smoke_world)
    profile = scratch / "upstream.yaml"
    profile.write_text(f"extends: [{env.profile}, {REPO / 'configs' / 'upstream_behaviour.yaml'}]\n"
                       f"paths:\n  weights_root: {weights}\n  exp_root: {scratch / 'EXP'}\n")  # fmt: skip
    env_vars = {"NEURONS_SET": FAST_PIPELINE, "OMP_NUM_THREADS": "1"}
    result = drive("cpu", "up", "123456", "enhance", "1", str(profile), env=env_vars, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = scratch / "EXP" / "exp_up" / "subj_1"
    manifest = {k: json.loads((run / f"{k}/manifest.json").read_text()) for k in ("stage1", "stage3_enhance",
                                                                                  "stage5_enhance")}  # fmt: skip
    assert manifest["stage1"]["selected_on"].startswith("test")
    assert manifest["stage3_enhance"]["stage2_checkpoint_read"] == "last"
    stage5 = manifest["stage5_enhance"]
    assert stage5["video_init"] == "noisy_start" and set(stage5["clip_seeds"]) == {0}
    assert sorted(p.name for p in (run / "stage5_enhance" / "gif_grid").iterdir()) == [f"{i}.gif" for i in range(4)]
    metrics = json.loads((run / "metrics_enhance.json").read_text())
    assert metrics["protocol"] == "neurons" and set(metrics["protocols"]) == {"standard", "neurons"}
    assert metrics["protocols"]["neurons"]["inputs"] != metrics["protocols"]["standard"]["inputs"]
