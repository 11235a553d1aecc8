"""Shared fixtures: a smoke toy world (built once per session) and tiny file sets in the real cc2017 format."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data_catalog import (
    annotation_file,
    caption_emb_file,
    caption_file,
    fmri_file,
    frames_file,
    mask_frame_key,
    mask_labels_file,
    mask_png_dir,
)

REAL_VOXELS = (13447, 14828, 9114)  # cc2017 subjects 1..3 (upstream spec §2.1)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two threads per process on a shared 2-core machine stalled on OpenMP
    spin-waits (7-50x slower). Subprocesses get OMP_NUM_THREADS=1 from their tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


METRIC_ROLES = ("frame_classifier", "video_classifier", "clip_pcc")


@pytest.fixture(scope="session")
def metric_weights(smoke_world: Path) -> Path:
    """The smoke world's stage-6 metric models (frame and video classifiers, CLIP-pcc): the repository's up-to-date
    smoke weights, else the session's one build of every smoke role."""
    from tests.smoke_env import smoke_weights

    return smoke_weights(smoke_world, METRIC_ROLES)


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory) -> Path:
    """The ``smoke`` toy world with its key-object files."""
    from tasks_construction import find_key_obj
    from tasks_construction.toy_cortex.build import build_world
    from utils.toy_world import make_config

    root = tmp_path_factory.mktemp("toy") / "toy_cortex_smoke"
    build_world(make_config("smoke"), root, progress=False)
    find_key_obj.run(root)
    return root


def _numpy1_pickle(obj: np.ndarray) -> bytes:
    """torch.save bytes of a numpy array as numpy 1.x writes it (``numpy.core.multiarray``), like the real files."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(name, data)
    return out.getvalue()


def write_real_format(
    root: Path,
    n_train: int = 5,
    n_test: int = 3,
    voxels: tuple[int, ...] = REAL_VOXELS,
    resolution: int = 16,
    n_classes: int = 51,
    text_dim: int = 1280,
    seed: int = 0,
) -> Path:
    """A tiny data root with the real cc2017 + NEURONS file names, shapes and dtypes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n, reps in (("train", n_train, 2), ("test", n_test, 10)):
        for s, v in enumerate(voxels, start=1):
            torch.save(
                torch.from_numpy(rng.standard_normal((n, reps, v), dtype=np.float32)),
                root / fmri_file(s, split),
            )
        torch.save(torch.rand(n, 6, 3, resolution, resolution), root / frames_file(split))
        captions = np.array([f"a man walks a dog {i}" for i in range(n)])
        (root / caption_file(split)).write_bytes(_numpy1_pickle(captions))
        torch.save(torch.randn(n, text_dim), root / caption_emb_file(split))
        ann = [
            {
                "idx": i,
                "caption": f"a man {i}",
                "tags": ["man", "dog"],
                "category_id": [int(c in (1, 22)) for c in range(n_classes)],
            }
            for i in range(n)
        ]
        (root / annotation_file(split)).parent.mkdir(exist_ok=True)
        (root / annotation_file(split)).write_text(json.dumps(ann))
        _write_masks(root, split, n, resolution)
    return root


def _write_masks(root: Path, split: str, n: int, resolution: int) -> None:
    """A dog moving right (label 1), a static man (label 2) and water (label 3) in every frame."""
    mask_dir = root / mask_png_dir(split)
    mask_dir.mkdir(parents=True, exist_ok=True)
    mask_dict = {}
    r = resolution
    for clip in range(n):
        for f in range(6):
            dog = np.zeros((r, r), np.uint8)
            dog[r // 4 : r // 2, f : f + r // 4] = 255
            man = np.zeros((r, r), np.uint8)
            man[r // 2 :, r // 2 :] = 255
            water = np.zeros((r, r), np.uint8)
            water[: r // 4] = 255
            for label, mask in (("1", dog), ("2", man), ("3", water)):
                Image.fromarray(mask, mode="L").save(mask_dir / f"{mask_frame_key(clip, f)}_{label}.png")
            mask_dict[mask_frame_key(clip, f)] = {"1": "dog", "2": "man", "3": "water"}
    (root / mask_labels_file(split)).write_text(json.dumps(mask_dict))


@pytest.fixture(scope="session")
def real_format_root(tmp_path_factory) -> Path:
    """Real-format files at the real voxel counts and 224 px frames, a handful of clips, with key objects."""
    from tasks_construction import find_key_obj

    root = write_real_format(tmp_path_factory.mktemp("real") / "cc2017_dataset", n_train=4, n_test=3, resolution=224)
    find_key_obj.run(root)
    return root
