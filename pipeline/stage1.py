"""Stage 1: train the brain model (ridge + MindEye2 backbone) to predict CLIP image tokens from fMRI (spec §3.4).

Per step: voxels of one repeat (alternating by epoch) → ridge → backbone → ``clip_vision_embeds (B, T, D)``; targets
are the CLIP image tokens of frame ``target_frame + epoch % 2``. Loss = BiMixCo NCE (τ_img) while
``epoch < mixup_pct · epochs`` (SoftCLIP afterwards) + ``text_weight`` · InfoNCE (τ_txt) between ``clipproj`` of the
prediction and the caption embedding. Model selection uses the held-out validation clips (never the test set):
brain→image + image→brain top-1 + caption top-5 retrieval; ``data.validation=test_upstream`` trains on every clip
and selects on the test clips, as upstream (defect 16; the manifest's ``selected_on`` says which).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.brain import NeuronsBrainModel
from models.configured import make_brain_config
from models.foundation import build_role, foundation_impl
from models.mindeye2_keymap import load_mindeye2, require_mindeye2
from models.sizes import STAGE1_PARTS
from pipeline.common import (
    CROSS_FIT_DIR,
    ClipTargets,
    adaptation_source,
    clip_targets,
    cross_fit_dir,
    foundation_dims,
    load_subject_set,
    require_foundation,
    uses_clip_cache,
)
from pipeline.loop import Trainer, fit, mean_over_subjects, prepare_training, subject_plan
from utils.baselines import identification_accuracy
from utils.checkpoint import load_checkpoint, load_parts, read_weights
from utils.cli import begin_stage
from utils.data import SubjectSet, selection_note, selection_split
from utils.errors import ConfigError, WeightsError
from utils.io import atomic_write_json
from utils.losses import mixco, mixco_nce, mixco_soft_labels, soft_clip_loss, softclip_temperature, symmetric_infonce
from utils.runs import RunPaths
from utils.stage_configs import Stage1Config
from utils.training import (
    AnyPlan,
    MetricsLog,
    SubjectBatchPlan,
    build_accelerator,
    gather_cat,
    seed_everything,
)

log = logging.getLogger(__name__)

FIELDS = ("voxel", "frames", "caption_emb")


@dataclass
class Stage1:
    """Everything one stage-1 run holds."""

    cfg: Stage1Config
    data: Any  # the stimuli: frames, captions and CLIP targets, the same clips for every subject
    subjects: SubjectSet  # the fMRI of each subject, in ridge order (one subject: a set of one)
    clip: Any  # the clip role (None with the CLIP-target cache at paper scale: bigG is then not needed at all)
    model: NeuronsBrainModel
    accelerator: Any
    out_dir: Path
    targets: ClipTargets


def setup(cfg: Stage1Config) -> Stage1:
    """Validate inputs and build the model (no output is touched here)."""
    subjects = load_subject_set(cfg, FIELDS)
    data = subjects.stimuli
    source = init_source(cfg) if cfg.train.init_from else None
    if cfg.train.init_from_mindeye2 and source is None:
        require_mindeye2(cfg.paths.weights_root)
    accelerator = build_accelerator(cfg)
    cached, impl = uses_clip_cache(cfg), foundation_impl(cfg.model.size)
    # with the cache the image tower never runs: the toy clip only gives its dims (on the CPU), bigG is not built
    clip = None
    if not (cached and impl == "paper"):
        require_foundation(cfg, ("clip",))
        clip = build_role("clip", impl, cfg.paths.weights_root, "cpu" if cached else accelerator.device)
    dims = foundation_dims(cfg, clip, data)
    needs = {"train": target_frames(cfg, data), "test": [cfg.train.target_frame]}  # test: final identification
    targets = clip_targets(cfg, data, clip, accelerator.device, needs)
    model = NeuronsBrainModel(make_brain_config(cfg, data, dims, STAGE1_PARTS, subjects.n_voxels))
    model.clipproj.proj.data.copy_(data.tokens_proj((dims.clip_dim, dims.text_dim)))
    if source is not None:
        load_shared_parts(model, source, cfg)
    elif cfg.train.init_from_mindeye2:
        load_mindeye2(cfg.paths.weights_root, model)
    return Stage1(cfg, data, subjects, clip, model, accelerator, RunPaths.from_config(cfg).stage_dir("1"), targets)


# ---- new-subject adaptation (train.init_from) -----------------------------------------------------------------------
SHARED_PARTS = tuple(p for p in STAGE1_PARTS if p != "ridge")  # what a subject set's model shares


def init_source(cfg: Stage1Config) -> Path:
    """The ``best`` stage-1 checkpoint of ``train.init_from`` (:func:`~pipeline.common.adaptation_source`)."""
    t = cfg.train
    if not 0 <= t.adapt_ridge_epochs < t.num_epochs:
        raise ConfigError(f"train.adapt_ridge_epochs {t.adapt_ridge_epochs} is not in [0, num_epochs {t.num_epochs})",
                          "leave epochs after the ridge-only phase for training everything")  # fmt: skip
    return adaptation_source(cfg, "1")


def load_shared_parts(model: NeuronsBrainModel, folder: Path, cfg: Stage1Config) -> None:
    """Strictly load every part after the ridge (:data:`SHARED_PARTS`) from a subject set's stage-1 checkpoint.

    Key map: ``<part>.<name>`` → the same key of this model, for every part but the ridge; the source's
    ``ridge.linears.<k>`` (its subjects) are dropped, and this model's ridge (the new subject) keeps its fresh
    initialisation: the only part not loaded.
    """
    tensors, meta = read_weights(folder)
    load_parts(model, tensors, SHARED_PARTS, f"train.init_from {folder}")
    extra = sorted(k for k in tensors if k.split(".")[0] not in STAGE1_PARTS)
    if extra:
        raise WeightsError(f"train.init_from {folder} has keys of no stage-1 part: {extra[:3]}",
                           "give the run folder of a stage-1 model")  # fmt: skip
    log.info("stage 1: %s and %s from %s (subjects %s); the ridge of subject %d is new", ", ".join(SHARED_PARTS[:-1]),
             SHARED_PARTS[-1], folder, meta.get("subj"), cfg.run.subject)  # fmt: skip


def lr_scale(s: Stage1, epoch: int) -> float:
    """The LR multiplier of ``epoch``: ``adapt_ridge_lr / max_lr`` in the ridge-only epochs of an adaptation, else
    1."""
    t = s.cfg.train
    if not t.init_from or epoch >= t.adapt_ridge_epochs or t.adapt_ridge_lr is None:
        return 1.0
    return t.adapt_ridge_lr / t.max_lr


def held_parameters(s: Stage1, epoch: int) -> list[torch.nn.Parameter]:
    """Parameters that epoch ``epoch`` leaves untouched: everything but the ridge during ``train.adapt_ridge_epochs``
    of an adaptation, else none."""
    if not s.cfg.train.init_from or epoch >= s.cfg.train.adapt_ridge_epochs:
        return []
    return [p for part in SHARED_PARTS for p in getattr(s.model, part).parameters()]


def target_frame(cfg: Stage1Config, data: Any, epoch: int) -> int:
    """The CLIP target frame of ``epoch``: ``target_frame``, alternating with the next one by epoch parity."""
    t = cfg.train
    return min(t.target_frame + (epoch % 2 if t.alternate_target_frame else 0), data.n_frames - 1)


def target_frames(cfg: Stage1Config, data: Any) -> list[int]:
    """Every training target frame of a run (what the CLIP-target cache must hold)."""
    return sorted({target_frame(cfg, data, epoch) for epoch in range(min(cfg.train.num_epochs, 2))})


def batch_plan(s: Stage1) -> AnyPlan:
    """The run's :func:`~pipeline.loop.subject_plan` over each subject's training clips."""
    n_train = tuple(m.n_clips("train") for m in s.subjects.members)
    return subject_plan(s.cfg, n_train, s.accelerator.num_processes)


@dataclass
class Groups:
    """The rows of a global batch by subject: ``slots[g]`` (ridge slot), its rows ``rows[g]`` (a slice of the global
    batch) and voxels ``voxels[g]`` (rows, V_slot), after MixCo when mixing."""

    slots: list[int]
    rows: list[slice]
    voxels: list[torch.Tensor]

    def encode(self, model: NeuronsBrainModel, keep: slice) -> torch.Tensor:
        """Predicted tokens (len(keep rows), T, D) of the global-batch rows ``keep``, each through its subject's
        ridge."""
        out = []
        for slot, rows, vox in zip(self.slots, self.rows, self.voxels):
            lo, hi = max(rows.start, keep.start), min(rows.stop, keep.stop)
            if lo < hi:
                out.append(model.encode(vox[lo - rows.start : hi - rows.start], slot))
        return torch.cat(out)


def batch_groups(s: Stage1, slots: np.ndarray, clips: np.ndarray, epoch: int, mixing: bool,
                 generator: torch.Generator) -> tuple[Groups, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """The global batch's voxels by subject (repeat ``epoch % R``, or their mean: ``train.voxel_repeats``); with
    ``mixing``, MixCo within each subject (the voxel spaces differ) with one generator, as one subject's whole batch.
    Returns (groups, perm, betas): perm indexes the global batch."""
    device, t = s.accelerator.device, s.cfg.train
    groups, perms, betas, start = Groups([], [], []), [], [], 0
    mean = t.voxel_repeats == "mean"
    for slot in dict.fromkeys(slots.tolist()):  # the plan orders rows slot by slot
        pick = slots == slot
        stop = start + int(pick.sum())
        vox = s.subjects.members[slot].voxels("train", epoch, mean, clips[pick]).to(device)  # (b, V_slot)
        if mixing:
            mixed = mixco(vox, t.bimixco_beta, t.bimixco_prob, generator)
            vox = mixed.voxels
            perms.append(mixed.perm + start)
            betas.append(mixed.betas)
        groups.slots.append(slot)
        groups.rows.append(slice(start, stop))
        groups.voxels.append(vox)
        start = stop
    return groups, (torch.cat(perms) if mixing else None), (torch.cat(betas) if mixing else None)


def step_loss(s: Stage1, plan: AnyPlan, epoch: int, batch: int, generator: torch.Generator) -> dict[str, Any]:
    """Losses of step ``batch`` of ``epoch``, computed on the global batch whatever the process count.

    Every process mixes the voxels of the whole global batch with the same generator (so BiMixCo partners do not
    depend on the process count), encodes its own share, and gathers predictions and targets for the losses.
    A subject set's batch holds every subject's clips (:func:`batch_plan`); each goes through its own ridge.
    """
    t, acc = s.cfg.train, s.accelerator
    glob, mine = plan.batch_at(epoch, batch), plan.share(acc.process_index)
    slots, clips = plan.decode(glob)
    with torch.no_grad():
        targets = gather_cat(acc, s.targets("train", clips[mine], target_frame(s.cfg, s.data, epoch)))  # (B, T, D)
    captions = s.data.caption_embeddings("train")[clips].to(acc.device)  # (B, Dt)
    mixing = epoch < t.mixup_pct * t.num_epochs
    groups, perm, betas = batch_groups(s, slots, clips, epoch, mixing, generator)
    preds = gather_cat(acc, groups.encode(s.model, mine))  # (B, T, D)
    labels = None
    if perm is not None and betas is not None:
        labels = mixco_soft_labels(perm, betas, t.mixco_self_partner_quirk).to(acc.device)
        image = mixco_nce(preds, targets, t.temp_image, perm, betas, True, t.mixco_self_partner_quirk)
    else:
        image = soft_clip_loss(preds, targets, softclip_temperature(epoch, t.num_epochs))
    text_labels = labels if (mixing and t.text_nce_soft_labels) else None  # hard labels upstream (defect 17)
    text = symmetric_infonce(s.model.text_embed(preds), captions, t.temp_text, text_labels)
    return {"image": image, "text": text, "loss": image + t.text_weight * text}


@torch.no_grad()
def evaluate(s: Stage1, split: str = "val", chunk: int = 100) -> dict[str, float]:
    """Retrieval scores of every subject (:func:`evaluate_subject`); a subject set's are their mean over subjects
    (the model selection's ``metric`` too), with each subject's as ``subj<k>/<score>``."""
    per = {m.subject: evaluate_subject(s, slot, split, chunk) for slot, m in enumerate(s.subjects.members)}
    return mean_over_subjects(per)


@torch.no_grad()
def evaluate_subject(s: Stage1, slot: int, split: str = "val", chunk: int = 100) -> dict[str, float]:
    """Retrieval within chunks of ``chunk`` clips (upstream used batches of 100) of the subject in ridge slot
    ``slot``: brain→image, image→brain top-1, and caption top-5 from ``clipproj`` of the prediction."""
    model, device, frame = s.model, s.accelerator.device, s.cfg.train.target_frame
    model.eval()
    n = s.data.n_clips(split)
    voxels = s.subjects.members[slot].voxels(split)
    hits = {"fwd_top1": 0.0, "bwd_top1": 0.0, "text_top5": 0.0}
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        preds = model.encode(voxels[idx].to(device), slot)  # (b, T, D)
        targets = s.targets(split, idx, frame)  # (b, T, D)
        sims = F.normalize(preds.flatten(1), dim=-1) @ F.normalize(targets.flatten(1), dim=-1).T  # (b, b)
        truth = torch.arange(len(idx), device=device)
        hits["fwd_top1"] += (sims.argmax(1) == truth).float().sum().item()
        hits["bwd_top1"] += (sims.argmax(0) == truth).float().sum().item()
        text = F.normalize(model.text_embed(preds), dim=-1)  # (b, Dt)
        caps = F.normalize(s.data.caption_embeddings(split)[idx].to(device), dim=-1)
        top5 = (text @ caps.T).topk(min(5, len(idx)), dim=1).indices
        hits["text_top5"] += (top5 == truth[:, None]).any(1).float().sum().item()
    model.train()
    scores = {k: v / n for k, v in hits.items()}
    scores["metric"] = scores["fwd_top1"] + scores["bwd_top1"] + scores["text_top5"]
    return scores


def train(cfg: Stage1Config) -> Path:
    """Run stage 1 (and its cross-fit models when ``data.cross_fit_folds`` is set); returns the stage folder."""
    check_cross_fit(cfg)
    seed_everything(cfg.run.seed)  # before the model is built: its initialisation is seeded too
    s = setup(cfg)
    plan = batch_plan(s)  # refused before any write
    _, recorder = begin_stage(cfg, "1")
    metrics = fit_model(s, plan)
    folds = [train_fold(cfg, k) for k in range(cfg.data.cross_fit_folds)]
    if s.accelerator.is_main_process:
        if folds:
            report_out_of_fold(s, folds)
        report_identification(s)
        finish_stage(s, recorder, metrics, folds)
    return s.out_dir


def fit_model(s: Stage1, plan: AnyPlan) -> MetricsLog:
    """Train ``s.model`` into ``s.out_dir`` (resumable; ``best`` by validation); returns the closed metrics log."""
    cfg, acc = s.cfg, s.accelerator
    t = cfg.train
    plan, opt, sched, metrics = prepare_training(cfg, "1", s.model, acc, s.data.n_clips("train"), s.out_dir, plan)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    step = lambda _idx, epoch, batch: step_loss(s, plan, epoch, batch, gen)  # noqa: E731
    select_on = selection_split(cfg.data)
    trainer = Trainer(cfg, s.model, acc, s.out_dir, step, lambda: evaluate(s, select_on), {"mixco": gen}, select_on,
                      lambda epoch: held_parameters(s, epoch), lambda epoch: lr_scale(s, epoch))  # fmt: skip
    log.info("stage 1: %s train clips, %d val, %d steps/epoch x %d epochs, %d processes; selection on %s",
             plan.n_items, s.data.n_clips("val"), plan.steps_per_epoch, t.num_epochs, acc.num_processes,
             selection_note(cfg.data))  # fmt: skip
    if isinstance(plan, SubjectBatchPlan):
        log.info("stage 1: subjects %s, one ridge each; every global batch of %d clips holds %s (proportion %s); "
                 "validation and selection on the mean over subjects", cfg.run.subj_text, plan.global_batch,
                 ", ".join(f"{plan.per_subject} of subject {k}" for k in s.subjects.subjects),
                 " / ".join(f"{p:.3f}" for p in plan.proportions.values()))  # fmt: skip
    try:
        fit(trainer, plan, opt, sched, metrics)
    finally:
        metrics.close()
    return metrics


# ---- cross-fit models (data.cross_fit_folds) ------------------------------------------------------------------------
def check_cross_fit(cfg: Stage1Config) -> None:
    """Refuse cross-fit settings that cannot work, before anything is written."""
    d = cfg.data
    if d.cross_fit_fold >= 0:
        raise ConfigError(f"data.cross_fit_fold={d.cross_fit_fold} is set by stage 1 for its fold models",
                          "leave it at -1; data.cross_fit_folds sets the number of folds")  # fmt: skip
    if d.cross_fit_folds == 1 or d.cross_fit_folds < 0:
        raise ConfigError(f"data.cross_fit_folds={d.cross_fit_folds}", "give 0 (off) or at least 2 folds")


def fold_config(cfg: Stage1Config, fold: int) -> Stage1Config:
    """The config of cross-fit model ``fold``: the run's, with that fold of the training clips left out."""
    return replace(cfg, data=replace(cfg.data, cross_fit_fold=fold))


def train_fold(cfg: Stage1Config, fold: int) -> Path:
    """Train cross-fit model ``fold`` (same recipe and seed, without the fold's clips and their guard clips) into
    ``stage1/cross_fit/fold_<k>``; returns that folder."""
    fcfg = fold_config(cfg, fold)
    seed_everything(cfg.run.seed)
    s = setup(fcfg)
    s = replace(s, out_dir=cross_fit_dir(s.out_dir, fold))
    log.info("stage 1: cross-fit model %d of %d on %d of the training clips", fold + 1, cfg.data.cross_fit_folds,
             s.data.n_clips("train"))  # fmt: skip
    fit_model(s, batch_plan(s))
    return s.out_dir


@torch.no_grad()
def encode_split(s: Stage1, split: str, slot: int, idx: np.ndarray) -> torch.Tensor:
    """``s.model``'s tokens, flattened (n, T*D) float32 on the CPU, of clips ``idx`` of ``split`` (ridge slot
    ``slot``)."""
    s.model.eval()
    voxels = s.subjects.members[slot].voxels(split, clips=idx)
    out = [s.model.encode(voxels[a : a + 100].to(s.accelerator.device), slot).flatten(1).float().cpu()
           for a in range(0, len(idx), 100)]  # fmt: skip
    s.model.train()
    return torch.cat(out)


def report_out_of_fold(s: Stage1, folds: list[Path]) -> Path:
    """Identification on the TRAINING clips of every subject, by the full model (in sample: what stage 2 reads
    without cross-fitting) and by the fold models, each on the clips it left out (out of fold: what stage 2 reads
    with ``condition_source=cross_fit``) → ``stage1/cross_fit/identification.json``."""
    model = s.accelerator.unwrap_model(s.model)
    positions, frame = s.data.cross_fit_indices(), s.cfg.train.target_frame
    n = s.data.n_clips("train")
    targets = torch.cat([s.targets("train", list(range(a, min(a + 100, n))), frame).flatten(1).cpu()
                         for a in range(0, n, 100)]).numpy()  # fmt: skip
    slots = range(len(s.subjects.members))
    load_checkpoint(s.out_dir / "checkpoints" / "best", model, s.cfg)
    inside = {slot: encode_split(s, "train", slot, np.arange(n)).numpy() for slot in slots}
    oof = {slot: np.zeros_like(x) for slot, x in inside.items()}
    for k, folder in enumerate(folds):  # each fold model loaded once, for every subject
        load_checkpoint(folder / "checkpoints" / "best", model, fold_config(s.cfg, k))
        for slot in slots:
            oof[slot][positions[k]] = encode_split(s, "train", slot, positions[k]).numpy()
    out: dict[str, Any] = {"folds": [f.name for f in folds], "subjects": {}}
    for slot, m in enumerate(s.subjects.members):
        scores = {name: identification_accuracy(x[slot], targets, (2, 50), 200, 0)
                  for name, x in (("in_sample", inside), ("out_of_fold", oof))}  # fmt: skip
        out["subjects"][str(m.subject)] = scores
        for kind, result in scores.items():
            log.info("subject %d, training clips, %s identification top-1: %s", m.subject, kind.replace("_", " "),
                     ", ".join(f"{k} {v:.3f}" for k, v in result["top1"].items()))  # fmt: skip
    return atomic_write_json(s.out_dir / CROSS_FIT_DIR / "identification.json", out)


@torch.no_grad()
def identification(s: Stage1, split: str, ways=(2, 50), seed: int = 0, slot: int = 0) -> dict[str, Any]:
    """Clip identification from the predicted CLIP tokens of the subject in ridge slot ``slot`` (brain→image,
    correlation), as the ridge baseline and the toy world's noise ceiling score it: each clip's prediction against
    its own and ``w-1`` other clips' targets."""
    s.model.eval()
    preds, targets = [], []
    voxels, frame = s.subjects.members[slot].voxels(split), s.cfg.train.target_frame
    for start in range(0, s.data.n_clips(split), 100):
        idx = list(range(start, min(start + 100, s.data.n_clips(split))))
        preds.append(s.model.encode(voxels[idx].to(s.accelerator.device), slot).flatten(1).float().cpu())
        targets.append(s.targets(split, idx, frame).flatten(1).cpu())
    s.model.train()
    return identification_accuracy(torch.cat(preds).numpy(), torch.cat(targets).numpy(), ways, 200, seed)


def report_identification(s: Stage1) -> Path:
    """Score the ``best`` checkpoint on the validation and the test clips (reported, never used for selection).
    One subject: ``{split: scores}``; a subject set: ``{"subjects": {"<k>": {split: scores}}}``."""
    load_checkpoint(s.out_dir / "checkpoints" / "best", s.accelerator.unwrap_model(s.model), s.cfg)
    splits = [split for split in ("val", "test") if s.data.n_clips(split)]
    per = {m.subject: {split: identification(s, split, slot=slot) for split in splits}
           for slot, m in enumerate(s.subjects.members)}  # fmt: skip
    for subj, result in per.items():
        for split, scores in result.items():
            log.info("best checkpoint, subject %d, %s identification top-1: %s", subj, split,
                     ", ".join(f"{k} {v:.3f}" for k, v in scores["top1"].items()))  # fmt: skip
    out = next(iter(per.values())) if len(per) == 1 else {"subjects": {str(k): v for k, v in per.items()}}
    return atomic_write_json(s.out_dir / "identification.json", out)


def finish_stage(s: Stage1, recorder, metrics: MetricsLog, folds: list[Path]) -> None:
    curves = metrics.plot(s.out_dir / "curves.png")
    recorder.add_inputs(s.subjects.opened_files)
    for name in ("best", "last"):
        recorder.add_output(s.out_dir / "checkpoints" / name / "model.safetensors")
    for folder in folds:
        recorder.add_output(folder / "checkpoints" / "best" / "model.safetensors")
    if folds:
        recorder.add_output(s.out_dir / CROSS_FIT_DIR / "identification.json")
    recorder.add_output(metrics.path)
    recorder.add_output(s.out_dir / "identification.json")
    recorder.add_output(curves)
    recorder.extra.update({"selected_on": selection_note(s.cfg.data), "train_clips": s.data.n_clips("train"),
                           "subjects": list(s.subjects.subjects)})  # fmt: skip
    if s.cfg.train.init_from:
        t = s.cfg.train
        recorder.extra.update({"init_from": str(init_source(s.cfg)), "adapt_ridge_epochs": t.adapt_ridge_epochs,
                               "train_fraction": s.cfg.data.train_fraction})  # fmt: skip
    recorder.finish()
