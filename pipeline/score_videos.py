"""Score a folder of generated videos that this project did not make (``eval_metrics.py --videos DIR --layout L
--subj S``), e.g. the videos that NEURONS released, under both metric protocols of stage 6.

Layouts (``--layout``); every file is named by its test-clip index: ``<idx>.<ext>`` or ``<idx>-<any text>.<ext>``
(upstream's ``<idx>-<prompt words>.gif``); files of other extensions (``config.yaml``, outputs) are ignored.

* ``upstream-gif``: upstream's stage-5 GIF grids (spec §6 step 6, :mod:`utils.gif_grid`): F frames of
  (S + 4) × (2·S + 6), [GT | prediction] with 2 px of black padding; upstream: 6 × 260 × 518, S = 256.
* ``tensor``: one ``videos.pt`` (or ``videos.safetensors`` holding one tensor) of shape (N, F, 3, H, W), row i =
  test clip i; or one ``<idx>.pt`` per clip of shape (F, 3, H, W). float in [0, 1] or uint8 (0..255). ``.pt`` files
  are read with ``torch.load(weights_only=True)``: plain tensors only, nothing is unpickled beyond that.
* ``mp4``: one ``<idx>.mp4`` per clip, the prediction alone, read with imageio's FFMPEG plugin (imageio-ffmpeg).

The clips must be test clips 0..N-1 of subject S (each index once, none missing, none past the test split); frames
must be square, and F must be the dataset's clip length after ``--frames`` (e.g. ``--frames 4,6,8,10,12,14``, the
frames upstream puts in its grids, of a 16-frame video).

Ground truth: the dataset's test frames of those clips (``paths.data_root`` of the profile). For ``upstream-gif`` the
GT half of every grid must match the dataset clip of its index (mean absolute difference per clip ≤
:data:`GT_TOLERANCE`, after removing the padding); otherwise the folder was numbered differently or made from other
data (``--no-gt-check`` skips this check).

Protocols (:mod:`utils.metrics`), as in stage 6:

* ``standard``: the predictions (S × S; for GIFs the prediction image cut out of the grid, padding removed) against
  the dataset's test frames resized to S × S (bilinear, antialiased when shrinking).
* ``neurons``: what upstream's ``run_metrics.py`` reports: the two halves of each GIF grid as read (padding, 1-px
  offset, palette quantisation, GT from the GIF). For ``tensor`` and ``mp4`` the grid that upstream's stage 5 would
  have written of the dataset clip and the prediction is made in memory by the same GIF writer and reader
  (:func:`utils.gif_grid.upstream_gif_halves`), so a tensor and the GIF grid written from it score the same.

Metrics: video and frame N-way accuracy, CLIP-pcc, SSIM, PSNR. The stage-3 metrics (blurry-video SSIM, concept F1,
key-object Dice, caption BLEU-4) need the decoder's other outputs and are not scored.

Outputs (atomic), in DIR or ``--out``: :data:`METRICS_NAME` (stage 6's layout: ``protocols.<name>.{metrics,
chance_levels, inputs}``, the headline ``eval.protocol``'s also at the top level) and :data:`REPORT_NAME` (one
self-contained page). Existing outputs are an error unless ``--overwrite``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common import load_data, require_foundation
from pipeline.report import CSS, METRICS, PUBLISHED, Table, cell, esc, fmt, gif_uri, img, is_paper
from pipeline.stage6 import ROLES, build_roles, check_eval_config, model_scores, video_metrics
from utils.config import config_hash
from utils.data import BrainVideoData
from utils.errors import ConfigError, DataError
from utils.gif_grid import grid_images, read_upstream_gif, upstream_gif_halves
from utils.io import atomic_write_text, finite_or_none
from utils.metrics import PROTOCOLS, Protocol
from utils.resize import resize_frames_bilinear
from utils.stage_configs import Stage6Config
from utils.training import build_accelerator
from utils.video_io import side_by_side

log = logging.getLogger(__name__)

LAYOUTS = ("upstream-gif", "tensor", "mp4")
METRICS_NAME = "video_metrics.json"
REPORT_NAME = "video_report.html"
TENSOR_FILES = ("videos.pt", "videos.safetensors")  # the one-file tensor layout
EXTENSION = {"upstream-gif": ".gif", "tensor": ".pt", "mp4": ".mp4"}
CLIP_NAME = re.compile(r"(\d+)(?:-.*)?", re.DOTALL)  # a file's stem: <idx> or <idx>-<any text>
# A grid's GT half vs the dataset clip of its index, mean |difference| in [0, 1] per clip: palette quantisation and
# another 224 → 256 resize stay near 0.01; a different clip of the same shot differs by several times that.
GT_TOLERANCE = 0.05
RANGE_SLACK = 1e-3  # float videos may overshoot [0, 1] by this much (decoder rounding); they are clamped
STANDARD_INPUTS = ("the predictions (S x S; of a GIF grid, the prediction image with the padding removed) vs the "
                   "dataset's test frames resized to S x S: bilinear, antialiased, clamped")  # fmt: skip
NEURONS_GIF = ("the halves of the folder's upstream GIF grids as upstream's run_metrics.py reads them: uint8, "
               "GIF-palette-quantised, with the grid padding and the 1-px offset, GT read from the GIF")  # fmt: skip
NEURONS_MADE = ("the halves of the upstream GIF grid of the dataset clip and the prediction, written and read back "
                "in memory as upstream's stage 5 and run_metrics.py do (truncation to uint8, GIF palette, padding, "
                "1-px offset)")  # fmt: skip
NOT_SCORED = ("blurry_video_ssim, concept_f1_*, key_object_dice, caption_bleu4: they need stage-3 outputs, which a "
              "folder of videos does not have")  # fmt: skip


@dataclass(frozen=True)
class FolderRequest:
    """What ``eval_metrics.py --videos`` asks for."""

    videos: Path  # the folder of videos
    layout: str  # one of LAYOUTS
    out: Path | None = None  # where the metrics and the report go (default: ``videos``)
    frames: tuple[int, ...] | None = None  # frames of each video to score (default: all)
    overwrite: bool = False  # replace existing outputs
    check_gt: bool = True  # upstream-gif: the GT halves must match the dataset clips

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.videos


@dataclass
class FolderVideos:
    """The videos of one folder, clip by clip (N clips, F frames, S pixels)."""

    clips: np.ndarray  # (N,) test-clip indices 0..N-1
    pred: torch.Tensor  # (N, F, 3, S, S) float32 in [0, 1] or uint8
    names: list[str]  # the file of each clip (one name for the one-file tensor layout)
    halves: tuple[torch.Tensor, torch.Tensor] | None = None  # upstream-gif: (GT, prediction) (N, F, 3, S+4, S+3) uint8

    @property
    def n(self) -> int:
        return int(self.pred.shape[0])


# ---- file names and clip indices -----------------------------------------------------------------------------------
def clip_index(path: Path) -> int | None:
    """The test-clip index a file is named by (``12.gif``, ``12-a-man-rides-a-horse.gif``), or None."""
    match = CLIP_NAME.fullmatch(path.stem)
    return int(match.group(1)) if match else None


def other_layouts(folder: Path, layout: str) -> str:
    """A hint naming the layout whose files the folder holds instead, or ''."""
    for name, ext in EXTENSION.items():
        n = sum(1 for p in folder.iterdir() if p.suffix.lower() == ext)
        if name != layout and n:
            return f"; it holds {n} {ext} file(s): --layout {name}?"
    return ""


def clip_files(folder: Path, layout: str, skip: tuple[str, ...] = ()) -> dict[int, Path]:
    """Test-clip index → file, for every file of the layout's extension in ``folder`` (except ``skip``)."""
    ext = EXTENSION[layout]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ext and p.is_file() and p.name not in skip)
    if not files:
        raise DataError(f"{folder} holds no *{ext} files for --layout {layout}{other_layouts(folder, layout)}",
                        f"pass the folder of the videos and its layout ({', '.join(LAYOUTS)})")  # fmt: skip
    out: dict[int, Path] = {}
    for path in files:
        idx = clip_index(path)
        if idx is None:
            raise DataError(f"{path} is not named by its test-clip index (<idx>{ext} or <idx>-<text>{ext})",
                            f"rename it, or move it out of {folder}")  # fmt: skip
        if idx in out:
            raise DataError(f"two files for test clip {idx} in {folder}: {out[idx].name} and {path.name} (a stale "
                            "video of an earlier run? upstream names GIFs by their caption, defect 28)",
                            "remove the stale one")  # fmt: skip
        out[idx] = path
    return dict(sorted(out.items()))


