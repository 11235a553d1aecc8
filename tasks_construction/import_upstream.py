"""Import the checkpoints that upstream NEURONS released into a run folder of this project, so that stages 3-6 decode
from them without training.

    python -m tasks_construction.import_upstream --src EXP/exp_neurons/subj_1 --exp released --subj 1
    bash train_neurons.sh 0 released 3456 enhance 1 paper_upstream

``--src`` is a released run folder (``EXP/exp_<exp>/subj_<S>``, files under ``checkpoints/``) or its ``checkpoints``
folder. Only ``brain_model_prior_last.pth`` (stage 2, what upstream's stage 3 decodes) is required: it holds every
inference module, the frozen backbone, ridge and CLIP projection included. ``brain_model_prior.pth`` (stage-2 best),
``brain_model.pth`` and ``brain_model_last.pth`` (stage 1) are imported too when present. Written into
``<exp_root>/exp_<NAME>/subj_<S>/``: ``stage2/checkpoints/{last,best}/`` (and ``stage1/...``), each stage's
``manifest.json`` (with the source files under ``imported_from``) and ``config/stage<k>.yaml``.

Every file is read by :mod:`utils.safe_pickle` (nothing in it is executed; only ``model_state_dict`` is loaded) and
renamed by the strict key map :mod:`models.neurons_keymap`, against the model that stage 3 builds for this profile,
subject and data; every file is checked before anything is written. The stage-2 config records the upstream options
the weights were trained under (``UPSTREAM_TRAINED_FLAGS``: defect 14's text attention without residual or null
key/value, batch-wide temporal attention, ...), so stage 3 rebuilds that architecture; run it with a profile that has
those options (``paper_upstream``; another profile is refused by stage 3 with the option to set). A run folder that
already has stage-1 or stage-2 outputs is refused unless ``--force`` (which replaces them).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from models.brain import NeuronsBrainModel
from models.configured import make_brain_config, model_flags
from models.foundation import build_role, foundation_impl
from models.neurons_keymap import (
    REQUIRED_FILE,
    UPSTREAM_FILES,
    UPSTREAM_TRAINED_FLAGS,
    NeuronsMapping,
    log_mapping,
    map_neurons_state_dict,
    state_dict_shapes,
    untie,
)
from models.sizes import ALL_PARTS, PAPER_FOUNDATION_DIMS, STAGE1_PARTS, FoundationDims, GPT2Dims
from utils.checkpoint import MODEL_FILE, save_checkpoint
from utils.cli import OneLineParser, begin_stage, report_error
from utils.config import load_config, to_dict
from utils.data import BrainVideoData
from utils.errors import NeuronsError, StageOrderError, WeightsError
from utils.io import file_fingerprint
from utils.manifest import read_manifest
from utils.runs import RunPaths, run_lock, setup_logging
from utils.safe_pickle import open_untrusted
from utils.stage_configs import SharedConfig, Stage1Config, Stage2Config, Stage3Config

log = logging.getLogger(__name__)

HF_HINT = "hf download McGregorW/NEURONS --include 'EXP/exp_neurons/subj_{subj}/checkpoints/{name}' --local-dir ."
SELECTED_ON = "test (upstream, defect 16)"  # upstream picked its best epochs on the test clips


@dataclass
class Imported:
    """One upstream file, read and mapped: it becomes ``stage<stage>/checkpoints/<name>``."""

    path: Path
    stage: str
    name: str
    mapping: NeuronsMapping
    epoch: int | None


def find_files(src: Path, subj: int) -> dict[str, Path]:
    """The upstream checkpoint files present under ``src/checkpoints`` (or ``src``); the stage-2 last one is
    required."""
    if not src.is_dir():
        raise WeightsError(f"--src {src} is not a folder", "pass the released run folder EXP/exp_<exp>/subj_<S>")
    found = {}
    for name in UPSTREAM_FILES:
        for folder in (src / "checkpoints", src):
            if (folder / name).is_file():
                found[name] = folder / name
                break
    if REQUIRED_FILE not in found:
        raise WeightsError(f"no {REQUIRED_FILE} in {src / 'checkpoints'} or {src}",
                           f"download it: {HF_HINT.format(subj=subj, name=REQUIRED_FILE)}")  # fmt: skip
    return found


def upstream_stage2_config(cfg: Stage2Config) -> Stage2Config:
    """The profile's stage-2 config with the upstream options the released weights were trained under."""
    if cfg.upstream != UPSTREAM_TRAINED_FLAGS:
        differ = sorted(k for k, v in to_dict(cfg.upstream).items() if to_dict(UPSTREAM_TRAINED_FLAGS)[k] != v)
        log.warning("profile %s sets upstream.{%s} otherwise; the imported stage 2 records the upstream values the "
                    "weights were trained under, so run stage 3 with paper_upstream (or set them)", cfg.run.profile,
                    ",".join(differ))  # fmt: skip
    return replace(cfg, upstream=UPSTREAM_TRAINED_FLAGS)


