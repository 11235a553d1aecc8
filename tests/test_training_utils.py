"""Training plumbing: batching independent of the process count, the OneCycle schedule, metric logs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.config import load_config
from utils.errors import ConfigError
from utils.stage_configs import Stage1Config
from utils.training import BatchPlan, MetricsLog, clip_seed, one_cycle


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_every_clip_once_per_epoch_whatever_the_process_count(num_processes):
    plan = BatchPlan(n_items=23, global_batch=6, num_processes=num_processes, seed=5, drop_last=False)
    assert plan.steps_per_epoch == 4
    for epoch in (0, 1):
        per_step = [np.concatenate(s) for s in zip(*(plan.batches(epoch, r) for r in range(num_processes)))]
        single = list(BatchPlan(23, 6, 1, seed=5, drop_last=False).batches(epoch))
        assert len(per_step) == len(single) == 4
        for union, reference in zip(per_step, single):
            assert np.array_equal(union, reference)  # the same global batch, in the same order
        assert sorted(np.concatenate(per_step)) == list(range(23))
    assert not np.array_equal(plan.permutation(0), plan.permutation(1))


def test_drop_last_skips_the_partial_batch():
    plan = BatchPlan(n_items=23, global_batch=6, seed=5)
    batches = list(plan.batches(0))
    assert plan.steps_per_epoch == 3 and [len(b) for b in batches] == [6, 6, 6]
    assert set(np.concatenate(batches)) < set(range(23))


def test_batch_plan_rejects_impossible_sizes():
    with pytest.raises(ConfigError, match="batch size 30 is larger than the 20 training clips.*at most 20"):
        BatchPlan(20, 30)
    with pytest.raises(ConfigError, match="training split is empty"):
        BatchPlan(0, 1)


def test_one_cycle_matches_the_upstream_schedule():
    cfg = load_config(Stage1Config, "paper").train  # 30 epochs, 5e-5, pct 2/30, final_div 1000
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=cfg.max_lr)
    sched = one_cycle(opt, cfg, total_steps=1080)
    lrs = []
    for _ in range(1080):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-5 / 25)  # div_factor 25
    assert int(np.argmax(lrs)) == 71  # 72 warm-up steps (pct 2/30 of 1080), peak at index 71
    assert max(lrs) == pytest.approx(5e-5)
    assert lrs[-1] == pytest.approx(5e-5 / 25 / 1000, rel=0.05)


def test_clip_seeds_are_distinct_and_stable():
    seeds = [clip_seed(42, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and clip_seed(42, 7) == seeds[7]


def test_metrics_log_round_trip_resume_and_plot(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "split": "train", "loss": 1.0 / step})
    log.write({"step": 5, "split": "val", "retrieval": 0.4})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    png = log.plot(tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
