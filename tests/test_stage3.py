"""Stage 3 (decoupled reconstruction) on the smoke world: stage order and staleness, outputs and their manifest,
per-clip reproducibility across batch sizes, enhance vs motion, the caption decoders, the CLI and the driver."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.smoke_env import SmokeEnv, copy_stages, smoke_env
from tests.smoke_env import run_paths as paths
from tests.smoke_env import stage_config as config
from utils.data_catalog import fmri_file

RUN = "s3"
STAGE2 = ["train.batch_size=8", "train.num_epochs=1"]
TENSORS = ("keyframes", "blurry_videos", "masks", "concept_probs", "prior_tokens")


@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    """The smoke env with a profile of its own: 4 test clips in batches of 3 and 1, 2 previews. (A profile rather
    than --set: checkpoints are tied to their profile, and the driver passes NEURONS_SET to every stage.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting over shared cores
    base = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    profile = tmp_path_factory.mktemp("stage3") / "stage3.yaml"
    sample = "{num_clips: 4, batch_size: 3, num_previews: 2}"
    profile.write_text(f"extends: {base.profile}\nstage3: {{sample: {sample}}}\n")
    yield SmokeEnv(base.world, base.weights, base.exp_root, profile)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage2_run(env: SmokeEnv) -> Path:
    """Stages 1 and 2 of run ``s3`` (one epoch each); returns the run folder."""
    from pipeline import stage1, stage2

    stage1.train(config(env, "1", RUN, "train.num_epochs=1"))
    stage2.train(config(env, "2", RUN, *STAGE2))
    return paths(env, RUN).root


def reconstruct(env: SmokeEnv, exp: str, *overrides: str, mode: str = "enhance") -> Path:
    from pipeline.stage3 import reconstruct as run

    return run(config(env, "3", exp, *overrides, mode=mode))


@pytest.fixture(scope="module")
def enhance(env: SmokeEnv, stage2_run: Path) -> Path:
    return reconstruct(env, RUN, mode="enhance")


@pytest.fixture(scope="module")
def motion(env: SmokeEnv, stage2_run: Path) -> Path:
    return reconstruct(env, RUN, mode="motion")


def outputs(folder: Path) -> dict[str, torch.Tensor]:
    return {name: load_file(folder / f"{name}.safetensors")[name] for name in TENSORS}


def captions(folder: Path) -> list[str]:
    return json.loads((folder / "captions.json").read_text())["captions"]


# ---- stage order ----------------------------------------------------------------------------------------------------
def test_refuses_without_stage2(env: SmokeEnv) -> None:
    from pipeline.stage3 import reconstruct as run
    from utils.errors import StageOrderError

    cfg = config(env, "3", "no_stage2")
    with pytest.raises(StageOrderError, match="stage 2"):
        run(cfg)
    assert not paths(env, "no_stage2").stage_dir("3").exists(), "nothing is written before the check"


def test_refuses_stale_stage2_and_marks_its_own_outputs_stale(env: SmokeEnv, stage2_run: Path) -> None:
    from utils.errors import StageOrderError
    from utils.manifest import read_manifest, require_stage

    p = paths(env, "stale")
    copy_stages(stage2_run, p.root)
    out = reconstruct(env, "stale", "sample.num_clips=1", "sample.num_previews=0")
    require_stage("3", out, p.stage_dirs(), "{stage}")
    best = p.stage_dir("2") / "checkpoints" / "best" / "model.safetensors"
    stamp = best.stat().st_mtime_ns + 10**9
    os.utime(best, ns=(stamp, stamp))  # stage 2's checkpoint is now newer than its manifest (and than stage 3)
    with pytest.raises(StageOrderError, match="stage 3 .*stale"):
        require_stage("3", out, p.stage_dirs(), "{stage}")
    with pytest.raises(StageOrderError, match="stage 2 .*stale"):
        reconstruct(env, "stale", "sample.num_clips=1")
    assert read_manifest(out) is not None, "a refused run leaves the previous outputs alone"


def test_reads_the_checkpoint_sample_checkpoint_names_and_records_it(
    env: SmokeEnv, stage2_run: Path, enhance: Path
) -> None:
    """``sample.checkpoint=last`` decodes stage 2's last checkpoint, as upstream (brain_model_prior_last.pth, spec
    §3.7); the default reads ``best``. The manifest records which."""
    from utils.manifest import read_manifest

    p = paths(env, "last")
    copy_stages(stage2_run, p.root)
    out = reconstruct(env, "last", "sample.checkpoint=last", "sample.num_clips=1", "sample.num_previews=0")
    manifest = read_manifest(out)
    assert manifest["stage2_checkpoint_read"] == "last" and Path(manifest["stage2_checkpoint"]).name == "last"
    read = {Path(i).parent.name for i in manifest["inputs"] if Path(i).name == "model.safetensors"}
    assert read == {"last"}
    assert read_manifest(enhance)["stage2_checkpoint_read"] == "best"


def test_refuses_model_flags_that_differ_from_the_stage2_run(env: SmokeEnv, stage2_run: Path) -> None:
    from pipeline.stage3 import reconstruct as run
    from utils.errors import ConfigError

    cfg = config(env, "3", RUN, "upstream.text_attention=batch", mode="motion")
    with pytest.raises(ConfigError, match="text_attention.*trained with 'own'"):
        run(cfg)


def test_fine_concept_names_query_with_frequent_key_objects(
    env: SmokeEnv, stage2_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from models.heads import key_object_classes
    from pipeline.stage3 import inference_namer
    from utils.data import BrainVideoData

    data = BrainVideoData(env.world, 1)
    cfg2 = config(env, "2", RUN)  # trained on class names (the default)
    namer = inference_namer(config(env, "3", RUN, "upstream.concept_names=fine"), cfg2, data)
    assert "defect 22" in caplog.text, "class-trained head queried with fine names: warned"
    to_class = key_object_classes(data.concept_labels("train"), data.key_object_names("train"), data.concept_classes)
    for cls, name in zip(data.concept_classes, namer.infer_name(torch.eye(data.n_concepts))):
        assert name == cls or to_class.get(name) == cls, (cls, name)
    assert any(name != cls for cls, name in zip(data.concept_classes, namer.infer_name(torch.eye(data.n_concepts))))


# ---- outputs --------------------------------------------------------------------------------------------------------
def test_run_writes_outputs_with_the_recorded_shapes(env: SmokeEnv, enhance: Path) -> None:
    from utils.data import BrainVideoData
    from utils.manifest import read_manifest, require_stage

    cfg, p = config(env, "3", RUN), paths(env, RUN)
    data = BrainVideoData(env.world, 1)
    n, f, r, k = 4, data.n_frames, data.resolution, cfg.sample.keyframe_size
    manifest = read_manifest(enhance)
    assert manifest["depends_on"] == ["2"] and manifest["n_clips"] == n
    require_stage("3", enhance, p.stage_dirs(), "{stage}")
    best = (p.stage_dir("2") / "checkpoints" / "best" / "model.safetensors").resolve()
    assert str(best) in manifest["inputs"]
    assert str((env.world / fmri_file(1, "test")).resolve()) in manifest["inputs"]
    got = outputs(enhance)
    for name, tensor in got.items():
        entry = manifest["outputs"][f"{name}.safetensors"]
        assert entry["shape"] == list(tensor.shape) and entry["dtype"] == str(tensor.dtype).removeprefix("torch.")
    assert got["keyframes"].shape == (n, 3, k, k) and got["blurry_videos"].shape == (n, f, 3, r, r)
    assert got["masks"].shape[:2] == (n, f) and got["concept_probs"].shape == (n, data.n_concepts)
    assert got["prior_tokens"].shape[0] == n and got["concept_probs"].dtype == torch.float32
    for name in ("keyframes", "blurry_videos", "masks", "concept_probs"):
        assert got[name].isfinite().all() and got[name].min() >= 0 and got[name].max() <= 1, name
    caps = captions(enhance)
    assert len(caps) == n and all(isinstance(c, str) for c in caps)
    assert manifest["outputs"]["captions.json"]["shape"] == [n]
    concepts = json.loads((enhance / "concepts.json").read_text())
    assert concepts["classes"] == data.concept_classes and len(concepts["mask_names"]) == n
    previews = sorted(x.name for x in (enhance / "previews").iterdir())
    assert previews == ["keyframe_0000.png", "keyframe_0001.png", "video_0000.gif", "video_0001.gif"]


def test_a_clip_decodes_the_same_in_any_batch(env: SmokeEnv, stage2_run: Path, enhance: Path) -> None:
    """Per-clip seeds: batch size 1 reproduces batch size 3 (batches [0, 1, 2], [3]). Clip 3 sits in a batch of one
    both times and is bit-identical; clips 0-2 agree up to float rounding (a CPU matmul of 1 row and of 3 rows need
    not round alike), and their captions and mask names are the same."""
    copy_stages(stage2_run, paths(env, "bs1").root)
    single = reconstruct(env, "bs1", "sample.batch_size=1", "sample.num_previews=0")
    want, got = outputs(enhance), outputs(single)
    for name in TENSORS:
        assert torch.equal(want[name][3], got[name][3]), name
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=5e-3, rtol=1e-2, msg=name)
    assert captions(single) == captions(enhance)
    names = lambda folder: json.loads((folder / "concepts.json").read_text())["mask_names"]  # noqa: E731
    assert names(single) == names(enhance)


def test_enhance_and_motion_write_separate_folders_and_differ_where_they_should(
    env: SmokeEnv, enhance: Path, motion: Path
) -> None:
    assert enhance.name == "stage3_enhance" and motion.name == "stage3_motion"
    e, m = outputs(enhance), outputs(motion)
    for name in ("prior_tokens", "concept_probs", "masks"):  # the same brain decoding in both modes
        assert torch.equal(e[name], m[name]), name
    assert not torch.equal(e["blurry_videos"], m["blurry_videos"])
    assert not torch.equal(e["keyframes"], m["keyframes"])
    assert json.loads((enhance / "captions.json").read_text())["max_new_tokens"] == 60
    assert json.loads((motion / "captions.json").read_text())["max_new_tokens"] == 30
    configs = enhance.parent / "config"  # each mode keeps its own resolved config
    assert "mode: enhance" in (configs / "stage3_enhance.yaml").read_text()
    assert "mode: motion" in (configs / "stage3_motion.yaml").read_text()


def test_enhance_masks_the_blurry_latents_and_the_unclip_tokens(env: SmokeEnv, stage2_run: Path) -> None:
    """What reaches the VAE and unCLIP: in enhance mode the motion-mode inputs times the soft key-object mask."""
    from pipeline import stage3
    from utils.resize import resize_maps_nearest

    s = stage3.setup(config(env, "3", RUN))
    seen: dict[str, list[torch.Tensor]] = {"latents": [], "tokens": []}
    vae_decode, unclip_reconstruct = s.vae.decode, s.unclip.reconstruct
    s.vae.decode = lambda z: seen["latents"].append(z) or vae_decode(z)
    s.unclip.reconstruct = lambda t, g: seen["tokens"].append(t) or unclip_reconstruct(t, g)
    idx = np.array([0, 1])
    batch = stage3.decode_batch(s, idx)
    s.cfg = config(env, "3", RUN, mode="motion")
    stage3.decode_batch(s, idx)
    low = s.cfg.sample.mask_soft_low
    latent_mask = resize_maps_nearest(stage3.soft_mask(batch["masks"], low), s.latent_size)  # (B, F, s, s)
    assert set(latent_mask.unique().tolist()) <= {low, 1.0}
    (lat_e, lat_m), (tok_e, tok_m) = seen["latents"], seen["tokens"]
    torch.testing.assert_close(lat_e, lat_m * latent_mask[:, :, None])
    torch.testing.assert_close(tok_e, tok_m * stage3.token_mask(latent_mask, tok_m.shape[1]))
    assert not torch.equal(lat_e, lat_m), "the smoke masks are not all ones"


def test_brain_outputs_are_the_models_brain_only_decoding(env: SmokeEnv, stage2_run: Path) -> None:
    """Prior tokens, concepts and masks are ``NeuronsBrainModel.decode_voxels`` (the path of stage-2 validation and
    the model tests) with ``prior_steps``, the mask queried with the name of each clip's top concept."""
    from models.brain import clip_generators
    from pipeline import stage3
    from utils.training import clip_seed

    s = stage3.setup(config(env, "3", RUN, mode="motion"))
    idx = np.array([0, 2])
    batch = stage3.decode_batch(s, idx)
    gens = clip_generators([clip_seed(s.cfg.run.seed, int(i)) for i in idx], s.device)
    dec = s.model.decode_voxels(s.voxels[torch.as_tensor(idx)], gens, s.cfg.sample.prior_steps,
                                key_table=s.name_table, latent_size=s.latent_size)  # fmt: skip
    assert torch.equal(batch["prior_tokens"], dec.prior_tokens)
    assert torch.equal(batch["concept_probs"], torch.sigmoid(dec.concept_logits))
    assert torch.equal(batch["masks"], torch.sigmoid(dec.mask_logits))
    assert batch["mask_names"] == [s.class_names[i] for i in dec.top_concept.tolist()]


# ---- upstream model flags (defects 14, 19) and unCLIP's unconditional context (defect 24) ------------------------
MODEL_FLAG_CASES = {
    "null_kv": ("upstream.text_attention_null_kv=false",),
    "residual": ("upstream.text_attention_residual=false",),
    "prior_backbone": ("upstream.prior_condition=backbone",),
    "heads_on_prior": ("upstream.head_input=prior",),
}


@pytest.mark.parametrize("case", sorted(MODEL_FLAG_CASES))
def test_model_flags_change_stage2_and_stage3_and_load_strictly(
    env: SmokeEnv, stage2_run: Path, enhance: Path, case: str
) -> None:
    """Each defect-14/19 flag, run through stage 2 (from the same stage 1) and stage 3 with the same flag: the
    stage-2 losses and the brain outputs differ from the default run's, and the stage-2 weights load strictly (a model
    built without the null key/value has no such parameter)."""
    from pipeline import stage2
    from utils.checkpoint import read_weights

    flags, exp = MODEL_FLAG_CASES[case], f"flag_{case}"
    copy_stages(stage2_run, paths(env, exp).root, ("stage1",))
    run = stage2.train(config(env, "2", exp, *STAGE2, *flags))
    first_loss = lambda folder: json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # noqa: E731
    assert first_loss(run) != first_loss(stage2_run / "stage2")
    keys = read_weights(run / "checkpoints" / "best")[0]
    assert ("text_seg_dec.null_kv" in keys) == (case != "null_kv")
    out = outputs(reconstruct(env, exp, *flags, "sample.num_previews=0"))
    want = outputs(enhance)
    assert not torch.equal(out["prior_tokens"], want["prior_tokens"]) or case != "prior_backbone"
    assert not torch.equal(out["masks"], want["masks"])


def test_unclip_uncond_reaches_the_sampler_and_changes_only_the_keyframes(
    env: SmokeEnv, stage2_run: Path, enhance: Path
) -> None:
    """``sample.unclip_uncond=random_noise`` (upstream, defect 24) changes the keyframes only; the default ("null",
    all-zero tokens) is what the ``enhance`` run used."""
    copy_stages(stage2_run, paths(env, "uncond").root)
    noisy = outputs(reconstruct(env, "uncond", "sample.unclip_uncond=random_noise", "sample.num_previews=0"))
    want = outputs(enhance)
    assert not torch.equal(noisy["keyframes"], want["keyframes"])
    for name in TENSORS:
        if name != "keyframes":
            assert torch.equal(noisy[name], want[name]), name
    assert config(env, "3", RUN).sample.unclip_uncond == "null"


# ---- diagnostics of bench/info_ladder.py ----------------------------------------------------------------------------
def test_ladder_tokens_brain_changes_only_what_reads_the_prior(env: SmokeEnv, stage2_run: Path, enhance: Path) -> None:
    """``sample.tokens=brain`` feeds the keyframe the brain tokens too: with the default heads (which already read
    them, ``upstream.head_input=brain``), only the keyframes and the saved tokens change; ``prior`` changes the heads'
    outputs and not the tokens; ``ground_truth`` changes everything, the masks included. The manifest records the
    rung."""
    from utils.manifest import read_manifest

    copy_stages(stage2_run, paths(env, "rung_brain").root)
    brain = reconstruct(env, "rung_brain", "sample.tokens=brain", "sample.num_previews=0")
    got, want = outputs(brain), outputs(enhance)
    for name in TENSORS:
        same = torch.equal(got[name], want[name])
        assert same == (name not in ("keyframes", "prior_tokens")), name
    assert read_manifest(brain)["tokens"] == "brain" and read_manifest(enhance)["tokens"] == "model"
    copy_stages(stage2_run, paths(env, "rung_prior").root)
    prior = outputs(reconstruct(env, "rung_prior", "sample.tokens=prior", "sample.num_previews=0"))
    assert torch.equal(prior["prior_tokens"], want["prior_tokens"])  # (the keyframes follow the enhance masks)
    assert not torch.equal(prior["concept_probs"], want["concept_probs"])  # float32 (the smoke masks round alike)
    copy_stages(stage2_run, paths(env, "rung_truth").root)
    truth = outputs(reconstruct(env, "rung_truth", "sample.tokens=ground_truth", "sample.num_previews=0"))
    for name in TENSORS:  # every head's output follows the tokens it reads, the masks included
        assert not torch.equal(truth[name], want[name]), name


def test_ladder_oracles_are_the_stimulus(env: SmokeEnv, stage2_run: Path) -> None:
    """``tokens=ground_truth``, ``oracle_blurry`` and ``oracle_captions``: the saved tokens are the CLIP tokens of the
    stimulus' target frame, the blurry videos its VAE reconstruction (unmasked), the captions its own; the manifest
    lists the three oracles."""
    from pipeline import stage3
    from utils.manifest import read_manifest

    flags = ("sample.tokens=ground_truth", "sample.oracle_blurry=true", "sample.oracle_captions=true")
    copy_stages(stage2_run, paths(env, "rung_oracle").root)
    folder = reconstruct(env, "rung_oracle", *flags, "sample.num_previews=0")
    got = outputs(folder)
    s = stage3.setup(config(env, "3", "rung_oracle", *flags))
    frames = s.data.frames("test", np.arange(4))  # (4, F, 3, R, R)
    tokens = s.clip.image_tokens(frames[:, s.cfg2.train.target_frame]).float()
    torch.testing.assert_close(got["prior_tokens"].float(), tokens, atol=2e-3, rtol=2e-3)  # stored as float16
    blurry = s.vae.decode(s.vae.encode(frames))
    torch.testing.assert_close(got["blurry_videos"].float(), blurry.float(), atol=2e-3, rtol=0)
    assert captions(folder) == [str(c) for c in s.data.captions("test")[:4]]
    assert read_manifest(folder)["oracles"] == ["tokens", "blurry", "captions"]


# ---- pieces ---------------------------------------------------------------------------------------------------------
def test_token_mask_follows_the_token_grid() -> None:
    from pipeline.stage3 import soft_mask, token_mask

    probs = torch.zeros(1, 2, 8, 8)
    probs[:, :, :, :4] = 0.9  # left half of every frame
    soft = soft_mask(probs, 0.5)
    assert soft[0, 0, 0, 0] == 1.0 and soft[0, 0, 0, 7] == 0.5
    weights = token_mask(soft, 16).view(4, 4)  # 4 x 4 tokens, row-major
    assert torch.equal(weights[:, :2], torch.ones(4, 2)) and torch.equal(weights[:, 2:], torch.full((4, 2), 0.5))


@pytest.fixture(scope="module")
def text_decoder() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.heads import TextDecoder

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=12, n_positions=32)).eval()
    return TextDecoder(8, gpt).eval()


