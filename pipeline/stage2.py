"""Stage 2: the decoupled task heads ("neurons_decoupler", spec §3.5) on top of the frozen stage-1 brain model.

Initialisation: the stage-1 BEST checkpoint gives ``ridge``, ``backbone`` and ``clipproj`` (all frozen, kept in eval
mode; ``train.backbone_mode=train`` leaves them in train mode, backbone dropout on, as upstream); the paper profile
starts the diffusion prior from MindEye2's ``last.pth`` (``train.init_from_mindeye2``);
``motion_proj``, ``classifier`` and ``text_seg_dec`` are fresh; ``text_dec`` wraps the pretrained gpt2 role's model
(fine-tuned, with a fresh prefix projection).

Per step on B clips (voxels of repeat ``voxel_repeat``; T = CLIP tokens, D = width, F = frames):
``c = prior_condition(voxels)`` (B, T, D) frozen (the ``clip_proj`` output; ``upstream.prior_condition``, defect 19) →
``prior_mse, P = prior(c, CLIP tokens of frame target_frame)`` →
``M = motion(c)`` (B, F, T, D) (``upstream.head_input=prior``: ``motion(P)``, upstream's heads on the prior's x0 from
noised ground truth, which at test time become heads on a brain-only sample), then

* video_softclip: SoftCLIP over the B·F frame vectors of M vs the CLIP tokens of every frame (τ cosine ramp by epoch);
* text_nce: symmetric InfoNCE of ``text_embed(M)`` vs the caption embeddings (τ ``temp_text``);
* dice: key-object masks ``decode_masks(M, text_pooled(key-object name))`` vs the GT masks at the decoder size (area
  majority; ``upstream.gt_mask_resize=nearest`` for upstream's nearest neighbour), per clip
  (``upstream.dice_reduction=batch`` for the upstream whole-batch Dice);
* concepts: BCE of ``concept_logits(M)`` vs the multi-hot concept labels;
* caption: label-smoothed GPT-2 cross-entropy, prefix ``normalize(text_embed(M))``, on the caption's CLIP-BPE ids
  (the paper feeds CLIP ids straight into GPT-2's ``wte``; the toy GPT-2 was pretrained on the same ids);
* latent: L1 of ``decode_latents(M, text_embed(M))`` vs the VAE latents (posterior mode) of the frames;

total = Σ ``loss_weights`` × progressive multipliers (``progressive``; dice/concepts/caption/latent; windows derived
from ``train.num_epochs`` as upstream unless ``progressive.windows=fixed``).

Validation (held-out ``val`` clips, never test) decodes brain-only with the model's ``decode_voxels`` (as stage 3):
the prior is SAMPLED from the brain condition (per-clip seeds, ``val_prior_steps`` strided DDPM steps) — not
upstream's noised-ground-truth shortcut (defect 16).
Scores: ``fwd_top1`` / ``bwd_top1`` (frame ``target_frame`` of M vs its CLIP tokens, within chunks of ``val_chunk``
clips), ``prior_fwd_top1`` (P itself), ``caption_acc`` (teacher-forced token accuracy), ``concept_f1`` (micro F1 at
0.5), ``dice`` (mean soft Dice over clips that have a key object, given its name). ``metric`` = the sum of
``train.selection`` (default fwd + bwd + caption accuracy, upstream's choice); ``best`` keeps the highest.
``data.validation=test_upstream`` trains on every clip and scores the TEST clips instead (defect 16's test-set
selection; the scores are still brain-only, not upstream's noised-ground-truth shortcut).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from models.brain import NeuronsBrainModel, clip_generators
from models.configured import make_brain_config, model_flags
from models.foundation import build_role, foundation_impl
from models.heads import EOT_ID, IGNORE_INDEX, ConceptNamer, caption_labels, key_object_classes
from models.mindeye2_keymap import load_mindeye2, require_mindeye2
from models.sizes import ALL_PARTS, STAGE1_PARTS
from pipeline.common import (
    ClipTargets,
    adaptation_source,
    clip_targets,
    cross_fit_dir,
    foundation_dims,
    load_subject_set,
    require_foundation,
    uses_clip_cache,
)
from pipeline.condition_cache import PARKED, ConditionCache, ConditionFn, stage1_identity
from pipeline.loop import Trainer, fit, mean_over_subjects, prepare_training, subject_plan
from utils.checkpoint import CONFIG_FILE, MODEL_FILE, check_identity, load_parts, read_weights, resolve_checkpoint
from utils.cli import begin_stage
from utils.data import SubjectSet, selection_note, selection_split
from utils.errors import ConfigError, WeightsError
from utils.grad_cache import GradientCache
from utils.losses import (
    STAGE2_OUTPUTS,
    caption_token_losses,
    concept_bce,
    dice_loss,
    latent_l1,
    progressive_weights,
    scatter_positions,
    soft_clip_loss,
    softclip_temperature,
    symmetric_infonce,
    total_loss,
    upstream_progressive_windows,
)
from utils.manifest import require_stage
from utils.metrics import concept_f1
from utils.resize import resize_maps_nearest, resize_masks_majority
from utils.runs import RunPaths, rerun_hint
from utils.stage_configs import Stage2Config, UpstreamFlags
from utils.training import (
    AnyPlan,
    MetricsLog,
    SubjectBatchPlan,
    autocast,
    build_accelerator,
    clip_seed,
    gather_cat,
    seed_everything,
)

log = logging.getLogger(__name__)

FIELDS = ("voxel", "frames", "caption", "caption_emb", "concepts", "key_obj_mask", "key_obj_cls")
FROZEN_PARTS = STAGE1_PARTS  # ridge, backbone, clipproj
HEAD_PARTS = tuple(p for p in ALL_PARTS if p not in FROZEN_PARTS)  # what stage 2 trains
FREEZABLE = ("diffusion_prior", "motion_proj", "classifier", "text_seg_dec", "text_dec", "text_dec.decoder")
SCORES = ("fwd_top1", "bwd_top1", "prior_fwd_top1", "caption_acc", "concept_f1", "dice")  # validation scores


@dataclass
class Captions:
    """Teacher-forcing targets of every source clip: CLIP-BPE ids (N, L) and their attention mask (N, L) bool."""

    ids: torch.Tensor
    mask: torch.Tensor


@dataclass
class Stage2:
    """Everything one stage-2 run holds."""

    cfg: Stage2Config
    data: Any  # the stimuli (frames, captions, concepts, masks): the same clips for every subject
    subjects: SubjectSet  # the fMRI of each subject, in ridge order (one subject: a set of one)
    clip: Any
    vae: Any
    model: NeuronsBrainModel
    accelerator: Any
    out_dir: Path
    stage1_ckpt: Path
    # per split (train and the selection split, val or test), one per ridge slot: (n, V_slot), train = repeat
    # ``voxel_repeat``, else the mean of the repeats
    voxels: dict[str, list[torch.Tensor]]
    captions: dict[str, Captions]  # per split (train and the selection split)
    key_text: dict[str, torch.Tensor]  # per split: (n, Dt) pooled text embedding of each clip's key-object name
    targets: ClipTargets  # CLIP image tokens and VAE latents of the frames (cached or computed)
    frozen: tuple[str, ...] = FROZEN_PARTS  # parts kept frozen and in eval mode
    conditions: ConditionCache | None = None  # train.condition_cache: the prior's condition of every clip, cached
    cross_fit: list[Path] = field(default_factory=list)  # stage 1's fold models (train.condition_source=cross_fit)


# ---- set-up --------------------------------------------------------------------------------------------------------
def stage1_checkpoint(cfg: Stage2Config) -> Path:
    """The stage-1 best checkpoint folder, after checking that stage 1 finished and is up to date."""
    paths = RunPaths.from_config(cfg)
    require_stage("1", paths.stage_dir("1"), paths.stage_dirs(), rerun_hint(cfg))
    return resolve_checkpoint(paths.stage_dir("1") / "checkpoints" / "best")


def load_stage1_parts(model: NeuronsBrainModel, folder: Path, cfg: Stage2Config) -> None:
    """Strictly load the stage-1 parts (ridge, backbone, clipproj) from a stage-1 checkpoint of this run."""
    tensors, meta = read_weights(folder)
    check_identity(meta, cfg, folder)
    load_parts(model, tensors, FROZEN_PARTS, f"stage-1 checkpoint {folder}")
    extra = sorted(k for k in tensors if k.split(".")[0] not in FROZEN_PARTS)
    if extra:
        raise WeightsError(f"stage-1 checkpoint {folder} has unexpected keys {extra[:3]}", "rerun stage 1")


def load_head_parts(model: NeuronsBrainModel, folder: Path) -> None:
    """Strictly load the prior and every head (all parts after stage 1's) from a subject set's stage-2 checkpoint
    (``train.init_from``): key map ``<part>.<name>`` → the same key; the source's stage-1 parts are not read (this
    run's adapted stage 1 supplies them)."""
    tensors, meta = read_weights(folder)
    load_parts(model, tensors, HEAD_PARTS, f"train.init_from {folder}")
    log.info("stage 2: the prior and heads from %s (subjects %s)", folder, meta.get("subj"))


def build_model(cfg: Stage2Config, subjects: SubjectSet, dims: Any, gpt2: Any, stage1: Path) -> NeuronsBrainModel:
    up = cfg.upstream
    bcfg = make_brain_config(cfg, subjects.stimuli, dims, ALL_PARTS, subjects.n_voxels, **model_flags(up))
    model = NeuronsBrainModel(bcfg, gpt2=gpt2.model)
    if cfg.train.init_from_mindeye2 and not cfg.train.init_from:  # fills backbone and prior; the backbone is then
        # replaced by stage 1's
        load_mindeye2(cfg.paths.weights_root, model)
    load_stage1_parts(model, stage1, cfg)
    if cfg.train.init_from:
        load_head_parts(model, adaptation_source(cfg, "2"))
    for part in frozen_parts(cfg):
        model.get_submodule(part).requires_grad_(False)
    set_train_mode(model, frozen_parts(cfg), cfg.train.backbone_mode)
    return model


def frozen_parts(cfg: Stage2Config) -> tuple[str, ...]:
    """The stage-1 parts plus ``train.freeze`` (checked)."""
    unknown = sorted(set(cfg.train.freeze) - set(FREEZABLE))
    if unknown:
        raise ConfigError(f"train.freeze names unknown parts {unknown}", f"choose from {', '.join(FREEZABLE)}")
    return FROZEN_PARTS + tuple(cfg.train.freeze)


def set_train_mode(
    model: torch.nn.Module, frozen: tuple[str, ...] = FROZEN_PARTS, backbone_mode: str = "eval"
) -> None:
    """Training mode for the trainable heads; the frozen parts stay in eval mode (no dropout), except the stage-1
    parts under ``backbone_mode="train"`` (upstream's ``model.train()``: the frozen backbone's dropout is active)."""
    model.train()
    for part in frozen:
        if not (backbone_mode == "train" and part in FROZEN_PARTS):
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


def concept_namer(cfg: Stage2Config, data: Any) -> ConceptNamer:
    """Names for the segmentation head's text (defect 22): classes by default, fine key-object names by flag."""
    to_class = key_object_classes(data.concept_labels("train"), data.key_object_names("train"), data.concept_classes)
    if selection_split(cfg.data) == "test":  # test key objects unseen in training: mapped from the test labels
        test = key_object_classes(data.concept_labels("test"), data.key_object_names("test"), data.concept_classes)
        to_class = {**test, **to_class}
    return ConceptNamer(tuple(data.concept_classes), to_class, mode=cfg.upstream.concept_names)


@torch.no_grad()
def key_text_embeddings(clip: Any, names: list[str], device: torch.device) -> torch.Tensor:
    """(n, Dt) pooled text embeddings of ``names`` (each distinct name is embedded once)."""
    unique = sorted(set(names))
    emb = clip.text_pooled(unique).float().to(device)  # (u, Dt)
    lookup = {n: i for i, n in enumerate(unique)}
    return emb[torch.as_tensor([lookup[n] for n in names], device=device)]


def setup(cfg: Stage2Config) -> Stage2:
    """Validate every input (stage 1 first) and build the model; no output is touched here."""
    stage1 = stage1_checkpoint(cfg)
    unknown = sorted(set(cfg.train.selection) - set(SCORES))
    if unknown or not cfg.train.selection:
        raise ConfigError(f"bad train.selection {list(cfg.train.selection)}", f"sum some of {', '.join(SCORES)}")
    if cfg.train.init_from:
        adaptation_source(cfg, "2")  # refused before any work
    if cfg.train.condition_source == "cross_fit" and cfg.train.condition_cache == "compute":
        raise ConfigError("train.condition_source=cross_fit reads the out-of-fold conditions from the condition cache",
                          "set train.condition_cache=fp32 (or fp16)")  # fmt: skip
    folds = cross_fit_checkpoints(cfg)
    if cfg.train.condition_cache != "compute" and cfg.train.backbone_mode != "eval":
        raise ConfigError("train.condition_cache needs train.backbone_mode=eval (with the backbone's dropout on, "
                          "every step gives a new condition)", "set train.condition_cache=off")  # fmt: skip
    if cfg.train.micro_batch < 0:
        raise ConfigError(f"train.micro_batch={cfg.train.micro_batch}", "give 0 (no micro batches) or a clip count")
    subjects = load_subject_set(cfg, FIELDS)
    data = subjects.stimuli
    if cfg.train.init_from_mindeye2 and not cfg.train.init_from:
        require_mindeye2(cfg.paths.weights_root)
    accelerator = build_accelerator(cfg)
    impl, root, device = foundation_impl(cfg.model.size), cfg.paths.weights_root, accelerator.device
    require_foundation(cfg, ("clip", "vae", "gpt2"))
    # with the CLIP-target cache only the text tower runs, once, at set-up: the clip role stays on the CPU
    clip = build_role("clip", impl, root, "cpu" if uses_clip_cache(cfg) else device)
    vae, gpt2 = (build_role(r, impl, root, device) for r in ("vae", "gpt2"))
    dims = foundation_dims(cfg, clip, data, vae, gpt2)
    select_on = selection_split(cfg.data)
    needs = {"train": list(range(data.n_frames))} | ({"test": [cfg.train.target_frame]} if select_on == "test" else {})
    targets = clip_targets(cfg, data, clip, device, needs, vae)
    model = build_model(cfg, subjects, dims, gpt2, stage1)
    t, namer = cfg.train, concept_namer(cfg, data)
    captions = {
        split: caption_targets(clip, data.captions(split), t.caption_max_len, gpt2.max_positions, gpt2.vocab_size)
        for split in ("train", select_on)
    }
    key_text = {
        split: key_text_embeddings(clip, [namer.train_name(n) for n in data.key_object_names(split)], device)
        for split in ("train", select_on)
    }
    voxels = {"train": [m.voxels("train", t.voxel_repeat) for m in subjects.members],
              select_on: [m.voxels(select_on) for m in subjects.members]}  # fmt: skip
    out_dir = RunPaths.from_config(cfg).stage_dir("2")
    s = Stage2(cfg, data, subjects, clip, vae, model, accelerator, out_dir, stage1, voxels, captions, key_text,
               targets, frozen_parts(cfg), cross_fit=folds)  # fmt: skip
    if cfg.train.condition_cache != "compute":
        identity: dict[str, Any] = {"stage1": stage1_identity(stage1), "prior_condition": cfg.upstream.prior_condition,
                    "mixed_precision": cfg.run.mixed_precision}  # fmt: skip
        if folds:  # a cache of in-sample conditions is not reused, and the reverse
            identity["cross_fit"] = [stage1_identity(f) for f in folds]
        s.conditions = ConditionCache(out_dir / "condition_cache", cfg.train.condition_cache, identity)
        if accelerator.is_main_process:  # one writer; the others read what it wrote
            cache_conditions(s, voxels)
        accelerator.wait_for_everyone()
        cache_conditions(s, voxels)
    return s


def cross_fit_checkpoints(cfg: Stage2Config) -> list[Path]:
    """The ``best`` checkpoints of stage 1's fold models, fold by fold ([] unless ``condition_source=cross_fit``)."""
    if cfg.train.condition_source != "cross_fit":
        return []
    if cfg.data.cross_fit_folds < 2:
        raise ConfigError("train.condition_source=cross_fit needs stage 1's fold models",
                          "set data.cross_fit_folds (e.g. 4) and rerun stage 1, or set "
                          "stage2.train.condition_source=stage1")  # fmt: skip
    k, stage1_dir = cfg.data.cross_fit_folds, RunPaths.from_config(cfg).stage_dir("1")
    fix = f"rerun stage 1 with data.cross_fit_folds={k}"
    check_folds(resolve_checkpoint(stage1_dir / "checkpoints" / "best"), k, -1, fix)
    folders = []
    for fold in range(k):
        best = cross_fit_dir(stage1_dir, fold) / "checkpoints" / "best"
        try:
            folders.append(check_folds(resolve_checkpoint(best), k, fold, fix))
        except WeightsError as err:
            raise WeightsError(f"stage 1's cross-fit model {fold}: {err.cause}", fix) from None
    return folders


def check_folds(folder: Path, folds: int, fold: int, fix: str) -> Path:
    """``folder`` after checking that its saved config has ``data.cross_fit_folds=folds`` and ``cross_fit_fold=fold``
    (the run's stage-1 model and its fold models come from one stage-1 run)."""
    try:
        data = (yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}).get("data", {})
    except (OSError, yaml.YAMLError):
        raise WeightsError(f"{folder / CONFIG_FILE} is missing or unreadable", fix) from None
    got = (data.get("cross_fit_folds", 0), data.get("cross_fit_fold", -1))
    if got != (folds, fold):
        raise WeightsError(f"{folder} was trained with data.cross_fit_folds={got[0]}, cross_fit_fold={got[1]}, not "
                           f"{folds}, {fold}", fix)  # fmt: skip
    return folder


