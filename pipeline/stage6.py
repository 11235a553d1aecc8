"""Stage 6: metrics of the generated videos (stage 5) and of the brain-decoding sub-tasks (stage 3) on the test clips
(upstream spec §7; the metric definitions live in :mod:`utils.metrics`).

Inputs (checked with ``require_stage`` before anything else): ``stage5_<mode>/videos.safetensors`` (N, F5, 3, R, R)
and ``prompts.json``; ``stage3_<mode>/`` ``blurry_videos``, ``masks``, ``concept_probs``; the dataset's test frames,
captions, concept labels and key-object masks of the same clips. Stage 5 (like stage 3) decodes the FIRST N test
clips (``num_clips``), so the clips scored are ``0..N-1`` (checked against the ``n_clips`` its manifest records).

* Prediction = the ``video.eval_frames`` of stage 5's resolved config (its manifest) → (N, F, 3, R, R), F must be the
  dataset's clip length. Ground truth = the dataset's test frames of those clips, resized to R × R (bilinear,
  antialiased when shrinking, clamped to [0, 1]; identity when the sizes already match).
* Video metrics under both protocols, ``standard`` and ``neurons`` (:mod:`utils.metrics`): video-level
  (``video_classifier``) and frame-level (``frame_classifier``) N-way top-k accuracy for each of ``eval.ways`` (capped
  at the classifier's ``classes − gt_top_k + 1``), CLIP-pcc of the predicted frames (``clip_pcc``), SSIM and PSNR.
  ``standard`` scores the aligned tensors above. ``neurons`` scores upstream's inputs when stage 5 wrote its GIF grids
  (``video.write_gif_grid``; spec §7, defect 29): the uint8 halves of ``gif_grid/<clip>.gif`` read as
  ``run_metrics.py`` reads them (:mod:`utils.gif_grid`: padding, 1-px offset, palette quantisation, GT from the GIF,
  no float16 storage rounding), fed as they are to SSIM/PSNR, the classifiers and CLIP-pcc; without grids it scores
  the tensors too.
  ``eval.image_backend`` picks the classifiers' image-processor backend ("pil" = upstream's PIL resizes).
* Stage-3 metrics: blurry-video SSIM (blurry videos resized like the ground truth to R × R); concept F1 (micro and
  macro, ``concept_probs > 0.5`` vs the test labels); key-object Dice per clip (stage-3 masks > 0.5 vs the GT
  key-object masks area-resized to the mask size and thresholded at 0.5, i.e. majority coverage); caption BLEU-4
  (corpus) of the captions stage 5 used (``prompts.json``: BLIP-2 or GPT-2) vs the test captions.

Every metric is ``{"mean", "std", "n", "ci95"}`` (N-way entries add ``"chance"`` and ``"above_chance"``, and, with
``eval.shuffles`` > 0, the shuffled chance: ``"chance_shuffled"``, ``"ci95_vs_shuffled"`` and ``"above_shuffled"``,
:func:`utils.metrics.intervals.mark_shuffled`). Per-clip
metrics: mean and std over clips (protocol rules of :func:`utils.metrics.summarise`). Corpus-level metrics (F1, BLEU):
mean = the corpus value, std = its bootstrap standard deviation over ``eval.bootstrap`` seeded resamples of the clips
(null when 0). ``ci95`` = [lo, hi], the 95 % percentile interval of the clip bootstrap (``eval.bootstrap`` resamples
seeded with ``eval.seed``, the same draws for every metric; :mod:`utils.metrics.intervals`): of the mean over clips
for per-clip metrics (for N-way accuracy: of the clips' hit rates over their trials, i.e. the interval is over clips,
not over the trials of one clip), of the corpus value for F1 and BLEU; null when ``eval.bootstrap`` is 0 or a per-clip
value is not finite. ``above_chance`` is true only when ``ci95`` exists and its lower bound exceeds ``chance``.
Non-finite values (PSNR of identical frames = inf) are written as null, so the file is strict JSON.

Outputs: ``<run>/metrics_<mode>.json`` (atomic; ``protocols.<name>.{metrics, chance_levels, inputs}`` per protocol,
the headline ``eval.protocol``'s also at the top level as ``metrics`` / ``chance_levels``) and
``<run>/eval_<mode>/manifest.json`` (depends on stages 5 and 3), then ``<run>/report.html`` (:mod:`pipeline.report`;
a view of the whole run, rebuilt by stage e too, so it is named in the manifest's ``report`` entry rather than among
its outputs).

Videos made elsewhere (``eval_metrics.py --videos DIR``) are scored by :mod:`pipeline.score_videos` with the video
part of this stage (:func:`video_metrics`, :func:`model_scores`, :func:`build_roles`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.foundation import build_role, foundation_impl
from models.foundation.common import with_image_backend
from pipeline.common import load_data, require_foundation
from pipeline.report import report_path, write_report
from utils.cli import begin_stage
from utils.config import config_hash
from utils.data_catalog import frames_file
from utils.errors import ConfigError, StageOrderError
from utils.gif_grid import gif_grid_path, read_upstream_gif
from utils.io import atomic_write_text, finite_or_none
from utils.manifest import StageRecorder, require_stage
from utils.metrics import (
    PROTOCOLS,
    Protocol,
    bleu_from_counts,
    blurry_video_ssim,
    caption_bleu,
    caption_bleu_counts,
    chance_level,
    clip_pcc,
    concept_f1,
    concept_f1_counts,
    corpus_entry,
    dice_per_sample,
    f1_averages,
    n_way_entries,
    psnr,
    resample_counts,
    ssim,
    summarise,
)
from utils.resize import resize_frames_bilinear, resize_masks_majority
from utils.runs import IDENTIFICATION_FILE, PROMPTS_FILE, VIDEOS_FILE, RunPaths, read_identification, rerun_hint
from utils.sharding import gather_values, my_clips
from utils.stage_configs import Stage6Config, Stage6Eval
from utils.training import build_accelerator

log = logging.getLogger(__name__)

ROLES = ("video_classifier", "frame_classifier", "clip_pcc")
STAGE3_FILES = ("blurry_videos", "masks", "concept_probs")
DATA_FIELDS = ("frames", "caption", "concepts", "key_obj_mask")
MASK_THRESHOLD = 0.5
RESIZE_NOTE = "ground truth and blurry videos resized to the prediction's R x R: bilinear, antialiased, clamped"
MASK_NOTE = "GT key-object masks area-resized to the stage-3 mask size, >= 0.5; stage-3 masks > 0.5"
TENSOR_INPUTS = ("stage-5 videos.safetensors (float16 storage) at eval_frames vs the dataset's test frames resized to "
                 "R x R")  # fmt: skip
GIF_INPUTS = ("the halves of stage 5's upstream GIF grids (gif_grid/<clip>.gif, from the float32 videos): uint8, "
              "GIF-palette-quantised, with the grid padding and the 1-px offset, GT read from the GIF; classifiers "
              "and CLIP-pcc take these frames as they are")  # fmt: skip
BLURRY_NOTE = "blurry_video_ssim: stage-3 blurry videos vs the resized test frames (tensors) in both protocols"


class Clips:
    """Videos (N, F, 3, H, W) read a few clips at a time (stage 6 never holds every video: 7.5 GB at paper scale):
    ``clips[idx]`` (indices (b,), a tensor, list or array) → (b, F, 3, H, W) from ``read(rows)``, rows an int64
    array. Tensors index the same way, so the scorers take either."""

    def __init__(self, n: int, read: Callable[[np.ndarray], torch.Tensor], shape: tuple[int, ...]):
        self.n, self.read, self.shape = n, read, (n, *shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: Any) -> torch.Tensor:
        rows = np.atleast_1d(np.asarray(idx.tolist() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64))
        return self.read(rows)


Videos = torch.Tensor | Clips  # (N, F, 3, H, W): in memory, or read a few clips at a time


def tensor_rows(path: Path, key: str) -> tuple[tuple[int, ...], Callable[[np.ndarray], torch.Tensor]]:
    """(shape, reader of rows) of tensor ``key`` of a safetensors file, reading only the rows asked for."""
    with safe_open(str(path), framework="pt") as f:
        shape = tuple(int(d) for d in f.get_slice(key).get_shape())

    def read(rows: np.ndarray) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice(key)
            if not len(rows):
                return torch.empty(0, *shape[1:])
            if (np.diff(rows) == 1).all():  # a run of clips (stage 6's chunks): one read
                return sl[int(rows[0]) : int(rows[-1]) + 1]
            return torch.cat([sl[int(r) : int(r) + 1] for r in rows])

    return shape, read


def chunked(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Videos, b: Videos, batch: int
            ) -> torch.Tensor:  # fmt: skip
    """``fn(a[i], b[i])`` over chunks of ``batch`` clips of two clip sequences (tensors or :class:`Clips`),
    concatenated (per-clip metrics: the same values as one call on all clips)."""
    n = len(a)
    return torch.cat([fn(a[np.arange(i, min(i + batch, n))], b[np.arange(i, min(i + batch, n))])
                      for i in range(0, n, batch)])  # fmt: skip


@dataclass
class EvalInputs:
    """Everything stage 6 scores, aligned clip by clip (N clips, F frames, R pixels); the videos are read a few clips
    at a time (:class:`Clips`)."""

    pred: Clips  # (N, F, 3, R, R) float32 in [0, 1]
    gt: Clips  # (N, F, 3, R, R) float32 in [0, 1]
    blurry: Clips  # (N, F, 3, R, R) float32 in [0, 1]
    mask_probs: torch.Tensor  # (N, F, S, S)
    gt_masks: torch.Tensor  # (N, F, S, S) {0, 1}
    concept_probs: torch.Tensor  # (N, C)
    concept_labels: torch.Tensor  # (N, C)
    captions: list[str]
    gt_captions: list[str]
    caption_source: str
    eval_frames: tuple[int, ...]
    files: dict[str, Path] = field(default_factory=dict)  # the stage-3/5 files and the ground-truth frames
    data_files: list[Path] = field(default_factory=list)  # every data file read (BrainVideoData.opened_files)
    # the "neurons" protocol's frames when stage 5 wrote upstream's GIF grids: uint8 (N, F, 3, S + 4, S + 3) halves
    gif_gt: Clips | None = None
    gif_pred: Clips | None = None
    gif_files: list[Path] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.pred)

    @property
    def resolution(self) -> int:
        return int(self.pred.shape[-1])


# ---- inputs --------------------------------------------------------------------------------------------------------
def check_stages(cfg: Stage6Config) -> tuple[dict[str, Any], Path, Path]:
    """Stage 5 (and through its ``depends_on`` stage 3, checked again explicitly) must be complete and fresh."""
    paths = RunPaths.from_config(cfg)
    dirs, hint = paths.stage_dirs(), rerun_hint(cfg)
    manifest5 = require_stage("5", dirs["5"], dirs, hint)
    require_stage("3", dirs["3"], dirs, hint)
    return manifest5, dirs["5"], dirs["3"]


def stage5_eval_frames(manifest5: dict[str, Any], n_frames5: int, cfg: Stage6Config) -> tuple[int, ...]:
    try:
        frames = tuple(int(f) for f in manifest5["config"]["video"]["eval_frames"])
    except (KeyError, TypeError) as err:
        raise StageOrderError("the stage-5 manifest records no video.eval_frames", rerun_hint(cfg).format(stage="5")) \
            from err  # fmt: skip
    if not frames or not all(0 <= f < n_frames5 for f in frames):
        raise StageOrderError(f"stage-5 video.eval_frames {frames} do not fit its {n_frames5}-frame videos",
                              rerun_hint(cfg).format(stage="5"))  # fmt: skip
    return frames


def load_inputs(cfg: Stage6Config, manifest5: dict[str, Any], dir5: Path, dir3: Path) -> EvalInputs:
    shape, read_videos = tensor_rows(dir5 / VIDEOS_FILE, "videos")  # (N, F5, 3, R, R)
    n, res = shape[0], shape[-1]
    hint5 = rerun_hint(cfg).format(stage="5")
    if manifest5.get("n_clips", n) != n:
        raise StageOrderError(f"stage-5 manifest records {manifest5.get('n_clips')} clips, videos hold {n}", hint5)
    eval_frames = stage5_eval_frames(manifest5, shape[1], cfg)
    data = load_data(cfg, DATA_FIELDS)
    if len(eval_frames) != data.n_frames:
        raise ConfigError(
            f"stage-5 video.eval_frames picks {len(eval_frames)} frames, the dataset's clips have {data.n_frames}",
            "rerun stage 5 with video.eval_frames of the dataset's clip length",
        )
    clips = np.arange(n)  # stage 5 and stage 3 decode the first N test clips
    s3 = {name: load_file(dir3 / f"{name}.safetensors")[name] for name in STAGE3_FILES if name != "blurry_videos"}
    blurry_shape, read_blurry = tensor_rows(dir3 / "blurry_videos.safetensors", "blurry_videos")
    n3 = min(blurry_shape[0], *(int(t.shape[0]) for t in s3.values()))
    if n3 < n:
        raise StageOrderError(f"stage 3 holds {n3} clips, stage 5 generated {n}", rerun_hint(cfg).format(stage="3"))
    prompts = json.loads((dir5 / PROMPTS_FILE).read_text())
    captions = [str(c) for c in prompts["captions"]]
    if len(captions) != n:
        raise StageOrderError(f"stage-5 {PROMPTS_FILE} holds {len(captions)} captions for {n} videos", hint5)
    masks = s3["masks"][:n].float()  # (N, F, S, S)
    frames, f = list(eval_frames), len(eval_frames)
    return EvalInputs(
        pred=Clips(n, lambda rows: read_videos(rows)[:, frames].float().clamp(0.0, 1.0), (f, 3, res, res)),
        gt=Clips(n, lambda rows: resize_frames_bilinear(data.frames("test", rows), res), (f, 3, res, res)),
        blurry=Clips(n, lambda rows: resize_frames_bilinear(read_blurry(rows).float(), res), (f, 3, res, res)),
        mask_probs=masks,
        gt_masks=resize_masks_majority(data.key_object_masks("test", clips), int(masks.shape[-1])),
        concept_probs=s3["concept_probs"][:n].float(),
        concept_labels=data.concept_labels("test")[torch.as_tensor(clips)],
        captions=captions,
        gt_captions=[str(c) for c in data.captions("test")[clips]],
        caption_source=str(prompts.get("caption_source", "unknown")),
        eval_frames=eval_frames,
        files={
            "videos": dir5 / VIDEOS_FILE,
            "prompts": dir5 / PROMPTS_FILE,
            **{name: dir3 / f"{name}.safetensors" for name in STAGE3_FILES},
            "gt_frames": data.root / frames_file("test"),
        },
        data_files=data.opened_files,
    )


def load_gif_grids(cfg: Stage6Config, manifest5: dict[str, Any], dir5: Path, x: EvalInputs) -> None:
    """When stage 5 wrote upstream's GIF grids (its ``video.write_gif_grid``), read every clip's grid as upstream's
    ``run_metrics.py`` does into ``x.gif_gt`` / ``x.gif_pred`` (uint8 (N, F, 3, S + 4, S + 3)); a missing or
    malformed grid is an error."""
    if not manifest5.get("config", {}).get("video", {}).get("write_gif_grid", False):
        return
    files = [gif_grid_path(dir5, clip) for clip in range(x.n)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise StageOrderError(f"stage 5 wrote GIF grids but {len(missing)} are missing, e.g. {missing[0]}",
                              rerun_hint(cfg).format(stage="5"))  # fmt: skip
    first = read_upstream_gif(files[0])[0]  # (F, S + 4, S + 3, 3) uint8
    if first.shape[0] != len(x.eval_frames):
        raise StageOrderError(f"the GIF grids hold {first.shape[0]} frames, stage 5's eval_frames "
                              f"{len(x.eval_frames)}", rerun_hint(cfg).format(stage="5"))  # fmt: skip
    shape = (first.shape[0], 3, *first.shape[1:3])

    def halves(i: int) -> Callable[[np.ndarray], torch.Tensor]:
        def read(rows: np.ndarray) -> torch.Tensor:  # (b, F, 3, S + 4, S + 3) uint8, checked like the first
            out = torch.stack([torch.from_numpy(read_upstream_gif(files[r])[i]).permute(0, 3, 1, 2) for r in rows])
            if tuple(out.shape[1:]) != shape:
                raise StageOrderError(f"GIF grids of different sizes: {tuple(out.shape[1:])} and {shape}",
                                      rerun_hint(cfg).format(stage="5"))  # fmt: skip
            return out.contiguous()
        return read

    x.gif_gt, x.gif_pred, x.gif_files = Clips(x.n, halves(0), shape), Clips(x.n, halves(1), shape), files
    log.info("neurons protocol: %d GIF grids, halves %s", x.n, shape)


def protocol_frames(x: EvalInputs, protocol: str) -> tuple[Clips, Clips, str]:
    """(gt, pred, description) a protocol scores: the GIF halves for "neurons" when stage 5 wrote them, else the
    aligned tensors (N, F, 3, R, R)."""
    if protocol == "neurons" and x.gif_gt is not None and x.gif_pred is not None:
        return x.gif_gt, x.gif_pred, GIF_INPUTS
    return x.gt, x.pred, TENSOR_INPUTS


# ---- model scores --------------------------------------------------------------------------------------------------
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]).float().cpu() for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def video_scores(role: Any, videos: torch.Tensor, batch: int) -> torch.Tensor:
    """(N, F, 3, H, W) → (N, classes) probabilities."""
    if videos.shape[1] != role.num_frames:
        raise ConfigError(
            f"the video classifier takes {role.num_frames} frames, the evaluated videos have {videos.shape[1]}",
            "set stage 5's video.eval_frames to the classifier's frame count",
        )
    return batched(role.probs, videos, batch)


@torch.no_grad()
def frame_scores(role: Any, videos: torch.Tensor, batch: int) -> torch.Tensor:
    """(N, F, 3, H, W) → (N, F, classes) probabilities, frames classified one by one."""
    n, f = videos.shape[:2]
    return batched(role.probs, videos.flatten(0, 1), batch * f).view(n, f, -1)


@torch.no_grad()
def clip_features(role: Any, videos: torch.Tensor, batch: int) -> torch.Tensor:
    n, f = videos.shape[:2]
    return batched(role.image_features, videos.flatten(0, 1), batch * f).view(n, f, -1)


def capped_ways(ways: tuple[int, ...], n_classes: int, gt_top_k: int, what: str) -> tuple[int, ...]:
    """``ways`` with each N capped at ``n_classes − gt_top_k + 1`` (enough distractors), duplicates dropped."""
    cap = n_classes - gt_top_k + 1
    if cap < 2:
        raise ConfigError(f"the {what} has {n_classes} classes, too few for any N-way rule with gt_top_k={gt_top_k}",
                          "lower eval.gt_top_k")  # fmt: skip
    out = tuple(dict.fromkeys(min(n, cap) for n in ways))
    if out != tuple(ways):
        log.warning("%s: %d classes allow at most %d-way; ways %s -> %s", what, n_classes, cap, ways, out)
    return out


# ---- stage-3 task metrics ------------------------------------------------------------------------------------------
def task_metrics(x: EvalInputs, ev: Any) -> dict[str, dict[str, Any]]:
    """Concept F1, caption BLEU-4 (corpus values; std and ci95 over the clip-bootstrap draws, vectorised on per-clip
    counts) and key-object Dice (per clip)."""
    n = x.n
    draws = torch.from_numpy(resample_counts(n, ev.bootstrap, ev.seed))  # (B, N) times each clip is drawn
    f1_counts = concept_f1_counts(x.concept_probs, x.concept_labels, threshold=MASK_THRESHOLD)  # (N, 3, C)
    full = concept_f1(x.concept_probs, x.concept_labels, threshold=MASK_THRESHOLD)
    micro, macro = f1_averages(*torch.einsum("bn,nkc->kbc", draws, f1_counts))  # (B,) each
    out: dict[str, dict[str, Any]] = {
        "concept_f1_micro": corpus_entry(full["micro"], micro, n),
        "concept_f1_macro": corpus_entry(full["macro"], macro, n),
    }
    bleu = caption_bleu(x.captions, x.gt_captions, n_gram=4)
    bleu_counts = caption_bleu_counts(x.captions, x.gt_captions, n_gram=4)  # (N, 10)
    out["caption_bleu4"] = corpus_entry(bleu, bleu_from_counts(draws @ bleu_counts, 4), n)
    dice = dice_per_sample(x.mask_probs > MASK_THRESHOLD, x.gt_masks.bool())
    out["key_object_dice"] = summarise(dice, None, "standard", bootstrap=ev.bootstrap, seed=ev.seed)  # both protocols
    return out


# ---- the stage -----------------------------------------------------------------------------------------------------
@dataclass
class ModelScores:
    """The evaluation models' outputs for every clip (N clips, F frames)."""

    video: tuple[torch.Tensor, torch.Tensor]  # gt, pred (N, classes) video-classifier probabilities
    frame: tuple[torch.Tensor, torch.Tensor]  # gt, pred (N, F, classes) frame-classifier probabilities
    clip_features: torch.Tensor  # (N, F, D) clip_pcc features of the predicted frames


