"""Toy foundation roles: build at smoke scale once, load through the stage loader, check shapes and quality."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from utils.data_catalog import frames_file

ROLES = ("clip", "vae", "gpt2", "unclip")


@pytest.fixture(scope="session")
def smoke_weights(smoke_world: Path) -> tuple[Path, dict[str, Any]]:
    """The session's one fresh build of every smoke role (shared with the stage tests in CI) and its summary."""
    from tests.smoke_env import built_smoke_weights

    return built_smoke_weights(smoke_world)


@pytest.fixture(scope="session")
def quality(smoke_world: Path, smoke_weights) -> dict[str, Any]:
    from models.foundation.toy.common import torch_threads
    from models.foundation.toy.evaluate import evaluate_toy_weights

    with torch_threads(1):
        return evaluate_toy_weights(smoke_world, smoke_weights[0], "smoke")


def test_build_writes_every_role_and_rerun_is_noop(smoke_world: Path, smoke_weights) -> None:
    from models.foundation.toy.build import build_toy_weights
    from models.foundation.toy.common import MANIFEST

    root, summary = smoke_weights
    assert all(summary["roles"][r]["built"] for r in ROLES)
    assert all((root / r / MANIFEST).is_file() for r in ROLES)
    assert not list(root.glob(".*")), "no temporary folders are left behind"
    start = time.perf_counter()
    again = build_toy_weights(smoke_world, root, "smoke", seed=0, progress=False)
    assert time.perf_counter() - start < 10
    assert not any(again["roles"][r]["built"] for r in ROLES)
    assert {r: again["roles"][r]["config_hash"] for r in ROLES} == {
        r: summary["roles"][r]["config_hash"] for r in ROLES
    }


def test_manifest_detects_tampering_and_hash_follows_seed(smoke_weights, tmp_path: Path) -> None:
    from models.foundation.toy.build import role_hashes
    from models.foundation.toy.common import is_complete

    root, summary = smoke_weights
    copy = tmp_path / "gpt2"
    shutil.copytree(root / "gpt2", copy)
    assert is_complete(copy, summary["roles"]["gpt2"]["config_hash"])
    assert not is_complete(copy, "0" * 16)
    with open(copy / "config.json", "a", encoding="utf-8") as fh:
        fh.write(" ")
    assert not is_complete(copy, summary["roles"]["gpt2"]["config_hash"])
    a, b = role_hashes("w", "smoke", 0), role_hashes("w", "smoke", 1)
    assert a == role_hashes("w", "smoke", 0) and all(a[r] != b[r] for r in ROLES)


def test_unknown_scale_is_a_config_error(smoke_world: Path, tmp_path: Path) -> None:
    from models.foundation.toy.build import build_toy_weights
    from utils.errors import ConfigError

    with pytest.raises(ConfigError):
        build_toy_weights(smoke_world, tmp_path, "paper", seed=0, progress=False)


def test_clip_role_through_stage_loader(smoke_world: Path, smoke_weights) -> None:
    from models.foundation.clip import ClipRole
    from models.foundation.clip.toy import load_proj
    from models.foundation.registry import build_role

    role = build_role("clip", "toy", smoke_weights[0], "cpu")
    assert isinstance(role, ClipRole)
    frames = torch.load(smoke_world / frames_file("test"), weights_only=True)[:2]  # (2, F, 3, R, R)
    tokens = role.image_tokens(frames)
    assert tokens.shape == (2, frames.shape[1], role.num_tokens, role.token_dim)
    text = role.text_pooled(["a red ball rolls left over blue water", "a yellow bird flies up in night sky"])
    assert text.shape == (2, role.text_dim)
    ids = role.tokenize(["a red ball"])
    assert ids.shape == (1, role.context_length) and ids[0, 0] == 49406 and 49407 in ids[0]
    proj = load_proj(smoke_weights[0])
    assert proj.shape == (role.token_dim, role.text_dim) and proj.dtype == torch.float32
    assert not any(p.requires_grad for p in role.model.parameters())


def test_vae_role_through_stage_loader(smoke_world: Path, smoke_weights) -> None:
    from models.foundation.registry import build_role
    from models.foundation.vae import VaeRole

    role = build_role("vae", "toy", smoke_weights[0], "cpu")
    assert isinstance(role, VaeRole) and role.downsample == 4
    frames = torch.load(smoke_world / frames_file("test"), weights_only=True)[:2]
    z = role.encode(frames)
    assert z.shape == (*frames.shape[:2], role.latent_channels, 8, 8)
    assert 0.3 < float(z.std()) < 3.0, "scaling_factor gives roughly unit-variance latents"
    rec = role.decode(z)
    assert rec.shape == frames.shape and float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0


