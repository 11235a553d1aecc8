"""Stage 1: train the NEURONS brain model (ridge + MindEye2 backbone) to predict CLIP image tokens from fMRI.

    python train_neurons.py --profile toy --subj 1 --exp demo [--set train.batch_size=8]

Outputs in <exp_root>/exp_<EXP>/subj_<SUBJ>/stage1/: checkpoints/{best,last}/, metrics.jsonl, curves.png and
manifest.json.
Resume an interrupted run with --set train.resume=true.
"""

import sys

from utils.cli import run_stage
from utils.stage_configs import Stage1Config


def main(cfg: Stage1Config) -> None:
    from pipeline.stage1 import train

    train(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(Stage1Config, main, __doc__))
