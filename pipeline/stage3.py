"""Stage 3: brain-only decoding of every test clip (spec §4): prior tokens, concepts, key-object mask, blurry video,
GPT-2 caption and the unCLIP keyframe.

The stage-2 BEST checkpoint (``sample.checkpoint=last``: the last epoch's, as upstream) is rebuilt from its own
``config.yaml`` (every part, the ``upstream`` model flags of that run, GPT-2 from the gpt2 role) and loaded strictly.
Per test clip (fMRI = mean of the repeats), in batches of ``sample.batch_size`` (T = CLIP tokens, D = width,
F = frames, Dt = text width, S = decoder map, s = VAE latent):

1. ``c = prior_condition(voxels)`` (B, T, D) → prior sample ``P`` (B, T, D), ``prior_steps`` DDPM steps, one
   generator per clip seeded ``clip_seed(run.seed, clip)`` → ``M = motion(c)`` (B, F, T, D) (``motion(P)`` under
   ``upstream.head_input=prior``); caption vector ``t = text_embed(M)``.
2. Concepts ``σ(concept_logits(M))`` (B, C); the top class's name (``upstream.concept_names``, defect 22) is embedded
   by the clip role's text tower and drives the mask ``σ(decode_masks(M, name))`` (B, F, S, S).
3. Blurry video: ``decode_latents(M, t)`` at the VAE latent size (B, F, C, s, s) → VAE decode (B, F, 3, R, R).
4. Caption: GPT-2 from ``normalize(t)``, greedy (batched) or beam search, up to ``caption_max_tokens``
   (``caption_max_tokens_enhance`` in enhance mode), CLIP-BPE ids decoded by the clip tokenizer.
5. Keyframe: unCLIP from the tokens ``P`` (its own per-clip seed stream) → (B, 3, K, K), K = ``keyframe_size``.

``enhance`` mode: the binary mask (σ > 0.5) becomes a soft mask {``mask_soft_low``, 1}, nearest-resized to the latent
size; the blurry-video latents are multiplied by it, and the unCLIP tokens by its frame mean nearest-resized to the
token grid (√T × √T, row-major). ``motion`` mode computes concepts and masks too but applies neither.

Every clip's result depends only on its own fMRI and seeds, never on the batch it was decoded in.

Diagnostics (``bench/info_ladder.py``, recorded in the manifest): ``sample.tokens`` feeds the heads and the keyframe
the prior's sample, the prior's condition or the stimulus' CLIP tokens; ``sample.oracle_blurry`` /
``sample.oracle_captions`` replace the blurry videos / captions by the stimulus' own.
Outputs in ``<run>/stage3_<mode>/`` (safetensors, one tensor each): ``keyframes`` (N, 3, K, K), ``blurry_videos``
(N, F, 3, R, R), ``masks`` (N, F, S, S) mask probabilities, ``concept_probs`` (N, C) float32, ``prior_tokens``
(N, T, D) when ``save_prior_tokens``; ``captions.json``, ``concepts.json`` (class names, per-clip mask names),
``previews/`` (PNG keyframe | GT frame, GIF blurry | GT [| mask]) and ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.brain import BrainDecoding, NeuronsBrainModel, clip_generators
from models.configured import MODEL_FLAGS, make_brain_config, model_flags
from models.foundation import build_role, foundation_impl
from models.heads import EOT_ID, ConceptNamer, TextDecoder, key_object_classes
from models.sizes import ALL_PARTS
from pipeline.common import (
    foundation_dims,
    load_data,
    require_foundation,
    voxel_counts,
)
from utils.checkpoint import CONFIG_FILE, MODEL_FILE, check_identity, load_strict, read_weights, resolve_checkpoint
from utils.cli import begin_stage
from utils.config import from_dict
from utils.errors import ConfigError, NeuronsError, WeightsError
from utils.io import atomic_save_safetensors, atomic_write_json
from utils.manifest import require_stage
from utils.resize import resize_frames_bilinear, resize_maps_nearest
from utils.runs import RunPaths, rerun_hint
from utils.sharding import merge_shards, my_clips, remove_shards, write_shard
from utils.stage_configs import Stage2Config, Stage3Config
from utils.training import autocast, build_accelerator, clip_seed, seed_everything
from utils.video_io import save_gif, save_png, side_by_side

log = logging.getLogger(__name__)

FIELDS = ("voxel", "concepts", "key_obj_cls")  # train concepts + key objects: the key-object → class names
TENSORS = ("keyframes", "blurry_videos", "masks", "concept_probs", "prior_tokens")
CAPTIONS_FILE, CONCEPTS_FILE, PREVIEWS_DIR = "captions.json", "concepts.json", "previews"
UNCLIP_STREAM = 1  # per-clip seed stream of the unCLIP noise (the prior uses clip_seed(seed, clip) itself)


@dataclass
class Stage3:
    """Everything one stage-3 run holds."""

    cfg: Stage3Config
    cfg2: Stage2Config  # the stage-2 config that trained the model
    data: Any
    clip: Any
    vae: Any
    unclip: Any
    model: NeuronsBrainModel
    accelerator: Any
    out_dir: Path
    stage2_ckpt: Path
    voxels: torch.Tensor  # (N, V) test fMRI, mean of the repeats
    class_names: list[str]  # per concept class: the name embedded for its mask query
    name_table: torch.Tensor  # (C, Dt) pooled text embeddings of class_names
    latent_size: int  # VAE latent side of the frames (R / downsample)

    @property
    def enhance(self) -> bool:
        return self.cfg.run.mode == "enhance"

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


# ---- set-up --------------------------------------------------------------------------------------------------------
def stage2_checkpoint(cfg: Stage3Config) -> Path:
    """The stage-2 checkpoint folder ``sample.checkpoint`` names (best or last), after checking that stages 2 (and
    1) finished and are up to date."""
    paths = RunPaths.from_config(cfg)
    require_stage("2", paths.stage_dir("2"), paths.stage_dirs(), rerun_hint(cfg))
    return resolve_checkpoint(paths.stage_dir("2") / "checkpoints" / cfg.sample.checkpoint)


def stage2_config(folder: Path) -> Any:
    """The resolved stage-2 config saved beside the checkpoint."""
    path = folder / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and isinstance(raw.get("upstream"), dict):
            raw["upstream"].setdefault("head_input", "prior")  # saved before the option: the only behaviour then
        return from_dict(Stage2Config, raw, str(path))
    except (OSError, yaml.YAMLError, NeuronsError) as err:
        why = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
        raise WeightsError(f"stage-2 config {path} is missing or unreadable ({why})", "rerun stage 2") from None


def check_config(cfg: Stage3Config, cfg2: Stage2Config, n_clips: int) -> None:
    """Refuse settings that cannot work, before anything is built or written."""
    for flag in MODEL_FLAGS:
        mine, theirs = getattr(cfg.upstream, flag), getattr(cfg2.upstream, flag)
        if mine != theirs:
            raise ConfigError(f"upstream.{flag}={mine!r} but the stage-2 model was trained with {theirs!r}",
                              f"--set upstream.{flag}={theirs} (or rerun stage 2 with {mine!r})")  # fmt: skip
    sp = cfg.sample
    checks = (
        (sp.batch_size >= 1, "sample.batch_size must be at least 1"),
        (sp.prior_steps >= 1, "sample.prior_steps must be at least 1"),
        (sp.caption_beams >= 1, "sample.caption_beams must be at least 1"),
        (min(sp.caption_max_tokens, sp.caption_max_tokens_enhance) >= 1, "caption max tokens must be at least 1"),
        (0.0 <= sp.mask_soft_low <= 1.0, "sample.mask_soft_low must be in [0, 1]"),
        (min(sp.keyframe_size, sp.unclip_size, sp.preview_fps) >= 1, "image sizes and preview_fps must be positive"),
        (sp.num_clips is None or 1 <= sp.num_clips <= n_clips, f"sample.num_clips must be in 1..{n_clips} or null"),
    )
    for ok, cause in checks:
        if not ok:
            raise ConfigError(cause, "fix it in the profile's stage3.sample block or with --set sample.<key>=...")


def max_new_tokens(cfg: Stage3Config) -> int:
    sp = cfg.sample
    return sp.caption_max_tokens_enhance if cfg.run.mode == "enhance" else sp.caption_max_tokens


def configure_unclip(unclip: Any, sp: Any) -> None:
    """Steps, guidance, unconditional context (defect 24) and output size of the unclip role from ``sample``."""
    down = 2 ** (len(unclip.vae.config.block_out_channels) - 1)
    if sp.unclip_size % down:
        raise ConfigError(f"sample.unclip_size={sp.unclip_size} is not a multiple of the unCLIP VAE's {down}x",
                          f"use a multiple of {down} (the role's size is {unclip.latent_size * down})")  # fmt: skip
    unclip.latent_size = sp.unclip_size // down
    unclip.num_steps, unclip.guidance = sp.unclip_steps, sp.unclip_guidance
    unclip.uncond = sp.unclip_uncond


def load_model(
    cfg: Stage3Config, cfg2: Stage2Config, data: Any, dims: Any, gpt2: Any, folder: Path, device: torch.device
) -> NeuronsBrainModel:
    """The full brain model as stage 2 built it, loaded strictly from ``folder`` (identity-checked)."""
    up = cfg2.upstream
    bcfg = make_brain_config(cfg2, data, dims, ALL_PARTS, voxel_counts(cfg), **model_flags(up))
    model = NeuronsBrainModel(bcfg, gpt2=gpt2.model)
    tensors, meta = read_weights(folder)  # the weights only: the optimizer state in state.pt is not needed
    check_identity(meta, cfg, folder)
    load_strict(model, tensors, f"stage-2 checkpoint {folder}")
    return model.to(device).eval()


def inference_namer(cfg: Stage3Config, cfg2: Stage2Config, data: Any) -> ConceptNamer:
    """The names that query the mask head (defect 22): ``upstream.concept_names`` of this stage picks class names
    ("class", "upstream") or fine key-object names ("fine": each class's most frequent training key object, via the
    stage-2 key-object → class map). Warns when they differ from the names stage 2 trained the head on."""
    classes = tuple(data.concept_classes)
    to_class = key_object_classes(data.concept_labels("train"), data.key_object_names("train"), classes)
    counts = Counter(n for n in data.key_object_names("train") if n != "None")
    chosen: dict[str, str] = {}
    for name in sorted(counts, key=lambda n: (-counts[n], n)):  # most frequent first, ties by name
        chosen.setdefault(name if name in classes else to_class[name], name)
    mode = cfg.upstream.concept_names
    trained = "class" if cfg2.upstream.concept_names == "class" else "fine"
    queried = "fine" if mode == "fine" else "class"
    if trained != queried:
        log.warning("the mask head was trained on %s names (stage 2 upstream.concept_names=%s) but is queried with %s "
                    "names (%s): the upstream train/test mismatch (defect 22)", trained, cfg2.upstream.concept_names,
                    queried, mode)  # fmt: skip
    return ConceptNamer(classes, to_class, mode=mode, class_to_key_object={c: chosen.get(c, c) for c in classes})


def setup(cfg: Stage3Config) -> Stage3:
    """Validate every input (stage 2 first) and build the models; no output is touched here."""
    folder = stage2_checkpoint(cfg)
    cfg2 = stage2_config(folder)
    impl, root = foundation_impl(cfg.model.size), cfg.paths.weights_root
    require_foundation(cfg, ("clip", "vae", "gpt2", "unclip"))
    data = load_data(cfg, FIELDS)
    check_config(cfg, cfg2, data.n_clips("test"))
    accelerator = build_accelerator(cfg)
    device = accelerator.device
    clip, vae, gpt2, unclip = (build_role(r, impl, root, device) for r in ("clip", "vae", "gpt2", "unclip"))
    if 1 + max_new_tokens(cfg) > gpt2.max_positions:
        raise ConfigError(f"1 prefix + {max_new_tokens(cfg)} caption tokens exceed GPT-2's {gpt2.max_positions}",
                          f"set the caption max tokens to at most {gpt2.max_positions - 1}")  # fmt: skip
    configure_unclip(unclip, cfg.sample)
    dims = foundation_dims(cfg, clip, data, vae, gpt2)
    model = load_model(cfg, cfg2, data, dims, gpt2, folder, device)
    namer = inference_namer(cfg, cfg2, data)
    names = namer.infer_name(torch.eye(data.n_concepts))  # the name each class queries the mask head with
    table = clip.text_pooled(names).float().to(device)  # (C, Dt), embedded once: batch-independent
    out_dir = RunPaths.from_config(cfg).stage_dir("3")
    return Stage3(cfg, cfg2, data, clip, vae, unclip, model, accelerator, out_dir, folder, data.voxels("test"),
                  names, table, data.resolution // vae.downsample)  # fmt: skip


# ---- decoding ------------------------------------------------------------------------------------------------------
def soft_mask(mask_probs: torch.Tensor, low: float) -> torch.Tensor:
    """Probabilities (B, F, S, S) → the binary mask (σ > 0.5) as soft values {low, 1}."""
    return torch.where(mask_probs > 0.5, torch.ones_like(mask_probs), torch.full_like(mask_probs, low))


def token_mask(latent_mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Per-frame masks (B, F, s, s) → per-token weights (B, T, 1): frame mean, nearest-resized to the √T × √T token
    grid, flattened row-major (the CLIP patch order)."""
    grid = resize_maps_nearest(latent_mask.mean(dim=1, keepdim=True), math.isqrt(n_tokens))  # (B, 1, g, g)
    return grid.flatten(1)[..., None]


