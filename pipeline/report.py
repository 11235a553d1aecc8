"""The run report: one self-contained HTML page, ``<run>/report.html`` (every image a base64 data URI, CSS inline, no
script and no external asset), written by stage 6 and refreshed by stage e.

Per mode that stage 6 has scored (``metrics_<mode>.json``): the metrics table with, on the real data (``paper``
foundation models), the published numbers of MinD-Video, NeuroClips and NEURONS beside ours (with their sources) and,
on a toy world, the ridge baseline and the oracle noise ceiling (brain-side clip identification, read from the data
root's ``ridge_baseline.json`` and ``ceiling.json``; the ridge row is computed for this subject when that file lacks
it) and the ridge → decoders videos of ``bench/toy_quality.py`` when ``<run>/toy_quality.json`` exists; then the
stage-1 and stage-2 loss curves; side-by-side GIFs (ground truth | reconstruction | blurry video | predicted mask |
ground-truth key-object mask) of the first ``eval.report_samples`` test clips with their captions, concepts and key
objects; the stage-e figures when they exist; and the state of every stage's manifest.

Every number of ours carries its spread: "mean ± std [lo, hi]" with the 95 % interval of ``metrics_<mode>.json``'s
``ci95`` (:mod:`utils.metrics.intervals`), and a trailing :data:`MARK` (legend under the table, the cell in the warning
colour in HTML) on a metric whose interval does not lie above chance (``above_chance`` false), and
:data:`SHUFFLED_MARK` on an N-way metric that does not beat its shuffled chance (``above_shuffled`` false; the chance
column then also gives the shuffled chance of each mode's headline protocol). Identification rates
show a Wilson interval over the test clips. The metric classifiers' accuracy on the ground-truth test videos (their
``manifest.json`` ``stats.test_eval``, toy weights) is noted under the metrics table when recorded.

``python -m pipeline.report --profile toy --exp demo --subj 1 [--write]`` prints the metrics table (markdown) and the
report's path; ``--write`` rebuilds the report first.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from pipeline.captions import CAPTIONS_FILE
from utils.baselines import ridge_baseline
from utils.cli import OneLineParser, fixed_args, report_error, subject_arg
from utils.config import load_config
from utils.data import BrainVideoData
from utils.data_catalog import CEILING_FILE, RIDGE_BASELINE_FILE, subject_name
from utils.errors import NeuronsError
from utils.io import atomic_write_text
from utils.manifest import MANIFEST, read_manifest, stale_reasons
from utils.metrics import dice_per_sample, is_above_chance, wilson_interval
from utils.resize import resize_frames_bilinear, resize_masks_majority
from utils.runs import (
    DIAGNOSTICS_FILE,
    PROMPTS_FILE,
    TOY_QUALITY_FILE,
    VIDEOS_FILE,
    RunPaths,
    read_identification,
    setup_logging,
)
from utils.stage_configs import SharedConfig, Stage6Config
from utils.video_io import side_by_side, to_uint8

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
MODES = ("enhance", "motion")
DEFAULT_SAMPLES = 8
MARK = "†"  # after a metric whose 95 % interval does not lie above chance
LEGEND = f"{MARK} the 95 % interval does not lie above chance (its lower bound is at or below the chance level)"
SHUFFLED_MARK = "‡"  # after an N-way metric that does not beat its own shuffled pairs
SHUFFLED_LEGEND = (
    f"{SHUFFLED_MARK} not above its shuffled chance: the 95 % clip-bootstrap interval of the mean paired difference "
    "(each clip's accuracy minus that of its prediction scored against other clips' ground truth) reaches 0"
)
NUMBER = re.compile(  # right-aligned
    rf"(-?[\d.]+( ± [\d.]+)?( \[-?[\d.]+, -?[\d.]+\])?( \(n=\d+\))?|n/a|—)( {MARK})?( {SHUFFLED_MARK})?"
)
CLASSIFIER_ROLES = (("video_classifier", "video classifier", "ground-truth test videos"),
                    ("frame_classifier", "frame classifier", "ground-truth test frames"))  # fmt: skip
GIF_FPS = 3.0  # the dataset's clips: 6 frames at 3 fps
# (metrics-JSON key, label, decimals)
METRICS = (
    ("video_2way", "video 2-way", 3), ("video_50way", "video 50-way", 3), ("clip_pcc", "CLIP-pcc", 3),
    ("frame_2way", "frame 2-way", 3), ("frame_50way", "frame 50-way", 3), ("ssim", "SSIM", 3),
    ("psnr", "PSNR (dB)", 2), ("blurry_video_ssim", "blurry-video SSIM", 3),
    ("concept_f1_micro", "concept F1 (micro)", 3), ("concept_f1_macro", "concept F1 (macro)", 3),
    ("key_object_dice", "key-object Dice", 3),
    ("caption_bleu4", "caption BLEU-4", 3),
)  # fmt: skip
NEURONS_SOURCE = "NEURONS (ICCV 2025, arXiv 2503.11167) Table 1, video-level only, read from secondary notes"
NEUROCLIPS_SOURCE = "NeuroClips (NeurIPS 2024) Table 1"
# Published test-set numbers (cc2017), spec dataset-and-metrics §3.1-3.3: per subject where the paper gives them,
# else the mean of subjects 1-3. All were computed with the upstream metric code (our `neurons` protocol).
PUBLISHED: dict[str, dict[str | int, Any]] = {  # "source", "mean" and per subject
    "MinD-Video": {
        "source": f"{NEUROCLIPS_SOURCE} (mean of 3 subjects)",
        "mean": {"video_2way": 0.839, "video_50way": 0.197, "clip_pcc": 0.408, "frame_2way": 0.796,
                 "frame_50way": 0.174, "ssim": 0.171, "psnr": 8.662},
    },
    "NeuroClips": {
        "source": f"{NEUROCLIPS_SOURCE}; caption BLEU-4 as reported by NEURONS (secondary)",
        "mean": {"video_2way": 0.834, "video_50way": 0.220, "clip_pcc": 0.738, "frame_2way": 0.806,
                 "frame_50way": 0.203, "ssim": 0.390, "psnr": 9.211, "caption_bleu4": 0.022},
        1: {"video_2way": 0.830, "video_50way": 0.208, "clip_pcc": 0.736, "frame_2way": 0.799, "frame_50way": 0.187,
            "ssim": 0.392, "psnr": 9.226, "caption_bleu4": 0.022},
        2: {"video_2way": 0.837, "video_50way": 0.230, "clip_pcc": 0.742, "frame_2way": 0.811, "frame_50way": 0.210,
            "ssim": 0.392, "psnr": 9.336, "caption_bleu4": 0.022},
        3: {"video_2way": 0.835, "video_50way": 0.221, "clip_pcc": 0.735, "frame_2way": 0.807, "frame_50way": 0.213,
            "ssim": 0.387, "psnr": 9.072, "caption_bleu4": 0.022},
    },
    "NEURONS": {
        "source": f"{NEURONS_SOURCE}; key-object Dice 35.63 % and caption BLEU-4 from its sub-task results "
                  "(subject not stated, secondary)",
        "mean": {"video_2way": 0.863, "video_50way": 0.262, "clip_pcc": 0.934, "key_object_dice": 0.3563,
                 "caption_bleu4": 0.036},
        1: {"video_2way": 0.862, "video_50way": 0.254, "clip_pcc": 0.932, "key_object_dice": 0.3563,
            "caption_bleu4": 0.036},
        2: {"video_2way": 0.860, "video_50way": 0.252, "clip_pcc": 0.933, "key_object_dice": 0.3563,
            "caption_bleu4": 0.036},
        3: {"video_2way": 0.868, "video_50way": 0.278, "clip_pcc": 0.937, "key_object_dice": 0.3563,
            "caption_bleu4": 0.036},
    },
}  # fmt: skip
CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:12px}.warn{color:#a40}img.px{image-rendering:pixelated}
.sample{display:flex;gap:1em;align-items:flex-start;border-top:1px solid #ddd;padding:.5em 0}
.sample .text{font-size:13px}figure{display:inline-block;margin:.3em}figcaption{font-size:12px;color:#555}
"""


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def all_notes(self) -> list[str]:
        """The notes, and the legends of :data:`MARK` and :data:`SHUFFLED_MARK` when some cell carries them."""
        notes = list(self.notes)
        for mark, legend in ((MARK, LEGEND), (SHUFFLED_MARK, SHUFFLED_LEGEND)):
            if legend not in notes and any(f" {mark}" in c for r in self.rows for c in r):
                notes.append(legend)
        return notes

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.all_notes()])

    def html(self) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(td(c) for c in r) + "</tr>" for r in self.rows)
        notes = "".join(f'<div class="note">{esc(n)}</div>' for n in self.all_notes())
        return f"<h3>{esc(self.title)}</h3><table><tr>{head}</tr>{body}</table>{notes}"


