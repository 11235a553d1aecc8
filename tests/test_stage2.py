"""Stage 2 (decoupled task heads) on the smoke world: stage order, outputs, losses and schedule, exact resume, CLI."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.smoke_env import SmokeEnv, smoke_env
from utils.data_catalog import key_objects_masks_file

# 5 steps per epoch on the smoke world; written progressive windows (derived ones are all 1 under 5 epochs)
COMMON = ["train.batch_size=8", "train.num_epochs=2", "train.log_every=1", "progressive.windows=fixed"]
INTERRUPT_AT = 7  # the 7th optimiser step: mid-way through epoch 1


@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting over shared cores
    yield smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    torch.set_num_threads(threads)


def config(env: SmokeEnv, stage: str, exp: str, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    extra = list(overrides) if stage == "1" else [*COMMON, *overrides]
    return load_config(STAGE_CONFIGS[stage], str(env.profile), extra, {"exp": exp})


def run_stage1(env: SmokeEnv, exp: str) -> Path:
    from pipeline.stage1 import train

    return train(config(env, "1", exp, "train.num_epochs=1"))


@pytest.fixture(scope="module")
def run_a(env: SmokeEnv) -> Path:
    """Stages 1 and 2 of run ``a`` (uninterrupted)."""
    from pipeline.stage2 import train

    run_stage1(env, "a")
    return train(config(env, "2", "a"))


def test_stage2_refuses_to_run_without_stage1(env: SmokeEnv) -> None:
    from pipeline.stage2 import train
    from utils.errors import StageOrderError
    from utils.runs import RunPaths

    cfg = config(env, "2", "no_stage1")
    with pytest.raises(StageOrderError, match="stage 1"):
        train(cfg)
    assert not RunPaths.from_config(cfg).stage_dir("2").exists(), "nothing is written before the check"


def test_run_writes_checkpoints_config_and_manifest(env: SmokeEnv, run_a: Path) -> None:
    from utils.manifest import read_manifest, require_stage
    from utils.runs import RunPaths

    paths = RunPaths.from_config(config(env, "2", "a"))
    for name in ("best", "last"):
        assert (run_a / "checkpoints" / name / "model.safetensors").is_file()
        assert (run_a / "checkpoints" / name / "state.pt").is_file()
    assert (run_a / "curves.png").is_file() and (run_a / "metrics.jsonl").is_file()
    assert (paths.config_dir / "stage2.yaml").is_file()
    manifest = read_manifest(run_a)
    assert manifest["depends_on"] == ["1"]
    stage1_best = (paths.stage_dir("1") / "checkpoints" / "best" / "model.safetensors").resolve()
    assert str(stage1_best) in manifest["inputs"]
    data_inputs = set(manifest["inputs"]) - {str(stage1_best)}  # the data files read, from BrainVideoData
    masks = str((env.world / key_objects_masks_file("train")).resolve())
    assert masks in data_inputs and all(Path(p).is_relative_to(env.world.resolve()) for p in data_inputs)
    require_stage("2", run_a, paths.stage_dirs(), "{stage}")


def test_losses_are_finite_and_progressive_weights_follow_the_schedule(env: SmokeEnv, run_a: Path) -> None:
    from pipeline.stage2 import progressive_windows
    from utils.losses import progressive_weights

    cfg = config(env, "2", "a")
    starts, window = progressive_windows(cfg)
    records = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    steps_per_epoch = len(train) // cfg.train.num_epochs
    assert len(train) == cfg.train.num_epochs * steps_per_epoch and len(val) == cfg.train.num_epochs
    p = cfg.progressive
    for r in train:
        for name in ("loss", "prior", "video_softclip", "text_nce", "dice", "concepts", "caption", "latent"):
            assert math.isfinite(r[name]), (name, r)
        batch = r["step"] - 1 - r["epoch"] * steps_per_epoch
        want = progressive_weights(r["epoch"], batch, steps_per_epoch, starts, window, p.peak)
        assert {k: r[f"w_{k}"] for k in want} == pytest.approx(want)
    assert any(r["w_dice"] > 1 for r in train), "the schedule is exercised"
    for r in val:
        for name in ("fwd_top1", "bwd_top1", "prior_fwd_top1", "caption_acc", "concept_f1", "dice"):
            assert 0.0 <= r[name] <= 1.0, (name, r)
        assert r["metric"] == pytest.approx(sum(r[k] for k in cfg.train.selection))


def test_resume_after_interruption_matches_an_uninterrupted_run(
    env: SmokeEnv, run_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import stage2
    from utils.checkpoint import read_weights
    from utils.runs import RunPaths

    root_b = RunPaths.from_config(config(env, "2", "b")).root
    shutil.copytree(run_a.parent / "stage1", root_b / "stage1")  # same stage-1 weights, fingerprints kept
    real, calls = stage2.step_loss, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == INTERRUPT_AT:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage2, "step_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        stage2.train(config(env, "2", "b"))
    monkeypatch.setattr(stage2, "step_loss", real)
    out_b = stage2.train(config(env, "2", "b", "train.resume=true"))
    want, _ = read_weights(run_a / "checkpoints" / "last")
    got, _ = read_weights(out_b / "checkpoints" / "last")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])][:3]
    records = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert records(out_b) == records(run_a)


def test_validation_decodes_through_the_models_brain_only_path(
    env: SmokeEnv, run_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation is ``NeuronsBrainModel.decode_condition`` (the path of stage 3's ``decode_voxels`` and the model
    tests; here from the condition cache) with ``val_prior_steps`` and each clip's key-object text; on the ``last``
    weights it reproduces the logged scores."""
    from models.brain import NeuronsBrainModel
    from pipeline import stage2
    from utils.checkpoint import load_strict, read_weights

    cfg = config(env, "2", "a")
    s = stage2.setup(cfg)
    assert not any(m.training for m in s.model.backbone.modules()), "the frozen backbone is in eval mode by default"
    load_strict(s.model, read_weights(run_a / "checkpoints" / "last")[0], "last")
    calls, real = [], NeuronsBrainModel.decode_condition

    def spy(model, cond, generators, prior_steps=None, **kwargs):
        calls.append((len(cond), prior_steps, sorted(kwargs)))
        return real(model, cond, generators, prior_steps, **kwargs)

    monkeypatch.setattr(NeuronsBrainModel, "decode_condition", spy)
    scores = stage2.evaluate(s)
    assert sum(n for n, _, _ in calls) == s.data.n_clips("val")
    kwargs = ("key_text", "latent_size")
    assert {(steps, tuple(kw)) for _, steps, kw in calls} == {(cfg.train.val_prior_steps, kwargs)}
    logged = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in logged if r["split"] == "val"][-1]
    assert {k: scores[k] for k in stage2.SCORES} == pytest.approx({k: last_val[k] for k in stage2.SCORES})


