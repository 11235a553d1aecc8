"""Per-stage wall time of a pipeline run (the toy pipeline by default), from the stage manifests of its run folder.

    python bench/pipeline_time.py --run-dir EXP/exp_demo/subj_1      # an existing run (mode enhance)
    python bench/pipeline_time.py --run --exp bench --stages 123456   # run the toy pipeline first, then read it

Every stage writes ``wall_time_s`` into its ``manifest.json`` when it finishes (utils/manifest.py); a stage with no
manifest (not run, failed or still running) is reported as ``null``. With ``--run`` the stages are run first through
``train_neurons.sh cpu EXP STAGES MODE SUBJ PROFILE`` and the script's own wall time per stage (imports and
set-up included) is reported beside the manifest's. Prints ONE line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.cli import run_dir_of  # noqa: E402
from utils.runs import RunPaths  # noqa: E402


def read_times(run_dir: Path, mode: str) -> dict[str, Any]:
    out = {}
    for stage, folder in RunPaths(run_dir, mode).stage_dirs().items():
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            out[stage] = None
            continue
        out[stage] = {"wall_s": manifest.get("wall_time_s"), "started": manifest.get("started")}
    return out


def run_pipeline(args: argparse.Namespace) -> tuple[Path, dict[str, float]]:
    """Run each stage of ``args.stages`` through the driver (one call per stage, timed); returns the run folder."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    wall = {}
    for stage in args.stages:
        cmd = ["bash", str(REPO / "train_neurons.sh"), "cpu", args.exp, stage, args.mode, str(args.subj), args.profile]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr, stderr=sys.stderr)
        wall[stage] = round(time.perf_counter() - t0, 1)
        if done.returncode:
            raise SystemExit(f"error: stage {stage} failed (exit {done.returncode}); see the driver's log above")
    run_dir = run_dir_of(["--profile", args.profile, "--subj", str(args.subj), "--exp", args.exp, "--mode", args.mode])
    return run_dir, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help="an existing run folder <exp_root>/exp_<EXP>/subj_<SUBJ>")
    p.add_argument("--run", action="store_true", help="run the stages first (train_neurons.sh on the CPU)")
    p.add_argument("--exp", default="bench", help="with --run: the experiment name")
    p.add_argument("--stages", default="123456", help="with --run: the stages to run, in order")
    p.add_argument("--profile", default="toy")
    p.add_argument("--subj", type=int, default=1)
    p.add_argument("--mode", default="enhance")
    args = p.parse_args(argv)
    if not args.run and args.run_dir is None:
        p.error("give --run-dir of an existing run, or --run")
    script_wall: dict[str, float] = {}
    run_dir = args.run_dir
    if args.run:
        run_dir, script_wall = run_pipeline(args)
    times = read_times(run_dir, args.mode)
    done = {k: v["wall_s"] for k, v in times.items() if v and v["wall_s"] is not None}
    result = {
        "bench": "pipeline_time",
        "run_dir": str(run_dir),
        "mode": args.mode,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "stages": times,
        "script_wall_s": script_wall or None,
        "total_s": round(sum(done.values()), 1),
        "stages_done": "".join(done),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
