"""Toy metric, captioner and video roles (frame_classifier, video_classifier, clip_pcc, blip2, video): build them at
smoke scale once (plus the toy VAE they depend on), reload them through the stage loader, check shapes and quality on
the smoke world's held-out TEST split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from utils.data_catalog import frames_file

EXTRA = ("frame_classifier", "video_classifier", "clip_pcc", "blip2", "video")


@pytest.fixture(scope="module")
def extra_weights(smoke_world: Path, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    from models.foundation.toy.build import build_toy_weights

    root = tmp_path_factory.mktemp("toy_weights_extra") / "toy_smoke"
    summary = build_toy_weights(smoke_world, root, "smoke", seed=0, progress=False, num_threads=1, roles=EXTRA)
    return root, summary


@pytest.fixture(scope="module")
def quality(smoke_world: Path, extra_weights) -> dict[str, Any]:
    from models.foundation.toy.evaluate import evaluate_toy_weights

    return evaluate_toy_weights(smoke_world, extra_weights[0], "smoke", roles=EXTRA)


@pytest.fixture(scope="module")
def test_frames(smoke_world: Path) -> torch.Tensor:
    return torch.load(smoke_world / frames_file("test"), weights_only=True)  # (N, F, 3, R, R)


def test_build_subset_with_dependencies_and_rerun_is_noop(smoke_world: Path, extra_weights) -> None:
    from models.foundation.toy.build import build_toy_weights, with_dependencies
    from models.foundation.toy.common import MANIFEST
    from utils.errors import ConfigError

    root, summary = extra_weights
    assert set(summary["roles"]) == {"vae", *EXTRA}, "video depends on the toy VAE"
    assert all((root / r / MANIFEST).is_file() for r in summary["roles"])
    assert not list(root.glob(".*")), "no temporary folders are left behind"
    start = time.perf_counter()
    again = build_toy_weights(smoke_world, root, "smoke", seed=0, progress=False, roles=EXTRA)
    assert time.perf_counter() - start < 10 and not any(r["built"] for r in again["roles"].values())
    assert with_dependencies(["video", "unclip"]) == ("clip", "vae", "unclip", "video")
    with pytest.raises(ConfigError):
        with_dependencies(["nope"])


def test_frame_classifier_through_stage_loader(extra_weights, test_frames: torch.Tensor) -> None:
    from models.foundation.frame_classifier import FrameClassifierRole
    from models.foundation.registry import build_role

    role = build_role("frame_classifier", "toy", extra_weights[0], "cpu")
    assert isinstance(role, FrameClassifierRole) and role.num_classes >= 60
    assert role.labels[0] == "red ball on water, 1 object"
    probs = role.probs(torch.nn.functional.interpolate(test_frames[:3, 0], size=48))  # any size: the processor resizes
    assert probs.shape == (3, role.num_classes)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))


def test_video_classifier_through_stage_loader(extra_weights, test_frames: torch.Tensor) -> None:
    from models.foundation.registry import build_role
    from models.foundation.video_classifier import VideoClassifierRole

    role = build_role("video_classifier", "toy", extra_weights[0], "cpu")
    assert isinstance(role, VideoClassifierRole) and role.num_classes >= 60
    assert role.num_frames == test_frames.shape[1] and role.labels[0] == "red ball moving left on water"
    assert role.probs(test_frames[:2]).shape == (2, role.num_classes)


def test_clip_pcc_through_stage_loader(extra_weights, test_frames: torch.Tensor) -> None:
    from transformers import CLIPModel

    from models.foundation.clip_pcc import ClipPccRole
    from models.foundation.registry import build_role

    role = build_role("clip_pcc", "toy", extra_weights[0], "cpu")
    assert isinstance(role, ClipPccRole) and isinstance(role.model, CLIPModel)
    assert role.image_features(test_frames[0]).shape == (test_frames.shape[1], role.embed_dim)


def test_blip2_through_stage_loader(extra_weights, test_frames: torch.Tensor) -> None:
    from transformers import Blip2ForConditionalGeneration

    from models.foundation.blip2 import Blip2Role
    from models.foundation.registry import build_role

    role = build_role("blip2", "toy", extra_weights[0], "cpu")
    assert isinstance(role, Blip2Role) and isinstance(role.model, Blip2ForConditionalGeneration)
    captions = role.caption(test_frames[:2, 2])
    assert len(captions) == 2 and all(c and "<image>" not in c for c in captions)


def test_video_through_stage_loader(extra_weights, test_frames: torch.Tensor) -> None:
    from diffusers import SparseControlNetModel, UNetMotionModel

    from models.foundation.registry import build_role
    from models.foundation.video import PerFrameGroupNorm, VideoRole

    role = build_role("video", "toy", extra_weights[0], "cpu")
    assert isinstance(role, VideoRole) and isinstance(role.unet, UNetMotionModel)
    assert isinstance(role.controlnet, SparseControlNetModel)
    assert role.controlnet.config.use_simplified_condition_embedding
    assert role.num_frames == test_frames.shape[1] and role.downsample == 4
    assert role.scheduler.config.prediction_type == "v_prediction"
    assert type(role.controlnet.down_blocks[0].motion_modules[0].norm) is PerFrameGroupNorm
    key = test_frames[:2, 0]
    init = role.encode_frames(test_frames[:2]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w): an img2img start
    out = role.generate(
        ["a red ball rolls left over blue water"] * 2,
        "",
        key,
        init_latents=init,
        generator=torch.Generator().manual_seed(0),
        num_steps=3,
        guidance=3.0,
    )
    assert out.shape == (2, role.num_frames, 3, *key.shape[-2:])
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_quality_classifiers_beat_chance_on_held_out_clips(quality) -> None:
    """At smoke scale (48 training clips of ~15 scenes) the held-out scenes are mostly unseen combinations: the
    background is learned, the joint class only partly (toy-scale figures are in ``evaluate_toy_weights``)."""
    for role in ("frame_classifier", "video_classifier"):
        q = quality[role]
        assert q["two_way"] > 0.55 and q["acc_background"] > 0.5, (role, q)


def test_quality_clip_pcc_features_follow_the_clip(quality) -> None:
    q = quality["clip_pcc"]
    assert q["temporal_two_way"] > 0.8 and q["caption_two_way"] > 0.6, q


def test_quality_blip2_captions_share_words_with_the_truth(quality) -> None:
    q = quality["blip2"]
    assert q["f1_own"] > q["f1_other"] + 0.02, q


def test_quality_video_keeps_the_keyframe(quality) -> None:
    q = quality["video"]
    assert q["in_range"] and q["frame0_two_way"] > 0.7 and q["frame0_mse_own"] < q["frame0_mse_other"], q
