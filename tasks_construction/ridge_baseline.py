"""Ridge-regression baseline decoder: voxels -> per-clip features, scored by N-way identification on the test set.

The decoder (himalaya, penalty per feature by contiguous 5-fold CV on the training clips) is fit on the ``train`` split
(mean of the training repeats); ``val`` and ``test`` are identified with the mean of their repeats. Features:
``pixels`` = the clip's mean frame pooled to ``grid`` x ``grid`` (3*grid^2 values), ``concepts`` = the concept
multi-hot labels, or both. This is the floor the NEURONS pipeline must beat; on a toy world the oracle noise ceiling
(``ceiling.json``) is reported beside it. The per-subject fit is :func:`utils.baselines.ridge_baseline`.

Usage: ``python -m tasks_construction.ridge_baseline --data-root DIR [--subjects 1 2 3] [--out FILE]``
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.baselines import ridge_baseline
from utils.cli import OneLineParser, add_data_root_args, data_root_of, report_error
from utils.data import BrainVideoData, DataConfig
from utils.data_catalog import CEILING_FILE, RIDGE_BASELINE_FILE, subject_name
from utils.errors import NeuronsError
from utils.io import atomic_write_json

log = logging.getLogger(__name__)


def run(
    data_root: Path,
    subjects: Sequence[int] = (1, 2, 3),
    features: str = "pixels",
    grid: int = 8,
    ways: Sequence[int] = (2, 50),
    n_trials: int = 100,
    seed: int = 0,
    data_config: DataConfig | None = None,
) -> dict[str, Any]:
    """The baseline for several subjects, their mean, and the world's noise ceiling when it has one."""
    per_subject = {}
    for s in subjects:
        data = BrainVideoData(data_root, s, data_config)
        per_subject[subject_name(s)] = ridge_baseline(data, features, grid, ways, n_trials, seed)
        log.info("%s test top-1 %s", subject_name(s), _fmt(per_subject[subject_name(s)]["test"]["top1"]))
    keys = next(iter(per_subject.values()))["test"]["top1"].keys()
    mean = {k: float(np.mean([r["test"]["top1"][k] for r in per_subject.values()])) for k in keys}
    out: dict[str, Any] = {
        "method": f"himalaya ridge, features={features}, grid={grid}, penalty by contiguous 5-fold CV on train",
        "data_root": str(data_root),
        "subjects": per_subject,
        "mean_test_top1": mean,
        "chance": next(iter(per_subject.values()))["test"]["chance"],
    }
    ceiling_path = data_root / CEILING_FILE
    if ceiling_path.is_file():
        ceiling = json.loads(ceiling_path.read_text())
        out["ceiling_mean_top1"] = ceiling["mean_top1"]
        out["ceiling_subjects"] = {s: c["top1"] for s, c in ceiling["subjects"].items() if s in per_subject}
    return out


def _fmt(top1: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in top1.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add_data_root_args(parser)
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--features", choices=["pixels", "concepts", "pixels+concepts"], default="pixels")
    parser.add_argument("--grid", type=int, default=8, help="pixel feature grid (grid x grid x 3)")
    parser.add_argument("--ways", type=int, nargs="+", default=[2, 50], help="N-way (capped at the test size)")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, help="JSON output (default <data-root>/ridge_baseline.json)")
    args = parser.parse_args(argv)
    args.data_root = data_root_of(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        data_config = DataConfig(val_fraction=args.val_fraction, val_seed=args.seed)
        result = run(
            args.data_root, args.subjects, args.features, args.grid, args.ways, args.trials, args.seed, data_config
        )
    except NeuronsError as err:
        return report_error(err)
    out = args.out or args.data_root / RIDGE_BASELINE_FILE
    atomic_write_json(out, result)
    print(f"ridge baseline test top-1 (mean of subjects): {_fmt(result['mean_test_top1'])}")
    if "ceiling_mean_top1" in result:
        print(f"noise ceiling top-1 (mean of subjects):      {_fmt(result['ceiling_mean_top1'])}")
    print(f"chance:                                      {_fmt(result['chance'])}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