def fold_conditions(s: Stage2) -> list[tuple[np.ndarray, ConditionFn]]:
    """(training-split positions of fold k, the prior condition by fold model k) for every fold: one stage-1 model
    (ridge, backbone, ``clip_proj``), built on the device when the cache first needs it, its weights replaced fold
    by fold as the cache reaches them."""
    held: dict[str, Any] = {"fold": -1, "model": None}

    def condition_of(fold: int) -> ConditionFn:
        def condition(voxels: torch.Tensor, slot: int) -> torch.Tensor:
            if held["model"] is None:
                cfg = replace(s.accelerator.unwrap_model(s.model).cfg, parts=FROZEN_PARTS)
                held["model"] = NeuronsBrainModel(cfg).to(s.accelerator.device).eval()
            if held["fold"] != fold:
                tensors, meta = read_weights(s.cross_fit[fold])
                check_identity(meta, s.cfg, s.cross_fit[fold])
                load_parts(held["model"], tensors, FROZEN_PARTS, f"stage-1 cross-fit model {s.cross_fit[fold]}")
                held["fold"] = fold
            return held["model"].prior_condition(voxels, slot)

        return condition

    return [(rows, condition_of(k)) for k, rows in enumerate(s.data.cross_fit_indices())]


def cache_conditions(s: Stage2, voxels: dict[str, list[torch.Tensor]]) -> None:
    """Make the condition cache hold every split of ``voxels``, computing what is missing with the frozen stage-1
    parts brought to the device for the while: the training split under the step's autocast (as the uncached step
    computes it), the others in full precision (as validation does). With ``condition_source=cross_fit`` each
    training clip's condition comes from the fold model that did not train on it."""
    model, acc, cache = s.accelerator.unwrap_model(s.model), s.accelerator, s.conditions
    if cache is None:
        raise ValueError("cache_conditions needs the stage's condition cache (train.condition_cache)")
    parts = [model.get_submodule(p) for p in FROZEN_PARTS]
    homes = [next(p.parameters()).device for p in parts]
    for part in parts:
        part.to(acc.device)
    try:
        for split, per_slot in voxels.items():
            precision = autocast(acc, s.cfg) if split == "train" else contextlib.nullcontext()
            fn = fold_conditions(s) if split == "train" and s.cross_fit else model.prior_condition
            with precision:
                cache.ensure({split: per_slot}, fn, acc.device)
    finally:
        for part, home in zip(parts, homes, strict=True):
            part.to(home)


