"""The paper's ablations on a toy world: full NEURONS, NEURONS without each decoupled task, and a NeuroClips-like run
(issue 17, item 4). Subject 1, every ablation over ``--seeds`` (values of ``run.seed``).

    python bench/ablations.py --profile toy --exp bench                  # 6 ablations x 3 seeds (hours on 2 cores)
    python bench/ablations.py --profile toy --exp bench --dry-run        # the plan: runs, overrides, stage-1 copies
    python bench/ablations.py --profile smoke --exp t --seeds 0 --ablations full no_blurry   # minutes, a dry run

How each task reaches the videos (upstream spec §3.5, §4-§6; this implementation's ``upstream.head_input=brain``:
the heads read ``M = motion_proj(c)`` of the frozen backbone's tokens ``c``, so every head's loss trains the shared
``motion_proj`` that the blurry-video head reads too; the prior, which makes the keyframe tokens, is trained by its
own loss only):

* key-object segmentation (``loss_weights.dice``): the mask head; in ``enhance`` mode its mask, made soft
  ({``mask_soft_low``, 1}), multiplies the blurry-video latents and the unCLIP tokens (AVR, stage 3);
* concept recognition (``loss_weights.concepts``): the classifier whose top class names the query of the mask head
  (stage 3, enhance);
* scene description (``loss_weights.caption``): the GPT-2 caption head (stage 3's captions). Stage 5 prompts with
  stage 4's BLIP-2 captions of the keyframes (``video.caption_source=auto``), as NeuroClips does, so the caption
  task reaches the videos only through ``motion_proj``;
* blurry video (``loss_weights.latent``): the latent head whose decoded video is stage 5's img2img init.

The ablations (each a list of config overrides; everything else is the profile's full NEURONS in ``--mode``, enhance
by default; a zero loss weight stays zero under the progressive multipliers, and the other tasks keep their windows):

* ``full``: nothing changed (all four tasks, progressive weights, the enhance mask).
* ``no_segmentation``: ``stage2.loss_weights.dice=0``, ``stage3.sample.mask_soft_low=1.0``. Without the task the mask
  head is untrained, so no mask is applied (a soft mask of ones: exactly the enhance path without AVR; ``run.mode=
  motion`` would also change the GPT-2 caption length, hence not used).
* ``no_concepts``: ``stage2.loss_weights.concepts=0``. The untrained classifier's top class still names the mask
  query, as the method would without the task.
* ``no_captions``: ``stage2.loss_weights.caption=0``, ``stage2.train.selection=[fwd_top1,bwd_top1]`` (the untrained
  caption head's token accuracy leaves the checkpoint selection). The caption-embedding contrast (``text_nce``, not
  one of the four progressive tasks) stays, and so do stage 5's BLIP-2 captions of the keyframes.
* ``no_blurry``: ``stage2.loss_weights.latent=0``, ``stage5.video.init=noise`` (stage 5 starts from pure noise: no
  init video, all DDIM steps; the option this bench adds, ``utils/stage_configs.py`` ``Stage5Video.init``).
* ``neuroclips``: stage 1 + the prior (keyframe) + the blurry video, no decoupled task: ``stage2.loss_weights.dice=0``,
  ``concepts=0``, ``caption=0``, ``stage2.progressive.enabled=false``, ``stage2.train.selection=[fwd_top1,bwd_top1]``,
  ``stage3.sample.mask_soft_low=1.0``. The video-frame and caption-embedding contrasts of the brain model stay (the
  paper's "brain model + L_rec" row); captions are BLIP-2's of the keyframes, as NeuroClips'.

Not run by default (``--ablations all`` or by name), the rows of the paper's cumulative table (no progressive
learning, no AVR unless stated): ``seg_only`` (segmentation + blurry video), ``seg_concepts`` (+ concepts),
``no_pl_no_avr`` (all four tasks), ``no_avr`` (all four tasks with progressive learning).

The paper's numbers (``PAPER``; the shared spec's dataset-and-metrics.md): §3.3 "NEURONS ablations (subject 1)"
[secondary source] adds the tasks cumulatively and reports video 2-way, video 50-way and CLIP-pcc only; it has no
leave-one-out row, so ``no_segmentation``, ``no_concepts`` and ``no_captions`` have no published counterpart.
``no_blurry`` is shown beside NeuroClips' own "w/o blurry clip" (§3.1, NeuroClips Table 2, subject 1,
paper-primary), an ablation of NeuroClips' model, not of NEURONS.

Runs share nothing but the world and the weights: ablation ``<name>`` of seed ``<s>`` is its own run
``<exp>_abl_<name>_s<s>`` of stages 1-6 through the driver (``train_neurons.sh``, CPU). Stage 1 does not depend on
any ablation key, so within a seed it is trained once (by the first run) and copied into the others
(``bench.run_copies.copy_stages``: hard links, same bytes and mtimes), which then run stages 2-6. A run whose stages
are already current (fresh manifests written with the same config) is read, not rerun. Every stage-6 metric (the
``--protocol`` of ``metrics_<mode>.json``) is reported as mean ± std over the seeds (ddof 1). Writes
``bench/results/ablations_<profile>.json`` (after every run, ``"complete": false`` until the last) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_copies import copy_stages, paths_of, run_stages  # noqa: E402
from utils.config import load_config, to_dict  # noqa: E402
from utils.errors import NeuronsError  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402
from utils.manifest import read_manifest, stale_reasons  # noqa: E402
from utils.runs import RunPaths  # noqa: E402
from utils.stage_configs import STAGE_CONFIGS, SharedConfig  # noqa: E402
from utils.stages import STAGE_BY_KEY  # noqa: E402

log = logging.getLogger("ablations")

SUBJ = 1
PIPELINE = "123456"
NO_CAPTION_SELECTION = "stage2.train.selection=[fwd_top1,bwd_top1]"
NO_MASK = "stage3.sample.mask_soft_low=1.0"  # a soft mask of ones: the enhance path without AVR
ONLY_LATENT = ("stage2.loss_weights.dice=0", "stage2.loss_weights.concepts=0", "stage2.loss_weights.caption=0")


@dataclass(frozen=True)
class Ablation:
    """One ablation: what it removes (``summary``), its config ``overrides`` and its row of ``PAPER`` (or None)."""

    name: str
    summary: str
    overrides: tuple[str, ...]
    paper: str | None = None


ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation("full", "full NEURONS (4 tasks, progressive, AVR)", (), "neurons_full"),
    Ablation("no_segmentation", "without key-object segmentation (and so without AVR)",
             ("stage2.loss_weights.dice=0", NO_MASK)),
    Ablation("no_concepts", "without concept recognition", ("stage2.loss_weights.concepts=0",)),
    Ablation("no_captions", "without scene description (GPT-2 captions)",
             ("stage2.loss_weights.caption=0", NO_CAPTION_SELECTION)),
    Ablation("no_blurry", "without the blurry video (stage 5 from noise)",
             ("stage2.loss_weights.latent=0", "stage5.video.init=noise"), "neuroclips_no_blurry"),
    Ablation("neuroclips", "NeuroClips-like: brain model + blurry video + keyframe",
             (*ONLY_LATENT, "stage2.progressive.enabled=false", NO_CAPTION_SELECTION, NO_MASK), "neurons_rec"),
    # the paper's cumulative rows (not run by default)
    Ablation("seg_only", "segmentation + blurry video, no PL, no AVR",
             ("stage2.loss_weights.concepts=0", "stage2.loss_weights.caption=0", "stage2.progressive.enabled=false",
              NO_CAPTION_SELECTION, NO_MASK), "neurons_seg"),
    Ablation("seg_concepts", "segmentation + concepts + blurry video, no PL, no AVR",
             ("stage2.loss_weights.caption=0", "stage2.progressive.enabled=false", NO_CAPTION_SELECTION, NO_MASK),
             "neurons_seg_cls"),
    Ablation("no_pl_no_avr", "all four tasks, no PL, no AVR", ("stage2.progressive.enabled=false", NO_MASK),
             "neurons_no_pl"),
    Ablation("no_avr", "all four tasks with PL, no AVR", (NO_MASK,), "neurons_no_avr"),
)}  # fmt: skip
DEFAULT_ABLATIONS = ("full", "no_segmentation", "no_concepts", "no_captions", "no_blurry", "neuroclips")

SPEC = "spec dataset-and-metrics.md"
NEURONS_SRC = f"{SPEC} §3.3 NEURONS ablations, subject 1 [secondary]"
NEUROCLIPS_SRC = f"{SPEC} §3.1 NeuroClips Table 2, subject 1 [paper-primary]"
PAPER: dict[str, dict[str, Any]] = {  # the published rows: label, source, metric -> value
    "neurons_rec": {"label": "brain model + L_rec", "source": NEURONS_SRC,
                    "metrics": {"video_2way": 0.814, "video_50way": 0.164, "clip_pcc": 0.894}},
    "neurons_seg": {"label": "+ L_seg", "source": NEURONS_SRC,
                    "metrics": {"video_2way": 0.834, "video_50way": 0.225, "clip_pcc": 0.926}},
    "neurons_seg_cls": {"label": "+ L_seg + L_cls", "source": NEURONS_SRC,
                        "metrics": {"video_2way": 0.836, "video_50way": 0.234, "clip_pcc": 0.911}},
    "neurons_no_pl": {"label": "+ L_seg + L_cls + L_txt", "source": NEURONS_SRC,
                      "metrics": {"video_2way": 0.847, "video_50way": 0.213, "clip_pcc": 0.923}},
    "neurons_no_avr": {"label": "all tasks + PL", "source": NEURONS_SRC,
                       "metrics": {"video_2way": 0.856, "video_50way": 0.235, "clip_pcc": 0.937}},
    "neurons_full": {"label": "all tasks + PL + AVR (full)", "source": NEURONS_SRC,
                     "metrics": {"video_2way": 0.862, "video_50way": 0.254, "clip_pcc": 0.932}},
    "neuroclips_no_blurry": {"label": "NeuroClips w/o blurry clip (its full: 0.830 / 0.208 / 0.736)",
                             "source": NEUROCLIPS_SRC,
                             "metrics": {"video_2way": 0.838, "video_50way": 0.213, "clip_pcc": 0.718,
                                         "frame_2way": 0.805, "frame_50way": 0.193, "ssim": 0.256,
                                         "psnr": 8.989}},
}  # fmt: skip
NO_PAPER_ROW = "none (the paper adds tasks cumulatively: no leave-one-out row)"
METRICS = (
    ("video_2way", "video 2-way"), ("video_50way", "video 50-way"), ("clip_pcc", "CLIP-pcc"),
    ("frame_2way", "frame 2-way"), ("frame_50way", "frame 50-way"), ("ssim", "SSIM"), ("psnr", "PSNR (dB)"),
    ("blurry_video_ssim", "blurry-video SSIM"), ("concept_f1_micro", "concept F1 (micro)"),
    ("concept_f1_macro", "concept F1 (macro)"), ("key_object_dice", "key-object Dice"),
    ("caption_bleu4", "caption BLEU-4"),
)  # fmt: skip
PAPER_METRICS = ("video_2way", "video_50way", "clip_pcc")


# ---- the runs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One run of the bench: ``ablation`` at ``seed``, its run name and overrides (the ``--set`` ones first)."""

    ablation: str
    seed: int
    exp: str
    overrides: tuple[str, ...]


