"""Build a toy cortex world: stimuli, annotations, simulated fMRI, the true encoding model and the noise ceiling.

The folder gets exactly the files and formats of the real preprocessed cc2017 (see :mod:`utils.data`) plus
``encoding_model/``, ``ceiling.json``, ``toy_scenes_{split}.json`` and ``world.json``. ``world.json`` is written last:
it records the config, its hash and every file's size and sha256. Rebuilding the same config into a complete world
does nothing; a different config in the same folder is a DataError. Same config => byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks_construction.toy_cortex import annotate, ceiling, encoding
from tasks_construction.toy_cortex.render import SPLIT_CODES, render_split
from utils.data import save_tensor_file
from utils.data_catalog import (
    CEILING_FILE,
    CONCEPT_CLASSES_FILE,
    ENCODING_MODEL_DIR,
    KEY_OBJECT_CATEGORIES_FILE,
    WORLD_FILE,
    annotation_file,
    caption_file,
    caption_tags_file,
    encoding_model_file,
    fmri_file,
    frames_file,
    mask_labels_file,
    subject_name,
    toy_scenes_file,
)
from utils.errors import DataError
from utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, sha256_file
from utils.toy_world import (
    BACKGROUNDS,
    CATEGORIES,
    GENERATOR_VERSION,
    ToyWorldConfig,
    concept_classes,
    config_dict,
    config_hash,
    validate_config,
)

log = logging.getLogger(__name__)

MARKER_FILE = ".toy_world_building.json"


@dataclass
class SplitFeatures:
    """What the fMRI simulation needs from a rendered split. T = clips * frames."""

    colour: np.ndarray  # (T, 4, G*G)
    motion: np.ndarray  # (T, 5, G*G)
    items: np.ndarray  # (T, K + B)
    segments: list[tuple[int, int]]  # clip ranges [a, b) of the movie segments


def build_world(cfg: ToyWorldConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Write the whole world into ``out_dir`` and return its summary (incl. the noise ceiling and ``build_seconds``).

    A complete world of the same config is left as is (``summary["skipped"] = True``).
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    validate_config(cfg)
    out_dir = Path(out_dir)
    digest = config_hash(cfg)
    existing = _existing_world(out_dir, digest)
    if existing is not None:
        log.info("toy world in %s is complete (config %s); nothing to do", out_dir, digest)
        return {**existing["summary"], "skipped": True, "build_seconds": 0.0}
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WORLD_FILE).unlink(missing_ok=True)
    atomic_write_json(out_dir / MARKER_FILE, {"config_hash": digest, "config": config_dict(cfg)})
    steps = ["render train", "render test"] + [f"fMRI subject {s}" for s in range(1, cfg.n_subjects + 1)]
    bar = tqdm(total=len(steps) + 1, desc="toy world", unit="step", disable=not progress)
    with bar, threadpool_limits(limits=1, user_api="blas"):  # spinning BLAS threads crawl on a shared 2-core box
        features = {}
        for split in ("train", "test"):
            bar.set_postfix_str(f"render {split}")
            features[split] = _write_split(cfg, split, out_dir)
            bar.update()
        ceilings = {}
        for subject in range(1, cfg.n_subjects + 1):
            bar.set_postfix_str(f"fMRI subject {subject}")
            ceilings[subject_name(subject)] = _write_subject(cfg, subject, features, out_dir)
            bar.update()
        bar.set_postfix_str("manifest")
        summary = _write_manifest(cfg, out_dir, digest, features, ceiling.summarise(ceilings))
        bar.update()
    (out_dir / MARKER_FILE).unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    log.info("built toy world %s in %.1f s; ceiling %s", out_dir, seconds, summary["ceiling"])
    return {**summary, "skipped": False, "build_seconds": round(seconds, 2)}


def _existing_world(out_dir: Path, digest: str) -> dict[str, Any] | None:
    """The manifest of a complete world of this config, None to (re)build; DataError for a foreign folder."""
    fix = f"use another --out or delete {out_dir}"
    world, marker = out_dir / WORLD_FILE, out_dir / MARKER_FILE
    if world.is_file():
        try:
            manifest = json.loads(world.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{world} is malformed ({err})", fix) from err
        if manifest.get("config_hash") != digest:
            raise DataError(
                f"{out_dir} holds a toy world of another config ({manifest.get('config_hash')}, this one is {digest})",
                fix,
            )
        missing = [name for name, fp in manifest["files"].items() if not _matches(out_dir / name, fp)]
        if not missing:
            return manifest
        log.warning("toy world in %s is incomplete (%d files missing or changed); rebuilding", out_dir, len(missing))
        return None
    if marker.is_file():
        if json.loads(marker.read_text()).get("config_hash") != digest:
            raise DataError(f"{out_dir} holds an unfinished toy world of another config", fix)
        return None
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} is not empty and holds no toy world", fix)
    return None


def _matches(path: Path, fp: dict[str, Any]) -> bool:
    """Cheap completeness check against a manifest entry: size for files, file count for PNG folders."""
    if "count" in fp:
        return path.is_dir() and sum(1 for _ in path.iterdir()) == fp["count"]
    return path.is_file() and path.stat().st_size == fp["size"]


def _write_split(cfg: ToyWorldConfig, split: str, out_dir: Path) -> SplitFeatures:
    rendered = render_split(cfg, split)
    n, f = rendered.frames.shape[:2]
    save_tensor_file(out_dir / frames_file(split), torch.from_numpy(rendered.frames))
    concepts = concept_classes(cfg.n_categories, cfg.n_backgrounds)
    items = annotate.split_annotations(rendered, cfg, concepts)
    save_tensor_file(out_dir / caption_file(split), np.asarray([i["caption"] for i in items], dtype=str))
    atomic_write_json(out_dir / annotation_file(split), items)
    caption_tags = [{k: i[k] for k in ("idx", "caption", "tags")} for i in items]
    atomic_write_json(out_dir / caption_tags_file(split), caption_tags)
    atomic_write_json(out_dir / toy_scenes_file(split), [s.to_json() for s in rendered.shots])
    mask_dict = annotate.write_masks(rendered, split, out_dir)
    atomic_write_json(out_dir / mask_labels_file(split), mask_dict)
    colour, motion = encoding.frame_features(
        rendered.frames.reshape(n * f, *rendered.frames.shape[2:]),
        np.arange(0, n, cfg.segment_clips) * f,
        cfg.prf_grid,
    )
    background = np.repeat(rendered.background, f)
    item_feats = encoding.item_features(rendered.category_area, background, cfg.n_backgrounds)
    segments = [(a, min(a + cfg.segment_clips, n)) for a in range(0, n, cfg.segment_clips)]
    return SplitFeatures(colour, motion, item_feats, segments)


def _write_subject(cfg: ToyWorldConfig, subject: int, features: dict[str, SplitFeatures], out_dir: Path) -> dict:
    """Simulate one subject's train and test fMRI, save them and the true model; return its noise ceiling."""
    model = encoding.draw_encoding_model(cfg, subject)
    hrf = encoding.hrf_kernel(cfg)
    tensors = model.tensors()
    measured = {}
    for split, feats in features.items():
        neural = encoding.neural_response(model, feats.colour, feats.motion, feats.items, cfg.prf_grid)
        f = cfg.n_frames
        signal = np.concatenate(
            [
                encoding.zscore(encoding.bold_per_clip(neural[a * f : b * f], b - a, cfg, hrf))
                for a, b in feats.segments
            ]
        )
        signal[:, model.gain == 0] = 0.0
        repeats = cfg.n_train_repeats if split == "train" else cfg.n_test_repeats
        rng = np.random.default_rng([cfg.seed, 200, subject, SPLIT_CODES[split]])
        measured[split] = encoding.measure(signal, model.gain, repeats, feats.segments, rng)
        save_tensor_file(out_dir / fmri_file(subject, split), torch.from_numpy(measured[split]))
        tensors[f"noise_free_{split}"] = torch.from_numpy(encoding.expected_response(signal, model.gain))
    atomic_save_safetensors(out_dir / encoding_model_file(subject), tensors)
    return ceiling.oracle_ceiling(
        measured["test"], tensors["noise_free_test"].numpy(), cfg.ceiling_ways, cfg.ceiling_trials, cfg.seed
    )