def condition(s: Stage2, split: str, idx: Any, slot: int, voxels: torch.Tensor) -> torch.Tensor:
    """The prior's condition (b, T, D) of clips ``idx`` of ``split`` (their voxels (b, V)) of ridge slot ``slot``:
    read from the condition cache, or computed by the frozen stage-1 parts."""
    if s.conditions is not None:
        return s.conditions.read(split, slot, idx, s.accelerator.device)
    return s.accelerator.unwrap_model(s.model).prior_condition(voxels, slot)


# ---- one training step ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """The tensors of one step on clips ``idx`` of a split, for the subject in ridge slot ``slot`` (all on the
    device; the frames' CLIP tokens and VAE latents come from :class:`~pipeline.common.ClipTargets`)."""

    slot: int
    voxels: torch.Tensor  # (B, V_slot)
    caption_emb: torch.Tensor  # (B, Dt)
    concepts: torch.Tensor  # (B, C)
    masks: torch.Tensor  # (B, F, R, R)
    key_text: torch.Tensor  # (B, Dt)
    tokens: torch.Tensor  # (B, L)
    token_mask: torch.Tensor  # (B, L)


def get_batch(s: Stage2, split: str, idx: Any, slot: int = 0) -> Batch:
    d, dev = s.data, s.accelerator.device
    rows = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    cap = s.captions[split]
    return Batch(
        slot,
        s.voxels[split][slot][rows].to(dev),
        d.caption_embeddings(split)[rows].to(dev),
        d.concept_labels(split)[rows].to(dev),
        d.key_object_masks(split, idx).to(dev),
        s.key_text[split][rows.to(s.key_text[split].device)],
        cap.ids[rows].to(dev),
        cap.mask[rows].to(dev),
    )


