"""Stage manifests, staleness detection, atomic writes and the run lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from utils.errors import RunLockedError, StageOrderError
from utils.io import atomic_path, atomic_torch_save, atomic_write_text
from utils.manifest import StageRecorder, read_manifest, require_stage
from utils.runs import run_lock

HINT = "rerun stage {stage}"


def _stage(tmp_path, stage, inputs=(), depends_on=()):
    out = tmp_path / f"stage{stage}"
    rec = StageRecorder(stage, out, "abc123", depends_on=depends_on).begin()
    for path in inputs:
        rec.add_input(path)
    target = out / "out.pt"
    atomic_torch_save(target, torch.zeros(2, 3))
    rec.add_output(target, shape=(2, 3), dtype=torch.float32)
    rec.finish()
    return out, target


def _touch_later(path):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_manifest_records_outputs_and_inputs(tmp_path):
    src = atomic_write_text(tmp_path / "input.txt", "x")
    out, _ = _stage(tmp_path, "1", [src])
    manifest = read_manifest(out)
    assert manifest["stage"] == "1" and manifest["config_hash"] == "abc123"
    assert manifest["outputs"]["out.pt"]["shape"] == [2, 3] and manifest["outputs"]["out.pt"]["dtype"] == "float32"
    assert str(src.resolve()) in manifest["inputs"]
    assert manifest["wall_time_s"] >= 0
    assert require_stage("1", out, {"1": out}, HINT)["stage"] == "1"


def test_missing_stage_says_which_stage_to_run(tmp_path):
    with pytest.raises(StageOrderError, match="stage 2 outputs not found.*rerun stage 2"):
        require_stage("2", tmp_path / "stage2", {}, HINT)


def test_changed_input_makes_outputs_stale(tmp_path):
    src = atomic_write_text(tmp_path / "ckpt.bin", "v1")
    out, _ = _stage(tmp_path, "3", [src])
    _touch_later(src)
    with pytest.raises(StageOrderError, match=r"stage 3 .* stale: input .*ckpt.bin changed.*rerun stage 3"):
        require_stage("3", out, {"3": out}, HINT)


def test_modified_or_deleted_output_is_detected(tmp_path):
    out, target = _stage(tmp_path, "3")
    atomic_torch_save(target, torch.ones(5))
    with pytest.raises(StageOrderError, match="modified after"):
        require_stage("3", out, {"3": out}, HINT)
    target.unlink()
    with pytest.raises(StageOrderError, match="is missing"):
        require_stage("3", out, {"3": out}, HINT)


def test_staleness_follows_dependencies(tmp_path):
    """Stage 5 reads stage 3, which was made from a stage-2 checkpoint that has since been retrained."""
    s2_out, s2_ckpt = _stage(tmp_path, "2")
    s3_out, _ = _stage(tmp_path, "3", [s2_ckpt], depends_on=["2"])
    dirs = {"2": s2_out, "3": s3_out}
    assert require_stage("3", s3_out, dirs, HINT)
    time.sleep(0.01)
    atomic_torch_save(s2_ckpt, torch.ones(2, 3))  # a newer stage-2 result, not recorded by stage 2's manifest
    with pytest.raises(StageOrderError, match="stage 3 .* stale"):
        require_stage("3", s3_out, dirs, HINT)


def test_begin_invalidates_the_old_manifest(tmp_path):
    out, _ = _stage(tmp_path, "1")
    StageRecorder("1", out, "new").begin()  # a rerun that dies before finish()
    with pytest.raises(StageOrderError, match="not found"):
        require_stage("1", out, {"1": out}, HINT)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = atomic_write_text(tmp_path / "keep.txt", "good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_run_lock_refuses_a_second_writer(tmp_path):
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from pathlib import Path\n"
        "from utils.runs import run_lock\n"
        "with run_lock(Path(sys.argv[1]), '1'):\n    print('locked', flush=True); time.sleep(30)\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), repo], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(RunLockedError, match=r"in use by pid \d+ \(stage 1\).*another --exp"),
            run_lock(tmp_path, "2"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path, "2"):  # the OS released the killed holder's lock
        pass
