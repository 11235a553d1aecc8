"""Stage-1 recipe sweep on a toy world: test identification of named variants of the stage-1 config over seeds
(issue 17's goal "stage-1 50-way >= 0.25").

    python bench/stage1_sweep.py --profile toy --exp s1sweep --seeds 0 1 2                 # every variant
    python bench/stage1_sweep.py --profile toy --exp s1sweep --seeds 0 --variants base no_alternate
    python bench/stage1_sweep.py --profile toy --exp s1sweep --variant wide=model.backbone_dropout=0.3 --seeds 0

Each (variant, seed) is its own run ``<exp>_<variant>_s<seed>`` of stage 1 through the driver (``train_neurons.sh``,
CPU, subject 1): a variant is a list of config overrides on top of the profile, ``run.seed`` the seed. A run whose
stage 1 is current (fresh manifest with the same config) is read, not rerun. Stage 1 scores its ``best`` checkpoint
(selected on the validation clips, never the test clips) by clip identification on the test clips
(``stage1/identification.json``: brain→image, correlation of flattened CLIP tokens, 200 seeded trials), the rule of
the ridge baseline and the oracle ceiling. Prints, per variant, mean ± std over the seeds (ddof 1) of the test 2-way,
50-way and all-way top-1 and the validation 50-way, and writes ``bench/results/stage1_sweep_<profile>.json`` after
every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_copies import paths_of, run_stages  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402

log = logging.getLogger("stage1_sweep")
SUBJ = 1

#: Named variants: config overrides of stage 1 on top of the profile ("base": none).
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "no_alternate": ["stage1.train.alternate_target_frame=false"],
    "epochs80": ["stage1.train.num_epochs=80"],
    "temp0.1": ["stage1.train.temp_image=0.1"],
    "temp0.025": ["stage1.train.temp_image=0.025"],
    "mixup0.33": ["stage1.train.mixup_pct=0.33"],
    "dropout0.3": ["model.backbone_dropout=0.3"],
    "wd1": ["stage1.train.weight_decay=1.0"],
    "lr3e-4": ["stage1.train.max_lr=3.0e-4"],
    "no_text": ["stage1.train.text_weight=0.0"],
    "repeat_mean": ["stage1.train.voxel_repeats=mean"],
}
SCORES = (("test", "2"), ("test", "50"), ("test", "all"), ("val", "50"))


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=key=value[,key=value...]`` → (name, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise SystemExit(f"error: --variant {text!r} is not NAME=KEY=VALUE[,KEY=VALUE]; "
                         "e.g. wd3=stage1.train.weight_decay=3")
    return name, rest.split(",")


def score_run(profile: str, exp: str, overrides: list[str]) -> dict[str, float]:
    """Stage 1 of run ``exp`` (run or reused through the driver) → ``{"<split>_<way>": top-1}``."""
    t0 = time.time()
    run_stages(profile, exp, SUBJ, "enhance", "1", overrides)
    ident = json.loads((paths_of(profile, exp, SUBJ, "enhance", overrides).stage_dir("1") / "identification.json")
                       .read_text())  # fmt: skip
    out = {f"{split}_{way}": float(ident[split]["top1"][f"{way}-way"]) for split, way in SCORES if split in ident}
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def summary(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return f"{finite[0]:.3f}" if finite else "—"
    return f"{statistics.mean(finite):.3f} ± {statistics.stdev(finite):.3f}"


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    head = ["variant", "seeds", *(f"{split} {way}-way" for split, way in SCORES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per_seed in results.items():
        cells = [summary([r.get(f"{split}_{way}", float("nan")) for r in per_seed.values()]) for split, way in SCORES]
        lines.append("| " + " | ".join([name, ",".join(per_seed), *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="toy")
    p.add_argument("--exp", default="s1sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=None, help=f"names among {sorted(VARIANTS)} (default: all)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="an extra variant (repeatable)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/stage1_sweep_<profile>.json)")  # fmt: skip
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = args.variants or ([] if args.variant else list(VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; use names among {sorted(VARIANTS)} or --variant")
    chosen = {n: VARIANTS[n] for n in names}
    chosen.update(parse_variant(v) for v in args.variant)
    out = args.out or REPO / "bench" / "results" / f"stage1_sweep_{args.profile}.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    results: dict[str, dict[str, dict[str, float]]] = previous.get("results", {})
    recipes: dict[str, list[str]] = previous.get("variants", {})
    for name, overrides in chosen.items():
        if recipes.get(name, overrides) != overrides:
            raise SystemExit(f"error: variant {name!r} in {out} had overrides {recipes[name]}; "
                             "give this one another name, or move that file")
        recipes[name] = overrides
        for seed in args.seeds:
            res = score_run(args.profile, f"{args.exp}_{name}_s{seed}", [*overrides, f"run.seed={seed}"])
            results.setdefault(name, {})[str(seed)] = res
            log.info("%s seed %d: %s", name, seed, res)
            atomic_write_json(out, {"profile": args.profile, "subject": SUBJ, "variants": recipes, "results": results,
                                    "scores": "stage1/identification.json top-1 of the best (validation-selected) "
                                              "checkpoint; mean ± std over seeds, ddof 1"})  # fmt: skip
    print(table({n: results[n] for n in recipes if n in results}))


if __name__ == "__main__":
    main()