def check_clips(clips: np.ndarray, n_test: int, folder: Path, subj: int) -> None:
    """The folder's clips must be test clips 0..N-1: none past the test split, none missing."""
    if clips.size == 0:
        raise DataError(f"{folder} holds no videos (0 clips)", "pass a folder with the videos of test clips 0..N-1")
    extra = [int(c) for c in clips if c >= n_test]
    if extra:
        raise DataError(f"{folder}: clip indices {extra[:5]} are past the {n_test} test clips of subject {subj}",
                        "check --subj and --profile (paths.data_root), or remove those videos")  # fmt: skip
    missing = sorted(set(range(int(clips.max()) + 1)) - {int(c) for c in clips})
    if missing:
        raise DataError(f"{folder}: {len(missing)} of test clips 0..{int(clips.max())} have no video, e.g. "
                        f"{missing[:5]}", "add their videos, or move the clips after the gap out of the folder (the "
                        "folder must hold test clips 0..N-1)")  # fmt: skip


# ---- readers -------------------------------------------------------------------------------------------------------
def as_frames(x: Any, where: str) -> torch.Tensor:
    """A loaded video tensor → float32 in [0, 1] (clamped within :data:`RANGE_SLACK`) or uint8, unchanged shape."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where} holds a {type(x).__name__}, not a tensor", "save the videos with torch.save(tensor)")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise DataError(f"{where} holds {x.dtype} videos", "save float frames in [0, 1] or uint8 frames")
    x = x.float()
    if not torch.isfinite(x).all():
        raise DataError(f"{where} holds NaN or inf", "fix the videos before scoring them")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise DataError(
            f"{where}: values span [{lo:.4g}, {hi:.4g}], outside [0, 1]",
            "save frames in [0, 1] (e.g. (x + 1) / 2 for [-1, 1], x / 255 for 0..255) or as uint8",
        )
    return x.clamp(0.0, 1.0)


def load_tensor_file(path: Path) -> torch.Tensor:
    """One tensor from a ``.pt`` (``weights_only=True``) or ``.safetensors`` file."""
    fix = "save a plain tensor: torch.save(videos, path), or safetensors with one tensor"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1 and "videos" not in tensors:
                raise DataError(f"{path} holds tensors {sorted(tensors)[:5]}: which are the videos?",
                                "save one tensor, or name it 'videos'")  # fmt: skip
            return tensors.get("videos", next(iter(tensors.values())))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses every global but tensors and plain containers
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        cause = f"{path} holds pickled objects other than tensors{what}; torch.load(weights_only=True) refuses them"
        raise DataError(cause, fix) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        why = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
        raise DataError(f"{path} is not a readable tensor file: {why}", fix) from err


def read_tensor_folder(folder: Path) -> FolderVideos:
    """``videos.pt`` / ``videos.safetensors`` (N, F, 3, H, W), or ``<idx>.pt`` (F, 3, H, W) per clip."""
    singles = [folder / name for name in TENSOR_FILES if (folder / name).is_file()]
    per_clip = [p for p in folder.glob("*.pt") if p.name not in TENSOR_FILES]
    if len(singles) > 1 or (singles and per_clip):
        found = [p.name for p in singles] + [p.name for p in per_clip[:2]]
        raise DataError(f"{folder} holds both {' and '.join(found)}: which are the videos?",
                        f"keep either one of {', '.join(TENSOR_FILES)} or the per-clip <idx>.pt files")  # fmt: skip
    if singles:
        videos = as_frames(load_tensor_file(singles[0]), str(singles[0]))
        if videos.ndim != 5:
            raise DataError(f"{singles[0]} holds shape {tuple(videos.shape)}, expected videos (N, F, 3, H, W)",
                            "stack the videos as (clips, frames, 3, height, width)")  # fmt: skip
        return FolderVideos(np.arange(videos.shape[0]), videos, [singles[0].name])
    files = clip_files(folder, "tensor", skip=TENSOR_FILES)
    clips = [as_frames(load_tensor_file(p), str(p)) for p in files.values()]
    return FolderVideos(np.array(list(files)), stack_clips(clips, list(files.values()), "(F, 3, H, W)"),
                        [p.name for p in files.values()])  # fmt: skip


def stack_clips(clips: list[torch.Tensor], files: list[Path], expected: str) -> torch.Tensor:
    """Per-clip videos (F, 3, H, W), all of one shape and dtype → (N, F, 3, H, W)."""
    first = clips[0]
    for video, path in zip(clips, files, strict=True):
        if video.ndim != 4 or video.shape[1] != 3:
            raise DataError(f"{path} holds shape {tuple(video.shape)}, expected one video {expected}",
                            "save each clip's frames as (frames, 3, height, width)")  # fmt: skip
        if video.shape != first.shape or video.dtype != first.dtype:
            raise DataError(
                f"{path} holds {tuple(video.shape)} {video.dtype}, {files[0].name} {tuple(first.shape)} {first.dtype}",
                "give every clip the same frames, size and dtype",
            )
    return torch.stack(clips)


def read_mp4_folder(folder: Path) -> FolderVideos:
    """``<idx>.mp4`` per clip → uint8 (N, F, 3, H, W)."""
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise DataError("reading mp4 needs imageio's FFMPEG plugin, and imageio-ffmpeg is not installed",
                        "pip install imageio-ffmpeg (it is in requirements.txt), or save the videos as tensors "
                        "(--layout tensor)")  # fmt: skip
    import imageio.v3 as iio

    files = clip_files(folder, "mp4")
    clips = []
    for path in files.values():
        try:
            frames = np.asarray(iio.imread(path, plugin="FFMPEG"))  # (F, H, W, 3) uint8
        except (OSError, RuntimeError, ValueError, StopIteration) as err:
            raise DataError(f"{path} is not a readable video ({str(err).splitlines()[0][:100]})",
                            "re-encode it, e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4") from err  # fmt: skip
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise DataError(f"{path}: frames of shape {frames.shape}, expected RGB video frames",
                            "encode RGB frames")  # fmt: skip
        clips.append(torch.from_numpy(frames).permute(0, 3, 1, 2))
    return FolderVideos(np.array(list(files)), stack_clips(clips, list(files.values()), "(F, H, W, 3)"),
                        [p.name for p in files.values()])  # fmt: skip


def read_gif_folder(folder: Path) -> tuple[FolderVideos, torch.Tensor]:
    """Upstream's GIF grids → the videos (prediction images uint8 (N, F, 3, S, S) and the halves) and the GT
    images inside the grids (N, F, 3, S, S) uint8."""
    files = clip_files(folder, "upstream-gif")
    fix = f"pass a folder of upstream's stage-5 GIF grids (spec §6 step 6), or another --layout ({', '.join(LAYOUTS)})"
    halves = [read_upstream_gif(p, fix) for p in files.values()]  # (F, S+4, S+3, 3) twice per clip
    paths = list(files.values())
    for (gt_half, _), path in zip(halves, paths, strict=True):
        if gt_half.shape != halves[0][0].shape:
            raise DataError(f"{path} holds grids of {gt_half.shape[:3]}, {paths[0].name} of {halves[0][0].shape[:3]}",
                            "score GIFs of one run: the same frames and size")  # fmt: skip
    images = [grid_images(g, p) for g, p in halves]  # (F, S, S, 3) twice per clip
    stack = channels_first
    videos = FolderVideos(np.array(list(files)), stack([p for _, p in images]), [p.name for p in paths],
                          (stack([g for g, _ in halves]), stack([p for _, p in halves])))  # fmt: skip
    return videos, stack([g for g, _ in images])


def pick_frames(x: torch.Tensor, frames: tuple[int, ...] | None, n_frames: int, what: str) -> torch.Tensor:
    """(N, F, ...) → (N, n_frames, ...): ``frames`` of each video (all when None), which must be the clip length."""
    have = int(x.shape[1])
    if frames is not None:
        if not all(-have <= f < have for f in frames):
            raise ConfigError(f"--frames {','.join(map(str, frames))} do not fit the {have}-frame {what}",
                              f"pick frames 0..{have - 1}")  # fmt: skip
        x = x[:, list(frames)]
    if int(x.shape[1]) != n_frames:
        raise DataError(f"the {what} have {x.shape[1]} frames, the dataset's clips {n_frames}",
                        f"pick {n_frames} frames with --frames, e.g. --frames 4,6,8,10,12,14 of 16 (upstream's "
                        "choice)")  # fmt: skip
    return x


def check_request(req: FolderRequest) -> Path:
    """The videos' folder, which must exist, and a known layout."""
    if not req.videos.is_dir():
        raise DataError(f"--videos {req.videos} is not a folder", "pass the folder that holds the videos")
    if req.layout not in LAYOUTS:
        raise ConfigError(f"unknown --layout {req.layout!r}", f"use one of {', '.join(LAYOUTS)}")
    return req.videos


