"""Quality checks of built toy weights on a toy world's TEST split (read here only; never trained on).

* clip: caption -> frame retrieval over the test clips (frame 2): 2-way identification against the clips of other
  scenes (shots; chance 0.5) and top-1 (a hit = a clip of the same scene; chance = mean share of same-scene clips),
  through the tokens->text projection (what stage 1 uses) and through CLIP's own image embedding. Clips of one shot
  are not told apart: their frames look alike and their captions differ at most in the motion direction.
* vae: PSNR / SSIM of reconstructions (posterior mode) of test frames.
* gpt2: perplexity of the test captions (uniform guessing = the vocabulary size).
* unclip: keyframes sampled from the tokens of test frames; 2-way identification by pixel MSE (own frame vs each
  other frame, chance 0.5) and the mean MSE to the own vs the other frames.
* frame_classifier (every test frame) / video_classifier (every test clip): top-1 accuracy of the true class (chance
  1/K), ``two_way`` = the share of the other classes that the true class outscores (chance 0.5), and the accuracy of
  each factor of the argmax class (chance 1/size). :func:`classifier_test_eval` gives the same in the form the
  builder records as each classifier's ``stats["test_eval"]`` (its ceiling on ground-truth test data).
* clip_pcc: ``temporal_two_way``: the first frame of a clip is closer (cosine of the features) to its own last frame
  than to the last frame of a clip of another scene (chance 0.5); ``caption_two_way`` likewise for captions.
* blip2: captions of test keyframes; mean word F1 to the own clip's caption vs to the captions of other scenes.
* video: clips generated from test keyframes (frame 0) and captions, 10 DDIM steps, CFG 3; 2-way identification of
  frame 0 by MSE to its own keyframe vs the other clips' keyframes, and the mean MSE between adjacent frames
  (generated vs ground truth).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.foundation.blip2 import toy as toy_blip2
from models.foundation.clip import ClipRole
from models.foundation.clip import toy as toy_clip
from models.foundation.clip_pcc import toy as toy_clip_pcc
from models.foundation.frame_classifier import toy as toy_fc
from models.foundation.gpt2 import toy as toy_gpt2
from models.foundation.toy.build import ROLES
from models.foundation.toy.data import Stimuli, load_stimuli
from models.foundation.unclip import toy as toy_unclip
from models.foundation.vae import toy as toy_vae
from models.foundation.video import toy as toy_video
from models.foundation.video_classifier import toy as toy_vc

log = logging.getLogger(__name__)

KEY_FRAME = 2


def _retrieval(text: torch.Tensor, image: torch.Tensor, scene: torch.Tensor) -> dict[str, float]:
    """``text (N, E)``, ``image (N, E)``, ``scene (N,)`` -> 2-way and top-1 caption -> image retrieval by scene."""
    sim = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T
    same = scene[:, None] == scene[None, :]
    diff = ~same
    two_way = ((sim.diag()[:, None] > sim) & diff).sum() / diff.sum().clamp(min=1)
    top1 = same[torch.arange(len(sim)), sim.argmax(dim=1)].float().mean()
    return {"two_way": float(two_way), "top1": float(top1), "top1_chance": float(same.float().mean())}


@torch.no_grad()
def eval_clip(role: ClipRole, proj: torch.Tensor, test: Stimuli) -> dict[str, Any]:
    frames = test.frames[:, KEY_FRAME]
    text = role.text_pooled(test.captions)
    tokens = role.image_tokens(frames)
    return {
        "via_proj": _retrieval(text, tokens.mean(dim=1) @ proj.to(tokens), test.scene),
        "via_clip": _retrieval(text, toy_clip.image_embed(role, frames), test.scene),
    }


@torch.no_grad()
def eval_vae(role: Any, test: Stimuli, max_frames: int = 512) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    frames = test.flat_frames()[:max_frames]
    rec = role.decode(role.encode(frames))
    return {
        "psnr": float(peak_signal_noise_ratio(rec, frames, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(rec, frames, data_range=1.0)),
        "latent_shape": list(role.encode(frames[:1]).shape[1:]),
    }


def eval_gpt2(role: Any, test: Stimuli, context_length: int) -> dict[str, float]:
    return {
        "perplexity": toy_gpt2.perplexity(role.model, test.captions, context_length),
        "uniform_perplexity": float(role.vocab_size),
    }


@torch.no_grad()
def eval_unclip(
    role: toy_unclip.ToyUnclipRole, clip: ClipRole, test: Stimuli, n: int = 24, seed: int = 0
) -> dict[str, float]:
    frames = test.frames[:n, KEY_FRAME]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(frames))]
    samples = role.reconstruct(clip.image_tokens(frames), gens)
    if samples.shape[-1] != frames.shape[-1]:
        samples = F.interpolate(samples, size=frames.shape[-2:], mode="area")
    mse = ((samples[:, None] - frames[None]) ** 2).mean(dim=(2, 3, 4))  # (sample, target)
    own = mse.diag()
    off = ~torch.eye(len(mse), dtype=torch.bool)
    return {
        "two_way": float((own[:, None] < mse)[off].float().mean()),
        "mse_own": float(own.mean()),
        "mse_other": float(mse[off].mean()),
        "n": len(frames),
    }


def classifier_quality(
    probs: torch.Tensor, factors: list[torch.Tensor], sizes: tuple[int, ...], names: tuple[str, ...]
) -> dict[str, float]:
    """``probs (N, K)`` with ``K = prod(sizes)`` and the true ``factors [(N,), ...]`` -> top-1 accuracy, its chance,
    ``two_way`` (share of the other classes the true class outscores) and per-factor accuracies ``acc_<name>``."""
    label = toy_fc.joint_index(factors, sizes)
    true = probs.gather(1, label[:, None])
    out = {
        "top1": float((probs.argmax(dim=1) == label).float().mean()),
        "top1_chance": 1.0 / probs.shape[1],
        "two_way": float(1.0 - ((probs > true).sum(dim=1) / (probs.shape[1] - 1)).mean()),
    }
    pred = probs.argmax(dim=1)
    for name, size, f in reversed(list(zip(names, sizes, factors, strict=True))):
        out[f"acc_{name}"] = float(((pred % size) == f).float().mean())
        pred = pred // size
    return out


FRAME_FACTORS = ("category", "background", "count")


@torch.no_grad()
def eval_frame_classifier(role: Any, test: Stimuli, factors: toy_fc.SceneFactors) -> dict[str, float]:
    probs = role.probs(test.flat_frames())
    parts = [p.repeat_interleave(test.n_frames) for p in (factors.category, factors.background, factors.count)]
    return classifier_quality(probs, parts, toy_fc.frame_sizes(factors), FRAME_FACTORS)


@torch.no_grad()
def eval_video_classifier(role: Any, test: Stimuli, factors: toy_fc.SceneFactors) -> dict[str, float]:
    """Top-1 etc. over the role's classes (with the speed factor when the role has the speed classes)."""
    speed = toy_vc.has_speed_classes(role.num_classes, factors)
    return classifier_quality(
        role.probs(test.frames),
        toy_vc.video_parts(factors, speed),
        toy_vc.video_sizes(factors, speed),
        toy_vc.video_factor_names(speed),
    )


