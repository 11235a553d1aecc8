"""docs/fidelity.md against the profiles and the tests: every key that ``paper_upstream`` changes is documented, every
cited test exists, and the smoke-sized upstream profile changes the same keys as the paper-sized one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIDELITY = REPO / "docs" / "fidelity.md"
MAIN_TABLE = "## Behaviours that differ"
SHARED = ("run", "paths", "data", "model", "world")


def profile_diff(profile: str, other: str) -> set[str]:
    """The documented names of the resolved keys that differ between two profiles, over every stage (the function
    behind ``--diff``): ``stage<k>.<section>.<key>``, or ``<section>.<key>`` for a shared section."""
    from utils.config import config_diff
    from utils.stage_configs import STAGE_CONFIGS

    names = set()
    for stage, cls in STAGE_CONFIGS.items():
        for key, _, _ in config_diff(cls, profile, other):
            names.add(key if key.split(".")[0] in SHARED else f"stage{stage}.{key}")
    return names


def main_table_rows() -> list[list[str]]:
    """The cells of every row of the table of differing behaviours."""
    text = FIDELITY.read_text()
    table = text[text.index(MAIN_TABLE) :].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]  # skip the header


def test_every_key_paper_upstream_changes_is_in_the_option_column() -> None:
    rows = main_table_rows()
    assert rows and all(len(r) == 6 for r in rows), [r[:1] for r in rows if len(r) != 6]
    options = {name for row in rows for name in re.findall(r"`([\w.]+)`", row[3])}
    missing = profile_diff("paper", "paper_upstream") - options
    assert not missing, f"document these paper_upstream keys in {FIDELITY.name}'s option column: {sorted(missing)}"


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions (module level or in classes) of a test file."""
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_cited_test_exists() -> None:
    cited = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+)(?:\[[^\]]*\])?)?", FIDELITY.read_text())
    assert len(cited) > 20
    for file, name in cited:
        path = REPO / file
        assert path.is_file(), f"{FIDELITY.name} cites {file}, which does not exist"
        if name:
            assert name in defined_tests(path), f"{FIDELITY.name} cites {file}::{name}, which is not defined"


@pytest.mark.parametrize("world", ["smoke"])
def test_the_upstream_profiles_change_the_same_keys_at_both_scales(world: str) -> None:
    paper = profile_diff("paper", "paper_upstream")
    small = profile_diff(world, f"{world}_upstream")
    assert paper and small == paper, {"paper only": sorted(paper - small), f"{world} only": sorted(small - paper)}
