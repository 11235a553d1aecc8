"""Checkpoint save/load: atomic swap, strict loading with one-line mismatch reports, identity and corruption checks."""

from __future__ import annotations

import os

import pytest
import torch

from utils.checkpoint import MODEL_FILE, load_checkpoint, resolve_checkpoint, save_checkpoint
from utils.config import load_config
from utils.errors import WeightsError
from utils.stage_configs import Stage1Config


def _model(width: int = 4) -> torch.nn.Module:
    torch.manual_seed(width)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


@pytest.fixture
def cfg():
    return load_config(Stage1Config, "smoke", ["run.subj=2"])


def test_round_trip_restores_weights_and_state(tmp_path, cfg):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    folder = save_checkpoint(tmp_path / "last", model.state_dict(), cfg, {"step": 7, "optimizer": opt.state_dict()})
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.safetensors", "state.pt"]
    other = _model()
    state = load_checkpoint(folder, other, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert state["step"] == 7 and state["config"]["run"]["subj"] == 2
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_other_size_is_named_key_by_key(tmp_path, cfg):
    folder = save_checkpoint(tmp_path / "best", _model(8).state_dict(), cfg)
    with pytest.raises(WeightsError) as info:
        load_checkpoint(folder, _model(4), cfg)
    message = str(info.value)
    assert "shape mismatch: 0.bias (8,) vs (4,), 0.weight (8, 3) vs (4, 3), 2.weight (2, 8) vs (2, 4)" in message
    assert "\n" not in message


def test_missing_and_unexpected_keys(tmp_path, cfg):
    folder = save_checkpoint(tmp_path / "best", {"0.weight": torch.zeros(4, 3), "extra": torch.zeros(1)}, cfg)
    with pytest.raises(WeightsError, match=r"missing: 0.bias, 2.bias, 2.weight; unexpected: extra"):
        load_checkpoint(folder, _model(4), cfg)


def test_checkpoint_of_another_subject_or_size_is_refused(tmp_path, cfg):
    folder = save_checkpoint(tmp_path / "best", _model().state_dict(), cfg)
    with pytest.raises(WeightsError, match=r"another run: subj='2' \(run has '1'\)"):
        load_checkpoint(folder, _model(), load_config(Stage1Config, "smoke", ["run.subj=1"]))
    with pytest.raises(WeightsError, match=r"model_size='smoke' \(run has 'toy'\)"):
        load_checkpoint(folder, _model(), load_config(Stage1Config, "toy", ["run.subj=2"]))
    state = load_checkpoint(folder, _model(), load_config(Stage1Config, "toy", ["run.subj=2", "model.size=smoke"]))
    assert state["config"]["run"]["profile"] == "smoke"  # another profile of the same size and subject loads


def test_truncated_weights_give_a_clear_error(tmp_path, cfg):
    folder = save_checkpoint(tmp_path / "best", _model().state_dict(), cfg)
    path = folder / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated.*delete that checkpoint folder"):
        load_checkpoint(folder, _model(), cfg)


def test_interrupted_swap_falls_back_to_the_previous_checkpoint(tmp_path, cfg):
    first = _model(4)
    folder = save_checkpoint(tmp_path / "last", first.state_dict(), cfg, {"step": 1})
    os.replace(folder, folder.with_name("last.old"))  # a save killed between its two renames
    assert resolve_checkpoint(folder).name == "last.old"
    assert load_checkpoint(folder, _model(4), cfg)["step"] == 1
    save_checkpoint(folder, first.state_dict(), cfg, {"step": 2})  # the next save cleans up
    assert not folder.with_name("last.old").exists() and load_checkpoint(folder, _model(4), cfg)["step"] == 2


def test_missing_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="not found or incomplete"):
        resolve_checkpoint(tmp_path / "nothing")