# ---- small helpers -------------------------------------------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape(str(x))


def td(text: str) -> str:
    """A table cell: numbers right-aligned, a number marked not above chance in the warning colour."""
    if not NUMBER.fullmatch(text):
        return f"<td>{esc(text)}</td>"
    return f'<td class="num{" warn" if f" {MARK}" in text else ""}">{esc(text)}</td>'


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def png_uri(path: Path) -> str:
    return data_uri(Path(path).read_bytes(), "image/png")


def gif_uri(frames01: torch.Tensor, fps: float = GIF_FPS) -> str:
    """Frames (F, 3, H, W) in [0, 1] → a looping GIF as a data URI."""
    import imageio.v3 as iio  # heavy, and only the report writes GIFs

    payload = iio.imwrite("<bytes>", to_uint8(frames01), extension=".gif", duration=1000.0 / fps, loop=0)
    return data_uri(payload, "image/gif")


def img(uri: str, alt: str, height: int | None = None, pixelated: bool = False) -> str:
    style = f' style="height:{height}px"' if height else ""
    cls = ' class="px"' if pixelated else ""
    return f'<img src="{uri}" alt="{esc(alt)}"{cls}{style}>'


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fmt(value: float | None, decimals: int = 3, std: float | None = None, ci: Sequence[float] | None = None) -> str:
    """A number as "v", "v ± std", "v [lo, hi]" or "v ± std [lo, hi]"; "n/a" without a value."""
    if value is None:
        return "n/a"
    text = f"{value:.{decimals}f}"
    text = f"{text} ± {std:.{decimals}f}" if std is not None else text
    return f"{text} [{ci[0]:.{decimals}f}, {ci[1]:.{decimals}f}]" if ci is not None and len(ci) == 2 else text