def gt_masks_at(up: UpstreamFlags, masks: torch.Tensor, size: int) -> torch.Tensor:
    """Ground-truth key-object masks (B, F, R, R) {0, 1} at the mask head's (B, F, size, size): area majority,
    or upstream's nearest neighbour with ``upstream.gt_mask_resize=nearest`` (``docs/fidelity.md``)."""
    if up.gt_mask_resize == "nearest":
        return resize_maps_nearest(masks, size)
    return resize_masks_majority(masks, size)


def head_outputs(s: Stage2, b: Batch, motion: torch.Tensor, latent_size: int) -> dict[str, torch.Tensor]:
    """Per-clip outputs of the heads on motion tokens M (b, F, T, D) of this process's clips, all with a leading
    clip axis so that they can be gathered over processes."""
    model = s.accelerator.unwrap_model(s.model)
    text = model.text_embed(motion)  # (b, Dt)
    # logits at the K labelled positions only (K, V): the 49,408-way LM head is most of a toy step's work
    logits, labels, keep = model.caption_logits(F.normalize(text, dim=-1), b.tokens, b.token_mask)
    return {
        "text": text,
        "mask_logits": model.decode_masks(motion, b.key_text.detach())[:, :, 0].float(),  # (b, F, S, S)
        "concept_logits": model.concept_logits(motion).float(),  # (b, C)
        "pred_latents": model.decode_latents(motion, text, out_size=latent_size).float(),  # (b, F, C, s, s)
        "token_loss": caption_token_losses(logits, labels, keep, s.cfg.train.caption_label_smoothing),  # (b, L)
        "token_hit": scatter_positions((logits.argmax(-1) == labels).float(), keep),  # (b, L)
        "token_keep": keep.float(),  # (b, L)
    }


