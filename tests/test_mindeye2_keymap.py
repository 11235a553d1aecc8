"""MindEye2 `last.pth` → NEURONS key map, checked against the key/shape manifest on the meta device, and paper-size
parameter counts (meta device only)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from models.brain import NeuronsBrainModel, parameter_counts
from models.mindeye2_keymap import load_mindeye2_backbone_prior
from models.sizes import STAGE1_PARTS, FoundationDims, brain_config
from utils.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]
MANIFEST_NAME = "mindeye2_subj01_last_pth.tsv"
SUBJ1_VOXELS = 13447  # CC2017 subject 1, as the data would report it
DROPPED_PREFIXES = (
    "ridge.",
    "backbone.blin1.",
    "backbone.bnorm.",
    "backbone.bupsampler.",
    "backbone.b_maps_projector.",
)


MANIFEST = Path(__file__).resolve().parent / "fixtures" / MANIFEST_NAME


def manifest_state_dict() -> dict[str, torch.Tensor]:
    sd = {}
    for line in MANIFEST.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        sd[key] = torch.empty(json.loads(shape), dtype=getattr(torch, dtype), device="meta")
    return sd


def manifest_header_numbers() -> dict[str, int]:
    """`# numel[prefix]=N` lines and the unique parameter count of the header."""
    text = MANIFEST.read_text()
    out = {m[1]: int(m[2]) for m in re.finditer(r"^# (numel\[[\w.]+\])=(\d+)$", text, flags=re.M)}
    out["parameters"] = int(re.search(r"parameters\(unique.*?\)\)=(\d+)", text)[1])
    return out


def paper_model(**kw) -> NeuronsBrainModel:
    with torch.device("meta"):
        return NeuronsBrainModel(brain_config("paper", n_voxels=(SUBJ1_VOXELS,), n_classes=51, **kw))


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return manifest_state_dict()


def test_manifest_loads_strictly_into_the_paper_model(state_dict, caplog):
    assert len(state_dict) == 249
    model = paper_model()
    with caplog.at_level(logging.INFO, logger="models.mindeye2_keymap"):
        report = load_mindeye2_backbone_prior(state_dict, model, assign=True)
    expected_dropped = {k for k in state_dict if k.startswith(DROPPED_PREFIXES)}
    assert set(report.dropped) == expected_dropped and len(expected_dropped) == 102
    assert report.missing == {"backbone": [], "diffusion_prior": []}
    assert report.unexpected == {"backbone": [], "diffusion_prior": []}
    loaded = {f"{t}.{k}" for t, keys in report.loaded.items() for k in keys}
    assert loaded == set(state_dict) - expected_dropped  # everything else is loaded
    assert set(model.backbone.state_dict()) == {k[len("backbone.") :] for k in loaded if k.startswith("backbone.")}
    assert len(model.diffusion_prior.state_dict()) == 85
    assert model.backbone.backbone_linear.weight.shape == (256 * 1664, 4096)
    assert "dropped 88 keys under backbone.bupsampler" in caplog.text


def test_stage1_model_drops_the_prior_and_reports_why(state_dict):
    model = paper_model(parts=STAGE1_PARTS)
    report = load_mindeye2_backbone_prior({"model_state_dict": state_dict}, model, assign=True)
    prior_keys = {k for k in state_dict if k.startswith("diffusion_prior.")}
    assert prior_keys <= set(report.dropped) and list(report.loaded) == ["backbone"]
    assert all("no diffusion_prior" in report.dropped[k] for k in prior_keys)


def test_unknown_keys_and_shape_mismatches_raise(state_dict):
    with pytest.raises(WeightsError, match="match no mapping rule"):
        load_mindeye2_backbone_prior(
            {**state_dict, "backbone.new_head.weight": torch.empty(1)}, paper_model(), assign=True
        )
    with torch.device("meta"):
        small = NeuronsBrainModel(
            brain_config("smoke", n_voxels=(10,), n_classes=3, dims=FoundationDims(16, 24, 20, 4, 6))
        )
    with pytest.raises(WeightsError, match="do not fit"):
        load_mindeye2_backbone_prior(state_dict, small, assign=True)


def test_paper_parameter_counts():
    counts = parameter_counts(paper_model())
    assert counts["ridge"] == 55_083_008  # 13447·4096 + 4096 ≈ 55.1 M
    assert counts["backbone.mixer_blocks1"] == 134_283_264 and counts["backbone.mixer_blocks2"] == 24
    assert counts["backbone.backbone_linear"] == 1_745_256_448
    assert counts["backbone.clip_proj"] == 8_321_664
    assert counts["ridge"] + counts["backbone"] == pytest.approx(1.94e9, rel=0.01)
    assert counts["diffusion_prior"] == 259_865_200  # + the 16 rotary freqs, kept as a buffer
    assert counts["clipproj"] == 1664 * 1280 and counts["motion_proj"] == 1664 * 1664 * 6 + 1664 * 6
    trainable_stage2 = sum(
        counts[p] for p in ("diffusion_prior", "text_dec", "text_seg_dec", "motion_proj", "classifier")
    )
    assert trainable_stage2 == pytest.approx(0.41e9, rel=0.02)


def _mindeye2_blurry_branch() -> nn.Module:
    """MindEye2's blurry branch (which NEURONS drops), rebuilt from its published construction."""
    from diffusers.models.autoencoders.vae import Decoder

    branch = nn.Module()
    branch.blin1 = nn.Linear(4096, 64 * 7 * 7)
    branch.bnorm = nn.GroupNorm(1, 64)
    branch.bupsampler = Decoder(
        in_channels=64,
        out_channels=4,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
    )
    branch.b_maps_projector = nn.Sequential(
        nn.Conv2d(64, 512, 1, bias=False),
        nn.GroupNorm(1, 512),
        nn.ReLU(),
        nn.Conv2d(512, 512, 1, bias=False),
        nn.GroupNorm(1, 512),
        nn.ReLU(),
        nn.Conv2d(512, 512, 1, bias=True),
    )
    return branch


