"""The typed config of every stage. Defaults are the paper's values (upstream spec §1.2, §3, §11).

Shared sections (``run``, ``paths``, ``data``, ``model``) appear in every stage config; a profile sets them once at
its top level. Stage-specific sections (``train``, ``loss_weights``, ``sample``, ...) sit under ``stage<k>:`` in a
profile and are addressed without that prefix on the command line (``--set train.batch_size=8``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from utils.data import DataConfig
from utils.errors import ConfigError
from utils.stages import STAGES
from utils.toy_world import ToyWorldConfig

Mode = Literal["enhance", "motion"]


Subject = Literal[1, 2, 3]


def parse_subjects(text: str) -> int | tuple[int, ...]:
    """"2" → 2, "1,2,3" → (1, 2, 3): the driver's SUBJ and ``--subj`` (checked by :class:`RunConfig`)."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"bad subject list {text!r}", "give a subject 1, 2 or 3, or a set such as 1,2,3") from None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class RunConfig:
    """Identity of a run and how it executes."""

    exp: str = "neurons"
    # one subject, or a subject set (1,2,3): stages 1-2 then train one model with a ridge per subject (in this order:
    # ridge.linears.<i> is subject subj[i]) and everything after the ridge shared
    subj: Subject | tuple[Subject, ...] = 1
    # stages 3-6 of a subject set decode each subject apart: this pass's subject (0: the run's only subject). The
    # stage entry point sets it, one pass per subject (utils.cli.run_stage); its outputs go to subj_<set>/subj_<k>/
    decode_subj: int = 0
    mode: Mode = "enhance"
    profile: str = "paper"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    use_wandb: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        if isinstance(self.subj, tuple):
            if len(set(self.subj)) != len(self.subj) or not self.subj:
                raise ConfigError(f"run.subj {list(self.subj)} is empty or names a subject twice",
                                  "give distinct subjects, e.g. 1,2,3")  # fmt: skip
            if len(self.subj) == 1:  # one subject is a single-subject run: the same config (and hash) as subj=1
                object.__setattr__(self, "subj", self.subj[0])
        if self.decode_subj and (not isinstance(self.subj, tuple) or self.decode_subj not in self.subj):
            raise ConfigError(f"run.decode_subj {self.decode_subj} is not a member of a subject set "
                              f"(run.subj {self.subj_text})",
                              "leave run.decode_subj at 0; the stages set it")  # fmt: skip

    @property
    def subjects(self) -> tuple[int, ...]:
        """The subjects of the run, in ridge order: ``(subj,)`` for a single-subject run."""
        return self.subj if isinstance(self.subj, tuple) else (int(self.subj),)

    @property
    def subject(self) -> int:
        """The subject whose fMRI this step decodes: the run's one subject, or a set's ``decode_subj`` (a set
        without it is refused with its cause and fix)."""
        if self.decode_subj:
            return self.decode_subj
        if isinstance(self.subj, tuple):
            raise ConfigError(f"this step works on one subject at a time; run.subj is the set {self.subj_text}",
                              "run it through its stage entry point (train_neurons.sh), which decodes each subject "
                              "of a set in turn, or give one subject")  # fmt: skip
        return int(self.subj)

    @property
    def slot(self) -> int:
        """The ridge slot of :attr:`subject` in the run's brain model (0 for a single-subject run)."""
        return self.subjects.index(self.subject)

    @property
    def subj_text(self) -> str:
        """The driver's SUBJ: "2", or "1,2,3" for a set."""
        return ",".join(map(str, self.subjects))


@dataclass(frozen=True)
class PathsConfig:
    """Where data, weights and runs live; relative paths are taken from the working directory."""

    data_root: str = "cc2017_dataset"
    weights_root: str = "pretrained_weights"
    exp_root: str = "EXP"


