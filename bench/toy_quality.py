"""NEURONS against the ridge baseline and the oracle noise ceiling on a toy cortex world, subject 1.

    python bench/toy_quality.py                       # the toy world (tens of minutes on 2 CPU cores)
    python bench/toy_quality.py --profile smoke       # the smoke world (a few minutes)
    python bench/toy_quality.py --exp quality --modes enhance --set stage3.sample.num_clips=40

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

Prints one markdown table (metrics by method) and one JSON line; writes ``<run>/toy_quality.json`` and rebuilds the
run's ``report.html``, which then shows the ridge → decoders column and the ridge-token identification.
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
from utils.runs import TOY_QUALITY_FILE, RunPaths  # noqa: E402
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
        "identification": json.loads((paths.stage_dir("1") / "identification.json").read_text())["test"],
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
    x_train, x_test = data.fmri("train").mean(dim=1).numpy(), data.voxels("test").numpy()
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
def id_values(top1: dict[str, float]) -> dict[str, float]:
    """{"2-way", "<k>-way" (50 or capped), "all-way"} → id_2way / id_50way / id_allway."""
    ways = sorted((k for k in top1 if k not in ("2-way", "all-way")), key=lambda k: int(k.split("-")[0]))
    out = {"id_2way": top1.get("2-way"), "id_allway": top1.get("all-way")}
    if ways:
        out["id_50way"] = top1[ways[-1]]
    return out


def methods_table(results: dict[str, Any], chance: dict[str, float]) -> tuple[list[str], dict[str, dict]]:
    methods: dict[str, dict[str, float | None]] = {}
    for mode, r in results["neurons"].items():
        methods[f"NEURONS {mode}"] = {**{k: v["mean"] for k, v in r["metrics"].items()},
                                      **id_values(r["identification"]["top1"])}  # fmt: skip
    rd = results["ridge_decoders"]
    methods["ridge → decoders"] = {**{k: v["mean"] for k, v in rd["metrics"].items()},
                                   **id_values(rd["identification"]["top1"])}  # fmt: skip
    if results.get("ridge_pixels"):
        methods["ridge 8×8 pixels"] = id_values(results["ridge_pixels"]["top1"])
    if results.get("ceiling"):
        methods["oracle ceiling"] = id_values(results["ceiling"])
    methods["chance"] = chance
    header = ["metric", *methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in ROWS:
        cells = [methods[m].get(key) for m in methods]
        if all(c is None for c in cells):
            continue
        dec = 2 if key == "psnr" else 3
        lines.append("| " + " | ".join([label, *("—" if c is None else f"{c:.{dec}f}" for c in cells)]) + " |")
    return lines, methods


def chance_row(results: dict[str, Any]) -> dict[str, float]:
    r = next(iter(results["neurons"].values()))
    out = id_values(r["identification"]["chance"])
    out.update({k: v["chance"] for k, v in r["metrics"].items() if v.get("chance") is not None})
    return out


def baselines_of(cfg: SharedConfig) -> dict[str, Any]:
    root, subj = Path(cfg.paths.data_root), subject_name(SUBJ)
    out: dict[str, Any] = {}
    ceiling = json.loads((root / CEILING_FILE).read_text()) if (root / CEILING_FILE).exists() else {}
    out["ceiling"] = ceiling.get("subjects", {}).get(subj, {}).get("top1")
    from pipeline.report import ridge_identification

    out["ridge_pixels"] = ridge_identification(cfg)
    return out


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="toy", help="toy (default), smoke, or a YAML profile of a toy world")
    parser.add_argument("--exp", default="quality", help="run name (the ridge run is <exp>_ridge)")
    parser.add_argument("--modes", nargs="+", choices=("enhance", "motion"), default=["enhance", "motion"])
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
    try:
        cfg = stage_config(Stage6Config, profile, args.exp, args.modes[0], args.overrides)
        if cfg.model.size == "paper":
            raise SystemExit("error: toy_quality needs a toy world profile (toy, smoke or one that extends them)")
        results: dict[str, Any] = {"neurons": {m: pipeline(profile, args.exp, m, args.overrides) for m in args.modes}}
        results["ridge_decoders"] = ridge_path(profile, f"{args.exp}_ridge", args.exp, args.overrides)
        results.update(baselines_of(cfg))
    except NeuronsError as err:
        print(f"error: {type(err).__name__}: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    lines, methods = methods_table(results, chance_row(results))
    wall = round(time.time() - t0, 1)
    date = time.strftime("%Y-%m-%d")
    print(f"\ntoy quality, profile {args.profile}, subject {SUBJ}, {date}, wall {wall:.0f} s (test clips)\n")
    print("\n".join(lines))
    ways = next(iter(results["neurons"].values()))["identification"]["top1"]
    if "50-way" not in ways:
        print(f"\n(identification 50-way: {', '.join(ways)} here, the test split has fewer than 50 clips)")
    record = {"bench": "toy_quality", "profile": args.profile, "subj": SUBJ, "date": date, "wall_s": wall,
              "walls_s": {**{m: r["wall_s"] for m, r in results["neurons"].items()},
                          "ridge": results["ridge_decoders"]["wall_s"]}, "methods": methods}  # fmt: skip
    print(json.dumps(record, sort_keys=True))
    write_for_report(cfg, results, record)
    return 0


def write_for_report(cfg: SharedConfig, results: dict[str, Any], record: dict[str, Any]) -> None:
    """``<run>/toy_quality.json`` (the ridge → decoders metrics and token identification) and the refreshed report."""
    from pipeline.report import write_report
    from utils.io import atomic_write_json

    rd = results["ridge_decoders"]
    payload = {**record, "ridge_decoders": {"unmasked": {"metrics": rd["metrics"]}},
               "ridge_tokens_identification": rd["identification"]}  # fmt: skip
    atomic_write_json(RunPaths.from_config(cfg).root / TOY_QUALITY_FILE, payload)
    print(f"report: {write_report(cfg).resolve()}")


if __name__ == "__main__":
    sys.exit(main())
