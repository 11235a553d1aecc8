"""Stage 5: video generation with AnimateDiff v3 + SparseCtrl-RGB (spec §6) from stage 3's keyframe and blurry video
and a caption (stage-4 BLIP-2 or stage-3 GPT-2).

Per test clip (N = ``video.num_frames``, R = ``video.resolution``, F = stage-3 frames, s = R / VAE downsample):

1. Keyframe (3, K, K) → resized to R → VAE posterior sample → SparseCtrl condition at frame 0 (with its mask).
2. Blurry video (F, 3, r, r) → linear time interpolation to N frames (frame j sits at j·(F−1)/(N−1); for F = 6,
   N = 16 this is upstream's 0.67/0.33 blends) → resized to R → VAE posterior sample → init latents (1, C, N, s, s).
3. A real img2img start (fixes defect 26): of the ``steps`` DDIM timesteps the last round(steps·strength) run, from
   the init latents noised to exactly the first of them (``VideoRole.img2img_start``).
4. Prompt = caption + ``prompt_suffix``, negative prompt from the config, CFG ``guidance``, SparseCtrl
   ``controlnet_scale``; frames decoded one by one → (N, 3, R, R) in [0, 1].

Every clip has its own generator seeded ``clip_seed(run.seed, clip)`` (upstream: seed 0 for all), drawn in a fixed
order (keyframe sample, init sample, start noise), so a clip's video does not depend on which process made it.
Under torchrun / accelerate the clips are dealt round-robin (clip = rank + i·world); each process writes
``shard_<rank>.safetensors`` (``videos``, ``clips``); after a barrier the main process merges them into
``videos.safetensors`` (N_clips, N, 3, R, R) float16, removes the shards and writes ``prompts.json`` (caption
source, captions, prompts), ``previews/video_<i>.gif`` (the generated video alone, named by clip index — no
ground truth, no caption in the name: defect 28) and ``manifest.json``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.foundation import build_role, foundation_impl
from pipeline.captions import CAPTIONS_FILE, KEYFRAMES_FILE, select_captions
from pipeline.common import require_foundation
from utils.cli import begin_stage
from utils.errors import ConfigError, StageOrderError
from utils.io import atomic_save_safetensors, atomic_write_json
from utils.manifest import StageRecorder, read_manifest, require_stage
from utils.resize import resize_frames_bilinear
from utils.runs import PROMPTS_FILE, VIDEOS_FILE, RunPaths, rerun_hint
from utils.sharding import merge_shards, my_clips, remove_shards, write_shard
from utils.stage_configs import Stage5Config
from utils.training import build_accelerator, clip_seed, seed_everything
from utils.video_io import save_gif

log = logging.getLogger(__name__)

PREVIEWS_DIR = "previews"
OUTPUT_DTYPE = torch.float16


@dataclass
class Stage5:
    """Everything one stage-5 run holds."""

    cfg: Stage5Config
    role: Any  # VideoRole
    accelerator: Any
    out_dir: Path
    stage3_dir: Path
    keyframes: torch.Tensor  # (N_clips, 3, K, K) in [0, 1]
    blurry: torch.Tensor  # (N_clips, F, 3, r, r) in [0, 1]
    captions: list[str]
    caption_source: str  # "blip2" | "gpt2"
    caption_inputs: list[Path]  # the files the captions were read from

    @property
    def n_clips(self) -> int:
        return len(self.keyframes)


# ---- conditions ----------------------------------------------------------------------------------------------------
def interpolate_frames(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Linear interpolation in time: ``(..., F, C, H, W)`` → ``(..., num_frames, C, H, W)``; output frame j sits at
    input time j·(F−1)/(num_frames−1) (first and last frames kept; F = 6 → 16 gives upstream's 2/3, 1/3 blends)."""
    n_in = frames.shape[-4]
    if num_frames == 1 or n_in == 1:
        return frames[..., :1, :, :, :].expand(*frames.shape[:-4], num_frames, *frames.shape[-3:])
    pos = torch.arange(num_frames, dtype=torch.float64) * (n_in - 1) / (num_frames - 1)  # (N,)
    lo = pos.floor().long().clamp(max=n_in - 2)  # (N,)
    w = (pos - lo).to(frames.dtype).view(num_frames, 1, 1, 1)  # (N, 1, 1, 1)
    return frames[..., lo, :, :, :] * (1 - w) + frames[..., lo + 1, :, :, :] * w


def prompt_of(cfg: Stage5Config, caption: str) -> str:
    return caption + cfg.video.prompt_suffix


