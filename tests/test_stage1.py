"""Stage 1 (brain model) on the smoke world: outputs, finite losses, exact resume after an interruption."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.smoke_env import SmokeEnv, smoke_env

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

    return load_config("1", str(env.profile), [*COMMON, *overrides], {"exp": exp})


@pytest.fixture(scope="module")
def run_a(env: SmokeEnv) -> Path:
    from pipeline.stage1 import train

    return train(config(env, "s1_a"))


def records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_checkpoints_and_manifest_with_finite_losses(run_a: Path) -> None:
    from utils.manifest import read_manifest

    for name in ("best", "last"):
        assert (run_a / "checkpoints" / name / "model.safetensors").is_file()
    manifest = read_manifest(run_a)
    assert manifest["stage"] == "1" and manifest["depends_on"] == []
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
