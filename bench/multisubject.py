"""One brain model for several subjects, and a new subject from little data, on a toy world (issue 18): stage-1 test
identification of each row, per subject.

    python bench/multisubject.py --profile toy --exp ms                 # every row (about 25 min on 2 cores)
    python bench/multisubject.py --profile toy --exp ms --dry-run       # the plan
    python bench/multisubject.py --profile smoke --exp t --seeds 0      # a quick check of the plumbing
    python bench/multisubject.py --profile toy --exp ms --seeds 1 2 --rows adapt scratch --pair-seed 0 --videos

Rows (stage 1 only, the profile's recipe; ``--seeds`` are values of ``run.seed``):

* ``single``: one model per subject on all its training clips (subjects 1, 2, 3; every seed);
* ``shared``: one model for subjects 1-3 (every seed); every global batch holds ``batch_size`` clips of each subject,
  so each subject's share of a step is its single-subject batch;
* ``adapt``: subject 3 from a model of subjects 1 and 2 (``pair``, the first seed), on ``--fraction`` of its training
  clips (whole leading segments): ``--ridge-epochs`` epochs of the new ridge alone, then everything (every seed);
* ``scratch``: subject 3 from scratch on the same clips, same epochs (every seed).

``--rows`` runs some rows only (an adapt row brings the pair it starts from; ``--pair-seed`` picks the pair's seed);
the results files keep the records of the rows and seeds that a call does not run. ``--few-epochs E`` gives the
adapt and scratch rows E epochs (results in ``multisubject_<profile>_e<E>.json``): on 1/8 of the clips, 8x the
profile's epochs is the full-data run's number of optimiser steps.

The score is stage 1's test identification (``identification.json``: brain→image by correlation of the predicted and
the true CLIP tokens of each test clip, 2-way and 50-way top-1, 200 draws). ``--videos`` then runs stages 2-6 of
every row through the driver (stage 2's batch a multiple of the set's size as stage 1's, the adapt rows' stage 2 from
the pair's, which gets its stage 2 first) and reports their stage-6 metrics per subject
(``multisubject_<profile>_videos.json``, each single-seed value with its 95 % clip-bootstrap interval; hours on 2
cores per seed: ``--seeds 0`` for one). Writes
``bench/results/multisubject_<profile>.json`` after every run and prints a markdown table (mean ± std over seeds,
ddof 1, where a row has several).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_copies import run_stages  # noqa: E402
from utils.config import load_config, run_dir  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402
from utils.stage_configs import Stage1Config  # noqa: E402

log = logging.getLogger("bench.multisubject")
WAYS = ("2-way", "50-way")
ROWS = ("single", "shared", "adapt", "scratch")


@dataclass(frozen=True)
class Run:
    """One stage-1 run of the bench: its row, seed, run name and config overrides."""

    row: str
    seed: int
    exp: str
    overrides: tuple[str, ...]


def plan(exp: str, seeds: list[int], fraction: float, ridge_epochs: int, batch: int, few_epochs: int = 0,
         rows: tuple[str, ...] = ROWS, pair_seed: int | None = None) -> list[Run]:  # fmt: skip
    """Every run of ``rows`` in order (the pair, when an adapt row needs it, before the adaptations that start from
    it). ``few_epochs``: the epochs of the adapt and scratch rows (0: the profile's); ``pair_seed``: the pair's seed
    (None: the first seed)."""
    runs = _plan(exp, seeds, fraction, ridge_epochs, batch, few_epochs, seeds[0] if pair_seed is None else pair_seed)
    keep = set(rows) | ({"pair"} if "adapt" in rows else set())
    return [r for r in runs if r.row in keep]


def _plan(exp: str, seeds: list[int], fraction: float, ridge_epochs: int, batch: int, few_epochs: int, first: int
          ) -> list[Run]:  # fmt: skip
    runs: list[Run] = []
    for seed in seeds:
        single = f"{exp}_single_s{seed}"  # one exp, a run folder per subject
        runs += [Run("single", seed, single, (f"run.subj={k}", f"run.seed={seed}")) for k in (1, 2, 3)]
        runs.append(Run("shared", seed, f"{exp}_shared_s{seed}", ("run.subj=[1,2,3]", f"run.seed={seed}",
                                                                   f"train.batch_size={3 * batch}")))  # fmt: skip
    runs.append(Run("pair", first, f"{exp}_pair", ("run.subj=[1,2]", f"run.seed={first}",
                                                    f"train.batch_size={2 * batch}")))  # fmt: skip
    few = (f"data.train_fraction={fraction}", *((f"train.num_epochs={few_epochs}",) if few_epochs else ()))
    tag = f"_e{few_epochs}" if few_epochs else ""
    for seed in seeds:
        adapt = ("run.subj=3", f"run.seed={seed}", *few, f"train.adapt_ridge_epochs={ridge_epochs}")
        runs.append(Run("adapt", seed, f"{exp}_adapt{tag}_s{seed}", adapt))
        runs.append(Run("scratch", seed, f"{exp}_scratch{tag}_s{seed}", ("run.subj=3", f"run.seed={seed}", *few)))
    return runs


def config(profile: str, run: Run, pair_dir: Path | None) -> Stage1Config:
    extra = (f"train.init_from={pair_dir}",) if run.row == "adapt" and pair_dir is not None else ()
    return load_config(Stage1Config, profile, [*run.overrides, *extra], {"exp": run.exp})


def scores(stage_dir: Path, subjects: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Subject → {N-way: test top-1} from a stage-1 ``identification.json`` (one subject or a set)."""
    ident = json.loads((stage_dir / "identification.json").read_text())
    per = ident.get("subjects", {str(subjects[0]): ident})
    return {str(k): {w: float(v["test"]["top1"][w]) for w in WAYS} for k, v in per.items()}


def train_one(cfg: Stage1Config) -> Path:
    """Stage 1 of ``cfg`` (or its finished outputs, read as they are)."""
    from pipeline.stage1 import train

    out = run_dir(cfg) / "stage1"
    if (out / "identification.json").is_file() and (out / "manifest.json").is_file():
        log.info("kept %s (already trained)", out)
        return out
    return train(cfg)


def summarise(records: list[dict]) -> dict[str, dict[str, dict[str, float | int]]]:
    """``"<row> subj <k>"`` → N-way → {mean, std (ddof 1, 0 for one seed), n}."""
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for rec in records:
        for subj, sc in rec["scores"].items():
            key = f"{rec['row']} subj {subj}"
            for w in WAYS:
                out.setdefault(key, {}).setdefault(w, {"values": []})["values"].append(sc[w])  # type: ignore[union-attr]
    for cells in out.values():
        for cell in cells.values():
            v = np.asarray(cell["values"], dtype=float)
            cell.update(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=len(v))
    return out


def table(summary: dict, chance: dict[str, float]) -> str:
    lines = ["| row | " + " | ".join(f"test {w} top-1" for w in WAYS) + " | seeds |", "|---|---|---|---|"]
    for key, cells in summary.items():
        n = cells[WAYS[0]]["n"]
        vals = [f"{c['mean']:.3f} ± {c['std']:.3f}" if n > 1 else f"{c['mean']:.3f}" for c in cells.values()]
        lines.append(f"| {key} | " + " | ".join(vals) + f" | {n} |")
    lines.append("| chance | " + " | ".join(f"{chance[w]:.3f}" for w in WAYS) + " | |")
    return "\n".join(lines)


VIDEO_METRICS = ("video_2way", "video_50way", "frame_2way", "frame_50way", "clip_pcc", "ssim", "blurry_video_ssim",
                 "concept_f1_micro")  # fmt: skip
SET_SIZE = {"single": 1, "shared": 3, "pair": 2, "adapt": 1, "scratch": 1}


def video_overrides(r: Run, batch2: int, pair_dir: Path | None) -> list[str]:
    """The driver overrides of stages 2-6 of row ``r``: its seed and data share, stage 2's batch (the set's size ×
    the profile's) and, for an adapt row, stage 2 from the pair's."""
    keep = [o for o in r.overrides if o.startswith(("run.seed=", "data."))]
    extra = [f"stage2.train.init_from={pair_dir}"] if r.row == "adapt" and pair_dir is not None else []
    return [*keep, f"stage2.train.batch_size={SET_SIZE[r.row] * batch2}", *extra]


def video_metrics(run: Path, subjects: tuple[int, ...], mode: str) -> dict[str, dict[str, dict]]:
    """Subject → metric → {mean, ci95} from each subject's ``metrics_<mode>.json``."""
    out = {}
    for k in subjects:
        folder = run / f"subj_{k}" if len(subjects) > 1 else run
        m = json.loads((folder / f"metrics_{mode}.json").read_text())["metrics"]
        out[str(k)] = {name: {"mean": m[name]["mean"], "ci95": m[name].get("ci95")} for name in VIDEO_METRICS}
    return out


def run_videos(args: argparse.Namespace, runs: list[Run], batch2: int) -> list[dict]:
    """Stages 2-6 of every row (the pair: stage 2 only), read where they already finished."""
    records, pair_dir = [], None
    for r in runs:
        cfg = config(args.profile, r, pair_dir)
        folder, subjects = run_dir(cfg), cfg.run.subjects
        pair_dir = folder if r.row == "pair" else pair_dir
        stages = "2" if r.row == "pair" else "23456"
        done = all((folder / (f"subj_{k}" if len(subjects) > 1 else "") / "metrics_enhance.json").is_file()
                   for k in subjects) and r.row != "pair"  # fmt: skip
        if not done and not (r.row == "pair" and (folder / "stage2" / "manifest.json").is_file()):
            run_stages(args.profile, r.exp, ",".join(map(str, subjects)), "enhance", stages,  # type: ignore[arg-type]
                       [*video_overrides(r, batch2, pair_dir), *args.set])  # fmt: skip
        if r.row != "pair":
            records.append({"row": r.row, "seed": r.seed, "exp": r.exp, "set": list(args.set),
                            "metrics": video_metrics(folder, subjects, "enhance")})  # fmt: skip
        save_video_records(REPO / "bench" / "results" / f"multisubject_{args.profile}_videos.json", args, records)
    return records


def merged_records(out: Path, records: list[dict]) -> list[dict]:
    """``records`` and the records of ``out`` (when it exists) of other (row, seed) pairs, sorted by row then seed:
    rows and seeds can run one call at a time without losing the earlier ones."""
    old = json.loads(out.read_text())["records"] if out.is_file() else []
    order = {row: i for i, row in enumerate(("pair", *ROWS))}
    return sorted(merge(old, records), key=lambda r: (order.get(r["row"], len(order)), r["seed"]))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``new`` and the records of ``old`` of other (row, seed) pairs, in ``old``'s order then ``new``'s."""
    keys = {(r["row"], r["seed"]) for r in new}
    return [r for r in old if (r["row"], r["seed"]) not in keys] + new


def save_video_records(out: Path, args: argparse.Namespace, records: list[dict]) -> None:
    merged = merged_records(out, records)
    atomic_write_json(out, {"profile": args.profile, "seeds": sorted({r["seed"] for r in merged}), "records": merged})


def video_table(records: list[dict]) -> str:
    """One line per row and subject: each metric's mean over seeds (± std, ddof 1), or its one seed's value
    [95 % clip-bootstrap interval]."""
    cols = ("video_2way", "video_50way", "frame_50way", "ssim", "blurry_video_ssim", "concept_f1_micro")
    lines = ["| row | subject | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    keys = dict.fromkeys((r["row"], k) for r in records for k in r["metrics"])
    for row, k in keys:
        mine = [r["metrics"][k] for r in records if r["row"] == row and k in r["metrics"]]
        cells = []
        for c in cols:
            v = np.asarray([m[c]["mean"] for m in mine])
            ci = mine[0][c]["ci95"]
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else
                         f"{v[0]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v[0]:.3f}")  # fmt: skip
        lines.append(f"| {row} | {k} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="toy")
    p.add_argument("--exp", default="ms")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fraction", type=float, default=0.125, help="subject 3's share of its clips (adapt, scratch)")
    p.add_argument("--ridge-epochs", type=int, default=10, help="adapt: epochs of the new ridge alone")
    p.add_argument("--few-epochs", type=int, default=0, help="epochs of the adapt and scratch rows (0: the profile's)")
    p.add_argument("--videos", action="store_true", help="then stages 2-6 of every row and their stage-6 metrics")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="rows to run (default all; adapt brings its pair)")  # fmt: skip
    p.add_argument("--pair-seed", type=int, default=None, help="seed of the subjects-1-2 model (default: the first)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="driver overrides of stages 2-6 with --videos (e.g. stage5.video.strength=0.6, the value the "
                        "earlier seeds ran at); recorded with each row")  # fmt: skip
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    batch = load_config(Stage1Config, args.profile).train.batch_size
    runs = plan(args.exp, args.seeds, args.fraction, args.ridge_epochs, batch, args.few_epochs, tuple(args.rows),
                args.pair_seed)  # fmt: skip
    if args.dry_run:
        for r in runs:
            print(r.row, r.seed, r.exp, " ".join(r.overrides))
        return 0
    tag = f"_e{args.few_epochs}" if args.few_epochs else ""
    out_file = REPO / "bench" / "results" / f"multisubject_{args.profile}{tag}.json"
    records: list[dict] = []
    previous = merged_records(out_file, []) if not args.videos else []  # kept where this call does not rerun them
    pair_dir: Path | None = None
    for r in runs:
        start = time.time()
        cfg = config(args.profile, r, pair_dir)
        stage_dir = train_one(cfg)
        pair_dir = stage_dir.parent if r.row == "pair" else pair_dir
        records.append({"row": r.row, "seed": r.seed, "exp": r.exp, "overrides": list(r.overrides),
                        "scores": scores(stage_dir, cfg.run.subjects),
                        "seconds": round(time.time() - start, 1)})  # fmt: skip
        if not args.videos:  # --videos reads stage 1 (trained where missing); its results file stays as it is
            atomic_write_json(out_file, {"profile": args.profile, "complete": False,
                                         "records": merge(previous, records),
                                         "fraction": args.fraction, "ridge_epochs": args.ridge_epochs,
                                         "few_epochs": args.few_epochs})  # fmt: skip
    records = merge(previous, records)
    summary = summarise([r for r in records if r["row"] != "pair"] + [r for r in records if r["row"] == "pair"])
    chance = {w: 1.0 / int(w.split("-")[0]) for w in WAYS}
    if not args.videos:
        atomic_write_json(out_file, {"profile": args.profile, "complete": True, "records": records,
                                     "summary": summary, "fraction": args.fraction, "ridge_epochs": args.ridge_epochs,
                                     "few_epochs": args.few_epochs})  # fmt: skip
    print(table(summary, chance))
    print(f"\n{out_file}")
    if args.videos:
        from utils.stage_configs import Stage2Config

        run_videos(args, runs, load_config(Stage2Config, args.profile).train.batch_size)
        out = REPO / "bench" / "results" / f"multisubject_{args.profile}_videos.json"
        print(video_table(json.loads(out.read_text())["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
