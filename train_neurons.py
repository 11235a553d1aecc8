"""Stage 1: train the NEURONS brain model (ridge + MindEye2 backbone) to predict CLIP image tokens from fMRI.

    python train_neurons.py --profile toy --subj 1 --exp demo [--set train.batch_size=8]

Outputs in <exp_root>/exp_<EXP>/subj_<SUBJ>/stage1/: checkpoints/{best,last}/, metrics.jsonl, curves.png and
manifest.json.
Resume an interrupted run with --set train.resume=true.

A subject set (--subj 1,2,3) trains one model with a ridge per subject. A new subject starts from such a model with
--init-from <its run folder> (train.init_from), e.g. on 1/8 of its clips:

    python train_neurons.py --profile toy --subj 3 --exp adapt --init-from EXP/exp_shared/subj_1-2 \
        --set data.train_fraction=0.125 train.adapt_ridge_epochs=10
"""

import sys

from utils.cli import run_stage, stage_parser
from utils.stage_configs import Stage1Config


def main(cfg: Stage1Config) -> None:
    from pipeline.stage1 import train

    train(cfg)


if __name__ == "__main__":
    parser = stage_parser("1", __doc__)
    parser.add_argument("--init-from", metavar="RUN", help="a subject-set run folder: adapt its model to --subj")
    sys.exit(run_stage(Stage1Config, main, __doc__, parser=parser))
