"""Stage 6: metrics of the stage-5 videos and the stage-3 sub-task outputs on the test clips (``eval.protocol``:
standard | neurons): video / frame N-way accuracy, CLIP-pcc, SSIM, PSNR, blurry-video SSIM, concept F1, key-object
Dice, caption BLEU-4.

    python eval_metrics.py --profile toy --subj 1 --exp demo --mode enhance [--set eval.protocol=neurons]

Needs stages 5 and 3 of the same run and mode. Writes <exp_root>/exp_<EXP>/subj_<SUBJ>/metrics_<MODE>.json (every
metric as mean, std, n, 95 % interval; protocol, chance levels, config hash, inputs) and eval_<MODE>/manifest.json.

A folder of videos that this project did not make (e.g. the videos NEURONS released), scored under both protocols
against the test clips of subject S (no run folder; pipeline/score_videos.py describes the layouts):

    python eval_metrics.py --videos DIR --layout upstream-gif|tensor|mp4 --subj S [--profile P] [--out FOLDER]
                           [--frames 4,6,8,10,12,14] [--overwrite] [--no-gt-check]

writes DIR/video_metrics.json and DIR/video_report.html (or into --out).
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.cli import OneLineParser, check_device, report_error, run_stage, stage_parser
from utils.stage_configs import Stage6Config

LAYOUTS = ("upstream-gif", "tensor", "mp4")  # pipeline.score_videos.LAYOUTS (not imported: --help stays fast)


def main(cfg: Stage6Config) -> None:
    from pipeline.stage6 import evaluate

    evaluate(cfg)


def frame_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(f) for f in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--frames {text!r}: comma-separated frame indices, e.g. 4,6,8") from err


def parser_with_videos() -> OneLineParser:
    parser = stage_parser("6", __doc__)
    group = parser.add_argument_group("score a folder of videos (no run)")
    group.add_argument("--videos", type=Path, metavar="DIR", help="folder of generated videos named by test clip")
    group.add_argument("--layout", choices=LAYOUTS, help="upstream-gif (upstream's GIF grids), tensor or mp4")
    group.add_argument("--out", type=Path, metavar="FOLDER", help="where the metrics and the report go (default DIR)")
    group.add_argument("--frames", type=frame_list, help="frames of each video to score (default: all)")
    group.add_argument("--overwrite", action="store_true", help="replace an earlier scoring's metrics and report")
    group.add_argument("--no-gt-check", action="store_true", help="upstream-gif: skip the GT-half vs dataset check")
    return parser


def score_videos(parser: OneLineParser, args: argparse.Namespace) -> int:
    """``--videos``: score a folder; one-line errors as a stage's."""
    if args.layout is None or args.subj is None:
        parser.error("--videos needs --layout and --subj")
    if args.exp is not None or args.mode is not None:
        parser.error("--exp and --mode name a run; --videos scores a folder without one")
    from pipeline.score_videos import FolderRequest, score_folder
    from utils.config import load_config, to_yaml
    from utils.errors import NeuronsError
    from utils.io import storage_error
    from utils.runs import setup_logging

    try:
        cfg = load_config(Stage6Config, args.profile, args.overrides, {"subj": args.subj})
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        setup_logging(cfg.run.log_level)
        check_device(cfg)
        request = FolderRequest(args.videos, args.layout, args.out, args.frames, args.overwrite, not args.no_gt_check)
        score_folder(cfg, request)
        return 0
    except NeuronsError as err:
        return report_error(err, args.debug)
    except OSError as err:  # a full disk or a read-only folder: one line, as a stage's
        problem = storage_error(err)
        if problem is None:
            raise
        return report_error(problem, args.debug)


def cli(argv: Sequence[str] | None = None) -> int:
    parser = parser_with_videos()
    args = parser.parse_args(argv)
    if args.videos is not None:
        return score_videos(parser, args)
    used = [f for f in ("layout", "out", "frames") if getattr(args, f) is not None]
    if used or args.overwrite or args.no_gt_check:
        parser.error(f"--{(used or ['overwrite'])[0].replace('_', '-')} is for --videos DIR")
    return run_stage(Stage6Config, main, __doc__, argv, parser)


if __name__ == "__main__":
    sys.exit(cli())
