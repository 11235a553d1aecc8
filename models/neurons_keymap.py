"""Explicit key map from upstream NEURONS checkpoints (``model_state_dict`` of ``brain_model[_last].pth``, stage 1,
and ``brain_model_prior[_last].pth``, stage 2) onto :class:`models.brain.NeuronsBrainModel`.

The two state dicts name the same modules the same way except in two places (key/shape manifests of the upstream
files: ``tests/fixtures/neurons_stage{1,2}_subj01.tsv``):

* ``text_seg_dec.video_decoder``: upstream keeps a block's spatial attentions, temporal attentions and blend scalars in
  three lists (``attentions.N``, ``temp_attentions.N``, ``weights.N``) and its upsampler in ``upsamplers.0.conv``; here
  each layer's pair and scalar are one :class:`models.video_decoder.SpatioTemporalAttention` (``attentions.N.spatial``,
  ``.temporal``, ``.weight``; the mid block's is ``attention``) and the upsampler conv is ``upsample_conv``;
* ``text_dec.clip_project``: upstream's one-layer ``MLP`` (``model.0``) is a plain ``Linear`` here.

Every source key matches exactly one rule of :data:`NEURONS_KEY_MAP` (renamed) or :data:`NEURONS_DROPPED` (left out,
with the reason); a key matching neither is an error. :func:`map_neurons_state_dict` then requires every target key
to be filled exactly once, with the target's shape.

Architecture: upstream's text attention has no residual and no learned null key/value (defect 14). Weights trained
that way only fit, and only mean what they meant, in a model built with :data:`UPSTREAM_TRAINED_FLAGS`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from utils.errors import WeightsError
from utils.stage_configs import UpstreamFlags

log = logging.getLogger(__name__)

# upstream's file names under <released EXP>/exp_<exp>/subj_<S>/checkpoints/ -> (stage, our checkpoint name)
UPSTREAM_FILES: dict[str, tuple[str, str]] = {
    "brain_model_prior_last.pth": ("2", "last"),  # required: what upstream's stage 3 decodes
    "brain_model_prior.pth": ("2", "best"),
    "brain_model.pth": ("1", "best"),
    "brain_model_last.pth": ("1", "last"),
}
REQUIRED_FILE = "brain_model_prior_last.pth"

# The upstream behaviours the released weights were trained under (configs/upstream_behaviour.yaml, stage2.upstream):
# an imported model is built and run with them. tests/test_import_upstream.py checks they equal that profile's.
UPSTREAM_TRAINED_FLAGS = UpstreamFlags(
    text_attention="batch",
    text_attention_residual=False,
    text_attention_null_kv=False,
    temporal_scope="batch",
    caption_pad="clip_zero",
    head_input="prior",
    dice_reduction="batch",
    concept_names="upstream",
    gt_mask_resize="nearest",
    prior_condition="clip_proj",
)

_VD, _VDT = r"text_seg_dec\.video_decoder\.", "text_seg_dec.video_decoder."  # source regex / target prefix
_P = r"(weight|bias)"
_GPT2_LAYER = r"transformer\.h\.\d+\.(?:ln_[12]|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
# (source regex, full match; target template with \1.. groups). Ordered; the first match wins, but none overlap.
NEURONS_KEY_MAP: tuple[tuple[str, str], ...] = (
    # stage-1 parts (both files): same names
    (r"ridge\.linears\.(\d+)\." + _P, r"ridge.linears.\1.\2"),
    (r"backbone\.(mixer_blocks[12]\.\d+\.0)\." + _P, r"backbone.\1.\2"),  # LayerNorm
    (r"backbone\.(mixer_blocks[12]\.\d+\.1\.[03])\." + _P, r"backbone.\1.\2"),  # the two Linears of the MLP
    (r"backbone\.backbone_linear\." + _P, r"backbone.backbone_linear.\1"),
    (r"backbone\.clip_proj\.([0235689])\." + _P, r"backbone.clip_proj.\1.\2"),
    (r"clipproj\.proj", r"clipproj.proj"),
    # the diffusion prior (MindEye2's names, models.prior)
    (r"diffusion_prior\.noise_scheduler\.(\w+)", r"diffusion_prior.noise_scheduler.\1"),
    (r"diffusion_prior\.net\.(learned_query|null_brain_embeds|null_image_embed)", r"diffusion_prior.net.\1"),
    (r"diffusion_prior\.net\.(to_time_embeds\.0\.1\.net\.[0-2](?:\.0)?)\." + _P, r"diffusion_prior.net.\1.\2"),
    (r"diffusion_prior\.net\.causal_transformer\.(.+)", r"diffusion_prior.net.causal_transformer.\1"),
    # heads
    (r"motion_proj\.motion_proj\." + _P, r"motion_proj.motion_proj.\1"),
    (r"classifier\.(vision_proj_channel|classifier)\." + _P, r"classifier.\1.\2"),
    (r"text_dec\.clip_project\.model\.0\." + _P, r"text_dec.clip_project.\1"),  # MLP((1280, 768)) -> Linear
    (r"text_dec\.decoder\.(transformer\.(?:wte|wpe)\.weight)", r"text_dec.decoder.\1"),
    (r"text_dec\.decoder\.(" + _GPT2_LAYER + r")\." + _P, r"text_dec.decoder.\1.\2"),
    (r"text_dec\.decoder\.transformer\.ln_f\." + _P, r"text_dec.decoder.transformer.ln_f.\1"),
    (r"text_dec\.decoder\.lm_head\.weight", r"text_dec.decoder.lm_head.weight"),  # tied to wte (both saved)
    # text-driven decoder: attention, projector, heads
    (r"text_seg_dec\.(q|k|v|out)\.weight", r"text_seg_dec.\1.weight"),
    (r"text_seg_dec\.maps_projector\.([0-6])\.(weight|bias)", r"text_seg_dec.maps_projector.\1.\2"),
    (r"text_seg_dec\.(norm|seg_head|recon_head)\." + _P, r"text_seg_dec.\1.\2"),
    # DecoderVideo: the renamed parts
    (_VD + r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", _VDT + r"up_blocks.\1.attentions.\2.spatial.\3"),
    (_VD + r"up_blocks\.(\d+)\.temp_attentions\.(\d+)\.(.+)", _VDT + r"up_blocks.\1.attentions.\2.temporal.\3"),
    (_VD + r"up_blocks\.(\d+)\.weights\.(\d+)", _VDT + r"up_blocks.\1.attentions.\2.weight"),
    (_VD + r"up_blocks\.(\d+)\.upsamplers\.0\.conv\." + _P, _VDT + r"up_blocks.\1.upsample_conv.\2"),
    (_VD + r"mid_block\.attentions\.0\.(.+)", _VDT + r"mid_block.attention.spatial.\1"),
    (_VD + r"mid_block\.temp_attentions\.0\.(.+)", _VDT + r"mid_block.attention.temporal.\1"),
    (_VD + r"mid_block\.weights\.0", _VDT + r"mid_block.attention.weight"),
    # DecoderVideo: same names
    (_VD + r"((?:up_blocks\.\d+|mid_block)\.resnets\.\d+\.(?:norm[12]|conv[12]|conv_shortcut))\." + _P,
     _VDT + r"\1.\2"),  # fmt: skip
    (_VD + r"(conv_in|conv_norm_out)\." + _P, _VDT + r"\1.\2"),
)

# (source regex, full match; why it is not loaded)
NEURONS_DROPPED: tuple[tuple[str, str], ...] = (
    (
        r"text_dec\.decoder\.transformer\.h\.\d+\.attn\.(bias|masked_bias)",
        "GPT-2 causal-mask buffers (saved by transformers < 4.31, not persistent since): rebuilt by the model",
    ),
)

# target keys an upstream file can never fill, and the option that removes them from the model
_ABSENT_UPSTREAM = {"text_seg_dec.null_kv": "upstream.text_attention_null_kv=false (defect 14: upstream has none)"}

_KEY_MAP = tuple((re.compile(src), dst) for src, dst in NEURONS_KEY_MAP)
_DROPPED = tuple((re.compile(src), why) for src, why in NEURONS_DROPPED)


@dataclass
class NeuronsMapping:
    """The result of :func:`map_neurons_state_dict`.

    tensors: target key -> tensor (every key of the target, in the target's order).
    renamed: source key -> target key, for the keys whose name changed.
    dropped: source key -> why it was not loaded.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.tensors)} keys ({len(self.renamed)} renamed), {len(self.dropped)} dropped"