@torch.no_grad()
def decode_batch(s: Stage3, idx: np.ndarray) -> dict[str, Any]:
    """Every output of test clips ``idx`` (tensors on the CPU, captions and mask names as lists): steps 1–3 of the
    module docstring are the model's brain-only :meth:`~models.brain.NeuronsBrainModel.decode_voxels`."""
    sp = s.cfg.sample
    gens = clip_generators([clip_seed(s.cfg.run.seed, int(i)) for i in idx], s.device)
    with autocast(s.accelerator, s.cfg):
        dec = s.model.decode_voxels(s.voxels[torch.as_tensor(idx)].to(s.device), gens, sp.prior_steps,
                                    subj_idx=s.cfg.run.slot,
                                    key_table=s.name_table, latent_size=s.latent_size)  # fmt: skip
    dec = ladder_rung(s, idx, dec)
    masks = torch.sigmoid(dec.mask_logits)  # (B, F, S, S)
    latents, tokens = dec.latents, dec.prior_tokens
    if sp.oracle_blurry:  # the stimulus' own VAE reconstruction, unmasked
        latents = s.vae.encode(s.data.frames("test", idx).to(s.device)).to(latents.dtype)
    elif s.enhance:
        latent_mask = resize_maps_nearest(soft_mask(masks, sp.mask_soft_low), s.latent_size)  # (B, F, s, s)
        latents = latents * latent_mask[:, :, None]
        tokens = tokens * token_mask(latent_mask, tokens.shape[1])
    blurry = s.vae.decode(latents)  # (B, F, 3, R, R)
    unclip_gens = clip_generators([clip_seed(clip_seed(s.cfg.run.seed, int(i)), UNCLIP_STREAM) for i in idx],
                                  s.device)  # fmt: skip
    keyframes = resize_frames_bilinear(s.unclip.reconstruct(tokens, unclip_gens), sp.keyframe_size)  # (B, 3, K, K)
    if sp.oracle_captions:
        captions = [str(c) for c in s.data.captions("test")[idx]]
    else:
        with autocast(s.accelerator, s.cfg):
            captions = generate_captions(s, dec.caption_prefix)
    return {
        "keyframes": keyframes.cpu(),
        "blurry_videos": blurry.cpu(),
        "masks": masks.cpu(),
        "concept_probs": torch.sigmoid(dec.concept_logits).cpu(),
        "prior_tokens": dec.prior_tokens.cpu(),
        "captions": captions,
        "mask_names": [s.class_names[i] for i in dec.top_concept.tolist()],
    }


