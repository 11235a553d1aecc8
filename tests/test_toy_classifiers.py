"""Toy frame / video classifiers: their labels (speed factor, class names), the pieces that make the video classifier
see motion (augmentation label remapping, motion-energy filters, the factorised head) and the test-split ceiling the
builder records in their manifests. The trained models are the session's smoke metric weights (``metric_weights``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models.foundation.frame_classifier import toy as toy_fc
from models.foundation.video_classifier import toy as toy_vc
from utils.data_catalog import toy_scenes_file


def test_speed_factor_splits_main_object_speed_at_midpoint_of_range(smoke_world: Path) -> None:
    cfg = json.loads((smoke_world / "world.json").read_text())["config"]
    threshold = toy_fc.speed_threshold(smoke_world)
    assert threshold == pytest.approx(0.5 * (cfg["min_speed_frac"] + cfg["max_speed_frac"]) * cfg["resolution"])
    for split in ("train", "test"):
        factors = toy_fc.load_factors(smoke_world, split)
        expected = torch.empty_like(factors.speed)
        for shot in json.loads((smoke_world / toy_scenes_file(split)).read_text()):
            main = next(o for o in shot["objects"] if o["label"] == 1)
            fast = math.hypot(main["vx"], main["vy"]) >= threshold
            expected[shot["start_clip"] : shot["start_clip"] + shot["n_clips"]] = int(fast)
        assert torch.equal(factors.speed, expected), split
    assert set(toy_fc.load_factors(smoke_world, "train").speed.tolist()) == {0, 1}


def test_video_classes_with_and_without_speed(smoke_world: Path) -> None:
    f = toy_fc.load_factors(smoke_world, "train")
    plain, fast = toy_vc.video_class_names(f), toy_vc.video_class_names(f, speed=True)
    assert len(plain) == 6 * 4 * 6 and len(fast) == 6 * 4 * 2 * 6 and len(set(fast)) == len(fast)
    assert plain[0] == "red ball moving left on water" and fast[0] == "red ball moving left (slow) on water"
    assert toy_vc.video_factor_names(True) == ("category", "direction", "speed", "background")
    labels = toy_vc.video_labels(f, speed=True)
    for i in range(len(labels)):  # every clip's class name spells its own factors
        name = fast[int(labels[i])]
        assert name.startswith(f"{f.colours[f.category[i]]} {f.categories[f.category[i]]} ")
        assert f"moving {toy_fc.DIRECTIONS[f.direction[i]]} ({toy_fc.SPEEDS[f.speed[i]]})" in name
        assert name.endswith(f" on {f.backgrounds[f.background[i]]}")
    assert toy_vc.has_speed_classes(len(fast), f) and not toy_vc.has_speed_classes(len(plain), f)
    with pytest.raises(ValueError, match="video classes"):
        toy_vc.has_speed_classes(100, f)
    assert len(toy_fc.frame_class_names(f)) == 6 * 6 * 3


def test_factorised_head_folds_into_one_linear_with_the_same_logits() -> None:
    torch.manual_seed(0)
    head = toy_fc.FactorisedHead(8, (2, 3, 4))
    h = torch.randn(5, 8)
    logits = head(h)
    assert logits.shape == (5, 24)
    torch.testing.assert_close(head.fold()(h), logits)
    # independent factors: the joint log-probability is the sum of the factors' own log-probabilities
    own = [hd(h).log_softmax(-1) for hd in head.heads]
    joint = (own[0][:, :, None, None] + own[1][:, None, :, None] + own[2][:, None, None, :]).reshape(5, -1)
    torch.testing.assert_close(logits.log_softmax(-1), joint)


def _moving_squares(direction: torch.Tensor, frames: int = 6, size: int = 32, step: int = 2) -> torch.Tensor:
    """``(B, F, 3, R, R)`` clips of a bright 8 px square on black moving ``step`` px per frame in ``direction``."""
    dx = torch.tensor([-1, 1, 0, 0])[direction] * step
    dy = torch.tensor([0, 0, -1, 1])[direction] * step
    clips = torch.zeros(len(direction), frames, 3, size, size)
    for b in range(len(direction)):
        for t in range(frames):
            x, y = 12 + int(dx[b]) * (t - 2), 12 + int(dy[b]) * (t - 2)
            clips[b, t, :, y : y + 8, x : x + 8] = 1.0
    return clips


def _direction_of(clips: torch.Tensor) -> torch.Tensor:
    """Direction index (see DIRECTIONS) of the bright square's centroid from the first to the last frame."""
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = clips[:, [0, -1], 0]  # (B, 2, R, R)
    cx = (mass * xs).sum((-1, -2)) / mass.sum((-1, -2))
    cy = (mass * ys).sum((-1, -2)) / mass.sum((-1, -2))
    dx, dy = cx[:, 1] - cx[:, 0], cy[:, 1] - cy[:, 0]
    horizontal = torch.where(dx > 0, 1, 0)
    return torch.where(dx.abs() >= dy.abs(), horizontal, torch.where(dy > 0, 3, 2))


