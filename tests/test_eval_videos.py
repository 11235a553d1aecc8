"""``eval_metrics.py --videos DIR --layout ...`` (pipeline/score_videos.py): a folder of videos that this project did
not make, scored under both protocols against the smoke world's test clips with the smoke toy metric roles (built here,
1 thread, as in tests/test_stage6.py).

The central check: a folder of upstream-layout GIF grids written from some videos scores as those videos do from a
tensor file. ``neurons`` is equal to the last digit (both layouts score the same GIF grid: read from the folder, or
made in memory by the same writer and reader). ``standard`` scores the prediction cut out of the grid, which the GIF
quantised (truncation to uint8, then Pillow's 256-colour palette), against the float tensors; the tolerances below
bound what that quantisation changes, and the test measures the quantisation itself first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

N_CLIPS = 5
RES = 24  # the videos' resolution, not the smoke world's: the ground truth is resized
CAPTION = "a-red-ball-rolls-over-water,-8k-uhd,-dslr"  # upstream's names: <idx>-<prompt words joined by '-'>.gif
# |standard(GIF) - standard(tensor)|, the GIF quantisation's effect. The prediction cut out of a grid differs from the
# float video by truncation to uint8 and the 256-colour palette of each GIF frame (shared by GT and prediction): here
# a mean of 1.7 / 255 and up to 39 / 255 on rare colours (measured in the test). PSNR gets a bound computed from the
# measured error (|RMSE_gif - RMSE| <= RMS error, frame by frame); the others are empirical, about 3x what this
# quantisation moved them by (SSIM 0.006, CLIP-pcc 0.004, N-way 0.002): SSIM and CLIP-pcc follow the mean pixel error,
# and the seeded N-way trials are the same trials, flipping only where quantised frames reorder a classifier's top
# classes (one video-level trial = 1 / (5 clips x 50 trials) = 0.004).
# the toy video classifier reads frame differences (fixed motion filters), which the GIF quantisation perturbs more
# than single frames: its N-way scores moved by up to 0.024 (measured), the frame classifier's by under 0.01
TOLERANCE = {"ssim": 0.02, "clip_pcc": 0.01, "video_2way": 0.04, "video_50way": 0.04, "frame_2way": 0.01,
             "frame_50way": 0.01}  # fmt: skip
VIDEO_METRICS = {*TOLERANCE, "psnr"}


@pytest.fixture(scope="module")
def profile(smoke_world: Path, metric_weights: Path, tmp_path_factory) -> Path:
    scratch = tmp_path_factory.mktemp("eval_videos")
    weights = metric_weights
    path = scratch / "videos.yaml"
    path.write_text(
        "extends: smoke\n"
        f"paths:\n  data_root: {smoke_world}\n  weights_root: {weights}\n  exp_root: {scratch / 'EXP'}\n"
        "run:\n  device: cpu\nstage6:\n  eval:\n    report_samples: 2\n"
    )
    return path


def clips_and_videos(smoke_world: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset's first test clips (N, F, 3, R, R) and predictions of them (N, F, 3, RES, RES) in [0, 1] that
    resemble a generator's: shifted by 2 px, lower contrast, smooth colour errors (3 x 3 noise, bicubic upsampled)."""
    from utils.data import BrainVideoData
    from utils.resize import resize_frames_bilinear

    gt = BrainVideoData(smoke_world, 1).frames("test", range(N_CLIPS))
    gen = torch.Generator().manual_seed(1)
    pred = resize_frames_bilinear(gt, RES)
    smooth = torch.randn(N_CLIPS * pred.shape[1], 3, 3, 3, generator=gen)
    smooth = torch.nn.functional.interpolate(smooth, size=(RES, RES), mode="bicubic").view_as(pred)
    return gt, (0.8 * pred.roll(2, dims=-1) + 0.1 + 0.1 * smooth).clamp(0, 1)


