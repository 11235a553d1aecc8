"""The run report (pipeline/report.py) of a hand-made smoke run (stage-1/2 curves, stage 3, stage 5, a metrics file,
stage-e diagnostics): self-contained (every image a data URI, nothing external), the toy and paper comparison
columns, samples and diagnostics, the command line, and a headless Chromium rendering when Chromium is installed."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.report import LEGEND, SHUFFLED_LEGEND
from tests.test_diagnostics import N_CLIPS, fake_stage3
from utils.data_catalog import CEILING_FILE, subject_name

EXP = "rep"
RES5 = 24
SAMPLES = 3


class Collector(HTMLParser):
    """Every tag and its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def profile(smoke_world: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.yaml"
    path.write_text(
        "extends: smoke\n"
        f"paths:\n  data_root: {smoke_world}\n  exp_root: {path.parent / 'EXP'}\n"
        f"run:\n  device: cpu\nstage6:\n  eval:\n    report_samples: {SAMPLES}\n"
        "stagee:\n  sample:\n    num_panels: 2\n"
    )
    return path


def config(profile: Path, stage: str = "6", exp: str = EXP, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    return load_config(STAGE_CONFIGS[stage], str(profile), list(overrides), {"exp": exp, "mode": "enhance"})


def fake_training(folder: Path, ident: bool) -> None:
    from utils.training import MetricsLog

    metrics = MetricsLog(folder / "metrics.jsonl")
    for step in range(1, 4):
        metrics.write({"step": step, "loss": 1.0 / step, "split": "train"})
    metrics.plot(folder / "curves.png")
    if ident:
        top1 = {"2-way": 0.6, "24-way": 0.1, "all-way": 0.08}
        chance = {"2-way": 0.5, "24-way": 1 / 24, "all-way": 1 / 24}
        (folder / "identification.json").write_text(json.dumps({"test": {"top1": top1, "chance": chance}}))


def fake_stage5_and_metrics(smoke_world: Path, paths) -> None:
    """Videos (N, F, 3, RES5, RES5), prompts.json, an eval manifest (report_samples) and metrics_enhance.json."""
    from utils.data import BrainVideoData
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.manifest import StageRecorder
    from utils.resize import resize_frames_bilinear

    gt = resize_frames_bilinear(BrainVideoData(smoke_world, 1).frames("test", range(N_CLIPS)), RES5)
    folder = paths.stage_dir("5")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / "videos.safetensors", {"videos": (gt * 0.8).contiguous()})
    captions = [f"a decoded caption {i}" for i in range(N_CLIPS)]
    atomic_write_json(folder / "prompts.json", {"caption_source": "blip2", "captions": captions})
    StageRecorder("6", paths.stage_dir("6"), "fake", {"eval": {"report_samples": SAMPLES}}).begin().finish()
    metrics = {  # video 2-way: an interval reaching below chance; CLIP-pcc as in files without intervals
        "video_2way": {"mean": 0.81, "std": 0.1, "n": N_CLIPS, "chance": 0.75, "ci95": [0.7, 0.92],
                       "above_chance": False},
        "video_50way": {"mean": 0.08, "std": 0.05, "n": N_CLIPS, "chance": 0.058, "ci95": [0.06, 0.1],
                        "above_chance": True, "chance_shuffled": 0.07, "ci95_vs_shuffled": [-0.01, 0.03],
                        "above_shuffled": False},  # above the analytic chance, not above its shuffled pairs
        "clip_pcc": {"mean": 0.9, "std": 0.05, "n": N_CLIPS},
        "ssim": {"mean": 0.3, "std": 0.1, "n": N_CLIPS, "ci95": [0.25, 0.35]},
        "psnr": {"mean": None, "std": None, "n": N_CLIPS},
        "key_object_dice": {"mean": 0.5, "std": 0.2, "n": N_CLIPS},
    }
    atomic_write_json(paths.root / "metrics_enhance.json", {
        "protocol": "standard", "n_clips": N_CLIPS, "caption_source": "blip2", "eval_frames": list(range(6)),
        "metrics": metrics,
    })  # fmt: skip


@pytest.fixture(scope="module")
def run(smoke_world: Path, profile: Path) -> Path:
    """The run folder; its report written by stage e (which runs on the fake stage 3)."""
    from pipeline.diagnostics import diagnose
    from pipeline.report import report_path
    from utils.runs import RunPaths

    paths = RunPaths.from_config(config(profile))
    for stage in ("1", "2"):
        paths.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        fake_training(paths.stage_dir(stage), ident=stage == "1")
    fake_stage3(smoke_world, paths.stage_dir("3"))
    fake_stage5_and_metrics(smoke_world, paths)
    diagnose(config(profile, "e"))
    return report_path(paths)


def parse(path: Path) -> Collector:
    parser = Collector()
    parser.feed(path.read_text())
    parser.close()
    return parser


def test_self_contained(run: Path) -> None:
    tags = parse(run).tags
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert images, "the report shows images"
    magic = {"image/png": b"\x89PNG", "image/gif": b"GIF8"}
    for attrs in images:
        src = attrs["src"] or ""
        mime, _, payload = src.removeprefix("data:").partition(";base64,")
        assert src.startswith("data:") and mime in magic, src[:40]
        assert base64.b64decode(payload).startswith(magic[mime])
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    refs = [v for _, attrs in tags for k, v in attrs.items() if k in ("src", "href") and v]
    assert all(r.startswith("data:") for r in refs), "no external asset"


def test_toy_comparisons(smoke_world: Path, profile: Path, run: Path) -> None:
    from pipeline.report import tables
    from utils.runs import RunPaths

    cfg = config(profile)
    metrics, ident = tables(cfg, RunPaths.from_config(cfg))
    assert metrics.header == ["metric", "ours (enhance, subj 1, standard)", "chance"], "a one-protocol file reads"
    rows = {r[0]: r for r in metrics.rows}
    assert rows["video 2-way"] == ["video 2-way", "0.810 ± 0.100 [0.700, 0.920] †", "0.750"], "not above chance"
    assert rows["SSIM"][1] == "0.300 ± 0.100 [0.250, 0.350]" and rows["CLIP-pcc"][1] == "0.900 ± 0.050"
    assert rows["PSNR (dB)"][1] == "n/a", "null PSNR (identical frames) is shown as n/a"
    assert LEGEND in metrics.all_notes() and any("clip bootstrap" in n for n in metrics.notes)
    assert rows["video 50-way"][1:] == ["0.080 ± 0.050 [0.060, 0.100] ‡", "0.058; shuffled 0.070"]
    assert SHUFFLED_LEGEND in metrics.all_notes()
    assert ident.header[1:] == ["ours: stage 1 (brain → CLIP tokens)", "ridge baseline (voxels → 8×8 pixels)",
                                "oracle noise ceiling", "chance"]  # fmt: skip
    ceiling = json.loads((smoke_world / CEILING_FILE).read_text())["subjects"][subject_name(1)]["top1"]
    by_way = {r[0]: r for r in ident.rows}
    assert by_way["2-way"][1] == "0.600", "no n_candidates in this stage-1 file: no interval"
    assert by_way["2-way"][3].startswith(f"{ceiling['2-way']:.3f} [")  # Wilson interval over the test clips
    ridge, lo, hi = (float(x) for x in re.findall(r"[\d.]+", by_way["2-way"][2]))
    assert lo < ridge < hi and ridge > 0.5, "the ridge baseline (computed: the smoke world has no JSON of it)"


def test_paper_comparisons(profile: Path, run: Path) -> None:
    from pipeline.report import metrics_table, scored_modes
    from utils.runs import RunPaths

    cfg = config(profile, "6", EXP, "model.size=paper")
    table = metrics_table(cfg, scored_modes(RunPaths.from_config(cfg)), None)
    assert table.header[1:] == ["ours (enhance, subj 1, standard)", "MinD-Video (mean of 3)", "NeuroClips (subj 1)",
                                "NEURONS (subj 1)", "chance"]  # fmt: skip
    rows = {r[0]: r for r in table.rows}
    assert rows["video 2-way"][2:5] == ["0.839", "0.830", "0.862"]
    assert rows["SSIM"][4] == "—", "NEURONS published no SSIM"
    notes = " ".join(table.notes)
    assert "NeuroClips (NeurIPS 2024) Table 1" in notes and "arXiv 2503.11167" in notes
    assert "protocol 'neurons'" in notes, "our standard-protocol numbers are flagged as not comparable"
    assert "rerun stage 6" in notes, "an old one-protocol metrics file: no neurons column"


def test_published_numbers_beside_the_neurons_protocol() -> None:
    """A two-protocol metrics file: both columns, the published numbers right after the neurons one."""
    from types import SimpleNamespace

    from pipeline.report import metrics_table

    def block(v: float) -> dict:
        return {"metrics": {"video_2way": {"mean": v, "std": 0.1, "n": N_CLIPS, "chance": 0.75}}}

    m = {"protocol": "standard", "n_clips": N_CLIPS, "caption_source": "blip2",
         "protocols": {"standard": block(0.6), "neurons": block(0.7)}, **block(0.6)}  # fmt: skip
    cfg = SimpleNamespace(run=SimpleNamespace(subj=1, subject=1), model=SimpleNamespace(size="paper"))
    table = metrics_table(cfg, {"enhance": m}, None)  # type: ignore[arg-type]
    assert table.header[1:4] == ["ours (enhance, subj 1, standard)", "ours (enhance, subj 1, neurons)",
                                 "MinD-Video (mean of 3)"]  # fmt: skip
    row = next(r for r in table.rows if r[0] == "video 2-way")
    assert row[1:3] == ["0.600 ± 0.100", "0.700 ± 0.100"]
    assert "rerun stage 6" not in " ".join(table.notes)


def test_samples_and_diagnostics(smoke_world: Path, run: Path) -> None:
    from utils.data import BrainVideoData

    text = run.read_text()
    tags = parse(run).tags
    gifs = [a for t, a in tags if t == "img" and (a["src"] or "").startswith("data:image/gif")]
    assert len(gifs) == SAMPLES, "eval.report_samples side-by-side GIFs"
    gt0 = str(BrainVideoData(smoke_world, 1).captions("test")[0])
    assert gt0 in text and "a decoded caption 0" in text
    assert "Diagnostics (stage e, enhance)" in text and "Per-concept recall and precision" in text
    alts = {a.get("alt") for t, a in tags if t == "img"}
    assert {"stage 1 curves", "stage 2 curves", "concepts.png", "dice.png", "clip_0000", "clip_0001"} <= alts


def test_command_line_prints_table_and_path(profile: Path, run: Path, capsys) -> None:
    from pipeline.report import main

    assert main(["--profile", str(profile), "--exp", EXP, "--subj", "1"]) == 0
    out = capsys.readouterr().out
    assert "| video 2-way | 0.810 ± 0.100 [0.700, 0.920] † | 0.750 |" in out
    assert f"- {LEGEND}" in out, "the marker's legend under the table"
    assert f"report: {run.resolve()}" in out


def test_html_marks_a_metric_not_above_chance(run: Path) -> None:
    text = run.read_text()
    assert '<td class="num warn">0.810 ± 0.100 [0.700, 0.920] †</td>' in text
    assert '<td class="num">0.300 ± 0.100 [0.250, 0.350]</td>' in text
    assert '<td class="num">0.080 ± 0.050 [0.060, 0.100] ‡</td>' in text, "‡ alone is no warning colour"
    assert f'<div class="note">{LEGEND}</div>' in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_renders_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    shot = tmp_path / "report.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
           f"--screenshot={shot}", run.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200) and pixels.std() > 10, "a page with content, not a blank screen"