def test_augment_remaps_the_direction_label_with_the_motion() -> None:
    direction = torch.arange(4).repeat(16)
    clips = _moving_squares(direction)
    assert torch.equal(_direction_of(clips), direction)
    out, remapped = toy_vc.augment(clips, direction, torch.Generator().manual_seed(0))
    assert torch.equal(_direction_of(out), remapped)
    assert (remapped != direction).float().mean() > 0.5, "most clips change direction under the augmentation"


@pytest.mark.parametrize("polarity", ["bright on dark", "dark on bright"])
def test_motion_filters_carry_the_direction_for_either_contrast(polarity: str) -> None:
    """Summed over the patches, (temporal differences) x (x ramp) is negative for motion to the right and positive
    to the left (It = -v Ix), whatever the sign of the contrast; likewise with the y ramp for down / up."""
    conv = torch.nn.Conv3d(3, 32, kernel_size=(6, 8, 8), stride=(6, 8, 8))
    assert toy_vc.motion_filters(conv, blocks=1, gain=4.0) == 3 * (5 + 2)
    clips = _moving_squares(torch.arange(4))
    clips = clips if polarity == "bright on dark" else 1.0 - clips
    with torch.no_grad():
        feats = conv(clips.permute(0, 2, 1, 3, 4) * 2 - 1)  # (4, 32, 1, 4, 4); red channel's filters are 0..6
    it = feats[:, 0:5].sum(dim=1)
    energy_x, energy_y = (it * feats[:, 5]).sum((-1, -2, -3)), (it * feats[:, 6]).sum((-1, -2, -3))
    left, right, up, down = range(4)
    assert energy_x[right] < 0 < energy_x[left] and energy_y[down] < 0 < energy_y[up], (energy_x, energy_y)
    too_many = toy_vc.ToyVideoClassifierRecipe(hidden_size=16, motion_blocks=1)
    with pytest.raises(ValueError, match="motion channels"):
        toy_vc.freeze_motion_filters(_tiny_videomae(too_many), too_many)


def _tiny_videomae(recipe: toy_vc.ToyVideoClassifierRecipe):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    return VideoMAEForVideoClassification(VideoMAEConfig(**recipe.video_config(32, 6, ["a", "b"])))


def test_trained_video_classifier_keeps_its_motion_filters(metric_weights: Path) -> None:
    from transformers import VideoMAEForVideoClassification

    recipe = toy_vc.RECIPES["smoke"]
    model = VideoMAEForVideoClassification.from_pretrained(metric_weights / "video_classifier")
    assert model.config.hidden_act == recipe.hidden_act and model.config.tubelet_size == 6
    trained = model.videomae.embeddings.patch_embeddings.projection
    fresh = torch.nn.Conv3d(3, recipe.hidden_size, kernel_size=(6, 8, 8), stride=(6, 8, 8))
    n = toy_vc.motion_filters(fresh, recipe.motion_blocks, recipe.motion_gain)
    torch.testing.assert_close(trained.weight[:n], fresh.weight[:n])
    assert not torch.equal(trained.weight[n:], fresh.weight[n:]), "the other channels were trained"


@pytest.mark.parametrize(
    ("role", "factors"),
    [
        ("frame_classifier", ["category", "background", "count"]),
        ("video_classifier", ["category", "direction", "background"]),
    ],
)
def test_manifest_records_the_test_ceiling(smoke_world: Path, metric_weights: Path, role: str, factors) -> None:
    from models.foundation.toy.common import read_manifest
    from models.foundation.toy.evaluate import ceiling_summary, evaluate_toy_weights

    stats = read_manifest(metric_weights / role)["stats"]
    ceiling = stats["test_eval"]
    assert set(ceiling) == {"top1", "chance", "factors"} and set(ceiling["factors"]) == set(factors)
    assert ceiling["chance"] == pytest.approx(1.0 / stats["num_classes"])
    assert all(0.0 <= v <= 1.0 for v in [ceiling["top1"], *ceiling["factors"].values()])
    assert ceiling["factors"]["background"] > 0.5, ceiling  # backgrounds are learned even at smoke scale
    fresh = ceiling_summary(evaluate_toy_weights(smoke_world, metric_weights, "smoke", roles=(role,))[role])
    assert ceiling["top1"] == pytest.approx(fresh["top1"]), "the recorded ceiling is the test-split evaluation"
    assert ceiling["factors"] == pytest.approx(fresh["factors"])