def plan_runs(exp: str, names: list[str], seeds: list[int], common: list[str]) -> list[Run]:
    """Seed-major (so that a seed's first run trains the stage 1 that the others copy)."""
    if any(o.split("=", 1)[0].strip() == "run.seed" for o in common):
        raise SystemExit("error: --seeds sets run.seed; drop run.seed from --set")
    return [Run(n, s, f"{exp}_abl_{n}_s{s}", (*common, *ABLATIONS[n].overrides, f"run.seed={s}"))
            for s in seeds for n in names]  # fmt: skip


def stage_config(profile: str, run: Run, stage: str, mode: str) -> SharedConfig:
    """The config stage ``stage`` of ``run`` resolves (as the driver, which adds run.device=cpu)."""
    cli = {"subj": SUBJ, "exp": run.exp, "mode": mode}
    return load_config(STAGE_CONFIGS[stage], profile, [*run.overrides, "run.device=cpu"], cli)


def identity_free(cfg: SharedConfig, stage: str) -> dict[str, Any]:
    """The config as a plain dict without the run's name (and without ``run.mode`` for a mode-independent stage):
    equal for two runs exactly when the stage computes the same thing."""
    plain = to_dict(cfg)
    plain["run"].pop("exp", None)
    if not STAGE_BY_KEY[stage].mode_dependent:
        plain["run"].pop("mode", None)
    return plain


