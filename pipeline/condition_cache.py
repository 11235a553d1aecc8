"""Stage 2's condition cache (``stage2.train.condition_cache``, issue 19).

Stage 2 trains the prior and the heads on top of the frozen stage-1 model (ridge, backbone, ``clip_proj``). With the
corrected default (``train.backbone_mode=eval``: no dropout) the prior's condition of a clip,
:meth:`~models.brain.NeuronsBrainModel.prior_condition` of its voxels, is a function of that clip's fMRI alone, so it
is computed once and stored; the ridge and the backbone (1.9 B parameters at paper scale) then stay on the CPU and
never run in a training step or in validation.

Format, in ``<run>/stage2/condition_cache/``:

    <split>_slot<k>.npy   float16 or float32 (n, T, D): the condition of every clip of ``split`` (train: fMRI repeat
                          ``train.voxel_repeat``; val and test: the mean of the repeats) of the subject in ridge
                          slot k; with ``train.condition_source=cross_fit`` each training clip's comes from the
                          stage-1 fold model that did not train on it (the manifest then names every fold model)
    manifest.json         what the arrays were computed from: the stage-1 checkpoint (its model file's size, mtime and
                          config hash), the sha256 of each voxel array, the prior-condition flag, the precision, shapes

A cache whose manifest does not match this run's inputs is rebuilt (logged), never reused. The arrays are computed
under the training step's autocast, so that the ``fp32`` cache gives the uncached step's condition exactly (and
``fp16`` holds a bf16 condition exactly).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import MODEL_FILE, read_weights
from utils.data import load_json
from utils.errors import DataError
from utils.io import atomic_path, atomic_write_json, file_fingerprint

log = logging.getLogger(__name__)

CACHE_DIR = "condition_cache"
MANIFEST = "manifest.json"
VERSION = 1
DTYPES = {"fp16": np.float16, "fp32": np.float32}
PARKED = ("ridge", "backbone")  # the parts that stay on the CPU when the cache is on (clip_proj is a head input too)

ConditionFn = Callable[[torch.Tensor, int], torch.Tensor]  # (voxels (b, V) on the device, slot) -> (b, T, D)
# an array's clips in groups, each computed by its own function (cross-fitting: each fold by the model without it)
Groups = Sequence[tuple[np.ndarray, ConditionFn]]


def array_name(split: str, slot: int) -> str:
    return f"{split}_slot{slot}.npy"


def voxels_digest(voxels: torch.Tensor) -> str:
    """sha256 of a voxel array's float32 bytes and shape."""
    x = voxels.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(str(tuple(x.shape)).encode() + x.numpy().tobytes()).hexdigest()


def stage1_identity(stage1: Path) -> dict[str, Any]:
    """The stage-1 checkpoint the conditions come from: its model file's size and mtime, and its saved identity."""
    _, meta = read_weights(stage1)
    return {"model_file": file_fingerprint(stage1 / MODEL_FILE), "config_hash": meta.get("config_hash"),
            "step": meta.get("step")}  # fmt: skip


class ConditionCache:
    """The cached conditions of one stage-2 run: ``read(split, slot, idx)`` → float32 (b, T, D).

    ``identity``: what the arrays must have been computed from (:func:`stage1_identity`, the flags and precision);
    :meth:`ensure` adds any (split, slot) missing or stale, computing it with ``condition``.
    """

    def __init__(self, folder: Path, dtype: str, identity: Mapping[str, Any]):
        self.folder, self.dtype, self.identity = Path(folder), dtype, dict(identity)
        self._arrays: dict[tuple[str, int], np.ndarray] = {}

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def _manifest(self) -> dict[str, Any]:
        fresh = {"version": VERSION, "dtype": self.dtype, **self.identity, "arrays": {}}
        if not self.manifest_path.is_file():
            return fresh
        old = load_json(self.manifest_path, f"delete {self.folder}")
        if any(old.get(k) != v for k, v in fresh.items() if k != "arrays"):
            log.info("condition cache %s: made from another stage-1 checkpoint, flags or dtype; rebuilding",
                     self.folder)  # fmt: skip
            return fresh
        return old

    def ensure(self, voxels: Mapping[str, Sequence[torch.Tensor]], condition: ConditionFn | Groups, device: Any,
               chunk: int = 64) -> None:  # fmt: skip
        """Make every (split, slot) of ``voxels`` ({split: [(n, V) per slot]}) current, computing the missing or stale
        ones with ``condition`` (or each group of positions with its own function, in group order) in chunks of
        ``chunk`` clips; the manifest is written after each array."""
        manifest = self._manifest()
        for split, per_slot in voxels.items():
            for slot, x in enumerate(per_slot):
                name, digest = array_name(split, slot), voxels_digest(x)
                entry = manifest["arrays"].get(name)
                if entry is not None and entry["voxels_sha256"] == digest and (self.folder / name).is_file():
                    continue
                groups = [(np.arange(len(x)), condition)] if callable(condition) else condition
                shape = self._write(name, x, slot, groups, device, chunk)
                manifest["arrays"][name] = {"voxels_sha256": digest, "shape": shape}
                self._arrays.pop((split, slot), None)
                atomic_write_json(self.manifest_path, manifest)
        self.manifest = manifest

    @torch.no_grad()
    def _write(self, name: str, x: torch.Tensor, slot: int, groups: Groups, device: Any, chunk: int
               ) -> list[int]:  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        path, n = self.folder / name, len(x)
        covered = np.sort(np.concatenate([np.asarray(rows) for rows, _ in groups]))
        if not np.array_equal(covered, np.arange(n)):
            raise ValueError(f"the groups of {name} do not cover its {n} clips exactly once")
        chunks = [(rows[a:a + chunk], fn) for rows, fn in groups for a in range(0, len(rows), chunk)]
        out: np.memmap | None = None
        with atomic_path(path) as tmp:
            for rows, fn in tqdm(chunks, desc=f"condition cache {name}", unit="chunk", leave=False, mininterval=2):
                cond = fn(x[torch.as_tensor(rows)].to(device), slot).float().cpu().numpy()  # (b, T, D)
                if out is None:  # the header, once the shape is known
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[self.dtype],
                                                    shape=(n, *cond.shape[1:]))  # fmt: skip
                out[rows] = cond
            if out is None:
                raise DataError(f"no clips to cache in {name}", "check the split's voxels")
            out.flush()
            shape = list(out.shape)
            del out
        log.info("condition cache: wrote %s %s (%s)", path, shape, self.dtype)
        return shape

    def read(self, split: str, slot: int, idx: Any, device: Any) -> torch.Tensor:
        """float32 conditions (b, T, D) of split-local clips ``idx`` of the subject in ridge slot ``slot``."""
        key = (split, slot)
        if key not in self._arrays:
            name = array_name(split, slot)
            arr = np.load(self.folder / name, mmap_mode="r")
            if list(arr.shape) != self.manifest["arrays"][name]["shape"]:
                raise DataError(f"{self.folder / name} does not match its manifest", f"delete {self.folder}")
            self._arrays[key] = arr
        rows = np.asarray(idx, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self._arrays[key][rows])).to(device).float()
