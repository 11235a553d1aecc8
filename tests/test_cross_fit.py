"""Cross-fitting (``data.cross_fit_folds`` and ``stage2.train.condition_source=cross_fit``): the folds, the fold
models of stage 1, and stage 2's out-of-fold conditions on the smoke world."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.smoke_env import SmokeEnv, smoke_env
from utils.data import BrainVideoData, DataConfig, fold_positions, without_fold
from utils.errors import ConfigError, DataError, WeightsError

FOLDS = 2
CROSS_FIT = [f"data.cross_fit_folds={FOLDS}"]
STAGE2 = ["train.batch_size=8", "train.num_epochs=1", "train.condition_cache=fp32",
          "train.condition_source=cross_fit"]  # fmt: skip


def test_folds_are_contiguous_near_equal_and_cover_the_split_once() -> None:
    folds = fold_positions(10, 3)
    assert [f.tolist() for f in folds] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for bad in (1, 11):
        with pytest.raises(DataError, match="cross_fit_folds"):
            fold_positions(10, bad)
    rows = np.array([0, 1, 2, 5, 6, 7, 8, 9])  # source rows of a split with a hole (validation) at 3-4
    assert without_fold(rows, folds[1], guard=0).tolist() == [0, 1, 2, 5, 9]
    assert without_fold(rows, folds[1], guard=1).tolist() == [0, 1, 2], "the guard clips beside the fold go too"
    assert without_fold(rows, np.array([3]), guard=1).tolist() == [0, 1, 2, 7, 8, 9], "neighbours in time, not in list"


def test_a_fold_models_training_split_leaves_its_fold_out(smoke_world: Path) -> None:
    full = BrainVideoData(smoke_world, 1, DataConfig(cross_fit_folds=FOLDS))
    folds = full.cross_fit_indices()
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(full.n_clips("train")))
    for k, positions in enumerate(folds):
        fold_data = BrainVideoData(smoke_world, 1, DataConfig(cross_fit_folds=FOLDS, cross_fit_fold=k))
        left_out = full.indices("train")[positions]
        assert not set(fold_data.indices("train")) & set(left_out)
        guard = full.config.val_guard_clips
        assert fold_data.n_clips("train") == full.n_clips("train") - len(positions) - guard
        assert np.array_equal(fold_data.indices("val"), full.indices("val")), "validation is the run's own"
        with pytest.raises(DataError, match="whole training split"):
            fold_data.cross_fit_indices()
    with pytest.raises(DataError, match="cross_fit_fold=2"):
        BrainVideoData(smoke_world, 1, DataConfig(cross_fit_folds=FOLDS, cross_fit_fold=2))


def test_condition_cache_computes_each_group_with_its_own_function(tmp_path: Path) -> None:
    from pipeline.condition_cache import ConditionCache

    x = torch.randn(7, 4)
    groups = [(np.array([0, 1, 2]), lambda v, _slot: v[:, None, :] * 0.0), (np.array([3, 4, 5, 6]),
              lambda v, _slot: v[:, None, :] * 2.0)]  # fmt: skip
    cache = ConditionCache(tmp_path, "fp32", {"stage1": "a"})
    cache.ensure({"train": [x]}, groups, "cpu", chunk=2)
    got = cache.read("train", 0, list(range(7)), "cpu")  # (7, 1, 4)
    torch.testing.assert_close(got[:3], torch.zeros(3, 1, 4))
    torch.testing.assert_close(got[3:], 2.0 * x[3:, None])
    with pytest.raises(ValueError, match="cover"):
        ConditionCache(tmp_path / "b", "fp32", {"stage1": "a"}).ensure({"train": [x]}, groups[:1], "cpu")


# ---- stages 1 and 2 on the smoke world ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> Iterator[SmokeEnv]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "cross_fit_env")
    torch.set_num_threads(threads)


def config(env: SmokeEnv, stage: str, exp: str, *overrides: str):
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    return load_config(STAGE_CONFIGS[stage], str(env.profile), list(overrides), {"exp": exp})


@pytest.fixture(scope="module")
def stage1_run(env: SmokeEnv) -> Path:
    from pipeline.stage1 import train

    return train(config(env, "1", "cf", *CROSS_FIT, "train.num_epochs=1"))


def test_stage1_trains_one_model_per_fold_and_scores_them_out_of_fold(stage1_run: Path) -> None:
    from pipeline.common import cross_fit_dir

    manifest = json.loads((stage1_run / "manifest.json").read_text())
    outputs = json.dumps(manifest)
    for k in range(FOLDS):
        best = cross_fit_dir(stage1_run, k) / "checkpoints" / "best" / "model.safetensors"
        assert best.is_file() and f"fold_{k}" in outputs
    scores = json.loads((stage1_run / "cross_fit" / "identification.json").read_text())["subjects"]["1"]
    for kind in ("in_sample", "out_of_fold"):
        assert 0.0 <= scores[kind]["top1"]["2-way"] <= 1.0


def test_stage1_refuses_a_fold_index_and_a_single_fold(env: SmokeEnv) -> None:
    from pipeline.stage1 import train

    for bad in (["data.cross_fit_fold=0", *CROSS_FIT], ["data.cross_fit_folds=1"]):
        with pytest.raises(ConfigError, match="cross_fit"):
            train(config(env, "1", "cf_bad", *bad))


def fold_condition(stage1_run: Path, fold: int | None, voxels: torch.Tensor, s) -> torch.Tensor:
    """The prior condition of ``voxels`` by stage 1's fold model ``fold`` (None: the full model)."""
    from dataclasses import replace

    from models.brain import NeuronsBrainModel
    from pipeline.common import cross_fit_dir
    from pipeline.stage2 import FROZEN_PARTS
    from utils.checkpoint import load_parts, read_weights

    folder = stage1_run if fold is None else cross_fit_dir(stage1_run, fold)
    model = NeuronsBrainModel(replace(s.model.cfg, parts=FROZEN_PARTS)).eval()
    load_parts(model, read_weights(folder / "checkpoints" / "best")[0], FROZEN_PARTS, "test")
    with torch.no_grad():
        return model.prior_condition(voxels)