@dataclass(frozen=True)
class ModelConfig:
    size: Literal["paper", "toy", "smoke"] = "paper"  # brain-model size registry key
    backbone_dropout: float | None = None  # None: the size's value (MindEye2: 0.15)


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 120
    num_epochs: int = 30
    max_lr: float = 5e-5
    weight_decay: float = 0.01
    lr_scheduler: Literal["cycle", "linear", "constant"] = "cycle"
    pct_start: float | None = None  # None: 2 / num_epochs, as upstream
    final_div_factor: float = 1000.0
    cycle_momentum: bool = True  # upstream OneCycleLR cycles AdamW beta1 (defect 20); kept for fidelity
    grad_clip: float | None = None
    # AdamW implementation: "auto" (torch's default: foreach on GPU), "for_loop", "foreach", "fused" (no
    # parameter-sized temporaries), "8bit" (bitsandbytes AdamW8bit, optional package: 2 bytes of state per parameter)
    adamw_impl: Literal["auto", "for_loop", "foreach", "fused", "8bit"] = "auto"
    grad_checkpointing: bool = False  # recompute backbone / prior activations in the backward pass (less memory)
    # skip a last partial batch each epoch (reshuffled, so every clip is still used); upstream's DataLoader kept it
    # (drop_last=False, spec §3.6; 4,320 clips make full batches at its batch sizes 120 and 10)
    drop_last: bool = True
    resume: bool = False  # continue from checkpoints/last (exactly where it stopped)
    log_every: int = 10  # training-loss records every N steps


@dataclass(frozen=True)
class Stage1Train(OptimConfig):
    mixup_pct: float = 1.0  # BiMixCo for the whole run
    bimixco_beta: float = 0.15
    bimixco_prob: float = 0.5
    temp_image: float = 0.006
    temp_text: float = 0.1
    text_weight: float = 0.25
    mixco_self_partner_quirk: bool = False  # defect 17: MindEye overwrites the diagonal when a sample is its partner
    text_nce_soft_labels: bool = True  # defect 17: upstream used hard labels for the text NCE on mixed voxels
    # training fMRI of a step: "cycle" = repeat ``epoch % repeats``, as upstream; "mean" = the mean of the repeats
    # (less noise per sample, no repeat-to-repeat augmentation)
    voxel_repeats: Literal["cycle", "mean"] = "cycle"
    target_frame: int = 2  # CLIP target frame of a clip ...
    alternate_target_frame: bool = True  # ... alternating with the next one by epoch parity, as upstream
    init_from_mindeye2: bool = True  # start the backbone from MindEye2's subject-1 weights (weights_root/last.pth)
    # new-subject adaptation (issue 18): the run folder of a subject-set model (or its stage1/ folder); every part
    # after the ridge starts from its best stage-1 checkpoint (replacing init_from_mindeye2) and this run's subject,
    # which must not be in that set, gets the only fresh part: its ridge
    init_from: str = ""
    adapt_ridge_epochs: int = 0  # with init_from: the first epochs train the new ridge alone, then everything
    adapt_ridge_lr: float | None = None  # the peak LR of those ridge-only epochs (None: max_lr, as the rest)


@dataclass(frozen=True)
class Stage2Train(OptimConfig):
    batch_size: int = 10
    num_epochs: int = 50
    mixup_pct: float = 0.0
    softclip_temp_start: float = 0.004
    softclip_temp_end: float = 0.0075
    temp_text: float = 0.1
    caption_max_len: int = 60  # CLIP-BPE ids per caption (cut to the clip tokenizer's context when shorter)
    caption_label_smoothing: float = 0.1
    target_frame: int = 2  # the prior's CLIP target frame (and the frame scored by validation retrieval)
    voxel_repeat: int = 0  # upstream trains stage 2 on fMRI repeat 0 only (defect 20)
    init_from_mindeye2: bool = True  # start the prior from MindEye2's subject-1 weights (weights_root/last.pth)
    val_prior_steps: int | None = None  # DDPM steps of the validation prior samples (None: all, as at inference)
    val_chunk: int = 100  # validation retrieval within chunks of this many clips (upstream: batches of 100)
    selection: tuple[str, ...] = ("fwd_top1", "bwd_top1", "caption_acc")  # validation scores summed into "metric"
    # trainable parts to freeze too (ridge, backbone and clipproj always are): any of diffusion_prior, motion_proj,
    # classifier, text_seg_dec, text_dec (GPT-2 and its prefix projection) or text_dec.decoder (GPT-2 only)
    freeze: tuple[str, ...] = ()
    # the frozen stage-1 parts (ridge, backbone, clipproj) while training: "eval" (no dropout: the condition the
    # prior sees is the one stage 3 gives it); "train" is upstream's model.train(): the backbone's dropout stays on
    backbone_mode: Literal["eval", "train"] = "eval"
    # new-subject adaptation (issue 18): the run folder of a subject-set model; the prior and every head start from
    # its best stage-2 checkpoint (replacing init_from_mindeye2), on top of this run's adapted stage 1
    init_from: str = ""
    # issue 19, stage 2 without the backbone on the device: the prior's condition of every clip (the frozen stage-1
    # model's output) computed once into <run>/stage2/condition_cache and read in every step and validation, so the
    # ridge and the backbone stay on the CPU: "compute" (run them every step), "fp16" or "fp32" (stored dtype);
    # needs backbone_mode=eval (a backbone with dropout on gives a new condition every step)
    condition_cache: Literal["compute", "fp16", "fp32"] = "compute"
    # the conditions of the TRAINING clips: "stage1", the stage-1 model's, which trained on these clips and predicts
    # them far better than unseen ones (toy: 50-way 0.93 vs 0.17 on test), so the prior and the heads learn on inputs
    # that test clips never give (as upstream); "cross_fit", each clip's from the stage-1 fold model that did not see
    # it (data.cross_fit_folds; needs the condition cache). Validation and test clips are unseen either way
    condition_source: Literal["stage1", "cross_fit"] = "stage1"
    # clips per forward/backward pass of a process's share (0: the whole share at once). The loss stays that of the
    # whole global batch, contrastive terms included (a gradient cache: every micro batch first runs without
    # gradients, the loss's gradients with respect to the per-clip outputs are taken, then each micro batch runs again
    # with its dropout draws replayed and back-propagates its slice); costs one more forward pass of the heads
    micro_batch: int = 0


