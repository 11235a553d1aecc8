"""Stage e: diagnostics of the decoupled outputs of stage 3 on the test clips: per-concept recall and precision,
key-object Dice per clip, decoded captions beside the ground truth, and a panel per sample clip (ground truth, blurry,
masked blurry, ground-truth mask, predicted mask).

    python gen_decoupled_outputs.py --profile toy --subj 1 --exp demo --mode enhance [--set sample.num_panels=8]

Needs stage 3 of the same run and mode. Writes <exp_root>/exp_<EXP>/subj_<SUBJ>/diagnostics_<MODE>/ (diagnostics.json,
concepts.png, dice.png, panels/clip_<i>.png, manifest.json); stage 6 puts them in the run's report.html.
"""

import sys

from utils.cli import run_stage
from utils.stage_configs import DiagnosticsConfig


def main(cfg: DiagnosticsConfig) -> None:
    from pipeline.diagnostics import diagnose

    diagnose(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(DiagnosticsConfig, main, __doc__))
