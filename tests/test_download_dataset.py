"""download_dataset.py: the exact file list when the hub is out of reach, toy-world building and profile checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from utils.data_catalog import CEILING_FILE, fmri_file, frames_file, key_objects_info_file

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "download_dataset.py"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_offline_real_data_lists_every_file_and_where_it_goes(tmp_path):
    """The upstream file names are spelled out here on purpose: they are the oracle for utils.data_catalog."""
    result = run("--subj", "2", "--out", str(tmp_path / "cc2017"))
    assert result.returncode == 1
    out = result.stdout
    for name in (
        "subj02_train_fmri.pt",
        "subj02_test_fmri.pt",
        "GT_train_3fps.pt",
        "coco_tokens_avg_proj.pth",
        "masks/mask_cls_dict_test_qwen_video.json",
        "qwen_annotation/qwen_train_caption_tag_category_id.json",
    ):
        assert "missing" in out and name in out
        assert f"{tmp_path / 'cc2017'}" in out
    assert "subj01_train_fmri.pt" not in out  # only the requested subject
    assert "hf download gongzx/cc2017_dataset subj02_train_fmri.pt --repo-type dataset" in out


def test_present_files_are_reported_as_present(tmp_path):
    root = tmp_path / "cc2017"
    root.mkdir()
    (root / frames_file("test")).write_bytes(b"x")
    result = run("--subj", "1", "--out", str(root), "--check")
    line = next(l for l in result.stdout.splitlines() if l.rstrip().endswith(frames_file("test")))
    assert line.startswith("present")


def test_toy_needs_a_toy_profile():
    result = run("--toy", "--profile", "paper")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ConfigError: profile 'paper' is the real cc2017 world")


def test_toy_world_build_is_idempotent(tmp_path):
    out = tmp_path / "world"
    first = run("--toy", "--profile", "smoke", "--out", str(out), "--set", "world.n_train_clips=12",
                "--set", "world.n_test_clips=6", "--set", "world.segment_clips=6")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert (out / key_objects_info_file("test")).exists() and (out / CEILING_FILE).exists()
    stamp = (out / fmri_file(1, "train")).stat().st_mtime_ns
    again = run("--toy", "--profile", "smoke", "--out", str(out), "--set", "world.n_train_clips=12",
                "--set", "world.n_test_clips=6", "--set", "world.segment_clips=6")  # fmt: skip
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (out / fmri_file(1, "train")).stat().st_mtime_ns == stamp


def test_weights_listing_names_every_missing_file(tmp_path):
    result = run("--weights", "--set", f"paths.weights_root={tmp_path}")
    assert result.returncode == 1
    assert "unclip6_epoch0_step110000.ckpt" in result.stdout and "hf download" in result.stdout
