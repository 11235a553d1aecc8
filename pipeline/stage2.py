"""Stage 2: the decoupled task heads ("neurons_decoupler", spec §3.5) on top of the frozen stage-1 brain model.

Initialisation: the stage-1 BEST checkpoint gives ``ridge``, ``backbone`` and ``clipproj`` (all frozen, kept in eval
mode); the paper profile starts the diffusion prior from MindEye2's ``last.pth`` (``train.init_from_mindeye2``);
``motion_proj``, ``classifier`` and ``text_seg_dec`` are fresh; ``text_dec`` wraps the pretrained gpt2 role's model
(fine-tuned, with a fresh prefix projection).

Per step on B clips (voxels of repeat ``voxel_repeat``; T = CLIP tokens, D = width, F = frames):
``c = encode(voxels)`` (B, T, D) frozen → ``prior_mse, P = prior(c, CLIP tokens of frame target_frame)`` →
``M = motion(P)`` (B, F, T, D), then

* video_softclip: SoftCLIP over the B·F frame vectors of M vs the CLIP tokens of every frame (τ cosine ramp by epoch);
* text_nce: symmetric InfoNCE of ``text_embed(M)`` vs the caption embeddings (τ ``temp_text``);
* dice: key-object masks ``decode_masks(M, text_pooled(key-object name))`` vs the GT masks (nearest-resized to the
  decoder size), per clip (``upstream.dice_reduction=batch`` for the upstream whole-batch Dice);
* concepts: BCE of ``concept_logits(M)`` vs the multi-hot concept labels;
* caption: label-smoothed GPT-2 cross-entropy, prefix ``normalize(text_embed(M))``, on the caption's CLIP-BPE ids
  (the paper feeds CLIP ids straight into GPT-2's ``wte``; the toy GPT-2 was pretrained on the same ids);
* latent: L1 of ``decode_latents(M, text_embed(M))`` vs the VAE latents (posterior mode) of the frames;

total = Σ ``loss_weights`` × progressive multipliers (``progressive``; dice/concepts/caption/latent).

Validation (held-out ``val`` clips, never test) decodes brain-only: the prior is SAMPLED from the brain condition
(per-clip seeds, ``val_prior_steps`` strided DDPM steps) — not upstream's noised-ground-truth shortcut (defect 16).
Scores: ``fwd_top1`` / ``bwd_top1`` (frame ``target_frame`` of M vs its CLIP tokens, within chunks of ``val_chunk``
clips), ``prior_fwd_top1`` (P itself), ``caption_acc`` (teacher-forced token accuracy), ``concept_f1`` (micro F1 at
0.5), ``dice`` (mean soft Dice over clips that have a key object, given its name). ``metric`` = the sum of
``train.selection`` (default fwd + bwd + caption accuracy, upstream's choice); ``best`` keeps the highest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.brain import NeuronsBrainModel, clip_generators
from models.foundation import build_role
from models.heads import ConceptNamer
from models.mindeye2_keymap import load_mindeye2_backbone_prior
from models.prior import BrainDiffusionPrior, Generators, randn_per_sample
from models.sizes import ALL_PARTS, STAGE1_PARTS
from pipeline.common import (
    TOKENS_PROJ_FILE,
    ClipTargets,
    clip_targets,
    data_files,
    foundation_dims,
    foundation_kind,
    load_data,
    make_brain_config,
    require_foundation,
    uses_clip_cache,
)
from pipeline.loop import Trainer, fit, prepare_training
from utils.checkpoint import MODEL_FILE, check_identity, load_strict, read_weights, resolve_checkpoint
from utils.cli import begin_stage
from utils.errors import ConfigError, WeightsError
from utils.losses import (
    concept_bce,
    dice_loss,
    latent_l1,
    progressive_weights,
    soft_clip_loss,
    softclip_temperature,
    symmetric_infonce,
    total_loss,
)
from utils.manifest import require_stage
from utils.runs import RunPaths, rerun_hint
from utils.training import BatchPlan, MetricsLog, build_accelerator, clip_seed, gather_cat, seed_everything

log = logging.getLogger(__name__)

FIELDS = ("voxel", "frames", "caption", "caption_emb", "concepts", "key_obj_mask", "key_obj_cls")
FROZEN_PARTS = STAGE1_PARTS  # ridge, backbone, clipproj
FREEZABLE = ("diffusion_prior", "motion_proj", "classifier", "text_seg_dec", "text_dec", "text_dec.decoder")
MINDEYE2_FILE = "last.pth"
MINDEYE2_SOURCE = "hf download pscotti/mindeyev2 train_logs/final_subj01_pretrained_40sess_24bs/last.pth"
EOT_ID = 49407  # CLIP-BPE end of text
SCORES = ("fwd_top1", "bwd_top1", "prior_fwd_top1", "caption_acc", "concept_f1", "dice")  # validation scores


@dataclass
class Captions:
    """Teacher-forcing targets of every source clip: CLIP-BPE ids (N, L) and their attention mask (N, L) bool."""

    ids: torch.Tensor
    mask: torch.Tensor


@dataclass
class Stage2:
    """Everything one stage-2 run holds."""

    cfg: Any
    data: Any
    clip: Any
    vae: Any
    model: NeuronsBrainModel
    accelerator: Any
    out_dir: Path
    stage1_ckpt: Path
    voxels: dict[str, torch.Tensor]  # per split: (n, V) train = repeat ``voxel_repeat``, val = mean of the repeats
    captions: dict[str, Captions]  # per split (train, val)
    key_text: dict[str, torch.Tensor]  # per split: (n, Dt) pooled text embedding of each clip's key-object name
    targets: ClipTargets  # CLIP image tokens and VAE latents of the frames (cached or computed)
    frozen: tuple[str, ...] = FROZEN_PARTS  # parts kept frozen and in eval mode


# ---- set-up --------------------------------------------------------------------------------------------------------
def stage1_checkpoint(cfg: Any) -> Path:
    """The stage-1 best checkpoint folder, after checking that stage 1 finished and is up to date."""
    paths = RunPaths.from_config(cfg)
    require_stage("1", paths.stage_dir("1"), paths.stage_dirs(), rerun_hint(cfg))
    return resolve_checkpoint(paths.stage_dir("1") / "checkpoints" / "best")


def check_mindeye2(cfg: Any) -> None:
    if cfg.train.init_from_mindeye2 and not (Path(cfg.paths.weights_root) / MINDEYE2_FILE).is_file():
        raise WeightsError(
            f"missing MindEye2 weights {Path(cfg.paths.weights_root) / MINDEYE2_FILE}",
            f"get them with `{MINDEYE2_SOURCE} --repo-type dataset` into weights_root, "
            "or --set train.init_from_mindeye2=false",
        )


def load_stage1_parts(model: NeuronsBrainModel, folder: Path, cfg: Any) -> None:
    """Strictly load the stage-1 parts (ridge, backbone, clipproj) from a stage-1 checkpoint of this run."""
    tensors, meta = read_weights(folder)
    check_identity(meta, cfg, folder)
    for part in FROZEN_PARTS:
        prefix = f"{part}."
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_strict(getattr(model, part), sub, f"stage-1 checkpoint {folder} ({part})")
    extra = sorted(k for k in tensors if k.split(".")[0] not in FROZEN_PARTS)
    if extra:
        raise WeightsError(f"stage-1 checkpoint {folder} has unexpected keys {extra[:3]}", "rerun stage 1")


def build_model(cfg: Any, data: Any, dims: Any, gpt2: Any, stage1: Path) -> NeuronsBrainModel:
    up = cfg.upstream
    bcfg = make_brain_config(cfg, data, dims, ALL_PARTS, text_attention=up.text_attention,
                             temporal_scope=up.temporal_scope, caption_pad=up.caption_pad)  # fmt: skip
    model = NeuronsBrainModel(bcfg, gpt2=gpt2.model)
    if cfg.train.init_from_mindeye2:  # fills backbone and prior; the backbone is then replaced by stage 1's
        state = torch.load(Path(cfg.paths.weights_root) / MINDEYE2_FILE, map_location="cpu", weights_only=True)
        load_mindeye2_backbone_prior(state, model)
    load_stage1_parts(model, stage1, cfg)
    for part in frozen_parts(cfg):
        model.get_submodule(part).requires_grad_(False)
    set_train_mode(model, frozen_parts(cfg))
    return model


def frozen_parts(cfg: Any) -> tuple[str, ...]:
    """The stage-1 parts plus ``train.freeze`` (checked)."""
    unknown = sorted(set(cfg.train.freeze) - set(FREEZABLE))
    if unknown:
        raise ConfigError(f"train.freeze names unknown parts {unknown}", f"choose from {', '.join(FREEZABLE)}")
    return FROZEN_PARTS + tuple(cfg.train.freeze)


def set_train_mode(model: torch.nn.Module, frozen: tuple[str, ...] = FROZEN_PARTS) -> None:
    """Training mode for the trainable heads; the frozen parts stay in eval mode (no dropout)."""
    model.train()
    for part in frozen:
        model.get_submodule(part).eval()


def caption_targets(clip: Any, captions: np.ndarray, max_len: int, max_positions: int, vocab: int) -> Captions:
    """CLIP-BPE ids ``(N, L)``, L = min(max_len, tokenizer context), and the mask up to and including the first EOT."""
    ids = clip.tokenize([str(c) for c in captions]).long()  # (N, context)
    ids = ids[:, :max_len]
    if ids.shape[1] + 1 > max_positions:
        raise ConfigError(
            f"captions of {ids.shape[1]} tokens + 1 prefix exceed GPT-2's {max_positions} positions",
            f"set train.caption_max_len to at most {max_positions - 1}",
        )
    if int(ids.max()) >= vocab:
        raise ConfigError(f"CLIP-BPE id {int(ids.max())} is outside GPT-2's {vocab}-row vocabulary",
                          "use a GPT-2 whose vocabulary covers the CLIP-BPE ids")  # fmt: skip
    is_eot = (ids == EOT_ID).long()
    after_eot = (is_eot.cumsum(dim=1) - is_eot) > 0
    return Captions(ids, ~after_eot)


def concept_namer(cfg: Any, data: Any) -> ConceptNamer:
    """Names for the segmentation head's text (defect 22): classes by default, fine key-object names by flag."""
    return ConceptNamer(tuple(data.concept_classes), key_object_classes(data), mode=cfg.upstream.concept_names)