def head_losses(s: Stage2, g: dict[str, torch.Tensor], epoch: int) -> tuple[dict[str, torch.Tensor], float]:
    """Every stage-2 loss on the gathered global batch ``g`` (see :func:`step_loss`), and the caption token
    accuracy."""
    t, up = s.cfg.train, s.cfg.upstream
    tau = softclip_temperature(epoch, t.num_epochs, t.softclip_temp_start, t.softclip_temp_end)
    tokens = g["token_keep"].sum().clamp(min=1.0)
    mask_size = g["mask_logits"].shape[-1]
    losses = {
        "prior": F.mse_loss(g["prior_tokens"], g["targets"][:, t.target_frame]),
        "video_softclip": soft_clip_loss(g["motion"].flatten(0, 1), g["targets"].flatten(0, 1), tau),
        "text_nce": symmetric_infonce(g["text"], g["caption_emb"], t.temp_text),
        "dice": dice_loss(g["mask_logits"], gt_masks_at(up, g["masks"], mask_size), up.dice_reduction),
        "concepts": concept_bce(g["concept_logits"], g["concepts"]),
        "caption": g["token_loss"].sum() / tokens,
        "latent": latent_l1(g["pred_latents"], g["latents"]),
    }
    return losses, float(g["token_hit"].sum() / tokens)


def progressive_windows(cfg: Stage2Config) -> tuple[dict[str, int], int]:
    """({task: start epoch}, window length in epochs) of the progressive weights: upstream's rule from
    ``train.num_epochs`` (``progressive.windows=from_epochs``, spec §3.5), or ``starts`` and ``window_epochs``."""
    p = cfg.progressive
    if p.windows == "fixed":
        return dict(p.starts), p.window_epochs
    return upstream_progressive_windows(cfg.train.num_epochs, tuple(p.starts))


def multipliers(cfg: Stage2Config, epoch: int, batch: int, steps_per_epoch: int) -> dict[str, float]:
    """Progressive multipliers of this step (all 1 when ``progressive.enabled`` is off)."""
    p = cfg.progressive
    if not p.enabled:
        return {name: 1.0 for name in p.starts}
    starts, window = progressive_windows(cfg)
    return progressive_weights(epoch, batch, steps_per_epoch, starts, window, p.peak)


def prior_generators(s: Stage2, epoch: int, idx: np.ndarray, slot: int = 0) -> list[torch.Generator]:
    """One generator per clip for the prior's timesteps, noise and condition dropout, seeded from the run seed, the
    epoch, the clip and (after the first) the ridge slot, so that the draws do not depend on the batch size or the
    process count, and a subject set's subjects draw apart."""
    epoch_seed = clip_seed(s.cfg.run.seed, epoch)
    seeds = [clip_seed(epoch_seed, int(r)) for r in s.data.indices("train")[idx]]
    return clip_generators([clip_seed(v, slot) if slot else v for v in seeds])


def step_loss(s: Stage2, plan: AnyPlan, epoch: int, batch: int) -> dict[str, torch.Tensor | float]:
    """All stage-2 losses of step ``batch`` of ``epoch`` on the global batch, whatever the process count; the
    weighted total under ``loss`` and the multipliers as ``w_<task>``.

    Each process runs the model on its share of the clips (a subject set's: each subject's through its own ridge,
    :func:`share_outputs`), then gathers the per-clip outputs and targets, so the contrastive terms (video SoftCLIP,
    text InfoNCE), the batch Dice and the token-averaged caption loss see every clip of the step. (Dropout masks are
    drawn per process; the upstream ``batch`` decoder modes, defects 14-15, mix clips inside a process's share only.)
    """
    acc = s.accelerator
    slots, clips = plan.decode(plan.batch_at(epoch, batch)[plan.share(acc.process_index)])
    chunks = micro_batches(slots, clips, s.cfg.train.micro_batch)
    if len(chunks) > 1 and s.cfg.train.micro_batch and torch.is_grad_enabled():
        local = replayed_outputs(s, epoch, chunks)
    else:
        parts = [share_outputs(s, epoch, idx, slot) for slot, idx in chunks]
        local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    losses, accuracy = head_losses(s, {k: gather_cat(acc, v) for k, v in local.items()}, epoch)
    mult = multipliers(s.cfg, epoch, batch, plan.steps_per_epoch)
    total, _ = total_loss(losses, s.cfg.loss_weights, mult)
    return {"loss": total, **losses, "caption_acc": accuracy, **{f"w_{k}": v for k, v in mult.items()}}


