"""Configuration of the NEURONS brain model: frozen dataclasses and the size registry.

A brain model has two kinds of dimensions:

* **foundation dims** (`FoundationDims`): fixed by the frozen foundation models it is trained against: the CLIP image
  token grid and width, the caption-embedding width, the VAE latent channels and size, and the GPT-2 widths. For the
  `paper` size they are the published OpenCLIP bigG / SD-1.5 VAE / GPT-2 values; for `toy` and `smoke` they must be
  passed in from the toy foundation models and are never written here as literals.
* **brain widths** (`BrainWidths`): the brain model's own capacity (hidden width, depths, heads, decoder channels).
  These are what `BRAIN_SIZES` fixes per size.

Data-derived sizes (voxel counts per subject, number of concept classes) are always passed in.

Upstream-defect switches (spec/upstream-neurons.md §10), fixed behaviour by default; `brain_config` takes them as
keywords (the first two are stored in `DecoderConfig`, `caption_pad` in `BrainConfig`):

* `text_attention` (defect 14): ``"own"`` each clip attends to its own text; ``"batch"`` upstream (every clip attends
  over the texts of the whole mini-batch). Two additions of ours are separate switches (upstream: both off):
  `text_attention_residual` (the attention output is added to the projected vision tokens) and
  `text_attention_null_kv` (a learned null key/value; a model built without it has no ``null_kv`` parameter).
* `temporal_scope` (defect 15): ``"clip"`` temporal attention over the frames of one clip; ``"batch"`` upstream
  (over all frames of the batch).
* `caption_pad` (defect 21): ``"dedicated"`` pads are masked out of attention and ignored by the loss via label -100;
  ``"clip_zero"`` upstream: pad id 0 doubles as a real CLIP token ("!"), no attention mask, every id-0 target ignored.
* `prior_condition` (defect 19): what conditions the diffusion prior: ``"clip_proj"`` the backbone's ``clip_proj``
  output (upstream NEURONS, and our default), ``"backbone"`` the pre-projection ``backbone_linear`` output that
  MindEye2 trained its prior on.
* `head_input`: what the decoupled heads (``motion_proj`` and everything after it) read. ``"prior"`` upstream: in
  training the prior's x0 prediction from noised ground-truth tokens, at test time the prior's brain-only sample (a
  train/test mismatch: the sample carries less of the clip than the backbone's own tokens, README "information
  ladder"); ``"brain"``: the prior's condition (the brain model's tokens, :meth:`prior_condition`), the same
  deterministic function of the fMRI in training and at test time. The keyframe still comes from the prior's sample.

The concept-name granularity switch (defect 22) is `models.heads.ConceptNamer.mode`; Dice reduction (defect 23) is an
argument of `utils.losses.dice_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from utils.errors import ConfigError

TextAttention = Literal["own", "batch"]
TemporalScope = Literal["clip", "batch"]
CaptionPad = Literal["dedicated", "clip_zero"]
PriorCondition = Literal["clip_proj", "backbone"]
HeadInput = Literal["prior", "brain"]

ALL_PARTS = (
    "ridge",
    "backbone",
    "clipproj",
    "diffusion_prior",
    "motion_proj",
    "classifier",
    "text_dec",
    "text_seg_dec",
)
STAGE1_PARTS = ("ridge", "backbone", "clipproj")


@dataclass(frozen=True)
class GPT2Dims:
    """Widths of the GPT-2 language model inside the captioner (a foundation role)."""

    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 50257
    n_positions: int = 1024


@dataclass(frozen=True)
class FoundationDims:
    """Dimensions fixed by the foundation models.

    clip_tokens: number of CLIP image tokens T (a square grid, 16×16 = 256 for bigG at 224 px).
    clip_dim: CLIP token width D (1664 for bigG, tokens after ln_post, before the projection).
    text_dim: caption-embedding width Dt (1280, pooled bigG text embedding).
    latent_channels / latent_size: VAE latent (4 × 28 × 28 for SD-1.5 at 224 px).
    gpt2: the captioner's language model widths.
    """

    clip_tokens: int
    clip_dim: int
    text_dim: int
    latent_channels: int
    latent_size: int
    gpt2: GPT2Dims = field(default_factory=GPT2Dims)


PAPER_FOUNDATION_DIMS = FoundationDims(
    clip_tokens=256, clip_dim=1664, text_dim=1280, latent_channels=4, latent_size=28, gpt2=GPT2Dims()
)


@dataclass(frozen=True)
class PriorConfig:
    """The MindEye2 diffusion prior's own widths (its token width and count come from the CLIP dims)."""

    depth: int = 6
    heads: int = 32
    dim_head: int = 52
    ff_mult: int = 4
    timesteps: int = 100
    cond_drop_prob: float = 0.2
    rotary_dim: int = 32
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128
    cosine_sim_scale: float = 16.0
    time_mlp_expansion: int = 2


