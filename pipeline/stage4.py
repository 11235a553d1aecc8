"""Stage 4: BLIP-2 captions of the stage-3 keyframes (spec §5).

Each keyframe ``(3, K, K)`` in [0, 1] (``<run>/stage3_<mode>/keyframes.safetensors``) is captioned by the
``blip2`` role like upstream: the ``ToPILImage`` byte conversion, no text prompt, greedy ``generate()``;
``caption.max_new_tokens`` bounds the new tokens (None: ``generate()``'s default length, as upstream). Batches of
``caption.batch_size``; a caption depends only on its own keyframe. On CUDA the model runs in the
``run.mixed_precision`` dtype (upstream: fp16).

Outputs in ``<run>/stage4_<mode>/``: ``captions.json`` (the N captions, clip order), ``caption_scores.json`` (corpus
BLEU-4 of these and of stage 3's GPT-2 captions against the ground-truth test captions, when the data has them) and
``manifest.json``, whose inputs include the stage-3 keyframes: a rerun of stage 3 makes stage 4 stale, and stage 5
then falls back to stage 3's GPT-2 captions (:func:`pipeline.captions.select_captions`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.foundation import build_role, foundation_impl
from pipeline.captions import CAPTIONS_FILE, KEYFRAMES_FILE
from pipeline.common import require_foundation
from utils.cli import begin_stage
from utils.data import BrainVideoData
from utils.errors import ConfigError, NeuronsError, StageOrderError
from utils.io import atomic_write_json
from utils.manifest import require_stage
from utils.metrics import caption_bleu
from utils.runs import RunPaths, rerun_hint
from utils.sharding import gather_values, my_clips
from utils.stage_configs import Stage4Config
from utils.training import build_accelerator

log = logging.getLogger(__name__)

KEYFRAMES = "keyframes"  # the tensor in stage 3's KEYFRAMES_FILE
SCORES_FILE = "caption_scores.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Stage4:
    cfg: Stage4Config
    stage3_dir: Path
    out_dir: Path
    keyframes: torch.Tensor  # (N, 3, K, K) in [0, 1]
    blip2: Any  # models.foundation.blip2.Blip2Role
    accelerator: Any


def keyframes_path(stage3_dir: Path) -> Path:
    return stage3_dir / KEYFRAMES_FILE


def check_config(cfg: Stage4Config) -> None:
    c = cfg.caption
    if c.batch_size < 1:
        raise ConfigError("caption.batch_size must be at least 1", "--set caption.batch_size=<n >= 1>")
    if c.max_new_tokens is not None and c.max_new_tokens < 1:
        raise ConfigError("caption.max_new_tokens must be at least 1 (or null)", "--set caption.max_new_tokens=20")


def load_keyframes(stage3_dir: Path, hint: str) -> torch.Tensor:
    """Stage 3's keyframes (N, 3, K, K) as float32 in [0, 1]."""
    path = keyframes_path(stage3_dir)
    try:
        frames = load_file(path)[KEYFRAMES]
    except (OSError, KeyError, SafetensorError) as err:
        raise StageOrderError(f"stage-3 keyframes {path} are unreadable ({type(err).__name__})",
                              hint.format(stage=3)) from None  # fmt: skip
    if frames.ndim != 4 or frames.shape[1] != 3 or len(frames) == 0:
        raise StageOrderError(f"stage-3 keyframes {path} have shape {tuple(frames.shape)}, not (N, 3, K, K)",
                              hint.format(stage=3))  # fmt: skip
    return frames.float()


def model_dtype(cfg: Stage4Config, device: torch.device) -> torch.dtype | None:
    """The BLIP-2 weights' dtype: the mixed-precision dtype on CUDA (upstream ran fp16), full precision elsewhere."""
    return DTYPES.get(cfg.run.mixed_precision) if device.type == "cuda" else None


def setup(cfg: Stage4Config) -> Stage4:
    """Check stage 3 (fresh, with keyframes) and the config, then build the captioner; no output is touched here."""
    paths, hint = RunPaths.from_config(cfg), rerun_hint(cfg)
    stage3_dir = paths.stage_dir("3")
    manifest = require_stage("3", stage3_dir, paths.stage_dirs(), hint)
    if KEYFRAMES_FILE not in manifest.get("outputs", {}):
        raise StageOrderError(f"stage 3 in {stage3_dir} recorded no {KEYFRAMES_FILE}", hint.format(stage=3))
    check_config(cfg)
    keyframes = load_keyframes(stage3_dir, hint)
    impl, root = foundation_impl(cfg.model.size), cfg.paths.weights_root
    require_foundation(cfg, ("blip2",))
    accelerator = build_accelerator(cfg)
    device = accelerator.device
    blip2 = build_role("blip2", impl, root, device, dtype=model_dtype(cfg, device))
    return Stage4(cfg, stage3_dir, paths.stage_dir("4"), keyframes, blip2, accelerator)


