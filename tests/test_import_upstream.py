"""Importing upstream NEURONS checkpoints: the strict key map against the key/shape manifests of the released files
(meta device, paper size), the safe reader of untrusted ``.pth`` files, and a round trip at smoke size (a model
saved in upstream's format, imported, decoded by stage 3)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.brain import NeuronsBrainModel
from models.configured import model_flags
from models.neurons_keymap import UPSTREAM_TRAINED_FLAGS, map_neurons_state_dict, state_dict_shapes
from models.sizes import ALL_PARTS, STAGE1_PARTS, brain_config
from tests.smoke_env import REPO, SmokeEnv, smoke_env
from tests.smoke_env import run_paths as paths
from tests.smoke_env import stage_config as config
from utils.errors import WeightsError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STAGE1_TSV, STAGE2_TSV = FIXTURES / "neurons_stage1_subj01.tsv", FIXTURES / "neurons_stage2_subj01.tsv"
SUBJ1_VOXELS = 13447
OLD_GPT2_BUFFER = re.compile(r"text_dec\.decoder\.transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def manifest(path: Path) -> dict[str, torch.Tensor]:
    """The key/shape manifest of a released file as a meta state dict, in file order."""
    sd = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            sd[key] = torch.empty(json.loads(shape), dtype=getattr(torch, dtype), device="meta")
    return sd


def paper_model(parts: tuple[str, ...] = ALL_PARTS, n_voxels: int = SUBJ1_VOXELS, **flags) -> NeuronsBrainModel:
    """The paper-size model on the meta device, built with the given upstream options (``model_flags`` kwargs)."""
    with torch.device("meta"):
        return NeuronsBrainModel(brain_config("paper", n_voxels=(n_voxels,), n_classes=51, parts=parts, **flags))


def upstream_model(parts: tuple[str, ...] = ALL_PARTS, n_voxels: int = SUBJ1_VOXELS) -> NeuronsBrainModel:
    return paper_model(parts, n_voxels, **model_flags(UPSTREAM_TRAINED_FLAGS))


# ---- the key map on the manifests of the released files (meta device) --------------------------------------------
def test_stage2_file_maps_exactly_onto_the_model_with_the_upstream_options() -> None:
    sd = manifest(STAGE2_TSV)
    assert len(sd) == 548
    model = upstream_model()
    mapping = map_neurons_state_dict(sd, state_dict_shapes(model), STAGE2_TSV.name)
    assert list(mapping.tensors) == list(model.state_dict()), "every target key is filled, in the model's order"
    assert not mapping.dropped
    renamed_sources = {k for k in sd if k.startswith("text_dec.clip_project.")
                       or re.search(r"video_decoder\..*(attentions|weights|upsamplers)\.", k)}  # fmt: skip
    assert set(mapping.renamed) == renamed_sources and len(renamed_sources) == 153
    used = {mapping.renamed.get(k, k) for k in sd}
    assert used == set(mapping.tensors), "every source key is used once"
    for src, tensor in sd.items():
        assert mapping.tensors[mapping.renamed.get(src, src)] is tensor
    model.load_state_dict(mapping.tensors, strict=True, assign=True)  # torch agrees: no key or shape left over
    dec = model.text_seg_dec
    assert dec.null_kv is None and not dec.cfg.text_attention_residual and dec.cfg.text_attention == "batch"


def test_stage1_file_maps_onto_the_stage1_parts() -> None:
    sd = manifest(STAGE1_TSV)
    model = upstream_model(STAGE1_PARTS)
    mapping = map_neurons_state_dict(sd, state_dict_shapes(model), STAGE1_TSV.name)
    assert len(sd) == 65 and list(mapping.tensors) == list(model.state_dict())
    assert not mapping.renamed and not mapping.dropped


def test_old_transformers_gpt2_buffers_are_dropped_with_their_reason() -> None:
    sd = manifest(STAGE2_TSV)
    for i in range(12):
        sd[f"text_dec.decoder.transformer.h.{i}.attn.bias"] = torch.empty(1, 1, 1024, 1024, device="meta")
        sd[f"text_dec.decoder.transformer.h.{i}.attn.masked_bias"] = torch.empty((), device="meta")
    mapping = map_neurons_state_dict(sd, state_dict_shapes(upstream_model()), "old")
    assert len(mapping.dropped) == 24 and all("GPT-2 causal-mask" in why for why in mapping.dropped.values())
    assert len(mapping.tensors) == 548


def test_the_corrected_architecture_is_refused_with_the_option_to_set() -> None:
    """The upstream file has no text-attention null key/value (defect 14): the corrected model cannot take it."""
    with pytest.raises(WeightsError, match=r"text_seg_dec\.null_kv.*text_attention_null_kv=false"):
        map_neurons_state_dict(manifest(STAGE2_TSV), state_dict_shapes(paper_model()), "stage2")


def test_unknown_keys_are_refused() -> None:
    sd = {**manifest(STAGE2_TSV), "text_seg_dec.extra_head.weight": torch.empty(1, device="meta")}
    with pytest.raises(WeightsError, match=r"1 keys match no rule.*extra_head"):
        map_neurons_state_dict(sd, state_dict_shapes(upstream_model()), "stage2")


def test_a_shape_mismatch_names_the_key_and_both_shapes() -> None:
    """Subject 1's file against subject 2's model (14828 voxels): one line, the key and both shapes."""
    with pytest.raises(WeightsError) as err:
        map_neurons_state_dict(manifest(STAGE2_TSV), state_dict_shapes(upstream_model(n_voxels=14828)), "f.pth")
    line = str(err.value)
    assert "\n" not in line
    assert "'ridge.linears.0.weight' has [4096, 13447]" in line and "has [4096, 14828]" in line


def test_the_trained_flags_are_the_upstream_profiles() -> None:
    from utils.config import load_config
    from utils.stage_configs import Stage2Config, Stage3Config

    for cls in (Stage2Config, Stage3Config):
        assert load_config(cls, "paper_upstream").upstream == UPSTREAM_TRAINED_FLAGS
        assert load_config(cls, "smoke_upstream").upstream == UPSTREAM_TRAINED_FLAGS


# ---- the safe reader ------------------------------------------------------------------------------------------------
def write_marker(path: str) -> None:
    """Would run if a pickle that names it were loaded unsafely."""
    Path(path).write_text("code ran")


class Payload:
    """Pickles as a call of ``func(arg)``."""

    def __init__(self, func, arg: str):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def scheduler_state(model: torch.nn.Module) -> tuple[dict, dict]:
    """AdamW and OneCycleLR states as upstream saved them under torch 2.1: the scheduler's ``anneal_func`` is a
    bound method, which pickles the scheduler object and its optimizer (and fails ``weights_only=True``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=4)
    state = sched.state_dict()
    state["anneal_func"] = sched._anneal_func
    return opt.state_dict(), state


