"""The toy cortex world: real cc2017 formats, determinism, masks, noise ceiling, rebuild rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tasks_construction.toy_cortex import encoding as enc
from tasks_construction.toy_cortex.build import build_world
from tasks_construction.toy_cortex.ceiling import oracle_ceiling
from tasks_construction.toy_cortex.render import render_split
from utils.data import load_strings
from utils.data_catalog import (
    CEILING_FILE,
    CONCEPT_CLASSES_FILE,
    ENCODING_MODEL_DIR,
    WORLD_FILE,
    annotation_file,
    caption_file,
    encoding_model_file,
    fmri_file,
    frames_file,
    mask_frame_key,
    mask_labels_file,
    mask_png_dir,
)
from utils.errors import ConfigError, DataError
from utils.toy_world import CATEGORIES, make_config

TINY = {"n_train_clips": 12, "n_test_clips": 6, "segment_clips": 6, "voxels": (40, 50, 30), "ceiling_trials": 5}


def test_files_match_the_real_formats(smoke_world: Path):
    cfg = make_config("smoke")
    n = {"train": cfg.n_train_clips, "test": cfg.n_test_clips}
    for split, reps in (("train", 2), ("test", 10)):
        voxel_counts = set()
        for s in (1, 2, 3):
            x = torch.load(smoke_world / fmri_file(s, split), weights_only=True)
            assert x.dtype == torch.float32 and x.shape == (n[split], reps, cfg.voxels[s - 1])
            seg = x[: cfg.segment_clips]  # z-scored per voxel, segment and repeat
            assert torch.allclose(seg.mean(0), torch.zeros(()), atol=1e-4)
            assert torch.allclose(seg.std(0, unbiased=False), torch.ones(()), atol=1e-3)
            voxel_counts.add(x.shape[2])
        assert len(voxel_counts) == 3
        frames = torch.load(smoke_world / frames_file(split), mmap=True, weights_only=True)
        assert frames.dtype == torch.float32 and frames.shape == (n[split], 6, 3, 32, 32)
        assert frames.min() >= 0.0 and frames.max() <= 1.0
        captions = load_strings(smoke_world / caption_file(split), "")
        assert captions.dtype.kind == "U" and captions.shape == (n[split],)
        ann = json.loads((smoke_world / annotation_file(split)).read_text())
        classes = json.loads((smoke_world / CONCEPT_CLASSES_FILE).read_text())
        assert [a["idx"] for a in ann] == list(range(n[split]))
        assert all(len(a["category_id"]) == len(classes) and sum(a["category_id"]) >= 1 for a in ann)
        assert all(a["caption"] == c and len(a["tags"]) >= 2 for a, c in zip(ann, captions))
        mask_dict = json.loads((smoke_world / mask_labels_file(split)).read_text())
        assert len(mask_dict) == n[split] * 6
        pngs = list((smoke_world / mask_png_dir(split)).iterdir())
        assert len(pngs) == sum(len(v) for v in mask_dict.values())
        assert all(re.fullmatch(r"mask_\d+_f\d_\d\.png", p.name) for p in pngs)
        with Image.open(pngs[0]) as img:
            assert img.mode == "L" and img.size == (32, 32)
    for extra in (WORLD_FILE, CEILING_FILE, encoding_model_file(1), f"{ENCODING_MODEL_DIR}/model.json"):
        assert (smoke_world / extra).is_file()
    assert re.fullmatch(
        r"an? [a-z ]+ [a-z]+s (left|right|up|down) (over|on|in) [a-z ]+", captions[0].split(" with ")[0]
    )


def test_objects_are_large_enough(smoke_world: Path):
    shots = json.loads((smoke_world / "toy_scenes_train.json").read_text())
    radii = [o["radius"] for s in shots for o in s["objects"]]
    assert min(radii) >= 7.0  # at 32 px
    assert all(1 <= len(s["objects"]) <= 3 and 2 <= s["n_clips"] <= 5 for s in shots[:-1])


def test_masks_match_rendered_objects(smoke_world: Path):
    cfg = make_config("smoke")
    rendered = render_split(cfg, "test")
    frames = torch.load(smoke_world / frames_file("test"), weights_only=True).numpy()
    assert np.array_equal(frames, rendered.frames)
    mask_dict = json.loads((smoke_world / mask_labels_file("test")).read_text())
    shots = json.loads((smoke_world / "toy_scenes_test.json").read_text())
    names = {c.name: c for c in CATEGORIES}
    for clip in (0, 7, cfg.n_test_clips - 1):
        shot = next(s for s in shots if s["start_clip"] <= clip < s["start_clip"] + s["n_clips"])
        rgb = {o["label"]: np.asarray(o["rgb"]) for o in shot["objects"]}
        for f in (0, 5):
            for label, name in mask_dict[f"mask_{clip}_f{f}"].items():
                path = smoke_world / mask_png_dir("test") / f"{mask_frame_key(clip, f)}_{label}.png"
                mask = np.asarray(Image.open(path)) > 0
                assert np.array_equal(mask, rendered.labels[clip, f] == int(label))
                if label != "0":
                    assert name in names
                    pixels = frames[clip, f].transpose(1, 2, 0)[mask]  # object colour times a texture gain of 0.6 or 1
                    ratio = pixels / np.maximum(rgb[int(label)], 1e-3)
                    bright = rgb[int(label)] > 0.05
                    assert np.all(
                        np.isclose(ratio[:, bright], 1.0, atol=1e-3) | np.isclose(ratio[:, bright], 0.6, atol=1e-3)
                    )


def test_same_seed_gives_identical_files(tmp_path: Path):
    cfg = make_config("smoke", **TINY)
    build_world(cfg, tmp_path / "a", progress=False)
    build_world(cfg, tmp_path / "b", progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 50
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = build_world(make_config("smoke", **{**TINY, "seed": 1}), tmp_path / "c", progress=False)
    assert not other["skipped"]
    assert (tmp_path / "a" / frames_file("train")).read_bytes() != (tmp_path / "c" / frames_file("train")).read_bytes()


def test_rebuild_rules(smoke_world: Path, tmp_path: Path):
    again = build_world(make_config("smoke"), smoke_world, progress=False)
    assert again["skipped"] and again["ceiling"]
    with pytest.raises(DataError, match="another config"):
        build_world(make_config("smoke", seed=5), smoke_world, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / fmri_file(1, "train")).write_bytes(b"real data")
    with pytest.raises(DataError, match="not empty"):
        build_world(make_config("smoke", **TINY), tmp_path / "foreign", progress=False)


def test_incomplete_world_is_rebuilt(tmp_path: Path):
    cfg = make_config("smoke", **TINY)
    build_world(cfg, tmp_path / "w", progress=False)
    (tmp_path / "w" / fmri_file(2, "test")).unlink()
    summary = build_world(cfg, tmp_path / "w", progress=False)
    assert not summary["skipped"] and (tmp_path / "w" / fmri_file(2, "test")).is_file()


def test_ceiling_is_informative_and_falls_with_noise(smoke_world: Path):
    cfg = make_config("smoke")
    ceiling = json.loads((smoke_world / CEILING_FILE).read_text())
    mean = ceiling["mean_top1"]
    assert mean["2-way"] > 0.9 and 5 / cfg.n_test_clips < mean["all-way"] < 1.0
    model = load_file(smoke_world / encoding_model_file(1))
    gain = model["gain"].numpy()
    signal = model["noise_free_test"].numpy() * np.sqrt(gain**2 + 1) / np.where(gain > 0, gain, 1)
    scores = []
    for factor in (4.0, 1.0, 0.1):
        g = gain * np.sqrt(factor)
        measured = enc.measure(signal, g, 10, [(0, cfg.n_test_clips)], np.random.default_rng(0))
        result = oracle_ceiling(measured, enc.expected_response(signal, g), (2,), 50, 0)
        scores.append(result["top1"]["all-way"])
    assert scores[0] >= scores[1] > scores[2]


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown toy world key"):
        make_config("toy", n_clips=3)
    with pytest.raises(ConfigError, match="n_categories"):
        make_config("toy", n_categories=5)
    with pytest.raises(ConfigError, match="voxels"):
        make_config("toy", voxels=(100, 100))
    assert make_config("smoke").voxels == (300, 340, 220)