def caption_all(s: Stage4) -> list[str]:
    """Captions of every keyframe, in clip order (each process captions its round-robin share)."""
    c, n, acc = s.cfg.caption, len(s.keyframes), s.accelerator
    clips = my_clips(n, acc.process_index, acc.num_processes)
    captions: list[str] = []
    t0 = time.time()
    for start in range(0, len(clips), c.batch_size):
        batch = s.keyframes[clips[start : start + c.batch_size]]
        captions += s.blip2.caption(batch, max_new_tokens=c.max_new_tokens)
        log.info("captioned %d of %d keyframes on process %d (%.1f s)", start + len(batch), len(clips),
                 acc.process_index, time.time() - t0)  # fmt: skip
    return gather_values(acc, clips, captions, n)


def ground_truth_captions(cfg: Stage4Config, n: int) -> tuple[list[str], list[Path]]:
    """The first ``n`` test clips' ground-truth captions and the data files read for them, or ([], []) when the data
    lacks them."""
    try:
        data = BrainVideoData(cfg.paths.data_root, cfg.run.subject, cfg.data)
        refs = [str(x) for x in data.captions("test")[:n]]
    except (NeuronsError, OSError) as err:
        log.warning("no ground-truth test captions (%s): caption BLEU-4 is not scored", str(err).splitlines()[0])
        return [], []
    if len(refs) != n:
        log.warning("%d ground-truth test captions for %d keyframes: caption BLEU-4 is not scored", len(refs), n)
        return [], []
    return refs, data.opened_files


def stage3_captions(stage3_dir: Path) -> list[str] | None:
    try:
        caps = json.loads((stage3_dir / CAPTIONS_FILE).read_text())["captions"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(c) for c in caps] if isinstance(caps, list) else None


def score(s: Stage4, captions: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU-4 of the BLIP-2 captions (and of stage 3's GPT-2 captions) against ``refs``."""
    scores: dict[str, Any] = {"n_clips": len(captions), "reference": f"GT test captions ({s.cfg.data.caption_source})"}
    scores["blip2_bleu4"] = caption_bleu(captions, refs)
    gpt2 = stage3_captions(s.stage3_dir)
    if gpt2 is not None and len(gpt2) == len(captions):
        scores["gpt2_bleu4"] = caption_bleu(gpt2, refs)
    return scores


def clear_outputs(out_dir: Path) -> None:
    for name in (CAPTIONS_FILE, SCORES_FILE):
        (out_dir / name).unlink(missing_ok=True)


def caption(cfg: Stage4Config) -> Path:
    """Run stage 4 (on every process of a launch: each captions its round-robin share); returns the stage folder."""
    s = setup(cfg)
    acc, recorder = s.accelerator, None
    n = len(s.keyframes)
    if acc.is_main_process:
        _, recorder = begin_stage(cfg, "4", depends_on=("3",))
        clear_outputs(s.out_dir)
        log.info("stage 4 (%s): BLIP-2 captions of %d keyframes %s on %d processes, batch %d, max_new_tokens %s",
                 cfg.run.mode, n, tuple(s.keyframes.shape[1:]), acc.num_processes, cfg.caption.batch_size,
                 cfg.caption.max_new_tokens)  # fmt: skip
    acc.wait_for_everyone()
    captions = caption_all(s)
    if acc.is_main_process:
        save_outputs(s, captions, recorder)
    acc.wait_for_everyone()
    return s.out_dir


def save_outputs(s: Stage4, captions: list[str], recorder: Any) -> None:
    cfg, n = s.cfg, len(captions)
    path = atomic_write_json(s.out_dir / CAPTIONS_FILE, captions)
    recorder.add_output(path, (n,), "str")
    recorder.add_input(keyframes_path(s.stage3_dir))
    refs, refs_files = ground_truth_captions(cfg, n)
    if refs:
        scores = score(s, captions, refs)
        path = atomic_write_json(s.out_dir / SCORES_FILE, scores)
        recorder.add_output(path)
        recorder.extra["caption_scores"] = scores
        recorder.add_inputs(refs_files)
        log.info("caption BLEU-4: BLIP-2 %.4f, stage-3 GPT-2 %s", scores["blip2_bleu4"], scores.get("gpt2_bleu4"))
    recorder.extra.update({"n_clips": n, "max_new_tokens": cfg.caption.max_new_tokens,
                           "processes": s.accelerator.num_processes})  # fmt: skip
    recorder.finish()
    log.info("stage 4 done: %s; captions e.g. %s", s.out_dir, json.dumps(captions[:3]))