def model_scores(frames: tuple[Videos, Videos], roles: dict[str, Any], batch: int, accelerator: Any
                 ) -> ModelScores:  # fmt: skip
    """Run the evaluation models on this process's round-robin share of the clips of ``frames`` (gt, pred: (N, F, 3,
    H, W) float in [0, 1] or uint8) and gather every clip's outputs to every process (one process: all clips)."""
    n = len(frames[0])
    clips = my_clips(n, accelerator.process_index, accelerator.num_processes)
    scorers = {"video_gt": (video_scores, "video_classifier", 0), "video_pred": (video_scores, "video_classifier", 1),
               "frame_gt": (frame_scores, "frame_classifier", 0), "frame_pred": (frame_scores, "frame_classifier", 1),
               "clip": (clip_features, "clip_pcc", 1)}  # fmt: skip
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in scorers}
    for a in range(0, len(clips), batch):  # a few clips at a time: frames may be read from disk (Clips)
        idx = torch.as_tensor(clips[a : a + batch], dtype=torch.long)
        videos = (frames[0][idx], frames[1][idx])
        for key, (scorer, role, which) in scorers.items():
            rows[key] += list(scorer(roles[role], videos[which], batch).unbind(0))
    every = {k: torch.stack(gather_values(accelerator, clips, v, n)) for k, v in rows.items()}
    return ModelScores((every["video_gt"], every["video_pred"]), (every["frame_gt"], every["frame_pred"]),
                       every["clip"])  # fmt: skip


