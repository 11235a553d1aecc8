"""Stage e (diagnostics) on a hand-made stage-3 folder of the smoke world (no model is needed): stage order, the
outputs and their manifest, per-concept recall / precision and Dice against hand-computed values, the panels, the
refreshed report, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

N_CLIPS = 5
MASK_SIZE = 8  # stage-3 mask side, smaller than the smoke frames: the GT masks are area-resized to it


@pytest.fixture(scope="module")
def profile(smoke_world: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("diagnostics") / "diag.yaml"
    path.write_text(
        "extends: smoke\n"
        f"paths:\n  data_root: {smoke_world}\n  exp_root: {path.parent / 'EXP'}\n"
        "run:\n  device: cpu\nstagee:\n  sample:\n    num_panels: 2\n"
    )
    return path


def config(profile: Path, exp: str, *overrides: str, stage: str = "e", mode: str = "enhance"):
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    return load_config(STAGE_CONFIGS[stage], str(profile), list(overrides), {"exp": exp, "mode": mode})


def paths_of(profile: Path, exp: str):
    from utils.runs import RunPaths

    return RunPaths.from_config(config(profile, exp))


def gt_masks(smoke_world: Path, size: int = MASK_SIZE) -> torch.Tensor:
    from utils.data import BrainVideoData
    from utils.resize import resize_masks_majority

    return resize_masks_majority(BrainVideoData(smoke_world, 1).key_object_masks("test", range(N_CLIPS)), size)


def fake_stage3(smoke_world: Path, folder: Path, masks: torch.Tensor | None = None,
                concept_probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """A complete stage-3 folder (manifest without dependencies) for the first N_CLIPS test clips: keyframes, blurry
    videos, mask probabilities (default: the GT key-object masks at MASK_SIZE), concept probabilities (default: the
    labels at 0.9 / 0.1), GPT-2-style captions and concepts.json."""
    from utils.data import BrainVideoData
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.manifest import StageRecorder

    data = BrainVideoData(smoke_world, 1)
    gt = data.frames("test", range(N_CLIPS))  # (N, F, 3, R, R)
    res = gt.shape[-1]
    blurry = F.interpolate(F.avg_pool2d(gt.flatten(0, 1), 4), size=(res, res), mode="bilinear").view_as(gt)
    labels = data.concept_labels("test")[:N_CLIPS]
    tensors = {
        "keyframes": gt[:, 2].contiguous(),
        "blurry_videos": blurry.half(),
        "masks": (gt_masks(smoke_world) if masks is None else masks).half(),
        "concept_probs": 0.1 + 0.8 * labels if concept_probs is None else concept_probs,
    }
    config = {"sample": {"mask_soft_low": 0.5}}
    recorder = StageRecorder("3", folder, "fake", config).begin()
    for name, value in tensors.items():
        recorder.add_output(atomic_save_safetensors(folder / f"{name}.safetensors", {name: value.contiguous()}))
    captions = [str(c) for c in data.captions("test")[:N_CLIPS]]
    captions[1] = "a purple ball"
    recorder.add_output(atomic_write_json(folder / "captions.json", {"captions": captions}))
    concepts = {"classes": data.concept_classes, "mask_names": [data.concept_classes[0]] * N_CLIPS}
    recorder.add_output(atomic_write_json(folder / "concepts.json", concepts))
    recorder.extra["n_clips"] = N_CLIPS
    recorder.finish()
    return tensors


def diagnose(profile: Path, exp: str, *overrides: str) -> dict:
    from pipeline.diagnostics import diagnose, results_path

    diagnose(config(profile, exp, *overrides))
    return json.loads(results_path(paths_of(profile, exp)).read_text())


def test_refuses_without_stage3(profile: Path) -> None:
    from pipeline.diagnostics import diagnose
    from utils.errors import StageOrderError

    with pytest.raises(StageOrderError, match="stage 3"):
        diagnose(config(profile, "no_stage3"))
    assert not paths_of(profile, "no_stage3").stage_dir("e").exists(), "nothing written before the check"


@pytest.fixture(scope="module")
def perfect(smoke_world: Path, profile: Path) -> dict:
    """Masks equal to the GT key-object masks; concepts right at 0.9 / 0.1."""
    fake_stage3(smoke_world, paths_of(profile, "perfect").stage_dir("3"))
    return diagnose(profile, "perfect")


def test_outputs_and_manifest(profile: Path, perfect: dict) -> None:
    from pipeline.report import report_path
    from utils.manifest import read_manifest, require_stage

    paths = paths_of(profile, "perfect")
    folder = paths.stage_dir("e")
    assert folder.name == "diagnostics_enhance"
    manifest = read_manifest(folder)
    assert manifest["stage"] == "e" and manifest["depends_on"] == ["3"]
    outputs = set(manifest["outputs"])
    assert {"diagnostics.json", "concepts.png", "dice.png", "panels/clip_0000.png", "panels/clip_0001.png"} <= outputs
    assert not (folder / "panels" / "clip_0002.png").exists(), "num_panels=2 from the profile's stagee block"
    assert any(p.endswith("key_objects_masks_test.pt") for p in manifest["inputs"])
    require_stage("e", folder, paths.stage_dirs(), "{stage}")
    assert perfect["n_clips"] == N_CLIPS and perfect["mode"] == "enhance"
    assert report_path(paths).exists(), "stage e refreshes the run's report"


def test_perfect_masks_and_concepts(smoke_world: Path, perfect: dict) -> None:
    from utils.data import BrainVideoData

    dice = perfect["key_object_dice"]
    assert [d["dice"] for d in dice["per_clip"]] == [1.0] * N_CLIPS and dice["mean"] == 1.0
    data = BrainVideoData(smoke_world, 1)
    assert [d["key_object"] for d in dice["per_clip"]] == data.key_object_names("test")[:N_CLIPS]
    labels = data.concept_labels("test")[:N_CLIPS]
    rows = {r["class"]: r for r in perfect["concepts"]["per_class"]}
    for c, name in enumerate(data.concept_classes):
        positives = int(labels[:, c].sum())
        assert rows[name]["positives"] == positives == rows[name]["predicted"] == rows[name]["tp"]
        assert rows[name]["recall"] == (1.0 if positives else None), "NaN (no positives) is written as null"
    assert perfect["concepts"]["micro_f1"] == 1.0


def test_hand_computed_recall_precision_and_dice(smoke_world: Path, profile: Path) -> None:
    """Clip 0's mask empty (Dice 0 against a non-empty GT); class c* predicted for every clip (precision = share of
    true positives) and missed for none (recall 1); class c2 never predicted (recall 0, precision undefined)."""
    from utils.data import BrainVideoData

    data = BrainVideoData(smoke_world, 1)
    labels = data.concept_labels("test")[:N_CLIPS]
    masks = gt_masks(smoke_world).clone()
    assert masks[0].sum() > 0, "the smoke world's first test clip has a key object"
    masks[0] = 0.0
    counts = labels.sum(dim=0)
    c_all, c_none = int(counts.argmax()), int(torch.nonzero(counts).flatten()[-1])
    assert c_all != c_none
    probs = 0.1 + 0.8 * labels
    probs[:, c_all], probs[:, c_none] = 0.7, 0.2
    fake_stage3(smoke_world, paths_of(profile, "hand").stage_dir("3"), masks=masks, concept_probs=probs)
    out = diagnose(profile, "hand", "sample.num_panels=0")
    per_clip = [d["dice"] for d in out["key_object_dice"]["per_clip"]]
    assert per_clip == [0.0] + [1.0] * (N_CLIPS - 1)
    assert out["key_object_dice"]["mean"] == pytest.approx((N_CLIPS - 1) / N_CLIPS)
    rows = {r["class"]: r for r in out["concepts"]["per_class"]}
    a, b = rows[data.concept_classes[c_all]], rows[data.concept_classes[c_none]]
    assert a["recall"] == 1.0 and a["predicted"] == N_CLIPS
    assert a["precision"] == pytest.approx(float(counts[c_all]) / N_CLIPS)
    assert b["recall"] == 0.0 and b["predicted"] == 0 and b["precision"] is None
    assert not (paths_of(profile, "hand").stage_dir("e") / "panels").exists()


def test_captions_beside_ground_truth(smoke_world: Path, perfect: dict) -> None:
    from utils.data import BrainVideoData

    caps = perfect["captions"]["per_clip"]
    gt = [str(c) for c in BrainVideoData(smoke_world, 1).captions("test")[:N_CLIPS]]
    assert [c["ground_truth"] for c in caps] == gt
    assert caps[1]["decoded"] == "a purple ball" and caps[0]["decoded"] == gt[0]
    assert caps[0]["bleu4"] == pytest.approx(1.0) and caps[1]["bleu4"] < 0.5
    assert 0 < perfect["captions"]["corpus_bleu4"] < 1


def test_masked_blurry_uses_the_soft_mask() -> None:
    from pipeline.diagnostics import masked_blurry

    blurry = torch.ones(1, 2, 3, 4, 4)
    probs = torch.zeros(1, 2, 2, 2)
    probs[0, :, 0, 0] = 0.9  # top-left quarter kept
    out = masked_blurry(blurry, probs, low=0.5, threshold=0.5)
    assert out[0, :, :, :2, :2].eq(1.0).all() and out[0, :, :, 2:, :].eq(0.5).all()


def test_command_line(smoke_world: Path, profile: Path) -> None:
    """gen_decoupled_outputs.py through run_stage, and a one-line error when stage 3 is missing."""
    import gen_decoupled_outputs
    from utils.cli import run_stage
    from utils.stage_configs import DiagnosticsConfig

    fake_stage3(smoke_world, paths_of(profile, "cli").stage_dir("3"))
    argv = ["--profile", str(profile), "--subj", "1", "--exp", "cli", "--mode", "enhance"]
    assert run_stage(DiagnosticsConfig, gen_decoupled_outputs.main, argv=[*argv, "--set", "sample.num_panels=1"]) == 0
    assert (paths_of(profile, "cli").stage_dir("e") / "panels" / "clip_0000.png").exists()
    missing = ["--profile", str(profile), "--subj", "1", "--exp", "nothing", "--mode", "motion"]
    assert run_stage(DiagnosticsConfig, gen_decoupled_outputs.main, argv=missing) != 0