# ---- generation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_clip(s: Stage5, clip: int) -> torch.Tensor:
    """Steps 1–4 of the module docstring for test clip ``clip`` → ``(N, 3, R, R)`` float32 in [0, 1] (CPU)."""
    v, role = s.cfg.video, s.role
    gen = torch.Generator(device="cpu").manual_seed(clip_seed(s.cfg.run.seed, clip))
    key = resize_frames_bilinear(s.keyframes[clip : clip + 1], v.resolution)  # (1, 3, R, R)
    frames = interpolate_frames(s.blurry[clip : clip + 1].float(), v.num_frames)  # (1, N, 3, r, r)
    blurry = resize_frames_bilinear(frames, v.resolution)  # (1, N, 3, R, R)
    key_latents = role.encode_frames(key, generator=gen)  # (1, C, s, s)
    init = role.encode_frames(blurry, generator=gen).permute(0, 2, 1, 3, 4)  # (1, C, N, s, s)
    noise = torch.randn(init.shape, generator=gen, dtype=torch.float32)  # (1, C, N, s, s)
    cond, mask = role.keyframe_condition(key_latents, v.num_frames)  # (1, C, N, s, s), (1, 1, N, s, s)
    start, first = role.img2img_start(init, noise, v.steps, v.strength)
    if first < v.steps:
        pos = role.encode_prompt([prompt_of(s.cfg, s.captions[clip])])  # (1, L, D)
        neg = role.encode_prompt([v.negative_prompt])
        start = role.denoise(start, pos, neg, cond, mask, v.steps, v.guidance, v.controlnet_scale, start_step=first)
    return role.decode_latents(start)[0].cpu()  # (N, 3, R, R)


def generate_share(s: Stage5) -> Path:
    """Generate this process's clips and write its shard file; returns its path."""
    acc, v = s.accelerator, s.cfg.video
    clips = my_clips(s.n_clips, acc.process_index, acc.num_processes)
    videos = torch.empty((len(clips), v.num_frames, 3, v.resolution, v.resolution), dtype=OUTPUT_DTYPE)
    t0 = time.time()
    for i, clip in enumerate(clips):
        videos[i] = generate_clip(s, clip).to(OUTPUT_DTYPE)
        log.info("clip %d (%d of %d on process %d): %.1f s/clip", clip, i + 1, len(clips), acc.process_index,
                 (time.time() - t0) / (i + 1))  # fmt: skip
    return write_shard(s.out_dir, acc.process_index, clips, {"videos": videos})


# ---- set-up --------------------------------------------------------------------------------------------------------
def check_config(cfg: Stage5Config, n_clips: int, downsample: int) -> None:
    """Refuse settings that cannot work, before anything is written."""
    v = cfg.video
    checks = (
        (v.steps >= 1, "video.steps must be at least 1"),
        (0.0 <= v.strength <= 1.0, "video.strength must be in [0, 1]"),
        (v.num_frames >= 1 and v.num_previews >= 0 and v.preview_fps > 0, "num_frames/num_previews/preview_fps"),
        (v.resolution >= downsample and v.resolution % downsample == 0,
         f"video.resolution must be a positive multiple of the VAE's {downsample}x"),
        (all(0 <= f < v.num_frames for f in v.eval_frames), f"video.eval_frames must be in 0..{v.num_frames - 1}"),
        (v.num_clips is None or 1 <= v.num_clips <= n_clips, f"video.num_clips must be in 1..{n_clips} or null"),
    )  # fmt: skip
    for ok, cause in checks:
        if not ok:
            raise ConfigError(cause, "fix it in the profile's stage5.video block or with --set video.<key>=...")


def select(cfg: Stage5Config, stage3_dir: Path) -> tuple[list[str], str, list[Path]]:
    """Captions, their source ("blip2" | "gpt2") and the files they came from (for the manifest)."""
    captions, chosen = select_captions(cfg)
    if chosen == "gpt2":
        return list(captions), chosen, [stage3_dir / CAPTIONS_FILE]
    stage4 = RunPaths.from_config(cfg).stage_dir("4")
    files = [stage4 / rel for rel in (read_manifest(stage4) or {}).get("outputs", {}) if rel.endswith(".json")]
    return list(captions), chosen, files


def load_stage3(cfg: Stage5Config) -> tuple[Path, torch.Tensor, torch.Tensor]:
    paths = RunPaths.from_config(cfg)
    folder = paths.stage_dir("3")
    require_stage("3", folder, paths.stage_dirs(), rerun_hint(cfg))
    keyframes = load_file(folder / KEYFRAMES_FILE)["keyframes"]  # (N, 3, K, K)
    blurry = load_file(folder / "blurry_videos.safetensors")["blurry_videos"]  # (N, F, 3, r, r)
    return folder, keyframes, blurry


