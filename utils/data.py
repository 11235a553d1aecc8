"""The data layer: one reader for the real preprocessed cc2017 files and the toy cortex world (same files, same code).

Layout of a ``data_root`` (upstream spec §1.3, §2; S = subject digit, split = train | test; the names are spelled
once, in :mod:`utils.data_catalog`)::

    subj0S_{split}_fmri.pt                      float32 (N, repeats, V): train 2 repeats, test 10
    GT_{split}_3fps.pt                          float32 (N, F, 3, R, R) in [0,1], read lazily (memory map)
    GT_{split}_caption.pt                       numpy <U strings (N,)   (BLIP-2 captions; toy: generator captions)
    GT_{split}_caption_emb.pt                   float32 (N, Dt)                (optional until needed)
    qwen_annotation/qwen_{split}_caption_tag_category_id.json   [{idx, caption, tags, category_id (C multi-hot)}]
    qwen_annotation/concept_classes.json        optional: the C concept class names
    coco_tokens_avg_proj.pth                    {"proj": float32 (D, Dt)}: frozen CLIP tokens -> caption space map
    masks/mask_cls_dict_{split}_qwen_video.json, masks/mask_cls_{split}_qwen_video/*.png   (read by find_key_obj)
    masks/key_objects_info_{split}.json, masks/key_objects_masks_{split}.pt  float32 (N, F, R, R) (find_key_obj)

Sizes (clips, repeats, voxels, frames, resolution, classes, text width) are read from the files, never assumed.

Splits: ``train`` and ``val`` are disjoint parts of the training clips; ``test`` is the test set. The validation split
is made of contiguous blocks of clips (seeded choice of blocks), not random clips: neighbouring clips share shots and
the HRF smears responses over several TRs, so random clips would leak. ``val_guard_clips`` clips on each side of a
validation block are dropped from ``train``. Model selection uses ``val``; ``test`` is only for final numbers.
``validation=test_upstream`` reproduces upstream instead: ``train`` is every training clip, ``val`` is empty, and
stages 1 and 2 select on ``test`` (:func:`selection_split`; defect 16).

fMRI per item: train = one repeat chosen per epoch (``epoch % repeats``, as upstream); val = mean of the training
repeats; test = mean of the test repeats.

Every file a :class:`BrainVideoData` reads is recorded in :attr:`BrainVideoData.opened_files`, in the order it was
first read; the stages' manifests list those files as their inputs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from utils.data_catalog import (
    CONCEPT_CLASSES_FILE,
    SOURCES,
    TOKENS_PROJ_FILE,
    WORLD_FILE,
    annotation_file,
    caption_emb_file,
    caption_file,
    fmri_file,
    frames_file,
    key_objects_info_file,
    key_objects_masks_file,
)
from utils.errors import DataError
from utils.io import atomic_torch_save

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FIELDS = ("voxel", "frames", "caption", "caption_emb", "concepts", "key_obj_mask", "key_obj_cls")
N_FRAME_CHECK = 8  # clips sampled for the cheap frame range check


# ---------------------------------------------------------------------------------------------------------------------
# file I/O helpers


def save_tensor_file(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically and byte-deterministically (see :func:`utils.io.atomic_torch_save`)."""
    return atomic_torch_save(path, obj)


def _numpy_safe_globals() -> list:
    """The globals a pickled numpy string array needs (numpy 1.x and 2.x names), and nothing executable beyond them."""
    from numpy._core.multiarray import _reconstruct

    return [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        np.dtypes.StrDType,
        np.dtypes.BytesDType,
    ]


