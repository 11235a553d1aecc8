"""Stage e: diagnostics of the decoupled outputs of stage 3 on the test clips (spec §8, broken upstream).

Reads (after ``require_stage``) ``stage3_<mode>/`` ``blurry_videos`` (N, F, 3, R, R), ``masks`` (N, F, S, S) mask
probabilities, ``concept_probs`` (N, C), ``captions.json`` (GPT-2 captions) and ``concepts.json`` (class names, the
name each clip's mask was queried with), and the dataset's frames, captions, concept labels, key-object masks and
key-object names of the same clips (stage 3 decodes the first N test clips). Unlike upstream it rebuilds no model: it
scores what stage 3 wrote, so its numbers are the numbers of the run.

* Per-concept recall, precision and F1: ``concept_probs > sample.concept_threshold`` against the test labels, with
  each class's positives and predictions (upstream printed a cumulative recall only).
* Key-object Dice per clip: stage-3 masks > ``sample.mask_threshold`` against the ``find_key_obj`` test masks
  area-resized to S × S (≥ 0.5), the definition of stage 6 (upstream applied a sigmoid to binary masks, §8).
* Decoded GPT-2 captions beside the ground-truth captions, with each one's sentence BLEU-4 (smoothed).
* A panel PNG per sample clip (the first ``sample.num_panels``): rows ground truth, blurry video, masked blurry video
  (blurry × the soft mask {low, 1} of stage 3's ``sample.mask_soft_low``, upstream (m+1)/2), ground-truth key-object
  mask, predicted mask probability; one column per frame. In ``enhance`` mode stage 3's blurry video is already
  decoded from masked latents; the masked row shows the pixel-space mask on top.

Outputs in ``<run>/diagnostics_<mode>/``: ``diagnostics.json``, ``concepts.png`` (per-concept recall and
precision), ``dice.png`` (Dice per clip), ``panels/clip_<i>.png`` and ``manifest.json`` (depends on stage 3); then
the run's ``report.html`` is rebuilt with these figures (:mod:`pipeline.report`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.common import load_data
from pipeline.report import write_report
from utils.cli import begin_stage
from utils.errors import ConfigError, StageOrderError
from utils.io import atomic_path, atomic_write_json, finite_or_none
from utils.manifest import require_stage
from utils.metrics import caption_bleu, caption_bleu_per_sample, concept_f1, dice_per_sample
from utils.resize import resize_maps_nearest, resize_masks_majority
from utils.runs import DIAGNOSTICS_FILE, RunPaths, rerun_hint
from utils.stage_configs import DiagnosticsConfig

log = logging.getLogger(__name__)

CONCEPTS_FIG, DICE_FIG, PANELS_DIR = "concepts.png", "dice.png", "panels"
STAGE3_TENSORS = ("blurry_videos", "masks", "concept_probs")
STAGE3_JSON = ("captions.json", "concepts.json")
DATA_FIELDS = ("caption", "concepts", "key_obj_mask", "key_obj_cls")
PANEL_ROWS = ("ground truth", "blurry", "masked blurry", "GT key-object mask", "predicted mask")


def results_path(paths: RunPaths) -> Path:
    return paths.stage_dir("e") / DIAGNOSTICS_FILE


def panel_path(out_dir: Path, clip: int) -> Path:
    return out_dir / PANELS_DIR / f"clip_{clip:04d}.png"


@dataclass
class DiagInputs:
    """Stage 3's outputs and the ground truth of the same N test clips."""

    blurry: torch.Tensor  # (N, F, 3, R, R) in [0, 1]
    mask_probs: torch.Tensor  # (N, F, S, S)
    concept_probs: torch.Tensor  # (N, C)
    captions: list[str]
    mask_names: list[str]  # per clip: the class name its mask was queried with
    classes: list[str]  # (C,)
    labels: torch.Tensor  # (N, C) multi-hot
    gt_masks: torch.Tensor  # (N, F, R, R) {0, 1}
    gt_captions: list[str]
    key_objects: list[str]  # per clip: the find_key_obj category ("None" when none)
    mask_soft_low: float
    data: Any
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.blurry.shape[0])


