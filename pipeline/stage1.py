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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.brain import NeuronsBrainModel
from models.configured import make_brain_config
from models.foundation import build_role, foundation_impl
from models.mindeye2_keymap import load_mindeye2, require_mindeye2
from models.sizes import STAGE1_PARTS
from pipeline.common import (
    ClipTargets,
    clip_targets,
    foundation_dims,
    load_data,
    require_foundation,
    uses_clip_cache,
)
from pipeline.loop import Trainer, fit, prepare_training
from utils.baselines import identification_accuracy
from utils.checkpoint import load_checkpoint
from utils.cli import begin_stage
from utils.data import selection_note, selection_split
from utils.io import atomic_write_json
from utils.losses import mixco, mixco_nce, mixco_soft_labels, soft_clip_loss, softclip_temperature, symmetric_infonce
from utils.runs import RunPaths
from utils.stage_configs import Stage1Config
from utils.training import (
    BatchPlan,
    MetricsLog,
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
    data: Any
    clip: Any  # the clip role (None with the CLIP-target cache at paper scale: bigG is then not needed at all)
    model: NeuronsBrainModel
    accelerator: Any
    out_dir: Path
    targets: ClipTargets


def setup(cfg: Stage1Config) -> Stage1:
    """Validate inputs and build the model (no output is touched here)."""
    data = load_data(cfg, FIELDS)
    if cfg.train.init_from_mindeye2:
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
    model = NeuronsBrainModel(make_brain_config(cfg, data, dims, STAGE1_PARTS))
    model.clipproj.proj.data.copy_(data.tokens_proj((dims.clip_dim, dims.text_dim)))
    if cfg.train.init_from_mindeye2:
        load_mindeye2(cfg.paths.weights_root, model)
    return Stage1(cfg, data, clip, model, accelerator, RunPaths.from_config(cfg).stage_dir("1"), targets)


def target_frame(cfg: Stage1Config, data: Any, epoch: int) -> int:
    """The CLIP target frame of ``epoch``: ``target_frame``, alternating with the next one by epoch parity."""
    t = cfg.train
    return min(t.target_frame + (epoch % 2 if t.alternate_target_frame else 0), data.n_frames - 1)


def target_frames(cfg: Stage1Config, data: Any) -> list[int]:
    """Every training target frame of a run (what the CLIP-target cache must hold)."""
    return sorted({target_frame(cfg, data, epoch) for epoch in range(min(cfg.train.num_epochs, 2))})


def step_loss(s: Stage1, plan: BatchPlan, epoch: int, batch: int, generator: torch.Generator) -> dict[str, Any]:
    """Losses of step ``batch`` of ``epoch``, computed on the global batch whatever the process count.

    Every process mixes the voxels of the whole global batch with the same generator (so BiMixCo partners do not
    depend on the process count), encodes its own share, and gathers predictions and targets for the losses.
    """
    t, acc = s.cfg.train, s.accelerator
    glob, mine = plan.batch_at(epoch, batch), plan.share(acc.process_index)
    voxels = s.data.voxels("train", epoch)[glob].to(acc.device)  # (B, V), repeat epoch % R
    with torch.no_grad():
        targets = gather_cat(acc, s.targets("train", glob[mine], target_frame(s.cfg, s.data, epoch)))  # (B, T, D)
    captions = s.data.caption_embeddings("train")[glob].to(acc.device)  # (B, Dt)
    mixing = epoch < t.mixup_pct * t.num_epochs
    labels = None
    if mixing:
        mixed = mixco(voxels, t.bimixco_beta, t.bimixco_prob, generator)
        voxels = mixed.voxels
        labels = mixco_soft_labels(mixed.perm, mixed.betas, t.mixco_self_partner_quirk).to(acc.device)
    preds = gather_cat(acc, s.model.encode(voxels[mine]))  # (B, T, D)
    if mixing:
        image = mixco_nce(preds, targets, t.temp_image, mixed.perm, mixed.betas, True, t.mixco_self_partner_quirk)
    else:
        image = soft_clip_loss(preds, targets, softclip_temperature(epoch, t.num_epochs))
    text_labels = labels if (mixing and t.text_nce_soft_labels) else None  # hard labels upstream (defect 17)
    text = symmetric_infonce(s.model.text_embed(preds), captions, t.temp_text, text_labels)
    return {"image": image, "text": text, "loss": image + t.text_weight * text}


@torch.no_grad()
def evaluate(s: Stage1, split: str = "val", chunk: int = 100) -> dict[str, float]:
    """Retrieval within chunks of ``chunk`` clips (upstream used batches of 100): brain→image, image→brain top-1,
    and caption top-5 from ``clipproj`` of the prediction."""
    model, device, frame = s.model, s.accelerator.device, s.cfg.train.target_frame
    model.eval()
    n = s.data.n_clips(split)
    voxels = s.data.voxels(split)
    hits = {"fwd_top1": 0.0, "bwd_top1": 0.0, "text_top5": 0.0}
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        preds = model.encode(voxels[idx].to(device))  # (b, T, D)
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
    """Run stage 1; returns the stage folder."""
    seed_everything(cfg.run.seed)  # before the model is built: its initialisation is seeded too
    s = setup(cfg)
    BatchPlan(s.data.n_clips("train"), cfg.train.batch_size, s.accelerator.num_processes)  # refused before any write
    _, recorder = begin_stage(cfg, "1")
    t, acc = cfg.train, s.accelerator
    plan, opt, sched, metrics = prepare_training(cfg, "1", s.model, acc, s.data.n_clips("train"), s.out_dir)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    step = lambda _idx, epoch, batch: step_loss(s, plan, epoch, batch, gen)  # noqa: E731
    select_on = selection_split(cfg.data)
    trainer = Trainer(cfg, s.model, acc, s.out_dir, step, lambda: evaluate(s, select_on), {"mixco": gen}, select_on)
    log.info("stage 1: %d train clips, %d val, %d steps/epoch x %d epochs, %d processes; selection on %s",
             plan.n_items, s.data.n_clips("val"), plan.steps_per_epoch, t.num_epochs, acc.num_processes,
             selection_note(cfg.data))  # fmt: skip
    try:
        fit(trainer, plan, opt, sched, metrics)
    finally:
        metrics.close()
    if acc.is_main_process:
        report_identification(s)
        finish_stage(s, recorder, metrics)
    return s.out_dir


@torch.no_grad()
def identification(s: Stage1, split: str, ways=(2, 50), seed: int = 0) -> dict[str, Any]:
    """Clip identification from the predicted CLIP tokens (brain→image, correlation), as the ridge baseline and the
    toy world's noise ceiling score it: each clip's prediction against its own and ``w-1`` other clips' targets."""
    s.model.eval()
    preds, targets = [], []
    voxels, frame = s.data.voxels(split), s.cfg.train.target_frame
    for start in range(0, s.data.n_clips(split), 100):
        idx = list(range(start, min(start + 100, s.data.n_clips(split))))
        preds.append(s.model.encode(voxels[idx].to(s.accelerator.device)).flatten(1).float().cpu())
        targets.append(s.targets(split, idx, frame).flatten(1).cpu())
    s.model.train()
    return identification_accuracy(torch.cat(preds).numpy(), torch.cat(targets).numpy(), ways, 200, seed)


def report_identification(s: Stage1) -> Path:
    """Score the ``best`` checkpoint on the validation and the test clips (reported, never used for selection)."""
    load_checkpoint(s.out_dir / "checkpoints" / "best", s.accelerator.unwrap_model(s.model), s.cfg)
    result = {split: identification(s, split) for split in ("val", "test") if s.data.n_clips(split)}
    for split, scores in result.items():
        log.info("best checkpoint, %s identification top-1: %s", split,
                 ", ".join(f"{k} {v:.3f}" for k, v in scores["top1"].items()))  # fmt: skip
    return atomic_write_json(s.out_dir / "identification.json", result)


def finish_stage(s: Stage1, recorder, metrics: MetricsLog) -> None:
    curves = metrics.plot(s.out_dir / "curves.png")
    recorder.add_inputs(s.data.opened_files)
    for name in ("best", "last"):
        recorder.add_output(s.out_dir / "checkpoints" / name / "model.safetensors")
    recorder.add_output(metrics.path)
    recorder.add_output(s.out_dir / "identification.json")
    recorder.add_output(curves)
    recorder.extra.update({"selected_on": selection_note(s.cfg.data), "train_clips": s.data.n_clips("train")})
    recorder.finish()