def test_stage2_trains_on_each_clips_condition_from_the_fold_model_that_did_not_see_it(
    env: SmokeEnv, stage1_run: Path
) -> None:
    from pipeline import stage2

    out = stage2.train(config(env, "2", "cf", *CROSS_FIT, *STAGE2))
    s = stage2.setup(config(env, "2", "cf", *CROSS_FIT, *STAGE2))
    assert [p.parent.parent.name for p in s.cross_fit] == [f"fold_{k}" for k in range(FOLDS)]
    train = s.voxels["train"][0]
    for k, positions in enumerate(s.data.cross_fit_indices()):
        got = s.conditions.read("train", 0, positions, "cpu")
        torch.testing.assert_close(got, fold_condition(stage1_run, k, train[positions], s), rtol=1e-4, atol=1e-5)
        inside = fold_condition(stage1_run, None, train[positions], s)
        assert (got - inside).abs().max() > 1e-3, "not the full model's in-sample condition"
    val = s.conditions.read("val", 0, list(range(len(s.voxels["val"][0]))), "cpu")
    torch.testing.assert_close(val, fold_condition(stage1_run, None, s.voxels["val"][0], s), rtol=1e-4, atol=1e-5)
    assert "cross_fit" in json.loads((out / "condition_cache" / "manifest.json").read_text())


def test_stage2_cross_fit_needs_the_cache_and_the_fold_models(env: SmokeEnv, stage1_run: Path) -> None:
    from pipeline import stage2

    with pytest.raises(ConfigError, match="condition_cache"):
        stage2.setup(config(env, "2", "cf", *CROSS_FIT, *STAGE2, "train.condition_cache=compute"))
    with pytest.raises(ConfigError, match="cross_fit_folds"):
        stage2.setup(config(env, "2", "cf", *STAGE2))
    with pytest.raises(WeightsError, match="cross_fit_folds=2"):  # stage 1 trained 2 fold models, not 3
        stage2.cross_fit_checkpoints(config(env, "2", "cf", "data.cross_fit_folds=3", *STAGE2))