def marked(text: str, above_chance: bool | None, above_shuffled: bool | None = None) -> str:
    """``text`` with :data:`MARK` when ``above_chance`` is False and :data:`SHUFFLED_MARK` when ``above_shuffled`` is
    False (None: no such chance level, nothing to mark)."""
    if text == "n/a":
        return text
    text = f"{text} {MARK}" if above_chance is False else text
    return f"{text} {SHUFFLED_MARK}" if above_shuffled is False else text


def cell(value: float | dict[str, Any] | None, decimals: int) -> str:
    """A published number, or a metrics-JSON entry {"mean", "std", "ci95", "above_chance", ...} as "mean ± std
    [lo, hi]" (marked when not above chance); "—" when absent."""
    if isinstance(value, dict):
        text = fmt(value.get("mean"), decimals, value.get("std"), value.get("ci95"))
        return marked(text, value.get("above_chance"), value.get("above_shuffled"))
    return "—" if value is None else fmt(value, decimals)


def rate_cell(p: float | None, n: int | None, chance: float | None, decimals: int = 3) -> str:
    """An identification rate p of n test clips with its Wilson 95 % interval (marked when the interval does not lie
    above ``chance``); the bare rate when n is unknown."""
    ci = wilson_interval(p, n) if p is not None and n else None
    text = fmt(p, decimals, None, ci)
    return marked(text, is_above_chance(ci, chance) if ci is not None and chance is not None else None)


def is_paper(cfg: SharedConfig) -> bool:
    return cfg.model.size == "paper"


# ---- metrics tables ------------------------------------------------------------------------------------------------
def scored_modes(paths: RunPaths) -> dict[str, dict[str, Any]]:
    """mode → its metrics JSON, for every mode stage 6 has scored in this run."""
    out = {}
    for mode in MODES:
        data = read_json(RunPaths(paths.root, mode).metrics_file)
        if isinstance(data, dict) and "metrics" in data:
            out[mode] = data
    return out