def key_object_classes(data: Any) -> dict[str, str]:
    """Fine key-object name → concept class, read off the training labels: the class with the highest lift
    P(class | key object) / P(class) among the classes present in every clip of that key object (its own concepts,
    the most specific first). Names that are class names map to themselves."""
    labels = data.concept_labels("train").bool()  # (n, C)
    names = np.asarray(data.key_object_names("train"))
    classes, base = data.concept_classes, labels.float().mean(0).clamp(min=1e-6)
    out: dict[str, str] = {}
    for name in sorted(set(names) - {"None"} - set(classes)):
        rows = labels[torch.as_tensor(names == name)]
        always = rows.all(0)
        lift = rows.float().mean(0) / base
        if always.any():
            lift = torch.where(always, lift, torch.zeros_like(lift))
        out[str(name)] = classes[int(lift.argmax())]
    return out


@torch.no_grad()
def key_text_embeddings(clip: Any, names: list[str], device: torch.device) -> torch.Tensor:
    """(n, Dt) pooled text embeddings of ``names`` (each distinct name is embedded once)."""
    unique = sorted(set(names))
    emb = clip.text_pooled(unique).float().to(device)  # (u, Dt)
    lookup = {n: i for i, n in enumerate(unique)}
    return emb[torch.as_tensor([lookup[n] for n in names], device=device)]


