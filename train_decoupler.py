"""Stage 2: train the NEURONS decoupled task heads (prior, motion, concepts, masks, blurry video, captions) on top of
the frozen stage-1 brain model.

    python train_decoupler.py --profile toy --subj 1 --exp demo [--set train.batch_size=8]

Needs stage 1 of the same run (its best checkpoint). Outputs in <exp_root>/exp_<EXP>/subj_<SUBJ>/stage2/:
checkpoints/{best,last}/, metrics.jsonl, curves.png and manifest.json.
Resume an interrupted run with --set train.resume=true.

A subject set (--subj 1,2,3) trains one set of heads for every subject. A new subject adapted in stage 1 with
--init-from starts its prior and heads from the same subject-set run with --init-from <its run folder>.
"""

import sys

from utils.cli import run_stage, stage_parser
from utils.stage_configs import Stage2Config


def main(cfg: Stage2Config) -> None:
    from pipeline.stage2 import train

    train(cfg)


if __name__ == "__main__":
    parser = stage_parser("2", __doc__)
    parser.add_argument(
        "--init-from", metavar="RUN", help="a subject-set run folder: start the prior and heads from it"
    )
    sys.exit(run_stage(Stage2Config, main, __doc__, parser=parser))
