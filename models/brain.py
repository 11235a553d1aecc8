"""The NEURONS brain model: ridge, MindEye2 backbone, diffusion prior and the decoupled task heads.

Build it with ``NeuronsBrainModel(brain_config(size, n_voxels=..., n_classes=..., dims=...))``. Attribute names are
MindEye2's / upstream NEURONS' (`ridge.linears.<i>`, `backbone.mixer_blocks1`, `backbone.backbone_linear`,
`backbone.clip_proj`, `diffusion_prior.net`, ...) so MindEye2's `last.pth` maps onto it (`models.mindeye2_keymap`).

Shapes: voxels (B, R, V) with R = `seq_len` (1), CLIP tokens (B, T, D), per-frame tokens (B, F, T, D),
caption embeddings (B, Dt).

Brain-only decoding, the one path of stage-2 validation and stage 3, is :meth:`NeuronsBrainModel.decode_voxels`
(a :class:`BrainDecoding`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.heads import IGNORE_INDEX, CLIPProj, MotionProj, MultiLabelClassifier, TextDecoder, caption_labels
from models.prior import BrainDiffusionPrior, GainLayerNorm, Generators, MultiQueryAttention, PriorNetwork
from models.sizes import BrainConfig
from models.video_decoder import SpatioTemporalAttention, TextDrivenDecoder
from utils.resize import resize_maps_nearest

if TYPE_CHECKING:  # transformers is imported only where GPT-2 is built: stage 1 and its benchmark need torch alone
    from transformers import GPT2LMHeadModel


class RidgeRegression(nn.Module):
    """One Linear(V_s → hidden) per subject s. x (B, R, V_s) → (B, R, hidden)."""

    def __init__(self, n_voxels: Sequence[int], hidden_dim: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(v, hidden_dim) for v in n_voxels)

    def forward(self, x: torch.Tensor, subj_idx: int = 0) -> torch.Tensor:
        return self.linears[subj_idx](x)


class MindEyeBackbone(nn.Module):
    """MindEye2 `BrainNetwork` without its blurry branch.

    x (B, R, hidden) → (voxels_embed, clip_embeds), each (B, T, D).

    mixer_blocks1 mix the hidden channels (LN → Linear → GELU → Dropout → Linear); mixer_blocks2 act on the R axis
    (degenerate for R = 1 but kept so the checkpoint loads). Each branch's residual is that branch's previous output.
    """

    def __init__(self, hidden_dim: int, seq_len: int, n_blocks: int, clip_tokens: int, clip_dim: int, drop: float):
        super().__init__()
        self.clip_tokens, self.clip_dim = clip_tokens, clip_dim
        self.grad_checkpointing = False  # recompute each mixer block and clip_proj in the backward pass
        self.mixer_blocks1 = nn.ModuleList(self._mixer(hidden_dim, drop) for _ in range(n_blocks))
        self.mixer_blocks2 = nn.ModuleList(self._mixer(seq_len, drop) for _ in range(n_blocks))
        self.backbone_linear = nn.Linear(hidden_dim * seq_len, clip_tokens * clip_dim)
        self.clip_proj = nn.Sequential(
            nn.LayerNorm(clip_dim),
            nn.GELU(),
            nn.Linear(clip_dim, clip_dim),
            nn.LayerNorm(clip_dim),
            nn.GELU(),
            nn.Linear(clip_dim, clip_dim),
            nn.LayerNorm(clip_dim),
            nn.GELU(),
            nn.Linear(clip_dim, clip_dim),
        )

    @staticmethod
    def _mixer(width: int, drop: float) -> nn.Sequential:
        mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(drop), nn.Linear(width, width))
        return nn.Sequential(nn.LayerNorm(width), mlp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        residual1 = x  # (B, R, H)
        residual2 = x.transpose(1, 2)  # (B, H, R)
        for block1, block2 in zip(self.mixer_blocks1, self.mixer_blocks2):
            if ckpt:
                x, residual1, residual2 = checkpoint(_mixer_step, block1, block2, x, residual1, residual2,
                                                     use_reentrant=False)  # fmt: skip
            else:
                x, residual1, residual2 = _mixer_step(block1, block2, x, residual1, residual2)
        voxels_embed = self.backbone_linear(x.flatten(1)).view(len(x), self.clip_tokens, self.clip_dim)  # (B, T, D)
        if ckpt:  # clip_proj holds nine (B, T, D) activations: the largest in stage 1
            return voxels_embed, checkpoint(self.clip_proj, voxels_embed, use_reentrant=False)
        return voxels_embed, self.clip_proj(voxels_embed)


def _mixer_step(block1: nn.Module, block2: nn.Module, x, residual1, residual2):
    """One mixer block pair: channel mixing on (B, R, H), then mixing along R on (B, H, R); returns the new
    (x (B, R, H), residual1, residual2)."""
    x = block1(x) + residual1
    residual1 = x
    x = block2(x.transpose(1, 2)) + residual2
    residual2 = x
    return x.transpose(1, 2), residual1, residual2


class NeuronsBrainModel(nn.Module):
    """Container of the NEURONS brain-side modules; only `cfg.parts` are built (stage 1 needs ridge/backbone/clipproj).

    gpt2: an already-built `GPT2LMHeadModel` for `text_dec` (e.g. the pretrained foundation model); when None one is
      built from `cfg.dims.gpt2` with random weights.
    """

    def __init__(self, cfg: BrainConfig, gpt2: GPT2LMHeadModel | None = None):
        super().__init__()
        self.cfg = cfg
        w, d = cfg.widths, cfg.dims
        parts = set(cfg.parts)
        if "ridge" in parts:
            self.ridge = RidgeRegression(cfg.n_voxels, w.hidden_dim)
        if "backbone" in parts:
            self.backbone = MindEyeBackbone(
                w.hidden_dim, cfg.seq_len, w.n_blocks, d.clip_tokens, d.clip_dim, w.backbone_dropout
            )
        if "clipproj" in parts:
            self.clipproj = CLIPProj(d.clip_dim, d.text_dim)
        if "diffusion_prior" in parts:
            self.diffusion_prior = BrainDiffusionPrior(d.clip_dim, d.clip_tokens, w.prior)
        if "motion_proj" in parts:
            self.motion_proj = MotionProj(d.clip_dim, cfg.n_frames)
        if "classifier" in parts:
            self.classifier = MultiLabelClassifier(d.clip_dim, d.text_dim, cfg.n_classes)
        if "text_seg_dec" in parts:
            self.text_seg_dec = TextDrivenDecoder(d.clip_dim, d.text_dim, d.latent_channels, w.decoder)
        initialize_weights(self)
        if "text_dec" in parts:  # after initialize_weights: GPT-2 keeps its own (or pretrained) initialisation
            self.text_dec = TextDecoder(d.text_dim, gpt2 if gpt2 is not None else build_gpt2(cfg))
            initialize_weights(self.text_dec.clip_project)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them: the backbone's mixer blocks and
        ``clip_proj``, and every layer of the prior's transformer (the parts that are built). Same results, less
        activation memory, about one more forward pass of those parts per step."""
        if hasattr(self, "backbone"):
            self.backbone.grad_checkpointing = enabled
        if hasattr(self, "diffusion_prior"):
            self.diffusion_prior.net.causal_transformer.grad_checkpointing = enabled

    # ---- stage 1 -------------------------------------------------------------------------------------------------
    def encode(self, voxels: torch.Tensor, subj_idx: int = 0) -> torch.Tensor:
        """voxels (B, R, V) or (B, V) → `clip_vision_embeds` (B, T, D) (backbone's clip_proj output)."""
        if voxels.ndim == 2:
            voxels = voxels[:, None]
        return self.backbone(self.ridge(voxels, subj_idx))[1]

    def prior_condition(self, voxels: torch.Tensor, subj_idx: int = 0) -> torch.Tensor:
        """voxels (B, R, V) or (B, V) → the diffusion prior's condition (B, T, D): the ``clip_proj`` output, or with
        ``cfg.prior_condition="backbone"`` the pre-projection ``backbone_linear`` output MindEye2 trained its prior on
        (defect 19)."""
        if voxels.ndim == 2:
            voxels = voxels[:, None]
        voxels_embed, clip_embeds = self.backbone(self.ridge(voxels, subj_idx))
        return voxels_embed if self.cfg.prior_condition == "backbone" else clip_embeds

    def text_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP tokens (B, T, D) or per-frame tokens (B, F, T, D) (averaged over frames) → (B, Dt), unnormalised."""
        if tokens.ndim == 4:
            tokens = tokens.mean(dim=1)
        return self.clipproj(tokens)

    # ---- stage 2 / 3 heads ---------------------------------------------------------------------------------------
    def motion(self, prior_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → per-frame "motion" tokens (B, F, T, D)."""
        return self.motion_proj(prior_tokens)

    def concept_logits(self, motion: torch.Tensor) -> torch.Tensor:
        """(B, F, T, D) → (B, n_classes)."""
        return self.classifier(motion)

    def decode_masks(self, motion: torch.Tensor, key_text: torch.Tensor) -> torch.Tensor:
        """motion (B, F, T, D), key-object text embedding (B, Dt) → mask logits (B, F, 1, S, S)."""
        return self.text_seg_dec(motion, key_text, head="seg")

    def decode_latents(self, motion: torch.Tensor, text: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
        """motion (B, F, T, D), caption vector (B, Dt) → VAE latents (B, F, C, s, s), nearest-resized to `out_size`
        (default the VAE latent size)."""
        lat = self.text_seg_dec(motion, text, head="recon")  # (B, F, C, S, S)
        return resize_maps_nearest(lat, out_size or self.cfg.dims.latent_size)

    def caption_logits(
        self, prefix: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced GPT-2 logits at the K labelled positions only (the LM head never runs on ignored
        positions): prefix (B, Dt), tokens (B, L) → (logits (K, V), labels (K,), keep (B, L) bool), K = keep.sum(),
        row-major.

        Honours `cfg.caption_pad`: "dedicated" uses the attention mask; "clip_zero" (upstream) ignores it.
        """
        mask = attention_mask if self.cfg.caption_pad == "dedicated" else None
        labels = caption_labels(tokens, attention_mask, self.cfg.caption_pad)
        keep = labels != IGNORE_INDEX
        hidden = self.text_dec.hidden(prefix, tokens, mask)  # (B, L, E)
        return self.text_dec.decoder.lm_head(hidden[keep]), labels[keep], keep

    # ---- brain-only decoding (stage-2 validation, stage 3) -------------------------------------------------------
    @torch.no_grad()
    def decode_voxels(
        self,
        voxels: torch.Tensor,
        generators: Generators,
        prior_steps: int | None = None,
        key_text: torch.Tensor | None = None,
        key_table: torch.Tensor | None = None,
        latent_size: int | None = None,
        subj_idx: int = 0,
    ) -> BrainDecoding:
        """Brain-only decoding of B clips: voxels (B, R, V) or (B, V) → :class:`BrainDecoding`.

        The prior is sampled from :meth:`prior_condition` with ``prior_steps`` strided DDPM steps (None: every step);
        pass one generator per clip for batch-size-independent results. The heads (:meth:`decode_heads`) read the
        condition (``cfg.head_input="brain"``) or the sample (``"prior"``, upstream). The mask head is queried with
        ``key_text`` (B, Dt) when given, else with the row of ``key_table`` (C, Dt) of each clip's top concept.
        Latents are nearest-resized to ``latent_size`` (default the VAE latent size). ``subj_idx``: the ridge slot
        of the subject whose voxels these are.
        """
        cond = self.prior_condition(voxels, subj_idx)  # (B, T, D)
        return self.decode_condition(cond, generators, prior_steps, key_text, key_table, latent_size)

    @torch.no_grad()
    def decode_condition(
        self,
        cond: torch.Tensor,
        generators: Generators,
        prior_steps: int | None = None,
        key_text: torch.Tensor | None = None,
        key_table: torch.Tensor | None = None,
        latent_size: int | None = None,
    ) -> BrainDecoding:
        """:meth:`decode_voxels` from the prior's condition (B, T, D) (:meth:`prior_condition` of the voxels, e.g.
        read from stage 2's condition cache) → :class:`BrainDecoding`."""
        if (key_text is None) == (key_table is None):
            raise ValueError("brain-only decoding needs exactly one of key_text (B, Dt) and key_table (C, Dt)")
        dtype = self.diffusion_prior.net.learned_query.dtype  # the weights' (float32): undoes autocast's bf16
        cond = cond.to(dtype)
        prior_tokens = self.diffusion_prior.sample(cond, generators, prior_steps).to(dtype)  # (B, T, D)
        heads_in = self.head_tokens(cond, prior_tokens)
        return self.decode_heads(heads_in, key_text, key_table, latent_size, prior_tokens=prior_tokens,
                                 brain_tokens=cond)  # fmt: skip

    def head_tokens(self, cond: torch.Tensor, prior_tokens: torch.Tensor) -> torch.Tensor:
        """What the heads read in training (``cfg.head_input``): the prior's condition ``cond`` (B, T, D), or the
        prior's x0 prediction ``prior_tokens`` (B, T, D) from noised ground truth (upstream)."""
        return cond if self.cfg.head_input == "brain" else prior_tokens

    def decode_heads(
        self,
        tokens: torch.Tensor,
        key_text: torch.Tensor | None = None,
        key_table: torch.Tensor | None = None,
        latent_size: int | None = None,
        prior_tokens: torch.Tensor | None = None,
        brain_tokens: torch.Tensor | None = None,
    ) -> BrainDecoding:
        """Every head's output from the tokens (B, T, D) they read → :class:`BrainDecoding`; ``prior_tokens`` (the
        keyframe's tokens) and ``brain_tokens`` default to ``tokens``. The mask head is queried with ``key_text``
        (B, Dt) when given, else with the row of ``key_table`` (C, Dt) of each clip's top concept."""
        if (key_text is None) == (key_table is None):
            raise ValueError("decoding needs exactly one of key_text (B, Dt) and key_table (C, Dt)")
        dtype = self.diffusion_prior.net.learned_query.dtype
        tokens = tokens.to(dtype)
        motion = self.motion(tokens)  # (B, F, T, D)
        text = self.text_embed(motion).to(dtype)  # (B, Dt), unnormalised
        logits = self.concept_logits(motion).to(dtype)  # (B, C)
        top = logits.argmax(dim=-1)  # (B,)
        if key_table is not None:
            key_text = key_table[top]  # (B, Dt)
        return BrainDecoding(
            prior_tokens=tokens if prior_tokens is None else prior_tokens,
            brain_tokens=tokens if brain_tokens is None else brain_tokens,
            head_tokens=tokens,
            motion=motion,
            caption_vector=text,
            concept_logits=logits,
            mask_logits=self.decode_masks(motion, key_text)[:, :, 0].to(dtype),  # (B, F, S, S)
            latents=self.decode_latents(motion, text, out_size=latent_size).to(dtype),  # (B, F, C, s, s)
            top_concept=top,
        )


@dataclass
class BrainDecoding:
    """The brain-only outputs of B clips (:meth:`NeuronsBrainModel.decode_voxels`), in the weights' dtype (float32)
    except ``motion`` (the compute dtype). T = CLIP tokens, D = width, F = frames, C = concept classes, Dt = text
    width, S = decoder map side, s = latent side."""

    prior_tokens: torch.Tensor  # (B, T, D) sampled from the brain condition (the keyframe's tokens)
    brain_tokens: torch.Tensor  # (B, T, D) the prior's condition (the brain model's own tokens)
    head_tokens: torch.Tensor  # (B, T, D) what the heads read (cfg.head_input)
    motion: torch.Tensor  # (B, F, T, D) per-frame tokens
    caption_vector: torch.Tensor  # (B, Dt) unnormalised; the GPT-2 prefix is its unit vector
    concept_logits: torch.Tensor  # (B, C)
    mask_logits: torch.Tensor  # (B, F, S, S) key-object mask logits
    latents: torch.Tensor  # (B, F, C_vae, s, s) blurry-video VAE latents
    top_concept: torch.Tensor  # (B,) long: argmax of concept_logits (the key_table row that queried the mask)

    @property
    def caption_prefix(self) -> torch.Tensor:
        """(B, Dt) the unit caption vector that prefixes GPT-2."""
        return F.normalize(self.caption_vector, dim=-1)


def build_gpt2(cfg: BrainConfig) -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    g = cfg.dims.gpt2
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=g.n_embd, n_layer=g.n_layer, n_head=g.n_head, vocab_size=g.vocab_size, n_positions=g.n_positions
        )
    )


