"""Get the data (and list the weights) that a profile needs.

    python download_dataset.py                         # the real cc2017 data + NEURONS annotations (paper profile)
    python download_dataset.py --toy --profile toy     # build the toy cortex world (smoke: --profile smoke)
    python download_dataset.py --toy-weights           # pretrain the toy foundation models on it
    python download_dataset.py --weights               # every weight file of the paper profile, with its source
    python download_dataset.py --check --profile paper # everything a run needs, each missing item with its command

Real files are downloaded only when the hub can be reached; otherwise the script prints exactly which files are needed,
where to get them and where to put them, and exits with status 1. Once the data are complete it unpacks the masks and
finds the key objects, then prints the next command. ``--check`` downloads and writes nothing: it lists the data files,
key objects, caption embeddings and every weight file of every role that a run of the profile reads, with their sizes
on disk, and every missing one with the command that gets it (exit status 1 when anything is missing).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tarfile
from pathlib import Path

from utils.cli import OneLineParser, add_set_argument, report_error
from utils.config import load_config
from utils.data_catalog import (
    SOURCES,
    WORLD_FILE,
    DataFile,
    dataset_files,
    human_size,
    is_present,
    key_objects_info_file,
    missing_files,
)
from utils.errors import ConfigError, DataError, NeuronsError
from utils.io import atomic_write_json
from utils.runs import setup_logging
from utils.stage_configs import Stage1Config, WorldBuildConfig

log = logging.getLogger("download_dataset")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--toy", action="store_true", help="build the toy cortex world instead of downloading cc2017")
    what.add_argument("--weights", action="store_true", help="list (and fetch when possible) the paper weights")
    what.add_argument(
        "--toy-weights",
        action="store_true",
        help="pretrain the toy foundation models on the toy world (+ caption embeddings)",
    )
    parser.add_argument("--profile", help="paper (default), toy, smoke or a YAML path; --toy defaults to toy")
    parser.add_argument("--out", help="output folder (default: the profile's paths.data_root)")
    parser.add_argument("--subj", type=int, choices=(1, 2, 3), action="append", help="real data: subjects (all)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="download nothing: list everything a run of the profile needs (data, key objects, caption embeddings, "
        "weights) with sizes on disk and a command per missing item; with --weights: the weights only",
    )
    parser.add_argument("--threads", type=int, help="--toy-weights: torch threads (1 is fastest on a busy machine)")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="--toy-weights: then score every toy model on the world's test split into <weights_root>/quality.json",
    )
    add_set_argument(parser)
    return parser.parse_args(argv)


def build_toy(args) -> int:
    from tasks_construction import find_key_obj
    from tasks_construction.toy_cortex.build import build_world

    cfg = load_config(WorldBuildConfig, args.profile or "toy", args.overrides)
    if cfg.model.size == "paper":
        raise ConfigError(
            f"profile '{cfg.run.profile}' is the real cc2017 world", "use --profile toy or --profile smoke with --toy"
        )
    out = Path(args.out or cfg.paths.data_root)
    summary = build_world(cfg.world, out)
    if summary.get("skipped") and all((out / key_objects_info_file(s)).exists() for s in SOURCES):
        log.info("toy cortex world in %s is complete; nothing to do", out)
    else:
        find_key_obj.run(out, SOURCES)
    ceiling = summary.get("ceiling", {})
    log.info("toy cortex world ready in %s", out)
    for subj, scores in sorted(ceiling.items()):
        log.info("noise ceiling %s: %s", subj, scores)
    return 0


def build_toy_weights(args) -> int:
    """Pretrain the toy foundation models on the world's training split, then embed its captions with the toy CLIP."""
    from models.foundation import build_role, foundation_impl
    from models.foundation.toy.build import build_toy_weights as build
    from tasks_construction import gen_GT_clip_embeds

    cfg = load_config(WorldBuildConfig, args.profile or "toy", args.overrides)
    if cfg.model.size == "paper":
        raise ConfigError(f"profile '{cfg.run.profile}' uses the real weights", "use --profile toy or smoke")
    data_root, weights_root = Path(args.out or cfg.paths.data_root), Path(cfg.paths.weights_root)
    if not (data_root / WORLD_FILE).exists():
        raise DataError(
            f"no toy world in {data_root}",
            f"build it first: python download_dataset.py --toy --profile {cfg.run.profile}",
        )
    summary = build(data_root, weights_root, cfg.model.size, cfg.world.seed, num_threads=args.threads)
    log.info("toy foundation models ready in %s (%.0f s)", weights_root, summary.get("seconds", 0.0))
    clip = build_role("clip", foundation_impl(cfg.model.size), weights_root, "cpu")
    gen_GT_clip_embeds.run(data_root, clip, cfg.data.caption_source)
    gen_GT_clip_embeds.copy_toy_tokens_proj(weights_root, data_root)
    if args.evaluate:
        from models.foundation.toy.evaluate import evaluate_toy_weights

        quality = evaluate_toy_weights(data_root, weights_root, cfg.model.size)
        atomic_write_json(weights_root / "quality.json", {"world": str(data_root), "split": "test", **quality})
        log.info("toy weights quality written to %s", weights_root / "quality.json")
    return 0


