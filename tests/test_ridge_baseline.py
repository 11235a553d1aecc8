"""N-way identification and the ridge baseline decoder on the toy world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks_construction import ridge_baseline
from utils.baselines import identification_accuracy


def test_identification_accuracy_bounds():
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((60, 20))
    perfect = identification_accuracy(targets, targets, (2, 10, 100), n_trials=20)
    assert perfect["top1"] == {"2-way": 1.0, "10-way": 1.0, "60-way": 1.0, "all-way": 1.0}
    assert perfect["chance"]["all-way"] == pytest.approx(1 / 60) and perfect["n_candidates"] == 60
    noise = identification_accuracy(rng.standard_normal((60, 20)), targets, (2, 10), n_trials=200)
    assert abs(noise["top1"]["2-way"] - 0.5) < 0.06 and noise["top1"]["10-way"] < 0.2
    again = identification_accuracy(rng.standard_normal((60, 20)), targets, (2,), n_trials=5, seed=1)
    assert again["seed"] == 1 and again["n_trials"] == 5


def test_ridge_baseline_on_the_toy_world(smoke_world: Path, tmp_path: Path):
    out = tmp_path / "ridge.json"
    assert (
        ridge_baseline.main(
            ["--data-root", str(smoke_world), "--subjects", "1", "3", "--trials", "20", "--out", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result["subjects"]) == {"subj01", "subj03"}
    test = result["subjects"]["subj01"]["test"]
    assert test["n_candidates"] == 24 and set(test["top1"]) == {"2-way", "24-way", "all-way"}
    assert result["mean_test_top1"]["2-way"] > 0.5  # above chance, far below the ceiling
    assert result["mean_test_top1"]["all-way"] < result["ceiling_mean_top1"]["all-way"]
    assert result["subjects"]["subj01"]["n_clips"]["val"] >= 2 and "val" in result["subjects"]["subj01"]