def test_report_without_metrics_says_so(profile: Path) -> None:
    from pipeline.report import write_report

    text = write_report(config(profile, "6", "empty")).read_text()
    assert "stage 6 has not scored this run yet" in text


# ---- the metric classifiers' ceilings ------------------------------------------------------------------------------
def test_classifier_ceilings_beside_the_metrics(profile: Path, run: Path, tmp_path: Path) -> None:
    """stats.test_eval of a toy classifier's manifest.json is noted under the metrics table; nothing without it."""
    from pipeline.report import classifier_ceilings, tables
    from utils.runs import RunPaths

    (tmp_path / "video_classifier").mkdir()
    (tmp_path / "frame_classifier").mkdir()
    stats = {"test_eval": {"top1": 0.62, "chance": 1 / 144, "factors": {"shape": 0.9, "motion": {"top1": 0.5,
                                                                                                  "chance": 0.25}}}}
    (tmp_path / "video_classifier" / "manifest.json").write_text(json.dumps({"role": "video_classifier",
                                                                             "stats": stats}))
    (tmp_path / "frame_classifier" / "manifest.json").write_text(json.dumps({"stats": {"params": 10}}))
    lines = classifier_ceilings(tmp_path)
    assert lines == ["video classifier on ground-truth test videos: top-1 0.620 (chance 0.007); per factor: shape "
                     "0.900, motion 0.500 (chance 0.250)"]  # fmt: skip
    cfg = config(profile, "6", EXP, f"paths.weights_root={tmp_path}")
    assert lines[0] in tables(cfg, RunPaths.from_config(cfg))[0].notes
    assert classifier_ceilings(tmp_path / "absent") == []
    plain = config(profile, "6", EXP, f"paths.weights_root={tmp_path / 'absent'}")
    assert not any("classifier on" in n for n in tables(plain, RunPaths.from_config(plain))[0].notes)