def ladder_rung(s: Stage3, idx: np.ndarray, dec: BrainDecoding) -> BrainDecoding:
    """``sample.tokens`` (diagnostics): decode the heads and the keyframe from the tokens it names instead."""
    source = s.cfg.sample.tokens
    if source == "model":
        return dec
    if source == "ground_truth":
        frame = s.data.frames("test", idx)[:, s.cfg2.train.target_frame].to(s.device)  # (B, 3, R, R)
        tokens = s.clip.image_tokens(frame).float()  # (B, T, D)
    else:
        tokens = dec.prior_tokens if source == "prior" else dec.brain_tokens
    with autocast(s.accelerator, s.cfg):
        return s.model.decode_heads(tokens, key_table=s.name_table, latent_size=s.latent_size)


# ---- captions ------------------------------------------------------------------------------------------------------
def generate_captions(s: Stage3, prefix: torch.Tensor) -> list[str]:
    """GPT-2 captions of normalised caption vectors (B, Dt), decoded to text."""
    sp, dec = s.cfg.sample, s.model.text_dec
    n = max_new_tokens(s.cfg)
    if sp.caption_decoding == "beam":
        tokens, mask = beam_generate(dec, prefix, n, EOT_ID, sp.caption_beams, sp.caption_length_penalty)
    else:
        tokens, mask = dec.generate(prefix, n, EOT_ID)
    return [ids_to_text(s.clip.tokenizer, row[keep].tolist()) for row, keep in zip(tokens.cpu(), mask.cpu())]


