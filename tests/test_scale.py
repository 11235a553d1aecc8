"""Scale and speed: process-count invariance, memory options (bf16, gradient checkpointing, AdamW variants, stage-2
freezing) and the CLIP-target cache, on tiny models and the ``smoke`` world."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.brain import NeuronsBrainModel, inert_parameters
from models.foundation import role_fingerprint
from models.sizes import FoundationDims, GPT2Dims, brain_config
from tests.smoke_env import SmokeEnv, smoke_env
from utils.clip_target_cache import ClipTargetCache
from utils.data_catalog import frames_file
from utils.errors import ConfigError, DataError
from utils.training import BatchPlan, build_optimizer, one_cycle

DIMS = FoundationDims(16, 24, 20, 4, 6, GPT2Dims(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
PRIOR_PARTS = ("ridge", "backbone", "clipproj", "diffusion_prior")


def tiny_model(dropout: float = 0.15) -> NeuronsBrainModel:
    torch.manual_seed(0)
    cfg = brain_config("smoke", n_voxels=(40,), n_classes=3, dims=DIMS, parts=PRIOR_PARTS)
    model = NeuronsBrainModel(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model.train()


def tiny_loss(model: NeuronsBrainModel, seed: int) -> torch.Tensor:
    """Backbone + prior on fixed random inputs; ``seed`` fixes dropout and the prior's draws."""
    g = torch.Generator().manual_seed(123)
    voxels, targets = torch.randn(6, 40, generator=g), torch.randn(6, 16, 24, generator=g)
    torch.manual_seed(seed)
    preds = model.encode(voxels)
    mse, _ = model.diffusion_prior(preds, targets, torch.Generator().manual_seed(seed))
    return (preds - targets).pow(2).mean() + mse


# ---- process-count invariance ------------------------------------------------------------------------------------
def test_schedule_batches_and_coverage_do_not_depend_on_the_process_count() -> None:
    """The paper's stage-1 numbers: 4,320 clips, batch 120, 30 epochs, on 1 to 8 processes."""
    ref_plan = BatchPlan(4320, 120, 1, seed=42)
    ref_lrs = lrs(ref_plan)
    for n in (2, 4, 8):
        plan = BatchPlan(4320, 120, n, seed=42)
        assert plan.steps_per_epoch == ref_plan.steps_per_epoch == 36
        assert lrs(plan) == ref_lrs  # the same OneCycle schedule, step for step
        for step, shares in enumerate(zip(*(plan.batches(3, r) for r in range(n)))):
            glob = plan.batch_at(3, step)
            assert np.array_equal(np.concatenate(shares), glob)  # shares in rank order = the global batch
            assert all(np.array_equal(glob[plan.share(r)], shares[r]) for r in range(n))
        seen = np.concatenate([plan.batch_at(3, s) for s in range(plan.steps_per_epoch)])
        assert len(set(seen)) == len(seen) == 4320  # every clip exactly once per epoch


def lrs(plan: BatchPlan) -> list[float]:
    from utils.config import load_config
    from utils.stage_configs import Stage1Config

    t = load_config(Stage1Config, "paper").train
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t.max_lr)
    sched, out = one_cycle(opt, t, plan.steps_per_epoch * t.num_epochs), []
    for _ in range(plan.steps_per_epoch * t.num_epochs):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


# ---- memory options on tiny models --------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    grads = {}
    for ckpt in (False, True):
        model = tiny_model()
        model.set_grad_checkpointing(ckpt)
        loss = tiny_loss(model, seed=7)  # dropout is on: checkpointing must replay the same masks
        loss.backward()
        grads[ckpt] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss0, g0), (loss1, g1) = grads[False], grads[True]
    assert loss1 == pytest.approx(loss0, rel=1e-6) and g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    model = tiny_model()
    model.set_grad_checkpointing(True)
    assert model.backbone.grad_checkpointing and model.diffusion_prior.net.causal_transformer.grad_checkpointing