def target_key(source: str) -> str | None:
    """Our key for an upstream key; None when the key is deliberately dropped. Unknown keys raise."""
    for pattern, template in _KEY_MAP:
        match = pattern.fullmatch(source)
        if match:
            return match.expand(template)
    if any(pattern.fullmatch(source) for pattern, _ in _DROPPED):
        return None
    raise KeyError(source)


def drop_reason(source: str) -> str:
    return next(why for pattern, why in _DROPPED if pattern.fullmatch(source))


def map_neurons_state_dict(
    state_dict: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, ...]], source: str
) -> NeuronsMapping:
    """Rename an upstream ``model_state_dict`` onto a model whose state dict has ``target_shapes`` (key -> shape),
    strictly: every source key mapped or dropped by rule, every target key filled once, every shape equal.

    source: how errors name the file.
    """
    out = NeuronsMapping()
    unknown, by_target = [], {}
    for key in state_dict:
        try:
            dst = target_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if dst is None:
            out.dropped[key] = drop_reason(key)
            continue
        if dst in by_target:
            raise WeightsError(f"{source}: keys {by_target[dst]!r} and {key!r} both map to {dst!r}",
                               "the file is not an upstream NEURONS checkpoint")  # fmt: skip
        by_target[dst] = key
        if dst != key:
            out.renamed[key] = dst
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} keys match no rule of the NEURONS key map, e.g. {unknown[:3]}",
                           "pass an upstream NEURONS brain_model*.pth checkpoint")  # fmt: skip
    _check_targets(by_target, target_shapes, source)
    _check_shapes(state_dict, by_target, target_shapes, source)
    out.tensors = {dst: state_dict[by_target[dst]] for dst in target_shapes}
    return out


