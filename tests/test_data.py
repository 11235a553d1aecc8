"""The data layer reads the toy world and real-format files through the same code, and refuses bad data clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_VOXELS, write_real_format

from utils.data import BrainVideoData, DataConfig, contiguous_val_split, save_tensor_file
from utils.data_catalog import (
    TOKENS_PROJ_FILE,
    annotation_file,
    caption_emb_file,
    caption_file,
    fmri_file,
    frames_file,
    key_objects_masks_file,
)
from utils.errors import DataError

ALL_FIELDS = ("voxel", "frames", "caption", "concepts", "key_obj_mask", "key_obj_cls")


def test_reads_the_toy_world(smoke_world: Path):
    data = BrainVideoData(smoke_world, 2)
    assert data.is_toy and data.n_voxels == 340 and data.n_frames == 6 and data.resolution == 32
    assert data.n_repeats("train") == 2 and data.n_repeats("test") == 10
    assert data.n_clips("train") + data.n_clips("val") <= 48 and data.n_clips("test") == 24
    assert not set(data.indices("train")) & set(data.indices("val"))
    assert data.n_concepts == len(data.concept_classes) and "animal" in data.concept_classes
    for split in ("train", "val", "test"):
        ds = data.dataset(split, ALL_FIELDS)
        item = ds[len(ds) - 1]
        assert item["voxel"].shape == (340,) and item["frames"].shape == (6, 3, 32, 32)
        assert item["concepts"].shape == (data.n_concepts,) and isinstance(item["caption"], str)
        assert item["key_obj_mask"].shape == (6, 32, 32) and set(item["key_obj_mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["key_obj_cls"] != "None"
    test = data.fmri("test")
    assert torch.allclose(data.dataset("test")[3]["voxel"], test[3].mean(0))


def test_train_repeat_changes_per_epoch(smoke_world: Path):
    data = BrainVideoData(smoke_world, 1)
    ds = data.dataset("train", ("voxel",))
    x = data.fmri("train")
    ds.set_epoch(0)
    assert torch.equal(ds[2]["voxel"], x[2, 0])
    ds.set_epoch(3)
    assert torch.equal(ds[2]["voxel"], x[2, 1])
    assert torch.equal(data.voxels("train", epoch=1), x[:, 1])
    # stage1.train.voxel_repeats=mean: the mean of the repeats whatever the epoch (as val and test always are)
    assert torch.allclose(data.voxels("train", epoch=1, mean=True), x.mean(dim=1))
    assert not torch.allclose(data.voxels("train", epoch=1, mean=True), x[:, 1])
    # a training batch reads its own rows: the same values as indexing the whole split
    assert torch.equal(data.voxels("train", epoch=3, clips=[4, 0, 2]), x[[4, 0, 2], 1])
    assert torch.equal(data.voxels("train", mean=True, clips=[1]), x[[1]].mean(dim=1))


def test_missing_caption_embeddings_name_the_command(smoke_world: Path, tmp_path: Path):
    root = tmp_path / "world"  # the session world may hold embeddings already (smoke_env writes them)
    root.mkdir()
    for item in smoke_world.iterdir():
        if "caption_emb" not in item.name:
            (root / item.name).symlink_to(item)
    data = BrainVideoData(root, 1)
    with pytest.raises(DataError, match=r"GT_train_caption_emb\.pt.*gen_GT_clip_embeds"):
        data.dataset("train", ("voxel", "caption_emb"))


def test_reads_real_format_files(real_format_root: Path):
    for subject, voxels in enumerate(REAL_VOXELS, start=1):
        data = BrainVideoData(real_format_root, subject, DataConfig(val_fraction=0.25))
        assert not data.is_toy and data.n_voxels == voxels and data.resolution == 224
        assert data.n_clips("val") == 1 and data.n_clips("test") == 3
    data.validate()
    assert data.n_concepts == 51 and data.concept_classes[0] == "class_0"
    item = data.dataset("test", (*ALL_FIELDS, "caption_emb"))[0]
    assert item["caption_emb"].shape == (1280,) and item["caption"].startswith("a man walks")
    assert item["frames"].shape == (6, 3, 224, 224) and item["voxel"].shape == (REAL_VOXELS[2],)
    assert item["key_obj_cls"] == "dog" and item["key_obj_mask"].sum() > 0


def test_frames_are_memory_mapped(smoke_world: Path):
    maps = Path("/proc/self/maps")  # Linux: the process's memory mappings
    data = BrainVideoData(smoke_world, 1)
    assert str(smoke_world / frames_file("train")) in maps.read_text()  # the frame file is mapped, not read
    assert data.frames("val").shape[0] == data.n_clips("val")


def test_val_split_is_contiguous_and_seeded():
    train, val = contiguous_val_split(200, 0.1, block=10, guard=1, seed=3)
    assert len(val) == 20 and not set(train) & set(val)
    runs = np.split(val, np.flatnonzero(np.diff(val) != 1) + 1)
    assert all(len(r) >= 10 for r in runs)  # whole blocks
    assert all(v - 1 not in train and v + 1 not in train for v in val)  # guard clips dropped from train
    again = contiguous_val_split(200, 0.1, block=10, guard=1, seed=3)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(contiguous_val_split(200, 0.1, 10, 1, seed=4)[1], val)
    assert len(contiguous_val_split(5, 0.0, 10, 1, 0)[1]) == 0


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    return write_real_format(tmp_path / "data", voxels=(30, 40, 20), resolution=8, n_classes=5, text_dim=16)


def _expect(root: Path, pattern: str, subject: int = 1, fields: tuple[str, ...] = ()) -> str:
    with pytest.raises(DataError, match=pattern) as info:
        BrainVideoData(root, subject).validate(fields)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file_names_file_and_fix(small_root: Path):
    (small_root / frames_file("test")).unlink()
    message = _expect(small_root, r"missing .*GT_test_3fps\.pt")
    assert "download_dataset.py" in message


def test_missing_key_objects_name_find_key_obj(small_root: Path):
    _expect(small_root, r"key_objects_masks_train\.pt.*find_key_obj", fields=("key_obj_mask",))


def test_bad_shapes_and_voxel_mismatch(small_root: Path):
    torch.save(torch.zeros(5, 30), small_root / fmri_file(1, "train"))
    _expect(small_root, r"expected a tensor \(clips, repeats, voxels\)")
    torch.save(torch.zeros(5, 2, 31), small_root / fmri_file(1, "train"))
    _expect(small_root, "train fMRI has 31 voxels, test 30")


def test_nan_voxels_are_counted(small_root: Path):
    x = torch.zeros(3, 10, 40)
    x[1, 4, 7] = float("nan")
    x[2, 0, 9] = float("inf")
    torch.save(x, small_root / fmri_file(2, "test"))
    _expect(small_root, r"NaN/Inf in 2 voxels across 2 clips \(first clips \[1, 2\]\)", subject=2)


def test_bad_frames(small_root: Path):
    torch.save((torch.rand(5, 6, 3, 8, 8) * 255).to(torch.uint8), small_root / frames_file("train"))
    _expect(small_root, "uint8 frames")
    torch.save(torch.rand(5, 6, 3, 8, 8) * 255, small_root / frames_file("train"))
    _expect(small_root, r"outside \[0,1\]")
    torch.save(torch.rand(4, 6, 3, 8, 8), small_root / frames_file("train"))
    _expect(small_root, "GT_train_3fps.pt has 4 clips but subj01_train_fmri.pt has 5")


def test_count_mismatch_and_malformed_json(small_root: Path):
    save_tensor_file(small_root / caption_file("test"), np.array(["a", "b"]))
    _expect(small_root, "GT_test_caption.pt has 2 clips", fields=("caption",))
    path = small_root / annotation_file("train")
    path.write_text('[{"idx": 0, "category_id": [1, 0')
    _expect(small_root, "malformed JSON in .*qwen_train_caption_tag_category_id.json", fields=("concepts",))
    path.write_text(json.dumps([{"idx": i, "category_id": [0] * (3 + i % 2)} for i in range(5)]))
    _expect(small_root, "category_id lengths differ", fields=("concepts",))


def test_empty_test_set(small_root: Path):
    torch.save(torch.zeros(0, 10, 30), small_root / fmri_file(1, "test"))
    _expect(small_root, "no clips")


def test_caption_source_qwen_reads_the_annotation_captions(small_root: Path):
    data = BrainVideoData(small_root, 1, DataConfig(caption_source="qwen", val_fraction=0.0))
    assert data.captions("train")[1] == "a man 1"
    with pytest.raises(DataError, match="GT_train_caption_qwen_emb.pt.*gen_GT_clip_embeds"):
        data.caption_embeddings("train")


def test_opened_files_record_every_file_read_in_order(small_root: Path):
    data = BrainVideoData(small_root, 1)
    files = [fmri_file(1, "train"), fmri_file(1, "test"), frames_file("train"), frames_file("test")]
    assert data.opened_files == [small_root / f for f in files]
    data.validate(("caption_emb", "concepts"))
    data.caption_embeddings("val")  # already read: not recorded twice
    files += [caption_emb_file(s) for s in ("train", "test")] + [annotation_file(s) for s in ("train", "test")]
    assert data.opened_files == [small_root / f for f in files]
    with pytest.raises(DataError, match="find_key_obj"):
        data.key_object_masks("train")
    assert small_root / key_objects_masks_file("train") not in data.opened_files  # missing: never read


def test_tokens_proj_is_shape_checked_and_recorded(small_root: Path):
    data = BrainVideoData(small_root, 1)
    with pytest.raises(DataError, match=r"missing .*coco_tokens_avg_proj\.pth"):
        data.tokens_proj((8, 16))
    torch.save({"proj": torch.ones(8, 16)}, small_root / TOKENS_PROJ_FILE)
    assert data.tokens_proj((8, 16)).shape == (8, 16) and data.opened_files[-1] == small_root / TOKENS_PROJ_FILE
    with pytest.raises(DataError, match=r"must hold 'proj' of shape \(8, 12\), found \(8, 16\)"):
        data.tokens_proj((8, 12))