def test_mindeye2_total_is_reproduced(state_dict):
    """MindEye2's own construction: our backbone + prior with its 15724-voxel ridge, plus its blurry branch."""
    header = manifest_header_numbers()
    with torch.device("meta"):
        ours = NeuronsBrainModel(
            brain_config("paper", n_voxels=(15724,), n_classes=51, parts=("ridge", "backbone", "diffusion_prior"))
        )
        blurry = _mindeye2_blurry_branch()
    blurry_sd = {f"backbone.{k}": v for k, v in blurry.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in blurry_sd.items()} == {
        k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(DROPPED_PREFIXES[1:])
    }
    assert {k: tuple(v.shape) for k, v in ours.ridge.state_dict().items()} == {
        k[len("ridge.") :]: tuple(v.shape) for k, v in state_dict.items() if k.startswith("ridge.")
    }
    rotary = ours.diffusion_prior.net.causal_transformer.layers[0][0].rotary_emb.freqs.numel()  # a Parameter there
    total = sum(p.numel() for p in ours.parameters()) + rotary + sum(p.numel() for p in blurry.parameters())
    assert total == header["parameters"] == 2_227_294_844
    assert sum(p.numel() for p in ours.ridge.parameters()) == header["numel[ridge]"]
    backbone = sum(p.numel() for p in ours.backbone.parameters()) + sum(p.numel() for p in blurry.parameters())
    assert backbone == header["numel[backbone]"]


def test_paper_parameter_counts_of_a_three_subject_model(state_dict):
    """One model for subjects 1-3 at paper scale (issue 18): three ridges (13,447 / 14,828 / 9,114 voxels, MindEye2's
    ``ridge.linears.<k>`` layout) and one shared backbone, prior and heads; MindEye2's ``last.pth`` still fills the
    subject-1 slot's model parts."""
    from utils.data_catalog import VOXELS

    with torch.device("meta"):
        model = NeuronsBrainModel(brain_config("paper", n_voxels=tuple(VOXELS[k] for k in (1, 2, 3)), n_classes=51))
    counts, single = parameter_counts(model), parameter_counts(paper_model())
    assert counts["ridge"] == sum((VOXELS[k] + 1) * 4096 for k in (1, 2, 3)) == 153_157_632
    assert counts["ridge.linears.1"] == (14_828 + 1) * 4096 and counts["ridge.linears.2"] == (9_114 + 1) * 4096
    shared = {k: v for k, v in counts.items() if not k.startswith("ridge") and k != "total"}
    assert shared == {k: v for k, v in single.items() if not k.startswith("ridge") and k != "total"}, "the rest"
    assert counts["total"] - single["total"] == counts["ridge"] - single["ridge"] == 98_074_624
    assert [k for k in model.state_dict() if k.startswith("ridge.")] == [
        f"ridge.linears.{i}.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    report = load_mindeye2_backbone_prior(state_dict, model, assign=True)
    assert report.missing == {"backbone": [], "diffusion_prior": []}