def _model_description(cfg: ToyWorldConfig) -> dict[str, Any]:
    types = {s: {} for s in range(1, cfg.n_subjects + 1)}
    for s in types:
        codes = encoding.draw_encoding_model(cfg, s).voxel_type
        types[s] = {name: int((codes == c).sum()) for name, c in encoding.VOXEL_TYPES.items()}
    return {
        "description": encoding.__doc__,
        "files": "subj0S.safetensors: per-voxel parameters and noise_free_{train,test} (N, V) predicted responses",
        "voxel_type_codes": encoding.VOXEL_TYPES,
        "colour_channels": list(encoding.COLOUR_CHANNELS),
        "motion_channels": list(encoding.MOTION_CHANNELS),
        "category_tuning_items": [c.name for c in CATEGORIES[: cfg.n_categories]]
        + [b.noun for b in BACKGROUNDS[: cfg.n_backgrounds]],
        "hrf": {"model": cfg.hrf_model, "source": "nilearn.glm.first_level", "sampled_at_fps": cfg.fps},
        "lag_removed_s": cfg.hrf_lag_trs * cfg.tr,
        "pairing": f"clip i <-> volume i + {cfg.hrf_lag_trs}, sampled at the centre of the volume's TR",
        "voxel_types_per_subject": {subject_name(s): t for s, t in types.items()},
    }