def share_outputs(s: Stage2, epoch: int, idx: np.ndarray, slot: int) -> dict[str, torch.Tensor]:
    """Per-clip outputs and targets (leading clip axis) of training clips ``idx`` of the subject in ridge slot
    ``slot``: the prior's x0 from noised ground truth, the motion tokens and every head's output."""
    t, model = s.cfg.train, s.accelerator.unwrap_model(s.model)
    b = get_batch(s, "train", idx, slot)
    with torch.no_grad():
        cond = condition(s, "train", idx, slot, b.voxels).float()  # (b, T, D), frozen (upstream.prior_condition)
        targets = s.targets("train", idx, range(s.data.n_frames))  # (b, F, T, D)
        latents = s.targets.latents("train", idx)  # (b, F, C, s, s)
    _, prior_tokens = model.diffusion_prior(cond, targets[:, t.target_frame], prior_generators(s, epoch, idx, slot))
    motion = model.motion(model.head_tokens(cond, prior_tokens))  # (b, F, T, D) (upstream.head_input)
    local = {"prior_tokens": prior_tokens, "motion": motion, **head_outputs(s, b, motion, latents.shape[-1])}
    return local | {"targets": targets, "latents": latents, "caption_emb": b.caption_emb, "concepts": b.concepts,
                    "masks": b.masks}  # fmt: skip


# ---- micro batches: the whole batch's loss, a micro batch's activations (train.micro_batch) -------------------------
DIFFERENTIABLE = STAGE2_OUTPUTS


def micro_batches(slots: np.ndarray, clips: np.ndarray, size: int) -> list[tuple[int, np.ndarray]]:
    """(ridge slot, clip indices) of each forward pass of a process's share: one per slot, cut into pieces of at most
    ``size`` clips when ``size`` > 0."""
    out = []
    for slot in dict.fromkeys(slots.tolist()):
        idx = clips[slots == slot]
        step = size if size > 0 else len(idx)
        out += [(int(slot), idx[a:a + step]) for a in range(0, len(idx), step)]
    return out


def replayed_outputs(s: Stage2, epoch: int, chunks: list[tuple[int, np.ndarray]]) -> dict[str, torch.Tensor]:
    """:func:`share_outputs` of the micro batches ``chunks``, concatenated, through
    :class:`~utils.grad_cache.GradientCache`."""
    acc = s.accelerator

    def run_for(slot: int, idx: np.ndarray):
        def run() -> dict[str, torch.Tensor]:
            with autocast(acc, s.cfg):  # the backward pass runs outside the step's autocast
                return share_outputs(s, epoch, idx, slot)
        return run

    rest: dict[str, torch.Tensor] = {}
    anchor = torch.zeros((), requires_grad=True)  # makes the outputs part of the graph
    outs = GradientCache.apply(anchor, [run_for(slot, idx) for slot, idx in chunks], acc.device, rest, DIFFERENTIABLE)
    return dict(zip(DIFFERENTIABLE, outs, strict=True)) | rest


# ---- validation ----------------------------------------------------------------------------------------------------
def decode_val(s: Stage2, split: str, idx: np.ndarray, slot: int = 0) -> tuple[Batch, dict[str, Any]]:
    """Brain-only outputs of clips ``idx`` of the subject in ridge slot ``slot``
    (:meth:`~models.brain.NeuronsBrainModel.decode_voxels`, the mask queried with each clip's key-object name), the
    teacher-forced caption logits and the targets they are scored against."""
    model, t = s.accelerator.unwrap_model(s.model), s.cfg.train
    b = get_batch(s, split, idx, slot)
    rows = s.data.indices(split)[idx]
    gens = clip_generators([clip_seed(s.cfg.run.seed, int(r)) for r in rows], s.accelerator.device)
    latents = s.targets.latents(split, idx)  # (b, F, C, s, s)
    if s.conditions is None:
        dec = model.decode_voxels(b.voxels, gens, t.val_prior_steps, key_text=b.key_text,
                                  latent_size=latents.shape[-1], subj_idx=slot)  # fmt: skip
    else:
        dec = model.decode_condition(condition(s, split, idx, slot, b.voxels), gens, t.val_prior_steps,
                                     key_text=b.key_text, latent_size=latents.shape[-1])  # fmt: skip
    logits, labels, _ = model.caption_logits(dec.caption_prefix, b.tokens, b.token_mask)
    return b, {
        "prior": dec.prior_tokens,
        "motion": dec.motion,
        "caption_logits": logits,  # (K, V) at the K labelled positions
        "caption_labels": labels,  # (K,)
        "concepts": dec.concept_logits,
        "masks": dec.mask_logits,  # (b, F, S, S)
        "target": s.targets(split, idx, t.target_frame),  # (b, T, D)
        "latents": latents,
        "pred_latents": dec.latents,
    }


