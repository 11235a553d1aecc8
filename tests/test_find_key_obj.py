"""Rule-based key-object discovery on the toy world and on real-format annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks_construction.find_key_obj import KeyObjectRules, choose_key_categories
from utils.data_catalog import (
    KEY_OBJECT_CATEGORIES_FILE,
    key_objects_info_file,
    key_objects_masks_file,
    mask_frame_key,
    mask_labels_file,
    mask_png_dir,
)

RULES = KeyObjectRules(background=frozenset({"water"}), priority=frozenset({"dog"}))


def _square(x: int, y: int, size: int = 4, side: int = 32) -> np.ndarray:
    m = np.zeros((side, side), np.uint8)
    m[y : y + size, x : x + size] = 255
    return m


def test_rules_prefer_moving_priority_objects():
    clip = {
        f: {"1": ("water", _square(f * 3, 0)), "2": ("ball", _square(f * 2, 10)), "3": ("dog", _square(f, 20))}
        for f in range(3)
    }
    assert choose_key_categories(clip, RULES) == ["dog"]  # the ball moves more, but the dog has priority
    del clip[1]  # frames 0 and 2 are consecutive present frames
    assert choose_key_categories(clip, RULES) == ["dog"]


def test_rules_skip_large_objects_and_backgrounds():
    big = np.full((32, 32), 255, np.uint8)
    big[:, :2] = 0
    clip = {f: {"1": ("truck", np.roll(big, f, axis=1)), "2": ("ball", _square(f, 5))} for f in range(3)}
    assert choose_key_categories(clip, RULES) == ["ball"]  # the truck moves as much but covers > 50 %
    only_bg = {f: {"1": ("water", _square(f * 5, 0))} for f in range(3)}
    assert choose_key_categories(only_bg, RULES) == []
    new_label = {0: {"1": ("ball", _square(0, 0))}, 1: {"2": ("ball", _square(5, 0))}}
    assert choose_key_categories(new_label, RULES) == []  # no label present in two consecutive frames


def test_toy_outputs_are_sized_to_each_split(smoke_world: Path):
    for split, n in (("train", 48), ("test", 24)):
        masks = torch.load(smoke_world / key_objects_masks_file(split), weights_only=True)
        assert masks.dtype == torch.float32 and masks.shape == (n, 6, 32, 32)
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        info = json.loads((smoke_world / key_objects_info_file(split)).read_text())
        assert sorted(map(int, info)) == list(range(n))
    lists = json.loads((smoke_world / KEY_OBJECT_CATEGORIES_FILE).read_text())
    assert "water" in lists["background"] and "fish" in lists["priority"]


def test_toy_key_masks_are_the_union_of_the_key_category(smoke_world: Path):
    masks = torch.load(smoke_world / key_objects_masks_file("test"), weights_only=True).numpy()
    info = json.loads((smoke_world / key_objects_info_file("test")).read_text())
    mask_dict = json.loads((smoke_world / mask_labels_file("test")).read_text())
    for clip in (0, 11, 23):
        key = info[str(clip)]["category"]
        for f in range(6):
            want = np.zeros((32, 32), bool)
            for label, name in mask_dict[f"mask_{clip}_f{f}"].items():
                if name == key:
                    png = smoke_world / mask_png_dir("test") / f"{mask_frame_key(clip, f)}_{label}.png"
                    want |= np.asarray(Image.open(png)) > 0
            assert np.array_equal(masks[clip, f] > 0, want)


def test_instances_last_keeps_upstreams_last_instance_through_the_cli(smoke_world: Path, tmp_path: Path):
    """``--instances last`` (defect 9): each frame's mask is the key category's last instance in label order; the
    default, the union, is what the session world holds."""
    import shutil

    from tasks_construction.find_key_obj import main

    root = tmp_path / "world"
    shutil.copytree(smoke_world, root)
    labels_path = root / mask_labels_file("test")  # a second instance of clip c's key category in its frame 0
    info = json.loads((root / key_objects_info_file("test")).read_text())
    c = next(int(k) for k, v in info.items() if v["category"] != "None")
    key, frame = info[str(c)]["category"], mask_frame_key(c, 0)
    mask_dict = json.loads(labels_path.read_text())
    mask_dict[frame]["99"] = key
    labels_path.write_text(json.dumps(mask_dict))
    Image.fromarray(_square(2, 2)).save(root / mask_png_dir("test") / f"{frame}_99.png")
    assert main(["--data-root", str(root), "--splits", "test"]) == 0
    union = torch.load(root / key_objects_masks_file("test"), weights_only=True).numpy()
    assert main(["--data-root", str(root), "--splits", "test", "--instances", "last"]) == 0
    last = torch.load(root / key_objects_masks_file("test"), weights_only=True).numpy()
    assert np.array_equal(last[c, 0] > 0, _square(2, 2) > 0) and (union[c, 0] >= last[c, 0]).all()
    info = json.loads((root / key_objects_info_file("test")).read_text())
    assert info == json.loads((smoke_world / key_objects_info_file("test")).read_text())
    mask_dict = json.loads((root / mask_labels_file("test")).read_text())
    for clip in range(len(info)):
        key = info[str(clip)]["category"]
        for f in range(last.shape[1]):
            labels = [lb for lb, name in mask_dict.get(mask_frame_key(clip, f), {}).items() if name == key]
            want = np.zeros(last.shape[2:], bool)
            if labels:
                png = root / mask_png_dir("test") / f"{mask_frame_key(clip, f)}_{labels[-1]}.png"
                want = np.asarray(Image.open(png)) > 0
            assert np.array_equal(last[clip, f] > 0, want)
    assert not np.array_equal(last, union)
    base = torch.load(smoke_world / key_objects_masks_file("test"), weights_only=True).numpy()
    assert np.array_equal(np.delete(union, c, 0), np.delete(base, c, 0)), "the default (union) is the session world's"


def test_real_format_key_objects(real_format_root: Path):
    info = json.loads((real_format_root / key_objects_info_file("test")).read_text())
    assert info == {str(i): {"category": "dog"} for i in range(3)}
    masks = torch.load(real_format_root / key_objects_masks_file("test"), mmap=True, weights_only=True)
    assert masks.shape == (3, 6, 224, 224)  # the test file is sized to the test set (upstream: 4320 rows)
    assert masks[0, 0, 56:112, 0:56].min() == 1 and masks[0, 0].sum() == 56 * 56