@torch.no_grad()
def initialize_weights(module: nn.Module) -> None:
    """All brain-model weight initialisation in one place (GPT-2 excluded: it brings its own or pretrained weights).

    Linear / conv / norm / embedding layers get PyTorch's default init (what MindEye2 and NEURONS use); the learned
    tables of the prior follow dalle2 / MindEye2 (pos emb N(0, 1/D), nulls N(0, 1)); the frozen CLIP projection gets
    N(0, 1/D) until its real weights are loaded; the spatio-temporal blend weights start at 1 (pure spatial).
    """
    for m in _modules_outside_gpt2(module):
        if isinstance(m, nn.Linear | nn.Conv2d | nn.LayerNorm | nn.GroupNorm | nn.Embedding):
            m.reset_parameters()
        elif isinstance(m, GainLayerNorm):
            m.g.fill_(1.0)
        elif isinstance(m, PriorNetwork):
            m.learned_query.normal_(0.0, m.dim**-0.5)
            m.null_brain_embeds.normal_()
            m.null_image_embed.normal_()
        elif isinstance(m, MultiQueryAttention):
            m.null_kv.normal_()
        elif isinstance(m, CLIPProj):
            m.proj.normal_(0.0, m.proj.shape[0] ** -0.5)
        elif isinstance(m, SpatioTemporalAttention):
            m.weight.fill_(1.0)
        elif isinstance(m, TextDrivenDecoder) and m.null_kv is not None:
            m.null_kv.normal_(0.0, m.null_kv.shape[1] ** -0.5)