def ceiling_summary(quality: dict[str, float]) -> dict[str, Any]:
    """:func:`classifier_quality` output -> ``{"top1", "chance": 1/K, "factors": {name: accuracy}}``."""
    factors = {k.removeprefix("acc_"): v for k, v in quality.items() if k.startswith("acc_")}
    return {"top1": quality["top1"], "chance": quality["top1_chance"], "factors": dict(reversed(factors.items()))}


def classifier_test_eval(role: str, folder: Path, world_root: Path) -> dict[str, Any]:
    """The ceiling of the toy ``role`` ("frame_classifier" or "video_classifier") saved in ``folder``: its
    :func:`ceiling_summary` on the ground-truth clips of ``world_root``'s TEST split (read only)."""
    from transformers import (
        VideoMAEForVideoClassification,
        VideoMAEImageProcessor,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    from models.foundation.common import finish
    from models.foundation.frame_classifier import FrameClassifierRole
    from models.foundation.video_classifier import VideoClassifierRole

    test, factors = load_stimuli(world_root, "test"), toy_fc.load_factors(world_root, "test")
    if role == "frame_classifier":
        model = finish(ViTForImageClassification.from_pretrained(folder), "cpu")
        quality = eval_frame_classifier(
            FrameClassifierRole(model, ViTImageProcessor.from_pretrained(folder)), test, factors
        )
    else:
        model = finish(VideoMAEForVideoClassification.from_pretrained(folder), "cpu")
        processor = VideoMAEImageProcessor.from_pretrained(folder)
        quality = eval_video_classifier(VideoClassifierRole(model, processor), test, factors)
    return ceiling_summary(quality)


def _two_way(sim: torch.Tensor, scene: torch.Tensor) -> float:
    """``sim (N, N)`` (row = query) -> share of (query, other-scene item) pairs the own item beats."""
    diff = scene[:, None] != scene[None, :]
    return float(((sim.diag()[:, None] > sim) & diff).sum() / diff.sum().clamp(min=1))


@torch.no_grad()
def eval_clip_pcc(role: Any, test: Stimuli) -> dict[str, float]:
    first = F.normalize(role.image_features(test.frames[:, 0]), dim=-1)
    last = F.normalize(role.image_features(test.frames[:, -1]), dim=-1)
    ids = toy_clip_pcc.caption_ids(test.captions, int(role.model.config.text_config.max_position_embeddings))
    text = toy_clip_pcc.text_embed(role.model, ids.to(role.device))
    return {
        "temporal_two_way": _two_way(first @ last.T, test.scene),
        "caption_two_way": _two_way(text @ first.T, test.scene),
    }


def word_f1(a: str, b: str) -> float:
    """F1 of the word multisets of two captions."""
    wa, wb = a.lower().split(), b.lower().split()
    common = sum(min(wa.count(w), wb.count(w)) for w in set(wa))
    return 0.0 if common == 0 else 2.0 * common / (len(wa) + len(wb))


@torch.no_grad()
def eval_blip2(role: Any, test: Stimuli) -> dict[str, Any]:
    captions = role.caption(test.frames[:, KEY_FRAME])
    f1 = torch.tensor([[word_f1(c, t) for t in test.captions] for c in captions])
    other = test.scene[:, None] != test.scene[None, :]
    return {
        "f1_own": float(f1.diag().mean()),
        "f1_other": float(f1[other].mean()),
        "distinct_captions": len(set(captions)),
        "example": captions[0],
    }


@torch.no_grad()
def eval_video(role: Any, test: Stimuli, n: int = 12, seed: int = 0) -> dict[str, float]:
    key = test.frames[:n, 0]
    out = role.generate(
        test.captions[:n], "", key, generator=torch.Generator().manual_seed(seed), num_steps=10, guidance=3.0
    )
    mse = ((out[:, 0][:, None] - key[None]) ** 2).mean(dim=(2, 3, 4))  # (sample, keyframe)
    off = ~torch.eye(len(mse), dtype=torch.bool)
    return {
        "frame0_two_way": float((mse.diag()[:, None] < mse)[off].float().mean()),
        "frame0_mse_own": float(mse.diag().mean()),
        "frame0_mse_other": float(mse[off].mean()),
        "adjacent_mse": float(((out[:, 1:] - out[:, :-1]) ** 2).mean()),
        "adjacent_mse_truth": float(((test.frames[:n, 1:] - test.frames[:n, :-1]) ** 2).mean()),
        "in_range": float(out.min()) >= 0.0 and float(out.max()) <= 1.0,
        "n": len(out),
    }


def _eval_extra(
    roles: tuple[str, ...], world_root: Path, weights_root: Path, test: Stimuli, split: str
) -> dict[str, Any]:
    """Quality of the metric / captioner / video roles that are in ``roles``."""
    out: dict[str, Any] = {}
    factors = toy_fc.load_factors(world_root, split) if {"frame_classifier", "video_classifier"} & set(roles) else None
    if "frame_classifier" in roles:
        out["frame_classifier"] = eval_frame_classifier(toy_fc.build_toy(weights_root, "cpu"), test, factors)
    if "video_classifier" in roles:
        out["video_classifier"] = eval_video_classifier(toy_vc.build_toy(weights_root, "cpu"), test, factors)
    if "clip_pcc" in roles:
        out["clip_pcc"] = eval_clip_pcc(toy_clip_pcc.build_toy(weights_root, "cpu"), test)
    if "blip2" in roles:
        out["blip2"] = eval_blip2(toy_blip2.build_toy(weights_root, "cpu"), test)
    if "video" in roles:
        out["video"] = eval_video(toy_video.build_toy(weights_root, "cpu"), test)
    return out


def evaluate_toy_weights(
    world_root: str | Path,
    weights_root: str | Path,
    scale: str = "toy",
    roles: tuple[str, ...] = ROLES,
    split: str = "test",
) -> dict[str, Any]:
    """Quality figures of the toy weights under ``weights_root`` on ``world_root``'s ``split`` (held-out: "test")."""
    weights_root = Path(weights_root)
    test = load_stimuli(world_root, split)
    out: dict[str, Any] = {}
    clip = toy_clip.load_clip(weights_root / "clip") if {"clip", "unclip"} & set(roles) else None
    if "clip" in roles:
        out["clip"] = eval_clip(clip, toy_clip.load_proj(weights_root), test)
    if "vae" in roles:
        out["vae"] = eval_vae(toy_vae.build_toy(weights_root, "cpu"), test)
    if "gpt2" in roles:
        out["gpt2"] = eval_gpt2(toy_gpt2.build_toy(weights_root, "cpu"), test, toy_gpt2.RECIPES[scale].context_length)
    if "unclip" in roles:
        out["unclip"] = eval_unclip(toy_unclip.build_toy(weights_root, "cpu"), clip, test)
    out.update(_eval_extra(roles, Path(world_root), weights_root, test, split))
    log.info("toy weights quality: %s", out)
    return out
