"""The table of pipeline stages: the one place that names them, read by the driver, the Makefile and the configs.

Light on purpose (no torch, no config classes): ``train_neurons.sh`` and the Makefile query it through

    python -m utils.stages table             # key<TAB>script<TAB>multi_process (1/0)<TAB>name, one stage a line
    python -m utils.stages present            # the keys whose script exists in this checkout, e.g. 123456e
    python -m utils.stages overrides TEXT     # NEURONS_SET split into its --set overrides, one a line
    python -m utils.stages profiles           # the built-in profiles (configs/<name>.yaml), space-separated

Each stage's config class is ``utils.stage_configs.STAGE_CONFIGS[key]``, and its profile section is ``stage<key>``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    """One stage: ``key`` on the command line, the script that runs it, and where its outputs go."""

    key: str
    name: str
    script: str  # at the repository root
    folder: str  # its output folder in the run, ``<folder>_<mode>`` when mode-dependent
    mode_dependent: bool  # stages 3 to 6 and e: enhance and motion runs keep their own outputs
    multi_process: bool  # shards its work over ``accelerate launch`` processes when given several devices

    @property
    def section(self) -> str:
        """Its section of a profile (``stage1:``) and prefix of a stage-aimed override (``stage1.train.x=1``)."""
        return f"stage{self.key}"

    def folder_name(self, mode: str) -> str:
        return f"{self.folder}_{mode}" if self.mode_dependent else self.folder


STAGES: tuple[Stage, ...] = (
    Stage("1", "brain model", "train_neurons.py", "stage1", mode_dependent=False, multi_process=True),
    Stage("2", "decoupler", "train_decoupler.py", "stage2", mode_dependent=False, multi_process=True),
    Stage("3", "decoupled reconstruction", "recon_decoupled.py", "stage3", mode_dependent=True, multi_process=True),
    Stage("4", "BLIP-2 captions", "caption_blip2.py", "stage4", mode_dependent=True, multi_process=True),
    Stage("5", "video reconstruction", "recon_video.py", "stage5", mode_dependent=True, multi_process=True),
    Stage("6", "metrics", "eval_metrics.py", "eval", mode_dependent=True, multi_process=True),
    Stage("e", "diagnostics", "gen_decoupled_outputs.py", "diagnostics", mode_dependent=True, multi_process=False),
)
STAGE_BY_KEY: dict[str, Stage] = {stage.key: stage for stage in STAGES}
STAGE_KEYS = "".join(STAGE_BY_KEY)  # the fixed order the driver runs them in
# The built-in profiles, configs/<name>.yaml: the paper and the toy worlds, each *_upstream one as the upstream code
# behaved (docs/fidelity.md).
PROFILES = ("paper", "paper_upstream", "toy", "smoke", "smoke_upstream")


def split_overrides(text: str) -> list[str]:
    """``NEURONS_SET`` -> its ``--set`` overrides: words split as a shell does, so a quoted override may hold spaces
    (``run.seed=1 'stage5.video.prompt_suffix=, 8k uhd'``). Raises ``ValueError`` on an unclosed quote or a newline
    inside an override."""
    words = shlex.split(text)
    if any("\n" in word for word in words):
        raise ValueError("an override may not contain a newline")
    return words


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Query the stage table (for train_neurons.sh and the Makefile).")
    sub = parser.add_subparsers(dest="query", required=True)
    sub.add_parser("table", help="key, script, multi-process (1/0) and name of every stage, tab-separated")
    sub.add_parser("present", help="the keys of the stages whose script exists in this checkout")
    sub.add_parser("overrides", help="NEURONS_SET split into its overrides, one a line").add_argument("text")
    sub.add_parser("profiles", help="the built-in profiles, space-separated")
    args = parser.parse_args(argv)
    if args.query == "table":
        print("\n".join(f"{s.key}\t{s.script}\t{int(s.multi_process)}\t{s.name}" for s in STAGES))
    elif args.query == "present":
        print("".join(s.key for s in STAGES if (REPO / s.script).is_file()))
    elif args.query == "profiles":
        print(" ".join(PROFILES))
    else:
        try:
            words = split_overrides(args.text)
        except ValueError as err:
            print(f"error: bad NEURONS_SET ({err}); fix: separate overrides by spaces and quote one that holds "
                  "spaces, e.g. NEURONS_SET=\"run.seed=1 'stage5.video.prompt_suffix=, 8k uhd'\"", file=sys.stderr)
            return 2
        if words:
            print("\n".join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