def video_metrics(ev: Stage6Eval, roles: dict[str, Any], scores: ModelScores, gt: Videos, pred: Videos
                  ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """(metrics, chance levels) of the videos alone under ``ev.protocol``: video and frame N-way accuracy from the
    models' ``scores`` of ``gt`` and ``pred`` (N, F, 3, H, W), CLIP-pcc, SSIM and PSNR (also used by
    :mod:`pipeline.score_videos`, which scores videos without stage-3 outputs)."""
    metrics: dict[str, dict[str, Any]] = {}
    chance: dict[str, dict[str, float]] = {}
    for prefix, (gt_s, pred_s) in (("video", scores.video), ("frame", scores.frame)):
        role = roles[f"{prefix}_classifier"]
        ways = capped_ways(tuple(ev.ways), role.num_classes, ev.gt_top_k, f"{prefix} classifier")
        rule = {"trials": ev.n_trials, "gt_top_k": ev.gt_top_k, "top_k": ev.top_k, "seed": ev.seed}
        metrics.update(n_way_entries(prefix, (gt_s, pred_s), ways, ev.protocol, ev.bootstrap, ev.shuffles, **rule))
        chance[prefix] = {f"{n}-way": chance_level(n, ev.gt_top_k, ev.top_k) for n in ways}
    pcc = clip_pcc(scores.clip_features, ev.protocol)
    metrics["clip_pcc"] = summarise(pcc, None, ev.protocol, bootstrap=ev.bootstrap, seed=ev.seed)
    for name, fn in (("ssim", ssim), ("psnr", psnr)):  # per frame, a few clips at a time
        values = chunked(functools.partial(fn, protocol=ev.protocol), pred, gt, ev.batch_size)
        metrics[name] = summarise(values, None, ev.protocol, bootstrap=ev.bootstrap, seed=ev.seed)
    return metrics, chance


def compute_metrics(cfg: Stage6Config, x: EvalInputs, roles: dict[str, Any], scores: ModelScores, protocol: Protocol
                    ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """(metrics, chance levels) under ``protocol`` of its frames (:func:`protocol_frames`) from the models' ``scores``
    of those frames."""
    ev = replace(cfg.eval, protocol=protocol)
    gt, pred, _ = protocol_frames(x, protocol)
    metrics, chance = video_metrics(ev, roles, scores, gt, pred)
    blurry = chunked(lambda b, g: blurry_video_ssim(b, g, ev.protocol), x.blurry, x.gt, ev.batch_size)
    metrics["blurry_video_ssim"] = summarise(blurry, None, ev.protocol, bootstrap=ev.bootstrap, seed=ev.seed)
    metrics.update(task_metrics(x, ev))
    return metrics, chance


def check_eval_config(ev: Stage6Eval) -> None:
    if ev.batch_size < 1 or ev.n_trials < 1 or ev.bootstrap < 0 or not ev.ways:
        raise ConfigError("eval.batch_size and eval.n_trials must be ≥ 1, eval.bootstrap ≥ 0, eval.ways non-empty",
                          "fix the profile's stage6.eval block or --set eval.<key>=...")  # fmt: skip


def build_roles(cfg: Stage6Config, device: Any) -> dict[str, Any]:
    """The evaluation models (:data:`ROLES`) on ``device``, their processors on ``eval.image_backend`` (their weight
    files checked beforehand with ``require_foundation(cfg, ROLES)``)."""
    impl = foundation_impl(cfg.model.size)
    roles = {r: build_role(r, impl, cfg.paths.weights_root, device) for r in ROLES}
    for role in roles.values():  # spec §7: upstream's transformers-4 processors resized with PIL
        role.processor = with_image_backend(role.processor, cfg.eval.image_backend)
    return roles


def evaluate(cfg: Stage6Config) -> Path:
    """Run stage 6; returns the metrics file."""
    ev = cfg.eval
    check_eval_config(ev)
    manifest5, dir5, dir3 = check_stages(cfg)
    x = load_inputs(cfg, manifest5, dir5, dir3)
    require_foundation(cfg, ROLES)
    accelerator = build_accelerator(cfg)
    roles = build_roles(cfg, accelerator.device)
    load_gif_grids(cfg, manifest5, dir5, x)
    paths, recorder = RunPaths.from_config(cfg), None
    if accelerator.is_main_process:
        paths, recorder = begin_stage(cfg, "6", depends_on=("5", "3"))
        paths.metrics_file.unlink(missing_ok=True)
        log.info("stage 6 (%s): %d clips on %d processes, frames %s at %d px, both protocols (headline %s), %s "
                 "captions", cfg.run.mode, x.n, accelerator.num_processes, list(x.eval_frames), x.resolution,
                 ev.protocol, x.caption_source)  # fmt: skip
    accelerator.wait_for_everyone()
    scores = {"standard": model_scores((x.gt, x.pred), roles, ev.batch_size, accelerator)}
    neurons_frames = protocol_frames(x, "neurons")
    scores["neurons"] = (scores["standard"] if neurons_frames[0] is x.gt  # the same frames: the same model outputs
                         else model_scores(neurons_frames[:2], roles, ev.batch_size, accelerator))  # fmt: skip
    if recorder is not None:  # the main process, which began the stage
        results = {p: compute_metrics(cfg, x, roles, scores[p], p) for p in PROTOCOLS}
        recorder.extra["processes"] = accelerator.num_processes
        write_metrics(cfg, x, paths, recorder, results)
    accelerator.wait_for_everyone()
    return paths.metrics_file


def write_metrics(cfg: Stage6Config, x: EvalInputs, paths: RunPaths, recorder: StageRecorder,
                  results: dict[Protocol, tuple[dict[str, Any], dict[str, Any]]]) -> None:  # fmt: skip
    """``metrics_<mode>.json``, the manifest and the report (main process). ``results``: protocol → (metrics, chance
    levels). The file keeps the protocols apart under ``protocols``; the headline's (``eval.protocol``) are mirrored
    at the top level (``metrics``, ``chance_levels``), where readers of one-protocol files find them."""
    ev, out_path = cfg.eval, paths.metrics_file
    metrics, chance = results[ev.protocol]
    identification = (read_identification(paths, cfg.run.subject) or {}).get("test")
    inputs = {k: str(p.resolve()) for k, p in x.files.items()}
    if x.gif_files:
        inputs["gif_grid"] = str(x.gif_files[0].parent.resolve())
    report = {
        "stage": "6",
        "mode": cfg.run.mode,
        "subj": cfg.run.subject,
        "profile": cfg.run.profile,
        "config_hash": config_hash(cfg),
        "protocol": ev.protocol,
        "n_clips": x.n,
        "clips": f"test clips 0..{x.n - 1}",
        "eval_frames": list(x.eval_frames),
        "resolution": int(x.resolution),
        "caption_source": x.caption_source,
        "rule": {
            "n_trials": ev.n_trials,
            "gt_top_k": ev.gt_top_k,
            "top_k": ev.top_k,
            "seed": ev.seed,
            "bootstrap": ev.bootstrap,
        },  # fmt: skip
        "preprocessing": {
            "resize": RESIZE_NOTE,
            "masks": MASK_NOTE,
            "blurry": BLURRY_NOTE,
            "image_backend": ev.image_backend,
        },
        "chance_levels": chance,
        "metrics": metrics,
        "protocols": {
            p: {"metrics": m, "chance_levels": c, "inputs": protocol_frames(x, p)[2]} for p, (m, c) in results.items()
        },
        # brain-side: stage 1's identification of each test clip's CLIP tokens among N-1 others (top-1, N-way)
        "brain_identification": identification,
        "inputs": inputs,
    }
    atomic_write_text(out_path, json.dumps(finite_or_none(report), indent=2, sort_keys=True, allow_nan=False) + "\n")
    recorder.add_inputs([*x.files.values(), *x.data_files, *x.gif_files])
    if identification is not None:
        recorder.add_input(paths.stage_dir("1") / IDENTIFICATION_FILE)
    recorder.add_output(out_path)
    recorder.extra.update({"n_clips": x.n, "protocol": ev.protocol, "metrics_file": str(out_path.resolve()),
                           "report": str(report_path(paths).resolve())})  # fmt: skip
    recorder.finish()
    for protocol, (protocol_metrics, _) in results.items():
        for name, m in sorted(protocol_metrics.items()):
            ci = m.get("ci95") or (None, None)
            flag = " not above chance" if m.get("above_chance") is False else ""
            if "chance_shuffled" in m:
                above = "not above it" if m.get("above_shuffled") is False else "above it"
                flag += f"; shuffled chance {_fmt(m['chance_shuffled'])} ({above})"
            log.info("%-8s %-22s %s ± %s [%s, %s] (n=%d)%s", protocol, name, _fmt(m["mean"]), _fmt(m["std"]),
                     _fmt(ci[0]), _fmt(ci[1]), m["n"], flag)  # fmt: skip
    log.info("stage 6 done: %s; report %s", out_path, write_report(cfg))


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