def is_current(cfg: SharedConfig, stage: str) -> bool:
    """The stage's manifest exists, is fresh and was written with this config (run name and, for a mode-independent
    stage, mode aside)."""
    folder = RunPaths.from_config(cfg).stage_dir(stage)
    manifest = read_manifest(folder)
    if manifest is None or stale_reasons(folder, manifest) or "config" not in manifest:
        return False
    recorded = json.loads(json.dumps(manifest["config"]))
    recorded.get("run", {}).pop("exp", None)
    if not STAGE_BY_KEY[stage].mode_dependent:
        recorded.get("run", {}).pop("mode", None)
    return recorded == identity_free(cfg, stage)


def stages_to_run(profile: str, run: Run, mode: str, first: int) -> str:
    """From the first stage (of ``PIPELINE[first:]``) that is not current on, every stage."""
    for i in range(first, len(PIPELINE)):
        if not is_current(stage_config(profile, run, PIPELINE[i], mode), PIPELINE[i]):
            return PIPELINE[i:]
    return ""


def stage1_source(profile: str, run: Run, mode: str, trained: dict[str, Run]) -> Run | None:
    """An earlier run whose stage 1 is this run's (same stage-1 config, run name aside), else None."""
    key = json.dumps(identity_free(stage_config(profile, run, "1", mode), "1"), sort_keys=True)
    return trained.get(key)