def hub_reachable() -> bool:
    """True when the Hugging Face hub answers within a few seconds (never when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().repo_info("gongzx/cc2017_dataset", repo_type="dataset", timeout=5)
        return True
    except Exception as err:  # any network or auth failure means: print the list instead
        log.info("hub not reachable (%s)", type(err).__name__)
        return False


def download(repo: str, filename: str, repo_type: str, local_dir: Path, revision: str | None = None) -> Path:
    """Fetch ``filename`` of ``repo`` to ``local_dir/filename`` (the one place where the project downloads
    anything)."""
    from huggingface_hub import hf_hub_download

    log.info("downloading %s from %s into %s", filename, repo, local_dir)
    return Path(hf_hub_download(repo, filename, repo_type=repo_type, revision=revision, local_dir=local_dir))


def fetch(entry: DataFile, root: Path) -> None:
    log.info("%s is about %s", entry.relpath, human_size(entry.approx_bytes))
    path = download(entry.repo, entry.relpath, entry.repo_type, root)
    if entry.extract:
        unpack(path)


def unpack(tarball: Path) -> None:
    log.info("unpacking %s", tarball)
    with tarfile.open(tarball) as tar:
        tar.extractall(tarball.parent, filter="data")


def real_data(args) -> int:
    from tasks_construction.preflight import items_table, real_data_items

    cfg = load_config(Stage1Config, args.profile or "paper", args.overrides)
    root = Path(args.out or cfg.paths.data_root)
    subjects = tuple(sorted(set(args.subj or (1, 2, 3))))
    missing = missing_files(root, subjects)
    print(items_table(real_data_items(root, subjects)))
    if not missing:
        print(f"all {len(dataset_files(subjects))} data files are in {root}")
        return finish_data(root, cfg.run.profile)
    if not hub_reachable():
        print(f"\n{len(missing)} data file(s) missing and the hub cannot be reached from here: get each with the "
              f"command under it, then run `python download_dataset.py --out {root}` again (it unpacks the masks "
              "and finds the key objects).")  # fmt: skip
        return 1
    root.mkdir(parents=True, exist_ok=True)
    for entry in missing:
        fetch(entry, root)
    still = [e.relpath for e in missing if not is_present(e, root)]
    if still:
        raise DataError(f"download finished but {', '.join(still)} are still missing in {root}", "rerun the download")
    return finish_data(root, cfg.run.profile)


def finish_data(root: Path, profile: str) -> int:
    """After a complete data download: unpack the mask tarballs not yet unpacked, find the key objects when they
    are missing, then print the next command."""
    from tasks_construction import find_key_obj
    from tasks_construction.preflight import key_object_items, unpacked_dir

    for entry in (e for e in dataset_files(()) if e.extract and not unpacked_dir(e, root).is_dir()):
        unpack(root / entry.relpath)
    if any(not item.present for item in key_object_items(root)):
        log.info("finding the key objects of %s", root)
        find_key_obj.run(root, SOURCES)
    print(f"data ready in {root}. Next: `python download_dataset.py --weights --profile {profile}`, then "
          f"`python download_dataset.py --check --profile {profile}`")  # fmt: skip
    return 0


def list_weights(args) -> int:
    """Print every paper weight file (role, source, size, local path) and fetch the missing ones when the hub answers;
    otherwise exit 1 with the command that gets each missing file."""
    from models.foundation.catalog import catalog_table, human_bytes, missing_weights

    cfg = load_config(Stage1Config, args.profile or "paper", args.overrides)
    root = Path(cfg.paths.weights_root)
    print(catalog_table(root))
    missing = missing_weights(root)
    if missing and not args.check and hub_reachable():
        for entry in missing:
            path = download(entry.repo, entry.filename, entry.repo_type, entry.local_dir(root), entry.revision)
            if entry.moved:
                os.replace(path, root / entry.relpath)
        missing = missing_weights(root)
    if not missing:
        print(f"all weight files are in {root}")
        return 0
    total = human_bytes(sum(e.approx_bytes for e in missing))
    print(f"\n{len(missing)} weight file(s) missing under {root} (~{total}). Get them with:")
    for entry in missing:
        print(f"  {entry.download_hint(root)}")
    return 1


def check_run(args) -> int:
    """``--check``: every item a run of the profile reads, each missing one with its command; 1 if any is missing."""
    from tasks_construction.preflight import items_table, missing_summary, run_items

    profile = args.profile or "paper"
    items = run_items(profile, args.overrides, Path(args.out) if args.out else None, args.subj or (1, 2, 3))
    print(items_table(items))
    if all(item.present for item in items):
        print(f"everything a '{profile}' run reads is in place. Next: "
              f"`bash train_neurons.sh 0 <exp> 123456e enhance 1 {profile}`")  # fmt: skip
        return 0
    toy = load_config(Stage1Config, profile, args.overrides).model.size != "paper"
    how = ("`--toy` and `--toy-weights` build them" if toy
           else "`python download_dataset.py` and `--weights` fetch them when the hub can be reached")  # fmt: skip
    print(f"\n{missing_summary(items)}: run the command under each, in this order, then check again ({how}).")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("INFO")
    try:
        if args.toy:
            return build_toy(args)
        if args.weights:
            return list_weights(args)
        if args.toy_weights:
            return build_toy_weights(args)
        if args.check:
            return check_run(args)
        return real_data(args)
    except NeuronsError as err:
        return report_error(err)


if __name__ == "__main__":
    sys.exit(main())
