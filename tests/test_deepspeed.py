"""DeepSpeed ZeRO-2 launches of the training loop (optional package: these tests run where ``deepspeed`` imports).

The launch is what ``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml`` exports to each
process (ACCELERATE_USE_DEEPSPEED, the ZeRO stage), under torchrun with 2 CPU processes (DeepSpeed's CPU accelerator,
gloo). Stage 1 under ZeRO-2 must follow the plain 1-process run at the same global batch, save its ZeRO partitions
beside ``last``, and resume from them; the checks without the package run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.smoke_env import REPO, SmokeEnv, smoke_env
from utils.errors import ConfigError

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
COMMON = ["train.batch_size=8", "train.num_epochs=2", "train.log_every=1", "model.backbone_dropout=0",
          "train.grad_clip=1.0"]  # fmt: skip
ZERO2_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}  # fmt: skip


def test_a_deepspeed_launch_without_the_package_or_with_zero3_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.training
    from utils.config import load_config
    from utils.stage_configs import Stage1Config
    from utils.training import build_accelerator, check_zero_stage

    with pytest.raises(ConfigError, match="ZeRO stage 3 partitions the parameters"):
        check_zero_stage(3)
    for stage in (0, 1, 2):
        check_zero_stage(stage)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(utils.training, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError, match="deepspeed is not installed") as err:
        build_accelerator(load_config(Stage1Config, "smoke"))
    assert "multi_gpu.yaml" in err.value.fix


@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> SmokeEnv:
    return smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")


def launch(env: SmokeEnv, n: int, exp: str, *extra: str, deepspeed: bool) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(ZERO2_ENV if deepspeed else {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    args = ["--profile", str(env.profile), "--exp", exp, *(f"--set={o}" for o in COMMON), *extra]
    return subprocess.run([*launcher, str(REPO / "train_neurons.py"), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=400)  # fmt: skip


def records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="the optional package deepspeed is not installed")
def test_zero2_on_two_processes_follows_one_process_and_resumes(env: SmokeEnv) -> None:
    from utils.checkpoint import read_weights

    for n, exp, ds in ((1, "ds_ref", False), (2, "ds_zero2", True)):
        done = launch(env, n, exp, deepspeed=ds)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (env.exp_root / f"exp_{e}" / "subj_1" / "stage1" for e in ("ds_ref", "ds_zero2"))
    a, b = records(one), records(two)
    assert [(r["split"], r["step"], r.get("lr")) for r in a] == [(r["split"], r["step"], r.get("lr")) for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "image", "text", "metric"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x, y)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["config"]["run"]["mixed_precision"] == "no"
    zero = torch.load(two / "checkpoints" / "last" / "state.pt", weights_only=False)["deepspeed"]
    assert zero["processes"] == 2 and zero["dir"] == "last.deepspeed"
    tags = [p.name for p in (two / "checkpoints" / "last.deepspeed").iterdir() if p.is_dir()]
    assert tags == [zero["tag"]], "earlier ZeRO saves are removed once the new one is complete"
    w1, _ = read_weights(one / "checkpoints" / "last")
    w2, _ = read_weights(two / "checkpoints" / "last")
    assert w1.keys() == w2.keys() and all(w2[k].dtype == torch.float32 for k in w2)
    # resuming the finished run loads the ZeRO partitions and changes nothing
    done = launch(env, 2, "ds_zero2", "--resume", deepspeed=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(two) == b
    w3, _ = read_weights(two / "checkpoints" / "last")
    assert all(torch.equal(w3[k], w2[k]) for k in w2)
    # ...but not without DeepSpeed: one line that says why
    done = launch(env, 2, "ds_zero2", "--resume", deepspeed=False)  # torchrun exits 1 when a process exits 2
    assert done.returncode != 0 and "was saved with DeepSpeed; this launch runs without it" in done.stderr