def remember_stage1(profile: str, run: Run, mode: str, trained: dict[str, Run]) -> None:
    key = json.dumps(identity_free(stage_config(profile, run, "1", mode), "1"), sort_keys=True)
    trained.setdefault(key, run)


def share_stage1(profile: str, src: Run, dst: Run, mode: str) -> None:
    """Copy ``src``'s stage 1 (and saved configs) into ``dst``; a ``dst`` made earlier must hold the same stage 1."""
    a = paths_of(profile, src.exp, SUBJ, mode, list(src.overrides))
    b = paths_of(profile, dst.exp, SUBJ, mode, list(dst.overrides))
    if b.root.exists() and read_manifest(b.stage_dir("1")) != read_manifest(a.stage_dir("1")):
        raise SystemExit(f"error: {b.root} holds another stage 1 than {a.root}; delete {b.root} and rerun")
    copy_stages(a, b, ("1",))


def execute(args: argparse.Namespace, run: Run, trained: dict[str, Run]) -> dict[str, Any]:
    """Run (or read) one ablation run; returns its record."""
    src = stage1_source(args.profile, run, args.mode, trained)
    shared = src is not None and src.exp != run.exp
    if shared:
        assert src is not None
        share_stage1(args.profile, src, run, args.mode)
    stages = stages_to_run(args.profile, run, args.mode, 1 if shared else 0)
    wall = run_stages(args.profile, run.exp, SUBJ, args.mode, stages, list(run.overrides)) if stages else 0.0
    remember_stage1(args.profile, run, args.mode, trained)
    paths = paths_of(args.profile, run.exp, SUBJ, args.mode, list(run.overrides))
    report = json.loads(paths.metrics_file.read_text())
    protocol = report["protocols"][args.protocol]
    metrics = protocol["metrics"]
    return {
        "ablation": run.ablation,
        "seed": run.seed,
        "exp": run.exp,
        "overrides": list(ABLATIONS[run.ablation].overrides),
        "stage1": f"copied from {src.exp}" if shared and src else "trained",
        "stages_run": stages or "none (current)",
        "wall_s": round(wall, 1),
        "metrics": {k: v.get("mean") for k, v in metrics.items()},
        "chance": {k: v["chance"] for k, v in metrics.items() if v.get("chance") is not None},
    }


