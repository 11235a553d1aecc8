"""The stage table (utils/stages.py) and the views the configs, the run folders and the driver take of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.runs import RunPaths
from utils.stage_configs import STAGE_CONFIGS, STAGE_SECTIONS
from utils.stages import STAGE_KEYS, STAGES, main, split_overrides

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_has_a_script_and_a_config_class():
    assert list(STAGE_CONFIGS) == list(STAGE_KEYS) == list(STAGE_SECTIONS)
    assert all((REPO / stage.script).is_file() for stage in STAGES)


def test_run_folders_follow_the_table():
    dirs = RunPaths(Path("run"), "motion").stage_dirs()
    assert {k: p.name for k, p in dirs.items()} == {
        "1": "stage1", "2": "stage2", "3": "stage3_motion", "4": "stage4_motion", "5": "stage5_motion",
        "6": "eval_motion", "e": "diagnostics_motion",
    }  # fmt: skip


def test_overrides_split_as_shell_words():
    assert split_overrides("a.b=1  'c.d=x y'\nstage5.e=\"z, w\"") == ["a.b=1", "c.d=x y", "stage5.e=z, w"]
    assert split_overrides("") == []
    for bad in ("'open", "'a=x\ny'"):
        with pytest.raises(ValueError):
            split_overrides(bad)


def test_queries(capsys):
    assert main(["present"]) == 0 and capsys.readouterr().out.strip() == STAGE_KEYS
    assert main(["table"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "e\tgen_decoupled_outputs.py\t0\tdiagnostics"
    assert main(["overrides", "'unclosed"]) == 2 and "bad NEURONS_SET" in capsys.readouterr().err