def ids_to_text(tokenizer: Any, ids: list[int]) -> str:
    """CLIP-BPE ids → text without special tokens; ids outside the tokenizer's vocabulary (a paper GPT-2 has 50257
    rows for CLIP's 49408 ids) are dropped."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    keep = [i for i in ids if 0 <= i < len(tokenizer.decoder) and i not in special]
    return " ".join(tokenizer.decode(keep).split())


def eos_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, n) ids → (B, n) bool, True up to and including the first ``eos_id``."""
    is_eos = (tokens == eos_id).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


@torch.no_grad()
def beam_generate(
    dec: TextDecoder, prefix: torch.Tensor, max_new_tokens: int, eos_id: int, beams: int, length_penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search, batched over clips. prefix (B, Dt) → (tokens (B, n), mask (B, n) bool, as ``generate``).

    Each clip keeps ``beams`` hypotheses of equal length; a finished one only extends by EOS at no cost, so rows
    never need padding and never interact. The result is the hypothesis with the best sum(log p) / length**penalty.
    """
    b, k = prefix.shape[0], beams
    embeds = dec.clip_project(prefix).repeat_interleave(k, dim=0)[:, None]  # (B·k, 1, E)
    scores = torch.full((b, k), float("-inf"), device=prefix.device)
    scores[:, 0] = 0.0  # the k start hypotheses are identical: keep one
    tokens = torch.zeros(b * k, 0, dtype=torch.long, device=prefix.device)
    done = torch.zeros(b * k, dtype=torch.bool, device=prefix.device)
    length = torch.zeros(b * k, device=prefix.device)
    for _ in range(max_new_tokens):
        logp = dec.decoder(inputs_embeds=embeds).logits[:, -1].float().log_softmax(dim=-1)  # (B·k, V)
        vocab = logp.shape[-1]
        frozen = torch.full_like(logp[:1], float("-inf"))
        frozen[0, eos_id] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        top, pos = (scores.reshape(-1, 1) + logp).view(b, k * vocab).topk(k, dim=1)  # (B, k)
        rows = (torch.arange(b, device=prefix.device)[:, None] * k + pos // vocab).flatten()  # (B·k,) source beams
        nxt = (pos % vocab).flatten()
        tokens = torch.cat((tokens[rows], nxt[:, None]), dim=1)
        length = length[rows] + (~done[rows]).float()
        done = done[rows] | (nxt == eos_id)
        scores = top
        if bool(done.all()):
            break
        embeds = torch.cat((embeds[rows], dec.decoder.transformer.wte(nxt)[:, None].to(embeds.dtype)), dim=1)
    final = scores / length.view(b, k).clamp(min=1.0) ** length_penalty  # (B, k)
    best = torch.arange(b, device=prefix.device) * k + final.argmax(dim=1)
    return tokens[best], eos_mask(tokens[best], eos_id)


# ---- the stage -----------------------------------------------------------------------------------------------------
@dataclass
class Outputs:
    """The stage's results, filled batch by batch (tensors on the CPU)."""

    n: int
    dtype: torch.dtype
    names: tuple[str, ...]  # which of TENSORS to keep
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    mask_names: list[str] = field(default_factory=list)

    def put(self, start: int, batch: dict[str, Any]) -> None:
        for name in self.names:
            value = batch[name]
            dtype = torch.float32 if name == "concept_probs" else self.dtype
            if name not in self.tensors:
                self.tensors[name] = torch.empty((self.n, *value.shape[1:]), dtype=dtype)
            self.tensors[name][start : start + len(value)] = value.to(dtype)
        self.captions += batch["captions"]
        self.mask_names += batch["mask_names"]


def decode_all(s: Stage3) -> Outputs:
    """Decode this process's round-robin share of the test clips (all of them on one process), in clip order."""
    sp, acc = s.cfg.sample, s.accelerator
    clips = my_clips(n_clips(s.cfg, s.data), acc.process_index, acc.num_processes)
    keep = tuple(t for t in TENSORS if t != "prior_tokens" or sp.save_prior_tokens)
    out = Outputs(len(clips), getattr(torch, sp.output_dtype), keep)
    t0 = time.time()
    for start in range(0, len(clips), sp.batch_size):
        idx = np.asarray(clips[start : start + sp.batch_size])
        out.put(start, decode_batch(s, idx))
        log.info("decoded %d of %d clips on process %d (%.1f s)", start + len(idx), len(clips), acc.process_index,
                 time.time() - t0)  # fmt: skip
    return out


def n_clips(cfg: Stage3Config, data: Any) -> int:
    return cfg.sample.num_clips or data.n_clips("test")


def gather_outputs(s: Stage3, share: Outputs) -> Outputs | None:
    """Every process's share → the whole run's outputs on the main process (None elsewhere), through shard files."""
    acc = s.accelerator
    if acc.num_processes == 1:
        return share
    clips = my_clips(n_clips(s.cfg, s.data), acc.process_index, acc.num_processes)
    write_shard(s.out_dir, acc.process_index, clips, share.tensors,
                {"captions": share.captions, "mask_names": share.mask_names})  # fmt: skip
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    n = n_clips(s.cfg, s.data)
    tensors, texts = merge_shards(s.out_dir, acc.num_processes, n)
    return Outputs(n, share.dtype, share.names, tensors, texts.get("captions", []), texts.get("mask_names", []))


def clear_outputs(out_dir: Path) -> None:
    """Remove the files a previous run of this stage wrote (only the names this stage writes)."""
    for name in TENSORS:
        (out_dir / f"{name}.safetensors").unlink(missing_ok=True)
    for name in (CAPTIONS_FILE, CONCEPTS_FILE):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / PREVIEWS_DIR, ignore_errors=True)
    remove_shards(out_dir)


