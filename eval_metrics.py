"""Stage 6: metrics of the stage-5 videos and the stage-3 sub-task outputs on the test clips (``eval.protocol``:
standard | neurons): video / frame N-way accuracy, CLIP-pcc, SSIM, PSNR, blurry-video SSIM, concept F1, key-object
Dice, caption BLEU-4.

    python eval_metrics.py --profile toy --subj 1 --exp demo --mode enhance [--set eval.protocol=neurons]

Needs stages 5 and 3 of the same run and mode. Writes <exp_root>/exp_<EXP>/subj_<SUBJ>/metrics_<MODE>.json (every
metric as mean, std, n; protocol, chance levels, config hash, input paths) and eval_<MODE>/manifest.json.
"""

import sys

from utils.cli import run_stage
from utils.stage_configs import Stage6Config


def main(cfg: Stage6Config) -> None:
    from pipeline.stage6 import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(Stage6Config, main, __doc__))