def save_upstream(path: Path, state_dict: dict[str, torch.Tensor], model: torch.nn.Module, **extra) -> Path:
    """A checkpoint in upstream's save layout (NEURONS_CHECKPOINTS.md §2)."""
    opt_state, sched_state = scheduler_state(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 49, "model_state_dict": state_dict, "optimizer_state_dict": opt_state,
                "lr_scheduler": sched_state, "train_losses": [0.9, 0.8], "test_losses": [], "lrs": [1e-5, 2e-5],
                **extra}, path)  # fmt: skip
    return path


def test_safe_reader_runs_nothing_and_keeps_the_tensors(tmp_path: Path) -> None:
    from utils.safe_pickle import open_untrusted

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = model.state_dict()
    sd["tied"] = sd["0.weight"]  # two keys, one storage (as GPT-2's wte / lm_head)
    marker, shell_marker = tmp_path / "marker", tmp_path / "shell_marker"
    path = save_upstream(tmp_path / "up.pth", sd, model, hook=Payload(write_marker, str(marker)),
                         shell=Payload(os.system, f"touch {shell_marker}"))  # fmt: skip
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    ckpt = open_untrusted(path)
    loaded = ckpt.state_dict("model_state_dict")
    assert not marker.exists() and not shell_marker.exists()
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert loaded["tied"].data_ptr() == loaded["0.weight"].data_ptr()
    assert ckpt.scalar("epoch") == 49 and ckpt.scalar("lr_scheduler") is None
    assert {"__builtin__.getattr", "torch.optim.lr_scheduler.OneCycleLR", "posix.system"} <= set(ckpt.replaced)
    assert f"{__name__}.write_marker" in ckpt.replaced
    torch.load(path, weights_only=False)  # the file is live: an unsafe load runs its code
    assert marker.exists() and shell_marker.exists()


def test_safe_reader_refuses_a_state_dict_that_holds_objects(tmp_path: Path) -> None:
    from utils.safe_pickle import load_state_dict

    marker = tmp_path / "marker"
    model = torch.nn.Linear(2, 2)
    sd = {**model.state_dict(), "evil": Payload(write_marker, str(marker))}
    path = save_upstream(tmp_path / "evil.pth", sd, model)
    with pytest.raises(WeightsError, match=r"entry 'evil' is an object of .*write_marker \(not loaded\)"):
        load_state_dict(path)
    (tmp_path / "plain.pth").write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not a torch zip-format checkpoint"):
        load_state_dict(tmp_path / "plain.pth")
    assert not marker.exists()