def load_tensor(path: Path, fix: str, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; a missing or unreadable file is a DataError naming ``fix``."""
    if not path.is_file():
        raise DataError(f"missing {path}", fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if mmap and "mmap" in str(err).lower():  # legacy (non-zip) serialisation cannot be memory-mapped
            log.warning("%s cannot be memory-mapped (legacy format); loading it into memory", path)
            return load_tensor(path, fix, mmap=False)
        raise DataError(f"cannot read {path}: {str(err).splitlines()[0]}", fix) from err
    except Exception as err:
        raise DataError(f"cannot read {path}: {str(err).splitlines()[0]}", fix) from err


def load_strings(path: Path, fix: str) -> np.ndarray:
    """A pickled numpy string array ``(N,)``, loaded with only numpy's array reconstruction allowlisted."""
    if not path.is_file():
        raise DataError(f"missing {path}", fix)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            arr = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"cannot read {path} as a numpy string array: {str(err).splitlines()[0]}", fix) from err
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise DataError(f"{path} holds {arr.dtype} {tuple(arr.shape)}, expected a 1-d numpy string array", fix)
    return arr.astype(str)


def load_json(path: Path, fix: str) -> Any:
    if not path.is_file():
        raise DataError(f"missing {path}", fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"malformed JSON in {path}: {err}", fix) from err


# ---------------------------------------------------------------------------------------------------------------------
# the validation split


def contiguous_val_split(n: int, fraction: float, block: int, guard: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split clips ``0..n-1`` into (train, val) indices; val = seeded whole blocks of ``block`` contiguous clips.

    About ``fraction * n`` clips (at least 1 when fraction > 0) go to val; the last chosen block is cut to size.
    Train drops ``guard`` clips on each side of every val run.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"val_fraction {fraction} is outside [0, 1)", "set data.val_fraction to e.g. 0.1")
    target = 0 if fraction == 0 else max(1, round(fraction * n))
    if target == 0:
        return np.arange(n), np.arange(0)
    block = max(1, min(block, target))
    starts = np.arange(0, n, block)
    order = np.random.default_rng(seed).permutation(len(starts))
    is_val = np.zeros(n, dtype=bool)
    taken = 0
    for b in order:
        take = min(block, n - starts[b], target - taken)
        is_val[starts[b] : starts[b] + take] = True
        taken += take
        if taken >= target:
            break
    train = np.flatnonzero(~with_guard(is_val, guard))
    if len(train) == 0:
        raise DataError(f"no training clips left after holding out {target} of {n}", "lower data.val_fraction")
    return train, np.flatnonzero(is_val)


def with_guard(mask: np.ndarray, guard: int) -> np.ndarray:
    """A boolean mask over consecutive clips, widened by ``guard`` clips on each side of every marked run."""
    return np.convolve(mask, np.ones(2 * guard + 1), mode="same") > 0 if guard > 0 else mask


def fold_positions(n: int, folds: int) -> list[np.ndarray]:
    """Positions ``0..n-1`` (a training split, in time order) cut into ``folds`` contiguous folds of near-equal
    size."""
    if folds < 2 or folds > n:
        raise DataError(f"data.cross_fit_folds={folds} for {n} training clips",
                        "give 0 (no cross-fitting) or from 2 folds to the number of training clips")  # fmt: skip
    return [np.asarray(f, dtype=np.int64) for f in np.array_split(np.arange(n), folds)]


def without_fold(rows: np.ndarray, fold: np.ndarray, guard: int) -> np.ndarray:
    """``rows`` (source-file rows, ascending) without those at positions ``fold`` and the ``guard`` source rows on
    each side of them (neighbours in time, as the validation split's guard)."""
    rows = np.asarray(rows)
    left_out = np.zeros(int(rows.max()) + 1, dtype=bool)
    left_out[rows[fold]] = True
    return rows[~with_guard(left_out, guard)[rows]]


