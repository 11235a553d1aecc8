"""Stage 5: AnimateDiff v3 + SparseCtrl-RGB videos from stage 3's keyframe and blurry video and a caption (stage-4
BLIP-2 when current, else stage-3 GPT-2 if ``video.caption_fallback``; ``video.caption_source``), img2img at
``video.strength`` (``video.init=noisy_start``: upstream's start at the largest timestep; ``video.seed=zero``:
upstream's seed 0 for every clip).

    python recon_video.py --profile toy --subj 1 --exp demo --mode enhance [--set video.steps=10]
    accelerate launch recon_video.py ...   # or torchrun: clips are shared round-robin between the processes

Needs stage 3 of the same run and mode. Outputs in <exp_root>/exp_<EXP>/subj_<SUBJ>/stage5_<MODE>/:
videos.safetensors (N, num_frames, 3, R, R) float16 in [0, 1], prompts.json, previews/, manifest.json and, with
``video.write_gif_grid``, upstream's GIF grids gif_grid/<clip>.gif.
"""

import sys

from utils.cli import run_stage
from utils.stage_configs import Stage5Config


def main(cfg: Stage5Config) -> None:
    from pipeline.stage5 import generate

    generate(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(Stage5Config, main, __doc__))