def chunk_scores(b: Batch, out: dict[str, Any], frame: int, up: UpstreamFlags) -> dict[str, float]:
    """Summed (not averaged) scores of one validation chunk."""
    target = F.normalize(out["target"].flatten(1), dim=-1)
    truth = torch.arange(len(target), device=target.device)
    sims = F.normalize(out["motion"][:, frame].flatten(1), dim=-1) @ target.T  # (b, b)
    prior_sims = F.normalize(out["prior"].flatten(1), dim=-1) @ target.T
    hits = out["caption_logits"].argmax(-1) == out["caption_labels"]  # (K,) labelled positions only
    pred = out["concepts"] > 0
    gt = b.concepts > 0.5
    has_obj = b.masks.flatten(1).amax(1) > 0
    dice = soft_dice(torch.sigmoid(out["masks"].float()), gt_masks_at(up, b.masks, out["masks"].shape[-1]))  # (b,)
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
    """Brain-only validation scores (see the module docstring) and the selection ``metric``; a subject set's are
    their mean over subjects (the ``metric`` too), with each subject's as ``subj<k>/<score>``."""
    per = {m.subject: evaluate_subject(s, split, slot) for slot, m in enumerate(s.subjects.members)}
    return mean_over_subjects(per)


@torch.no_grad()
def evaluate_subject(s: Stage2, split: str = "val", slot: int = 0) -> dict[str, float]:
    """:func:`evaluate`'s scores of the subject in ridge slot ``slot``."""
    model, t = s.accelerator.unwrap_model(s.model), s.cfg.train
    model.eval()
    n = s.data.n_clips(split)
    sums: dict[str, float] = {}
    for start in range(0, n, t.val_chunk):
        idx = np.arange(start, min(start + t.val_chunk, n))
        b, out = decode_val(s, split, idx, slot)
        for k, v in chunk_scores(b, out, t.target_frame, s.cfg.upstream).items():
            sums[k] = sums.get(k, 0.0) + v
    set_train_mode(model, s.frozen, s.cfg.train.backbone_mode)
    scores = {k: sums[k] / n for k in ("fwd_top1", "bwd_top1", "prior_fwd_top1", "latent_l1")}
    scores["caption_acc"] = sums["tokens_hit"] / max(sums["tokens"], 1.0)
    scores["concept_f1"] = 2 * sums["tp"] / max(2 * sums["tp"] + sums["fp"] + sums["fn"], 1.0)
    scores["dice"] = sums["dice_sum"] / max(sums["with_object"], 1.0)
    scores["metric"] = sum(scores[k] for k in t.selection)
    return scores


# ---- held-out scores beside input-blind baselines (the learning canaries, tests/test_canaries.py) -------------------
def add_split(s: Stage2, split: str) -> None:
    """Let :func:`evaluate` score ``split`` too (e.g. the test clips of a run that selected on val): its voxels (the
    mean of the repeats), caption targets and key-object text, named as in training (the split's own key objects are
    mapped to classes from its labels, as :func:`concept_namer` does for test selection)."""
    if split in s.voxels:
        return
    d, lm = s.data, s.accelerator.unwrap_model(s.model).text_dec.decoder.config
    namer = concept_namer(s.cfg, d)
    own = key_object_classes(d.concept_labels(split), d.key_object_names(split), d.concept_classes)
    namer = replace(namer, key_object_to_class={**own, **namer.key_object_to_class})
    s.voxels[split] = [m.voxels(split) for m in s.subjects.members]
    if s.conditions is not None:
        cache_conditions(s, {split: s.voxels[split]})
    s.captions[split] = caption_targets(s.clip, d.captions(split), s.cfg.train.caption_max_len, lm.n_positions,
                                        lm.vocab_size)  # fmt: skip
    names = [namer.train_name(n) for n in d.key_object_names(split)]
    s.key_text[split] = key_text_embeddings(s.clip, names, s.accelerator.device)


def trivial_scores(s: Stage2, split: str = "val") -> dict[str, float]:
    """What input-blind predictors score on ``split`` under :func:`evaluate`'s definitions (fit on the training
    clips where they need fitting), the floors that a head which learned from the brain must beat:

    * ``concept_f1_all``: every concept predicted for every clip (the all-positive rule);
    * ``concept_f1_mode``: every clip given the training clips' most frequent label set;
    * ``concept_auroc_prior``: the micro AUROC (:func:`auroc` over every (clip, class) entry) of each concept's
      training frequency as its score (a constant score gives 0.5);
    * ``dice_empty`` / ``dice_ones``: an all-zero / all-one mask; ``dice_mean``: the training clips' mean key-object
      mask (F, S, S) as a soft mask;
    * ``caption_acc_mode``: the training captions' most frequent token at every labelled position;
      ``caption_acc_position``: the most frequent token of each position.
    """
    model = s.accelerator.unwrap_model(s.model)
    size, pad = model.cfg.decoder_size, model.cfg.caption_pad
    labels = {k: s.data.concept_labels(k) > 0.5 for k in ("train", split)}  # (n, C) bool
    patterns, counts = labels["train"].unique(dim=0, return_counts=True)
    prevalence = labels["train"].float().mean(0)  # (C,)
    masks = {k: gt_masks_at(s.cfg.upstream, s.data.key_object_masks(k), size) for k in ("train", split)}
    tokens = {k: caption_labels(s.captions[k].ids, s.captions[k].mask, pad) for k in ("train", split)}  # (n, L)
    return {
        "concept_f1_all": micro_f1(torch.ones_like(labels[split]), labels[split]),
        "concept_f1_mode": micro_f1(patterns[counts.argmax()].expand_as(labels[split]), labels[split]),
        "concept_auroc_prior": auroc(prevalence.expand_as(labels[split]).flatten(), labels[split].flatten()),
        "dice_empty": mean_dice(torch.zeros_like(masks[split]), masks[split]),
        "dice_ones": mean_dice(torch.ones_like(masks[split]), masks[split]),
        "dice_mean": mean_dice(masks["train"].mean(0).expand_as(masks[split]), masks[split]),
        "caption_acc_mode": token_accuracy(mode_tokens(tokens["train"], per_position=False), tokens[split]),
        "caption_acc_position": token_accuracy(mode_tokens(tokens["train"], per_position=True), tokens[split]),
    }


