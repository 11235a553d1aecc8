"""The SNR and data sweep on the toy world (issue 17, item 3): the oracle ceiling, the ridge baseline, ridge → the same
decoders and NEURONS at several fMRI SNRs and training-set sizes, subject 1, over ``--seeds``.

    python bench/snr_sweep.py --profile toy --exp sweep                   # 5 worlds x 3 seeds (hours on 2 cores)
    python bench/snr_sweep.py --profile toy --exp sweep --dry-run         # the worlds, folders and weights decision
    python bench/snr_sweep.py --profile smoke --exp t --seeds 0 --snrs 0.01 0.1 --clip-factors 1   # a smoke check

The worlds: the profile's world (``world`` section; toy: SNR 0.01, 720 training clips) with ``world.snr`` set to each
``--snrs`` value (default 0.003 0.01 0.03 0.1), and ``world.n_train_clips`` set to each ``--clip-factors`` multiple
(default 1 2) at the profile's SNR: 5 worlds by default. The one equal to the profile's world is the profile's own
folder (``paths.data_root``, e.g. ``data/toy_cortex`` after ``make demo``); every other one is built into its own
folder ``<sweep root>/<name>/`` (default sweep root ``<data_root>_sweep``) by ``download_dataset.py --toy`` with a
profile ``<sweep root>/<name>.yaml`` that extends ``--profile`` and sets ``paths.data_root`` and ``world``; its
caption embeddings come from ``tasks_construction.gen_GT_clip_embeds`` with the profile's toy CLIP. Each world keeps
the generator's seed: the test clips and the first training clips are those of the profile's world (the stimuli of a
movie segment depend only on the seed, the split and the segment).

The toy foundation weights (``paths.weights_root``) are never rebuilt here (no ``--toy-weights``: the 21-minute
build would replace the profile's weights). They stand for models pretrained elsewhere and are reused by every world:

* an SNR world has the profile world's stimuli, so its weights hash (``models.foundation.toy.data.world_hash``: the
  training frames, captions and scenes only) equals theirs; the sweep checks it and stops if it differs;
* the 2x-clips world has other training stimuli (the profile world's 720 clips plus 720 new ones), so its hash
  differs and the weights were pretrained on a subset of its training clips (the sweep checks that the profile
  world's training frames are its first ones). ``pipeline.common.require_foundation`` checks only that the weight
  files are present and whole, so the stages run on them; the NEURONS brain model (stages 1-2) and the ridge maps are
  trained on all the world's training clips, which is what the data point measures.

For each world, ``bench/toy_quality.py`` (run as a script, ``--modes enhance`` by default) runs NEURONS (stages 1-6
and e) and the ridge → decoders path for each seed (runs ``<exp>_<world>_s<seed>`` and ``..._ridge``), and reads the
world's oracle ceiling (``ceiling.json``) and the 8×8-pixel ridge baseline; its JSON line is kept whole. Prints a
README-ready markdown table (world × method, the identification and video metrics, mean ± std over seeds, ddof 1)
and writes ``bench/results/snr_sweep_<profile>.json`` and ``snr_sweep_<profile>.png`` (each metric against the SNR,
error bars = std over seeds; the 2x-clips world as open squares at its SNR).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.config import load_config, resolve_profile  # noqa: E402
from utils.data_catalog import CEILING_FILE, WORLD_FILE  # noqa: E402
from utils.errors import NeuronsError  # noqa: E402
from utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from utils.stage_configs import WorldBuildConfig  # noqa: E402
from utils.toy_world import ToyWorldConfig, validate_config  # noqa: E402

log = logging.getLogger("snr_sweep")

SNRS = (0.003, 0.01, 0.03, 0.1)
CLIP_FACTORS = (1, 2)
METHODS = ("NEURONS enhance", "NEURONS motion", "ridge → decoders", "ridge 8×8 pixels", "oracle ceiling")
COLUMNS = (
    ("id_2way", "id 2-way"), ("id_50way", "id 50-way"), ("id_allway", "id all-way"), ("video_2way", "video 2-way"),
    ("video_50way", "video 50-way"), ("frame_2way", "frame 2-way"), ("frame_50way", "frame 50-way"),
    ("clip_pcc", "CLIP-pcc"), ("ssim", "SSIM"), ("psnr", "PSNR"), ("blurry_video_ssim", "blurry SSIM"),
)  # fmt: skip
PLOTTED = ("id_50way", "video_2way", "video_50way", "frame_50way", "ssim", "blurry_video_ssim")


# ---- the worlds ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """One data point: ``name``, its world config, data folder and profile (the base profile for the base world)."""

    name: str
    snr: float
    clip_factor: int
    config: ToyWorldConfig
    data_root: Path
    profile: str
    is_base: bool

    @property
    def weights_reuse(self) -> str:
        if self.is_base or self.clip_factor == 1:
            return "same training stimuli: the weights' world hash must equal this world's"
        return "other training stimuli: the base world's weights, pretrained on its first training clips"


def absolute(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def base_config(profile: str, overrides: list[str]) -> WorldBuildConfig:
    cfg = load_config(WorldBuildConfig, profile, overrides)
    if cfg.model.size == "paper":
        raise SystemExit("error: the sweep needs a toy world profile (toy, smoke or one that extends them)")
    return cfg


def plan_worlds(profile: str, base: WorldBuildConfig, snrs: list[float], factors: list[int],
                sweep_root: Path | None) -> list[World]:  # fmt: skip
    """The SNR worlds (at the base clip count), then the clip-count worlds (at the base SNR), without duplicates."""
    b = base.world
    root = absolute(sweep_root) if sweep_root else absolute(f"{base.paths.data_root.rstrip('/')}_sweep")
    points = [(s, 1) for s in snrs] + [(b.snr, f) for f in factors]
    worlds: dict[ToyWorldConfig, World] = {}
    for snr, factor in points:
        cfg = dataclasses.replace(b, snr=float(snr), n_train_clips=b.n_train_clips * int(factor))
        validate_config(cfg)
        if cfg in worlds:
            continue
        is_base = cfg == b
        name = f"snr{snr:g}" if factor == 1 else f"snr{snr:g}_clips{factor}x"
        data_root = absolute(base.paths.data_root) if is_base else root / name
        world_profile = profile if is_base else str(root / f"{name}.yaml")
        worlds[cfg] = World(name, float(snr), int(factor), cfg, data_root, world_profile, is_base)
    return list(worlds.values())


def profile_text(base_profile: str, world: World, base: ToyWorldConfig) -> str:
    """The YAML profile of a built world: extends the base profile, sets its data folder and world keys."""
    parent = base_profile if Path(base_profile).suffix not in (".yaml", ".yml") else str(Path(base_profile).resolve())
    changed = {f.name: getattr(world.config, f.name) for f in dataclasses.fields(ToyWorldConfig)
               if getattr(world.config, f.name) != getattr(base, f.name)}  # fmt: skip
    lines = [f"# the {world.name} world of bench/snr_sweep.py", f"extends: {parent}", "paths:",
             f"  data_root: {json.dumps(str(world.data_root))}", "world:"]  # fmt: skip
    lines += [f"  {k}: {json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in sorted(changed.items())]
    return "\n".join(lines) + "\n"


def run_cmd(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log.info("running %s", " ".join(cmd))
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed")


def prepare(base_profile: str, world: World, base: ToyWorldConfig) -> None:
    """Build a non-base world (a complete one is kept) and its caption embeddings with the base weights' toy CLIP."""
    if world.is_base:
        if not (world.data_root / WORLD_FILE).is_file():
            raise SystemExit(
                f"error: no toy world in {world.data_root}; build it first: "
                f"python download_dataset.py --toy --profile {base_profile}"
            )
        return
    path, text = Path(world.profile), profile_text(base_profile, world, base)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    run_cmd([sys.executable, "download_dataset.py", "--toy", "--profile", world.profile])
    run_cmd([sys.executable, "-m", "tasks_construction.gen_GT_clip_embeds", "--profile", world.profile])