# ---- bench/toy_quality.py: seeds ------------------------------------------------------------------------------------
def toy_results(shift: float, ssim_ci: list[float] | None = None) -> dict:
    """One seed's results as toy_quality's pipeline and ridge path return them (tiny, synthetic)."""
    ident = {"top1": {"2-way": 0.8 + shift, "24-way": 0.2, "all-way": 0.1}, "n_candidates": 24,
             "chance": {"2-way": 0.5, "24-way": 1 / 24, "all-way": 1 / 24}}  # fmt: skip
    metrics = {"ssim": {"mean": 0.4 + shift, "std": 0.1, "n": 24, "ci95": ssim_ci},
               "video_2way": {"mean": 0.76 + shift, "std": 0.2, "n": 24, "chance": 0.75, "ci95": [0.7, 0.8],
                              "above_chance": False}}  # fmt: skip
    ridge = {"metrics": {"ssim": {"mean": 0.3 + shift, "std": 0.1, "n": 24, "ci95": [0.28, 0.32]}},
             "identification": ident, "wall_s": 1.0}  # fmt: skip
    return {"neurons": {"enhance": {"metrics": metrics, "identification": ident, "wall_s": 2.0}},
            "ridge_decoders": ridge}  # fmt: skip


def test_toy_quality_seed_runs_and_arguments() -> None:
    import argparse

    from bench.toy_quality import parse_seeds, seed_runs

    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("0,x", "1,1", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)
    assert [(r.seed, r.exp, r.overrides) for r in seed_runs("q", None, ["a=1"])] == [(None, "q", ("a=1",))]
    assert [(r.exp, r.overrides) for r in seed_runs("q", [3], [])] == [("q", ("run.seed=3",))], "one seed: as today"
    assert [r.exp for r in seed_runs("q", [0, 1, 2], [])] == ["q_s0", "q_s1", "q_s2"]
    assert seed_runs("q", [0, 1], ["a=1"])[1].overrides == ("a=1", "run.seed=1")
    with pytest.raises(SystemExit, match="run.seed"):
        seed_runs("q", [0, 1], ["run.seed=4"])