def dropout_modes(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.backbone.modules() if isinstance(m, torch.nn.Dropout)]


def test_upstream_selection_on_test_clips_and_backbone_in_train_mode(
    env: SmokeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.validation=test_upstream`` (defect 16): stage 2 trains on every clip and scores the test clips each
    epoch, its last partial batch kept (``train.drop_last=false``); ``train.backbone_mode=train`` (upstream's
    model.train()) keeps the frozen backbone's dropout on during every step, after validation too; the derived
    progressive windows of 2 epochs are empty (all weights 1), as upstream."""
    from pipeline import stage1, stage2
    from utils.data import BrainVideoData
    from utils.manifest import read_manifest

    up = ["data.validation=test_upstream", "train.drop_last=false"]
    stage1.train(config(env, "1", "up", *up, "train.num_epochs=1"))
    steps, scored = [], []
    real_step, real_eval = stage2.step_loss, stage2.evaluate

    def spy_step(s, *args, **kwargs):
        steps.append(dropout_modes(s.model))
        return real_step(s, *args, **kwargs)

    monkeypatch.setattr(stage2, "step_loss", spy_step)
    monkeypatch.setattr(stage2, "evaluate", lambda s, split="val": scored.append(split) or real_eval(s, split))
    out = stage2.train(config(env, "2", "up", *up, "train.backbone_mode=train", "train.condition_cache=compute",
                                "progressive.windows=from_epochs",
                              "train.batch_size=7"))  # fmt: skip
    assert steps and all(modes and all(modes) for modes in steps), "backbone dropout is active in every step"
    assert scored == ["test", "test"]
    manifest = read_manifest(out)
    n_all = BrainVideoData(env.world, 1).n_source("train")
    assert manifest["selected_on"] == "test (upstream, defect 16)" and manifest["train_clips"] == n_all
    assert manifest["backbone_mode"] == "train"
    assert manifest["progressive_windows"] == {"starts": dict.fromkeys(("dice", "concepts", "caption", "latent"), 0),
                                               "window_epochs": 0}  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == sum(r["split"] == "train" for r in rows) == 2 * math.ceil(n_all / 7), "partial batch kept"
    assert all(r[f"w_{k}"] == 1.0 for r in rows if r["split"] == "train" for k in ("dice", "caption", "latent"))
    assert [r["epoch"] for r in rows if r["split"] == "test"] == [0, 1]


def test_progressive_windows_follow_the_epoch_count_as_upstream(env: SmokeEnv) -> None:
    """Spec §3.5: window 2·(E//5) epochs, task k from k·(E//5). At 50 epochs (the paper profile) they are the former
    literals, step for step; the toy profile's 8 epochs give its former literals; they scale with E."""
    from pipeline.stage2 import multipliers, progressive_windows
    from utils.config import load_config
    from utils.stage_configs import Stage2Config

    literals = {"dice": 0, "concepts": 10, "caption": 20, "latent": 30}, 20
    paper = load_config(Stage2Config, "paper", [])
    assert paper.train.num_epochs == 50 and progressive_windows(paper) == literals
    fixed = load_config(Stage2Config, "paper", ["progressive.windows=fixed"])
    assert progressive_windows(fixed) == literals
    for epoch in range(50):
        for batch in (0, 1, 215, 431):
            assert multipliers(paper, epoch, batch, 432) == multipliers(fixed, epoch, batch, 432)

    def derived(epochs: int) -> tuple[dict[str, int], int]:
        cfg = config(env, "2", "w", f"train.num_epochs={epochs}", "progressive.windows=from_epochs")
        return progressive_windows(cfg)

    assert derived(8) == ({"dice": 0, "concepts": 1, "caption": 2, "latent": 3}, 2)
    assert derived(25) == ({"dice": 0, "concepts": 5, "caption": 10, "latent": 15}, 10)
    assert derived(100) == ({"dice": 0, "concepts": 20, "caption": 40, "latent": 60}, 40)
    assert derived(4)[1] == 0, "under 5 epochs upstream's windows are empty"


# ---- upstream flags through the stage: the losses of the first steps (docs/fidelity.md) ----------------------------
LOSSES = ("prior", "video_softclip", "text_nce", "dice", "concepts", "caption", "latent")
# flag -> (step, the losses it changes at that step); every other loss of that step is bit-identical to the default
# run's. Defect 15 changes no loss of the first steps (the temporal attention's blend weight starts at 1 = spatial
# only), so its test checks the temporal sequences the decoder attends over instead.
FLAG_LOSSES = {
    "upstream.dice_reduction=batch": (1, {"dice"}),  # defect 23: one Dice over the batch
    "upstream.gt_mask_resize=nearest": (1, {"dice"}),  # nearest-resized Dice targets
    "upstream.text_attention=batch": (1, {"dice", "latent"}),  # defect 14: the decoder attends to the batch's texts
    "upstream.concept_names=upstream": (1, {"dice"}),  # defect 22: fine key-object names query the mask head
    "upstream.temporal_scope=batch": (1, set()),  # defect 15: temporal attention over the batch's frames
    "upstream.caption_pad=clip_zero": (1, {"caption"}),  # defect 21: the real "!" (id 0) is dropped from the targets
}


class StepsDone(Exception):
    """Stops a stage-2 run after the steps a test needs."""


def first_step_losses(env: SmokeEnv, run_a: Path, exp: str, steps: int, *overrides: str
                      ) -> tuple[list[dict[str, float]], set[int]]:  # fmt: skip
    """The losses of the first ``steps`` steps of ``stage2.train`` (from run ``a``'s stage 1), the run stopped right
    after them, and the lengths of the temporal sequences the mask/latent decoder attended over. Every caption's first
    word becomes CLIP-BPE id 0 (a real "!", upstream's pad id: defect 21)."""
    from models.heads import UPSTREAM_PAD_ID
    from models.video_decoder import DecoderVideo
    from pipeline import stage2
    from utils.runs import RunPaths

    shutil.copytree(run_a.parent / "stage1", RunPaths.from_config(config(env, "2", exp)).root / "stage1")
    got: list[dict[str, float]] = []
    real_step, real_targets, real_decoder = stage2.step_loss, stage2.caption_targets, DecoderVideo.forward
    times: set[int] = set()

    def counted(*args, **kwargs):
        if len(got) == steps:
            raise StepsDone
        out = real_step(*args, **kwargs)
        got.append({k: float(out[k].detach()) for k in LOSSES})
        return out

    def exclaimed(*args):
        caps = real_targets(*args)
        ids = caps.ids.clone()
        ids[:, 1] = UPSTREAM_PAD_ID  # position 0 is the start token
        return stage2.Captions(ids, caps.mask)

    def timed(self, x, time):
        times.add(time)
        return real_decoder(self, x, time)

    stage2.step_loss, stage2.caption_targets, DecoderVideo.forward = counted, exclaimed, timed
    try:
        with pytest.raises(StepsDone):
            stage2.train(config(env, "2", exp, *overrides))
    finally:
        stage2.step_loss, stage2.caption_targets, DecoderVideo.forward = real_step, real_targets, real_decoder
    return got, times


@pytest.fixture(scope="module")
def default_steps(env: SmokeEnv, run_a: Path) -> tuple[list[dict[str, float]], set[int]]:
    return first_step_losses(env, run_a, "flag_default", max(step for step, _ in FLAG_LOSSES.values()))


@pytest.mark.parametrize("flag", sorted(FLAG_LOSSES))
def test_upstream_flag_changes_its_losses_through_the_stage(
    env: SmokeEnv, run_a: Path, default_steps: tuple[list[dict[str, float]], set[int]], flag: str
) -> None:
    """Each stage-2 upstream flag, run through ``stage2.train`` from the same stage 1 and seed: at the first step where
    it can act, the losses it reaches differ from the default run's and every other loss is bit-identical;
    ``temporal_scope=batch`` makes the decoder's temporal sequences span the batch (B·F frames, not F)."""
    from utils.data import BrainVideoData

    step, want = FLAG_LOSSES[flag]
    got, times = first_step_losses(env, run_a, "flag_" + flag.split(".")[1].split("=")[0], step, flag)
    default, default_times = default_steps[0][step - 1], default_steps[1]
    assert {k for k in LOSSES if got[step - 1][k] != default[k]} == want, (got[step - 1], default)
    frames = BrainVideoData(env.world, 1).n_frames
    assert default_times == {frames}
    batch_size = config(env, "2", "x").train.batch_size
    assert times == ({batch_size * frames} if "temporal_scope" in flag else {frames})


def test_dice_targets_are_the_area_majority_of_the_gt_masks_or_upstreams_nearest() -> None:
    from pipeline.stage2 import gt_masks_at
    from utils.resize import resize_maps_nearest, resize_masks_majority
    from utils.stage_configs import UpstreamFlags

    masks = (torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    assert torch.equal(gt_masks_at(UpstreamFlags(), masks, 5), resize_masks_majority(masks, 5))
    nearest = gt_masks_at(UpstreamFlags(gt_mask_resize="nearest"), masks, 5)
    assert torch.equal(nearest, resize_maps_nearest(masks, 5))
    assert not torch.equal(nearest, resize_masks_majority(masks, 5))


def test_script_refuses_without_stage1_in_one_line(env: SmokeEnv, capsys: pytest.CaptureFixture[str]) -> None:
    import train_decoupler
    from utils.cli import run_stage
    from utils.stage_configs import Stage2Config

    argv = ["--profile", str(env.profile), "--exp", "cli_no_stage1"]
    assert run_stage(Stage2Config, train_decoupler.main, train_decoupler.__doc__, argv) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: StageOrderError") and "stage 1" in last and "train_neurons.sh" in last


# ---- issue 19: the condition cache and micro batches ---------------------------------------------------------------
def with_stage1_of(run: Path, exp: str, env: SmokeEnv) -> None:
    """A new run ``exp`` whose stage 1 is a copy of ``run``'s (same bytes and mtimes)."""
    from utils.runs import RunPaths

    dest = RunPaths.from_config(config(env, "2", exp)).stage_dir("1")
    if not dest.exists():
        shutil.copytree(run.parent / "stage1", dest)


def train_log(run: Path, split: str) -> list[dict[str, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_condition_cache_trains_as_the_uncached_stage_without_running_the_backbone(
    env: SmokeEnv, run_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.condition_cache=fp32``: every logged loss and validation score of the whole stage equals the uncached
    run's (float tolerance), the backbone runs only to build the cache (never in a step or in validation), the
    manifest records the option, and a second setup reuses the cache until the stage-1 checkpoint changes."""
    from models.brain import MindEyeBackbone
    from pipeline import stage2

    with_stage1_of(run_a, "cache32", env)
    calls = {"n": 0}
    real = MindEyeBackbone.forward

    def counted(self, x):
        calls["n"] += 1
        return real(self, x)

    monkeypatch.setattr(MindEyeBackbone, "forward", counted)
    out = stage2.train(config(env, "2", "cache32", "train.condition_cache=fp32"))
    built = calls["n"]
    assert built == 2, "one pass per cached split (train, val), chunks of 64 clips; none in a step or validation"
    with_stage1_of(run_a, "nocache", env)
    reference = stage2.train(config(env, "2", "nocache", "train.condition_cache=compute"))
    assert calls["n"] > built + 10, "without the cache the backbone runs in every step"
    got, want = train_log(out, "train"), train_log(reference, "train")
    losses = [k for k in want[0] if k.startswith(("loss", "prior", "video", "text", "dice", "concepts", "caption",
                                                   "latent"))]  # fmt: skip
    assert len(got) == len(want) == 10
    assert [r[k] for r in got for k in losses] == pytest.approx([r[k] for r in want for k in losses], rel=1e-4)
    val, val_ref = train_log(out, "val"), train_log(reference, "val")
    assert [r[k] for r in val for k in stage2.SCORES] == pytest.approx(
        [r[k] for r in val_ref for k in stage2.SCORES], rel=1e-4)
    assert json.loads((out / "manifest.json").read_text())["condition_cache"] == "fp32"
    cache = out / "condition_cache"
    arrays = json.loads((cache / "manifest.json").read_text())["arrays"]
    assert sorted(arrays) == ["train_slot0.npy", "val_slot0.npy"]
    n = calls["n"]
    stage2.setup(config(env, "2", "cache32", "train.condition_cache=fp32"))
    assert calls["n"] == n, "a current cache is read, not rebuilt"


def test_condition_cache_rebuilds_what_its_inputs_no_longer_match(tmp_path: Path) -> None:
    """A cache array is recomputed when its voxels change (that array only) or when the identity (stage-1
    checkpoint, flags, precision) changes (all of them); what it reads back is what the condition gave, in its
    dtype."""
    from pipeline.condition_cache import ConditionCache

    calls: list[int] = []

    def cond(x: torch.Tensor, slot: int) -> torch.Tensor:
        calls.append(len(x))
        return (x[:, :6] * (slot + 1)).reshape(len(x), 2, 3)  # (b, T=2, D=3)

    voxels = {"train": [torch.randn(5, 8), torch.randn(5, 7)], "val": [torch.randn(3, 8), torch.randn(3, 7)]}
    ConditionCache(tmp_path, "fp32", {"stage1": "a"}).ensure(voxels, cond, "cpu", chunk=2)
    assert sum(calls) == 16 and len(calls) == 3 + 3 + 2 + 2
    cache = ConditionCache(tmp_path, "fp32", {"stage1": "a"})
    cache.ensure(voxels, cond, "cpu", chunk=2)
    assert sum(calls) == 16, "current: read, not recomputed"
    torch.testing.assert_close(cache.read("train", 1, [4, 0], "cpu"), cond(voxels["train"][1][[4, 0]], 1))
    voxels["val"][0] = voxels["val"][0] + 1
    calls.clear()
    cache.ensure(voxels, cond, "cpu", chunk=2)
    assert calls == [2, 1], "only the changed array"
    torch.testing.assert_close(cache.read("val", 0, [2], "cpu"), cond(voxels["val"][0][[2]], 0))
    calls.clear()
    half = ConditionCache(tmp_path, "fp16", {"stage1": "a"})
    half.ensure(voxels, cond, "cpu", chunk=8)
    assert sum(calls) == 16, "another dtype: everything rebuilt"
    assert half.read("train", 0, [0], "cpu").dtype == torch.float32
    calls.clear()
    ConditionCache(tmp_path, "fp16", {"stage1": "b"}).ensure(voxels, cond, "cpu", chunk=8)
    assert sum(calls) == 16, "another stage-1 checkpoint: everything rebuilt"


def test_condition_cache_refuses_a_backbone_in_train_mode(env: SmokeEnv, run_a: Path) -> None:
    from pipeline import stage2
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="backbone_mode=eval"):
        stage2.setup(config(env, "2", "a", "train.condition_cache=fp16", "train.backbone_mode=train"))


def step_and_grads(s, plan, seed: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    from pipeline import stage2

    s.model.zero_grad(set_to_none=True)
    stage2.set_train_mode(s.model, s.frozen, s.cfg.train.backbone_mode)
    torch.manual_seed(seed)
    losses = stage2.step_loss(s, plan, 0, 1)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}
    return {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in losses.items()}, grads


def no_dropout(s):
    for m in s.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return s


@pytest.mark.parametrize("cache", ["compute", "fp16"])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(env: SmokeEnv, run_a: Path, cache: str) -> None:
    """``train.micro_batch=3`` on a batch of 8 (passes of 3, 3 and 2 clips): the same losses and parameter gradients
    as one pass, contrastive terms included (dropout off, whose draws differ with the pass sizes); with the fp16
    condition cache too, whose losses match the uncached step to fp16 precision."""
    from pipeline import stage2
    from utils.data import SubjectSet
    from utils.training import BatchPlan, seed_everything

    with_stage1_of(run_a, f"micro_{cache}", env)
    runs = {}
    for micro in (0, 3):
        cfg = config(env, "2", f"micro_{cache}", f"train.micro_batch={micro}", f"train.condition_cache={cache}")
        seed_everything(cfg.run.seed)  # the fresh heads' initialisation, as stage2.train
        s = no_dropout(stage2.setup(cfg))
        assert isinstance(s.subjects, SubjectSet)
        plan = BatchPlan(s.data.n_clips("train"), 8, 1, s.cfg.run.seed, True)
        runs[micro] = step_and_grads(s, plan)
    (l0, g0), (l3, g3) = runs[0], runs[3]
    assert l3 == pytest.approx(l0, rel=1e-5, abs=1e-7)
    assert sorted(g3) == sorted(g0) and g0
    for name in g0:
        torch.testing.assert_close(g3[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    if cache == "fp16":
        seed_everything(cfg.run.seed)
        reference, _ = step_and_grads(no_dropout(stage2.setup(config(env, "2", "a", "train.condition_cache=compute"))),
                                      plan)  # fmt: skip
        assert l0 == pytest.approx(reference, rel=2e-3, abs=1e-4)