# ---- round trip at smoke size: upstream format -> import -> stage 3 -------------------------------------------------
def upstream_name(key: str) -> str:
    """Our key -> upstream's (written here by hand, independently of models.neurons_keymap)."""
    key = re.sub(r"\.attentions\.(\d+)\.spatial\.", r".attentions.\1.", key)
    key = re.sub(r"\.attentions\.(\d+)\.temporal\.", r".temp_attentions.\1.", key)
    key = re.sub(r"\.attentions\.(\d+)\.weight$", r".weights.\1", key)
    key = key.replace("mid_block.attention.spatial.", "mid_block.attentions.0.")
    key = key.replace("mid_block.attention.temporal.", "mid_block.temp_attentions.0.")
    key = key.replace("mid_block.attention.weight", "mid_block.weights.0")
    key = key.replace(".upsample_conv.", ".upsamplers.0.conv.")
    return key.replace("text_dec.clip_project.", "text_dec.clip_project.model.0.")


def pattern(key: str) -> str:
    return re.sub(r"\.\d+", ".N", key)


@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    """The smoke env under the upstream behaviours (as smoke_upstream), decoding 2 test clips without previews."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    profile = tmp_path_factory.mktemp("import") / "import_upstream.yaml"
    upstream = REPO / "configs" / "upstream_behaviour.yaml"
    profile.write_text(f"extends: [{base.profile}, {upstream}]\n"
                       "stage3: {sample: {num_clips: 2, batch_size: 2, num_previews: 0}}\n")  # fmt: skip
    yield SmokeEnv(base.world, base.weights, base.exp_root, profile)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def released(env: SmokeEnv, tmp_path_factory) -> tuple[Path, NeuronsBrainModel]:
    """A smoke-size model as upstream's stage 2 would leave it (upstream options, perturbed weights), saved as
    ``<src>/checkpoints/brain_model_prior_last.pth`` with upstream's key names, dict layout and GPT-2 buffers."""
    from models.configured import make_brain_config
    from models.foundation import build_role
    from pipeline.common import foundation_dims, load_data

    cfg = config(env, "2", "released")
    data = load_data(cfg, ("voxel", "concepts"))
    clip, vae, gpt2 = (build_role(r, "toy", env.weights, "cpu") for r in ("clip", "vae", "gpt2"))
    bcfg = make_brain_config(cfg, data, foundation_dims(cfg, clip, data, vae, gpt2), ALL_PARTS,
                             **model_flags(cfg.upstream))  # fmt: skip
    torch.manual_seed(0)
    model = NeuronsBrainModel(bcfg, gpt2=gpt2.model).eval()
    with torch.no_grad():
        for p in model.parameters():  # distinct values everywhere (the blend scalars start equal)
            p.add_(0.05 * torch.randn_like(p))
    sd = {upstream_name(k): v for k, v in model.state_dict().items()}
    assert {pattern(k) for k in sd} == {pattern(k) for k in manifest(STAGE2_TSV)}, "upstream's naming"
    for i in range(gpt2.model.config.n_layer):  # what transformers < 4.31 also saved
        sd[f"text_dec.decoder.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 4, 4).tril()
        sd[f"text_dec.decoder.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    src = tmp_path_factory.mktemp("released") / "exp_neurons" / "subj_1"
    path = save_upstream(src / "checkpoints" / "brain_model_prior_last.pth", sd, model)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    return src, model


def import_cli(env: SmokeEnv, src: Path, exp: str, *extra: str) -> int:
    from tasks_construction.import_upstream import main

    return main(["--src", str(src), "--exp", exp, "--subj", "1", "--profile", str(env.profile), *extra])


def test_round_trip_import_then_stage3(env: SmokeEnv, released: tuple[Path, NeuronsBrainModel]) -> None:
    from pipeline.stage3 import reconstruct
    from utils.checkpoint import read_weights
    from utils.manifest import read_manifest, require_stage
    from utils.training import clip_seed

    src, model = released
    assert import_cli(env, src, "imported") == 0
    p = paths(env, "imported")
    require_stage("2", p.stage_dir("2"), p.stage_dirs(), "{stage}")
    weights, meta = read_weights(p.stage_dir("2") / "checkpoints" / "last")
    want = model.state_dict()
    assert set(weights) == set(want) and all(torch.equal(weights[k], want[k]) for k in want)
    assert meta["subj"] == "1" and not (p.stage_dir("1")).exists() and not (p.stage_dir("2") / "checkpoints" /
                                                                             "best").exists()  # fmt: skip
    manifest2 = read_manifest(p.stage_dir("2"))
    assert Path(manifest2["imported_from"]["last"]["path"]) == (src / "checkpoints" / "brain_model_prior_last.pth")
    assert manifest2["config"]["upstream"]["text_attention_null_kv"] is False
    assert len(manifest2["key_map"]["last"]["dropped"]) == 2 * model.cfg.dims.gpt2.n_layer

    cfg3 = config(env, "3", "imported")
    out = reconstruct(cfg3)
    manifest3 = read_manifest(out)
    assert manifest3["stage2_checkpoint_read"] == "last"
    assert {k: manifest3["config"]["upstream"][k] for k in ("text_attention", "text_attention_residual",
            "text_attention_null_kv", "temporal_scope")} == {"text_attention": "batch",
            "text_attention_residual": False, "text_attention_null_kv": False, "temporal_scope": "batch"}  # fmt: skip
    probs = load_file(out / "concept_probs.safetensors")["concept_probs"]  # (2, C)
    from pipeline.common import load_data

    voxels = load_data(cfg3, ("voxel",)).voxels("test")[:2]
    gens = [torch.Generator().manual_seed(clip_seed(cfg3.run.seed, i)) for i in range(2)]
    dt = model.text_seg_dec.k.in_features
    dec = model.decode_voxels(voxels, gens, cfg3.sample.prior_steps, key_table=torch.zeros(probs.shape[1], dt))
    assert torch.allclose(probs, torch.sigmoid(dec.concept_logits), atol=1e-5), "stage 3 decoded the released model"


def test_import_refuses_existing_outputs_and_bad_input(
    env: SmokeEnv, released: tuple[Path, NeuronsBrainModel], tmp_path: Path, capsys
) -> None:
    src, _ = released
    assert import_cli(env, src, "twice") == 0
    last = paths(env, "twice").stage_dir("2") / "checkpoints" / "last" / "model.safetensors"
    stamp = last.stat().st_mtime_ns
    assert import_cli(env, src, "twice") == 1
    assert "already has stage-2 outputs" in capsys.readouterr().err and last.stat().st_mtime_ns == stamp
    assert import_cli(env, src, "twice", "--force") == 0 and last.stat().st_mtime_ns != stamp
    assert import_cli(env, tmp_path, "missing") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the toy roles' progress bars
    assert err.startswith("error: WeightsError: no brain_model_prior_last.pth") and "hf download" in err
    assert not paths(env, "missing").root.exists()
    from tasks_construction.import_upstream import main

    code = main(["--src", str(src), "--exp", "subj2", "--subj", "2", "--profile", str(env.profile)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: WeightsError:")
    assert "shape mismatch: upstream 'ridge.linears.0.weight'" in err
    assert "[32, 300]" in err and "[32, 340]" in err and not paths(env, "subj2").root.parent.exists()


def test_stage1_files_are_imported_when_present(
    env: SmokeEnv, released: tuple[Path, NeuronsBrainModel], tmp_path: Path
) -> None:
    """``brain_model.pth`` (stage-1 best, 3 parts) beside the stage-2 file becomes ``stage1/checkpoints/best``."""
    import shutil

    from utils.checkpoint import read_weights
    from utils.manifest import read_manifest, require_stage

    src, model = released
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(src / "checkpoints" / "brain_model_prior_last.pth", tmp_path / "checkpoints")
    stage1 = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in STAGE1_PARTS}
    save_upstream(tmp_path / "checkpoints" / "brain_model.pth", stage1, model.backbone)
    assert import_cli(env, tmp_path, "with_stage1") == 0
    p = paths(env, "with_stage1")
    require_stage("1", p.stage_dir("1"), p.stage_dirs(), "{stage}")
    weights, _ = read_weights(p.stage_dir("1") / "checkpoints" / "best")
    assert set(weights) == set(stage1) and all(torch.equal(weights[k], stage1[k]) for k in stage1)
    assert not (p.stage_dir("1") / "checkpoints" / "last").exists()
    assert read_manifest(p.stage_dir("1"))["imported_from"]["best"]["epoch"] == 49
    assert (p.config_dir / "stage1.yaml").is_file() and (p.config_dir / "stage2.yaml").is_file()