def leading_segments(rows: np.ndarray, fraction: float, segment: int) -> np.ndarray:
    """The ``rows`` (source-file clip indices, ascending) of the leading whole segments (clip i is in segment
    ``i // segment``) whose clip count is closest to ``fraction * len(rows)``; at least one segment, ties to fewer."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.train_fraction {fraction} is outside (0, 1]", "set data.train_fraction to e.g. 0.125")
    if segment < 1:
        raise DataError(f"data.train_segment_clips {segment} is below 1", "set data.train_segment_clips to e.g. 240")
    rows = np.asarray(rows)
    ids, counts = np.unique(rows // segment, return_counts=True)
    n = 1 + int(np.argmin(np.abs(np.cumsum(counts) - fraction * len(rows))))
    return rows[np.isin(rows // segment, ids[:n])]


# ---------------------------------------------------------------------------------------------------------------------
# one subject's data


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")


def _source(split: str) -> str:
    """The files a split reads: val is part of the training clips."""
    _check_split(split)
    return "test" if split == "test" else "train"


_Owner = TypeVar("_Owner")  # the data object whose loader is cached
_Loaded = TypeVar("_Loaded")


def _cached_by_source(fn: Callable[[_Owner, str], _Loaded]) -> Callable[[_Owner, str], _Loaded]:
    """Cache a ``(self, source)`` loader per instance and source (files are read and checked once)."""

    @functools.wraps(fn)
    def wrapper(self: _Owner, source: str) -> _Loaded:
        cache = self.__dict__.setdefault("_loaded", {})
        key = (fn.__name__, source)
        if key not in cache:
            cache[key] = fn(self, source)
        return cache[key]

    return wrapper


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section of every stage config: which captions, the validation split, and the CLIP targets."""

    caption_source: Literal["blip2", "qwen"] = "blip2"  # upstream trained on BLIP-2 captions since f758cf7 (§2.6)
    val_fraction: float = 0.1  # held out from the training clips for model selection (fixes defect 16)
    val_block_clips: int = 20  # the validation split is made of whole blocks of contiguous clips ...
    val_guard_clips: int = 1  # ... with this many clips dropped on each side (neighbouring clips are correlated)
    val_seed: int = 0
    # the share of the training clips (after the holdout) that training uses, as whole contiguous segments of
    # ``train_segment_clips`` clips, the earliest first (a new subject scanned for less time; issue 18)
    train_fraction: float = 1.0
    train_segment_clips: int = 240  # cc2017: 18 training segments of 8 min, 240 clips each
    # out-of-fold conditions for stage 2 (``stage2.train.condition_source=cross_fit``): stage 1 also trains this many
    # models, each without one of as many contiguous folds of the training clips (0 = none, as upstream)
    cross_fit_folds: int = 0
    # the fold that the training split leaves out (with ``val_guard_clips`` on each side); -1 = none. Stage 1 sets it
    # for its fold models
    cross_fit_fold: int = -1
    # model selection (defect 16): "holdout" picks the best epoch on the validation clips above; "test_upstream"
    # trains on every training clip (no holdout, the val_* keys unused) and picks it on the TEST clips, as upstream
    validation: Literal["holdout", "test_upstream"] = "holdout"
    num_workers: int = 0
    # CLIP image-token targets of stages 1 and 2: run the image tower every step ("compute"), or read the fp16
    # cache written by `python -m tasks_construction.cache_clip_targets` ("cache"; docs/scale.md)
    clip_targets: Literal["compute", "cache"] = "compute"
    clip_cache_frames: tuple[int, ...] = ()  # frames the cache tool stores per clip; () = every frame (stage 2)
    clip_cache_splits: tuple[Literal["train", "test"], ...] = ("train", "test")  # source files the tool caches
    clip_cache_latents: bool = True  # the tool also caches the VAE latents of every frame (stage 2's latent targets)


def selection_split(config: DataConfig) -> Literal["val", "test"]:
    """The split stages 1 and 2 pick their ``best`` epoch on: ``val``, or ``test`` (``validation=test_upstream``)."""
    return "test" if config.validation == "test_upstream" else "val"


def selection_note(config: DataConfig) -> str:
    """What a manifest records about model selection (``selected on``)."""
    return "test (upstream, defect 16)" if config.validation == "test_upstream" else "val"


