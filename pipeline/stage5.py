"""Stage 5: video generation with AnimateDiff v3 + SparseCtrl-RGB (spec §6) from stage 3's keyframe and blurry video
and a caption (stage-4 BLIP-2 or stage-3 GPT-2).

Per test clip (N = ``video.num_frames``, R = ``video.resolution``, F = stage-3 frames, s = R / VAE downsample):

1. Keyframe (3, K, K) → resized to R → VAE posterior sample → SparseCtrl condition at frame 0 (with its mask).
2. Blurry video (F, 3, r, r) → linear time interpolation to N frames (frame j sits at j·(F−1)/(N−1); for F = 6,
   N = 16 this is upstream's 0.67/0.33 blends) → resized to R → VAE posterior sample → init latents (1, C, N, s, s).
3. ``video.init=img2img`` (default, fixes defect 26): a real img2img start: of the ``steps`` DDIM timesteps the last
   round(steps·strength) run, from the init latents noised to exactly the first of them (``VideoRole.img2img_start``).
   ``video.init=noisy_start`` (upstream's ``low_strength=0.3``): the init latents noised at the grid's largest
   timestep (t = 961 of 25) and all ``steps`` run (``VideoRole.noisy_start``); ``strength`` is unused.
   ``video.init=noise`` (the ablation without the blurry video, ``bench/ablations.py``): the start noise itself, all
   ``steps`` run; the blurry video is not used (its VAE sample is still drawn, so the noise equals img2img's).
4. Prompt = caption + ``prompt_suffix``, negative prompt from the config, CFG ``guidance``, SparseCtrl
   ``controlnet_scale``; frames decoded one by one → (N, 3, R, R) in [0, 1].

``video.seed=per_clip`` (default): every clip has its own generator seeded ``clip_seed(run.seed, clip)``, drawn in a
fixed order (keyframe sample, init sample, start noise). ``video.seed=zero``: upstream's order with seed 0
(:func:`draw_upstream`). Either way a clip's video does not depend on which process made it. The manifest records
``video_init``, ``start_timestep``, ``denoise_steps``, ``seed_rule`` and ``clip_seeds``.
``video.write_gif_grid``: each process also writes upstream's GIF grid of its clips, ``gif_grid/<clip>.gif``
(:func:`utils.gif_grid.write_upstream_gif`: GT frames beside generated frames ``eval_frames``, 8 fps).
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
from pipeline.common import load_data, require_foundation
from utils.cli import begin_stage
from utils.data import BrainVideoData
from utils.errors import ConfigError, StageOrderError
from utils.gif_grid import GIF_GRID_DIR, gif_grid_path, write_upstream_gif
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
    data: BrainVideoData | None = None  # the GT test frames of the GIF grids (video.write_gif_grid only)

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
UPSTREAM_SEED = 0  # upstream's torch.manual_seed(0) before every clip's pipeline call (spec §6 step 4)


def clip_seed_of(cfg: Stage5Config, clip: int) -> int:
    """The seed of test clip ``clip``'s generator under ``video.seed``."""
    return UPSTREAM_SEED if cfg.video.seed == "zero" else clip_seed(cfg.run.seed, clip)


def draw_per_clip(s: Stage5, key: torch.Tensor, blurry: torch.Tensor, clip: int) -> tuple[torch.Tensor, ...]:
    """``video.seed=per_clip``: one generator seeded ``clip_seed(run.seed, clip)``, drawn in the order keyframe
    sample, init sample, start noise. ``key (1, 3, R, R)``, ``blurry (1, N, 3, R, R)`` → ``(key latents (1, C, s, s),
    init (1, C, N, s, s), noise (1, C, N, s, s))``."""
    gen = torch.Generator(device="cpu").manual_seed(clip_seed_of(s.cfg, clip))
    key_latents = s.role.encode_frames(key, generator=gen)  # (1, C, s, s)
    init = s.role.encode_frames(blurry, generator=gen).permute(0, 2, 1, 3, 4)  # (1, C, N, s, s)
    noise = torch.randn(init.shape, generator=gen, dtype=torch.float32)  # (1, C, N, s, s)
    return key_latents, init, noise