def setup(cfg: Any) -> Stage2:
    """Validate every input (stage 1 first) and build the model; no output is touched here."""
    stage1 = stage1_checkpoint(cfg)
    unknown = sorted(set(cfg.train.selection) - set(SCORES))
    if unknown or not cfg.train.selection:
        raise ConfigError(f"bad train.selection {list(cfg.train.selection)}", f"sum some of {', '.join(SCORES)}")
    data = load_data(cfg, FIELDS)
    check_mindeye2(cfg)
    accelerator = build_accelerator(cfg)
    kind, root, device = foundation_kind(cfg), cfg.paths.weights_root, accelerator.device
    require_foundation(cfg, ("clip", "vae", "gpt2"))
    # with the CLIP-target cache only the text tower runs, once, at set-up: the clip role stays on the CPU
    clip = build_role("clip", kind, root, "cpu" if uses_clip_cache(cfg) else device)
    vae, gpt2 = (build_role(r, kind, root, device) for r in ("vae", "gpt2"))
    dims = foundation_dims(cfg, clip, data, vae, gpt2)
    targets = clip_targets(cfg, data, clip, device, {"train": list(range(data.n_frames))}, vae)
    model = build_model(cfg, data, dims, gpt2, stage1)
    t, namer = cfg.train, concept_namer(cfg, data)
    captions = {
        split: caption_targets(clip, data.captions(split), t.caption_max_len, gpt2.max_positions, gpt2.vocab_size)
        for split in ("train", "val")
    }
    key_text = {
        split: key_text_embeddings(clip, [namer.train_name(n) for n in data.key_object_names(split)], device)
        for split in ("train", "val")
    }
    voxels = {"train": data.voxels("train", t.voxel_repeat), "val": data.voxels("val")}
    out_dir = RunPaths.from_config(cfg).stage_dir("2")
    return Stage2(cfg, data, clip, vae, model, accelerator, out_dir, stage1, voxels, captions, key_text, targets,
                  frozen_parts(cfg))  # fmt: skip