def stale_roles(weights_root: Path, world_root: Path, scale: str, seed: int) -> list[str]:
    """The toy roles under ``weights_root`` that are not exactly what ``download_dataset.py --toy-weights`` would
    build for the world in ``world_root`` (missing, another recipe or world, or files changed)."""
    from models.foundation.toy.build import ROLES, role_hashes
    from models.foundation.toy.common import is_complete, role_dir
    from models.foundation.toy.data import world_hash

    hashes = role_hashes(world_hash(world_root), scale, seed)
    return [role for role in ROLES if not is_complete(role_dir(weights_root, role), hashes[role])]


def is_prefix(base_root: Path, root: Path) -> bool:
    """The base world's training frames are the first training frames of ``root``'s."""
    import torch

    from utils.data_catalog import frames_file

    a = torch.load(base_root / frames_file("train"), map_location="cpu", weights_only=True, mmap=True)
    b = torch.load(root / frames_file("train"), map_location="cpu", weights_only=True, mmap=True)
    return bool(b.shape[0] >= a.shape[0] and b.shape[1:] == a.shape[1:] and torch.equal(b[: a.shape[0]], a))


def weights_check(world: World, base_world: World, base: WorldBuildConfig, base_profile: str) -> dict[str, Any]:
    """How ``world`` reuses the profile's toy weights. Errors (no rebuild): weights that are not current for the
    base world, or an SNR world whose training stimuli differ from the base world's. Returns both world hashes and,
    for a world with more clips, whether the base world's training clips are its first ones."""
    from models.foundation.toy.data import world_hash

    weights_root = absolute(base.paths.weights_root)
    stale = stale_roles(weights_root, base_world.data_root, base.model.size, base.world.seed)
    if stale:
        raise SystemExit(
            f"error: the toy weights {', '.join(stale)} under {weights_root} are missing or not current for "
            f"{base_world.data_root}; the sweep never rebuilds them: build them first (about 21 min on 2 cores) "
            f"with python download_dataset.py --toy-weights --profile {base_profile}"
        )
    trained_on, mine = world_hash(base_world.data_root), world_hash(world.data_root)
    info: dict[str, Any] = {"weights_root": str(weights_root), "weights_world_hash": trained_on, "world_hash": mine,
                            "same_stimuli": trained_on == mine, "decision": world.weights_reuse}  # fmt: skip
    if world.clip_factor == 1 and not info["same_stimuli"]:
        raise SystemExit(
            f"error: the {world.name} world's training stimuli (hash {mine}) differ from the base world's "
            f"({trained_on}), on which the weights were pretrained; check the world settings of {world.profile}"
        )
    if world.clip_factor != 1:
        info["base_clips_first"] = is_prefix(base_world.data_root, world.data_root)
    return info