def by_protocol(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """protocol → its metrics of one metrics JSON: ``protocols`` (stage 6 scores both), or, in files written before
    that, the one ``metrics`` block under its ``protocol``."""
    if isinstance(m.get("protocols"), dict):
        return {p: v.get("metrics", {}) for p, v in m["protocols"].items()}
    return {str(m.get("protocol", "standard")): m["metrics"]}


def chance_of(metrics: dict[str, dict[str, Any]], key: str) -> str:
    """The analytic chance of metric ``key``, and its shuffled chance in the headline protocol of each mode (the
    shuffled chance depends on the predictions: "0.750; shuffled 0.712 / 0.705" for enhance / motion)."""
    chance = next((fmt(m["metrics"][key]["chance"]) for m in metrics.values()
                   if m.get("metrics", {}).get(key, {}).get("chance") is not None), "")  # fmt: skip
    shuffled = [fmt(m["metrics"][key]["chance_shuffled"]) for m in metrics.values()
                if m.get("metrics", {}).get(key, {}).get("chance_shuffled") is not None]  # fmt: skip
    return f"{chance}; shuffled {' / '.join(shuffled)}" if chance and shuffled else chance


def metrics_table(cfg: SharedConfig, scored: dict[str, dict[str, Any]], toy_quality: dict[str, Any] | None) -> Table:
    """Ours per mode, then the published numbers (paper) or the ridge → decoders videos (toy), then chance."""
    subj = cfg.run.subject
    ours = [(f"ours ({mode}, subj {subj}, {p})", pm) for p in ("standard", "neurons") for mode, m in scored.items()
            for q, pm in by_protocol(m).items() if q == p]  # fmt: skip  # the neurons columns last, beside the papers
    header = ["metric", *(name for name, _ in ours)]
    others: list[tuple[str, dict[str, Any]]] = []
    notes = [
        f"ours: mean ± std over test clips ({mode}, {m['n_clips']} clips, {m['caption_source']} captions); "
        f"protocols {', '.join(by_protocol(m))}, headline '{m.get('protocol')}'"
        for mode, m in scored.items()
    ]
    notes.append(interval_note(scored))
    notes.append("protocol 'standard': the corrected metric definitions; 'neurons': upstream's metric code "
                 "(run_metrics.py), on stage 5's GIF grids when it wrote them")  # fmt: skip
    if is_paper(cfg):
        for name, pub in PUBLISHED.items():
            values = pub.get(subj, pub["mean"])
            others.append((f"{name} ({'subj ' + str(subj) if subj in pub else 'mean of 3'})", values))
            notes.append(f"{name}: {pub['source']}")
        notes.append("the published numbers use the upstream metric code: they stand beside protocol 'neurons' and "
                     "compare with it only; 'standard' SSIM and CLIP-pcc are defined differently")  # fmt: skip
        if not any("neurons" in by_protocol(m) for m in scored.values()):
            notes.append("no protocol 'neurons' in these metrics files: rerun stage 6, which scores both")
    elif toy_quality and toy_quality.get("ridge_decoders"):
        rd = toy_quality["ridge_decoders"]
        for mode, m in rd.items():
            others.append((f"ridge → decoders ({mode})", m.get("metrics", {})))
        notes.append(f"ridge → decoders: ridge-predicted CLIP tokens, VAE latents, concepts and masks through the "
                     f"same unCLIP / BLIP-2 / video decoders ({TOY_QUALITY_FILE}, {toy_quality.get('date', '?')})")
    header += [name for name, _ in others] + ["chance"]
    rows = []
    for key, label, dec in METRICS:
        if not any(key in pm for _, pm in ours) and not any(key in v for _, v in others):
            continue
        row = [label]
        for _, pm in ours:
            e = pm.get(key)
            row.append(cell(e, dec) if e else "")
        row += [cell(v.get(key), dec) for _, v in others]
        rows.append(row + [chance_of(scored, key)])
    return Table("Video and sub-task metrics (test clips)", header, rows, notes)


def interval_note(scored: dict[str, dict[str, Any]]) -> str:
    """How the intervals of ours were made (the bootstrap resamples each metrics file records)."""
    resamples = sorted({str(m.get("rule", {}).get("bootstrap", "?")) for m in scored.values()})
    return (
        f"[lo, hi]: 95 % interval of the test-set value, the percentile interval of a seeded clip bootstrap "
        f"({' / '.join(resamples)} resamples; N-way accuracy: over the clips' hit rates); concept F1 and caption "
        "BLEU: ± is that bootstrap's std; no interval in metrics files older than the intervals"
    )


def _num(v: Any) -> str:
    return f"{float(v):.3f}" if isinstance(v, int | float) else str(v)


def ceiling_line(label: str, what: str, ev: dict[str, Any]) -> str:
    """The line "video classifier on ground-truth test videos: top-1 X (chance Y)[; per factor: ...]"."""
    text = f"{label} on {what}: top-1 {_num(ev['top1'])}"
    if ev.get("chance") is not None:
        text += f" (chance {_num(ev['chance'])})"
    factors = ev.get("factors")
    if isinstance(factors, dict) and factors:
        parts = [f"{k} {_num(v['top1'])}" + (f" (chance {_num(v['chance'])})" if v.get("chance") is not None else "")
                 if isinstance(v, dict) and "top1" in v else f"{k} {_num(v)}" for k, v in factors.items()]  # fmt: skip
        text += "; per factor: " + ", ".join(parts)
    return text


def classifier_ceilings(weights_root: str | Path) -> list[str]:
    """One line per metric classifier whose weights' ``manifest.json`` records ``stats.test_eval`` ({"top1",
    "chance", "factors"}): its accuracy on the ground-truth test clips, the ceiling of the N-way metrics; nothing
    otherwise."""
    out = []
    for role, label, what in CLASSIFIER_ROLES:
        stats = (read_json(Path(weights_root) / role / MANIFEST) or {}).get("stats")
        ev = stats.get("test_eval") if isinstance(stats, dict) else None
        if isinstance(ev, dict) and ev.get("top1") is not None:
            out.append(ceiling_line(label, what, ev))
    return out


def toy_identification(cfg: SharedConfig, paths: RunPaths, toy_quality: dict[str, Any] | None) -> Table | None:
    """Brain-side clip identification (test, top-1): stage 1 vs the ridge baseline and the oracle ceiling, each rate
    with its Wilson interval over the test clips when the file records their number (``n_candidates``)."""
    subj = subject_name(cfg.run.subject)
    root = Path(cfg.paths.data_root)
    cols: list[tuple[str, dict[str, Any]]] = []  # (name, {"top1", "n_candidates", ...})
    ours = read_identification(paths, cfg.run.subject)
    if ours and "test" in ours:
        cols.append(("ours: stage 1 (brain → CLIP tokens)", ours["test"]))
    if toy_quality and toy_quality.get("ridge_tokens_identification"):
        cols.append(("ridge (voxels → CLIP tokens)", toy_quality["ridge_tokens_identification"]))
    ridge = ridge_identification(cfg)
    if ridge:
        cols.append(("ridge baseline (voxels → 8×8 pixels)", ridge))
    ceiling = read_json(root / CEILING_FILE)
    if ceiling and subj in ceiling.get("subjects", {}):
        cols.append(("oracle noise ceiling", ceiling["subjects"][subj]))
    if not cols:
        return None
    chance = (ours or {}).get("test", {}).get("chance") or (ridge or {}).get("chance") or {}
    keys = list(dict.fromkeys(k for _, c in cols for k in c["top1"]))
    rows = [[k, *(rate_cell(c["top1"].get(k), c.get("n_candidates"), chance.get(k)) for _, c in cols),
             fmt(chance.get(k))] for k in keys]  # fmt: skip
    notes = ["identification of each test clip among N−1 random others by the correlation of its predicted features "
             "with every candidate's true features (utils/baselines.py); ceiling: the true encoding model's "
             "predicted responses vs the measured 10-repeat mean",
             "[lo, hi]: 95 % Wilson interval over the test clips (conservative for the N-way rates, which average "
             "trials per clip)", f"data: {root}"]  # fmt: skip
    return Table(f"Brain-side identification, test top-1 ({subj})", ["N-way", *(n for n, _ in cols), "chance"], rows,
                 notes)  # fmt: skip


def ridge_identification(cfg: SharedConfig) -> dict[str, Any] | None:
    """This subject's ridge-baseline test identification: from ``ridge_baseline.json``, else computed (seconds)."""
    subj = subject_name(cfg.run.subject)
    stored = read_json(Path(cfg.paths.data_root) / RIDGE_BASELINE_FILE)
    if stored and subj in stored.get("subjects", {}):
        return stored["subjects"][subj]["test"]
    try:
        data = BrainVideoData(cfg.paths.data_root, cfg.run.subject, cfg.data)
        return ridge_baseline(data)["test"]
    except (NeuronsError, OSError, ValueError) as err:
        log.warning("no ridge baseline for the report (%s)", str(err).splitlines()[0] if str(err) else err)
        return None


# ---- figures and samples -------------------------------------------------------------------------------------------
def curves_section(paths: RunPaths) -> str:
    figs = []
    for stage in ("1", "2"):
        path = paths.stage_dir(stage) / "curves.png"
        if path.exists():
            figs.append(f"<figure>{img(png_uri(path), f'stage {stage} curves')}<figcaption>stage {stage}: "
                        f"{esc(path.parent.name)}/curves.png</figcaption></figure>")  # fmt: skip
    return "<h2>Training curves</h2>" + ("".join(figs) or '<p class="note">no stage-1/2 curves in this run</p>')


def first_rows(path: Path, name: str, n: int) -> torch.Tensor | None:
    """The first ``n`` rows of tensor ``name`` in a safetensors file, read alone (the paper's stage-5 videos hold
    gigabytes), or None when the file is missing or unreadable."""
    try:
        with safe_open(str(path), "pt") as fh:
            return fh.get_slice(name)[:n]
    except Exception:  # a missing or partial file: the section says what is missing
        return None


@dataclass
class Samples:
    """The first n test clips of one mode: stage-3/5 outputs beside the dataset's ground truth."""

    gt: torch.Tensor  # (n, F, 3, R, R)
    pred: torch.Tensor  # (n, F, 3, R5, R5) stage 5's eval frames
    blurry: torch.Tensor  # (n, F, 3, r, r)
    mask_probs: torch.Tensor  # (n, F, S, S)
    gt_masks: torch.Tensor  # (n, F, R, R)
    concept_probs: torch.Tensor | None  # (n, C)
    labels: torch.Tensor  # (n, C)
    classes: list[str]
    gt_captions: list[str]
    key_objects: list[str]
    prompts: dict[str, Any]  # stage 5's prompts.json
    gpt2: list[str]  # stage 3's captions
    mask_names: list[str]

    @property
    def n(self) -> int:
        return int(self.pred.shape[0])


def load_samples(cfg: SharedConfig, paths: RunPaths, mode: str, scored: dict[str, Any], count: int) -> Samples | str:
    """The samples, or a one-line reason (HTML) why there are none."""
    dir3, dir5 = paths.root / f"stage3_{mode}", paths.root / f"stage5_{mode}"
    videos = first_rows(dir5 / VIDEOS_FILE, "videos", count)  # (n, F5, 3, R, R)
    blurry = first_rows(dir3 / "blurry_videos.safetensors", "blurry_videos", count)  # (n, F, 3, r, r)
    masks = first_rows(dir3 / "masks.safetensors", "masks", count)  # (n, F, S, S)
    if videos is None or blurry is None or masks is None:
        return '<p class="warn">stage-3/5 outputs are missing: no samples</p>'
    n = min(count, int(videos.shape[0]), int(blurry.shape[0]))
    try:
        data = BrainVideoData(cfg.paths.data_root, cfg.run.subject, cfg.data)
        clips = np.arange(n)
        gt, gt_masks = data.frames("test", clips), data.key_object_masks("test", clips)
        labels, classes = data.concept_labels("test")[:n], data.concept_classes
        gt_caps, key_objects = [str(c) for c in data.captions("test")[clips]], data.key_object_names("test")[:n]
    except (NeuronsError, OSError) as err:
        return f'<p class="warn">no samples: the dataset is unreadable ({esc(str(err).splitlines()[0])})</p>'
    frames = scored.get("eval_frames") or list(range(gt.shape[1]))
    mask_names = (read_json(dir3 / "concepts.json") or {}).get("mask_names", [])
    probs = first_rows(dir3 / "concept_probs.safetensors", "concept_probs", n)
    gpt2 = (read_json(dir3 / CAPTIONS_FILE) or {}).get("captions", [])
    return Samples(gt, videos[:n, frames].float().clamp(0, 1), blurry[:n].float(), masks[:n].float(), gt_masks,
                   None if probs is None else probs.float(), labels, classes, gt_caps, key_objects,
                   read_json(dir5 / PROMPTS_FILE) or {}, gpt2, [str(m) for m in mask_names])  # fmt: skip


def sample_text(x: Samples, i: int, dice: float) -> list[str]:
    """Captions, concepts and key object of clip i (HTML-escaped lines)."""
    used, source = x.prompts.get("captions", []), x.prompts.get("caption_source", "?")
    text = [f"<b>test clip {i}</b>", f"GT caption: {esc(x.gt_captions[i])}",
            f"decoded caption ({esc(source)}, used by stage 5): {esc(used[i] if i < len(used) else '?')}"]  # fmt: skip
    if source != "gpt2" and i < len(x.gpt2):
        text.append(f"brain-decoded caption (GPT-2, stage 3): {esc(x.gpt2[i])}")
    if x.concept_probs is not None:
        order = torch.argsort(x.concept_probs[i], descending=True).tolist()
        top = [f"{x.classes[c]} {float(x.concept_probs[i, c]):.2f}" for c in order if x.concept_probs[i, c] > 0.5]
        text.append("predicted concepts (p > 0.5): " + esc(", ".join(top) or "none"))
    text.append("GT concepts: " + esc(", ".join(x.classes[c] for c in torch.nonzero(x.labels[i]).flatten().tolist())))
    query = x.mask_names[i] if i < len(x.mask_names) else "?"
    text.append(f"key object: GT {esc(x.key_objects[i])}, mask queried as {esc(query)}, Dice {dice:.3f}")
    return text


def sample_section(cfg: SharedConfig, paths: RunPaths, mode: str, scored: dict[str, Any], count: int) -> str:
    """GIFs GT | reconstruction | blurry | predicted mask | GT mask of the first ``count`` clips, with their text."""
    x = load_samples(cfg, paths, mode, scored, count)
    if isinstance(x, str):
        return x
    res = int(x.pred.shape[-1])
    pred_bin = x.mask_probs > 0.5  # (n, F, S, S)
    dice = dice_per_sample(pred_bin, resize_masks_majority(x.gt_masks, int(pred_bin.shape[-1])).bool())
    legend = "ground truth | reconstruction (stage 5) | blurry video (stage 3) | predicted mask | GT key-object mask"
    out = [f'<p class="note">each GIF: {esc(legend)}; {GIF_FPS:g} fps</p>']
    height = max(96, res * 3) if res < 96 else res
    for i in range(x.n):
        masks = (resize_masks_majority(pred_bin[i].float(), res)[:, None],
                 resize_masks_majority(x.gt_masks[i], res)[:, None])  # (F, 1, R, R) each
        panel = side_by_side(resize_frames_bilinear(x.gt[i], res), x.pred[i], resize_frames_bilinear(x.blurry[i], res),
                             *masks)  # fmt: skip
        text = "<br>".join(sample_text(x, i, float(dice[i])))
        out.append(f'<div class="sample">{img(gif_uri(panel), f"clip {i}", height, res < 96)}'
                   f'<div class="text">{text}</div></div>')  # fmt: skip
    return "".join(out)


def diagnostics_section(paths: RunPaths, mode: str, count: int) -> str:
    folder = RunPaths(paths.root, mode).stage_dir("e")
    results = read_json(folder / DIAGNOSTICS_FILE)
    if results is None:
        return (f'<p class="note">no stage-e diagnostics for {esc(mode)} (bash train_neurons.sh ... e {esc(mode)} '
                "...)</p>")  # fmt: skip
    manifest = read_manifest(folder)
    stale = stale_reasons(folder, manifest) if manifest else ["no manifest"]
    out = [f"<h3>Diagnostics (stage e, {esc(mode)})</h3>"]
    if stale:
        out.append(f'<p class="warn">these diagnostics are stale: {esc(stale[0])}</p>')
    for name in ("concepts.png", "dice.png"):
        if (folder / name).exists():
            out.append(f"<figure>{img(png_uri(folder / name), name)}<figcaption>{name}</figcaption></figure>")
    caps = results.get("captions", {}).get("per_clip", [])[:count]
    if caps:
        rows = [[str(c["clip"]), c["ground_truth"], c["decoded"], fmt(c.get("bleu4"))] for c in caps]
        out.append(Table("Decoded GPT-2 captions (stage 3) beside the ground truth",
                         ["clip", "ground truth", "decoded", "BLEU-4 (sentence, smoothed)"], rows).html())  # fmt: skip
    per_class = results.get("concepts", {}).get("per_class", [])
    if per_class:
        rows = [[r["class"], str(r["positives"]), str(r["predicted"]), fmt(r["recall"]), fmt(r["precision"]),
                 fmt(r["f1"])] for r in sorted(per_class, key=lambda r: -r["positives"])]  # fmt: skip
        table = Table("Per-concept recall and precision", ["class", "positives", "predicted", "recall", "precision",
                                                            "F1"], rows)  # fmt: skip
        out.append(f"<details><summary>per-concept table ({len(rows)} classes)</summary>{table.html()}</details>")
    panels = sorted((folder / "panels").glob("clip_*.png"))[:count]
    out += [f"<figure>{img(png_uri(p), p.stem)}</figure>" for p in panels]
    return "".join(out)


def selection_warnings(paths: RunPaths) -> list[str]:
    """One line per training stage whose ``best`` epoch was picked on the test clips
    (``data.validation=test_upstream``, defect 16): the test numbers of such a run are not held-out numbers."""
    out = []
    for stage in ("1", "2"):
        selected = (read_manifest(paths.stage_dir(stage)) or {}).get("selected_on", "val")
        if str(selected).startswith("test"):
            out.append(f"warning: stage {stage} selected its best epoch on the TEST clips ({selected}); test metrics "
                       "downstream of it are not held-out numbers")  # fmt: skip
    return out


def stages_table(paths: RunPaths) -> Table:
    rows = []
    for stage, folder in paths.stage_dirs().items():
        manifest = read_manifest(folder)
        if manifest is None:
            rows.append([stage, folder.name, "not run", "", "", ""])
            continue
        stale = stale_reasons(folder, manifest)
        rows.append([stage, folder.name, "stale: " + stale[0] if stale else "complete", manifest.get("started", ""),
                     f"{manifest.get('wall_time_s', 0):.1f} s", manifest.get("config_hash", "")[:12]])  # fmt: skip
    return Table("Stages of this run (mode " + paths.mode + ")", ["stage", "folder", "state", "started", "wall",
                                                                  "config"], rows)  # fmt: skip


# ---- a subject set: one column per subject and their mean ------------------------------------------------------
def is_subject_set(cfg: SharedConfig) -> bool:
    """A subject set's own folder (its per-subject decoding passes have ``run.decode_subj`` set)."""
    return isinstance(cfg.run.subj, tuple) and not cfg.run.decode_subj


def subject_passes(cfg: SharedConfig) -> dict[int, RunPaths]:
    """Subject → the run paths of its decoding pass (``subj_<set>/subj_<k>/``)."""
    return {k: RunPaths.from_config(replace(cfg, run=replace(cfg.run, decode_subj=k))) for k in cfg.run.subjects}


def mean_value(entry: Any) -> float | None:
    """The number of a metrics-JSON entry ({"mean", ...} or a bare number)."""
    value = entry.get("mean") if isinstance(entry, dict) else entry
    return float(value) if isinstance(value, (int, float)) else None


def subject_set_table(cfg: SharedConfig, mode: str) -> Table | None:
    """Stage 6's headline metrics of every subject of the set (each against its own test fMRI) and their mean."""
    scored = {k: scored_modes(p).get(mode) for k, p in subject_passes(cfg).items()}
    done = {k: m for k, m in scored.items() if m}
    if not done:
        return None
    keys = list(dict.fromkeys(key for m in done.values() for key in m["metrics"]))
    rows = []
    first = {mode: next(iter(done.values()))}  # the analytic chance is the same for every subject
    for key in keys:
        values = [mean_value(done[k]["metrics"].get(key)) if k in done else None for k in scored]
        present = [v for v in values if v is not None]
        mean = fmt(sum(present) / len(present)) if len(present) == len(values) else "n/a"
        rows.append([key, *(cell(done[k]["metrics"].get(key), 3) if k in done else "n/a" for k in scored), mean,
                     chance_of(first, key)])
    header = ["metric", *(f"subj {k}" for k in scored), f"mean of {len(scored)}", "chance"]
    notes = [f"one brain model for subjects {cfg.run.subj_text}; each subject decoded from its own test fMRI "
             f"({mode}); subjects not scored yet: {', '.join(str(k) for k in scored if k not in done) or 'none'}"]
    return Table(f"Subject set {cfg.run.subj_text}, stage-6 metrics ({mode})", header, rows, notes)


def write_set_report(cfg: SharedConfig) -> Path:
    """``subj_<set>/report.html``: the per-subject table of every scored mode, and links to each subject's report."""
    paths = RunPaths.from_config(cfg)
    tables_ = [t for mode in MODES if (t := subject_set_table(cfg, mode)) is not None]
    links = "".join(f'<li><a href="subj_{k}/{REPORT_FILE}">subject {k}</a></li>' for k in cfg.run.subjects)
    parts = [f"<h1>NEURONS run report: {esc(cfg.run.exp)}, subjects {esc(cfg.run.subj_text)}</h1>",
             f'<p class="note">run folder {esc(paths.root.resolve())}; profile {esc(cfg.run.profile)}; written '
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             *([t.html() for t in tables_] or ['<p class="warn">stage 6 has scored no subject of this set yet</p>']),
             curves_section(paths), f"<h2>Each subject's report</h2><ul>{links}</ul>"]  # fmt: skip
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>NEURONS report {esc(cfg.run.exp)} '
            f"subjects {esc(cfg.run.subj_text)}</title><style>{CSS}</style></head><body>{''.join(parts)}</body>"
            "</html>\n")  # fmt: skip
    return atomic_write_text(report_path(paths), page)


