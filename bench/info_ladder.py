"""The information ladder: where the brain signal is lost between stage 2 and the videos (issue 17).

    python bench/info_ladder.py --profile toy --exp demo                 # after `make demo`; ~2 min per rung
    python bench/info_ladder.py --profile smoke --exp t --rungs model gt_tokens   # seconds, a dry run

Every rung reruns stages 3-6 on a copy of one finished run's stages 1-2 (``<exp>`` → ``<exp>_ladder_<rung><seed>``)
with ONE input of the video path replaced (stage-3 diagnostics options, recorded in its manifest), and prints every
stage-6 metric per rung:

* tokens that the heads and the keyframe read (``stage3.sample.tokens``): ``gt_tokens`` the CLIP tokens of the
  stimulus' target frame (an oracle), ``brain_tokens`` the brain model's own tokens (the prior's condition, no
  prior), ``prior_x0`` the prior's x0 prediction from pure noise (one sampler step), ``prior_sample`` the prior's
  full brain-only sample;
* ``model``: the decoding as the model does it (``upstream.head_input``: the heads read the brain tokens, or, in
  upstream's scheme, the prior's sample; the keyframe reads the prior's sample);
* ``gt_blurry``: the blurry videos replaced by the VAE's reconstruction of the stimulus (``oracle_blurry``);
* ``gt_captions`` / ``gpt2_captions``: stage 5 captioned by the stimulus' own captions / by stage 3's GPT-2
  captions of the brain (``model`` uses stage 4's BLIP-2 captions of the keyframes).

A rung above ``model`` says how much the replaced input limits the videos; a token rung below ``brain_tokens`` says
that its tokens carry less of the clip than the brain model itself. Each rung's spread is stage 6's (over clips or
trials; ``--seeds`` for the spread over ``run.seed``). Writes ``bench/results/info_ladder_<profile>.json``.
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

log = logging.getLogger("info_ladder")
RUNGS: dict[str, list[str]] = {
    "gt_tokens": ["stage3.sample.tokens=ground_truth"],
    "brain_tokens": ["stage3.sample.tokens=brain"],
    "prior_x0": ["stage3.sample.tokens=prior", "stage3.sample.prior_steps=1"],
    "prior_sample": ["stage3.sample.tokens=prior"],
    "model": [],
    "gt_blurry": ["stage3.sample.oracle_blurry=true"],
    "gt_captions": ["stage3.sample.oracle_captions=true", "stage5.video.caption_source=gpt2"],
    "gpt2_captions": ["stage5.video.caption_source=gpt2"],
}
COPIED = ("1", "2")
METRICS = ("video_2way", "video_50way", "frame_2way", "frame_50way", "clip_pcc", "ssim", "psnr", "blurry_video_ssim",
           "concept_f1_micro", "key_object_dice", "caption_bleu4")  # fmt: skip


def one_rung(args: argparse.Namespace, rung: str, seed: int) -> dict[str, Any]:
    base = (args.profile, args.exp, args.subj, args.mode)
    overrides = [*args.set, *RUNGS[rung], f"run.seed={seed}"]
    run = run_copy(base, f"{args.exp}_ladder_{rung}{seed}", COPIED, "3456", args.set, overrides)
    return {**run, "seed": seed, "overrides": RUNGS[rung]}


def cell(runs: list[dict[str, Any]], protocol: str, metric: str) -> str:
    """``mean ± spread``: over seeds when several ran, else stage 6's own (95 % interval when it gives one)."""
    rows = [r["protocols"][protocol]["metrics"].get(metric) for r in runs]
    if any(m is None or m.get("mean") is None for m in rows):
        return ""
    means = np.array([m["mean"] for m in rows], dtype=float)
    if len(rows) > 1:
        return f"{means.mean():.3f} ± {means.std(ddof=1):.3f}"
    m = rows[0]
    if m.get("ci95"):
        lo, hi = m["ci95"]
        return f"{m['mean']:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{m['mean']:.3f}" + (f" ± {m['std']:.3f}" if m.get("std") is not None else "")


def table(results: dict[str, list[dict[str, Any]]], protocol: str) -> str:
    first = next(iter(results.values()))[0]["protocols"][protocol]["metrics"]
    metrics = [m for m in METRICS if m in first]
    lines = ["| rung | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for rung, runs in results.items():
        lines.append(f"| {rung} | " + " | ".join(cell(runs, protocol, m) for m in metrics) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="toy")
    p.add_argument("--exp", default="demo", help="the finished run whose stages 1-2 every rung shares")
    p.add_argument("--subj", type=int, default=1)
    p.add_argument("--mode", default="enhance", choices=("enhance", "motion"))
    p.add_argument("--rungs", nargs="+", default=list(RUNGS), choices=list(RUNGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed values of every rung")
    p.add_argument("--protocol", default="standard", choices=("standard", "neurons"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every rung")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/info_ladder_<profile>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = {rung: [one_rung(args, rung, s) for s in args.seeds] for rung in args.rungs}
    out = args.out or REPO / "bench" / "results" / f"info_ladder_{Path(args.profile).stem}.json"
    record = {"profile": args.profile, "exp": args.exp, "subj": args.subj, "mode": args.mode, "set": args.set,
              "date": time.strftime("%Y-%m-%d"), "rungs": results}  # fmt: skip
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(table(results, args.protocol))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
