"""Stage 5 (video generation) on the smoke toy video role, from a hand-made stage-3 folder (keyframe = GT frame 0,
blurry video = a blurred GT clip, captions): stage order, outputs and their manifest, the real img2img strength
(defect 26) and upstream's noisy start, per-clip and upstream seeds, upstream's GIF grid, the caption fallback, time
interpolation, and 2 torchrun processes against 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.smoke_env import REPO
from utils.data_catalog import frames_file

N_CLIPS = 3
RUN = "s5"
SMALL = ("video.steps=4", "video.strength=0.5")


@pytest.fixture(scope="module")
def weights(smoke_world: Path) -> Path:
    """Smoke toy ``video`` (+ its ``vae``) weights: the repository's when up to date, else the session's build."""
    from tests.smoke_env import smoke_weights

    return smoke_weights(smoke_world, ("vae", "video"))


@pytest.fixture(scope="module")
def profile(smoke_world: Path, weights: Path, tmp_path_factory) -> Path:
    scratch = tmp_path_factory.mktemp("stage5")
    path = scratch / "stage5.yaml"
    path.write_text(
        "extends: smoke\n"
        f"paths:\n  data_root: {smoke_world}\n  weights_root: {weights}\n  exp_root: {scratch / 'EXP'}\n"
        "run:\n  device: cpu\n"
        "stage5:\n  video:\n    caption_fallback: true\n"  # no stage 4 here: stage 3's GPT-2 captions
    )
    return path


def config(profile: Path, exp: str, *overrides: str, stage: str = "5"):
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    return load_config(STAGE_CONFIGS[stage], str(profile), list(overrides), {"exp": exp, "mode": "enhance"})


def stage_dir(profile: Path, exp: str, stage: str) -> Path:
    from utils.runs import RunPaths

    return RunPaths.from_config(config(profile, exp)).stage_dir(stage)


def fake_stage3(smoke_world: Path, folder: Path) -> Path:
    """A complete stage-3 folder (manifest without dependencies): keyframes (N, 3, K, K), blurry videos
    (N, F, 3, R, R) and GPT-2-style captions for the first test clips of the smoke world."""
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.manifest import StageRecorder

    gt = torch.load(smoke_world / frames_file("test"), weights_only=True)[:N_CLIPS]  # (N, F, 3, R, R)
    res = gt.shape[-1]
    small = F.avg_pool2d(gt.flatten(0, 1), 4)  # a blurry video: 4x down, then back up
    blurry = F.interpolate(small, size=(res, res), mode="bilinear", align_corners=False).view_as(gt)
    tensors = {"keyframes": gt[:, 0].contiguous(), "blurry_videos": blurry.half().contiguous()}
    recorder = StageRecorder("3", folder, "fake").begin()
    for name, value in tensors.items():
        recorder.add_output(atomic_save_safetensors(folder / f"{name}.safetensors", {name: value}), value.shape)
    captions = [f"a red ball moves over water {i}" for i in range(N_CLIPS)]
    recorder.add_output(atomic_write_json(folder / "captions.json", {"captions": captions}), (N_CLIPS,))
    recorder.finish()
    return folder


@pytest.fixture(scope="module")
def stage3(smoke_world: Path, profile: Path) -> Path:
    return fake_stage3(smoke_world, stage_dir(profile, RUN, "3"))


def with_stage3(src: Path, profile: Path, exp: str) -> None:
    shutil.copytree(src, stage_dir(profile, exp, "3"))  # copy2 keeps the mtimes the manifest recorded


@pytest.fixture(scope="module")
def one_process(profile: Path, stage3: Path) -> Path:
    from pipeline.stage5 import generate

    return generate(config(profile, RUN, *SMALL))


def videos(folder: Path) -> torch.Tensor:
    return load_file(folder / "videos.safetensors")["videos"]


# ---- stage order ---------------------------------------------------------------------------------------------------
def test_refuses_without_stage3(profile: Path) -> None:
    from pipeline.stage5 import generate
    from utils.errors import StageOrderError

    with pytest.raises(StageOrderError, match="stage 3"):
        generate(config(profile, "no_stage3", *SMALL))
    assert not stage_dir(profile, "no_stage3", "5").exists(), "nothing is written before the check"


# ---- outputs -------------------------------------------------------------------------------------------------------
def test_outputs_have_the_recorded_shapes(profile: Path, one_process: Path) -> None:
    from utils.manifest import read_manifest, require_stage
    from utils.runs import RunPaths

    cfg = config(profile, RUN)
    v = cfg.video
    out = videos(one_process)
    assert out.shape == (N_CLIPS, v.num_frames, 3, v.resolution, v.resolution) and out.dtype == torch.float16
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    manifest = read_manifest(one_process)
    assert manifest["outputs"]["videos.safetensors"]["shape"] == list(out.shape)
    assert manifest["caption_source"] == "gpt2" and manifest["denoise_steps"] == 2
    assert any(p.endswith("stage3_enhance/captions.json") for p in manifest["inputs"])
    assert any(p.endswith("blurry_videos.safetensors") for p in manifest["inputs"])
    prompts = json.loads((one_process / "prompts.json").read_text())
    assert prompts["prompts"][0] == prompts["captions"][0] + v.prompt_suffix
    assert sorted(p.name for p in (one_process / "previews").iterdir()) == ["video_0000.gif", "video_0001.gif"]
    assert not list(one_process.glob("shard_*")), "shards are merged and removed"
    paths = RunPaths.from_config(cfg)
    require_stage("5", one_process, paths.stage_dirs(), "{stage}")


def test_two_processes_match_one(profile: Path, stage3: Path, one_process: Path) -> None:
    """torchrun with 2 CPU processes: every clip equals the 1-process run's (per-clip seeds)."""
    with_stage3(stage3, profile, "ddp2")
    args = ["--profile", str(profile), "--exp", "ddp2", "--mode", "enhance", *(f"--set={o}" for o in SMALL)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*launcher, str(REPO / "recon_video.py"), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    two = stage_dir(profile, "ddp2", "5")
    torch.testing.assert_close(videos(two).float(), videos(one_process).float(), atol=2e-3, rtol=0)
    assert json.loads((two / "manifest.json").read_text())["processes"] == 2


# ---- strength (defect 26) ------------------------------------------------------------------------------------------
def count_unet_calls(role) -> list[int]:
    calls = [0]
    role.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("steps", [5])
def test_strength_runs_its_share_of_steps_and_keeps_the_init(profile: Path, stage3: Path, steps: int) -> None:
    from pipeline.stage5 import generate_clip, interpolate_frames, setup
    from utils.resize import resize_frames_bilinear

    s = setup(config(profile, RUN, f"video.steps={steps}"))
    calls = count_unet_calls(s.role)
    v = s.cfg.video
    frames = interpolate_frames(s.blurry[:1].float(), v.num_frames)  # (1, N, 3, r, r)
    target = resize_frames_bilinear(frames, v.resolution)[0]  # (N, 3, R, R)
    dist = {}
    for strength in (0.0, 0.2, 0.6, 1.0):
        s.cfg = config(profile, RUN, f"video.steps={steps}", f"video.strength={strength}")
        calls[0] = 0
        dist[strength] = float((generate_clip(s, 0) - target).pow(2).mean())
        assert calls[0] == round(steps * strength), (strength, calls[0])
    assert max(dist[0.0], dist[0.2]) < dist[1.0], dist  # low strength stays near the blurry video


def test_img2img_start_noises_to_the_first_step_run(profile: Path, stage3: Path) -> None:
    from pipeline.stage5 import setup

    role = setup(config(profile, RUN)).role
    init, noise = torch.randn(1, 4, 6, 8, 8), torch.randn(1, 4, 6, 8, 8)
    start, first = role.img2img_start(init, noise, 10, 0.3)
    assert first == 7
    t = role.scheduler.timesteps[7:8]
    torch.testing.assert_close(start, role.scheduler.add_noise(init, noise, t))
    kept, first = role.img2img_start(init, noise, 10, 0.0)
    assert first == 10 and torch.equal(kept, init), "strength 0: the init itself, nothing to denoise"
    gaps = [float((role.img2img_start(init, noise, 10, k / 10)[0] - init).norm()) for k in range(11)]
    assert gaps == sorted(gaps) and gaps[0] == 0.0, "higher strength starts farther from the init"


# ---- conditions ----------------------------------------------------------------------------------------------------
def test_interpolation_is_upstreams_for_6_to_16_frames() -> None:
    from pipeline.stage5 import interpolate_frames

    frames = torch.rand(2, 6, 3, 4, 4)
    out = interpolate_frames(frames, 16)
    assert out.shape == (2, 16, 3, 4, 4)
    torch.testing.assert_close(out[:, ::3], frames)  # frames 0, 3, ..., 15 are the originals
    torch.testing.assert_close(out[:, 1], frames[:, 0] * 2 / 3 + frames[:, 1] / 3)
    torch.testing.assert_close(out[:, 14], frames[:, 4] / 3 + frames[:, 5] * 2 / 3)
    torch.testing.assert_close(interpolate_frames(frames, 6), frames)


# ---- upstream options (issue 15) -----------------------------------------------------------------------------------
UPSTREAM = ("video.init=noisy_start", "video.seed=zero")


def watch_starts(role) -> list[torch.Tensor]:
    """Record the noise every ``noisy_start`` call of ``role`` gets (instance attribute over the method)."""
    noises: list[torch.Tensor] = []
    inner = role.noisy_start

    def spy(init: torch.Tensor, noise: torch.Tensor, num_steps: int = 25) -> torch.Tensor:
        noises.append(noise.clone())
        return inner(init, noise, num_steps)

    role.noisy_start = spy
    return noises


def test_upstream_seed_zero_gives_every_clip_the_same_noise_and_all_steps(profile: Path, stage3: Path) -> None:
    """``video.seed=zero``: seed 0, the unused ``keylatents`` draw, then the start noise, for every clip;
    ``video.init=noisy_start`` runs all steps whatever the strength. ``per_clip`` gives clips their own noise."""
    from pipeline.stage5 import generate_clip, setup

    s = setup(config(profile, RUN, *SMALL, *UPSTREAM))
    noises, calls = watch_starts(s.role), count_unet_calls(s.role)
    for clip in (0, 1):
        generate_clip(s, clip)
    assert calls[0] == 2 * s.cfg.video.steps, "noisy_start runs every step (strength 0.5 is unused)"
    torch.testing.assert_close(noises[0], noises[1], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    torch.randn(noises[0].shape, generator=gen)  # upstream's unused keylatents
    torch.testing.assert_close(noises[0], torch.randn(noises[0].shape, generator=gen), rtol=0, atol=0)

    s.cfg = config(profile, RUN, *SMALL, "video.init=noisy_start")
    for clip in (0, 1):
        generate_clip(s, clip)
    assert not torch.equal(noises[2], noises[3]), "per_clip: every clip has its own seed"


def test_upstream_init_seed_and_gif_grid_through_the_stage(profile: Path, stage3: Path) -> None:
    """The stage entry under the upstream options: the manifest records the noisy start at the largest timestep,
    all steps and seed 0 for every clip; ``gif_grid/<clip>.gif`` holds upstream's grid (frames (R + 4) x (2R + 6):
    ``make_grid(nrow=6, padding=2)`` of one GT and one generated frame); a rerun without the grid removes it."""
    import imageio.v3 as iio

    from pipeline.stage5 import generate
    from utils.manifest import read_manifest

    exp = "s5_upstream"
    with_stage3(stage3, profile, exp)
    cfg = config(profile, exp, *SMALL, *UPSTREAM, "video.write_gif_grid=true")
    folder = generate(cfg)
    v = cfg.video
    manifest = read_manifest(folder)
    assert manifest["video_init"] == "noisy_start" and manifest["denoise_steps"] == v.steps
    assert manifest["start_timestep"] == 1000 // v.steps * (v.steps - 1) + 1, "the grid's largest timestep"
    assert manifest["seed_rule"] == "zero" and manifest["clip_seeds"] == [0] * N_CLIPS
    names = sorted(p.name for p in (folder / "gif_grid").iterdir())
    assert names == [f"{i}.gif" for i in range(N_CLIPS)], "named by clip index, no caption (defect 28)"
    assert all(f"gif_grid/{name}" in manifest["outputs"] for name in names)
    frames = iio.imread(folder / "gif_grid" / "0.gif", index=None)  # (6, H, W, 3)
    r, pad = v.resolution, 2
    assert frames.shape[:3] == (len(v.eval_frames), r + 2 * pad, 2 * r + 3 * pad)

    generate(config(profile, exp, *SMALL))
    assert not (folder / "gif_grid").exists(), "a rerun clears the grids"
    assert read_manifest(folder)["video_init"] == "img2img" and read_manifest(folder)["seed_rule"] == "per_clip"


def test_missing_stage4_without_caption_fallback_is_a_one_line_error(profile: Path, stage3: Path) -> None:
    from pipeline.stage5 import generate
    from utils.errors import StageOrderError

    exp = "s5_no_fallback"
    with_stage3(stage3, profile, exp)
    with pytest.raises(StageOrderError) as err:
        generate(config(profile, exp, *SMALL, "video.caption_fallback=false"))
    text = str(err.value)
    assert "\n" not in text and "stage 4" in text and "rerun stage 4" in text
    assert "--set video.caption_fallback=true" in text
    assert not stage_dir(profile, exp, "5").exists(), "nothing is written before the check"
