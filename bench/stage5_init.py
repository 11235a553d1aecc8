"""Stage 5's video metrics with upstream's init and seeds against ours, from the same stages 1-3 (issue 15, defect 26).

    python bench/stage5_init.py --profile toy --exp demo               # after `make demo`
    python bench/stage5_init.py --profile smoke --exp t --seeds 0 1    # seconds, for a dry run

Two settings of ``stage5.video`` are run on copies of one finished run's stages 1-3 (``<exp>`` → ``<exp>_s5_<name>``):

* ``ours``: ``init=img2img`` (a real img2img from ``strength`` of the DDIM grid) and ``seed=per_clip``, once per
  ``--seeds`` value of ``run.seed``; the spread is the standard deviation over those seeds.
* ``upstream``: ``init=noisy_start`` (the blurry video's latents noised at the grid's largest timestep, all steps
  run: upstream's ``low_strength=0.3``) and ``seed=zero`` (every clip seeded 0). Its seed is fixed, so it runs once;
  its spread is the standard deviation over clips (or the bootstrap std that stage 6 gives for corpus metrics).

Stage 4 (BLIP-2 captions of the copied keyframes, deterministic) and stages 5 and 6 run through the driver,
so each copy's manifests record the setting. Prints a markdown table (both stage-6 protocols) and writes
``bench/results/stage5_init_<profile>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_copies import run_copy  # noqa: E402
from utils.io import atomic_write_text  # noqa: E402

log = logging.getLogger("stage5_init")
SETTINGS = {
    "ours": ["stage5.video.init=img2img", "stage5.video.seed=per_clip"],
    "upstream": ["stage5.video.init=noisy_start", "stage5.video.seed=zero"],
}
COPIED = ("1", "2", "3")  # the stages shared by every setting (stage 4, deterministic, reruns on the copy)
METRICS = ("video_2way", "video_50way", "frame_2way", "frame_50way", "clip_pcc", "ssim", "psnr")


def one_run(args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    base = (args.profile, args.exp, args.subj, args.mode)
    overrides = [*args.set, *SETTINGS[name], f"run.seed={seed}"]
    return {**run_copy(base, f"{args.exp}_s5_{name}{seed}", COPIED, "456", args.set, overrides), "seed": seed}


def summarise(runs: list[dict[str, Any]], protocol: str, metric: str) -> dict[str, Any] | None:
    """Mean and spread of one metric over a setting's runs: over seeds when there are several, else the run's own
    std (over clips, or stage 6's bootstrap std)."""
    rows = [r["protocols"][protocol]["metrics"].get(metric) for r in runs]
    if any(m is None or m.get("mean") is None for m in rows):
        return None
    means = np.array([m["mean"] for m in rows], dtype=float)
    if len(rows) > 1:
        return {"mean": float(means.mean()), "spread": float(means.std(ddof=1)), "over": f"{len(rows)} seeds"}
    return {"mean": float(means[0]), "spread": rows[0].get("std"), "over": "clips"}


def chance_of(chance: dict[str, Any], metric: str) -> str:
    """Stage 6's chance level of an N-way metric (``video_2way`` → ``chance["video"]["2-way"]``), else ''."""
    kind, _, ways = metric.partition("_")
    level = chance.get(kind, {}).get(ways.replace("way", "-way")) if ways.endswith("way") else None
    return "" if level is None else f"{level:.3f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| protocol | metric | chance | ours (img2img, per-clip seeds) | upstream (noisy start, seed 0) |",
             "|---|---|---|---|---|"]  # fmt: skip
    first = results["ours"][0]["protocols"]
    for protocol in sorted(first):
        chance = first[protocol].get("chance_levels", {})
        for metric in METRICS:
            cells = [summarise(results[name], protocol, metric) for name in SETTINGS]
            if any(c is None for c in cells):
                continue
            text = [f"{c['mean']:.3f} ± {c['spread']:.3f} ({c['over']})" if c["spread"] is not None
                    else f"{c['mean']:.3f}" for c in cells]  # fmt: skip
            lines.append(f"| {protocol} | {metric} | {chance_of(chance, metric)} | {text[0]} | {text[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="toy")
    p.add_argument("--exp", default="demo", help="the finished run whose stages 1-3 are shared")
    p.add_argument("--subj", type=int, default=1)
    p.add_argument("--mode", default="enhance", choices=("enhance", "motion"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run.seed values of the 'ours' setting")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = {"ours": [one_run(args, "ours", s) for s in args.seeds], "upstream": [one_run(args, "upstream", 0)]}
    out = REPO / "bench" / "results" / f"stage5_init_{Path(args.profile).stem}.json"
    record = {"profile": args.profile, "exp": args.exp, "subj": args.subj, "mode": args.mode, "runs": results,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