def write_gif_folder(folder: Path, gt: torch.Tensor, pred: torch.Tensor, clips=range(N_CLIPS)) -> Path:
    """Upstream's stage-5 output folder: one grid per clip, named by index and prompt, and its config.yaml."""
    from utils.gif_grid import write_upstream_gif

    for i in clips:
        write_upstream_gif(folder / f"{i}-{CAPTION}.gif", gt[i], pred[i])
    (folder / "config.yaml").write_text("upstream: config dump, not a video\n")
    return folder


@pytest.fixture(scope="module")
def folders(smoke_world: Path, tmp_path_factory) -> dict[str, Path]:
    gt, pred = clips_and_videos(smoke_world)
    root = tmp_path_factory.mktemp("folders")
    (root / "tensor").mkdir()
    torch.save(pred, root / "tensor" / "videos.pt")
    (root / "gif").mkdir()
    write_gif_folder(root / "gif", gt, pred)
    return {"tensor": root / "tensor", "gif": root / "gif"}


def cli(profile: Path, *args: str) -> int:
    from eval_metrics import cli as eval_cli

    return eval_cli(["--profile", str(profile), "--subj", "1", "--set", "eval.n_trials=50", *args])


def score(profile: Path, folder: Path, layout: str, *args: str) -> dict:
    assert cli(profile, "--videos", str(folder), "--layout", layout, *args) == 0
    return json.loads((folder / "video_metrics.json").read_text())


@pytest.fixture(scope="module")
def scored(profile: Path, folders: dict[str, Path]) -> dict[str, dict]:
    tensor = score(profile, folders["tensor"], "tensor")
    return {"tensor": tensor, "gif": score(profile, folders["gif"], "upstream-gif")}


def read(folder: Path, layout: str, *frames: int):
    from pipeline.score_videos import FolderRequest, read_folder

    return read_folder(FolderRequest(folder, layout, frames=frames or None), 6)


# ---- the GIF folder against its tensors ----------------------------------------------------------------------------
def psnr_bound(pred: torch.Tensor, quantised: torch.Tensor, gt: torch.Tensor) -> float:
    """The largest change of the mean per-frame PSNR that replacing ``pred`` by ``quantised`` can make: per frame,
    |RMSE(q, gt) - RMSE(p, gt)| <= RMSE(q, p) (triangle inequality)."""
    rmse = lambda a, b: (a - b).pow(2).flatten(2).mean(dim=2).sqrt()  # noqa: E731  (N, F)
    e, d = rmse(pred, gt), rmse(quantised, pred)
    return float((20 * torch.log10((e + d) / (e - d).clamp_min(1e-12))).mean())


def test_gif_folder_scores_as_its_tensors(smoke_world: Path, folders: dict[str, Path], scored: dict[str, dict]):
    from utils.metrics import evaluate_videos
    from utils.resize import resize_frames_bilinear

    gt, pred = clips_and_videos(smoke_world)
    gt = resize_frames_bilinear(gt, RES)
    videos, gif_gt = read(folders["gif"], "upstream-gif")
    assert videos.pred.dtype == torch.uint8 and videos.pred.shape == pred.shape and gif_gt is not None
    quantised = videos.pred.float() / 255
    q = (quantised - pred).abs()  # the GIF quantisation of the predictions
    assert 0 < q.mean() < 3 / 255 and q.max() < 0.25, (float(q.mean()) * 255, float(q.max()) * 255)

    gif, tensor = scored["gif"]["protocols"], scored["tensor"]["protocols"]
    assert set(gif["standard"]["metrics"]) == set(gif["neurons"]["metrics"]) == VIDEO_METRICS
    assert gif["neurons"]["metrics"] == tensor["neurons"]["metrics"], "the same grids: read, or made in memory"
    standard = {k: v["mean"] for k, v in gif["standard"]["metrics"].items()}
    exact = evaluate_videos(videos.pred, gt, protocol="standard")  # the grid's prediction image, nothing else
    assert standard["ssim"] == exact["ssim"]["mean"] and standard["psnr"] == exact["psnr"]["mean"]
    for name, tol in {**TOLERANCE, "psnr": psnr_bound(pred, quantised, gt)}.items():
        a, b = standard[name], tensor["standard"]["metrics"][name]["mean"]
        assert abs(a - b) <= tol, (name, a, b, tol)
    assert standard["ssim"] != tensor["standard"]["metrics"]["ssim"]["mean"], "quantised, not the tensors"
    assert abs(standard["psnr"] - gif["neurons"]["metrics"]["psnr"]["mean"]) > 0.1, "neurons: the padded halves"
    assert gif["neurons"]["inputs"].startswith("the halves of the folder's upstream GIF grids")
    assert tensor["neurons"]["inputs"].startswith("the halves of the upstream GIF grid of the dataset clip")


