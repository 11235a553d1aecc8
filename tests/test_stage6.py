"""Stage 6 (metrics) on a hand-made stage-3 and stage-5 folder of the smoke world, scored with the smoke toy metric
roles (frame_classifier, video_classifier, clip_pcc, built here, 1 thread): stage order, the metrics JSON and the
manifest, protocol-dependent SSIM, and a perfect prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from utils.data_catalog import frames_file

N_CLIPS = 5
RES5 = 24  # stage-5 resolution, different from the smoke world's: the ground truth must be resized
FAST = ("eval.bootstrap=10",)
EXPECTED = {
    "video_2way", "video_50way", "frame_2way", "frame_50way", "clip_pcc", "ssim", "psnr", "blurry_video_ssim",
    "concept_f1_micro", "concept_f1_macro", "key_object_dice", "caption_bleu4",
}  # fmt: skip


@pytest.fixture(scope="module")
def profile(smoke_world: Path, metric_weights: Path, tmp_path_factory) -> Path:
    scratch = tmp_path_factory.mktemp("stage6")
    weights = metric_weights
    path = scratch / "stage6.yaml"
    path.write_text(
        "extends: smoke\n"
        f"paths:\n  data_root: {smoke_world}\n  weights_root: {weights}\n  exp_root: {scratch / 'EXP'}\n"
        "run:\n  device: cpu\n"
    )
    return path


def config(profile: Path, exp: str, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import Stage6Config

    return load_config(Stage6Config, str(profile), [*FAST, *overrides], {"exp": exp, "mode": "enhance"})


def paths_of(profile: Path, exp: str):
    from utils.runs import RunPaths

    return RunPaths.from_config(config(profile, exp))


def gt_clips(smoke_world: Path) -> torch.Tensor:
    return torch.load(smoke_world / frames_file("test"), weights_only=True)[:N_CLIPS]  # (N, F, 3, R, R)


def fake_stage3(smoke_world: Path, folder: Path) -> None:
    """blurry videos (N, F, 3, R, R), mask probabilities (N, F, S, S), concept probabilities (N, C), captions."""
    from utils.data import BrainVideoData
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.manifest import StageRecorder

    data = BrainVideoData(smoke_world, 1)
    gt = gt_clips(smoke_world)
    res = gt.shape[-1]
    blurry = F.interpolate(F.avg_pool2d(gt.flatten(0, 1), 4), size=(res, res), mode="bilinear").view_as(gt)
    masks = F.avg_pool2d(data.key_object_masks("test", range(N_CLIPS)), 2)  # (N, F, R/2, R/2)
    labels = data.concept_labels("test")[:N_CLIPS]
    gen = torch.Generator().manual_seed(0)
    concept_probs = (0.6 * labels + 0.5 * torch.rand(labels.shape, generator=gen)).clamp(0, 1)
    tensors = {"blurry_videos": blurry.half(), "masks": masks.half(), "concept_probs": concept_probs}
    recorder = StageRecorder("3", folder, "fake").begin()
    for name, value in tensors.items():
        recorder.add_output(atomic_save_safetensors(folder / f"{name}.safetensors", {name: value.contiguous()}))
    captions = [str(c) for c in data.captions("test")[:N_CLIPS]]
    captions[0] = "a red ball moves over water"
    recorder.add_output(atomic_write_json(folder / "captions.json", {"captions": captions}))
    recorder.extra["n_clips"] = N_CLIPS
    recorder.finish()


def fake_stage5(smoke_world: Path, folder: Path, stage3: Path, perfect: bool, gif_grid: bool = False) -> None:
    """Videos (N, F + 2, 3, RES5, RES5) whose frames 1..F are the GT (perfect) or a noisy GT at RES5; with
    ``gif_grid`` also upstream's GIF grid of every clip (as stage 5's video.write_gif_grid writes them)."""
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.manifest import StageRecorder
    from utils.resize import resize_frames_bilinear

    gt = resize_frames_bilinear(gt_clips(smoke_world), RES5)
    n, f = gt.shape[:2]
    eval_frames = list(range(1, f + 1))
    gen = torch.Generator().manual_seed(1)
    pred = gt if perfect else (gt + 0.15 * torch.randn(gt.shape, generator=gen)).clamp(0, 1)
    videos = torch.rand(n, f + 2, 3, RES5, RES5, generator=gen)
    videos[:, eval_frames] = pred
    config = {
        "video": {"eval_frames": eval_frames, "num_frames": f + 2, "resolution": RES5, "write_gif_grid": gif_grid}
    }
    recorder = StageRecorder("5", folder, "fake", config, depends_on=("3",)).begin()
    if gif_grid:
        from utils.gif_grid import gif_grid_path, write_upstream_gif

        for clip in range(n):
            write_upstream_gif(gif_grid_path(folder, clip), gt_clips(smoke_world)[clip], videos[clip, eval_frames])
            recorder.add_output(gif_grid_path(folder, clip))
    recorder.add_output(atomic_save_safetensors(folder / "videos.safetensors", {"videos": videos}))
    captions = json.loads((stage3 / "captions.json").read_text())["captions"]
    prompts = {"caption_source": "gpt2", "captions": captions, "prompts": captions, "negative_prompt": ""}
    recorder.add_output(atomic_write_json(folder / "prompts.json", prompts))
    recorder.add_input(stage3 / "captions.json")
    recorder.extra["n_clips"] = n
    recorder.finish()


def make_run(smoke_world: Path, profile: Path, exp: str, perfect: bool = False, gif_grid: bool = False) -> None:
    paths = paths_of(profile, exp)
    fake_stage3(smoke_world, paths.stage_dir("3"))
    fake_stage5(smoke_world, paths.stage_dir("5"), paths.stage_dir("3"), perfect, gif_grid)


def run6(profile: Path, exp: str, *overrides: str) -> dict:
    from pipeline.stage6 import evaluate

    return json.loads(evaluate(config(profile, exp, *overrides)).read_text())


@pytest.fixture(scope="module")
def noisy(smoke_world: Path, profile: Path) -> dict[str, dict]:
    """The same noisy run scored under both protocols."""
    make_run(smoke_world, profile, "noisy")
    neurons = run6(profile, "noisy", "eval.protocol=neurons")
    return {"neurons": neurons, "standard": run6(profile, "noisy")}  # standard last: its files stay on disk


# ---- stage order ---------------------------------------------------------------------------------------------------
def test_refuses_without_stage5(smoke_world: Path, profile: Path) -> None:
    from pipeline.stage6 import evaluate
    from utils.errors import StageOrderError

    paths = paths_of(profile, "no_stage5")
    fake_stage3(smoke_world, paths.stage_dir("3"))
    with pytest.raises(StageOrderError, match="stage 5"):
        evaluate(config(profile, "no_stage5"))
    assert not paths.stage_dir("6").exists() and not paths.metrics_file.exists(), "nothing written before the check"


# ---- the metrics file ----------------------------------------------------------------------------------------------
def test_metrics_json_has_every_metric(profile: Path, noisy: dict[str, dict]) -> None:
    from utils.config import config_hash
    from utils.manifest import read_manifest, require_stage

    report = noisy["standard"]
    assert set(report["metrics"]) == EXPECTED
    for name, m in report["metrics"].items():
        assert set(m) >= {"mean", "std", "n", "ci95"} and m["n"] == N_CLIPS, name
        assert isinstance(m["mean"], float) and isinstance(m["std"], float), (name, m)
        lo, hi = m["ci95"]  # eval.bootstrap=10 resamples of the 5 clips
        assert lo <= m["mean"] <= hi, (name, m)
        if "chance" in m:  # N-way: above chance exactly when the interval's lower bound is
            assert m["above_chance"] is (lo > m["chance"]), (name, m)
            assert 0 <= m["chance_shuffled"] <= 1 and m["above_shuffled"] is (m["ci95_vs_shuffled"][0] > 0), (name, m)
        else:
            assert "above_chance" not in m, name
    assert report["metrics"]["ssim"]["ci95"][0] < report["metrics"]["ssim"]["ci95"][1], "a spread, not a point"
    assert report["protocol"] == "standard" and report["caption_source"] == "gpt2"
    assert report["config_hash"] == config_hash(config(profile, "noisy"))
    assert report["chance_levels"]["video"] == {"2-way": 0.75, "50-way": pytest.approx(3 / 52)}
    assert report["metrics"]["video_2way"]["chance"] == 0.75
    assert report["eval_frames"] == [1, 2, 3, 4, 5, 6] and report["resolution"] == RES5
    assert all(Path(p).exists() for p in report["inputs"].values())
    assert 0 <= report["metrics"]["key_object_dice"]["mean"] <= 1
    assert report["metrics"]["ssim"]["mean"] < 0.99
    paths = paths_of(profile, "noisy")
    manifest = read_manifest(paths.stage_dir("6"))
    assert manifest["depends_on"] == ["5", "3"]
    assert str(paths.metrics_file.resolve()) in manifest["outputs"]
    require_stage("6", paths.stage_dir("6"), paths.stage_dirs(), "{stage}")


def test_protocols_differ_in_ssim_only_in_definition(noisy: dict[str, dict]) -> None:
    s, n = noisy["standard"]["metrics"], noisy["neurons"]["metrics"]
    assert noisy["neurons"]["protocol"] == "neurons"
    for report in noisy.values():  # both protocols in every file; the headline's mirrored at the top level
        assert set(report["protocols"]) == {"standard", "neurons"}
        assert report["metrics"] == report["protocols"][report["protocol"]]["metrics"]
        assert report["protocols"]["neurons"]["inputs"].startswith("stage-5 videos"), "no GIF grids: the tensors"
    assert noisy["standard"]["protocols"] == noisy["neurons"]["protocols"], "eval.protocol only picks the headline"
    assert abs(s["ssim"]["mean"] - n["ssim"]["mean"]) > 1e-4, "neurons SSIM is per-column 1-D, standard is 2-D"
    assert s["concept_f1_micro"] == n["concept_f1_micro"] and s["key_object_dice"] == n["key_object_dice"]
    assert s["video_2way"]["mean"] == n["video_2way"]["mean"], "N-way means agree; only the ± differs"


def skimage_on_gifs(folder: Path) -> tuple[float, float]:
    """(SSIM, PSNR) as upstream's run_metrics.py computes them from the GIFs (spec §7): imageio.v3 read, halves split
    along the width, skimage per clip and frame index, mean over clips per frame index, then over frame indices."""
    import imageio.v3 as iio
    import numpy as np
    from skimage.color import rgb2gray
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    videos = [iio.imread(folder / f"{clip}.gif") for clip in range(N_CLIPS)]
    half = videos[0].shape[2] // 2
    ssim_f, psnr_f = [], []
    for f in range(videos[0].shape[0]):
        gts, preds = [v[f, :, :half] for v in videos], [v[f, :, half:] for v in videos]
        ssim_f.append(np.mean([
            structural_similarity(rgb2gray(g), rgb2gray(p), channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0)
            for g, p in zip(gts, preds, strict=True)
        ]))  # fmt: skip
        psnr_f.append(
            np.mean([peak_signal_noise_ratio(p, g, data_range=255) for g, p in zip(gts, preds, strict=True)])
        )
    return float(np.mean(ssim_f)), float(np.mean(psnr_f))


def test_neurons_protocol_scores_the_gif_grids(smoke_world: Path, profile: Path, noisy: dict[str, dict]) -> None:
    """Stage 5's upstream GIF grids: the neurons protocol scores their halves (SSIM and PSNR equal skimage's on the
    GIFs), the standard protocol still the tensors; eval.image_backend=pil runs the PIL processors."""
    from utils.gif_grid import GIF_GRID_DIR

    make_run(smoke_world, profile, "gif", gif_grid=True)
    report = run6(profile, "gif", "eval.protocol=neurons", "eval.image_backend=pil")
    neurons, standard = report["protocols"]["neurons"], report["protocols"]["standard"]
    assert neurons["inputs"].startswith("the halves of stage 5's upstream GIF grids")
    assert standard["inputs"].startswith("stage-5 videos")
    assert standard["metrics"]["ssim"] == noisy["standard"]["metrics"]["ssim"], "standard: the same tensors"
    pcc = lambda r: r["metrics"]["clip_pcc"]["mean"]  # noqa: E731
    assert pcc(standard) != pcc(noisy["standard"]), "the same tensors through the PIL processors (image_backend)"
    assert report["inputs"]["gif_grid"].endswith(GIF_GRID_DIR) and report["preprocessing"]["image_backend"] == "pil"
    ssim, psnr = skimage_on_gifs(Path(report["inputs"]["gif_grid"]))
    assert neurons["metrics"]["ssim"]["mean"] == pytest.approx(ssim, abs=1e-12)
    assert neurons["metrics"]["psnr"]["mean"] == pytest.approx(psnr, abs=1e-9)
    assert neurons["metrics"]["ssim"]["mean"] != noisy["neurons"]["metrics"]["ssim"]["mean"], "the GIFs, not tensors"
    assert set(neurons["metrics"]) == EXPECTED and report["metrics"] == neurons["metrics"]


def test_perfect_prediction(smoke_world: Path, profile: Path) -> None:
    make_run(smoke_world, profile, "perfect", perfect=True)
    m = run6(profile, "perfect")["metrics"]
    assert m["ssim"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert m["psnr"]["mean"] is None, "identical frames: PSNR = inf, written as null (strict JSON)"
    assert m["psnr"]["ci95"] is None, "no interval of an infinite mean"
    assert m["video_2way"]["mean"] == 1.0 and m["video_50way"]["mean"] == 1.0
    assert m["frame_2way"]["mean"] == 1.0
    assert m["video_2way"]["ci95"] == [1.0, 1.0] and m["video_2way"]["above_chance"] is True


def test_no_bootstrap_no_interval(smoke_world: Path, profile: Path) -> None:
    """eval.bootstrap=0: every ci95 null, no metric claimed above chance, corpus std null."""
    make_run(smoke_world, profile, "noboot", perfect=True)
    m = run6(profile, "noboot", "eval.bootstrap=0")["metrics"]
    assert all(e["ci95"] is None for e in m.values())
    assert m["video_2way"]["mean"] == 1.0 and m["video_2way"]["above_chance"] is False
    assert m["caption_bleu4"]["std"] is None and m["concept_f1_micro"]["std"] is None


def test_report_written_beside_the_metrics(profile: Path, noisy: dict[str, dict]) -> None:
    """Stage 6 writes <run>/report.html (named in its manifest, not among its outputs: stage e rewrites it)."""
    from pipeline.report import report_path
    from utils.manifest import read_manifest

    paths = paths_of(profile, "noisy")
    report = report_path(paths)
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>") and "ours (enhance, subj 1, neurons)" in text
    assert f"{noisy['standard']['metrics']['video_2way']['mean']:.3f}" in text
    manifest = read_manifest(paths.stage_dir("6"))
    assert manifest["report"] == str(report.resolve()) and str(report.resolve()) not in manifest["outputs"]


def test_videos_are_streamed_a_few_clips_at_a_time(
    smoke_world: Path, profile: Path, noisy: dict[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 6 reads the stage-5 and blurry videos at most ``eval.batch_size`` clips at a time (issue 19: every
    video at once is 7.5 GB at paper scale), and the streamed metrics are those of the whole tensors: SSIM and PSNR
    recomputed here on every clip at once, every other metric equal to the run with the default batch size."""
    from safetensors.torch import load_file

    from pipeline import stage6
    from utils.metrics import psnr, ssim
    from utils.resize import resize_frames_bilinear

    reads: list[tuple[str, int]] = []
    real = stage6.tensor_rows

    def spy(path: Path, key: str):
        shape, read = real(path, key)
        return shape, lambda rows: (reads.append((key, len(rows))), read(rows))[1]

    monkeypatch.setattr(stage6, "tensor_rows", spy)
    small = run6(profile, "noisy", "eval.batch_size=2")["protocols"]["standard"]["metrics"]
    assert {k for k, _ in reads} == {"videos", "blurry_videos"} and max(n for _, n in reads) == 2
    full = noisy["standard"]["protocols"]["standard"]["metrics"]
    assert {k: v["mean"] for k, v in small.items()} == pytest.approx({k: v["mean"] for k, v in full.items()})
    run = paths_of(profile, "noisy")
    pred = load_file(run.stage_dir("5") / "videos.safetensors")["videos"][:, 1:-1].float().clamp(0, 1)
    gt = resize_frames_bilinear(gt_clips(smoke_world), RES5)
    assert small["ssim"]["mean"] == pytest.approx(float(ssim(pred, gt).mean(1).mean()))
    assert small["psnr"]["mean"] == pytest.approx(float(psnr(pred, gt).mean(1).mean()))