def _modules_outside_gpt2(module: nn.Module):
    """`module.modules()` without descending into any transformers GPT-2 model."""
    transformers = sys.modules.get("transformers")  # no GPT-2 can exist before transformers is imported
    if transformers is not None and isinstance(module, transformers.GPT2PreTrainedModel):
        return
    yield module
    for child in module.children():
        yield from _modules_outside_gpt2(child)


def inert_parameters(model: NeuronsBrainModel) -> list[str]:
    """Backbone parameters that cannot change any output when ``seq_len`` is 1 (MindEye2 and NEURONS: one fMRI
    vector per clip).

    ``mixer_blocks2`` then applies LayerNorm over a single element, whose output is its bias alone, and the R-axis
    residual carries the block's input past it; so every ``mixer_blocks1`` output is dropped again and the
    LayerNorm's weight multiplies zero. Their gradients are float rounding noise, which Adam scales up to steps of
    about ``lr``: they drift, harmlessly, and differently on different hardware or process counts.
    """
    if not hasattr(model, "backbone") or model.cfg.seq_len != 1:
        return []
    names = [f"backbone.mixer_blocks1.{n}" for n, _ in model.backbone.mixer_blocks1.named_parameters()]
    return names + [f"backbone.mixer_blocks2.{i}.0.weight" for i in range(len(model.backbone.mixer_blocks2))]


def parameter_counts(model: NeuronsBrainModel) -> dict[str, int]:
    """Parameter counts per part, plus the backbone's sub-parts (shared tensors counted once)."""
    counts = {name: _count(child) for name, child in model.named_children()}
    if hasattr(model, "backbone"):
        for sub in ("mixer_blocks1", "mixer_blocks2", "backbone_linear", "clip_proj"):
            counts[f"backbone.{sub}"] = _count(getattr(model.backbone, sub))
    if hasattr(model, "ridge") and len(model.ridge.linears) > 1:  # a subject set: one ridge per subject
        counts.update({f"ridge.linears.{i}": _count(lin) for i, lin in enumerate(model.ridge.linears)})
    counts["total"] = _count(model)
    return counts


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def clip_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per clip from per-clip integer seeds (`utils.training.clip_seed(base_seed, clip_index)`), so a
    sampled result does not depend on the batch it was decoded in."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


__all__ = [
    "BrainDecoding",
    "MindEyeBackbone",
    "NeuronsBrainModel",
    "RidgeRegression",
    "build_gpt2",
    "clip_generators",
    "inert_parameters",
    "initialize_weights",
    "parameter_counts",
]