def test_metrics_file_and_report(folders: dict[str, Path], scored: dict[str, dict]) -> None:
    record = scored["gif"]
    assert record["layout"] == "upstream-gif" and record["n_clips"] == N_CLIPS and record["resolution"] == RES
    assert record["files"] == [f"{i}-{CAPTION}.gif" for i in range(N_CLIPS)], "config.yaml is not a video"
    assert record["metrics"] == record["protocols"]["standard"]["metrics"], "the headline eval.protocol"
    assert record["gt_check"]["max_mean_abs_diff"] < record["gt_check"]["tolerance"]
    assert record["chance_levels"]["video"]["2-way"] == 0.75 and "key_object_dice" in record["not_scored"]
    assert scored["tensor"]["files"] == ["videos.pt"] and scored["tensor"]["gt_check"] is None
    page = (folders["gif"] / "video_report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/gif;base64,") == 2
    assert f"{record['protocols']['neurons']['metrics']['ssim']['mean']:.3f}" in page


def test_never_overwrites_silently(profile: Path, folders: dict[str, Path], scored: dict[str, dict], capsys) -> None:
    before = (folders["tensor"] / "video_metrics.json").read_text()
    assert cli(profile, "--videos", str(folders["tensor"]), "--layout", "tensor") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ConfigError:") and "exists" in err and "--overwrite" in err and "\n" not in err
    assert (folders["tensor"] / "video_metrics.json").read_text() == before