def _check_targets(by_target: Mapping[str, str], target_shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    extra = [f"{src!r} (-> {dst!r})" for dst, src in by_target.items() if dst not in target_shapes]
    if extra:
        raise WeightsError(
            f"{source}: {len(extra)} keys have no place in the model, e.g. {', '.join(extra[:3])}",
            "build the model with the parts and upstream options the checkpoint was trained with",
        )
    missing = [k for k in target_shapes if k not in by_target]
    if missing:
        fixes = sorted({_ABSENT_UPSTREAM[k] for k in missing if k in _ABSENT_UPSTREAM})
        fix = f"build the model with {'; '.join(fixes)}" if fixes else "pass the stage-2 file (brain_model_prior*.pth)"
        raise WeightsError(f"{source}: {len(missing)} keys of the model are not in the file, e.g. {missing[:3]}", fix)


def _check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    by_target: Mapping[str, str],
    target_shapes: Mapping[str, tuple[int, ...]],
    source: str,
) -> None:
    bad = [dst for dst, src in by_target.items() if tuple(state_dict[src].shape) != tuple(target_shapes[dst])]
    if bad:
        dst = bad[0]
        src = by_target[dst]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WeightsError(
            f"{source}: shape mismatch: upstream {src!r} has {list(state_dict[src].shape)} but the model's {dst!r} "
            f"has {list(target_shapes[dst])}{more}",
            "import with the subject, profile and model size the checkpoint was trained for",
        )


def state_dict_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """key -> shape of ``model.state_dict()`` (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def untie(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the tensors that share memory with an earlier entry (GPT-2's tied ``lm_head``/``wte``, the prior's
    one rotary ``freqs`` under six keys): safetensors refuses shared tensors."""
    seen: set[int] = set()
    out = {}
    for name, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[name] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def log_mapping(mapping: NeuronsMapping, source: str) -> None:
    log.info("%s: %s", source, mapping.summary())
    for reason in sorted(set(mapping.dropped.values())):
        n = sum(1 for r in mapping.dropped.values() if r == reason)
        log.info("%s: dropped %d keys: %s", source, n, reason)