@torch.no_grad()
def concept_outputs(s: Stage2, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """The brain-only concept logits (n, C) of ``split``, decoded as :func:`evaluate` does, and the labels (n, C)
    bool, on the CPU."""
    model, n, chunk = s.accelerator.unwrap_model(s.model), s.data.n_clips(split), s.cfg.train.val_chunk
    model.eval()
    logits, labels = [], []
    for start in range(0, n, chunk):
        b, out = decode_val(s, split, np.arange(start, min(start + chunk, n)))
        logits.append(out["concepts"].float().cpu())
        labels.append(b.concepts.cpu() > 0.5)
    set_train_mode(model, s.frozen, s.cfg.train.backbone_mode)
    return torch.cat(logits), torch.cat(labels)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of scores (N,) for bool labels (N,): P(positive scores above negative), ties
    counting one half; 0.5 when a class is missing."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return 0.5
    diff = pos[:, None] - neg[None]  # (P, N)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def micro_f1(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Micro F1 of bool predictions against bool labels, both (n, C) (stage 6's :func:`concept_f1`)."""
    return float(concept_f1(pred.float(), gt.float())["micro"])


def soft_dice(probs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-clip soft Dice of masks (n, F, S, S) in [0, 1] against GT masks (n, F, S, S) -> (n,)."""
    probs, gt = probs.flatten(1), gt.flatten(1)
    return (2 * (probs * gt).sum(1) + 1e-7) / (probs.sum(1) + gt.sum(1) + 1e-7)


def mean_dice(probs: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean :func:`soft_dice` over the clips that have a key object (as :func:`chunk_scores`)."""
    has_obj = gt.flatten(1).amax(1) > 0
    return float(soft_dice(probs, gt)[has_obj].mean()) if has_obj.any() else 0.0


def mode_tokens(labels: torch.Tensor, per_position: bool) -> torch.Tensor:
    """The most frequent labelled token of caption labels (n, L) (``IGNORE_INDEX`` where unlabelled): (L,) one per
    position, or the overall one repeated."""
    if per_position:
        return torch.as_tensor([most_frequent(labels[:, j]) for j in range(labels.shape[1])])
    return torch.full((labels.shape[1],), most_frequent(labels))


def most_frequent(labels: torch.Tensor) -> int:
    """The most frequent value of ``labels`` other than ``IGNORE_INDEX`` (0 when there is none)."""
    kept = labels[labels != IGNORE_INDEX]
    return int(kept.mode().values) if len(kept) else 0


def token_accuracy(guess: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of one token guess per position (L,) over the labelled positions of caption labels (n, L)."""
    keep = labels != IGNORE_INDEX
    return float((guess[None].expand_as(labels) == labels)[keep].float().mean())


# ---- the stage -----------------------------------------------------------------------------------------------------
def train(cfg: Stage2Config) -> Path:
    """Run stage 2; returns the stage folder."""
    seed_everything(cfg.run.seed)  # before the model is built: the fresh heads' initialisation is seeded too
    s = setup(cfg)
    plan = subject_plan(cfg, tuple(m.n_clips("train") for m in s.subjects.members), s.accelerator.num_processes)
    _, recorder = begin_stage(cfg, "2", depends_on=("1",))  # the plan is refused (batch size) before any write
    t, acc = cfg.train, s.accelerator
    on_cpu = PARKED if s.conditions is not None else ()  # never run: the cache gives their output
    plan, opt, sched, metrics = prepare_training(cfg, "2", s.model, acc, s.data.n_clips("train"), s.out_dir, plan,
                                                 on_cpu)  # fmt: skip
    select_on = selection_split(cfg.data)
    trainer = Trainer(
        cfg, s.model, acc, s.out_dir,
        lambda _idx, epoch, batch: step_loss(s, plan, epoch, batch),  # the prior draws from per-clip generators
        lambda: evaluate(s, select_on),
        eval_split=select_on,
    )  # fmt: skip
    trainable = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    log.info("stage 2: %s train clips, %d val, %d steps/epoch x %d epochs, %d trainable parameters; selection on %s; "
             "progressive windows %s", plan.n_items, s.data.n_clips("val"), plan.steps_per_epoch, t.num_epochs,
             trainable, selection_note(cfg.data), progressive_windows(cfg))  # fmt: skip
    if isinstance(plan, SubjectBatchPlan):
        log.info("stage 2: subjects %s; every global batch holds %d clips of each; validation and selection on the "
                 "mean over subjects", cfg.run.subj_text, plan.per_subject)  # fmt: skip
    try:
        fit(trainer, plan, opt, sched, metrics)
    finally:
        metrics.close()
    if acc.is_main_process:
        finish_stage(s, recorder, metrics)
    return s.out_dir


def finish_stage(s: Stage2, recorder, metrics: MetricsLog) -> None:
    curves = metrics.plot(s.out_dir / "curves.png")
    recorder.add_inputs(s.subjects.opened_files)
    recorder.add_input(s.stage1_ckpt / MODEL_FILE)
    for name in ("best", "last"):
        recorder.add_output(s.out_dir / "checkpoints" / name / MODEL_FILE)
    recorder.add_output(metrics.path)
    recorder.add_output(curves)
    starts, window = progressive_windows(s.cfg)
    recorder.extra.update({"selected_on": selection_note(s.cfg.data), "train_clips": s.data.n_clips("train"),
                           "backbone_mode": s.cfg.train.backbone_mode, "subjects": list(s.subjects.subjects),
                           "condition_cache": s.cfg.train.condition_cache, "micro_batch": s.cfg.train.micro_batch,
                           "progressive_windows": {"starts": starts, "window_epochs": window}})  # fmt: skip
    recorder.finish()
