"""NEURONS against the ridge baseline and the oracle noise ceiling on a toy cortex world, subject 1.

    python bench/toy_quality.py                       # the toy world (tens of minutes on 2 CPU cores)
    python bench/toy_quality.py --profile smoke       # the smoke world (a few minutes)
    python bench/toy_quality.py --exp quality --modes enhance --set stage3.sample.num_clips=40
    python bench/toy_quality.py --profile smoke --seeds 0,1,2  # runs quality_s0, quality_s1, quality_s2

1. The full pipeline (stages 1-6 and e, subject 1) in each mode through the driver ``train_neurons.sh`` (CPU), run
   ``<exp_root>/exp_<EXP>/subj_1``. A stage whose manifest is fresh and whose config hash equals the config this run
   would use is read, not rerun; from the first stage that is not current on, every stage runs.
2. The ridge baseline (``utils.baselines.fit_ridge``: himalaya, penalty per target by contiguous 5-fold CV, fit on
   the training clips, mean of their repeats) from voxels to what the brain model decodes: the CLIP image tokens of
   the stage-2 target frame (T × D), the frames' VAE latents (F × C × s × s), the concept labels (C), the key-object
   masks area-resized to stage 3's mask size (F × S × S) and the caption embedding (Dt). Its retrieval: test-clip
   identification from the predicted tokens (the rule and trials of stage 1's ``identification.json``). Its videos:
   a stage-3 folder of run ``<EXP>_ridge`` (keyframes = unCLIP of the predicted tokens with stage 3's sampler and
   per-clip seeds, blurry videos = VAE decode of the predicted latents, concept probabilities, mask probabilities,
   captions = the training caption nearest the predicted caption embedding), then stages 4, 5 and 6 on it: the same
   decoders as NEURONS (BLIP-2 captions of the keyframes, the video model, the metrics). No mask is applied (as in
   ``motion`` mode). Read, not rerun, when that run's stage 6 is current for the same ridge settings and configs.
3. The oracle ceiling: the world's ``ceiling.json`` (identification by the true encoding model), and the ridge
   baseline of ``tasks_construction/ridge_baseline.py`` (voxels → 8×8 pixels; its JSON when it has subject 1).

``--seeds 0,1,2`` (values of ``run.seed``): steps 1 and 2 once per seed, in runs ``<EXP>_s<seed>`` and
``<EXP>_s<seed>_ridge`` (the ridge maps are deterministic; the decoders' sampling follows the seed). One seed runs
``<EXP>`` with that ``run.seed``; without ``--seeds`` the profile's ``run.seed`` is used.

Prints one markdown table (metrics by method) and one JSON line; writes ``<run>/toy_quality.json`` (each seed's run)
and rebuilds its ``report.html``, which then shows the ridge → decoders column and the ridge-token identification.
Every number carries its spread: over several seeds "mean ± std (n=k)" (std with ddof 1, k the seeds with a finite
value); with one seed "value [lo, hi]", the 95 % interval of stage 6 (``ci95``, clip bootstrap) or, for the
identification rates, the Wilson interval over the test clips (:mod:`utils.metrics.intervals`). A trailing † marks a
number whose interval does not lie above chance (several seeds: in some seed). The JSON keeps every seed's values
(``methods.<method>.<metric>.values`` and ``per_seed``). When the toy metric classifiers' manifests record their
accuracy on the ground-truth test clips (``stats.test_eval``), it is printed under the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.config import config_hash, load_config, to_dict  # noqa: E402
from utils.data_catalog import CEILING_FILE, WORLD_FILE, subject_name  # noqa: E402
from utils.errors import NeuronsError  # noqa: E402
from utils.manifest import read_manifest, stale_reasons  # noqa: E402
from utils.runs import TOY_QUALITY_FILE, RunPaths, read_identification  # noqa: E402
from utils.stage_configs import (  # noqa: E402
    STAGE_CONFIGS,
    SharedConfig,
    Stage2Config,
    Stage3Config,
    Stage4Config,
    Stage5Config,
    Stage6Config,
)
from utils.stages import STAGE_BY_KEY, STAGE_KEYS  # noqa: E402

log = logging.getLogger("toy_quality")

C = TypeVar("C", bound=SharedConfig)
SUBJ = 1
RIDGE_MODE = "motion"  # the ridge run applies no mask; stages 4-6 only use the mode to name folders
WAYS, ID_TRIALS, ID_SEED = (2, 50), 200, 0  # as stage 1's identification.json
ROWS = (
    ("id_2way", "identification 2-way"), ("id_50way", "identification 50-way"),
    ("id_allway", "identification all-way"), ("video_2way", "video 2-way"), ("video_50way", "video 50-way"),
    ("clip_pcc", "CLIP-pcc"), ("frame_2way", "frame 2-way"), ("frame_50way", "frame 50-way"), ("ssim", "SSIM"),
    ("psnr", "PSNR (dB)"), ("blurry_video_ssim", "blurry-video SSIM"), ("concept_f1_micro", "concept F1 (micro)"),
    ("key_object_dice", "key-object Dice"), ("caption_bleu4", "caption BLEU-4"),
)  # fmt: skip


# ---- the pipeline --------------------------------------------------------------------------------------------------
def stage_config(cls: type[C], profile: str, exp: str, mode: str, overrides: list[str]) -> C:
    """The config (of class ``cls``) a driver run of its stage would resolve (the driver adds run.device=cpu)."""
    cli = {"subj": SUBJ, "exp": exp, "mode": mode}
    return load_config(cls, profile, [*overrides, "run.device=cpu"], cli)


def is_current(cfg: SharedConfig, stage: str, want_hash: str | None = None) -> bool:
    """The stage's manifest exists, is fresh and was written with this config (or has the hash ``want_hash``). The
    mode-independent stages 1 and 2 are compared without ``run.mode``: either mode's run may have written them."""
    folder = RunPaths.from_config(cfg).stage_dir(stage)
    manifest = read_manifest(folder)
    if manifest is None or stale_reasons(folder, manifest):
        return False
    if want_hash is not None:
        return manifest.get("config_hash") == want_hash
    return comparable(manifest.get("config", {}), stage) == comparable(to_dict(cfg), stage)


