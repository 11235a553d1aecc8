"""Stage 4: BLIP-2 captions of the stage-3 keyframes (no prompt, greedy), scored against the ground-truth captions.

    python caption_blip2.py --profile toy --subj 1 --exp demo --mode enhance [--set caption.batch_size=8]

Needs stage 3 of the same run and mode (its keyframes). Outputs in <exp_root>/exp_<EXP>/subj_<SUBJ>/stage4_<MODE>/:
captions.json (one caption per test clip), caption_scores.json (BLEU-4, when the data has ground-truth captions) and
manifest.json. Stage 5 uses these captions while they are current for stage 3's keyframes, else stage 3's GPT-2 ones.
"""

import sys

from utils.cli import run_stage
from utils.stage_configs import Stage4Config


def main(cfg: Stage4Config) -> None:
    from pipeline.stage4 import caption

    caption(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(Stage4Config, main, __doc__))