class BrainVideoData:
    """One subject's files in a data_root, validated on load; frames and masks are memory-mapped.

    fMRI (both splits) and frame shapes are checked at construction; captions, caption embeddings, concept labels and
    key-object masks are loaded and checked on first use. Indices are split-local (0..n_clips(split)-1).
    """

    def __init__(self, root: str | os.PathLike, subject: int, config: DataConfig | None = None):
        self.root = Path(root)
        self.subject = int(subject)
        self.config = config or DataConfig()
        self._opened: dict[Path, None] = {}  # an ordered set
        if self.config.caption_source not in ("blip2", "qwen"):
            raise DataError(f"unknown caption source {self.config.caption_source!r}", "use 'blip2' or 'qwen'")
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist", self._get_data_hint())
        self._fmri = {s: self._load_fmri(s) for s in SOURCES}
        self._check_fmri()
        self._frames = {s: self._load_frames(s) for s in SOURCES}
        self._check_counts({frames_file(s): (s, len(self._frames[s])) for s in SOURCES})
        train_shape, test_shape = (tuple(self._frames[s].shape[1:]) for s in SOURCES)
        if train_shape != test_shape:
            raise DataError(f"train frames are {train_shape} per clip, test {test_shape}", self._get_data_hint())
        self.train_idx, self.val_idx = self._split_train()

    def _split_train(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) rows of the training files: the contiguous holdout, or every clip and no val (upstream)."""
        c = self.config
        if c.validation == "test_upstream":
            log.warning("data.validation=test_upstream: training on all %d clips, model selection on the TEST clips "
                        "(upstream, defect 16)", self.n_source("train"))  # fmt: skip
            return np.arange(self.n_source("train")), np.arange(0)
        train, val = contiguous_val_split(self.n_source("train"), c.val_fraction, c.val_block_clips,
                                          c.val_guard_clips, c.val_seed)  # fmt: skip
        if c.train_fraction < 1.0:
            kept = leading_segments(train, c.train_fraction, c.train_segment_clips)
            segments = len(np.unique(kept // c.train_segment_clips))
            log.info("subject %d: data.train_fraction=%g keeps %d of %d training clips (%d whole segments of %d)",
                     self.subject, c.train_fraction, len(kept), len(train), segments,
                     c.train_segment_clips)  # fmt: skip
            train = kept
        if c.cross_fit_fold >= 0:
            if c.cross_fit_fold >= c.cross_fit_folds:
                raise DataError(f"data.cross_fit_fold={c.cross_fit_fold} of {c.cross_fit_folds} folds",
                                "give a fold from 0 to data.cross_fit_folds - 1, or -1")  # fmt: skip
            fold = fold_positions(len(train), c.cross_fit_folds)[c.cross_fit_fold]
            train = without_fold(train, fold, c.val_guard_clips)
        return train, val

    def cross_fit_indices(self) -> list[np.ndarray]:
        """The training split's positions in each of ``data.cross_fit_folds`` contiguous folds (a split that leaves
        no fold out)."""
        if self.config.cross_fit_fold >= 0:
            raise DataError("the folds are those of the whole training split, not of a fold model's",
                            "read them from data with data.cross_fit_fold=-1")  # fmt: skip
        return fold_positions(self.n_clips("train"), self.config.cross_fit_folds)

    @property
    def opened_files(self) -> list[Path]:
        """Every file read so far, in the order first read (a stage's manifest inputs)."""
        return list(self._opened)

    def _open(self, name: str) -> Path:
        """``root / name``, recorded in :attr:`opened_files` when it exists (a missing file raises when read)."""
        path = self.root / name
        if path.is_file():
            self._opened.setdefault(path, None)
        return path

    # -- facts read from the data
    @property
    def is_toy(self) -> bool:
        return (self.root / WORLD_FILE).is_file()

    @property
    def n_voxels(self) -> int:
        return int(self._fmri["train"].shape[2])

    @property
    def n_frames(self) -> int:
        return int(self._frames["train"].shape[1])

    @property
    def resolution(self) -> int:
        return int(self._frames["train"].shape[-1])

    def n_repeats(self, split: str) -> int:
        return int(self._fmri[_source(split)].shape[1])

    def n_source(self, source: str) -> int:
        """Clips in the train or test files."""
        return int(self._fmri[source].shape[0])

    def indices(self, split: str) -> np.ndarray:
        """Row indices into the split's source files (train and val index the train files)."""
        _check_split(split)
        return {"train": self.train_idx, "val": self.val_idx, "test": np.arange(self.n_source("test"))}[split]

    def n_clips(self, split: str) -> int:
        return len(self.indices(split))

    # -- fMRI
    def fmri(self, split: str, clips: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """All repeats (n, repeats, V) float32 of the split's clips (``clips``: those positions in the split only)."""
        rows = self.indices(split) if clips is None else self.indices(split)[np.asarray(clips)]
        return self._fmri[_source(split)][torch.as_tensor(rows)]

    def voxels(self, split: str, epoch: int = 0, mean: bool = False,
               clips: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:  # fmt: skip
        """(n, V): train = repeat ``epoch % repeats`` (``mean``: the mean over repeats); val and test = mean over
        repeats. ``clips``: positions in the split (a training batch reads its own rows, not the whole split)."""
        x = self.fmri(split, clips)
        return x[:, epoch % x.shape[1]] if split == "train" and not mean else x.mean(dim=1)

    # -- frames
    def frames(self, split: str, idx: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Frames (len(idx), F, 3, R, R) float32 in [0,1] of split-local clips ``idx`` (default: all; lazy)."""
        rows = self.indices(split) if idx is None else self.indices(split)[np.asarray(idx, dtype=np.int64)]
        return self._frames[_source(split)][torch.as_tensor(rows)]

    def frame_batches(self, split: str, batch_size: int = 64) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (split-local indices, frames) in order, ``batch_size`` clips at a time (bounded memory)."""
        n = self.n_clips(split)
        for a in range(0, n, batch_size):
            idx = np.arange(a, min(a + batch_size, n))
            yield idx, self.frames(split, idx)

    # -- captions and caption embeddings
    def captions(self, split: str) -> np.ndarray:
        """Caption strings (n,) of the configured caption source."""
        return self._captions(_source(split))[self.indices(split)]

    def caption_embeddings(self, split: str) -> torch.Tensor:
        """Caption embeddings (n, Dt) float32; missing files name the command that makes them."""
        return self._caption_emb(_source(split))[torch.as_tensor(self.indices(split))]

    # -- concept labels
    def concept_labels(self, split: str) -> torch.Tensor:
        """Multi-hot concept labels (n, C) float32; C is read from the annotation file."""
        return self._concepts(_source(split))[torch.as_tensor(self.indices(split))]

    @property
    def n_concepts(self) -> int:
        return int(self._concepts("train").shape[1])

    @cached_property
    def concept_classes(self) -> list[str]:
        """Concept class names: ``qwen_annotation/concept_classes.json`` if present, else generic names."""
        names = None
        if (self.root / CONCEPT_CLASSES_FILE).is_file():
            names = load_json(self._open(CONCEPT_CLASSES_FILE), self._get_data_hint())
        if names is None:
            return [f"class_{i}" for i in range(self.n_concepts)]
        path = self.root / CONCEPT_CLASSES_FILE
        if not isinstance(names, list) or len(names) != self.n_concepts:
            raise DataError(
                f"{path} lists {len(names)} names for {self.n_concepts} concept classes", self._get_data_hint()
            )
        return [str(n) for n in names]

    # -- key objects
    def key_object_masks(self, split: str, idx: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Binary key-object masks (len(idx), F, R, R) float32 (any non-zero mask value becomes 1)."""
        rows = self.indices(split) if idx is None else self.indices(split)[np.asarray(idx, dtype=np.int64)]
        return (self._key_masks(_source(split))[torch.as_tensor(rows)] > 0).float()

    def key_object_names(self, split: str) -> list[str]:
        """Key-object category name of each clip ("None" when a clip has none)."""
        names = self._key_info(_source(split))
        return [names[i] for i in self.indices(split)]

    # -- the frozen tokens -> caption map
    def tokens_proj(self, expect: tuple[int, int]) -> torch.Tensor:
        """The frozen ``(D, Dt)`` map of ``coco_tokens_avg_proj.pth`` (key ``proj``), shape-checked."""
        path = self._open(TOKENS_PROJ_FILE)
        fix = (
            "real data: python download_dataset.py; toy world: python -m tasks_construction.gen_GT_clip_embeds "
            "--profile <profile>"
        )
        state = load_tensor(path, fix)
        proj = state.get("proj") if isinstance(state, dict) else None
        if not isinstance(proj, torch.Tensor) or tuple(proj.shape) != tuple(expect):
            got = tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(state).__name__
            raise DataError(f"{path} must hold 'proj' of shape {expect}, found {got}", fix)
        return proj.float()

    # -- datasets
    def dataset(self, split: str, fields: Sequence[str] = ("voxel", "frames")) -> BrainVideoDataset:
        return BrainVideoDataset(self, split, fields)

    def validate(self, fields: Sequence[str] = FIELDS) -> None:
        """Load and check every requested field for both source splits (raises DataError on the first problem)."""
        getters = {
            "caption": self._captions,
            "caption_emb": self._caption_emb,
            "concepts": self._concepts,
            "key_obj_mask": self._key_masks,
            "key_obj_cls": self._key_info,
        }
        for name in fields:
            if name in getters:
                for source in SOURCES:
                    getters[name](source)

    # -- loading and checks (private)
    def _get_data_hint(self) -> str:
        if self.is_toy or "toy" in self.root.name:
            return f"build the toy world with `python download_dataset.py --toy --out {self.root}`"
        return f"download the data with `python download_dataset.py` (into {self.root})"

    def _key_object_hint(self) -> str:
        return f"run `python -m tasks_construction.find_key_obj --data-root {self.root}`"

    def _emb_hint(self) -> str:
        if self.config.caption_source == "blip2" and not self.is_toy:
            return self._get_data_hint()
        return (f"run `python -m tasks_construction.gen_GT_clip_embeds --profile <profile> --data-root {self.root} "
                f"--source {self.config.caption_source}`")  # fmt: skip

    def _load_fmri(self, source: str) -> torch.Tensor:
        path = self._open(fmri_file(self.subject, source))
        x = load_tensor(path, self._get_data_hint())
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"{path} holds {shape}, expected a tensor (clips, repeats, voxels)", self._get_data_hint())
        if x.shape[0] == 0:
            raise DataError(f"{path} has no clips (empty {source} set)", self._get_data_hint())
        if x.shape[1] == 0 or x.shape[2] == 0:
            raise DataError(f"{path} holds {tuple(x.shape)}: no repeats or no voxels", self._get_data_hint())
        if not x.is_floating_point():
            raise DataError(f"{path} holds {x.dtype} fMRI, expected float32", self._get_data_hint())
        return x.float()

    def _check_fmri(self) -> None:
        train, test = self._fmri["train"], self._fmri["test"]
        if train.shape[2] != test.shape[2]:
            raise DataError(
                f"subject {self.subject}: train fMRI has {train.shape[2]} voxels, test {test.shape[2]}",
                f"use matching files for subject {self.subject}; {self._get_data_hint()}",
            )
        for source, x in self._fmri.items():
            bad = ~torch.isfinite(x)
            if bad.any():
                voxels = int(bad.any(dim=(0, 1)).sum())
                clips = torch.nonzero(bad.any(dim=(1, 2))).flatten().tolist()
                raise DataError(
                    f"{fmri_file(self.subject, source)} has NaN/Inf in {voxels} voxels across {len(clips)} clips "
                    f"(first clips {clips[:5]})",
                    f"re-create the file or drop those voxels; {self._get_data_hint()}",
                )

    def _load_frames(self, source: str) -> torch.Tensor:
        path = self._open(frames_file(source))
        x = load_tensor(path, self._get_data_hint(), mmap=True)
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[2] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"{path} holds {shape}, expected frames (clips, frames, 3, H, W)", self._get_data_hint())
        if not x.is_floating_point():
            raise DataError(
                f"{path} holds {x.dtype} frames, expected float32 in [0,1]",
                "convert with frames.float() / 255 and save again",
            )
        n = x.shape[0]
        sample = x[torch.as_tensor(np.unique(np.linspace(0, n - 1, min(n, N_FRAME_CHECK)).astype(np.int64)))]
        if not torch.isfinite(sample).all() or sample.min() < 0 or sample.max() > 1:
            raise DataError(
                f"{path} has values outside [0,1] (sample min {float(sample.min()):.3g}, "
                f"max {float(sample.max()):.3g})",
                "frames must be float in [0,1]; divide by 255 if needed",
            )
        return x

    def _check_counts(self, files: dict[str, tuple[str, int]]) -> None:
        for name, (source, n) in files.items():
            if n != self.n_source(source):
                raise DataError(
                    f"{name} has {n} clips but {fmri_file(self.subject, source)} has {self.n_source(source)}",
                    f"use files of the same data release; {self._get_data_hint()}",
                )

    @_cached_by_source
    def _captions(self, source: str) -> np.ndarray:
        name = caption_file(source, self.config.caption_source)
        if self.config.caption_source == "blip2":
            path = self._open(name)
            caps = load_strings(path, self._get_data_hint())
        elif (self.root / name).is_file():
            path = self._open(name)
            caps = load_strings(path, self._emb_hint())
        else:  # the Qwen captions are also inside the annotation JSON
            path = self.root / annotation_file(source)
            caps = np.asarray([item.get("caption", "") for item in self._annotations(source)], dtype=str)
        self._check_counts({path.name: (source, len(caps))})
        return caps

    @_cached_by_source
    def _caption_emb(self, source: str) -> torch.Tensor:
        path = self._open(caption_emb_file(source, self.config.caption_source))
        x = load_tensor(path, self._emb_hint())
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise DataError(f"{path} is not a (clips, width) tensor", self._emb_hint())
        self._check_counts({path.name: (source, x.shape[0])})
        return x.float()

    @_cached_by_source
    def _annotations(self, source: str) -> list[dict[str, Any]]:
        path = self._open(annotation_file(source))
        items = load_json(path, self._get_data_hint())
        if not isinstance(items, list) or not all(isinstance(i, dict) and "category_id" in i for i in items):
            raise DataError(
                f"malformed {path}: expected a list of {{idx, caption, tags, category_id}}", self._get_data_hint()
            )
        self._check_counts({path.name: (source, len(items))})
        return items

    @_cached_by_source
    def _concepts(self, source: str) -> torch.Tensor:
        items, path = self._annotations(source), self.root / annotation_file(source)
        widths = {len(i["category_id"]) for i in items}
        if len(widths) != 1:
            raise DataError(f"{path}: category_id lengths differ {sorted(widths)}", self._get_data_hint())
        labels = torch.tensor([i["category_id"] for i in items], dtype=torch.float32)
        if source == "test" and labels.shape[1] != self._concepts("train").shape[1]:
            raise DataError(
                f"{path} has {labels.shape[1]} concept classes, the train file "
                f"{self._concepts('train').shape[1]}",
                self._get_data_hint(),
            )
        return labels

    @_cached_by_source
    def _key_masks(self, source: str) -> torch.Tensor:
        path = self._open(key_objects_masks_file(source))
        x = load_tensor(path, self._key_object_hint(), mmap=True)
        frames = self._frames[source]
        if (
            not isinstance(x, torch.Tensor)
            or x.ndim != 4
            or tuple(x.shape[1:]) != (frames.shape[1], *frames.shape[3:])
        ):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(
                f"{path} holds {shape}, expected (clips, {frames.shape[1]}, {frames.shape[3]}, {frames.shape[4]})",
                self._key_object_hint(),
            )
        self._check_counts({path.name: (source, x.shape[0])})
        return x

    @_cached_by_source
    def _key_info(self, source: str) -> list[str]:
        path = self._open(key_objects_info_file(source))
        info = load_json(path, self._key_object_hint())
        n = self.n_source(source)
        try:
            names = ["None"] * n
            for key, value in info.items():
                names[int(key)] = str(value["category"])
        except (AttributeError, KeyError, ValueError, IndexError, TypeError) as err:
            raise DataError(f"malformed {path}: {err!r}", self._key_object_hint()) from err
        return names


class SubjectSet:
    """The data of a run's subjects in ridge order (``run.subjects``): one :class:`BrainVideoData` each.

    cc2017's subjects watched the same clips, so clip i of a split is the same stimulus for every subject: frames,
    captions, masks and CLIP targets are read from :attr:`stimuli` (the first subject's data), and only the fMRI
    differs. The subjects' clip counts, and so their validation splits, must agree (checked here).
    """

    def __init__(self, root: str | os.PathLike, subjects: Sequence[int], config: DataConfig | None = None):
        if not subjects:
            raise DataError("no subjects given", "set run.subj to a subject or a set such as 1,2,3")
        self.members = tuple(BrainVideoData(root, s, config) for s in subjects)
        first = self.members[0]
        for m in self.members[1:]:
            for split in SPLITS:
                if m.n_clips(split) != first.n_clips(split):
                    raise DataError(
                        f"subject {m.subject} has {m.n_clips(split)} {split} clips, subject {first.subject} "
                        f"{first.n_clips(split)}: a subject set needs the same clips for every subject",
                        "use the complete data of each subject (download_dataset.py --check)",
                    )

    @property
    def subjects(self) -> tuple[int, ...]:
        return tuple(m.subject for m in self.members)

    @property
    def stimuli(self) -> BrainVideoData:
        """The data whose frames, captions, concepts and masks every subject shares."""
        return self.members[0]

    @property
    def n_voxels(self) -> tuple[int, ...]:
        return tuple(m.n_voxels for m in self.members)

    @property
    def opened_files(self) -> list[Path]:
        return list(dict.fromkeys(f for m in self.members for f in m.opened_files))

    def validate(self, fields: Sequence[str] = FIELDS) -> None:
        for m in self.members:
            m.validate(fields)


class BrainVideoDataset(torch.utils.data.Dataset):
    """Items of one split as dicts. Requested fields are loaded (and checked) at construction.

    Fields: ``voxel`` (V,) float32 (train: repeat ``epoch % repeats``, set by :meth:`set_epoch`; val/test: mean of the
    repeats), ``frames`` (F, 3, R, R), ``caption`` str, ``caption_emb`` (Dt,), ``concepts`` (C,) multi-hot,
    ``key_obj_mask`` (F, R, R) binary, ``key_obj_cls`` str. Every item also has ``index`` (split-local) and ``clip``
    (row in the source files).
    """

    def __init__(self, data: BrainVideoData, split: str, fields: Sequence[str] = ("voxel", "frames")):
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise DataError(f"unknown dataset field(s) {unknown}", f"use some of {', '.join(FIELDS)}")
        self.data, self.split, self.fields = data, split, tuple(fields)
        self.rows = data.indices(split)
        self.epoch = 0
        self._fmri = data.fmri(split) if "voxel" in fields else None
        self._captions = data.captions(split) if "caption" in fields else None
        self._emb = data.caption_embeddings(split) if "caption_emb" in fields else None
        self._concepts = data.concept_labels(split) if "concepts" in fields else None
        self._key_names = data.key_object_names(split) if "key_obj_cls" in fields else None
        if "key_obj_mask" in fields:
            data.key_object_masks(split, [])  # load and check the file now

    def set_epoch(self, epoch: int) -> None:
        """Select the training repeat of this epoch (``epoch % repeats``, as upstream)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": int(i), "clip": int(self.rows[i])}
        if self._fmri is not None:
            x = self._fmri[i]
            item["voxel"] = x[self.epoch % x.shape[0]] if self.split == "train" else x.mean(dim=0)
        if "frames" in self.fields:
            item["frames"] = self.data.frames(self.split, [i])[0].clone()
        if self._captions is not None:
            item["caption"] = str(self._captions[i])
        if self._emb is not None:
            item["caption_emb"] = self._emb[i]
        if self._concepts is not None:
            item["concepts"] = self._concepts[i]
        if "key_obj_mask" in self.fields:
            item["key_obj_mask"] = self.data.key_object_masks(self.split, [i])[0]
        if self._key_names is not None:
            item["key_obj_cls"] = self._key_names[i]
        return item