# ---- the page ------------------------------------------------------------------------------------------------------
def report_path(paths: RunPaths) -> Path:
    return paths.root / REPORT_FILE


def tables(cfg: SharedConfig, paths: RunPaths) -> list[Table]:
    scored = scored_modes(paths)
    toy_quality = read_json(paths.root / TOY_QUALITY_FILE)
    out = [metrics_table(cfg, scored, toy_quality)] if scored else []
    for table in out:  # the N-way metrics' ceiling: the classifiers on the ground truth (toy weights that record it)
        table.notes += classifier_ceilings(cfg.paths.weights_root)
    if not is_paper(cfg):
        ident = toy_identification(cfg, paths, toy_quality)
        if ident is not None:
            out.append(ident)
    return out


def samples_count(paths: RunPaths, mode: str) -> int:
    manifest = read_manifest(RunPaths(paths.root, mode).stage_dir("6")) or {}
    return int(manifest.get("config", {}).get("eval", {}).get("report_samples", DEFAULT_SAMPLES))


def write_report(cfg: SharedConfig) -> Path:
    """(Re)build ``<run>/report.html`` from whatever this run holds; returns its path. A subject set's decoding
    pass also rebuilds the set's page (:func:`write_set_report`)."""
    if is_subject_set(cfg):
        return write_set_report(cfg)
    if cfg.run.decode_subj:
        write_set_report(replace(cfg, run=replace(cfg.run, decode_subj=0)))
    paths = RunPaths.from_config(cfg)
    scored = scored_modes(paths)
    r = cfg.run
    parts = [f"<h1>NEURONS run report: {esc(r.exp)}, subject {r.subj}</h1>",
             f'<p class="note">run folder {esc(paths.root.resolve())}; profile {esc(r.profile)}; data '
             f"{esc(cfg.paths.data_root)}; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             *(f'<p class="warn">{esc(w)}</p>' for w in selection_warnings(paths)),
             "<h2>Metrics</h2>"]  # fmt: skip
    if not scored:
        parts.append('<p class="warn">stage 6 has not scored this run yet: no metrics_&lt;mode&gt;.json</p>')
    parts += [t.html() for t in tables(cfg, paths)]
    parts.append(curves_section(paths))
    for mode, metrics in scored.items():
        mpaths = RunPaths(paths.root, mode)
        count = samples_count(mpaths, mode)
        parts.append(f"<h2>Samples ({esc(mode)}, first {count} test clips)</h2>")
        parts.append(sample_section(cfg, mpaths, mode, metrics, count))
        parts.append(diagnostics_section(mpaths, mode, count))
    for mode in scored or (paths.mode,):
        parts.append(stages_table(RunPaths(paths.root, mode)).html())
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>NEURONS report {esc(r.exp)} subj '
            f"{r.subj}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")  # fmt: skip
    return atomic_write_text(report_path(paths), page)


