"""The training loop shared by stages 1 and 2: progress, checkpoints with exact resume, epochs, selection.

A stage supplies a :class:`Trainer`: its model, accelerator, output folder, config, the named torch generators its
losses draw from, a ``step_loss(idx, epoch, batch)`` function (a dict of scalars, the total under ``"loss"``) and an
``evaluate()`` function (a dict of floats with the selection score under ``"metric"``). :func:`fit` then runs the
epochs: optimiser steps on the :class:`~utils.training.BatchPlan` batches, a validation pass per epoch, ``best`` when
the metric improves, ``last`` after every epoch (and on Ctrl-C), and resumes exactly from ``last`` — mid-epoch
included — when ``train.resume`` is set: weights, optimizer, scheduler, the global torch RNG and every named
generator are restored, and ``metrics.jsonl`` is cut back to the resumed step.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.brain import NeuronsBrainModel
from utils.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from utils.errors import ConfigError, TrainingError, WeightsError
from utils.stage_configs import Stage1Config, Stage2Config
from utils.training import (
    AnyPlan,
    BatchPlan,
    MetricsLog,
    SubjectBatchPlan,
    autocast,
    average_gradients,
    build_optimizer,
    one_cycle,
    prepare_deepspeed,
    start_wandb,
    uses_deepspeed,
)

log = logging.getLogger(__name__)

TrainingConfig = Stage1Config | Stage2Config  # the stages that train through fit()
StepFn = Callable[[Any, int, int], Mapping[str, Any]]  # (clip indices, epoch, batch index) -> losses
EvalFn = Callable[[], dict[str, float]]


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0  # current epoch
    batch: int = 0  # batches of ``epoch`` already done
    step: int = 0  # optimiser steps so far
    best: float = float("-inf")  # best validation metric
    rng: dict[str, Any] | None = field(default=None, repr=False)  # RNG states at the start of an unfinished step


@dataclass
class Trainer:
    """What :func:`fit` needs from a stage. ``generators`` are saved/restored as ``<name>_rng``."""

    cfg: TrainingConfig
    model: torch.nn.Module
    accelerator: Any
    out_dir: Path
    step_loss: StepFn
    evaluate: EvalFn
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    eval_split: str = "val"  # the split evaluate() scores (metrics.jsonl "split"); "test" under test_upstream
    # parameters an epoch leaves untouched (their gradients dropped before the step, so AdamW skips them entirely)
    held: Callable[[int], list[torch.nn.Parameter]] = lambda _epoch: []  # noqa: E731
    # a multiplier of the scheduled LR by epoch (stage 1's ridge-only adaptation epochs: train.adapt_ridge_lr)
    lr_scale: Callable[[int], float] = lambda _epoch: 1.0  # noqa: E731


def save(tr: Trainer, name: str, opt, sched, prog: Progress) -> None:
    """Write ``checkpoints/<name>`` (the whole model, optimizer, scheduler, progress and RNG states). Under DeepSpeed
    every process first writes its ZeRO partition of the optimizer state to ``checkpoints/<name>.deepspeed``."""
    zero = save_zero_state(tr, name, prog) if uses_deepspeed(tr.accelerator) else None
    if not tr.accelerator.is_main_process:
        return
    state = {
        "epoch": prog.epoch,
        "batch": prog.batch,
        "step": prog.step,
        "best": prog.best,
        "optimizer": None if zero else opt.state_dict(),
        "deepspeed": zero,
        "scheduler": sched.state_dict(),
        **(prog.rng or rng_states(tr)),  # an interrupted step is redone from its starting RNG states
    }
    weights = untie(tr.accelerator.unwrap_model(tr.model).state_dict())
    save_checkpoint(tr.out_dir / "checkpoints" / name, weights, tr.cfg, state)
    if zero:
        for old in (tr.out_dir / "checkpoints" / zero["dir"]).iterdir():
            if old.name != zero["tag"] and old.is_dir():  # earlier saves; the new one is complete
                shutil.rmtree(old, ignore_errors=True)


def save_zero_state(tr: Trainer, name: str, prog: Progress) -> dict[str, Any]:
    """Every process saves its optimizer partition (DeepSpeed's own format) under a new tag; returns where."""
    folder, tag = f"{name}.deepspeed", f"step{prog.step}_batch{prog.batch}"
    engine = tr.accelerator.deepspeed_engine_wrapped.engine
    engine.save_checkpoint(str(tr.out_dir / "checkpoints" / folder), tag=tag, save_latest=False,
                           exclude_frozen_parameters=True)  # fmt: skip
    tr.accelerator.wait_for_everyone()
    return {"dir": folder, "tag": tag, "processes": tr.accelerator.num_processes}


def load_optimizer(tr: Trainer, opt, state: Mapping[str, Any], last: Path) -> None:
    """The optimizer state of ``last``: AdamW's own, or the ZeRO partitions of a DeepSpeed run (same process count)."""
    zero, deepspeed = state.get("deepspeed"), uses_deepspeed(tr.accelerator)
    if not deepspeed and zero is None:
        opt.load_state_dict(state["optimizer"])
        return
    if not (deepspeed and zero):
        saved, now = ("with", "without") if zero else ("without", "with")
        raise ConfigError(
            f"{last} was saved {saved} DeepSpeed; this launch runs {now} it",
            "resume with the launch config the run started with, or start afresh without --resume",
        )
    if zero["processes"] != tr.accelerator.num_processes:
        raise ConfigError(
            f"{last} holds ZeRO partitions of {zero['processes']} processes; this launch has "
            f"{tr.accelerator.num_processes}",
            f"resume with --num_processes {zero['processes']}",
        )
    engine = tr.accelerator.deepspeed_engine_wrapped.engine
    # The module weights were already loaded strictly from ``last`` (utils.checkpoint); DeepSpeed's copy leaves out
    # the frozen parameters (exclude_frozen_parameters in save_zero_state), so its own module load cannot be strict.
    engine.load_checkpoint(str(last.parent / zero["dir"]), tag=zero["tag"], load_optimizer_states=True,
                           load_lr_scheduler_states=False, load_module_strict=False)  # fmt: skip


def rng_states(tr: Trainer) -> dict[str, Any]:
    """The global CPU (and CUDA) RNG states and every named generator's state."""
    states: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states | {f"{k}_rng": g.get_state() for k, g in tr.generators.items()}


def set_rng_states(tr: Trainer, state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and len(state.get("cuda_rng", ())) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for name, gen in tr.generators.items():
        gen.set_state(state[f"{name}_rng"])


def untie(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share memory with an earlier entry (GPT-2 ties ``lm_head`` to ``wte``; safetensors
    refuses shared tensors). Loading writes the same values into the tied parameter twice."""
    seen: set[tuple[int, int | torch.SymInt]] = set()
    out = {}
    for name, value in state_dict.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[name] = value.clone() if key in seen else value
        seen.add(key)
    return out


def restore(tr: Trainer, opt, sched, metrics: MetricsLog) -> Progress:
    """Continue from ``checkpoints/last`` when ``train.resume`` is set and it exists; else start afresh."""
    last = tr.out_dir / "checkpoints" / "last"
    if not tr.cfg.train.resume:
        metrics.path.unlink(missing_ok=True)
        return Progress()
    try:
        resolve_checkpoint(last)
    except WeightsError:
        log.info("train.resume is set but there is no checkpoint yet; starting from scratch")
        metrics.path.unlink(missing_ok=True)
        return Progress()
    state = load_checkpoint(last, tr.accelerator.unwrap_model(tr.model), tr.cfg)
    load_optimizer(tr, opt, state, last)
    sched.load_state_dict(state["scheduler"])
    set_rng_states(tr, state)
    prog = Progress(state["epoch"], state["batch"], state["step"], state["best"])
    metrics.truncate_after(prog.step)
    log.info("resuming from %s: epoch %d, batch %d, step %d", last, prog.epoch, prog.batch, prog.step)
    return prog


def _record(losses: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}


def check_finite(tr: Trainer, losses: Mapping[str, Any], prog: Progress, batch: int) -> None:
    """Stop before a NaN/Inf loss reaches the weights; ``last`` on disk is the previous good checkpoint."""
    total = losses["loss"]
    if bool(torch.isfinite(total.detach() if isinstance(total, torch.Tensor) else torch.tensor(total)).all()):
        return
    terms = ", ".join(f"{k} {v:.4g}" for k, v in _record(losses).items())
    last = tr.out_dir / "checkpoints" / "last"
    kept = f"the last good checkpoint {last} is kept" if last.is_dir() else "no checkpoint had been saved yet"
    raise TrainingError(
        f"non-finite loss at step {prog.step + 1} (epoch {prog.epoch}, batch {batch}): {terms}; {kept}",
        "lower train.max_lr or set train.grad_clip (and check the inputs), then rerun the stage or continue "
        "from that checkpoint with --resume",
    )


def train_epoch(tr: Trainer, plan: AnyPlan, opt, sched, prog: Progress, metrics: MetricsLog) -> None:
    """One epoch of optimiser steps, skipping the batches a resumed run has already done."""
    t, acc = tr.cfg.train, tr.accelerator
    bar = tqdm(total=plan.steps_per_epoch, initial=prog.batch, desc=f"epoch {prog.epoch}", unit="step",
               disable=not acc.is_main_process, mininterval=2, leave=False)  # fmt: skip
    for i, idx in enumerate(plan.batches(prog.epoch, acc.process_index)):
        if i < prog.batch:  # resumed mid-epoch
            continue
        prog.rng = rng_states(tr)
        with autocast(acc, tr.cfg):
            losses = tr.step_loss(idx, prog.epoch, i)
        check_finite(tr, losses, prog, i)
        opt.zero_grad(set_to_none=True)
        acc.backward(losses["loss"])  # under DeepSpeed the engine also reduces, clips and steps here
        if not uses_deepspeed(acc):
            average_gradients(acc, tr.model.parameters())
            for p in tr.held(prog.epoch):
                p.grad = None
            if t.grad_clip is not None:
                acc.clip_grad_norm_(tr.model.parameters(), t.grad_clip)
        scale_lr(opt, tr.lr_scale(prog.epoch))  # this step only: the scheduler's next step sets its own LR again
        opt.step()  # a no-op under DeepSpeed
        sched.step()
        prog.batch, prog.step, prog.rng = i + 1, prog.step + 1, None
        bar.update(1)
        rate = bar.format_dict.get("rate") or 0.0  # steps per second
        loss = float(losses["loss"].detach())
        bar.set_postfix(loss=f"{loss:.4f}", clips_s=f"{plan.global_batch * rate:.1f}", refresh=False)
        if acc.is_main_process and (prog.step % t.log_every == 0 or prog.batch == plan.steps_per_epoch):
            record = {"split": "train", "step": prog.step, "epoch": prog.epoch, "lr": sched.get_last_lr()[0]}
            if tr.lr_scale(prog.epoch) != 1.0:  # the scheduled LR times this epoch's multiplier
                record["lr_scale"] = tr.lr_scale(prog.epoch)
            metrics.write({**record, **_record(losses)})
    bar.close()


def mean_over_subjects(per: Mapping[int, dict[str, float]]) -> dict[str, float]:
    """Validation scores of a run from each subject's (subject → scores): one subject's as they are; a subject
    set's mean over subjects (the selection ``metric`` too), with each subject's beside it as ``subj<k>/<score>``."""
    if len(per) == 1:
        return dict(next(iter(per.values())))
    first = next(iter(per.values()))
    scores = {k: sum(v[k] for v in per.values()) / len(per) for k in first}
    scores.update({f"subj{subj}/{k}": v for subj, sc in per.items() for k, v in sc.items() if k != "metric"})
    return scores


def scale_lr(opt, scale: float) -> None:
    """Multiply every parameter group's LR by ``scale`` (1: nothing). The schedules recompute the LR from the step
    count (OneCycleLR, LambdaLR), so the scaling lasts until the next ``sched.step()``."""
    if scale != 1.0:
        for group in opt.param_groups:
            group["lr"] *= scale


def subject_plan(cfg: TrainingConfig, n_train: tuple[int, ...], num_processes: int) -> AnyPlan:
    """The batch plan of a run whose ridge slots have ``n_train`` training clips each: one subject, a
    :class:`BatchPlan`; a subject set, a :class:`SubjectBatchPlan` whose every global batch holds the same number of
    clips of each subject (refused when ``train.batch_size`` does not split evenly)."""
    t = cfg.train
    if len(n_train) == 1:
        return BatchPlan(n_train[0], t.batch_size, num_processes, cfg.run.seed, t.drop_last)
    return SubjectBatchPlan.equal_shares(n_train, t.batch_size, num_processes, cfg.run.seed)


def prepare_training(
    cfg: TrainingConfig, stage: str, model: NeuronsBrainModel, accelerator: Any, n_train: int, out_dir: Path,
    plan: AnyPlan | None = None, on_cpu: tuple[str, ...] = (),
) -> tuple[AnyPlan, Any, torch.optim.lr_scheduler.LRScheduler, MetricsLog]:  # fmt: skip
    """The batch plan, AdamW over the trainable parameters, the LR schedule and the metrics log of a stage.

    The model is moved to the device, except its parts named in ``on_cpu`` (frozen parts that no step runs, e.g.
    stage 2's ridge and backbone under its condition cache; a DeepSpeed engine moves everything). It is not
    DDP-wrapped: stages call several of its methods per step, so gradients are averaged explicitly after the backward
    pass (:func:`utils.training.average_gradients`).
    """
    t = cfg.train
    if plan is None:  # ``plan``: a subject set's (:func:`subject_plan`)
        plan = BatchPlan(n_train, t.batch_size, accelerator.num_processes, cfg.run.seed, t.drop_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, t)  # train.adamw_impl
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    sched = one_cycle(opt, t, plan.steps_per_epoch * t.num_epochs)
    for name, child in model.named_children():
        if name not in on_cpu:
            child.to(accelerator.device)
    for tensor in [*model.parameters(recurse=False), *model.buffers(recurse=False)]:
        tensor.data = tensor.data.to(accelerator.device)
    wandb_run = start_wandb(cfg, stage, out_dir) if accelerator.is_main_process else None
    if uses_deepspeed(accelerator):  # the engine wraps the model; the stages keep calling the module's methods
        _, opt, sched = prepare_deepspeed(accelerator, model, opt, sched, plan.global_batch, t)
        return plan, opt, sched, MetricsLog(out_dir / "metrics.jsonl", wandb_run)
    return plan, accelerator.prepare(opt), sched, MetricsLog(out_dir / "metrics.jsonl", wandb_run)


def fit(tr: Trainer, plan: AnyPlan, opt, sched, metrics: MetricsLog) -> Progress:
    """All epochs from wherever :func:`restore` says, with validation, ``best`` and ``last`` checkpoints."""
    t, acc = tr.cfg.train, tr.accelerator
    prog = restore(tr, opt, sched, metrics)
    try:
        while prog.epoch < t.num_epochs:
            train_epoch(tr, plan, opt, sched, prog, metrics)
            scores = tr.evaluate()
            if acc.is_main_process:
                metrics.write({"split": tr.eval_split, "step": prog.step, "epoch": prog.epoch, **scores})
                log.info("epoch %d: %s", prog.epoch, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            if scores["metric"] > prog.best:
                prog.best = scores["metric"]
                save(tr, "best", opt, sched, prog)
            prog.epoch, prog.batch = prog.epoch + 1, 0
            save(tr, "last", opt, sched, prog)
            acc.wait_for_everyone()
    except KeyboardInterrupt:
        save(tr, "last", opt, sched, prog)
        log.info("interrupted: saved %s at step %d", tr.out_dir / "checkpoints" / "last", prog.step)
        raise
    return prog