# ---- toy_quality per world -----------------------------------------------------------------------------------------
def quality_cmd(world: World, exp: str, seeds: list[int], modes: list[str], overrides: list[str]) -> list[str]:
    cmd = [sys.executable, str(REPO / "bench" / "toy_quality.py"), "--profile", world.profile,
           "--exp", f"{exp}_{world.name}", "--modes", *modes, "--seeds", ",".join(map(str, seeds))]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def toy_quality_record(lines: list[str]) -> dict[str, Any]:
    """The JSON line toy_quality prints (its last line that parses to a dict with ``"bench": "toy_quality"``)."""
    for line in reversed(lines):
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("bench") == "toy_quality":
                return record
    raise SystemExit("error: bench/toy_quality.py printed no JSON record; see its output above")


def run_quality(cmd: list[str]) -> dict[str, Any]:
    """Run toy_quality, echo its stdout to stderr as it comes, return its record."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log.info("running %s", " ".join(cmd))
    lines = []
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            lines.append(line)
    if proc.returncode != 0:
        raise SystemExit(f"error: bench/toy_quality.py failed (exit status {proc.returncode}): {' '.join(cmd)}")
    return toy_quality_record(lines)


# ---- the table and the plot ----------------------------------------------------------------------------------------
def numbers(record: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """method → metric → {"mean", "std", "n"} from a toy_quality record (its ``methods`` aggregates)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method, rows in record.get("methods", {}).items():
        out[method] = {k: {"mean": v.get("mean"), "std": v.get("std"), "n": v.get("n_seeds", len(v.get("values", []))),
                           "ci95": v.get("ci95")} for k, v in rows.items()}  # fmt: skip
    return out


def cell(entry: dict[str, Any] | None, decimals: int) -> str:
    if entry is None:
        return "—"
    if entry.get("mean") is None:
        return "n/a"
    std = entry.get("std")
    return f"{entry['mean']:.{decimals}f}" + ("" if std is None else f" ± {std:.{decimals}f}")