@dataclass(frozen=True)
class Stage2LossWeights:
    prior: float = 30.0
    video_softclip: float = 1.0
    text_nce: float = 1.0
    dice: float = 1.0
    concepts: float = 1.0
    caption: float = 1.0
    latent: float = 1.0


@dataclass(frozen=True)
class ProgressiveConfig:
    """Progressive task weights (§3.5): inside a task's window the weight rises 1 -> peak -> 1 as |sin|."""

    enabled: bool = True
    peak: float = 10.0
    # "from_epochs": upstream's rule (spec §3.5) from train.num_epochs E: window 2·(E//5) epochs, the k-th task of
    # `starts` from epoch k·(E//5) (50 epochs: the literals below; under 5 epochs every weight is 1, as upstream);
    # "fixed": window_epochs and starts as written
    windows: Literal["from_epochs", "fixed"] = "from_epochs"
    window_epochs: int = 20
    starts: dict[str, int] = field(default_factory=lambda: {"dice": 0, "concepts": 10, "caption": 20, "latent": 30})


@dataclass(frozen=True)
class UpstreamFlags:
    """Reproduce an upstream defect exactly (see the spec's defect list); the defaults are the corrected behaviour."""

    text_attention: Literal["own", "batch"] = "own"  # defect 14: the scope (own clip's text / the whole batch's)
    text_attention_residual: bool = True  # defect 14 (ours): attention output added to the vision tokens; upstream off
    text_attention_null_kv: bool = True  # defect 14 (ours): a learned null key/value; upstream off
    temporal_scope: Literal["clip", "batch"] = "clip"  # defect 15
    caption_pad: Literal["dedicated", "clip_zero"] = "dedicated"  # defect 21
    dice_reduction: Literal["sample", "batch"] = "sample"  # defect 23
    concept_names: Literal["class", "fine", "upstream"] = "class"  # defect 22 (models.heads.ConceptNamer modes)
    gt_mask_resize: Literal["majority", "nearest"] = "majority"  # stage-2 Dice targets (docs/fidelity.md)
    # defect 19: the prior's condition; "clip_proj" (upstream NEURONS, kept as default: see docs/fidelity.md) or
    # "backbone", the pre-projection output MindEye2 trained the prior on
    prior_condition: Literal["clip_proj", "backbone"] = "clip_proj"
    # what the decoupled heads read (models/sizes.py): "brain" the prior's condition, the same in training and at
    # test time; "prior" upstream: x0 from noised ground-truth tokens in training, the brain-only sample at test time
    head_input: Literal["brain", "prior"] = "brain"