# ---- inputs --------------------------------------------------------------------------------------------------------
def load_inputs(cfg: DiagnosticsConfig) -> DiagInputs:
    paths, hint = RunPaths.from_config(cfg), rerun_hint(cfg)
    dir3 = paths.stage_dir("3")
    manifest = require_stage("3", dir3, paths.stage_dirs(), hint)
    missing = [n for n in (*(f"{t}.safetensors" for t in STAGE3_TENSORS), *STAGE3_JSON) if not (dir3 / n).exists()]
    if missing:
        raise StageOrderError(f"stage 3 in {dir3} holds no {missing[0]}", hint.format(stage="3"))
    t = {name: load_file(dir3 / f"{name}.safetensors")[name] for name in STAGE3_TENSORS}
    captions = [str(c) for c in json.loads((dir3 / "captions.json").read_text())["captions"]]
    concepts = json.loads((dir3 / "concepts.json").read_text())
    n = int(t["blurry_videos"].shape[0])
    if {int(x.shape[0]) for x in t.values()} != {n} or len(captions) != n:
        raise StageOrderError(f"stage-3 outputs in {dir3} disagree on the number of clips", hint.format(stage="3"))
    data = load_data(cfg, DATA_FIELDS)
    if n > data.n_clips("test"):
        raise StageOrderError(f"stage 3 holds {n} clips, the test split {data.n_clips('test')}",
                              hint.format(stage="3"))  # fmt: skip
    clips = np.arange(n)
    low = float(manifest.get("config", {}).get("sample", {}).get("mask_soft_low", 0.5))
    return DiagInputs(
        blurry=t["blurry_videos"].float(),
        mask_probs=t["masks"].float(),
        concept_probs=t["concept_probs"].float(),
        captions=captions,
        mask_names=[str(x) for x in concepts.get("mask_names", ["?"] * n)],
        classes=[str(c) for c in concepts.get("classes", data.concept_classes)],
        labels=data.concept_labels("test")[torch.as_tensor(clips)],
        gt_masks=data.key_object_masks("test", clips),
        gt_captions=[str(c) for c in data.captions("test")[clips]],
        key_objects=[data.key_object_names("test")[i] for i in clips],
        mask_soft_low=low,
        data=data,
        files={
            **{name: dir3 / f"{name}.safetensors" for name in STAGE3_TENSORS},
            **{name: dir3 / name for name in STAGE3_JSON},
        },
    )


# ---- the diagnostics -----------------------------------------------------------------------------------------------
def concept_table(probs: torch.Tensor, labels: torch.Tensor, classes: list[str], threshold: float) -> dict[str, Any]:
    """Per-class rows (positives, predicted, TP, recall, precision, F1; NaN → None) and the micro / macro F1."""
    scores = concept_f1(probs, labels, threshold=threshold)
    pred, true = probs > threshold, labels.bool()
    rows = []
    for c, name in enumerate(classes):
        rows.append({
            "class": name,
            "positives": int(true[:, c].sum()),
            "predicted": int(pred[:, c].sum()),
            "tp": int((pred[:, c] & true[:, c]).sum()),
            "recall": float(scores["per_class_recall"][c]),
            "precision": float(scores["per_class_precision"][c]),
            "f1": float(scores["per_class_f1"][c]),
        })  # fmt: skip
    return {"threshold": threshold, "micro_f1": scores["micro"], "macro_f1": scores["macro"], "per_class": rows}


def clip_dice(mask_probs: torch.Tensor, gt_masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, F, S, S) probabilities and (N, F, R, R) GT masks → (N,) Dice at S × S (stage 6's definition)."""
    gt = resize_masks_majority(gt_masks, int(mask_probs.shape[-1]))
    return dice_per_sample(mask_probs > threshold, gt.bool())


def caption_rows(x: DiagInputs) -> dict[str, Any]:
    bleu = caption_bleu_per_sample(x.captions, x.gt_captions, smooth=True)
    rows = [{"clip": i, "decoded": d, "ground_truth": g, "bleu4": float(b)}
            for i, (d, g, b) in enumerate(zip(x.captions, x.gt_captions, bleu.tolist()))]  # fmt: skip
    return {"corpus_bleu4": caption_bleu(x.captions, x.gt_captions), "per_clip": rows}


def masked_blurry(blurry: torch.Tensor, mask_probs: torch.Tensor, low: float, threshold: float) -> torch.Tensor:
    """(N, F, 3, R, R) × the soft mask {low, 1} of (N, F, S, S), nearest-resized to R → (N, F, 3, R, R)."""
    soft = torch.where(mask_probs > threshold, 1.0, low)  # (N, F, S, S)
    soft = resize_maps_nearest(soft, blurry.shape[-1])  # (N, F, R, R)
    return blurry * soft[:, :, None]


# ---- figures -------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    _pyplot().close(fig)
    return path


def plot_concepts(table: dict[str, Any], path: Path) -> Path:
    """Per-concept recall and precision (bars), classes with positives or predictions only, by positives."""
    plt = _pyplot()
    rows = sorted((r for r in table["per_class"] if r["positives"] or r["predicted"]), key=lambda r: -r["positives"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(rows) + 1.5), 3.2))
    pos = np.arange(len(rows))
    for offset, key in ((-0.2, "recall"), (0.2, "precision")):
        ax.bar(pos + offset, [r[key] if r[key] is not None and not math.isnan(r[key]) else 0 for r in rows], 0.4,
               label=key)  # fmt: skip
    ax.set_xticks(pos, [f"{r['class']} ({r['positives']})" for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f"concepts (> {table['threshold']}): micro F1 {table['micro_f1']:.3f}, macro {table['macro_f1']:.3f}",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_dice(dice: torch.Tensor, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * len(dice) + 1.5), 2.6))
    ax.bar(np.arange(len(dice)), dice.numpy(), color="tab:green")
    ax.axhline(float(dice.mean()), color="k", lw=0.8, ls="--")
    ax.set_xlabel("test clip")
    ax.set_ylim(0, 1)
    ax.set_title(f"key-object Dice per clip: mean {float(dice.mean()):.3f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_panel(rows: list[torch.Tensor], title: str, path: Path) -> Path:
    """``rows``: the PANEL_ROWS videos of one clip, each (F, C, H, W) in [0, 1] (C = 1 or 3) → a rows × F grid."""
    plt = _pyplot()
    n_frames = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n_frames, figsize=(1.1 * n_frames + 1.2, 1.1 * len(rows) + 0.4),
                             squeeze=False)  # fmt: skip
    for r, (name, video) in enumerate(zip(PANEL_ROWS, rows)):
        for f in range(n_frames):
            ax = axes[r][f]
            img = video[f].float().clamp(0, 1)
            ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(), cmap="gray", vmin=0,
                      vmax=1, interpolation="nearest")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if f == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_panels(x: DiagInputs, out_dir: Path, count: int, threshold: float) -> list[Path]:
    clips = np.arange(min(count, x.n))
    if len(clips) == 0:
        return []
    gt = x.data.frames("test", clips)  # (P, F, 3, R, R)
    masked = masked_blurry(x.blurry[clips], x.mask_probs[clips], x.mask_soft_low, threshold)
    out = []
    for i in clips:
        rows = [gt[i], x.blurry[i], masked[i], x.gt_masks[i][:, None], x.mask_probs[i][:, None]]
        title = f"test clip {i}: key object {x.key_objects[i]}, mask queried as {x.mask_names[i]}"
        out.append(plot_panel(rows, title, panel_path(out_dir, int(i))))
    return out