def test_gpt2_role_through_stage_loader(smoke_weights) -> None:
    from models.foundation.gpt2 import Gpt2Role
    from models.foundation.gpt2.toy import EOT
    from models.foundation.registry import build_role

    role = build_role("gpt2", "toy", smoke_weights[0], "cpu")
    assert isinstance(role, Gpt2Role) and role.vocab_size > EOT
    ids = torch.tensor([[49406, 320, 736, 49407]])
    assert role.embed_tokens(ids).shape == (1, 4, role.hidden_size)
    assert role.model(input_ids=ids).logits.shape == (1, 4, role.vocab_size)


def test_unclip_role_through_stage_loader(smoke_world: Path, smoke_weights) -> None:
    from models.foundation.registry import build_role
    from models.foundation.unclip import UnclipRole

    root = smoke_weights[0]
    clip = build_role("clip", "toy", root, "cpu")
    role = build_role("unclip", "toy", root, "cpu")
    assert isinstance(role, UnclipRole) and role.token_dim == clip.token_dim
    frames = torch.load(smoke_world / frames_file("test"), weights_only=True)[:2, 2]
    tokens = clip.image_tokens(frames)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = role.reconstruct(tokens, gens)
    assert out.shape == frames.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # per-sample generators: a sample does not depend on the batch it is drawn in
    alone = role.reconstruct(tokens[1:], [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(alone, out[1:], atol=1e-4, rtol=0)


def test_quality_clip_retrieval_beats_chance(smoke_world: Path, smoke_weights) -> None:
    """Caption -> frame retrieval through the tokens->text projection. At smoke scale (48 training clips, seconds of
    training) the toy CLIP does not yet generalise to held-out scenes, so this checks the training scenes; held-out
    figures of the toy scale are in the report of ``evaluate_toy_weights``."""
    from models.foundation.toy.evaluate import evaluate_toy_weights

    out = evaluate_toy_weights(smoke_world, smoke_weights[0], "smoke", roles=("clip",), split="train")
    q = out["clip"]["via_proj"]
    assert q["two_way"] > 0.75, q
    assert q["top1"] > 3 * q["top1_chance"], q


def test_quality_vae_reconstructs(smoke_world: Path, quality) -> None:
    """At smoke scale (120 steps) the VAE gets about 13.5 dB, the global mean training frame 11 dB (the toy scale is
    measured by ``evaluate_toy_weights``)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    frames = torch.load(smoke_world / frames_file("test"), weights_only=True).flatten(0, 1)[:512]
    train_mean = torch.load(smoke_world / frames_file("train"), weights_only=True).mean(dim=(0, 1))
    baseline = float(peak_signal_noise_ratio(train_mean.expand_as(frames), frames, data_range=1.0))
    assert quality["vae"]["psnr"] > baseline + 1.5 and quality["vae"]["ssim"] > 0.25, (quality["vae"], baseline)


def test_quality_gpt2_perplexity_far_below_uniform(quality) -> None:
    q = quality["gpt2"]
    assert q["perplexity"] < q["uniform_perplexity"] / 100, q


def test_quality_unclip_samples_match_their_frame(quality) -> None:
    q = quality["unclip"]
    assert q["two_way"] > 0.6 and q["mse_own"] < q["mse_other"], q


def test_weights_hash_follows_the_training_stimuli_not_the_fmri(smoke_world: Path, tmp_path: Path) -> None:
    """Issue 17: worlds that differ only in their fMRI settings (SNR, voxels) share one set of toy weights; a world
    with other stimuli does not."""
    from models.foundation.toy.data import world_hash
    from tasks_construction.toy_cortex.build import build_world
    from utils.toy_world import make_config

    base = world_hash(smoke_world)
    for name, overrides in {"snr": {"snr": 0.1}, "voxels": {"voxels": (200, 150, 120)}, "seed": {"seed": 1}}.items():
        build_world(make_config("smoke", **overrides), tmp_path / name, progress=False)
    assert world_hash(tmp_path / "snr") == base and world_hash(tmp_path / "voxels") == base
    assert world_hash(tmp_path / "seed") != base
    (tmp_path / "snr" / "world.json").unlink()  # without world.json the files themselves are hashed
    assert world_hash(tmp_path / "snr") == base