def _write_manifest(
    cfg: ToyWorldConfig, out_dir: Path, digest: str, features: dict[str, SplitFeatures], ceil: dict[str, Any]
) -> dict[str, Any]:
    atomic_write_json(out_dir / CEILING_FILE, ceil)
    atomic_write_json(out_dir / ENCODING_MODEL_DIR / "model.json", _model_description(cfg))
    atomic_write_json(out_dir / CONCEPT_CLASSES_FILE, concept_classes(cfg.n_categories, cfg.n_backgrounds))
    atomic_write_json(out_dir / KEY_OBJECT_CATEGORIES_FILE, annotate.key_object_categories(cfg))
    summary = {
        "n_clips": {s: len(f.items) // cfg.n_frames for s, f in features.items()},
        "n_segments": {s: len(f.segments) for s, f in features.items()},
        "resolution": cfg.resolution,
        "n_frames": cfg.n_frames,
        "voxels": {subject_name(s + 1): v for s, v in enumerate(cfg.voxels)},
        "n_concept_classes": len(concept_classes(cfg.n_categories, cfg.n_backgrounds)),
        "categories": [c.name for c in CATEGORIES[: cfg.n_categories]],
        "lag_removed_s": cfg.hrf_lag_trs * cfg.tr,
        "ceiling": ceil["mean_top1"],
        "ceiling_subjects": {s: r["top1"] for s, r in ceil["subjects"].items()},
    }
    manifest = {
        "generator": "tasks_construction.toy_cortex",
        "generator_version": GENERATOR_VERSION,
        "config": config_dict(cfg),
        "config_hash": digest,
        "summary": summary,
    }
    atomic_write_text(out_dir / "README.txt", _readme(cfg, digest))
    manifest["files"] = _fingerprints(out_dir)
    atomic_write_json(out_dir / WORLD_FILE, manifest)
    return summary


def _fingerprints(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file; PNG folders as (count, digest of names and contents)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if any(p.startswith(".") for p in rel.parts) or rel.name == WORLD_FILE:
            continue
        if path.is_dir() and path.name.startswith("mask_cls_"):
            digest = hashlib.sha256()
            files = sorted(path.iterdir())
            for png in files:
                digest.update(png.name.encode() + b"\0" + hashlib.sha256(png.read_bytes()).digest())
            out[rel.as_posix()] = {"count": len(files), "sha256": digest.hexdigest()}
        elif path.is_file() and not rel.parent.name.startswith("mask_cls_"):
            out[rel.as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def _readme(cfg: ToyWorldConfig, digest: str) -> str:
    return (
        "Toy cortex world (synthetic cc2017): procedurally generated movies with simulated fMRI from a known\n"
        "encoding model. Same files and formats as the preprocessed cc2017 data; extras: encoding_model/,\n"
        f"ceiling.json, toy_scenes_*.json, world.json. Config hash {digest}, seed {cfg.seed}, {cfg.resolution} px.\n"
        "Rebuild with `python download_dataset.py --toy`.\n"
    )