# ---- the target model ----------------------------------------------------------------------------------------------
def foundation_dims(cfg: SharedConfig, data: BrainVideoData) -> tuple[FoundationDims, Any]:
    """The foundation dims (and, for the toy sizes, the gpt2 role's model) that stage 3 builds the model with (as
    ``pipeline.common.foundation_dims``, which this floor cannot import; the round-trip test builds it that way)."""
    if foundation_impl(cfg.model.size) == "paper":
        return PAPER_FOUNDATION_DIMS, None
    root = cfg.paths.weights_root
    clip, vae, gpt2 = (build_role(role, "toy", root, "cpu") for role in ("clip", "vae", "gpt2"))
    g = gpt2.model.config
    gpt = GPT2Dims(gpt2.hidden_size, g.n_layer, g.n_head, gpt2.vocab_size, gpt2.max_positions)
    dims = FoundationDims(clip.num_tokens, clip.token_dim, clip.text_dim, vae.latent_channels,
                          data.resolution // vae.downsample, gpt)  # fmt: skip
    return dims, gpt2.model


def target_shapes(
    cfg: Stage2Config, data: BrainVideoData, parts: tuple[str, ...], dims: FoundationDims, gpt2: Any
) -> dict[str, tuple[int, ...]]:
    """key -> shape of the model that stage 3 (``parts=ALL_PARTS``) or stage 2's stage-1 load (``STAGE1_PARTS``)
    builds for this profile, subject and data, with the stage-2 config's upstream options; built on the meta
    device (``gpt2``: the toy role's model, or None to build GPT-2 from ``dims``)."""
    bcfg = make_brain_config(cfg, data, dims, parts, **model_flags(cfg.upstream))
    with torch.device("meta"):
        return state_dict_shapes(NeuronsBrainModel(bcfg, gpt2=gpt2 if "text_dec" in parts else None))


# ---- reading -------------------------------------------------------------------------------------------------------
def read_all(files: dict[str, Path], cfg2: Stage2Config, data: BrainVideoData) -> list[Imported]:
    """Read and map every file (nothing is written); the stage-2 files first."""
    dims, gpt2 = foundation_dims(cfg2, data)
    shapes = {"2": target_shapes(cfg2, data, ALL_PARTS, dims, gpt2)}
    if any(UPSTREAM_FILES[n][0] == "1" for n in files):
        shapes["1"] = target_shapes(cfg2, data, STAGE1_PARTS, dims, gpt2)
    out = []
    for name in sorted(files, key=lambda n: n != REQUIRED_FILE):  # the required file first
        path, (stage, ours) = files[name], UPSTREAM_FILES[name]
        ckpt = open_untrusted(path)
        mapping = map_neurons_state_dict(ckpt.state_dict("model_state_dict"), shapes[stage], str(path))
        log_mapping(mapping, path.name)
        epoch = ckpt.scalar("epoch")
        out.append(Imported(path, stage, ours, mapping, epoch if isinstance(epoch, int) else None))
    return sorted(out, key=lambda item: (item.stage, item.name))


# ---- writing -------------------------------------------------------------------------------------------------------
def refuse_existing(paths: RunPaths, stages: set[str], force: bool) -> None:
    """Stage-1/2 outputs already in the run folder are replaced only with ``--force``."""
    for stage in sorted(stages):
        folder = paths.stage_dir(stage)
        if not (read_manifest(folder) is not None or (folder / "checkpoints").exists()):
            continue
        if not force:
            raise StageOrderError(f"run folder {paths.root} already has stage-{stage} outputs ({folder})",
                                  "import into another --exp, or pass --force to replace them")  # fmt: skip
        log.warning("--force: removing the stage-%s outputs in %s", stage, folder)
        shutil.rmtree(folder)


def write_stage(cfg: SharedConfig, stage: str, items: list[Imported]) -> Path:
    """``stage<k>/checkpoints/<name>/`` for each imported file, then the stage's manifest (config written first)."""
    paths, recorder = begin_stage(cfg, stage, depends_on=())
    for item in items:
        folder = paths.stage_dir(stage) / "checkpoints" / item.name
        state = {"epoch": item.epoch, "step": 0, "imported_from": str(item.path.resolve())}
        save_checkpoint(folder, untie(item.mapping.tensors), cfg, state)
        recorder.add_output(folder / MODEL_FILE)
        log.info("stage %s: %s -> %s", stage, item.path.name, folder)
    recorder.extra.update({
        "imported_from": {it.name: {"path": str(it.path.resolve()), "epoch": it.epoch, **file_fingerprint(it.path)}
                          for it in items},
        "key_map": {it.name: {"keys": len(it.mapping.tensors), "renamed": len(it.mapping.renamed),
                              "dropped": sorted(it.mapping.dropped)} for it in items},
        "selected_on": SELECTED_ON,
        "upstream_flags": to_dict(UPSTREAM_TRAINED_FLAGS),
    })  # fmt: skip
    return recorder.finish()


def import_run(src: Path, cfg1: Stage1Config, cfg2: Stage2Config, force: bool = False) -> RunPaths:
    """Check every file against the model, then write the run folder's stage 1 (when given) and stage 2."""
    cfg2 = upstream_stage2_config(cfg2)
    files = find_files(src, cfg2.run.subj)
    data = BrainVideoData(cfg2.paths.data_root, cfg2.run.subj, cfg2.data)
    data.validate(("voxel", "concepts"))
    items = read_all(files, cfg2, data)
    paths = RunPaths.from_config(cfg2)
    stages = {it.stage for it in items}
    with run_lock(paths.root, "2"):
        refuse_existing(paths, {"1", "2"}, force)
        for stage in sorted(stages):
            write_stage(cfg1 if stage == "1" else cfg2, stage, [it for it in items if it.stage == stage])
    return paths


# ---- command line --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n")[0], prog="python -m tasks_construction.import_upstream")
    parser.add_argument("--src", type=Path, required=True, help="released run folder EXP/exp_<exp>/subj_<S>")
    parser.add_argument("--exp", required=True, help="experiment name of the run folder to write")
    parser.add_argument("--subj", type=int, choices=(1, 2, 3), required=True, help="subject (1, 2 or 3)")
    parser.add_argument("--profile", default="paper_upstream", help="profile (default paper_upstream)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="replace the run folder's stage-1/2 outputs")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, not only its line")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("INFO")
    try:
        cli = {"exp": args.exp, "subj": args.subj}
        cfg1 = load_config(Stage1Config, args.profile, args.overrides, cli)
        cfg2 = load_config(Stage2Config, args.profile, args.overrides, cli)
        paths = import_run(args.src, cfg1, cfg2, args.force)
        stage3_ok = load_config(Stage3Config, args.profile, args.overrides, cli).upstream == UPSTREAM_TRAINED_FLAGS
    except NeuronsError as err:
        return report_error(err, args.debug)
    profile = args.profile if stage3_ok else "paper_upstream"  # stage 3 needs the options of the weights
    print(f"imported {args.src} into {paths.root}\ndecode: bash train_neurons.sh 0 {args.exp} 3456 enhance "
          f"{args.subj} {profile}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
