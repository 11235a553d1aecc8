"""Stage 3: decode every test clip from the brain alone with the stage-2 model: prior tokens, concepts, key-object
mask, blurry video, GPT-2 caption and the unCLIP keyframe (enhance mode masks the blurry video and the keyframe
tokens with the predicted key object).

    python recon_decoupled.py --profile toy --subj 1 --exp demo --mode enhance [--set sample.batch_size=8]

Needs stage 2 of the same run (its best checkpoint). Outputs in <exp_root>/exp_<EXP>/subj_<SUBJ>/stage3_<MODE>/:
keyframes, blurry_videos, masks, concept_probs [, prior_tokens] (.safetensors), captions.json, concepts.json,
previews/ and manifest.json.
"""

import sys

from utils.cli import run_stage
from utils.stage_configs import Stage3Config


def main(cfg: Stage3Config) -> None:
    from pipeline.stage3 import reconstruct

    reconstruct(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(Stage3Config, main, __doc__))