def comparable(config: dict[str, Any], stage: str) -> str:
    plain = json.loads(json.dumps(config))  # tuples → lists, as in a manifest
    if not STAGE_BY_KEY[stage].mode_dependent:
        plain.get("run", {}).pop("mode", None)
    return json.dumps(plain, sort_keys=True)


def stages_to_run(profile: str, exp: str, mode: str, overrides: list[str]) -> str:
    """From the first stage that is not current on, every stage of the pipeline."""
    for i, stage in enumerate(STAGE_KEYS):
        if not is_current(stage_config(STAGE_CONFIGS[stage], profile, exp, mode, overrides), stage):
            return STAGE_KEYS[i:]
    return ""


def run_driver(profile: str, exp: str, mode: str, stages: str, overrides: list[str]) -> float:
    env = {**os.environ, "NEURONS_SET": shlex.join(overrides), "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "train_neurons.sh"), "cpu", exp, stages, mode, str(SUBJ), profile]
    log.info("running %s", " ".join(cmd))
    t0 = time.time()
    result = subprocess.run(cmd, cwd=REPO, env=env)
    if result.returncode != 0:
        raise SystemExit(f"error: the pipeline ({mode}) failed with exit status {result.returncode}")
    return time.time() - t0


def pipeline(profile: str, exp: str, mode: str, overrides: list[str]) -> dict[str, Any]:
    stages = stages_to_run(profile, exp, mode, overrides)
    wall = run_driver(profile, exp, mode, stages, overrides) if stages else 0.0
    cfg6 = stage_config(Stage6Config, profile, exp, mode, overrides)
    paths = RunPaths.from_config(cfg6)
    return {
        "stages_run": stages or "none (all current)",
        "wall_s": round(wall, 1),
        "metrics": json.loads(paths.metrics_file.read_text())["metrics"],
        "identification": (read_identification(paths, cfg6.run.subject) or {})["test"],
    }


# ---- the ridge path ------------------------------------------------------------------------------------------------
def ridge_settings(cfg3: Stage3Config, data: Any, mask_size: int, frame: int) -> dict[str, Any]:
    world = Path(cfg3.paths.data_root) / WORLD_FILE
    world_id = hashlib.sha256(world.read_bytes()).hexdigest()[:12] if world.exists() else str(cfg3.paths.data_root)
    return {"method": "himalaya ridge per target, contiguous 5-fold CV", "world": world_id, "subj": SUBJ,
            "target_frame": frame, "mask_size": mask_size, "n_voxels": data.n_voxels,
            "stage3_config": config_hash(cfg3)}  # fmt: skip


def targets(data: Any, split: str, clip: Any, vae: Any, frame: int, mask_size: int
            ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:  # fmt: skip
    """Per-clip regression targets of a split, each (n, features), and each one's per-clip shape."""
    from utils.resize import resize_masks_majority

    tokens, latents = [], []
    for _, frames in data.frame_batches(split, 32):  # (b, F, 3, R, R)
        tokens.append(clip.image_tokens(frames[:, frame]).float().cpu())  # (b, T, D)
        latents.append(vae.encode(frames).float().cpu())  # (b, F, C, s, s)
    masks = resize_masks_majority(data.key_object_masks(split), mask_size)  # (n, F, S, S)
    full = {"tokens": torch.cat(tokens), "latents": torch.cat(latents), "masks": masks,
            "concepts": data.concept_labels(split), "caption": data.caption_embeddings(split)}  # fmt: skip
    return {k: v.flatten(1).numpy() for k, v in full.items()}, {k: tuple(v.shape[1:]) for k, v in full.items()}


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Ridge on z-scored targets (training statistics), predictions mapped back to the target scale."""
    from utils.baselines import DEFAULT_ALPHAS, fit_ridge

    mu, sd = y_train.mean(axis=0), y_train.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    model = fit_ridge(x_train, (y_train - mu) / sd, DEFAULT_ALPHAS)
    return np.asarray(model.predict(np.asarray(x_test, dtype=np.float64))) * sd + mu


def nearest_captions(pred: np.ndarray, train_emb: np.ndarray, train_caps: np.ndarray) -> list[str]:
    a = pred / np.linalg.norm(pred, axis=1, keepdims=True).clip(1e-8)
    b = train_emb / np.linalg.norm(train_emb, axis=1, keepdims=True).clip(1e-8)
    return [str(train_caps[j]) for j in (a @ b.T).argmax(axis=1)]


@torch.no_grad()
def keyframes_of(tokens: torch.Tensor, cfg3: Stage3Config, unclip: Any) -> torch.Tensor:
    """unCLIP keyframes (N, 3, K, K) of tokens (N, T, D), with stage 3's sampler settings and per-clip seeds."""
    from models.brain import clip_generators
    from pipeline.stage3 import UNCLIP_STREAM, configure_unclip
    from utils.resize import resize_frames_bilinear
    from utils.training import clip_seed

    sp = cfg3.sample
    configure_unclip(unclip, sp)
    out = []
    for start in range(0, len(tokens), sp.batch_size):
        idx = range(start, min(start + sp.batch_size, len(tokens)))
        gens = clip_generators([clip_seed(clip_seed(cfg3.run.seed, i), UNCLIP_STREAM) for i in idx], unclip.device)
        frames = unclip.reconstruct(tokens[idx.start : idx.stop].to(unclip.device), gens).float().cpu()
        out.append(resize_frames_bilinear(frames, sp.keyframe_size).clamp(0, 1))  # as stage 3
    return torch.cat(out)


def ridge_stage3(cfg3: Stage3Config, mask_size: int, frame: int) -> dict[str, Any]:
    """Fit the ridge maps, write the ridge run's stage-3 folder; returns the token identification."""
    from models.foundation import build_role, foundation_impl, require_roles
    from pipeline.common import load_data
    from utils.baselines import identification_accuracy
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.manifest import StageRecorder

    data = load_data(cfg3, ("caption", "caption_emb", "concepts", "key_obj_mask"))
    impl, root = foundation_impl(cfg3.model.size), cfg3.paths.weights_root
    require_roles(impl, root, ("clip", "vae", "unclip"))
    clip, vae, unclip = (build_role(r, impl, root, "cpu") for r in ("clip", "vae", "unclip"))
    n = cfg3.sample.num_clips or data.n_clips("test")
    y_train, shapes = targets(data, "train", clip, vae, frame, mask_size)
    y_test, _ = targets(data, "test", clip, vae, frame, mask_size)
    x_train, x_test = data.voxels("train", mean=True).numpy(), data.voxels("test").numpy()
    pred = {name: fit_predict(x_train, y, x_test) for name, y in y_train.items()}
    ident = identification_accuracy(pred["tokens"], y_test["tokens"], WAYS, ID_TRIALS, ID_SEED)
    out = {k: torch.from_numpy(v[:n]).float().view(n, *shapes[k]) for k, v in pred.items()}
    tensors = {
        "keyframes": keyframes_of(out["tokens"], cfg3, unclip),  # (N, 3, K, K) from (N, T, D)
        "blurry_videos": vae.decode(out["latents"]).float().cpu(),  # (N, F, 3, R, R) from (N, F, C, s, s)
        "masks": out["masks"].clamp(0, 1),  # (N, F, S, S)
        "concept_probs": out["concepts"].clamp(0, 1),  # (N, C)
    }
    captions = nearest_captions(pred["caption"][:n], y_train["caption"], data.captions("train"))
    settings = ridge_settings(cfg3, data, mask_size, frame)
    folder = RunPaths.from_config(cfg3).stage_dir("3")
    config = {"ridge": settings, "sample": {"mask_soft_low": 1.0}}  # no mask is applied
    recorder = StageRecorder("3", folder, settings_hash(settings), config).begin()
    for name, value in tensors.items():
        path = atomic_save_safetensors(folder / f"{name}.safetensors", {name: value.contiguous()})
        recorder.add_output(path, value.shape, value.dtype)
    recorder.add_output(atomic_write_json(folder / "captions.json", {"decoding": "nearest training caption",
                                                                      "captions": captions}))  # fmt: skip
    concepts = {"classes": list(data.concept_classes), "mask_names": ["ridge"] * n}
    recorder.add_output(atomic_write_json(folder / "concepts.json", concepts))
    recorder.add_inputs(data.opened_files)
    recorder.extra.update({"n_clips": n, "ridge_identification": ident})
    recorder.finish()
    return ident


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ridge_path(profile: str, exp: str, neurons_exp: str, overrides: list[str]) -> dict[str, Any]:
    """The ridge → decoders run (reused when current); returns its metrics, token identification and wall time."""
    from pipeline import stage4, stage5, stage6
    from pipeline.common import load_data
    from utils.runs import run_lock

    cfg3 = stage_config(Stage3Config, profile, exp, RIDGE_MODE, overrides)
    cfg4 = stage_config(Stage4Config, profile, exp, RIDGE_MODE, overrides)
    cfg5 = stage_config(Stage5Config, profile, exp, RIDGE_MODE, overrides)
    cfg6 = stage_config(Stage6Config, profile, exp, RIDGE_MODE, overrides)
    neurons3 = RunPaths.from_config(stage_config(Stage3Config, profile, neurons_exp, "enhance", overrides))
    mask_size = mask_size_of(neurons3.stage_dir("3"), cfg3)
    data = load_data(cfg3, ())
    frame = min(stage_config(Stage2Config, profile, exp, RIDGE_MODE, overrides).train.target_frame, data.n_frames - 1)
    want3 = settings_hash(ridge_settings(cfg3, data, mask_size, frame))
    later: tuple[tuple[SharedConfig, str], ...] = ((cfg4, "4"), (cfg5, "5"), (cfg6, "6"))
    current = is_current(cfg3, "3", want3) and all(is_current(c, k) for c, k in later)
    t0 = time.time()
    paths = RunPaths.from_config(cfg6)
    if not current:
        with run_lock(paths.root, "ridge"):
            ridge_stage3(cfg3, mask_size, frame)
            stage4.caption(cfg4)
            stage5.generate(cfg5)
            stage6.evaluate(cfg6)
    ident = read_manifest(paths.stage_dir("3"))["ridge_identification"]
    metrics = json.loads((paths.root / f"metrics_{RIDGE_MODE}.json").read_text())["metrics"]
    return {"reused": current, "wall_s": round(time.time() - t0, 1), "metrics": metrics, "identification": ident}


def mask_size_of(neurons_stage3: Path, cfg3: Stage3Config) -> int:
    """Stage 3's mask side S (the NEURONS run's, so both are scored at one size), else a quarter of the frames."""
    from safetensors import safe_open

    try:
        with safe_open(str(neurons_stage3 / "masks.safetensors"), "pt") as fh:
            return int(fh.get_slice("masks").get_shape()[-1])
    except (OSError, KeyError):
        from pipeline.common import load_data

        return max(1, load_data(cfg3, ()).resolution // 4)


# ---- the table -----------------------------------------------------------------------------------------------------
Entry = dict[str, Any]  # one number of one seed: {"mean", "ci95": [lo, hi] | None, "above_chance": bool | None}


def id_values(top1: dict[str, Any]) -> dict[str, Any]:
    """{"2-way", "<k>-way" (50 or capped), "all-way"} → id_2way / id_50way / id_allway."""
    ways = sorted((k for k in top1 if k not in ("2-way", "all-way")), key=lambda k: int(k.split("-")[0]))
    out = {"id_2way": top1.get("2-way"), "id_allway": top1.get("all-way")}
    if ways:
        out["id_50way"] = top1[ways[-1]]
    return out


def id_entries(ident: dict[str, Any]) -> dict[str, Entry]:
    """An identification result ({"top1", "chance", "n_candidates"}) as entries with the Wilson 95 % interval over
    its test clips (conservative for the N-way rates averaged over trials; :mod:`utils.metrics.intervals`)."""
    from utils.metrics import is_above_chance, wilson_interval

    n = ident.get("n_candidates")
    chance = id_values(ident.get("chance") or {})
    out = {}
    for key, p in id_values(ident["top1"]).items():
        ci = wilson_interval(p, int(n)) if p is not None and n else None
        above = is_above_chance(ci, chance[key]) if ci is not None and chance.get(key) is not None else None
        out[key] = {"mean": p, "ci95": ci, "above_chance": above}
    return out


def metric_entries(metrics: dict[str, Any]) -> dict[str, Entry]:
    """Stage 6's entries (mean, and its ci95 / above_chance when it wrote them)."""
    return {k: {"mean": v.get("mean"), "ci95": v.get("ci95"), "above_chance": v.get("above_chance")}
            for k, v in metrics.items()}  # fmt: skip


def seed_methods(results: dict[str, Any]) -> dict[str, dict[str, Entry]]:
    """One seed's numbers: method → row key → entry (NEURONS per mode and ridge → decoders)."""
    out = {}
    for mode, r in results["neurons"].items():
        out[f"NEURONS {mode}"] = {**metric_entries(r["metrics"]), **id_entries(r["identification"])}
    rd = results["ridge_decoders"]
    out["ridge → decoders"] = {**metric_entries(rd["metrics"]), **id_entries(rd["identification"])}
    return out


def aggregate_entry(entries: list[Entry | None]) -> dict[str, Any]:
    """One number over seeds: ``values`` (per seed, None where missing), ``mean`` and ``std`` (ddof 1, None below two
    finite values) of the finite ones, ``n_seeds`` (their count); with one seed its ``ci95``. ``above_chance``: True
    when every seed's interval lies above chance, None when some seed has no verdict."""
    values = [None if e is None else e.get("mean") for e in entries]
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    agg: dict[str, Any] = {
        "values": values,
        "n_seeds": len(finite),
        "mean": float(np.mean(finite)) if finite else None,
        "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
    }
    if len(entries) == 1 and entries[0] is not None:
        agg["ci95"] = entries[0].get("ci95")
    flags = [e.get("above_chance") for e in entries if e is not None]
    agg["above_chance"] = None if not flags or any(f is None for f in flags) else all(flags)
    return agg


def aggregate_seeds(per_seed: list[dict[str, dict[str, Entry]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """method → row key → :func:`aggregate_entry` over the seeds' :func:`seed_methods`."""
    methods = list(dict.fromkeys(m for seed in per_seed for m in seed))
    out = {}
    for m in methods:
        keys = list(dict.fromkeys(k for seed in per_seed for k in seed.get(m, {})))
        out[m] = {k: aggregate_entry([seed.get(m, {}).get(k) for seed in per_seed]) for k in keys}
    return out


def seed_cell(agg: dict[str, Any] | None, decimals: int) -> str:
    """"mean ± std (n=k)" over several seeds, "value [lo, hi]" for one; marked when not above chance."""
    from pipeline.report import fmt, marked

    if agg is None:
        return "—"
    if agg["mean"] is None:
        return "n/a"
    if len(agg["values"]) > 1:
        text = f"{fmt(agg['mean'], decimals, agg['std'])} (n={agg['n_seeds']})"
    else:
        text = fmt(agg["mean"], decimals, None, agg.get("ci95"))
    return marked(text, agg.get("above_chance"))


def methods_table(per_seed: list[dict[str, Any]], baselines: dict[str, Any], chance: dict[str, float],
                  notes: list[str]) -> tuple[Any, dict[str, dict[str, dict[str, Any]]]]:  # fmt: skip
    """The table (a :class:`pipeline.report.Table`) and its numbers: method → row key → aggregate over the seeds
    (the seed-independent ridge 8×8-pixel and oracle identification: one value with its Wilson interval)."""
    from pipeline.report import Table

    methods = aggregate_seeds([seed_methods(r) for r in per_seed])
    for name, key in (("ridge 8×8 pixels", "ridge_pixels"), ("oracle ceiling", "ceiling")):
        if baselines.get(key):
            methods[name] = {k: aggregate_entry([e]) for k, e in id_entries(baselines[key]).items()}
    rows = []
    for key, label in ROWS:
        if all(key not in m for m in methods.values()) and chance.get(key) is None:
            continue
        dec = 2 if key == "psnr" else 3
        c = chance.get(key)
        rows.append([label, *(seed_cell(m.get(key), dec) for m in methods.values()),
                     "—" if c is None else f"{c:.{dec}f}"])  # fmt: skip
    seeds = len(per_seed)
    spread = (f"mean ± std over {seeds} seeds (ddof 1), (n=k): seeds with a finite value" if seeds > 1 else
              "[lo, hi]: 95 % interval, stage 6's clip bootstrap (ci95 of metrics_<mode>.json); identification: "
              "Wilson interval over the test clips")  # fmt: skip
    table = Table("toy quality (test clips)", ["metric", *methods, "chance"], rows,
                  [spread, "ridge 8×8 pixels and the oracle ceiling do not depend on the seed: one value with its "
                   "Wilson interval over the test clips", *notes])  # fmt: skip
    return table, methods


def chance_row(results: dict[str, Any]) -> dict[str, float]:
    r = next(iter(results["neurons"].values()))
    out = id_values(r["identification"]["chance"])
    out.update({k: v["chance"] for k, v in r["metrics"].items() if v.get("chance") is not None})
    return out


def baselines_of(cfg: SharedConfig) -> dict[str, Any]:
    """The seed-independent identification results (each {"top1", "chance", "n_candidates", ...}): the oracle
    ceiling of the world's ``ceiling.json`` and the ridge baseline (voxels → 8×8 pixels)."""
    root, subj = Path(cfg.paths.data_root), subject_name(SUBJ)
    out: dict[str, Any] = {}
    ceiling = json.loads((root / CEILING_FILE).read_text()) if (root / CEILING_FILE).exists() else {}
    out["ceiling"] = ceiling.get("subjects", {}).get(subj)
    from pipeline.report import ridge_identification

    out["ridge_pixels"] = ridge_identification(cfg)
    return out


# ---- seeds ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedRun:
    """One pipeline run of the benchmark: ``seed`` (None: the profile's run.seed), its run name and overrides."""

    seed: int | None
    exp: str
    overrides: tuple[str, ...]


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" → [0, 1, 2] (distinct integers)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds, e.g. 0,1,2")
    return seeds


def seed_runs(exp: str, seeds: list[int] | None, overrides: list[str]) -> list[SeedRun]:
    """No ``--seeds``: run ``<exp>`` as configured. One seed: run ``<exp>`` with ``run.seed=<seed>``. Several: run
    ``<exp>_s<seed>`` with ``run.seed=<seed>`` each (their ridge runs ``<exp>_s<seed>_ridge``)."""
    if seeds is None:
        return [SeedRun(None, exp, tuple(overrides))]
    if any(o.split("=", 1)[0].strip() == "run.seed" for o in overrides):
        raise SystemExit("error: --seeds sets run.seed; drop run.seed from --set")
    return [SeedRun(s, exp if len(seeds) == 1 else f"{exp}_s{s}", (*overrides, f"run.seed={s}")) for s in seeds]


def run_seed(profile: str, modes: list[str], run: SeedRun) -> dict[str, Any]:
    """The NEURONS pipeline in each mode and the ridge → decoders run of one seed."""
    overrides = list(run.overrides)
    results: dict[str, Any] = {"neurons": {m: pipeline(profile, run.exp, m, overrides) for m in modes}}
    results["ridge_decoders"] = ridge_path(profile, f"{run.exp}_ridge", run.exp, overrides)
    return results


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="toy", help="toy (default), smoke, or a YAML profile of a toy world")
    parser.add_argument("--exp", default="quality", help="run name (the ridge run is <exp>_ridge)")
    parser.add_argument("--modes", nargs="+", choices=("enhance", "motion"), default=["enhance", "motion"])
    parser.add_argument("--seeds", type=parse_seeds, default=None, metavar="S1,S2,...",
                        help="values of run.seed, each its own run <exp>_s<seed> (one seed: run <exp>)")  # fmt: skip
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override passed to every stage (NEURONS_SET syntax: stage<k>.key=value aims at one)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    profile = args.profile
    if profile.endswith((".yaml", ".yml")):
        profile = str(Path(profile).resolve())  # as the driver passes it (the profile is part of the config hash)
    t0 = time.time()
    runs = seed_runs(args.exp, args.seeds, args.overrides)
    try:
        cfgs = [stage_config(Stage6Config, profile, r.exp, args.modes[0], list(r.overrides)) for r in runs]
        if cfgs[0].model.size == "paper":
            raise SystemExit("error: toy_quality needs a toy world profile (toy, smoke or one that extends them)")
        per_seed = [run_seed(profile, args.modes, r) for r in runs]
        baselines = baselines_of(cfgs[0])
    except NeuronsError as err:
        print(f"error: {type(err).__name__}: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    from pipeline.report import classifier_ceilings

    table, methods = methods_table(per_seed, baselines, chance_row(per_seed[0]),
                                   classifier_ceilings(cfgs[0].paths.weights_root))  # fmt: skip
    wall = round(time.time() - t0, 1)
    date = time.strftime("%Y-%m-%d")
    seeds = "" if args.seeds is None else f", seeds {','.join(map(str, args.seeds))}"
    print(f"\ntoy quality, profile {args.profile}, subject {SUBJ}{seeds}, {date}, wall {wall:.0f} s (test clips)\n")
    print(table.markdown())
    ways = next(iter(per_seed[0]["neurons"].values()))["identification"]["top1"]
    if "50-way" not in ways:
        print(f"\n(identification 50-way: {', '.join(ways)} here, the test split has fewer than 50 clips)")
    record = seeds_record(args, runs, per_seed, methods, chance_row(per_seed[0]))
    record.update({"date": date, "wall_s": wall})
    print(json.dumps(record, sort_keys=True))
    for cfg, results in zip(cfgs, per_seed, strict=True):
        write_for_report(cfg, results, record)
    return 0


def seeds_record(args: argparse.Namespace, runs: list[SeedRun], per_seed: list[dict[str, Any]],
                 methods: dict[str, Any], chance: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """The JSON record: the aggregate of every number (with its per-seed ``values``) and each seed's numbers."""
    return {
        "bench": "toy_quality", "profile": args.profile, "subj": SUBJ, "seeds": args.seeds,
        "runs": [r.exp for r in runs], "methods": methods, "chance": chance,
        "per_seed": [{"seed": r.seed, "exp": r.exp, "methods": seed_methods(res),
                      "walls_s": {**{m: x["wall_s"] for m, x in res["neurons"].items()},
                                  "ridge": res["ridge_decoders"]["wall_s"]}}
                     for r, res in zip(runs, per_seed, strict=True)],
    }  # fmt: skip


def write_for_report(cfg: SharedConfig, results: dict[str, Any], record: dict[str, Any]) -> None:
    """``<run>/toy_quality.json`` of one seed's run (its ridge → decoders metrics and token identification, and the
    whole record) and that run's refreshed report."""
    from pipeline.report import write_report
    from utils.io import atomic_write_json

    rd = results["ridge_decoders"]
    payload = {**record, "ridge_decoders": {"unmasked": {"metrics": rd["metrics"]}},
               "ridge_tokens_identification": rd["identification"]}  # fmt: skip
    atomic_write_json(RunPaths.from_config(cfg).root / TOY_QUALITY_FILE, payload)
    print(f"report: {write_report(cfg).resolve()}")


if __name__ == "__main__":
    sys.exit(main())