def test_toy_quality_aggregates_seeds() -> None:
    import numpy as np

    from bench.toy_quality import aggregate_entry, chance_row, methods_table

    agg = aggregate_entry([{"mean": 0.5}, {"mean": 0.7}, None, {"mean": None}])
    assert agg["values"] == [0.5, 0.7, None, None] and agg["n_seeds"] == 2
    assert agg["mean"] == pytest.approx(0.6) and agg["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert aggregate_entry([{"mean": 0.5, "above_chance": True}, {"mean": 0.6, "above_chance": False}])[
        "above_chance"] is False, "not above chance in one seed"  # fmt: skip

    seeds = [toy_results(0.0), toy_results(0.01), toy_results(0.05)]
    baselines = {"ceiling": {"top1": {"2-way": 0.99, "all-way": 0.9}, "n_candidates": 24,
                             "chance": {"2-way": 0.5, "all-way": 1 / 24}}}  # fmt: skip
    table, methods = methods_table(seeds, baselines, chance_row(seeds[0]), ["a ceiling line"])
    ssim = methods["NEURONS enhance"]["ssim"]
    assert ssim["values"] == pytest.approx([0.4, 0.41, 0.45]) and ssim["n_seeds"] == 3, "the JSON keeps every seed"
    assert ssim["std"] == pytest.approx(np.std([0.4, 0.41, 0.45], ddof=1))
    rows = {r[0]: r for r in table.rows}
    assert table.header == ["metric", "NEURONS enhance", "ridge → decoders", "oracle ceiling", "chance"]
    assert rows["SSIM"][1] == f"0.420 ± {ssim['std']:.3f} (n=3)" and rows["SSIM"][3] == "—"
    assert rows["video 2-way"][1].endswith("(n=3) †") and rows["video 2-way"][4] == "0.750"
    assert rows["identification 2-way"][3].startswith("0.990 [") and "a ceiling line" in table.notes

    one, methods1 = methods_table(seeds[:1], {}, chance_row(seeds[0]), [])
    rows1 = {r[0]: r for r in one.rows}
    assert rows1["SSIM"][1:3] == ["0.400", "0.300 [0.280, 0.320]"], "stage 6 wrote no interval for this one"
    assert rows1["video 2-way"][1] == "0.760 [0.700, 0.800] †" and LEGEND in one.all_notes()
    lo, hi = methods1["NEURONS enhance"]["id_2way"]["ci95"]  # Wilson over the 24 test clips
    assert lo < 0.8 < hi and rows1["identification 2-way"][1] == f"0.800 [{lo:.3f}, {hi:.3f}]"