# ---- one training step ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """The tensors of one step on clips ``idx`` of a split (all on the device; the frames' CLIP tokens and VAE
    latents come from :class:`~pipeline.common.ClipTargets`)."""

    voxels: torch.Tensor  # (B, V)
    caption_emb: torch.Tensor  # (B, Dt)
    concepts: torch.Tensor  # (B, C)
    masks: torch.Tensor  # (B, F, R, R)
    key_text: torch.Tensor  # (B, Dt)
    tokens: torch.Tensor  # (B, L)
    token_mask: torch.Tensor  # (B, L)


def get_batch(s: Stage2, split: str, idx: Any) -> Batch:
    d, dev = s.data, s.accelerator.device
    rows = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    cap = s.captions[split]
    return Batch(
        s.voxels[split][rows].to(dev),
        d.caption_embeddings(split)[rows].to(dev),
        d.concept_labels(split)[rows].to(dev),
        d.key_object_masks(split, idx).to(dev),
        s.key_text[split][rows.to(s.key_text[split].device)],
        cap.ids[rows].to(dev),
        cap.mask[rows].to(dev),
    )


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, F, R, R) binary → (B, F, size, size), nearest."""
    return F.interpolate(masks, size=(size, size), mode="nearest")


def head_outputs(s: Stage2, b: Batch, motion: torch.Tensor, latent_size: int) -> dict[str, torch.Tensor]:
    """Per-clip outputs of the heads on motion tokens M (b, F, T, D) of this process's clips, all with a leading
    clip axis so that they can be gathered over processes."""
    model = s.accelerator.unwrap_model(s.model)
    text = model.text_embed(motion)  # (b, Dt)
    # logits at the K labelled positions only (K, V): the 49,408-way LM head is most of a toy step's work
    logits, labels, keep = model.caption_target_logits(F.normalize(text, dim=-1), b.tokens, b.token_mask)
    return {
        "text": text,
        "mask_logits": model.decode_masks(motion, b.key_text.detach())[:, :, 0].float(),  # (b, F, S, S)
        "concept_logits": model.concept_logits(motion).float(),  # (b, C)
        "pred_latents": model.decode_latents(motion, text, out_size=latent_size).float(),  # (b, F, C, s, s)
        "token_loss": caption_token_losses(logits, labels, keep, s.cfg.train.caption_label_smoothing),  # (b, L)
        "token_hit": scatter_positions((logits.argmax(-1) == labels).float(), keep),  # (b, L)
        "token_keep": keep.float(),  # (b, L)
    }