# ---- readers -------------------------------------------------------------------------------------------------------
def test_per_clip_tensors_and_mp4(smoke_world: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    """<idx>.pt files (uint8) read as the one-file tensor; <idx>-<text>.mp4 (H.264, lossy) close to the frames."""
    import imageio.v2 as iio2

    _, pred = clips_and_videos(smoke_world)
    as_u8 = (pred * 255).round().to(torch.uint8)
    (tmp_path / "pt").mkdir()
    (tmp_path / "mp4").mkdir()
    for i in range(N_CLIPS):
        torch.save(as_u8[i].clone(), tmp_path / "pt" / f"{i}.pt")
        frames = list(as_u8[i].permute(0, 2, 3, 1).numpy())
        iio2.mimsave(tmp_path / "mp4" / f"{i}-clip.mp4", frames, fps=3, macro_block_size=1)
    per_clip, _ = read(tmp_path / "pt", "tensor")
    assert torch.equal(per_clip.pred, as_u8) and per_clip.names[0] == "0.pt"
    mp4, _ = read(tmp_path / "mp4", "mp4")
    assert mp4.pred.shape == pred.shape and mp4.pred.dtype == torch.uint8
    assert (mp4.pred.float() / 255 - pred).abs().mean() < 0.08, "H.264 of noisy 24-px frames is lossy, not wrong"
    picked, _ = read(folders["gif"], "upstream-gif", 0, 0, 1, 2, 3, 5)
    assert torch.equal(picked.pred[:, 1], picked.pred[:, 0]) and picked.halves[0].shape[1] == 6


# ---- one-line errors before any model is built ---------------------------------------------------------------------
class Unsafe:
    """A pickled object that weights_only=True must refuse."""


def bad_folder(kind: str, smoke_world: Path, good: dict[str, Path], tmp: Path) -> tuple[Path, str, list[str]]:
    """A broken folder → (folder, layout, extra args)."""
    gt, pred = clips_and_videos(smoke_world)
    folder = tmp / kind
    if kind in ("missing", "duplicate", "extra", "gt_mismatch", "frames_range"):
        shutil.copytree(good["gif"], folder, ignore=shutil.ignore_patterns("video_metrics.json", "video_report.html"))
        if kind == "missing":
            next(folder.glob("2-*.gif")).unlink()
        elif kind == "duplicate":
            shutil.copy(next(folder.glob("0-*.gif")), folder / "0.gif")
        elif kind == "extra":
            shutil.copy(next(folder.glob("0-*.gif")), folder / "24-past-the-test-split.gif")
        elif kind == "gt_mismatch":
            write_gif_folder(folder, gt[[0, 3, 2, 1, 4]], pred, clips=[1])
        return folder, "upstream-gif", ["--frames", "0,1,2,3,4,9"] if kind == "frames_range" else []
    folder.mkdir()
    if kind == "not_a_grid":
        from utils.video_io import save_gif

        for i in range(N_CLIPS):
            save_gif(folder / f"{i}.gif", pred[i], fps=3)
        return folder, "upstream-gif", []
    if kind == "wrong_layout":
        return good["tensor"], "upstream-gif", []
    videos = {"frames": torch.cat([pred, pred[:, :2]], dim=1), "not_square": pred[..., :20],
              "range": pred * 2 - 1, "unsafe": {"videos": Unsafe()}}[kind]  # fmt: skip
    torch.save(videos, folder / "videos.pt")
    return folder, "tensor", []


BAD = {
    "missing": "1 of test clips 0..4 have no video, e.g. [2]",
    "duplicate": "two files for test clip 0",
    "extra": "clip indices [24] are past the 24 test clips of subject 1",
    "gt_mismatch": "the GT half of 1 of 5 GIF grids is not the dataset's test clip of its index, e.g. 1-",
    "frames_range": "--frames 0,1,2,3,4,9 do not fit the 6-frame",
    "not_a_grid": "a GIF grid of shape (6, 24, 24, 3)",
    "wrong_layout": "holds no *.gif files for --layout upstream-gif; it holds 1 .pt file(s): --layout tensor?",
    "frames": "have 8 frames, the dataset's clips 6; fix: pick 6 frames with --frames",
    "not_square": "are 24 x 20, not square",
    "range": "outside [0, 1]",
    "unsafe": "test_eval_videos.Unsafe); torch.load(weights_only=True) refuses them",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_folder_is_one_line(kind, smoke_world, profile, folders, tmp_path, capsys) -> None:
    folder, layout, extra = bad_folder(kind, smoke_world, folders, tmp_path)
    out = tmp_path / "out"
    rc = cli(profile, "--videos", str(folder), "--layout", layout, "--out", str(out), *extra)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("error: ") and "\n" not in err and "; fix: " in err, err
    assert BAD[kind] in err, err
    assert not out.exists(), "nothing written"


def test_gt_check_separates_own_clips_from_others(smoke_world, profile, folders, tmp_path) -> None:
    """The GT halves of the good folder sit well inside GT_TOLERANCE, a neighbouring clip of the same world well
    outside it; --no-gt-check scores the mismatched folder anyway and says so."""
    from pipeline.score_videos import GT_TOLERANCE

    good = json.loads((folders["gif"] / "video_metrics.json").read_text())["gt_check"]
    assert good["max_mean_abs_diff"] < GT_TOLERANCE / 2, "own clip: quantisation only"
    folder, layout, _ = bad_folder("gt_mismatch", smoke_world, folders, tmp_path)
    out = tmp_path / "out"
    assert cli(profile, "--videos", str(folder), "--layout", layout, "--out", str(out), "--no-gt-check") == 0
    record = json.loads((out / "video_metrics.json").read_text())
    assert record["gt_check"] == "skipped" and (out / "video_report.html").is_file()
    assert not (folder / "video_metrics.json").exists(), "--out, not the videos' folder"