def summary_markdown(cfg: SharedConfig) -> str:
    """The report's tables as markdown (what ``make demo`` prints at the end)."""
    paths = RunPaths.from_config(cfg)
    if is_subject_set(cfg):
        return "\n\n".join(t.markdown() for mode in MODES if (t := subject_set_table(cfg, mode)) is not None) or (
            f"no subject of {paths.root} is scored yet (run stage 6)")
    body = "\n\n".join([*selection_warnings(paths), *(t.markdown() for t in tables(cfg, paths))])
    return body or f"no metrics in {paths.root} yet (run stage 6)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description="Print a run's metrics tables and its report path (--write: rebuild it).")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--subj", type=subject_arg, default=1, help="1, 2, 3 or a subject set such as 1,2,3")
    parser.add_argument("--exp", required=True)
    parser.add_argument("--mode", choices=MODES, default="enhance")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--write", action="store_true", help="rebuild report.html first")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    try:
        cfg = load_config(Stage6Config, args.profile, args.overrides, fixed_args(args))
    except NeuronsError as err:
        return report_error(err)
    path = write_report(cfg) if args.write else report_path(RunPaths.from_config(cfg))
    print(summary_markdown(cfg))
    print(f"\nreport: {path.resolve()}" + ("" if path.exists() else " (not written yet: run stage 6)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