def draw_upstream(s: Stage5, key: torch.Tensor, blurry: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``video.seed=zero``, upstream's order (spec §6 steps 2-5, ``pipeline_neuroclips.py``) on one CPU generator:
    the state the previous clip left (seed 0, then that pipeline call's two draws of a latent video: the unused
    ``keylatents`` and the start noise), the blurry-video (init) sample, the keyframe sample; then the reseed to 0,
    the unused ``keylatents`` draw and the start noise. Every clip gets the state upstream's second and later clips
    of a process had; upstream's first clip per process drew its VAE samples from whatever global state model loading
    left, and upstream drew on the GPU's generator, so values match upstream's only in law. Shapes as
    :func:`draw_per_clip`."""
    role, v = s.role, s.cfg.video
    side = v.resolution // role.downsample
    shape = (1, role.latent_channels, v.num_frames, side, side)
    gen = torch.Generator(device="cpu").manual_seed(UPSTREAM_SEED)
    for _ in range(2):  # the previous clip's pipeline call: keylatents, then the start noise
        torch.randn(shape, generator=gen, dtype=torch.float32)
    init = role.encode_frames(blurry, generator=gen).permute(0, 2, 1, 3, 4)  # (1, C, N, s, s)
    key_latents = role.encode_frames(key, generator=gen)  # (1, C, s, s)
    gen.manual_seed(UPSTREAM_SEED)
    torch.randn(shape, generator=gen, dtype=torch.float32)  # the unused keylatents
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)  # (1, C, N, s, s)
    return key_latents, init, noise


def start_latents(s: Stage5, init: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The denoising start under ``video.init`` and the index of the first DDIM step to run (``steps``: none).
    ``(1, C, N, s, s)`` → same."""
    v = s.cfg.video
    if v.init == "noisy_start":  # upstream (defect 26): noised at the largest timestep, all steps run
        return s.role.noisy_start(init, noise, v.steps), 0
    if v.init == "noise":  # no init video: DDIM starts from N(0, I) (its init_noise_sigma is 1)
        return noise.to(s.role.device) * s.role.scheduler.init_noise_sigma, 0
    return s.role.img2img_start(init, noise, v.steps, v.strength)


def steps_run(cfg: Stage5Config, role: Any) -> int:
    """How many DDIM steps every clip runs."""
    v = cfg.video
    return v.steps if v.init in ("noisy_start", "noise") else role.strength_steps(v.steps, v.strength)


def start_timestep(cfg: Stage5Config, role: Any) -> int | None:
    """The DDIM timestep the init latents are noised to (None: nothing is denoised)."""
    v, n = cfg.video, steps_run(cfg, role)
    if n == 0:
        return None
    role.scheduler.set_timesteps(v.steps)
    return int(role.scheduler.timesteps[v.steps - n])


@torch.no_grad()
def generate_clip(s: Stage5, clip: int) -> torch.Tensor:
    """Steps 1–4 of the module docstring for test clip ``clip`` → ``(N, 3, R, R)`` float32 in [0, 1] (CPU)."""
    v, role = s.cfg.video, s.role
    key = resize_frames_bilinear(s.keyframes[clip : clip + 1], v.resolution)  # (1, 3, R, R)
    frames = interpolate_frames(s.blurry[clip : clip + 1].float(), v.num_frames)  # (1, N, 3, r, r)
    blurry = resize_frames_bilinear(frames, v.resolution)  # (1, N, 3, R, R)
    if v.seed == "zero":
        key_latents, init, noise = draw_upstream(s, key, blurry)
    else:
        key_latents, init, noise = draw_per_clip(s, key, blurry, clip)
    cond, mask = role.keyframe_condition(key_latents, v.num_frames)  # (1, C, N, s, s), (1, 1, N, s, s)
    start, first = start_latents(s, init, noise)
    if first < v.steps:
        pos = role.encode_prompt([prompt_of(s.cfg, s.captions[clip])])  # (1, L, D)
        neg = role.encode_prompt([v.negative_prompt])
        start = role.denoise(start, pos, neg, cond, mask, v.steps, v.guidance, v.controlnet_scale, start_step=first)
    return role.decode_latents(start)[0].cpu()  # (N, 3, R, R)


def write_gif_grid(s: Stage5, clip: int, video: torch.Tensor) -> Path:
    """Upstream's GIF of test clip ``clip`` (spec §6 step 6): GT frames beside generated frames ``eval_frames`` of
    ``video (N, 3, R, R)`` in [0, 1], at ``gif_grid/<clip>.gif`` (no caption in the name: defect 28)."""
    assert s.data is not None, "setup loads the data when video.write_gif_grid is set"
    gt = s.data.frames("test", [clip])[0].float()  # (F, 3, H, W)
    path = gif_grid_path(s.out_dir, clip)
    write_upstream_gif(path, gt, video[list(s.cfg.video.eval_frames)])
    return path


def generate_share(s: Stage5) -> Path:
    """Generate this process's clips (and their GIF grids) and write its shard file; returns its path."""
    acc, v = s.accelerator, s.cfg.video
    clips = my_clips(s.n_clips, acc.process_index, acc.num_processes)
    videos = torch.empty((len(clips), v.num_frames, 3, v.resolution, v.resolution), dtype=OUTPUT_DTYPE)
    t0 = time.time()
    for i, clip in enumerate(clips):
        video = generate_clip(s, clip)  # (N, 3, R, R) float32
        videos[i] = video.to(OUTPUT_DTYPE)
        if v.write_gif_grid:  # from the float32 video, as upstream wrote its sample
            write_gif_grid(s, clip, video)
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


def load_gif_data(cfg: Stage5Config) -> BrainVideoData:
    """The dataset whose test frames fill the GT half of the GIF grids; its clip length must match eval_frames."""
    data = load_data(cfg, ("frames",))
    if len(cfg.video.eval_frames) != data.n_frames:
        raise ConfigError(
            f"video.write_gif_grid puts {len(cfg.video.eval_frames)} generated frames (video.eval_frames) beside "
            f"the dataset's {data.n_frames} GT frames",
            "set video.eval_frames to as many frames as the dataset's clips hold",
        )
    return data


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
    data = load_gif_data(cfg) if v.write_gif_grid else None
    return Stage5(cfg, role, accelerator, out_dir, stage3_dir, keyframes[:n], blurry[:n], captions[:n], source,
                  caption_files, data)  # fmt: skip


# ---- outputs -------------------------------------------------------------------------------------------------------
def clear_outputs(out_dir: Path) -> None:
    """Remove the files a previous run of this stage wrote (only the names this stage writes)."""
    for path in (out_dir / VIDEOS_FILE, out_dir / PROMPTS_FILE):
        path.unlink(missing_ok=True)
    remove_shards(out_dir)
    shutil.rmtree(out_dir / PREVIEWS_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / GIF_GRID_DIR, ignore_errors=True)


def save_outputs(s: Stage5, videos: torch.Tensor, recorder: StageRecorder) -> None:
    meta = {"stage": "5", "mode": s.cfg.run.mode, "subj": str(s.cfg.run.subject), "caption_source": s.caption_source}
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
    if s.cfg.video.write_gif_grid:
        for clip in range(s.n_clips):
            recorder.add_output(gif_grid_path(s.out_dir, clip))


def record_inputs(s: Stage5, recorder: StageRecorder) -> None:
    for name in (KEYFRAMES_FILE, "blurry_videos.safetensors"):
        recorder.add_input(s.stage3_dir / name)
    for path in s.caption_inputs:
        recorder.add_input(path)
    if s.data is not None:  # the GT frames of the GIF grids
        recorder.add_inputs(s.data.opened_files)
    v = s.cfg.video
    recorder.extra.update(
        {
            "n_clips": s.n_clips,
            "caption_source": s.caption_source,
            "processes": s.accelerator.num_processes,
            "denoise_steps": steps_run(s.cfg, s.role),
            "video_init": v.init,  # defect 26: img2img | noisy_start (upstream) | noise (no blurry video)
            "start_timestep": start_timestep(s.cfg, s.role),
            "seed_rule": v.seed,  # per_clip: clip_seed(run.seed, clip) | zero: upstream's manual_seed(0)
            "clip_seeds": [clip_seed_of(s.cfg, clip) for clip in range(s.n_clips)],
            "caption_fallback": v.caption_fallback,
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
        log.info("stage 5 (%s): %d clips on %d processes, %d frames at %d px, %d of %d steps (init %s, strength "
                 "%.2f, seed %s), %s captions", cfg.run.mode, s.n_clips, acc.num_processes, cfg.video.num_frames,
                 cfg.video.resolution, steps_run(cfg, s.role), cfg.video.steps, cfg.video.init, cfg.video.strength,
                 cfg.video.seed, s.caption_source)  # fmt: skip
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