# ---- aggregation and the table -------------------------------------------------------------------------------------
def aggregate(values: list[float | None]) -> dict[str, Any]:
    """One metric over seeds: ``values`` (None where missing), ``n`` (finite ones), ``mean`` and ``std`` (ddof 1; None
    below two finite values)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 and mean is not None else None
    return {"values": values, "n": n, "mean": mean, "std": std}


def merged_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of ``--merge`` (an earlier results JSON) whose seeds this invocation does not run, after checking that
    it measured the same thing (profile, mode, protocol, overrides)."""
    if args.merge is None:
        return []
    old = json.loads(args.merge.read_text())
    mine = {"profile": args.profile, "mode": args.mode, "protocol": args.protocol, "set": args.set}
    differs = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
    if differs:
        raise SystemExit(f"error: --merge {args.merge} measured something else: {differs}")
    return [r for r in old["runs"] if r["seed"] not in args.seeds and r["ablation"] in args.ablations]


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """ablation → metric → :func:`aggregate` over its seeds' records (in seed order)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in dict.fromkeys(r["ablation"] for r in records):
        mine = sorted((r for r in records if r["ablation"] == name), key=lambda r: r["seed"])
        keys = list(dict.fromkeys(k for r in mine for k in r["metrics"]))
        out[name] = {k: aggregate([r["metrics"].get(k) for r in mine]) for k in keys}
    return out


def cell(agg: dict[str, Any] | None, decimals: int) -> str:
    """A table cell: mean ± std (n=k), or mean (n=1); "—" when not measured, "n/a" without a finite value."""
    if agg is None:
        return "—"
    if agg["mean"] is None:
        return "n/a"
    std = "" if agg["std"] is None else f" ± {agg['std']:.{decimals}f}"
    return f"{agg['mean']:.{decimals}f}{std} (n={agg['n']})"


def paper_cell(name: str, metric: str) -> str:
    row = ABLATIONS[name].paper
    value = PAPER[row]["metrics"].get(metric) if row else None
    return "—" if value is None else f"{value:.3f}"


def paper_row_label(name: str) -> str:
    row = ABLATIONS[name].paper
    if row is None:
        return NO_PAPER_ROW
    return f"{PAPER[row]['label']} ({'NeuroClips T2' if row.startswith('neuroclips') else 'NEURONS §3.3'})"


def table(summary: dict[str, dict[str, dict[str, Any]]], chance: dict[str, float], seeds: list[int]) -> str:
    """Rows: every stage-6 metric (ours: mean ± std over seeds), then the paper's numbers; one column per ablation."""
    names = list(summary)
    present = {k for agg in summary.values() for k in agg}
    metrics = [(k, label) for k, label in METRICS if k in present]
    metrics += [(k, k) for k in sorted(present - {k for k, _ in METRICS})]
    lines = ["| metric | " + " | ".join(names) + " | chance |", "|---" * (len(names) + 2) + "|"]
    for key, label in metrics:
        dec = 2 if key == "psnr" else 3
        c = chance.get(key)
        cells = [cell(summary[n].get(key), dec) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'—' if c is None else f'{c:.3f}'} |")
    for key, label in METRICS:
        if key in PAPER_METRICS:
            lines.append(f"| paper: {label} | " + " | ".join(paper_cell(n, key) for n in names) + " | |")
    lines.append("| paper row | " + " | ".join(paper_row_label(n) for n in names) + " | |")
    notes = [
        f"toy world, subject 1, mean ± std over seeds {', '.join(map(str, seeds))} (ddof 1; n = seeds with a value)",
        "what each column changes: "
        + "; ".join(f"{n}: {', '.join(ABLATIONS[n].overrides) or 'nothing'}" for n in names),  # fmt: skip
        f"paper rows: NEURONS §3.3 = {NEURONS_SRC}; NeuroClips T2 = {NEUROCLIPS_SRC} (an ablation of NeuroClips' own "
        "model, beside no_blurry). The published numbers are on cc2017 (real fMRI), not comparable in level with the "
        "toy world; compare the direction of each change.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="toy", help="toy (default), smoke, or a YAML profile of a toy world")
    p.add_argument("--exp", default="bench", help="prefix of the run names <exp>_abl_<ablation>_s<seed>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="values of run.seed (default 0 1 2)")
    p.add_argument(
        "--ablations",
        nargs="+",
        default=list(DEFAULT_ABLATIONS),
        choices=[*ABLATIONS, "all"],
        help="which ablations (default: the six of issue 17; 'all' adds the paper's cumulative rows)",
    )
    p.add_argument("--mode", default="enhance", choices=("enhance", "motion"))
    p.add_argument("--protocol", default="standard", choices=("standard", "neurons"), help="stage 6's protocol")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/ablations_<profile>.json)")
    p.add_argument("--merge", type=Path, default=None,
                   help="an earlier results JSON of the same profile, mode and protocol: its runs of seeds not in "
                        "--seeds join the summary (e.g. add seeds to a finished bench without rerunning it)")
    p.add_argument("--dry-run", action="store_true", help="resolve every run's configs, print the plan, run nothing")
    args = p.parse_args(argv)  # fmt: skip
    args.ablations = list(ABLATIONS) if "all" in args.ablations else list(dict.fromkeys(args.ablations))
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds}: give distinct seeds")
    if args.profile.endswith((".yaml", ".yml")):
        args.profile = str(Path(args.profile).resolve())  # as the driver is given it (the profile is in the config)
    return args