@dataclass(frozen=True)
class SharedConfig:
    """The sections every stage shares; a profile sets them once at its top level."""

    run: RunConfig = field(default_factory=RunConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass(frozen=True)
class Stage1Config(SharedConfig):
    train: Stage1Train = field(default_factory=Stage1Train)


@dataclass(frozen=True)
class Stage2Config(SharedConfig):
    train: Stage2Train = field(default_factory=Stage2Train)
    loss_weights: Stage2LossWeights = field(default_factory=Stage2LossWeights)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    upstream: UpstreamFlags = field(default_factory=UpstreamFlags)


@dataclass(frozen=True)
class Stage3Sample:
    batch_size: int = 20
    prior_steps: int = 100
    unclip_steps: int = 38
    unclip_guidance: float = 5.0
    # defect 24: CFG's unconditional context: "null" (all-zero tokens, the dropped condition the unCLIP was trained
    # with) or upstream's "random_noise" (N(0, 1) tokens shaped like the condition, MindEye2's unclip_recon)
    unclip_uncond: Literal["null", "random_noise"] = "null"
    unclip_size: int = 768  # generated at this size, stored at keyframe_size
    keyframe_size: int = 256
    caption_decoding: Literal["greedy", "beam"] = "greedy"
    caption_beams: int = 3
    caption_max_tokens: int = 30
    caption_max_tokens_enhance: int = 60
    caption_length_penalty: float = 1.0  # beam search: a hypothesis scores sum(log p) / length ** penalty
    mask_soft_low: float = 0.5  # enhance soft mask values {low, 1}
    num_previews: int = 16
    preview_fps: int = 8  # GIF previews (upstream: 8 fps)
    num_clips: int | None = None  # decode only the first N test clips (None: all of them)
    output_dtype: Literal["float16", "float32"] = "float16"  # keyframes, blurry videos, masks, prior tokens
    save_prior_tokens: bool = False  # (N, T, D) prior samples: 1 GB at the paper's size
    # the stage-2 checkpoint decoded: "best" (selected on data.validation's split); upstream read "last"
    # (brain_model_prior_last.pth, spec §3.7)
    checkpoint: Literal["best", "last"] = "best"
    # diagnostics (bench/info_ladder.py), never a result: "model" decodes as the model does; "prior" / "brain" /
    # "ground_truth" feed the heads AND the keyframe the prior's sample, the prior's condition, or the CLIP tokens of
    # the stimulus' target frame (an oracle)
    tokens: Literal["model", "prior", "brain", "ground_truth"] = "model"
    oracle_blurry: bool = False  # blurry videos = the VAE's reconstruction of the stimulus (no mask applied)
    oracle_captions: bool = False  # captions = the stimulus' own captions

    @property
    def oracles(self) -> list[str]:
        """The inputs replaced by their ground truth (empty for a real decoding)."""
        picked = [("tokens", self.tokens == "ground_truth"), ("blurry", self.oracle_blurry),
                  ("captions", self.oracle_captions)]  # fmt: skip
        return [name for name, on in picked if on]


@dataclass(frozen=True)
class Stage3Config(SharedConfig):
    sample: Stage3Sample = field(default_factory=Stage3Sample)
    upstream: UpstreamFlags = field(default_factory=UpstreamFlags)


@dataclass(frozen=True)
class Stage4Caption:
    batch_size: int = 20  # keyframes per BLIP-2 generate() call
    max_new_tokens: int | None = None  # None: generate()'s default length, as upstream (§5)


@dataclass(frozen=True)
class Stage4Config(SharedConfig):
    caption: Stage4Caption = field(default_factory=Stage4Caption)


@dataclass(frozen=True)
class Stage5Video:
    num_frames: int = 16
    resolution: int = 256
    steps: int = 25
    guidance: float = 8.5
    strength: float = 0.3  # a real img2img strength (fixes defect 26); used by init="img2img" only
    # defect 26: "img2img" runs the last round(steps * strength) DDIM steps from the init latents noised to the first
    # of them; "noisy_start" is upstream's low_strength=0.3: the init noised at the grid's largest timestep (t = 961
    # of 25 steps) and all `steps` run; "noise" (ablation without the blurry video, bench/ablations.py): pure Gaussian
    # noise, no init video, all `steps` run (text + keyframe only)
    init: Literal["img2img", "noisy_start", "noise"] = "img2img"
    # spec §6 step 4: "per_clip" seeds a generator per clip with clip_seed(run.seed, clip); "zero" is upstream's
    # torch.manual_seed(0) for every clip, its two VAE samplings drawn before the reseed (pipeline/stage5.py)
    seed: Literal["per_clip", "zero"] = "per_clip"
    write_gif_grid: bool = False  # spec §6 step 6: upstream's [GT | generated] GIF grid per clip, gif_grid/<clip>.gif
    lora_scale: float = 1.0
    controlnet_scale: float = 1.0
    prompt_suffix: str = ", 8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3"
    negative_prompt: str = (
        "semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, anime, text, close up, cropped, out of frame, "
        "worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, "
        "mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, "
        "bad proportions, "
        "extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing arms, missing legs, "
        "extra arms, extra legs, fused fingers, too many fingers, long neck"
    )
    eval_frames: tuple[int, ...] = (4, 6, 8, 10, 12, 14)
    caption_source: Literal["auto", "blip2", "gpt2"] = "auto"  # auto: stage 4 when current, else stage 3 ...
    caption_fallback: bool = False  # ... only when True; False: auto with stage 4 stale or missing is an error
    num_clips: int | None = None  # the first N test clips (None: all of stage 3's)
    num_previews: int = 8  # GIF previews of the first K generated videos
    preview_fps: float = 8.0


@dataclass(frozen=True)
class Stage5Config(SharedConfig):
    video: Stage5Video = field(default_factory=Stage5Video)


@dataclass(frozen=True)
class Stage6Eval:
    # stage 6 always scores both protocols (metrics_<mode>.json "protocols"); this one is the headline: mirrored under
    # the file's top-level "metrics" and listed first in the report (upstream reports only "neurons", spec §7)
    protocol: Literal["standard", "neurons"] = "standard"
    # transformers-5 image-processor backend of the metric classifiers / CLIP-pcc: "torchvision" (what
    # AutoImageProcessor picks) or "pil" (upstream's transformers-4 slow processors; ≤ 1 uint8 level apart)
    image_backend: Literal["torchvision", "pil"] = "torchvision"
    n_trials: int = 100
    ways: tuple[int, ...] = (2, 50)
    top_k: int = 1
    gt_top_k: int = 3  # N-way rule: the ground truth's top classes that may beat the distractors (spec §7)
    seed: int = 0
    report_samples: int = 8
    batch_size: int = 16  # clips per classifier / CLIP call
    bootstrap: int = 100  # clip resamples: every metric's ci95 and the std of F1 / BLEU; 0: those null
    # N-way shuffled chance: each clip's prediction scored against the ground truth of the `shuffles` clips before it
    # (the chance level of this prediction set, beside the analytic one); 0: off
    shuffles: int = 5


@dataclass(frozen=True)
class Stage6Config(SharedConfig):
    eval: Stage6Eval = field(default_factory=Stage6Eval)


@dataclass(frozen=True)
class DiagnosticsSample:
    """Stage e reads stage 3's outputs (it rebuilds no model, unlike upstream's script, spec §8)."""

    num_panels: int = 16  # panel figures (GT, blurry, masked blurry, GT mask, predicted mask) of the first clips
    concept_threshold: float = 0.5  # a concept is predicted when its probability exceeds this (as upstream)
    mask_threshold: float = 0.5  # a mask pixel is predicted when its probability exceeds this (as stage 6)


@dataclass(frozen=True)
class DiagnosticsConfig(SharedConfig):
    sample: DiagnosticsSample = field(default_factory=DiagnosticsSample)


@dataclass(frozen=True)
class WorldBuildConfig(SharedConfig):
    """``download_dataset.py --toy``: builds the toy cortex world described by ``world`` into ``paths.data_root``."""

    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)


SHARED_SECTIONS = ("run", "paths", "data", "model", "world")

# The config-class column of the stage table (utils/stages.py), by stage key in the table's order.
STAGE_CONFIGS: dict[str, type[SharedConfig]] = {
    "1": Stage1Config,
    "2": Stage2Config,
    "3": Stage3Config,
    "4": Stage4Config,
    "5": Stage5Config,
    "6": Stage6Config,
    "e": DiagnosticsConfig,
}
STAGE_SECTIONS = {stage.key: stage.section for stage in STAGES}
STAGE_KEY_OF: dict[type[SharedConfig], str] = {cls: key for key, cls in STAGE_CONFIGS.items()}
# Configs of the tools around the stages; they read only the shared sections of a profile.
TOOL_CONFIGS: dict[str, type[SharedConfig]] = {"world": WorldBuildConfig}
