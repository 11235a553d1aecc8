"""download_dataset.py: the exact file list when the hub is out of reach, toy-world building, the weight catalogue and
the one-pass ``--check`` of everything a run reads."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import write_real_format
from utils.data_catalog import (
    CEILING_FILE,
    SOURCES,
    TOKENS_PROJ_FILE,
    fmri_file,
    frames_file,
    key_objects_info_file,
    key_objects_masks_file,
    mask_png_dir,
)

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


BLIP2_FILES = ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def test_weights_listing_has_mindeye2_last_pth_and_every_blip2_shard(tmp_path):
    """The upstream names are the oracle: MindEye2's last.pth (stage 1 reads weights_root/last.pth) and the BLIP-2
    index with both shards it names at upstream's revision, each with a command and the full ~15 GB."""
    result = run("--weights", "--set", f"paths.weights_root={tmp_path}")
    assert result.returncode == 1
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith(("mindeye2", "blip2"))}
    assert f"{tmp_path / 'last.pth'}" in rows["last.pth"] and "~8.9 GB" in rows["last.pth"]
    for name in BLIP2_FILES:
        assert f"Salesforce/blip2-opt-2.7b/{name}" in rows
        assert f"hf download Salesforce/blip2-opt-2.7b {name} --revision 51572668" in result.stdout
    assert "~10.0 GB" in rows["Salesforce/blip2-opt-2.7b/model-00001-of-00002.safetensors"]
    assert "~5.5 GB" in rows["Salesforce/blip2-opt-2.7b/model-00002-of-00002.safetensors"]


def test_mindeye2_hint_puts_last_pth_where_stage_1_reads_it(tmp_path):
    """Run the hint with `hf download` replaced by what it writes (<local-dir>/<repo path>): require_mindeye2 finds
    the file."""
    from models.foundation.catalog import MINDEYE2_WEIGHTS
    from models.mindeye2_keymap import require_mindeye2
    from utils.errors import WeightsError

    with pytest.raises(WeightsError) as err:
        require_mindeye2(tmp_path)
    hint = MINDEYE2_WEIGHTS.download_hint(tmp_path)
    assert hint in str(err.value)
    fetch, move = hint.split(" && ")
    words = shlex.split(fetch)
    source = "train_logs/final_subj01_pretrained_40sess_24bs/last.pth"
    assert words[:4] == ["hf", "download", "pscotti/mindeyev2", source]
    landed = Path(words[words.index("--local-dir") + 1]) / words[3]
    landed.parent.mkdir(parents=True)
    landed.write_bytes(b"weights")
    subprocess.run(move, shell=True, check=True)
    assert require_mindeye2(tmp_path) == tmp_path / "last.pth"
    assert (tmp_path / "last.pth").read_bytes() == b"weights"


def check(*args: str, root: Path, weights: Path) -> subprocess.CompletedProcess:
    return run("--check", "--out", str(root), "--set", f"paths.weights_root={weights}", *args)


def test_check_paper_lists_every_missing_item_at_once(tmp_path):
    """On an empty folder: data files, key objects, caption embeddings and every weight file of every role, each
    missing row followed by its command; exit 1, and nothing is written."""
    result = check("--profile", "paper", root=tmp_path / "data", weights=tmp_path / "w")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    missing = [i for i, line in enumerate(lines) if line.startswith("missing")]
    assert len(missing) >= 30
    assert all(lines[i + 1].strip().startswith("get: ") for i in missing)
    rows = "\n".join(lines[i] for i in missing)
    for name in (
        fmri_file(3, "test"),
        frames_file("train"),
        "GT_train_caption_emb.pt",
        key_objects_info_file("train"),
        key_objects_masks_file("test"),
        mask_png_dir("test"),
        f"{tmp_path / 'w' / 'last.pth'}",
        "unclip6_epoch0_step110000.ckpt",
        *BLIP2_FILES,
        "openai/clip-vit-large-patch14/model.safetensors",
    ):
        assert name in rows, name
    assert "python -m tasks_construction.find_key_obj --data-root" in result.stdout
    assert f"{len(missing)} of {len(missing)} items missing" in result.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "w").exists()


def test_check_prints_sizes_on_disk_not_the_catalogues(tmp_path):
    root, weights = tmp_path / "data", tmp_path / "w"
    root.mkdir()
    (root / frames_file("test")).write_bytes(b"12345")  # the catalogue says 4.3 GB
    weights.mkdir()
    (weights / "last.pth").write_bytes(b"1234567")  # the catalogue says 8.9 GB
    result = check("--subj", "1", root=root, weights=weights)
    rows = {line.split()[-1]: line.split()[:2] for line in result.stdout.splitlines() if line.startswith("present")}
    assert rows == {str(root / frames_file("test")): ["present", "5"], str(weights / "last.pth"): ["present", "7"]}
    assert "5 B  data" in next(l for l in result.stdout.splitlines() if l.endswith(frames_file("test")))
    listing = run("--weights", "--check", "--set", f"paths.weights_root={weights}").stdout
    assert "7 B" in next(l for l in listing.splitlines() if l.startswith("mindeye2"))


def test_complete_data_unpacks_masks_and_finds_key_objects(tmp_path):
    """Once every data file is there (a mask folder still packed), the download step unpacks it, runs key-object
    discovery and prints the next command; --check then finds data and key objects complete."""
    root = write_real_format(tmp_path / "cc2017", n_train=3, n_test=2, voxels=(20, 30, 10), resolution=16)
    torch.save({"proj": torch.zeros(8, 4)}, root / TOKENS_PROJ_FILE)
    packed = root / mask_png_dir("test")
    with tarfile.open(f"{packed}.tar.gz", "w:gz") as tar:
        tar.add(packed, arcname=packed.name)
    shutil.rmtree(packed)
    result = run("--out", str(root), "--set", f"paths.weights_root={tmp_path / 'w'}")
    assert result.returncode == 0, result.stderr
    assert packed.is_dir() and all((root / key_objects_info_file(s)).is_file() for s in SOURCES)
    assert "Next: `python download_dataset.py --weights --profile paper`" in result.stdout
    again = check(root=root, weights=tmp_path / "w")
    states = {line.split()[-1]: line.split()[0] for line in again.stdout.splitlines() if "  data  " in line
              or "key objects" in line or "caption embeddings" in line}  # fmt: skip
    assert len(states) == 23 and set(states.values()) == {"present"}
    assert again.returncode == 1  # the weights are still missing


def test_caption_embedding_hint_is_a_command_that_parses(tmp_path):
    """The data layer's hint for missing Qwen caption embeddings names only flags that gen_GT_clip_embeds has."""
    from tasks_construction import gen_GT_clip_embeds
    from utils.data import BrainVideoData, DataConfig
    from utils.errors import DataError

    root = write_real_format(tmp_path / "cc2017", n_train=3, n_test=2, voxels=(20, 30, 10), resolution=16)
    data = BrainVideoData(root, 1, DataConfig(caption_source="qwen"))
    with pytest.raises(DataError) as err:
        data.validate(["caption_emb"])
    command = str(err.value).split("`")[1].replace("<profile>", "paper")
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "tasks_construction.gen_GT_clip_embeds"]
    args = gen_GT_clip_embeds.build_parser().parse_args(words[3:])
    assert (args.profile, args.data_root, args.source) == ("paper", root, "qwen")