def table(points: list[dict[str, Any]], seeds: list[int]) -> str:
    """One row per world and method (the methods each world has, in ``METHODS`` order)."""
    head = ["world", "SNR", "train clips", "method", *(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in points:
        nums = p["numbers"]
        for method in [m for m in METHODS if m in nums] + [m for m in nums if m not in METHODS]:
            cells = [cell(nums[method].get(k), 2 if k == "psnr" else 3) for k, _ in COLUMNS]
            row = [p["name"], f"{p['snr']:g}", str(p["n_train_clips"]), method, *cells]
            lines.append("| " + " | ".join(row) + " |")
    chance = next((p["chance"] for p in points if p.get("chance")), {})
    if chance:
        cells = ["—" if chance.get(k) is None else f"{chance[k]:.3f}" for k, _ in COLUMNS]
        lines.append("| chance | | | | " + " | ".join(cells) + " |")
    note = (
        f"\nmean ± std over seeds {', '.join(map(str, seeds))} (ddof 1); the ridge 8×8-pixel baseline and the "
        "oracle ceiling do not depend on the seed (one value). Every world is subject 1 with the same test clips; "
        "the 2x-clips world reuses the base world's toy weights (see the JSON's weights)."
    )
    return "\n".join(lines) + "\n" + note


def plot(points: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Each of ``PLOTTED`` against the SNR (log axis), one line per method, error bars = std over seeds (one seed: the
    95 % clip-bootstrap interval); worlds with more training clips as open squares at their SNR; chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    methods = list(dict.fromkeys(m for p in points for m in p["numbers"]))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    chance = next((p["chance"] for p in points if p.get("chance")), {})
    for ax, key in zip(axes.flat, PLOTTED, strict=True):
        for method in methods:
            line = sorted((p for p in points if p["clip_factor"] == 1), key=lambda p: p["snr"])
            xs, ys, es = series(line, method, key)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colours[method], label=method)
            for p in (p for p in points if p["clip_factor"] != 1):
                x, y, e = series([p], method, key)
                if x:
                    ax.errorbar([x[0] * 1.12], y, yerr=e, marker="s", mfc="none", capsize=3, color=colours[method],
                                linestyle="none")  # fmt: skip
        if chance.get(key) is not None:
            ax.axhline(chance[key], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("SNR (world.snr)")
        ax.set_title(key)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) or 1, fontsize=9)
    fig.suptitle(f"{title} (open squares: 2x training clips; dotted: chance)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def series(points: list[dict[str, Any]], method: str, key: str) -> tuple[list[float], list[float], list[list[float]]]:
    """x (SNR), y (mean) and error bars [[below...], [above...]]: ± std over seeds, or the bootstrap interval of a
    single seed's value (none where neither exists)."""
    xs, ys, below, above = [], [], [], []
    for p in points:
        e = p["numbers"].get(method, {}).get(key)
        if e and e.get("mean") is not None:
            xs.append(p["snr"])
            ys.append(e["mean"])
            lo, hi = error_bar(e)
            below.append(lo)
            above.append(hi)
    return xs, ys, [below, above]


def error_bar(entry: dict[str, Any]) -> tuple[float, float]:
    """(below, above) the mean: the std over seeds, else the 95 % interval of one seed, else nothing."""
    if entry.get("std") is not None:
        return entry["std"], entry["std"]
    ci = entry.get("ci95")
    if ci and entry.get("n", 1) == 1:
        return max(entry["mean"] - ci[0], 0.0), max(ci[1] - entry["mean"], 0.0)
    return 0.0, 0.0


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="toy", help="toy (default), smoke, or a YAML profile of a toy world")
    p.add_argument("--exp", default="sweep", help="prefix of the run names <exp>_<world>[_s<seed>]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="values of run.seed (default 0 1 2)")
    p.add_argument("--snrs", type=float, nargs="*", default=list(SNRS),
                   help="world.snr values (default %(default)s; none: only the --clip-factors worlds)")  # fmt: skip
    p.add_argument("--clip-factors", type=int, nargs="+", default=list(CLIP_FACTORS),
                   help="multiples of the training clips, at the profile's SNR (default %(default)s)")  # fmt: skip
    p.add_argument("--modes", nargs="+", default=["enhance"], choices=("enhance", "motion"), help="NEURONS modes")
    p.add_argument("--sweep-root", type=Path, default=None, help="folder of the built worlds (<data_root>_sweep)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every toy_quality run")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/snr_sweep_<profile>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the worlds and the weights decision, build nothing")
    p.add_argument("--replot", action="store_true", help="table and plot of an existing --out JSON; run nothing")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds}: give distinct seeds")
    if any(s <= 0 for s in args.snrs) or any(f < 1 for f in args.clip_factors):
        p.error("--snrs must be > 0 and --clip-factors >= 1")
    if any(o.split("=", 1)[0].strip().startswith(("world.", "paths.")) for o in args.set):
        p.error("--set: the worlds and their folders come from --profile, --snrs, --clip-factors and --sweep-root")
    if args.profile.endswith((".yaml", ".yml")):
        args.profile = str(resolve_profile(args.profile).resolve())
    return args


def replot(out: Path, title: str) -> int:
    """The table (``.md``) and plot (``.png``) of a sweep's JSON, its numbers re-read from each world's record."""
    if not out.is_file():
        print(f"error: no sweep results at {out}: run the sweep first (or give --out)", file=sys.stderr)
        return 1
    record = json.loads(out.read_text())
    points = record.get("points", [])
    for p in points:
        p["numbers"] = numbers(p.get("toy_quality", {}))
    text = table(points, record.get("seeds", []))
    if not record.get("complete"):
        text += "\n(incomplete: the sweep stopped before its last world)"
    png = plot(points, out.with_suffix(".png"), title)
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {png}")
    return 0


def kept_points(out: Path, args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    """The points of an earlier results file ``out`` that this call does not rerun, when that file was made with the
    same profile, seeds, modes and overrides (else none: its numbers would not be comparable)."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    same = all(old.get(k) == v for k, v in (("profile", args.profile), ("seeds", args.seeds), ("modes", args.modes),
                                             ("set", args.set)))  # fmt: skip
    if not same:
        log.warning("%s was made with other settings; this call's results replace it", out)
        return []
    kept = [p for p in old.get("points", []) if p["name"] not in names]
    for p in kept:  # re-read from each world's record, as --replot does (older files lack the intervals)
        p["numbers"] = numbers(p.get("toy_quality", {}))
    return kept


def merge_points(kept: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept and new points, ordered as the sweep plans them: SNR worlds by SNR, then clip-count worlds."""
    return sorted([*kept, *points], key=lambda p: (p["clip_factor"], p["snr"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stem = Path(args.profile).stem
    out = args.out or REPO / "bench" / "results" / f"snr_sweep_{stem}.json"
    title = f"toy world sweep, profile {stem}, subject 1"
    if args.replot:
        return replot(out, title)
    try:
        base = base_config(args.profile, [])
        worlds = plan_worlds(args.profile, base, args.snrs, args.clip_factors, args.sweep_root)
    except NeuronsError as err:
        print(f"error: {type(err).__name__}: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    if args.dry_run:
        for w in worlds:
            print(f"{w.name}: snr {w.snr:g}, {w.config.n_train_clips} training clips, data {w.data_root}, profile "
                  f"{w.profile}, weights {base.paths.weights_root} ({w.weights_reuse})")  # fmt: skip
        return 0
    base_world = plan_worlds(args.profile, base, [base.world.snr], [1], args.sweep_root)[0]
    prepare(args.profile, base_world, base.world)
    weights_check(base_world, base_world, base, args.profile)  # before any world is built
    t0, points = time.time(), []
    kept = kept_points(out, args, [w.name for w in worlds])
    record: dict[str, Any] = {"bench": "snr_sweep", "profile": args.profile, "exp": args.exp, "subj": 1,
                              "seeds": args.seeds, "modes": args.modes, "set": args.set,
                              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    for world in worlds:
        prepare(args.profile, world, base.world)
        weights = weights_check(world, base_world, base, args.profile)
        quality = run_quality(quality_cmd(world, args.exp, args.seeds, args.modes, args.set))
        ceiling_file = world.data_root / CEILING_FILE
        ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.is_file() else None
        points.append({"name": world.name, "snr": world.snr, "clip_factor": world.clip_factor,
                       "n_train_clips": world.config.n_train_clips, "data_root": str(world.data_root),
                       "profile": world.profile, "weights": weights, "ceiling": ceiling,
                       "numbers": numbers(quality), "chance": quality.get("chance", {}),
                       "toy_quality": quality})  # fmt: skip
        record.update({"points": merge_points(kept, points), "complete": len(points) == len(worlds),
                       "wall_s": round(time.time() - t0)})  # fmt: skip
        atomic_write_json(out, record)
    points = merge_points(kept, points)
    text = table(points, args.seeds)
    png = plot(points, out.with_suffix(".png"), title)
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    print(text)
    print(f"wrote {out}, {out.with_suffix('.md')} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