def adamw_run(impl: str, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    from types import SimpleNamespace

    model = tiny_model(dropout=0.0)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad],
                          SimpleNamespace(max_lr=1e-3, weight_decay=0.01, adamw_impl=impl))  # fmt: skip
    losses = []
    for step in range(steps):
        loss = tiny_loss(model, seed=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adamw_implementations_give_the_same_updates() -> None:
    ref_losses, ref = adamw_run("for_loop")
    inert = set(inert_parameters(tiny_model()))  # their gradients are rounding noise (see inert_parameters)
    assert inert and all(n.startswith("backbone.mixer_blocks") for n in inert)
    for impl in ("auto", "foreach", "fused"):
        losses, weights = adamw_run(impl)
        assert losses == pytest.approx(ref_losses, rel=1e-5), impl
        for name in set(ref) - inert:
            torch.testing.assert_close(weights[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{impl} {name}")


def test_8bit_adamw_trains_or_names_its_package() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="bitsandbytes"):
            adamw_run("8bit", steps=1)
        return
    ref_losses, ref = adamw_run("for_loop", steps=3)
    losses, weights = adamw_run("8bit", steps=3)
    assert losses[0] == pytest.approx(ref_losses[0]) and np.isfinite(losses).all()
    # block-wise 8-bit moments: each step moves a weight by about lr (1e-3), so 3 steps stay within 3 lr of fp32 Adam
    assert max((weights[k] - ref[k]).abs().max().item() for k in ref) <= 3e-3 + 1e-6


# ---- the smoke world: stage 1 and 2 with the options, the CLIP-target cache --------------------------------------
@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    yield smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")


@pytest.fixture(scope="module")
def cached_env(env: SmokeEnv, tmp_path_factory) -> SmokeEnv:
    """A copy of the smoke world (mtimes kept) with a CLIP-target cache of every frame of both splits, and the VAE
    latents."""
    from models.foundation import build_role
    from tasks_construction.cache_clip_targets import write_cache

    scratch = tmp_path_factory.mktemp("cached")
    world = scratch / "world"
    shutil.copytree(env.world, world)
    clip, vae = (build_role(role, "toy", env.weights, "cpu") for role in ("clip", "vae"))
    write_cache(world, clip, "toy", env.weights, vae=vae)
    profile = scratch / "cached.yaml"
    profile.write_text(env.profile.read_text().replace(str(env.world), str(world)).replace(
        str(env.exp_root), str(scratch / "EXP")))  # fmt: skip
    return SmokeEnv(world, env.weights, scratch / "EXP", profile)


def config(env: SmokeEnv, stage: str, exp: str, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    return load_config(STAGE_CONFIGS[stage], str(env.profile), ["train.batch_size=8", *overrides], {"exp": exp})


def stage1_losses(cfg, steps: int = 2, train: bool = True) -> list[dict[str, float]]:
    """``steps`` optimiser steps of stage 1 as the loop runs them (autocast, backward, AdamW); their losses."""
    from pipeline import stage1
    from utils.training import seed_everything

    seed_everything(cfg.run.seed)
    s = stage1.setup(cfg)
    plan = BatchPlan(s.data.n_clips("train"), cfg.train.batch_size, 1, cfg.run.seed)
    opt = build_optimizer([p for p in s.model.parameters() if p.requires_grad], cfg.train)
    s.model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    gen, out = torch.Generator().manual_seed(cfg.run.seed), []
    for batch in range(steps):
        with s.accelerator.autocast():
            losses = stage1.step_loss(s, plan, 0, batch, gen)
            if cfg.run.mixed_precision == "bf16":
                assert s.model.encode(s.data.voxels("train")[:2]).dtype == torch.bfloat16
        if train:
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
        out.append({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()})
    return out


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one precision per process; these tests switch it (a real stage runs in its own process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_stage1_trains_with_every_memory_option(env: SmokeEnv) -> None:
    from accelerate.state import AcceleratorState

    plain = stage1_losses(config(env, "1", "opt0"))
    AcceleratorState._reset_state()
    options = ("run.mixed_precision=bf16", "train.grad_checkpointing=true", "train.adamw_impl=fused")
    lean = stage1_losses(config(env, "1", "opt1", *options))
    assert all(np.isfinite(list(r.values())).all() for r in plain + lean)
    assert lean[0]["loss"] == pytest.approx(plain[0]["loss"], rel=0.05)  # bf16 matmuls: ~3 significant digits


def test_cached_and_computed_targets_give_the_same_loss(env: SmokeEnv, cached_env: SmokeEnv) -> None:
    from pipeline.common import ClipTargets, clip_targets

    computed = stage1_losses(config(env, "1", "c0"), steps=1, train=False)[0]
    cfg = config(cached_env, "1", "c1", "data.clip_targets=cache")
    cached = stage1_losses(cfg, steps=1, train=False)[0]
    for key in ("image", "text", "loss"):
        assert cached[key] == pytest.approx(computed[key], rel=2e-3), key  # fp16 targets: ~3 significant digits
    from models.foundation import build_role
    from pipeline import stage1

    s = stage1.setup(config(env, "1", "c2"))
    vae = build_role("vae", "toy", env.weights, "cpu")
    cache = clip_targets(cfg, s.data, s.clip, "cpu", {"train": range(6), "test": [2]}, vae)
    reference = ClipTargets(s.data, s.clip, None, "cpu", vae)
    for split, idx, frames in (("train", [3, 0, 7], range(6)), ("val", [1, 2], 2), ("test", [5, 4], 2)):
        for want, got in ((reference(split, idx, frames), cache(split, idx, frames)),
                          (reference.latents(split, idx), cache.latents(split, idx))):  # fmt: skip
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    assert cache.cache.has_latents("train")


def open_cache(world: Path, weights: Path) -> ClipTargetCache:
    return ClipTargetCache(world, functools.partial(role_fingerprint, impl="toy", weights_root=weights), "smoke")


def test_the_cache_refuses_stale_or_incomplete_targets(cached_env: SmokeEnv, tmp_path: Path) -> None:
    cache = open_cache(cached_env.world, cached_env.weights)
    cache.require("train", [2, 3])
    with pytest.raises(DataError, match="frames .* not \\[6\\]"):
        cache.require("train", [6])
    weights = tmp_path / "weights"
    for role in ("clip", "vae"):
        shutil.copytree(cached_env.weights / role, weights / role)  # mtimes kept: the same weights
    with pytest.raises(DataError, match="come from other VAE weights"):
        os.utime(next((weights / "vae").glob("*.safetensors")), ns=(1, 1))
        open_cache(cached_env.world, weights).has_latents("train")
    with pytest.raises(DataError, match="other clip weights"):
        os.utime(next((weights / "clip").glob("*.safetensors")), ns=(1, 1))
        open_cache(cached_env.world, weights)
    path = cached_env.world / frames_file("test")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    try:
        with pytest.raises(DataError, match="changed after its CLIP targets were cached.*cache_clip_targets"):
            cache.require("test", [2])
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="no CLIP-target cache"):
        open_cache(tmp_path, cached_env.weights)


# ---- stage 2: freezing, memory options, two processes -----------------------------------------------------------
@pytest.fixture(scope="module")
def stage1_exp(env: SmokeEnv) -> str:
    """A finished one-epoch stage 1 (what stage 2 starts from)."""
    from pipeline.stage1 import train

    train(config(env, "1", "scale2", "train.num_epochs=1"))
    return "scale2"


def test_freeze_names_are_checked(env: SmokeEnv) -> None:
    from pipeline.stage2 import FROZEN_PARTS, frozen_parts

    assert frozen_parts(config(env, "2", "x", "train.freeze=[diffusion_prior]")) == (*FROZEN_PARTS, "diffusion_prior")
    with pytest.raises(ConfigError, match="unknown parts \\['gpt2'\\].*text_dec.decoder"):
        frozen_parts(config(env, "2", "x", "train.freeze=[gpt2]"))


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_stage2_trains_with_freezing_and_every_memory_option(env: SmokeEnv, stage1_exp: str) -> None:
    from pipeline import stage2
    from utils.training import seed_everything

    options = ("train.freeze=[text_dec.decoder,classifier]", "run.mixed_precision=bf16",
               "train.grad_checkpointing=true", "train.adamw_impl=fused", "train.num_epochs=1")  # fmt: skip
    cfg = config(env, "2", stage1_exp, *options)
    seed_everything(cfg.run.seed)
    s = stage2.setup(cfg)
    model = s.model
    frozen = ("ridge", "backbone", "clipproj", "text_dec.decoder", "classifier")
    for part in frozen:
        sub = model.get_submodule(part)
        assert not sub.training and not any(p.requires_grad for p in sub.parameters()), part
    assert model.diffusion_prior.training and all(p.requires_grad for p in model.text_dec.clip_project.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(trainable, cfg.train)
    model.set_grad_checkpointing(True)
    plan = BatchPlan(s.data.n_clips("train"), cfg.train.batch_size, 1, cfg.run.seed)
    with s.accelerator.autocast():
        losses = stage2.step_loss(s, plan, 0, 0)
        assert model.motion(torch.zeros(1, *model.diffusion_prior.net.learned_query.shape)).dtype == torch.bfloat16
    assert all(np.isfinite(float(v.detach()) if torch.is_tensor(v) else v) for v in losses.values())
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert not {n for n in changed if n.startswith(frozen)}
    assert {"diffusion_prior", "motion_proj", "text_seg_dec", "text_dec"} <= {n.split(".")[0] for n in changed}


NO_DROPOUT_ENTRY = """
import sys

import torch

from pipeline import stage2
from utils.cli import run_stage
from utils.stage_configs import Stage2Config

build = stage2.build_model


def build_without_dropout(*args, **kwargs):
    model = build(*args, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


stage2.build_model = build_without_dropout
sys.exit(run_stage(Stage2Config, stage2.train, None))
"""


@pytest.mark.slow
@pytest.mark.parametrize("subj", ["1", "1,2,3"])
def test_stage2_on_two_processes_follows_one_process(env: SmokeEnv, stage1_exp: str, tmp_path: Path, subj: str
                                                     ) -> None:  # fmt: skip
    """torchrun, 2 CPU processes (gloo), the same global batch: the contrastive terms, Dice and caption loss are
    computed on the gathered global batch and the prior draws from per-clip generators, so the losses and the final
    weights match 1 process. Dropout is off (masks are drawn per process). Subjects 1-3: batches of 24 (8 clips of
    each), so each process's share spans two subjects' ridges."""
    import json
    import subprocess
    import sys

    from pipeline import stage1
    from utils.checkpoint import read_weights
    from utils.runs import RunPaths

    repo = Path(__file__).resolve().parents[1]
    entry = tmp_path / "stage2_no_dropout.py"
    entry.write_text(NO_DROPOUT_ENTRY)
    batch = "train.batch_size=8" if subj == "1" else "train.batch_size=24"  # 5 steps: float drift stays below 1e-5
    overrides = [batch, "train.num_epochs=1", "train.log_every=1", "train.val_prior_steps=2"]
    subjects = f"run.subj=[{subj}]"
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    if subj == "1":
        src = RunPaths.from_config(config(env, "1", stage1_exp)).stage_dir("1")
    else:
        src = stage1.train(config(env, "1", "s2set_src", subjects, batch, "train.num_epochs=1"))
    runs = {}
    for n in (1, 2):
        exp = f"s2ddp{n}_{subj.replace(',', '')}"
        shutil.copytree(src, RunPaths.from_config(config(env, "1", exp, subjects)).stage_dir("1"))  # mtimes kept
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        args = ["--profile", str(env.profile), "--exp", exp, "--subj", subj, *(f"--set={o}" for o in overrides)]
        done = subprocess.run([*launcher, str(entry), *args], cwd=repo, env=environ, capture_output=True, text=True,
                              timeout=400)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = RunPaths.from_config(config(env, "2", exp, subjects)).stage_dir("2")
    one, two = ([json.loads(x) for x in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in (1, 2))
    assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
    for a, b in zip(one, two):
        assert a.get("lr") == b.get("lr")
        for key in set(a) - {"split", "step", "epoch", "lr"}:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    w1, _ = read_weights(runs[1] / "checkpoints" / "last")
    w2, _ = read_weights(runs[2] / "checkpoints" / "last")
    # Weights whose gradient is zero in exact arithmetic (key biases of softmax attention, biases just before a
    # one-channel-per-group norm, ...) get float rounding noise instead, which Adam scales to steps of about lr:
    # those few elements may drift by up to lr per step; every other element matches to float rounding.
    bound = config(env, "2", "b").train.max_lr * sum(r["split"] == "train" for r in one)
    drifting = total = 0
    for name in w1:
        diff = (w2[name] - w1[name]).abs()
        assert diff.max() <= bound + 1e-6, name
        drifting += int((diff > 1e-5 * w1[name].abs().max() + 1e-7).sum())
        total += diff.numel()
    assert drifting <= 1e-3 * total, (drifting, total)


# ---- issue 19: the benchmark's stage-2 settings and upstream baseline ----------------------------------------------
def test_the_baselines_image_tower_has_bigG_s_parameters() -> None:
    """``bench/train_step.py --upstream-baseline`` runs a torch-only stand-in of CLIP ViT-bigG/14's image tower: at
    paper dims its parameter count is open_clip's (meta device)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    from bench.train_step import BIGG_TOWER, ImageTower

    cfg = open_clip.get_model_config("ViT-bigG-14")
    with torch.device("meta"):
        ours = sum(p.numel() for p in ImageTower(**BIGG_TOWER).parameters())
        theirs = sum(p.numel() for p in _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).parameters())
    assert ours == theirs == 1_844_907_264


@pytest.mark.parametrize("extra", [["--cond-cache", "--micro-batch", "3"], ["--upstream-baseline"]])
def test_train_step_bench_runs_the_stage2_settings(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark's stage-2 step with the condition cache and micro batches (the model then lacks ridge and
    backbone), and upstream's step (the image tower on every frame, fp16 settings), at smoke size."""
    import json

    from bench import train_step

    threads = torch.get_num_threads()
    try:
        assert train_step.main(["--profile", "smoke", "--stage", "2", "--steps", "1", "--warmup", "0",
                                "--threads", "1", *extra]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cond_cache"] is ("--cond-cache" in extra)
    assert out["upstream_baseline"] is ("--upstream-baseline" in extra)
    full = 1_740_413  # every part at smoke size (the run without --cond-cache)
    if "--cond-cache" in extra:
        assert out["params"] < full and out["micro_batch"] == 3
    else:
        assert out["params"] == full and out["precision"] == "fp16" and out["image_tower_params"] > 0
    assert out["final_loss"] > 0


@pytest.mark.parametrize("stage", ["3", "5", "6"])
def test_decode_bench_runs_each_stages_inference_at_tiny_widths(stage: str, capsys: pytest.CaptureFixture[str]
                                                                ) -> None:  # fmt: skip
    """``bench/decode_step.py --shrink``: the GPU check's stage-3, 5 and 6 measurements (the stages' own inference
    on the paper architectures, random weights) run end to end at tiny widths and report a time per clip."""
    import json

    from bench import decode_step

    threads = torch.get_num_threads()
    try:
        assert decode_step.main(["--stage", stage, "--shrink", "--threads", "1", "--clips", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stage"] == int(stage) and out["clips"] == 2 and out["sec_per_clip"] > 0
    assert all(n > 0 for n in out["params"].values())


def test_the_24gb_profile_changes_only_precision_and_memory_options() -> None:
    """``configs/paper_24gb.yaml`` differs from ``paper`` in the memory options alone (the method, batches and data
    are the paper's)."""
    from tests.test_fidelity import profile_diff

    repo = Path(__file__).resolve().parents[1]
    assert profile_diff("paper", str(repo / "configs" / "paper_24gb.yaml")) == {
        "run.mixed_precision", "stage1.train.grad_checkpointing", "stage1.train.adamw_impl",
        "stage2.train.grad_checkpointing", "stage2.train.micro_batch",
    }  # fmt: skip