def setup(cfg: Stage5Config) -> Stage5:
    """Validate every input (stage 3 first) and build the video role; no output is touched here."""
    stage3_dir, keyframes, blurry = load_stage3(cfg)
    captions, source, caption_files = select(cfg, stage3_dir)
    if len(captions) != len(keyframes):
        raise StageOrderError(f"{len(captions)} {source} captions for {len(keyframes)} stage-3 clips",
                              rerun_hint(cfg).format(stage="4" if source == "blip2" else "3"))  # fmt: skip
    impl, root, v = foundation_impl(cfg.model.size), cfg.paths.weights_root, cfg.video
    require_foundation(cfg, ("video",))
    accelerator = build_accelerator(cfg)
    role = build_role("video", impl, root, accelerator.device, num_frames=v.num_frames, lora_scale=v.lora_scale)
    check_config(cfg, len(keyframes), role.downsample)
    n = v.num_clips or len(keyframes)
    out_dir = RunPaths.from_config(cfg).stage_dir("5")
    return Stage5(cfg, role, accelerator, out_dir, stage3_dir, keyframes[:n], blurry[:n], captions[:n], source,
                  caption_files)  # fmt: skip


# ---- outputs -------------------------------------------------------------------------------------------------------
def clear_outputs(out_dir: Path) -> None:
    """Remove the files a previous run of this stage wrote (only the names this stage writes)."""
    for path in (out_dir / VIDEOS_FILE, out_dir / PROMPTS_FILE):
        path.unlink(missing_ok=True)
    remove_shards(out_dir)
    shutil.rmtree(out_dir / PREVIEWS_DIR, ignore_errors=True)


def save_outputs(s: Stage5, videos: torch.Tensor, recorder: StageRecorder) -> None:
    meta = {"stage": "5", "mode": s.cfg.run.mode, "subj": str(s.cfg.run.subj), "caption_source": s.caption_source}
    path = atomic_save_safetensors(s.out_dir / VIDEOS_FILE, {"videos": videos}, meta)
    recorder.add_output(path, videos.shape, videos.dtype)
    prompts = {
        "caption_source": s.caption_source,
        "captions": s.captions,
        "prompts": [prompt_of(s.cfg, c) for c in s.captions],
        "negative_prompt": s.cfg.video.negative_prompt,
    }
    path = atomic_write_json(s.out_dir / PROMPTS_FILE, prompts)
    recorder.add_output(path, (s.n_clips,), "str")
    for i in range(min(s.cfg.video.num_previews, s.n_clips)):
        save_gif(s.out_dir / PREVIEWS_DIR / f"video_{i:04d}.gif", videos[i].float(), s.cfg.video.preview_fps)


def record_inputs(s: Stage5, recorder: StageRecorder) -> None:
    for name in (KEYFRAMES_FILE, "blurry_videos.safetensors"):
        recorder.add_input(s.stage3_dir / name)
    for path in s.caption_inputs:
        recorder.add_input(path)
    v = s.cfg.video
    recorder.extra.update(
        {
            "n_clips": s.n_clips,
            "caption_source": s.caption_source,
            "processes": s.accelerator.num_processes,
            "denoise_steps": s.role.strength_steps(v.steps, v.strength),
        }
    )


def generate(cfg: Stage5Config) -> Path:
    """Run stage 5; returns the stage folder."""
    seed_everything(cfg.run.seed)
    s = setup(cfg)
    acc = s.accelerator
    recorder = None
    if acc.is_main_process:
        _, recorder = begin_stage(cfg, "5", depends_on=("4", "3") if s.caption_source == "blip2" else ("3",))
        clear_outputs(s.out_dir)
        log.info("stage 5 (%s): %d clips on %d processes, %d frames at %d px, %d of %d steps (strength %.2f), "
                 "%s captions", cfg.run.mode, s.n_clips, acc.num_processes, cfg.video.num_frames,
                 cfg.video.resolution, s.role.strength_steps(cfg.video.steps, cfg.video.strength), cfg.video.steps,
                 cfg.video.strength, s.caption_source)  # fmt: skip
    acc.wait_for_everyone()  # the folder is ready before any shard is written
    generate_share(s)
    acc.wait_for_everyone()
    if recorder is not None:  # the main process, which began the stage
        videos = merge_shards(s.out_dir, acc.num_processes, s.n_clips)[0]["videos"]
        save_outputs(s, videos, recorder)
        record_inputs(s, recorder)
        recorder.finish()
        log.info("stage 5 done: %s", s.out_dir)
    acc.wait_for_everyone()
    return s.out_dir