def read_folder(req: FolderRequest, n_frames: int) -> tuple[FolderVideos, torch.Tensor | None]:
    """The folder's videos at ``n_frames`` frames, and for GIF grids the GT images inside them."""
    folder = check_request(req)
    gif_gt = None
    if req.layout == "upstream-gif":
        videos, gif_gt = read_gif_folder(folder)
    else:
        videos = read_tensor_folder(folder) if req.layout == "tensor" else read_mp4_folder(folder)
    videos.pred = pick_frames(videos.pred, req.frames, n_frames, f"videos of {folder}")
    if videos.halves is not None and gif_gt is not None:
        videos.halves = (pick_frames(videos.halves[0], req.frames, n_frames, "GIF grids"),
                         pick_frames(videos.halves[1], req.frames, n_frames, "GIF grids"))  # fmt: skip
        gif_gt = pick_frames(gif_gt, req.frames, n_frames, "GIF grids")
    h, w = (int(s) for s in videos.pred.shape[-2:])
    if h != w:
        raise DataError(
            f"the videos of {folder} are {h} x {w}, not square",
            "crop or resize them to square frames (the metrics and upstream's grid take S x S)",
        )
    return videos, gif_gt


# ---- ground truth --------------------------------------------------------------------------------------------------
def check_gif_gt(gif_gt: torch.Tensor, gt: torch.Tensor, names: list[str]) -> dict[str, float]:
    """The GT images of the grids (N, F, 3, S, S) uint8 vs the dataset's (N, F, 3, S, S) float: per-clip mean
    absolute difference, an error above :data:`GT_TOLERANCE`."""
    diff = (gif_gt.float() / 255 - gt).abs().flatten(1).mean(dim=1)  # (N,)
    bad = torch.nonzero(diff > GT_TOLERANCE).flatten().tolist()
    if bad:
        i = bad[0]
        raise DataError(f"the GT half of {len(bad)} of {len(names)} GIF grids is not the dataset's test clip of its "
                        f"index, e.g. {names[i]}: mean |difference| {float(diff[i]):.3f} > {GT_TOLERANCE}",
                        "check --profile (paths.data_root) and the file numbering, or pass --no-gt-check to score "
                        "anyway")  # fmt: skip
    return {"max_mean_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "tolerance": GT_TOLERANCE}


def channels_first(parts: list[np.ndarray]) -> torch.Tensor:
    """N arrays (F, H, W, 3) → (N, F, 3, H, W)."""
    return torch.from_numpy(np.stack(parts)).permute(0, 1, 4, 2, 3).contiguous()


def made_halves(data: BrainVideoData, clips: np.ndarray, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The halves (N, F, 3, S+4, S+3) uint8 of the upstream grids of the dataset clips and ``pred`` (N, F, 3, S, S),
    made in memory."""
    halves = [upstream_gif_halves(data.frames("test", [int(clip)])[0], pred[i]) for i, clip in enumerate(clips)]
    return channels_first([g for g, _ in halves]), channels_first([p for _, p in halves])


# ---- the command ---------------------------------------------------------------------------------------------------
def output_paths(req: FolderRequest) -> tuple[Path, Path]:
    """(metrics, report) paths; existing ones are an error unless ``req.overwrite``."""
    out = req.out_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", "pass a folder")
    files = (out / METRICS_NAME, out / REPORT_NAME)
    existing = [p for p in files if p.exists()]
    if existing and not req.overwrite:
        raise ConfigError(f"{existing[0]} exists (an earlier scoring)",
                          "pass --overwrite to replace it, or --out NEW_FOLDER")  # fmt: skip
    return files


def score_folder(cfg: Stage6Config, req: FolderRequest) -> Path:
    """Score the videos of ``req.videos`` under both protocols; write the metrics JSON and the report; returns the
    metrics file. Every check (outputs, layout, clips, shapes, GT, weights) runs before any model is built."""
    ev = cfg.eval
    check_eval_config(ev)
    check_request(req)
    metrics_file, report_file = output_paths(req)
    data = load_data(cfg, ("frames",))
    videos, gif_gt = read_folder(req, data.n_frames)
    check_clips(videos.clips, data.n_clips("test"), req.videos, cfg.run.subject)
    size = int(videos.pred.shape[-1])
    gt = resize_frames_bilinear(data.frames("test", videos.clips), size)  # (N, F, 3, S, S)
    gt_check = check_gif_gt(gif_gt, gt, videos.names) if gif_gt is not None and req.check_gt else None
    halves = videos.halves if videos.halves is not None else made_halves(data, videos.clips, videos.pred)
    frames: dict[Protocol, tuple[torch.Tensor, torch.Tensor]] = {"standard": (gt, videos.pred), "neurons": halves}
    require_foundation(cfg, ROLES)
    accelerator = build_accelerator(cfg)
    roles = build_roles(cfg, accelerator.device)
    log.info("scoring %d clips of %s (%s), %d frames at %d px, both protocols", videos.n, req.videos, req.layout,
             data.n_frames, size)  # fmt: skip
    results = {}
    for p in PROTOCOLS:
        scores = model_scores(frames[p], roles, ev.batch_size, accelerator)
        results[p] = video_metrics(replace(ev, protocol=p), roles, scores, *frames[p])
    if accelerator.is_main_process:
        record = metrics_record(cfg, req, videos, data, results, gt_check)
        req.out_dir.mkdir(parents=True, exist_ok=True)
        report_file.unlink(missing_ok=True)  # never a report beside metrics it does not show
        atomic_write_text(metrics_file, json.dumps(finite_or_none(record), indent=2, sort_keys=True,
                                                   allow_nan=False) + "\n")  # fmt: skip
        write_folder_report(report_file, cfg, record, gt[: ev.report_samples], videos.pred[: ev.report_samples])
        log_results(results)
        log.info("metrics %s; report %s", metrics_file, report_file)
    accelerator.wait_for_everyone()
    return metrics_file


def metrics_record(cfg: Stage6Config, req: FolderRequest, videos: FolderVideos, data: BrainVideoData,
                   results: dict[Protocol, tuple[dict[str, Any], dict[str, Any]]], gt_check: dict[str, float] | None
                   ) -> dict[str, Any]:  # fmt: skip
    ev = cfg.eval
    metrics, chance = results[ev.protocol]
    inputs = {"standard": STANDARD_INPUTS, "neurons": NEURONS_GIF if req.layout == "upstream-gif" else NEURONS_MADE}
    return {
        "source": "eval_metrics.py --videos (a folder of videos, no run)",
        "videos": str(req.videos.resolve()),
        "layout": req.layout,
        "files": videos.names,
        "subj": cfg.run.subject,
        "profile": cfg.run.profile,
        "data_root": str(Path(cfg.paths.data_root).resolve()),
        "data_files": [str(p) for p in data.opened_files],
        "config_hash": config_hash(cfg),
        "protocol": ev.protocol,
        "n_clips": videos.n,
        "clips": f"test clips 0..{videos.n - 1}",
        "frames": list(req.frames) if req.frames is not None else "all",
        "resolution": int(videos.pred.shape[-1]),
        "gt_check": gt_check if gt_check is not None else ("skipped" if req.layout == "upstream-gif" else None),
        "rule": {"n_trials": ev.n_trials, "gt_top_k": ev.gt_top_k, "top_k": ev.top_k, "seed": ev.seed},
        "preprocessing": {"image_backend": ev.image_backend},
        "not_scored": NOT_SCORED,
        "chance_levels": chance,
        "metrics": metrics,
        "protocols": {p: {"metrics": m, "chance_levels": c, "inputs": inputs[p]} for p, (m, c) in results.items()},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def log_results(results: dict[Protocol, tuple[dict[str, Any], dict[str, Any]]]) -> None:
    for protocol, (metrics, _) in results.items():
        for name, m in sorted(metrics.items()):
            log.info("%-8s %-12s %s ± %s (n=%d)", protocol, name, fmt(m["mean"], 4), fmt(m["std"], 4), m["n"])


# ---- the report ----------------------------------------------------------------------------------------------------
def folder_table(cfg: Stage6Config, record: dict[str, Any]) -> Table:
    """Both protocols, then (paper profile) the published numbers, which stand beside 'neurons'."""
    protocols = record["protocols"]
    cols = [(f"{p}", protocols[p]["metrics"]) for p in ("standard", "neurons")]
    others, notes = [], [f"{p}: {protocols[p]['inputs']}" for p in ("standard", "neurons")]
    if is_paper(cfg):
        subj = cfg.run.subject
        for name, pub in PUBLISHED.items():
            which = f"subj {subj}" if subj in pub else "mean of 3"
            others.append((f"{name} ({which})", pub.get(subj, pub["mean"])))
            notes.append(f"{name}: {pub['source']}")
        notes.append("the published numbers were computed with upstream's metric code: compare them with 'neurons'")
    notes.append(f"not scored: {NOT_SCORED}")
    rows = []
    for key, label, dec in METRICS:
        if not any(key in m for _, m in cols):
            continue
        chance = next((m[key].get("chance") for _, m in cols if key in m), None)
        rows.append([label, *(cell(m.get(key), dec) for _, m in cols), *(cell(v.get(key), dec) for _, v in others),
                     fmt(chance) if chance is not None else ""])  # fmt: skip
    header = ["metric", *(c for c, _ in cols), *(n for n, _ in others), "chance"]
    return Table(f"Video metrics, {record['n_clips']} test clips", header, rows, notes)


def gt_check_note(check: dict[str, float] | str) -> str:
    if isinstance(check, str):
        return f"GT check of the GIF grids: {check}"
    return (
        f"GT check of the GIF grids: GT half vs the dataset clip of its index, mean |difference| per clip at most "
        f"{check['max_mean_abs_diff']:.4f} (mean {check['mean_abs_diff']:.4f}; tolerance {check['tolerance']})"
    )


def write_folder_report(path: Path, cfg: Stage6Config, record: dict[str, Any], gt: torch.Tensor, pred: torch.Tensor
                        ) -> Path:  # fmt: skip
    """One self-contained page: the metrics table and GT | prediction GIFs of the first clips (gt, pred: (n, F, 3,
    S, S), pred float in [0, 1] or uint8)."""
    pred01 = pred.float() / 255 if pred.dtype == torch.uint8 else pred.float()
    res = int(pred01.shape[-1])
    height = max(96, res * 3) if res < 96 else res
    files = record["files"]
    name = lambda i: files[i] if len(files) == record["n_clips"] else f"{files[0]} row {i}"  # noqa: E731
    samples = [f'<figure>{img(gif_uri(side_by_side(gt[i], pred01[i])), f"clip {i}", height, res < 96)}'
               f"<figcaption>test clip {i}: {esc(name(i))}</figcaption></figure>"
               for i in range(int(pred01.shape[0]))]  # fmt: skip
    check = record.get("gt_check")
    parts = [
        f"<h1>Video-folder metrics: {esc(record['videos'])}</h1>",
        f'<p class="note">layout {esc(record["layout"])}; subject {record["subj"]}; profile {esc(record["profile"])}; '
        f"data {esc(record['data_root'])}; frames {esc(record['frames'])}; {record['resolution']} px; written "
        f"{esc(record['written'])}</p>",
        folder_table(cfg, record).html(),
        f'<p class="note">{esc(gt_check_note(check))}</p>' if check is not None else "",
        f"<h2>Samples (ground truth | prediction, first {len(samples)} clips)</h2>", *samples,
    ]  # fmt: skip
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Video-folder metrics</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")  # fmt: skip
    return atomic_write_text(path, page)