def scatter_positions(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Values (K,) of the K True positions of ``keep`` (B, L) → (B, L), 0 elsewhere (differentiable)."""
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)


def caption_token_losses(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, label_smoothing: float
                         ) -> torch.Tensor:  # fmt: skip
    """``utils.losses.caption_ce`` before its mean: label-smoothed CE of the K labelled positions' logits (K, V) and
    labels (K,), placed at ``keep`` (B, L) and 0 where ignored, so that the mean can be taken over the tokens of the
    global batch."""
    flat = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="none")  # (K,)
    return scatter_positions(flat, keep)


def head_losses(s: Stage2, g: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor | float]:
    """Every stage-2 loss on the gathered global batch ``g`` (see :func:`step_loss`), plus the caption token
    accuracy."""
    t, up = s.cfg.train, s.cfg.upstream
    tau = softclip_temperature(epoch, t.num_epochs, t.softclip_temp_start, t.softclip_temp_end)
    tokens = g["token_keep"].sum().clamp(min=1.0)
    return {
        "prior": F.mse_loss(g["prior_tokens"], g["targets"][:, t.target_frame]),
        "video_softclip": soft_clip_loss(g["motion"].flatten(0, 1), g["targets"].flatten(0, 1), tau),
        "text_nce": symmetric_infonce(g["text"], g["caption_emb"], t.temp_text),
        "dice": dice_loss(g["mask_logits"], resize_masks(g["masks"], g["mask_logits"].shape[-1]), up.dice_reduction),
        "concepts": concept_bce(g["concept_logits"], g["concepts"]),
        "caption": g["token_loss"].sum() / tokens,
        "latent": latent_l1(g["pred_latents"], g["latents"]),
        "caption_acc": float(g["token_hit"].sum() / tokens),
    }


def multipliers(cfg: Any, epoch: int, batch: int, steps_per_epoch: int) -> dict[str, float]:
    """Progressive multipliers of this step (all 1 when ``progressive.enabled`` is off)."""
    p = cfg.progressive
    if not p.enabled:
        return {name: 1.0 for name in p.starts}
    return progressive_weights(epoch, batch, steps_per_epoch, p.starts, p.window_epochs, p.peak)


def prior_generators(s: Stage2, epoch: int, idx: np.ndarray) -> list[torch.Generator]:
    """One generator per clip for the prior's timesteps, noise and condition dropout, seeded from the run seed, the
    epoch and the clip, so that the draws do not depend on the batch size or the process count."""
    epoch_seed = clip_seed(s.cfg.run.seed, epoch)
    return clip_generators([clip_seed(epoch_seed, int(r)) for r in s.data.indices("train")[idx]])


def step_loss(s: Stage2, plan: BatchPlan, epoch: int, batch: int) -> dict[str, torch.Tensor | float]:
    """All stage-2 losses of step ``batch`` of ``epoch`` on the global batch, whatever the process count; the
    weighted total under ``loss`` and the multipliers as ``w_<task>``.

    Each process runs the model on its share of the clips, then gathers the per-clip outputs and targets, so the
    contrastive terms (video SoftCLIP, text InfoNCE), the batch Dice and the token-averaged caption loss see every
    clip of the step. (Dropout masks are drawn per process; the upstream ``batch`` decoder modes, defects 14-15,
    mix clips inside a process's share only.)
    """
    t, acc = s.cfg.train, s.accelerator
    model = acc.unwrap_model(s.model)
    idx = plan.batch_at(epoch, batch)[plan.share(acc.process_index)]
    b = get_batch(s, "train", idx)
    with torch.no_grad():
        cond = model.encode(b.voxels).float()  # (b, T, D), frozen
        targets = s.targets("train", idx, range(s.data.n_frames))  # (b, F, T, D)
        latents = s.targets.latents("train", idx)  # (b, F, C, s, s)
    _, prior_tokens = model.diffusion_prior(cond, targets[:, t.target_frame], prior_generators(s, epoch, idx))
    motion = model.motion(prior_tokens)  # (b, F, T, D)
    local = {"prior_tokens": prior_tokens, "motion": motion, **head_outputs(s, b, motion, latents.shape[-1])}
    local |= {"targets": targets, "latents": latents, "caption_emb": b.caption_emb, "concepts": b.concepts,
              "masks": b.masks}  # fmt: skip
    losses = head_losses(s, {k: gather_cat(acc, v) for k, v in local.items()}, epoch)
    accuracy = losses.pop("caption_acc")
    mult = multipliers(s.cfg, epoch, batch, plan.steps_per_epoch)
    total, _ = total_loss(losses, s.cfg.loss_weights, mult)
    return {"loss": total, **losses, "caption_acc": accuracy, **{f"w_{k}": v for k, v in mult.items()}}


# ---- validation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_prior(prior: BrainDiffusionPrior, cond: torch.Tensor, gens: Generators, steps: int | None) -> torch.Tensor:
    """Brain-only prior sample (B, T, D): full ancestral DDPM, or ``steps`` evenly strided timesteps using the
    posterior q(x_s | x_t, x0) between consecutive kept timesteps s < t."""
    sched = prior.noise_scheduler
    n = sched.num_timesteps
    if steps is None or steps >= n:
        return prior.sample(cond, gens)
    times = torch.linspace(n - 1, 0, max(steps, 1)).round().long().unique_consecutive().tolist()
    x = randn_per_sample(tuple(cond.shape), gens, cond.device, cond.dtype)
    for k, t_now in enumerate(times):
        t = torch.full((len(cond),), t_now, device=cond.device, dtype=torch.long)
        x0 = prior.net.forward_with_cond_scale(x, t, cond)
        if k == len(times) - 1:  # the last kept step is t = 0, whose posterior mean is x0 itself
            return x0
        a_t, a_s = sched.alphas_cumprod[t_now], sched.alphas_cumprod[times[k + 1]]
        beta = 1 - a_t / a_s
        mean = (a_s.sqrt() * beta * x0 + (a_t / a_s).sqrt() * (1 - a_s) * x) / (1 - a_t)
        std = (beta * (1 - a_s) / (1 - a_t)).clamp(min=1e-20).sqrt()
        x = mean + std * randn_per_sample(tuple(x.shape), gens, x.device, x.dtype)
    return x


def decode_val(s: Stage2, split: str, idx: np.ndarray) -> tuple[Batch, dict[str, Any]]:
    """Brain-only outputs of clips ``idx``: sampled prior tokens, motion tokens and every head."""
    model, t = s.accelerator.unwrap_model(s.model), s.cfg.train
    b = get_batch(s, split, idx)
    rows = s.data.indices(split)[idx]
    gens = clip_generators([clip_seed(s.cfg.run.seed, int(r)) for r in rows], s.accelerator.device)
    prior_tokens = sample_prior(model.diffusion_prior, model.encode(b.voxels).float(), gens, t.val_prior_steps)
    motion = model.motion(prior_tokens)  # (b, F, T, D)
    text = model.text_embed(motion)
    logits, labels, _ = model.caption_target_logits(F.normalize(text, dim=-1), b.tokens, b.token_mask)
    out = {
        "prior": prior_tokens,
        "motion": motion,
        "caption_logits": logits,  # (K, V) at the K labelled positions
        "caption_labels": labels,  # (K,)
        "concepts": model.concept_logits(motion),
        "masks": model.decode_masks(motion, b.key_text)[:, :, 0],  # (b, F, S, S)
        "target": s.targets(split, idx, t.target_frame),  # (b, T, D)
    }
    out["latents"] = s.targets.latents(split, idx)  # (b, F, C, s, s)
    out["pred_latents"] = model.decode_latents(motion, text, out_size=out["latents"].shape[-1]).float()
    return b, out


def chunk_scores(b: Batch, out: dict[str, Any], frame: int) -> dict[str, float]:
    """Summed (not averaged) scores of one validation chunk."""
    target = F.normalize(out["target"].flatten(1), dim=-1)
    truth = torch.arange(len(target), device=target.device)
    sims = F.normalize(out["motion"][:, frame].flatten(1), dim=-1) @ target.T  # (b, b)
    prior_sims = F.normalize(out["prior"].flatten(1), dim=-1) @ target.T
    hits = out["caption_logits"].argmax(-1) == out["caption_labels"]  # (K,) labelled positions only
    pred = out["concepts"] > 0
    gt = b.concepts > 0.5
    has_obj = b.masks.flatten(1).amax(1) > 0
    probs = torch.sigmoid(out["masks"].float()).flatten(1)  # (b, F·S·S)
    gt_masks = resize_masks(b.masks, out["masks"].shape[-1]).flatten(1)
    dice = (2 * (probs * gt_masks).sum(1) + 1e-7) / (probs.sum(1) + gt_masks.sum(1) + 1e-7)  # (b,)
    return {
        "fwd_top1": float((sims.argmax(1) == truth).sum()),
        "bwd_top1": float((sims.argmax(0) == truth).sum()),
        "prior_fwd_top1": float((prior_sims.argmax(1) == truth).sum()),
        "tokens_hit": float(hits.sum()),
        "tokens": float(len(out["caption_labels"])),
        "tp": float((pred & gt).sum()),
        "fp": float((pred & ~gt).sum()),
        "fn": float((~pred & gt).sum()),
        "dice_sum": float(dice[has_obj].sum()),
        "with_object": float(has_obj.sum()),
        "latent_l1": float((out["pred_latents"] - out["latents"]).abs().flatten(1).mean(1).sum()),
    }


@torch.no_grad()
def evaluate(s: Stage2, split: str = "val") -> dict[str, float]:
    """Brain-only validation scores (see the module docstring) and the selection ``metric``."""
    model, t = s.accelerator.unwrap_model(s.model), s.cfg.train
    model.eval()
    n = s.data.n_clips(split)
    sums: dict[str, float] = {}
    for start in range(0, n, t.val_chunk):
        idx = np.arange(start, min(start + t.val_chunk, n))
        b, out = decode_val(s, split, idx)
        for k, v in chunk_scores(b, out, t.target_frame).items():
            sums[k] = sums.get(k, 0.0) + v
    set_train_mode(model, s.frozen)
    scores = {k: sums[k] / n for k in ("fwd_top1", "bwd_top1", "prior_fwd_top1", "latent_l1")}
    scores["caption_acc"] = sums["tokens_hit"] / max(sums["tokens"], 1.0)
    scores["concept_f1"] = 2 * sums["tp"] / max(2 * sums["tp"] + sums["fp"] + sums["fn"], 1.0)
    scores["dice"] = sums["dice_sum"] / max(sums["with_object"], 1.0)
    scores["metric"] = sum(scores[k] for k in t.selection)
    return scores


# ---- the stage -----------------------------------------------------------------------------------------------------
def train(cfg: Any) -> Path:
    """Run stage 2; returns the stage folder."""
    seed_everything(cfg.run.seed)  # before the model is built: the fresh heads' initialisation is seeded too
    s = setup(cfg)
    BatchPlan(s.data.n_clips("train"), cfg.train.batch_size, s.accelerator.num_processes)  # refused before any write
    _, recorder = begin_stage(cfg, "2", depends_on=("1",))
    t, acc = cfg.train, s.accelerator
    plan, opt, sched, metrics = prepare_training(cfg, "2", s.model, acc, s.data.n_clips("train"), s.out_dir)
    trainer = Trainer(
        cfg, s.model, acc, s.out_dir,
        lambda _idx, epoch, batch: step_loss(s, plan, epoch, batch),  # the prior draws from per-clip generators
        lambda: evaluate(s),
    )  # fmt: skip
    trainable = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    log.info("stage 2: %d train clips, %d val, %d steps/epoch x %d epochs, %d trainable parameters", plan.n_items,
             s.data.n_clips("val"), plan.steps_per_epoch, t.num_epochs, trainable)  # fmt: skip
    try:
        fit(trainer, plan, opt, sched, metrics)
    finally:
        metrics.close()
    if acc.is_main_process:
        finish_stage(s, recorder, metrics)
    return s.out_dir


def finish_stage(s: Stage2, recorder, metrics: MetricsLog) -> None:
    curves = metrics.plot(s.out_dir / "curves.png")
    subj = s.cfg.run.subj
    names = (
        f"subj0{subj}_train_fmri.pt", "GT_train_3fps.pt", "GT_train_caption.pt", "GT_train_caption_emb.pt",
        "qwen_annotation/qwen_train_caption_tag_category_id.json", "masks/key_objects_masks_train.pt",
        "masks/key_objects_info_train.json", TOKENS_PROJ_FILE,
    )  # fmt: skip
    for path in data_files(s.data, names):
        recorder.add_input(path)
    recorder.add_input(s.stage1_ckpt / MODEL_FILE)
    for name in ("best", "last"):
        recorder.add_output(s.out_dir / "checkpoints" / name / MODEL_FILE)
    recorder.add_output(metrics.path)
    recorder.add_output(curves)
    recorder.finish()
