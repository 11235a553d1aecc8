"""Quality checks of built toy weights on a toy world's TEST split (read here only; never trained on).

* clip: caption -> frame retrieval over the test clips (frame 2): 2-way identification against the clips of other
  scenes (shots; chance 0.5) and top-1 (a hit = a clip of the same scene; chance = mean share of same-scene clips),
  through the tokens->text projection (what stage 1 uses) and through CLIP's own image embedding. Clips of one shot
  are not told apart: their frames look alike and their captions differ at most in the motion direction.
* vae: PSNR / SSIM of reconstructions (posterior mode) of test frames.
* gpt2: perplexity of the test captions (uniform guessing = the vocabulary size).
* unclip: keyframes sampled from the tokens of test frames; 2-way identification by pixel MSE (own frame vs each
  other frame, chance 0.5) and the mean MSE to the own vs the other frames.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.foundation.clip import ClipRole
from models.foundation.toy import clip as toy_clip
from models.foundation.toy import gpt2 as toy_gpt2
from models.foundation.toy import unclip as toy_unclip
from models.foundation.toy import vae as toy_vae
from models.foundation.toy.data import Stimuli, load_stimuli

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
    return {"via_proj": _retrieval(text, tokens.mean(dim=1) @ proj.to(tokens), test.scene),
            "via_clip": _retrieval(text, toy_clip.image_embed(role, frames), test.scene)}


@torch.no_grad()
def eval_vae(role: Any, test: Stimuli, max_frames: int = 512) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    frames = test.flat_frames()[:max_frames]
    rec = role.decode(role.encode(frames))
    return {"psnr": float(peak_signal_noise_ratio(rec, frames, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(rec, frames, data_range=1.0)),
            "latent_shape": list(role.encode(frames[:1]).shape[1:])}


def eval_gpt2(role: Any, test: Stimuli, context_length: int) -> dict[str, float]:
    return {"perplexity": toy_gpt2.perplexity(role.model, test.captions, context_length),
            "uniform_perplexity": float(role.vocab_size)}


@torch.no_grad()
def eval_unclip(role: toy_unclip.ToyUnclipRole, clip: ClipRole, test: Stimuli, n: int = 24,
                seed: int = 0) -> dict[str, float]:
    frames = test.frames[:n, KEY_FRAME]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(frames))]
    samples = role.reconstruct(clip.image_tokens(frames), gens)
    if samples.shape[-1] != frames.shape[-1]:
        samples = F.interpolate(samples, size=frames.shape[-2:], mode="area")
    mse = ((samples[:, None] - frames[None]) ** 2).mean(dim=(2, 3, 4))  # (sample, target)
    own = mse.diag()
    off = ~torch.eye(len(mse), dtype=torch.bool)
    return {"two_way": float((own[:, None] < mse)[off].float().mean()), "mse_own": float(own.mean()),
            "mse_other": float(mse[off].mean()), "n": len(frames)}


def evaluate_toy_weights(world_root: str | Path, weights_root: str | Path, scale: str = "toy",
                         roles: tuple[str, ...] = ("clip", "vae", "gpt2", "unclip"),
                         split: str = "test") -> dict[str, Any]:
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
        out["gpt2"] = eval_gpt2(toy_gpt2.build_toy(weights_root, "cpu"), test,
                                toy_gpt2.RECIPES[scale].context_length)
    if "unclip" in roles:
        out["unclip"] = eval_unclip(toy_unclip.build_toy(weights_root, "cpu"), clip, test)
    log.info("toy weights quality: %s", out)
    return out