def check_plan(args: argparse.Namespace, runs: list[Run]) -> list[str]:
    """Resolve every stage config of every run (a bad override fails here, before hours of work); one plan line per
    run: stage 1 trained or copied, and its overrides."""
    if stage_config(args.profile, runs[0], "1", args.mode).model.size == "paper":
        raise SystemExit("error: the ablations need a toy world profile (toy, smoke or one that extends them)")
    trained: dict[str, Run] = {}
    lines = []
    for run in runs:
        for stage in PIPELINE:
            stage_config(args.profile, run, stage, args.mode)
        src = stage1_source(args.profile, run, args.mode, trained)
        remember_stage1(args.profile, run, args.mode, trained)
        how = f"stage 1 copied from {src.exp}, stages 2-6" if src else "stages 1-6"
        lines.append(f"{run.exp}: {how}; {' '.join(ABLATIONS[run.ablation].overrides) or '(no override)'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = plan_runs(args.exp, args.ablations, args.seeds, args.set)
    try:
        plan = check_plan(args, runs)
    except NeuronsError as err:
        print(f"error: {type(err).__name__}: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    if args.dry_run:
        print("\n".join(plan))
        return 0
    out = args.out or REPO / "bench" / "results" / f"ablations_{Path(args.profile).stem}.json"
    t0, trained, records = time.time(), {}, merged_runs(args)
    record: dict[str, Any] = {"bench": "ablations", "profile": args.profile, "exp": args.exp, "subj": SUBJ,
                              "mode": args.mode, "protocol": args.protocol, "seeds": args.seeds, "set": args.set,
                              "ablations": {n: {"summary": ABLATIONS[n].summary, "overrides": ABLATIONS[n].overrides,
                                                "paper": ABLATIONS[n].paper} for n in args.ablations},
                              "paper": PAPER, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    n_merged = len(records)
    record["seeds"] = sorted({*args.seeds, *(r["seed"] for r in records)})
    for run in runs:
        records.append(execute(args, run, trained))
        record.update({"runs": records, "summary": summarise(records),
                       "complete": len(records) - n_merged == len(runs), "wall_s": round(time.time() - t0, 1),
                       "merged_from": str(args.merge) if args.merge else None})  # fmt: skip
        atomic_write_json(out, record)
    chance = {k: v for r in records for k, v in r["chance"].items()}
    print(table(record["summary"], chance, record["seeds"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