def save_outputs(s: Stage3, out: Outputs, recorder: Any) -> None:
    meta = {"stage": "3", "mode": s.cfg.run.mode, "subj": str(s.cfg.run.subject)}
    for name, tensor in out.tensors.items():
        path = atomic_save_safetensors(s.out_dir / f"{name}.safetensors", {name: tensor}, meta)
        recorder.add_output(path, tensor.shape, tensor.dtype)
    sp = s.cfg.sample
    captions = {"decoding": sp.caption_decoding, "max_new_tokens": max_new_tokens(s.cfg), "captions": out.captions}
    path = atomic_write_json(s.out_dir / CAPTIONS_FILE, captions)
    recorder.add_output(path, (out.n,), "str")
    concepts = {"classes": list(s.data.concept_classes), "query_names": s.class_names, "mask_names": out.mask_names}
    path = atomic_write_json(s.out_dir / CONCEPTS_FILE, concepts)
    recorder.add_output(path, (out.n,), "str")


def write_previews(s: Stage3, out: Outputs) -> None:
    """PNG keyframe | GT frame and GIF blurry | GT (| mask in enhance mode) for the first ``num_previews`` clips."""
    sp, t = s.cfg.sample, out.tensors
    count = min(sp.num_previews, out.n)
    if count == 0:
        return
    gt = s.data.frames("test", np.arange(count))  # (P, F, 3, R, R)
    frame = min(s.cfg2.train.target_frame, gt.shape[1] - 1)  # the frame the prior's tokens were trained on
    folder = s.out_dir / PREVIEWS_DIR
    for i in range(count):
        still = side_by_side(t["keyframes"][i : i + 1], gt[i, frame : frame + 1])[0]  # (3, K, 2K)
        save_png(folder / f"keyframe_{i:04d}.png", still)
        panels = [t["blurry_videos"][i], gt[i]]
        if s.enhance:
            panels.append(t["masks"][i][:, None])  # (F, 1, S, S)
        save_gif(folder / f"video_{i:04d}.gif", side_by_side(*panels), sp.preview_fps)


