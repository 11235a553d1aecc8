"""Noise ceiling: identification of test clips by an oracle that knows the true encoding model.

For each test clip the oracle takes the measured mean over the test repeats (V,) and picks, among the candidate test
clips, the one whose true-model predicted response correlates best (voxel pattern correlation). No decoder trained on
this data can beat it on average, so it bounds every brain-decoding identification score from above.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from utils.baselines import identification_accuracy


def oracle_ceiling(
    measured: np.ndarray, predicted: np.ndarray, ways: tuple[int, ...], n_trials: int, seed: int
) -> dict[str, Any]:
    """measured: (N, repeats, V) test responses; predicted: (N, V) the model's noise-free responses."""
    return identification_accuracy(measured.mean(axis=1), predicted, ways, n_trials, seed)


def summarise(per_subject: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-subject results plus their mean top-1 per way."""
    keys = next(iter(per_subject.values()))["top1"].keys()
    mean = {k: float(np.mean([r["top1"][k] for r in per_subject.values()])) for k in keys}
    first = next(iter(per_subject.values()))
    return {"subjects": per_subject, "mean_top1": mean, "chance": first["chance"], "method": __doc__.split("\n")[0]}