@dataclass(frozen=True)
class DecoderConfig:
    """TextDrivenDecoder + DecoderVideo widths and the defect-14/15 switches.

    map_channels: 1×1-conv projector widths from the text width down to the decoder input (512, 128, 64).
    block_out_channels: DecoderVideo block widths, diffusers order (smallest first); the decoder runs them reversed and
      upsamples ×2 after every block but the last, so the output side is ``sqrt(clip_tokens) · 2**(len-1)``.
    """

    map_channels: tuple[int, ...] = (512, 128, 64)
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    norm_groups: int = 32
    attn_dropout: float = 0.1
    map_dropout: float = 0.3
    text_attention: TextAttention = "own"
    text_attention_residual: bool = True  # defect 14 (ours): add the attention output to the projected vision tokens
    text_attention_null_kv: bool = True  # defect 14 (ours): a learned null key/value beside the text keys
    temporal_scope: TemporalScope = "clip"


@dataclass(frozen=True)
class BrainWidths:
    """What a size in `BRAIN_SIZES` fixes: the brain model's own capacity."""

    hidden_dim: int
    n_blocks: int
    prior: PriorConfig
    decoder: DecoderConfig
    backbone_dropout: float = 0.15


@dataclass(frozen=True)
class BrainConfig:
    """Everything needed to build `models.brain.NeuronsBrainModel`."""

    n_voxels: tuple[int, ...]
    n_classes: int
    dims: FoundationDims
    widths: BrainWidths
    n_frames: int = 6
    seq_len: int = 1
    caption_pad: CaptionPad = "dedicated"
    prior_condition: PriorCondition = "clip_proj"
    head_input: HeadInput = "prior"
    parts: tuple[str, ...] = ALL_PARTS

    def __post_init__(self) -> None:
        _validate(self)

    # Short-hands used throughout the model code.
    @property
    def clip_tokens(self) -> int:
        return self.dims.clip_tokens

    @property
    def clip_dim(self) -> int:
        return self.dims.clip_dim

    @property
    def text_dim(self) -> int:
        return self.dims.text_dim

    @property
    def token_grid(self) -> int:
        """Side of the square CLIP token grid (16 for 256 tokens)."""
        return math.isqrt(self.dims.clip_tokens)

    @property
    def decoder_size(self) -> int:
        """Side of the decoder's mask / latent maps (64 in the paper)."""
        return self.token_grid * 2 ** (len(self.widths.decoder.block_out_channels) - 1)


BRAIN_SIZES: dict[str, BrainWidths] = {
    "paper": BrainWidths(hidden_dim=4096, n_blocks=4, prior=PriorConfig(), decoder=DecoderConfig()),
    "toy": BrainWidths(
        hidden_dim=256,
        n_blocks=2,
        prior=PriorConfig(depth=2, heads=4, dim_head=16, rotary_dim=8),
        # two decoder blocks: 8x8 tokens -> 16x16 maps (three blocks made stage 2 four times slower on the CPU)
        decoder=DecoderConfig(map_channels=(64, 32, 16), block_out_channels=(16, 32), norm_groups=8),
    ),
    "smoke": BrainWidths(
        hidden_dim=32,
        n_blocks=1,
        prior=PriorConfig(depth=1, heads=2, dim_head=8, rotary_dim=4, timesteps=20),
        decoder=DecoderConfig(map_channels=(16, 8, 8), block_out_channels=(4, 8, 8), norm_groups=4),
    ),
}