def reconstruct(cfg: Stage3Config) -> Path:
    """Run stage 3 (on every process of a launch: each decodes its round-robin share); returns the stage folder."""
    seed_everything(cfg.run.seed)
    s = setup(cfg)
    acc, recorder = s.accelerator, None
    if acc.is_main_process:
        _, recorder = begin_stage(cfg, "3", depends_on=("2",))
        clear_outputs(s.out_dir)
        log.info("stage 3 (%s): %d test clips on %d processes, batch %d, stage-2 checkpoint %s", cfg.run.mode,
                 n_clips(cfg, s.data), acc.num_processes, cfg.sample.batch_size, s.stage2_ckpt)  # fmt: skip
        if cfg.sample.tokens != "model" or cfg.sample.oracles:
            log.warning("stage 3 diagnostics: tokens=%s, oracle inputs %s: these outputs are not a brain decoding",
                        cfg.sample.tokens, cfg.sample.oracles or "none")  # fmt: skip
    acc.wait_for_everyone()  # the folder is cleared before any shard is written
    out = gather_outputs(s, decode_all(s))
    if out is not None:
        save_outputs(s, out, recorder)
        write_previews(s, out)
        finish_stage(s, out, recorder)
    acc.wait_for_everyone()
    return s.out_dir


def finish_stage(s: Stage3, out: Outputs, recorder: Any) -> None:
    recorder.add_inputs(s.data.opened_files)
    recorder.add_input(s.stage2_ckpt / MODEL_FILE)
    recorder.extra.update({"n_clips": out.n, "stage2_checkpoint": str(s.stage2_ckpt),
                           "stage2_checkpoint_read": s.cfg.sample.checkpoint,
                           "processes": s.accelerator.num_processes, "tokens": s.cfg.sample.tokens,
                           "oracles": s.cfg.sample.oracles})  # fmt: skip
    recorder.finish()
    log.info("stage 3 done: %s; captions e.g. %s", s.out_dir, json.dumps(out.captions[:3]))