# ---- the stage -----------------------------------------------------------------------------------------------------
def check_config(cfg: DiagnosticsConfig) -> None:
    sp = cfg.sample
    if sp.num_panels < 0 or not (0 < sp.concept_threshold < 1 and 0 < sp.mask_threshold < 1):
        raise ConfigError("sample.num_panels must be ≥ 0 and the thresholds in (0, 1)",
                          "fix the profile's stagee.sample block or --set sample.<key>=...")  # fmt: skip


def clear_outputs(out_dir: Path) -> None:
    for name in (DIAGNOSTICS_FILE, CONCEPTS_FIG, DICE_FIG):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / PANELS_DIR, ignore_errors=True)


def diagnose(cfg: DiagnosticsConfig) -> Path:
    """Run stage e; returns the diagnostics folder."""
    check_config(cfg)
    x = load_inputs(cfg)
    sp = cfg.sample
    paths, recorder = begin_stage(cfg, "e", depends_on=("3",))
    out_dir = paths.stage_dir("e")
    clear_outputs(out_dir)
    concepts = concept_table(x.concept_probs, x.labels, x.classes, sp.concept_threshold)
    dice = clip_dice(x.mask_probs, x.gt_masks, sp.mask_threshold)
    results: dict[str, Any] = {
        "stage": "e",
        "mode": cfg.run.mode,
        "subj": cfg.run.subject,
        "profile": cfg.run.profile,
        "n_clips": x.n,
        "clips": f"test clips 0..{x.n - 1}",
        "concepts": concepts,
        "key_object_dice": {
            "threshold": sp.mask_threshold,
            "mean": float(dice.mean()),
            "std": float(dice.std(correction=0)),
            "per_clip": [{"clip": i, "dice": float(d), "key_object": k, "mask_query": q}
                         for i, (d, k, q) in enumerate(zip(dice.tolist(), x.key_objects, x.mask_names))],
        },  # fmt: skip
        "captions": caption_rows(x),
        "panel_rows": list(PANEL_ROWS),
    }
    outputs = [atomic_write_json(out_dir / DIAGNOSTICS_FILE, finite_or_none(results))]
    outputs.append(plot_concepts(concepts, out_dir / CONCEPTS_FIG))
    outputs.append(plot_dice(dice, out_dir / DICE_FIG))
    outputs += write_panels(x, out_dir, sp.num_panels, sp.mask_threshold)
    for path in outputs:
        recorder.add_output(path)
    recorder.add_inputs([*x.files.values(), *x.data.opened_files])
    recorder.extra.update({"n_clips": x.n, "results_file": str((out_dir / DIAGNOSTICS_FILE).resolve())})
    recorder.finish()
    log.info("stage e (%s): %d clips; concept F1 micro %.3f macro %.3f; key-object Dice %.3f ± %.3f; caption BLEU-4 "
             "%.4f; %d panels", cfg.run.mode, x.n, concepts["micro_f1"], concepts["macro_f1"], float(dice.mean()),
             float(dice.std(correction=0)), results["captions"]["corpus_bleu4"], len(outputs) - 3)  # fmt: skip
    log.info("stage e done: %s; report %s", out_dir, write_report(cfg))
    return out_dir