def brain_config(
    size: str,
    *,
    n_voxels: tuple[int, ...] | list[int],
    n_classes: int,
    dims: FoundationDims | None = None,
    text_attention: TextAttention | None = None,
    temporal_scope: TemporalScope | None = None,
    **overrides,
) -> BrainConfig:
    """Build the config of a named size.

    size: a key of `BRAIN_SIZES`.
    n_voxels: voxel count per subject, from the data (`voxels.shape[-1]`).
    n_classes: number of concept classes, from the data.
    dims: the foundation dims; required for `toy` / `smoke` (read them from the toy foundation models), defaults to
      `PAPER_FOUNDATION_DIMS` for `paper`.
    text_attention / temporal_scope: the defect-14/15 switches of the decoder (None keeps the size's default).
    overrides: any other `BrainConfig` field (``caption_pad``, ``n_frames``, ``parts``, ...), plus
      ``decoder_overrides`` / ``prior_overrides`` dicts for fields of the nested width configs.
    """
    if size not in BRAIN_SIZES:
        raise ConfigError(f"unknown brain size {size!r}", f"use one of {sorted(BRAIN_SIZES)}")
    if dims is None:
        if size != "paper":
            raise ConfigError(
                f"brain size {size!r} needs the foundation dims",
                "pass dims=FoundationDims(...) read from the toy foundation models",
            )
        dims = PAPER_FOUNDATION_DIMS
    widths = BRAIN_SIZES[size]
    decoder_overrides = dict(overrides.pop("decoder_overrides", None) or {})
    if text_attention is not None:
        decoder_overrides["text_attention"] = text_attention
    if temporal_scope is not None:
        decoder_overrides["temporal_scope"] = temporal_scope
    prior_overrides = overrides.pop("prior_overrides", None) or {}
    if decoder_overrides or prior_overrides:
        widths = replace(
            widths,
            decoder=replace(widths.decoder, **decoder_overrides),
            prior=replace(widths.prior, **prior_overrides),
        )
    return BrainConfig(
        n_voxels=tuple(int(v) for v in n_voxels), n_classes=n_classes, dims=dims, widths=widths, **overrides
    )


def _validate(cfg: BrainConfig) -> None:
    def check(ok: bool, cause: str, fix: str) -> None:
        if not ok:
            raise ConfigError(cause, fix)

    dec = cfg.widths.decoder
    check(len(cfg.n_voxels) >= 1 and min(cfg.n_voxels) > 0, f"bad n_voxels {cfg.n_voxels}", "one count per subject")
    check(cfg.n_classes > 0, f"bad n_classes {cfg.n_classes}", "read it from the concept labels")
    check(
        math.isqrt(cfg.clip_tokens) ** 2 == cfg.clip_tokens,
        f"clip_tokens={cfg.clip_tokens} is not a square grid",
        "the decoder reshapes tokens to a square map",
    )
    check(dec.text_attention in ("own", "batch"), f"bad text_attention {dec.text_attention!r}", "use 'own' or 'batch'")
    check(dec.temporal_scope in ("clip", "batch"), f"bad temporal_scope {dec.temporal_scope!r}", "use 'clip'/'batch'")
    check(
        cfg.prior_condition in ("clip_proj", "backbone"),
        f"bad prior_condition {cfg.prior_condition!r}",
        "use 'clip_proj' or 'backbone'",
    )
    check(cfg.head_input in ("prior", "brain"), f"bad head_input {cfg.head_input!r}", "use 'prior' or 'brain'")
    check(
        cfg.caption_pad in ("dedicated", "clip_zero"),
        f"bad caption_pad {cfg.caption_pad!r}",
        "use 'dedicated' or 'clip_zero'",
    )
    check(
        all(c % dec.norm_groups == 0 for c in dec.block_out_channels),
        f"decoder channels {dec.block_out_channels} not divisible by norm_groups={dec.norm_groups}",
        "pick norm_groups dividing every block width",
    )
    check(len(dec.map_channels) == 3, f"map_channels {dec.map_channels} must have 3 entries", "e.g. (512, 128, 64)")
    check(
        cfg.widths.prior.rotary_dim <= cfg.widths.prior.dim_head and cfg.widths.prior.rotary_dim % 2 == 0,
        "prior rotary_dim must be even and <= dim_head",
        "e.g. rotary_dim=min(32, dim_head)",
    )
    unknown = set(cfg.parts) - set(ALL_PARTS)
    check(not unknown, f"unknown model parts {sorted(unknown)}", f"choose from {ALL_PARTS}")
