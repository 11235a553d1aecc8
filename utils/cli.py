"""Command-line entry points: one parser shape for every stage and one-line errors.

A stage script is ``main(cfg)`` plus::

    if __name__ == "__main__":
        sys.exit(run_stage(Stage1Config, main, __doc__))

Expected failures (:class:`NeuronsError`) print ``error: <cause>; fix: <fix>`` on one line (to stderr, and into the
stage's own log file when it has one) and return the error's exit status; configuration errors return 2. ``--debug``
(or ``NEURONS_DEBUG=1``, which reaches every stage of the driver) prints the traceback as well. Ctrl-C (SIGINT) and
SIGTERM stop a training stage after it has saved ``last`` (exit status 130 and 143). A write that fails because the
disk is full is reported on one line too. The catalogue of these failures is ``docs/failures.md``. ``--set`` takes
several ``KEY=VALUE`` per flag and may repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from utils.config import config_diff, config_hash, load_config, to_yaml
from utils.errors import ConfigError, NeuronsError
from utils.io import storage_error
from utils.manifest import StageRecorder
from utils.runs import RunPaths, config_record, run_lock, save_resolved_config, setup_logging, stage_log_path
from utils.stage_configs import STAGE_CONFIGS, STAGE_KEY_OF, SharedConfig, Stage1Config, parse_subjects
from utils.stages import STAGE_BY_KEY

log = logging.getLogger("neurons")

DRIVER_LOG_ENV = "NEURONS_DRIVER_LOG"  # set by train_neurons.sh, which tees the output into the run's logs/
DEBUG_ENV = "NEURONS_DEBUG"  # "1": print tracebacks of expected errors too (as --debug)

C = TypeVar("C", bound=SharedConfig)  # the config class of the stage being run


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit status 2) instead of usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE [KEY=VALUE ...]``: several overrides per flag, and the flag may repeat; ``args.overrides``
    lists them all in order."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys (several per --set; --set may repeat)")  # fmt: skip


def subject_arg(text: str) -> int | tuple[int, ...]:
    """``--subj``: "2" or a set "1,2,3" (each of 1, 2, 3; distinct)."""
    try:
        subjects = parse_subjects(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1, 2 or 3, or a set such as 1,2,3") from None
    if not all(s in (1, 2, 3) for s in (subjects if isinstance(subjects, tuple) else (subjects,))):
        raise argparse.ArgumentTypeError(f"{text!r}: give 1, 2 or 3, or a set such as 1,2,3")
    return subjects


def stage_parser(stage: str, description: str | None) -> OneLineParser:
    parser = OneLineParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, prog=Path(sys.argv[0]).name
    )
    parser.add_argument("--profile", default="paper", help="paper (default), toy, smoke, or a path to a YAML file")
    parser.add_argument("--subj", type=subject_arg, help="subject (1, 2 or 3), or a subject set such as 1,2,3")
    parser.add_argument("--exp", help="experiment name: the run folder is <exp_root>/exp_<EXP>/subj_<SUBJ>/")
    parser.add_argument("--mode", choices=("enhance", "motion"), help="inference mode (stages 3-6, e)")
    add_set_argument(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--diff", metavar="PROFILE", help="print the resolved keys of every stage that differ between "
                        "--profile and PROFILE, then exit")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, not only its line")
    if stage in ("1", "2"):
        parser.add_argument("--resume", action="store_true", help="continue from checkpoints/last (train.resume)")
    return parser


def fixed_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``run`` keys that a stage's fixed arguments set (``None`` where not given)."""
    return {"subj": args.subj, "exp": args.exp, "mode": args.mode}


