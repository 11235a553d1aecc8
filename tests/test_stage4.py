"""Stage 4 (BLIP-2 captions of the stage-3 keyframes) on the smoke world: stage order, one caption per clip with its
manifest and BLEU-4 scores, the caption-source rule stage 5 uses (``pipeline.captions.select_captions``) and the
CLI's one-line refusal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.smoke_env import SmokeEnv, copy_stages, run_paths, smoke_env, stage_config, with_toy_roles

RUN = "s4"
STAGE2 = ("train.batch_size=8", "train.num_epochs=1")


@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    """The smoke env plus a smoke toy BLIP-2, with a profile of its own: stage 3 decodes 4 test clips without
    previews, stage 4 captions them in batches of 3 and 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting over shared cores
    base = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    scratch = tmp_path_factory.mktemp("stage4")
    roles = with_toy_roles(base, ("blip2",), scratch)
    profile = scratch / "stage4.yaml"
    profile.write_text(
        f"extends: {roles.profile}\n"
        "stage3: {sample: {num_clips: 4, batch_size: 4, num_previews: 0}}\n"
        "stage4: {caption: {batch_size: 3}}\n"
    )
    yield SmokeEnv(roles.world, roles.weights, roles.exp_root, profile)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage2_run(env: SmokeEnv) -> Path:
    """Stages 1 and 2 of run ``s4`` (one epoch each); returns the run folder."""
    from pipeline import stage1, stage2

    stage1.train(stage_config(env, "1", RUN, "train.num_epochs=1"))
    stage2.train(stage_config(env, "2", RUN, *STAGE2))
    return run_paths(env, RUN).root


def reconstruct(env: SmokeEnv, exp: str, *overrides: str) -> Path:
    from pipeline.stage3 import reconstruct as run

    return run(stage_config(env, "3", exp, *overrides))


def caption(env: SmokeEnv, exp: str, *overrides: str) -> Path:
    from pipeline.stage4 import caption as run

    return run(stage_config(env, "4", exp, *overrides))


@pytest.fixture(scope="module")
def stage4_out(env: SmokeEnv, stage2_run: Path) -> Path:
    reconstruct(env, RUN)
    return caption(env, RUN)


def captions(folder: Path) -> list[str]:
    return json.loads((folder / "captions.json").read_text())


# ---- stage order ----------------------------------------------------------------------------------------------------
def test_refuses_without_stage3(env: SmokeEnv, stage2_run: Path) -> None:
    """Stages 1 and 2 done, stage 3 not: refused before anything is built or written."""
    from pipeline.stage4 import caption as run
    from utils.errors import StageOrderError

    p = run_paths(env, "no_stage3")
    copy_stages(stage2_run, p.root)
    with pytest.raises(StageOrderError, match="stage 3 outputs not found"):
        run(stage_config(env, "4", "no_stage3"))
    assert not p.stage_dir("4").exists(), "nothing is written before the check"


# ---- outputs --------------------------------------------------------------------------------------------------------
def test_writes_a_caption_for_every_clip_with_its_manifest(env: SmokeEnv, stage4_out: Path) -> None:
    from utils.manifest import require_stage

    p = run_paths(env, RUN)
    assert stage4_out == p.stage_dir("4") and stage4_out.name == "stage4_enhance"
    caps = captions(stage4_out)
    assert len(caps) == 4 and all(isinstance(c, str) and c.strip() for c in caps), caps
    assert all("<image>" not in c and "<|endoftext|>" not in c for c in caps)
    manifest = require_stage("4", stage4_out, p.stage_dirs(), "{stage}")
    assert manifest["depends_on"] == ["3"] and manifest["n_clips"] == 4 and manifest["max_new_tokens"] == 20
    assert str((p.stage_dir("3") / "keyframes.safetensors").resolve()) in manifest["inputs"]
    assert manifest["outputs"]["captions.json"]["shape"] == [4]
    scores = json.loads((stage4_out / "caption_scores.json").read_text())
    assert scores == manifest["caption_scores"] and scores["n_clips"] == 4
    assert 0.0 <= scores["blip2_bleu4"] <= 1.0 and 0.0 <= scores["gpt2_bleu4"] <= 1.0


def test_a_caption_depends_only_on_its_keyframe(env: SmokeEnv, stage4_out: Path) -> None:
    """Batches [0, 1, 2], [3] give the captions of one batch of 4 and of single keyframes."""
    from dataclasses import replace

    from pipeline import stage4

    s = stage4.setup(stage_config(env, "4", RUN))
    want = captions(stage4_out)
    assert stage4.caption_all(s) == want
    s.cfg = replace(s.cfg, caption=replace(s.cfg.caption, batch_size=4))
    assert stage4.caption_all(s) == want
    assert [s.blip2.caption(s.keyframes[i : i + 1], max_new_tokens=20)[0] for i in range(4)] == want


# ---- the caption source of stage 5 ----------------------------------------------------------------------------------
def test_select_captions_follows_stage4_freshness(env: SmokeEnv, stage2_run: Path) -> None:
    """BLIP-2 while stage 4 is current; stage 3's GPT-2 captions once stage 3 is rerun, until stage 4 is rerun.
    ``video.caption_source`` forces either source (``blip2`` refuses stale stage-4 captions). The fallback to GPT-2
    needs ``video.caption_fallback`` (false: an error naming the fix)."""
    from pipeline.captions import select_captions
    from utils.errors import StageOrderError

    exp = "s4_select"
    copy_stages(stage2_run, run_paths(env, exp).root)
    cfg5 = stage_config(env, "5", exp, "video.caption_fallback=true")
    with pytest.raises(StageOrderError, match="stage 3"):
        select_captions(cfg5)  # nothing to caption with before stage 3
    stage3_dir = reconstruct(env, exp, "sample.num_clips=2")
    gpt2 = json.loads((stage3_dir / "captions.json").read_text())["captions"]
    assert select_captions(cfg5) == (gpt2, "gpt2"), "no stage 4 yet"
    with pytest.raises(StageOrderError, match="stage 4.*--set video.caption_fallback=true"):
        select_captions(stage_config(env, "5", exp, "video.caption_fallback=false"))
    blip2 = captions(caption(env, exp))
    assert len(blip2) == 2 and select_captions(cfg5) == (blip2, "blip2")
    assert select_captions(stage_config(env, "5", exp, "video.caption_source=gpt2")) == (gpt2, "gpt2")

    reconstruct(env, exp, "sample.num_clips=2")  # new keyframes: stage 4 is stale
    assert select_captions(cfg5) == (gpt2, "gpt2"), "same seeds: stage 3 decodes the same captions again"
    with pytest.raises(StageOrderError, match="stage 4 .*stale"):
        select_captions(stage_config(env, "5", exp, "video.caption_source=blip2"))
    caption(env, exp)
    assert select_captions(cfg5) == (blip2, "blip2"), "current again after stage 4 is rerun"


# ---- entry point ----------------------------------------------------------------------------------------------------
def test_script_refuses_without_stage3_in_one_line(env: SmokeEnv, capsys: pytest.CaptureFixture[str]) -> None:
    import caption_blip2
    from utils.cli import run_stage
    from utils.stage_configs import Stage4Config

    argv = ["--profile", str(env.profile), "--exp", "cli_no_stage3", "--mode", "motion"]
    assert run_stage(Stage4Config, caption_blip2.main, caption_blip2.__doc__, argv) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: StageOrderError") and "stage 3" in last and "train_neurons.sh" in last
    assert not run_paths(env, "cli_no_stage3", mode="motion").stage_dir("4").exists()