def test_beam_search_with_one_beam_is_greedy_and_rows_are_independent(text_decoder: torch.nn.Module) -> None:
    from pipeline.stage3 import beam_generate

    prefix = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    greedy, g_mask = text_decoder.generate(prefix, 10, eos_id=3)
    beam1, b_mask = beam_generate(text_decoder, prefix, 10, 3, beams=1, length_penalty=1.0)
    assert torch.equal(g_mask, b_mask[:, : g_mask.shape[1]]) and not b_mask[:, g_mask.shape[1] :].any()
    assert all(torch.equal(g[m], b[: len(g)][m]) for g, b, m in zip(greedy, beam1, g_mask))
    beam3, mask3 = beam_generate(text_decoder, prefix, 10, 3, beams=3, length_penalty=1.0)
    for i in range(len(prefix)):
        one, one_mask = beam_generate(text_decoder, prefix[i : i + 1], 10, 3, beams=3, length_penalty=1.0)
        assert torch.equal(one[0][one_mask[0]], beam3[i][mask3[i]])


def test_caption_ids_become_text_without_special_or_foreign_ids() -> None:
    import open_clip

    from pipeline.stage3 import ids_to_text

    tok = open_clip.SimpleTokenizer()
    ids = tok.encode("a man walks a dog")
    text = ids_to_text(tok, [tok.sot_token_id, *ids, 50000, tok.eot_token_id])
    assert text == "a man walks a dog"


# ---- entry points ---------------------------------------------------------------------------------------------------
def test_script_refuses_without_stage2_in_one_line(env: SmokeEnv, capsys: pytest.CaptureFixture[str]) -> None:
    import recon_decoupled
    from utils.cli import run_stage
    from utils.stage_configs import Stage3Config

    argv = ["--profile", str(env.profile), "--exp", "cli_no_stage2", "--mode", "motion"]
    assert run_stage(Stage3Config, recon_decoupled.main, recon_decoupled.__doc__, argv) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: StageOrderError") and "stage 2" in last and "train_neurons.sh" in last
