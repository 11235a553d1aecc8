"""The ablation bench and the SNR/data sweep (issue 17, items 3 and 4) without running them: every ablation's overrides
resolve on the smoke profile and change exactly their keys (stage 1 never, so it can be shared within a seed), the
mean ± std over seeds and the tables, ``video.init=noise`` (the ablation without the blurry video) through stage 5's
generation, the sweep's worlds (distinct folders, the weights reused where the training stimuli are the same) and
both benches' dry runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


# ---- ablations: configs --------------------------------------------------------------------------------------------
def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "starts":  # progressive.starts is one value (a mapping)
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def intended(overrides: tuple[str, ...]) -> set[tuple[str, str]]:
    """``stage2.loss_weights.dice=0`` → ("2", "loss_weights.dice")."""
    keys = set()
    for o in overrides:
        key = o.split("=", 1)[0]
        stage, _, rest = key.partition(".")
        assert stage.startswith("stage"), f"ablation override {o} is not aimed at one stage"
        keys.add((stage.removeprefix("stage"), rest))
    return keys


def test_every_ablation_resolves_and_changes_exactly_its_keys() -> None:
    """Each ablation's configs (smoke profile, stages 1-6) differ from the full run's in exactly the keys its
    overrides name, each to another value; stage 1 in none (so a seed's stage 1 is shared by copying)."""
    from bench.ablations import ABLATIONS, PIPELINE, identity_free, plan_runs, stage_config

    runs = {r.ablation: r for r in plan_runs("t", list(ABLATIONS), [3], [])}
    full = {k: flat(identity_free(stage_config("smoke", runs["full"], k, "enhance"), k)) for k in PIPELINE}
    assert full["1"]["run.seed"] == 3 and full["5"]["video.init"] == "img2img"
    for name, ablation in ABLATIONS.items():
        diff = set()
        for k in PIPELINE:
            mine = flat(identity_free(stage_config("smoke", runs[name], k, "enhance"), k))
            assert mine.keys() == full[k].keys()
            diff |= {(k, key) for key in mine if mine[key] != full[k][key]}
        assert diff == intended(ablation.overrides), name
        assert not any(stage == "1" for stage, _ in diff), name
    assert ABLATIONS["full"].overrides == ()


def test_ablation_configs_mean_what_the_docstring_says() -> None:
    from bench.ablations import ABLATIONS, plan_runs, stage_config

    runs = {r.ablation: r for r in plan_runs("t", list(ABLATIONS), [0], [])}
    cfg = {n: {k: stage_config("smoke", r, k, "enhance") for k in "235"} for n, r in runs.items()}
    nc2 = cfg["neuroclips"]["2"]
    lw = nc2.loss_weights
    assert (lw.dice, lw.concepts, lw.caption) == (0, 0, 0) and lw.latent > 0 and lw.prior > 0
    assert not nc2.progressive.enabled and "caption_acc" not in nc2.train.selection
    assert cfg["neuroclips"]["3"].sample.mask_soft_low == 1.0, "no AVR: the soft mask is all ones"
    assert cfg["no_blurry"]["5"].video.init == "noise" and cfg["no_blurry"]["2"].loss_weights.latent == 0
    assert cfg["full"]["3"].sample.mask_soft_low < 1.0 and cfg["full"]["2"].progressive.enabled
    assert all(c["3"].run.mode == "enhance" for c in cfg.values())


def test_plan_trains_stage1_once_per_seed_and_copies_it(capsys) -> None:
    from bench.ablations import main

    assert main(["--profile", "smoke", "--exp", "t", "--seeds", "0", "1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12
    assert lines[0].startswith("t_abl_full_s0: stages 1-6") and lines[6].startswith("t_abl_full_s1: stages 1-6")
    assert lines[5].startswith("t_abl_neuroclips_s0: stage 1 copied from t_abl_full_s0, stages 2-6")
    assert lines[11].startswith("t_abl_neuroclips_s1: stage 1 copied from t_abl_full_s1")


def test_bad_override_fails_in_the_plan_with_one_line(capsys) -> None:
    from bench.ablations import main

    assert main(["--profile", "smoke", "--seeds", "0", "--dry-run", "--set", "stage2.loss_weights.dicee=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ConfigError") and "dicee" in err and "\n" not in err


# ---- ablations: aggregation and table ------------------------------------------------------------------------------
def test_aggregate_is_mean_and_sample_std_of_the_finite_values() -> None:
    from bench.ablations import aggregate

    agg = aggregate([0.7, None, 0.8, float("nan"), 0.9])
    assert agg["n"] == 3 and agg["mean"] == pytest.approx(0.8)
    assert agg["std"] == pytest.approx(float(np.std([0.7, 0.8, 0.9], ddof=1)))
    one = aggregate([0.5])
    assert one == {"values": [0.5], "n": 1, "mean": 0.5, "std": None}
    assert aggregate([None])["mean"] is None


def records(rng: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for name in ("full", "no_concepts", "no_blurry"):
        for seed in (2, 0, 1):  # out of order: the summary sorts by seed
            metrics = {"video_2way": float(rng.uniform(0.6, 0.9)), "psnr": float(rng.uniform(9, 12)),
                       "key_object_dice": None if name == "no_blurry" and seed == 1 else 0.2}  # fmt: skip
            out.append({"ablation": name, "seed": seed, "metrics": metrics, "chance": {"video_2way": 0.75}})
    return out


def test_summary_and_table_from_per_seed_metrics() -> None:
    from bench.ablations import NO_PAPER_ROW, summarise, table

    recs = records(np.random.default_rng(0))
    summary = summarise(recs)
    assert list(summary) == ["full", "no_concepts", "no_blurry"]
    full = [r["metrics"]["video_2way"] for r in sorted(recs, key=lambda r: r["seed"]) if r["ablation"] == "full"]
    assert summary["full"]["video_2way"]["values"] == full
    assert summary["full"]["video_2way"]["std"] == pytest.approx(float(np.std(full, ddof=1)))
    assert summary["no_blurry"]["key_object_dice"]["n"] == 2
    text = table(summary, {"video_2way": 0.75}, [0, 1, 2])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("|")}
    mean, std = float(np.mean(full)), float(np.std(full, ddof=1))
    assert f"{mean:.3f} ± {std:.3f} (n=3)" in rows["video 2-way"] and rows["video 2-way"].endswith("| 0.750 |")
    assert "(n=2)" in rows["key-object Dice"] and "±" in rows["PSNR (dB)"]
    paper = rows["paper: video 2-way"].split(" | ")
    assert paper[1:4] == ["0.862", "—", "0.838"], "full: NEURONS §3.3; no_blurry: NeuroClips' w/o blurry clip"
    assert NO_PAPER_ROW in rows["paper row"]


# ---- stage 5: video.init=noise -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_profile(smoke_world: Path, tmp_path_factory) -> Path:
    """A profile with the smoke toy ``video`` + ``vae`` weights (the repository's when current, else the session's
    build) and a hand-made stage-3 folder of run ``s5``."""
    from tests.smoke_env import smoke_weights
    from tests.test_stage5 import fake_stage3
    from utils.config import load_config
    from utils.runs import RunPaths
    from utils.stage_configs import Stage5Config

    scratch = tmp_path_factory.mktemp("noise_init")
    weights = smoke_weights(smoke_world, ("vae", "video"))
    path = scratch / "p.yaml"
    path.write_text("extends: smoke\n"
                    f"paths:\n  data_root: {smoke_world}\n  weights_root: {weights}\n  exp_root: {scratch / 'EXP'}\n"
                    "run:\n  device: cpu\nstage5:\n  video:\n    caption_fallback: true\n    steps: 4\n")  # fmt: skip
    cfg = load_config(Stage5Config, str(path), [], {"exp": "s5", "mode": "enhance"})
    fake_stage3(smoke_world, RunPaths.from_config(cfg).stage_dir("3"))
    return path


def test_noise_init_ignores_the_blurry_video_and_runs_every_step(video_profile: Path) -> None:
    from pipeline.stage5 import generate_clip, setup, steps_run
    from utils.config import load_config
    from utils.stage_configs import Stage5Config

    def cfg(*overrides: str) -> Stage5Config:
        return load_config(Stage5Config, str(video_profile), list(overrides), {"exp": "s5", "mode": "enhance"})

    s = setup(cfg("video.init=noise"))
    calls = [0]
    s.role.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    assert steps_run(s.cfg, s.role) == 4
    video = generate_clip(s, 0)
    assert calls[0] == 4, "every DDIM step runs"
    blurry = s.blurry.clone()
    s.blurry = torch.rand_like(blurry.float()).to(blurry.dtype)  # another blurry video
    torch.testing.assert_close(generate_clip(s, 0), video, rtol=0, atol=0)
    s.cfg = cfg("video.init=img2img", "video.strength=0.5")
    other = generate_clip(s, 0)
    s.blurry = blurry
    assert not torch.equal(generate_clip(s, 0), other), "img2img does read the blurry video (the check can fail)"


# ---- the sweep -----------------------------------------------------------------------------------------------------
def test_sweep_worlds_have_distinct_folders_and_profiles(tmp_path: Path) -> None:
    from bench.snr_sweep import CLIP_FACTORS, SNRS, base_config, plan_worlds, profile_text
    from utils.config import load_config
    from utils.stage_configs import Stage1Config, WorldBuildConfig

    base = base_config("smoke", [])
    worlds = plan_worlds("smoke", base, list(SNRS), list(CLIP_FACTORS), tmp_path)
    assert [(w.snr, w.config.n_train_clips) for w in worlds] == [(0.003, 48), (0.01, 48), (0.03, 48), (0.1, 48),
                                                                  (0.01, 96)]  # fmt: skip
    assert len({w.data_root for w in worlds}) == 5 and len({w.name for w in worlds}) == 5
    (home,) = [w for w in worlds if w.is_base]
    assert home.snr == base.world.snr and home.profile == "smoke" and home.data_root.name == "toy_cortex_smoke"
    for w in worlds:
        if w.is_base:
            continue
        assert w.data_root.parent == tmp_path and Path(w.profile).parent == tmp_path
        Path(w.profile).write_text(profile_text("smoke", w, base.world))
        assert load_config(WorldBuildConfig, w.profile).world == w.config
        stage = load_config(Stage1Config, w.profile)
        assert Path(stage.paths.data_root) == w.data_root
        assert stage.paths.weights_root == base.paths.weights_root, "every world reads the profile's weights"


def test_sweep_reuses_the_weights_where_the_stimuli_are_the_same(smoke_world: Path, tmp_path: Path) -> None:
    """The SNR world's training stimuli (the toy weights' hash) are the base world's; the 2x-clips world's are not,
    and begin with them. ``weights_check`` passes on current weights and refuses stale ones (never rebuilds)."""
    from bench.snr_sweep import World, base_config, is_prefix, plan_worlds, weights_check
    from models.foundation.toy.build import ROLES, role_hashes
    from models.foundation.toy.common import MANIFEST, role_dir
    from models.foundation.toy.data import world_hash
    from tasks_construction.toy_cortex.build import build_world

    base = base_config("smoke", [])
    snr, twice = plan_worlds("smoke", base, [0.1], [2], tmp_path)
    for w in (snr, twice):
        build_world(w.config, w.data_root, progress=False)
    home = World("home", base.world.snr, 1, base.world, smoke_world, "smoke", True)
    assert world_hash(snr.data_root) == world_hash(smoke_world) != world_hash(twice.data_root)
    assert is_prefix(smoke_world, twice.data_root) and not is_prefix(twice.data_root, smoke_world)
    test_frames = [torch.load(r / "GT_test_3fps.pt", weights_only=True) for r in (smoke_world, twice.data_root)]
    assert torch.equal(*test_frames), "the same test clips in every world"

    weights = tmp_path / "weights"  # role folders whose manifests say: built for the base world, current
    hashes = role_hashes(world_hash(smoke_world), "smoke", base.world.seed)
    for role in ROLES:
        role_dir(weights, role).mkdir(parents=True)
        (role_dir(weights, role) / "w.bin").write_bytes(b"x")
        manifest = {"config_hash": hashes[role], "files": {"w.bin": {"size": 1, "sha256": _sha(b"x")}}}
        (role_dir(weights, role) / MANIFEST).write_text(json.dumps(manifest))
    cfg = base_config("smoke", [f"paths.weights_root={weights}"])
    info = weights_check(snr, home, cfg, "smoke")
    assert info["same_stimuli"] and info["world_hash"] == info["weights_world_hash"]
    info = weights_check(twice, home, cfg, "smoke")
    assert not info["same_stimuli"] and info["base_clips_first"]
    shutil.rmtree(role_dir(weights, "video"))
    with pytest.raises(SystemExit, match="video .*never rebuilds them"):
        weights_check(snr, home, cfg, "smoke")


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def quality_record(snr: float, rng: np.random.Generator) -> dict[str, Any]:
    """A toy_quality-like record: methods → metric → {values, n_seeds, mean, std}."""

    def agg(values: list[float]) -> dict[str, Any]:
        return {"values": values, "n_seeds": len(values), "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}  # fmt: skip

    scale = math.log10(snr / 0.001)
    neurons = {k: agg(list(rng.uniform(0.1, 0.2, 3) * scale)) for k in ("id_50way", "video_50way", "ssim")}
    return {"bench": "toy_quality", "chance": {"id_50way": 0.02, "video_50way": 0.058},
            "methods": {"NEURONS enhance": neurons, "ridge → decoders": {"video_50way": agg([0.1, 0.12, 0.11])},
                        "oracle ceiling": {"id_50way": agg([0.98])}}}  # fmt: skip


def test_sweep_table_and_plot(tmp_path: Path) -> None:
    from bench.snr_sweep import numbers, plot, table, toy_quality_record

    rng = np.random.default_rng(0)
    points = []
    for snr, factor in ((0.003, 1), (0.01, 1), (0.1, 1), (0.01, 2)):
        record = quality_record(snr, rng)
        lines = ["NEURONS: exp=... stages=123456", "| metric | ... |", json.dumps(record) + "\n", "report: x.html"]
        parsed = toy_quality_record(lines)
        assert parsed == record
        points.append({"name": f"snr{snr:g}x{factor}", "snr": snr, "clip_factor": factor, "n_train_clips": 48 * factor,
                       "numbers": numbers(parsed), "chance": parsed["chance"]})  # fmt: skip
    text = table(points, [0, 1, 2])
    rows = [line for line in text.splitlines() if line.startswith("| snr")]
    assert len(rows) == 4 * 3, "world × (NEURONS, ridge → decoders, ceiling)"
    first = points[0]["numbers"]["NEURONS enhance"]["id_50way"]
    assert f"{first['mean']:.3f} ± {first['std']:.3f}" in rows[0] and rows[0].split(" | ")[3] == "NEURONS enhance"
    assert "| chance |" in text and "0.020" in text
    png = plot(points, tmp_path / "sweep.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no JSON record"):
        toy_quality_record(["{not json", '{"bench": "other"}'])


def test_sweep_dry_run_and_refused_world_overrides(capsys) -> None:
    from bench.snr_sweep import main

    assert main(["--profile", "smoke", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[4].startswith("snr0.01_clips2x: snr 0.01, 96 training clips")
    assert "other training stimuli" in lines[4] and "same training stimuli" in lines[0]
    with pytest.raises(SystemExit):
        main(["--profile", "smoke", "--dry-run", "--set", "world.snr=0.1"])


def test_sweep_replot_gives_one_seed_its_bootstrap_interval(tmp_path: Path, capsys) -> None:
    from bench.snr_sweep import error_bar, main

    assert error_bar({"mean": 0.2, "std": 0.05, "n": 3, "ci95": None}) == (0.05, 0.05)
    below, above = error_bar({"mean": 0.2, "std": None, "n": 1, "ci95": [0.15, 0.3]})
    assert below == pytest.approx(0.05) and above == pytest.approx(0.1)
    assert error_bar({"mean": 0.2, "std": None, "n": 1, "ci95": None}) == (0.0, 0.0)
    one = {"mean": 0.16, "std": None, "n_seeds": 1, "values": [0.16], "ci95": [0.1, 0.24]}
    quality = {"chance": {"id_50way": 0.02}, "methods": {"NEURONS enhance": {"id_50way": one}}}
    point = {"name": "snr0.01", "snr": 0.01, "clip_factor": 1, "n_train_clips": 48, "chance": quality["chance"],
             "numbers": {}, "toy_quality": quality}  # fmt: skip
    out = tmp_path / "sweep.json"
    assert main(["--replot", "--out", str(out)]) == 1, "no JSON yet: a clear refusal"
    out.write_text(json.dumps({"points": [point], "seeds": [42], "complete": False}))
    assert main(["--replot", "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    assert "| snr0.01 | 0.01 | 48 | NEURONS enhance | — | 0.160 |" in text and "incomplete" in text
    assert out.with_suffix(".png").stat().st_size > 10_000


# ---- bench/multisubject.py -----------------------------------------------------------------------------------------
def test_multisubject_bench_plans_the_pair_before_its_adaptations_and_summarises_seeds() -> None:
    from bench.multisubject import plan, summarise, table

    runs = plan("ms", [0, 1, 2], 0.125, 10, 32)
    rows = [r.row for r in runs]
    assert rows.index("pair") < rows.index("adapt") and rows.count("adapt") == rows.count("scratch") == 3
    assert rows.count("single") == 9 and rows.count("shared") == 3 and rows.count("pair") == 1
    shared = next(r for r in runs if r.row == "shared")
    assert "run.subj=[1,2,3]" in shared.overrides and "train.batch_size=96" in shared.overrides, "32 per subject"
    adapt = [r for r in runs if r.row == "adapt"]
    assert all("data.train_fraction=0.125" in r.overrides and "train.adapt_ridge_epochs=10" in r.overrides
               for r in adapt)  # fmt: skip
    scratch = [r for r in runs if r.row == "scratch"]
    assert all(not any("adapt" in o for o in r.overrides) for r in scratch)
    records = [{"row": "adapt", "seed": s, "scores": {"3": {"2-way": v, "50-way": v / 4}}}
               for s, v in enumerate((0.8, 0.9, 0.7))]  # fmt: skip
    summary = summarise(records)
    cell = summary["adapt subj 3"]["2-way"]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(0.8) and cell["std"] == pytest.approx(0.1)
    assert "| adapt subj 3 | 0.800 ± 0.100 |" in table(summary, {"2-way": 0.5, "50-way": 0.02})


def test_multisubject_video_rows_take_the_sets_batch_and_the_pairs_stage2() -> None:
    """``bench/multisubject.py --videos``: stage 2 of a row runs at the set's size × the profile's batch, an adapt row
    starts its stage 2 from the pair's run, and the table gives one seed's interval or several seeds' spread."""
    from bench.multisubject import plan, video_overrides, video_table

    runs = {r.row: r for r in plan("ms", [0], 0.125, 10, 32)}
    assert video_overrides(runs["shared"], 8, None) == ["run.seed=0", "stage2.train.batch_size=24"]
    adapt = video_overrides(runs["adapt"], 8, Path("EXP/exp_ms_pair/subj_1-2"))
    assert adapt == ["run.seed=0", "data.train_fraction=0.125", "stage2.train.batch_size=8",
                     "stage2.train.init_from=EXP/exp_ms_pair/subj_1-2"]  # fmt: skip
    cols = ("video_2way", "video_50way", "frame_50way", "ssim", "blurry_video_ssim", "concept_f1_micro")

    def metrics(v: float) -> dict:
        return {"3": {c: {"mean": v, "ci95": [v - 0.1, v + 0.1]} for c in cols}}

    one = video_table([{"row": "adapt", "seed": 0, "metrics": metrics(0.5)}])
    assert "| adapt | 3 | 1 | 0.500 [0.400, 0.600] |" in one
    three = video_table([{"row": "adapt", "seed": s, "metrics": metrics(v)} for s, v in enumerate((0.4, 0.5, 0.6))])
    assert "| adapt | 3 | 3 | 0.500 ± 0.100 |" in three


def test_multisubject_rows_run_alone_and_keep_the_other_rows_records(tmp_path: Path) -> None:
    """``--rows adapt scratch --seeds 1 2 --pair-seed 0``: the adapt rows bring the seed-0 pair, no other row runs,
    and the results file keeps the records of the rows and seeds that the call did not run."""
    from bench.multisubject import merged_records, plan

    runs = plan("ms", [1, 2], 0.125, 10, 32, rows=("adapt", "scratch"), pair_seed=0)
    assert [(r.row, r.seed) for r in runs] == [("pair", 0), ("adapt", 1), ("scratch", 1), ("adapt", 2),
                                               ("scratch", 2)]  # fmt: skip
    assert "run.seed=0" in runs[0].overrides
    assert [r.row for r in plan("ms", [0], 0.125, 10, 32, rows=("scratch",))] == ["scratch"], "no pair without adapt"
    out = tmp_path / "videos.json"
    out.write_text(json.dumps({"records": [{"row": "adapt", "seed": 0, "v": "old"}, {"row": "single", "seed": 0},
                                           {"row": "adapt", "seed": 1, "v": "stale"}]}))  # fmt: skip
    merged = merged_records(out, [{"row": "adapt", "seed": 1, "v": "new"}, {"row": "scratch", "seed": 1}])
    assert [(r["row"], r["seed"], r.get("v")) for r in merged] == [
        ("single", 0, None), ("adapt", 0, "old"), ("adapt", 1, "new"), ("scratch", 1, None)]


def test_sweep_keeps_the_points_it_does_not_rerun(tmp_path: Path) -> None:
    """A call for some worlds (``--snrs`` with no value, ``--clip-factors 2``) keeps the other worlds' points of the
    results file when it was made with the same settings, and orders them as the sweep plans them."""
    import argparse

    from bench.snr_sweep import kept_points, merge_points

    out = tmp_path / "sweep.json"
    point = lambda name, snr, f: {"name": name, "snr": snr, "clip_factor": f}  # noqa: E731
    old = [point("snr0.1", 0.1, 1), point("snr0.01", 0.01, 1), point("snr0.01_clips2x", 0.01, 2)]
    settings = {"profile": "toy", "seeds": [42], "modes": ["enhance"], "set": []}
    out.write_text(json.dumps({**settings, "points": old}))
    args = argparse.Namespace(**settings)
    kept = kept_points(out, args, ["snr0.01_clips2x"])
    assert [p["name"] for p in kept] == ["snr0.1", "snr0.01"]
    merged = merge_points(kept, [point("snr0.01_clips2x", 0.01, 2)])
    assert [p["name"] for p in merged] == ["snr0.01", "snr0.1", "snr0.01_clips2x"]
    assert kept_points(out, argparse.Namespace(**{**settings, "seeds": [0, 1]}), []) == [], "other seeds: not mixed"