def close_progress_bars() -> None:
    """Close open tqdm bars (an error leaves them mid-line), so that the error line starts a line of its own."""
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(bars, "_instances", ())):
        bar.close()


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def log_to_files(line: str) -> None:
    """Write ``line`` (at level ERROR) to every log file of the root logger, e.g. the stage's own
    ``logs/stage<k>_<time>.log``, and not to the console, which has it already."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (line,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def print_error_line(line: str) -> None:
    """``line`` to stderr, and into the log files (the one line a failed command leaves behind)."""
    print(line, file=sys.stderr, flush=True)
    log_to_files(line)


def report_error(err: NeuronsError, debug: bool = False) -> int:
    """Print ``err`` as one line (after its traceback with ``debug`` or NEURONS_DEBUG=1), also into the log files;
    return its exit status."""
    close_progress_bars()
    if debug or debug_requested():
        traceback.print_exception(err, file=sys.stderr)
    print_error_line(f"error: {type(err).__name__}: {err.one_line()}")
    return err.exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop): handled like Ctrl-C, so training saves ``last`` before it exits."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_device(cfg: SharedConfig) -> None:
    """Refuse ``run.device=cuda`` (the driver sets it for GPU indices) where CUDA is absent, before any work."""
    if cfg.run.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        asked = f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""
        raise ConfigError(
            f"GPU requested{asked} but CUDA is not available on this machine",
            "use GPU 'cpu' in train_neurons.sh, or --set run.device=cpu",
        )


def print_profile_diff(profile: str, other: str, overrides: Sequence[str], cli: dict[str, Any]) -> None:
    """One line per resolved key that differs between two profiles, for every stage:
    ``stage<k> <section.key>: <value under profile> -> <value under other>``."""
    print(f"# resolved keys that differ: --profile {profile} -> {other}")
    for key, cls in STAGE_CONFIGS.items():
        for name, a, b in config_diff(cls, profile, other, overrides, cli):
            print(f"stage{key} {name}: {a!r} -> {b!r}")


def decoding_passes(cfg: C, stage: str) -> list[C]:
    """The configs that ``stage`` runs under: ``cfg``, or for a per-subject stage (3 to 6, e) of a subject set, one
    per subject with ``run.decode_subj`` set (each decodes its own test fMRI into ``subj_<set>/subj_<k>/``)."""
    run = cfg.run
    if not isinstance(run.subj, tuple) or run.decode_subj or not STAGE_BY_KEY[stage].mode_dependent:
        return [cfg]
    return [dataclasses.replace(cfg, run=dataclasses.replace(run, decode_subj=k)) for k in run.subjects]


def run_pass(cfg: C, stage: str, main: Callable[[C], None]) -> None:
    """Logging, the run lock and ``main(cfg)`` for one run folder."""
    paths = RunPaths.from_config(cfg)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch
    if main_process:
        setup_logging(cfg.run.log_level, None if os.environ.get(DRIVER_LOG_ENV) else stage_log_path(paths, stage))
    else:
        setup_logging("WARNING")
    log.info("stage %s (%s), run %s, profile %s, config %s", stage, STAGE_BY_KEY[stage].name, paths.root,
             cfg.run.profile, config_hash(cfg))  # fmt: skip
    with sigterm_as_interrupt(), run_lock(paths.root, stage) if main_process else contextlib.nullcontext():
        main(cfg)


def run_stage(
    config_class: type[C],
    main: Callable[[C], None],
    description: str | None = None,
    argv: Sequence[str] | None = None,
    parser: OneLineParser | None = None,
) -> int:
    """Parse arguments, build the stage's ``config_class`` (``Stage1Config``, ...), set up logging and the run lock,
    then call ``main(cfg)``."""
    stage = STAGE_KEY_OF[config_class]
    parser = parser or stage_parser(stage, description)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or debug_requested()
    try:
        overrides = [*args.overrides, *(["train.resume=true"] if getattr(args, "resume", False) else [])]
        if getattr(args, "init_from", None):
            overrides.append(f"train.init_from={Path(args.init_from).resolve()}")
        cfg = load_config(config_class, args.profile, overrides, fixed_args(args))
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if args.diff:
            print_profile_diff(args.profile, args.diff, overrides, fixed_args(args))
            return 0
        check_device(cfg)
        for one in decoding_passes(cfg, stage):
            run_pass(one, stage, main)
        return 0
    except NeuronsError as err:
        return report_error(err, debug)
    except KeyboardInterrupt as err:
        close_progress_bars()
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        what, code = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        resume = "rerun the stage with --resume to continue where it stopped" if stage in ("1", "2") else "rerun it"
        print_error_line(f"error: {what}; fix: {resume}")
        return code
    except Exception as err:  # a write that failed because the disk is full, outside the atomic writers
        problem = None if isinstance(err, PermissionError) else storage_error(err)  # EACCES may be a read
        if problem is None:
            raise  # a bug: the traceback is the useful report
        return report_error(problem, debug)


def add_data_root_args(parser: argparse.ArgumentParser) -> None:
    """``--data-root DIR``, or ``--profile`` (+ ``--set``) whose ``paths.data_root`` is used."""
    parser.add_argument("--data-root", type=Path, help="data folder (default: the profile's paths.data_root)")
    parser.add_argument("--profile", default="toy", help="profile giving paths.data_root (default toy)")
    add_set_argument(parser)


def data_root_of(args: argparse.Namespace) -> Path:
    if args.data_root is not None:
        return Path(args.data_root)
    try:
        return Path(load_config(Stage1Config, args.profile, args.overrides).paths.data_root)
    except NeuronsError as err:
        sys.exit(report_error(err))


def run_dir_of(argv: Sequence[str]) -> Path:
    """The run folder that a stage invoked with ``argv`` would use (the driver asks this before it runs anything)."""
    args = stage_parser("1", None).parse_args(argv)
    try:
        cfg = load_config(Stage1Config, args.profile, args.overrides, fixed_args(args))
    except NeuronsError as err:
        sys.exit(report_error(err))
    return RunPaths.from_config(cfg).root


def begin_stage(cfg: SharedConfig, stage: str, depends_on: Sequence[str] = ()) -> tuple[RunPaths, StageRecorder]:
    """Call once the inputs are validated: saves the resolved config and starts the stage's manifest."""
    paths = RunPaths.from_config(cfg)
    save_resolved_config(cfg, stage, paths)
    record = config_record(cfg)
    recorder = StageRecorder(stage, paths.stage_dir(stage), record["hash"], record["config"], depends_on)
    return paths, recorder.begin()
