"""Toy ``clip`` role: a tiny ``open_clip.CLIP`` (ViT image tower, CLIP-BPE text tower) trained contrastively on the
toy world's training frame/caption pairs, plus the frozen tokens->text projection ``coco_tokens_avg_proj.pth``.

* The image tower pools by averaging its patch tokens (``pool_type="avg"``), so the role's tokens ``(N, T, D)`` (after
  ``ln_post``, before ``proj``) are exactly what the contrastive loss shaped, and their mean maps linearly to text.
* The text tower uses the real 49408-token OpenAI CLIP BPE that ships in the open_clip wheel (SOT 49406, EOT 49407,
  zero padding), with a shorter context (captions are < 25 tokens).
* Frames go through :meth:`ClipRole.preprocess` during training too (including the upstream ``(x + 1) / 2`` quirk), so
  the stages see the same input mapping the model was trained with.
* ``coco_tokens_avg_proj.pth`` = ``{"proj": (D, Dt)}`` is the ridge least-squares map from the token mean of every
  training frame to the pooled text embedding of its clip's caption (upstream applies ``mean_T(tokens) @ proj``).

Files in ``weights_root/clip/``: ``open_clip_config.json``, ``open_clip_model.safetensors``,
``coco_tokens_avg_proj.pth``, ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.foundation.clip import ClipRole
from models.foundation.common import finish
from models.foundation.toy.common import TrainRecipe, chunked, generator, random_frames, require_toy_files, train
from models.foundation.toy.data import Stimuli
from utils.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PROJ_FILE = "coco_tokens_avg_proj.pth"
CLIP_VOCAB, SOT, EOT = 49408, 49406, 49407  # OpenAI CLIP BPE: vocabulary size, start and end of text


@dataclass(frozen=True)
class ToyClipRecipe:
    """Architecture and training of the toy CLIP. Tokens: ``(image_size / patch_size)^2``, width ``vision_width``."""

    embed_dim: int = 64
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 96
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 64
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = 32
    proj_ridge: float = 1e-3  # relative ridge of the tokens->text least squares
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=900, batch_size=128, lr=1e-3, weight_decay=0.05, warmup=100)
    )

    def open_clip_config(self) -> dict[str, Any]:
        """Keyword arguments of ``open_clip.CLIP`` (JSON-able)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "pool_type": "avg",
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": CLIP_VOCAB,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


RECIPES: dict[str, ToyClipRecipe] = {
    "toy": ToyClipRecipe(),
    "smoke": ToyClipRecipe(
        patch_size=8,
        vision_width=48,
        vision_layers=2,
        vision_head_width=16,
        text_width=48,
        text_layers=2,
        embed_dim=48,
        train=TrainRecipe(steps=160, batch_size=64, lr=2e-3, weight_decay=0.05, warmup=20),
    ),
}


def make_tokenizer(context_length: int) -> Any:
    """open_clip's ``SimpleTokenizer`` over the CLIP BPE file shipped in the wheel (no download)."""
    import open_clip

    return open_clip.SimpleTokenizer(context_length=context_length)


def make_role(cfg: dict[str, Any]) -> ClipRole:
    import open_clip

    model = open_clip.CLIP(**cfg)
    return ClipRole(model, make_tokenizer(model.context_length))


def image_embed(role: ClipRole, frames01: torch.Tensor) -> torch.Tensor:
    """``(B, 3, R, R)`` -> ``(B, E)`` L2-normalised image embeddings (with gradients)."""
    pooled, _ = role.model.visual(role.preprocess(frames01))
    return F.normalize(pooled, dim=-1)


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, caption_id: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of ``img (B, E)`` vs ``txt (B, E)`` at scale ``exp(logit_scale)`` (at most 100), with soft
    targets spread over the batch items that share a caption (``caption_id (B,)``)."""
    same = caption_id[:, None] == caption_id[None, :]  # (B, B)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T
    target = same.float() / same.float().sum(dim=1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target.T * logits.log_softmax(0), 0).mean()
    )


def train_clip(stim: Stimuli, recipe: ToyClipRecipe, seed: int, progress: bool) -> tuple[ClipRole, dict[str, Any]]:
    """Contrastive pretraining on (random frame of a clip, its caption) pairs -> (role in eval mode, stats)."""
    gen = generator(seed)
    role = make_role(recipe.open_clip_config())
    tokens = role.tokenize(stim.captions)  # (N, L)
    _, caption_id = torch.unique(tokens, dim=0, return_inverse=True)  # (N,) same id = same caption

    def loss_fn(step: int) -> torch.Tensor:
        clips, frames = random_frames(stim, recipe.train.batch_size, gen)
        img = image_embed(role, frames)
        txt = role.model.encode_text(tokens[clips], normalize=True)
        return contrastive_loss(img, txt, caption_id[clips], role.model.logit_scale)

    return role, train(role.model, loss_fn, recipe.train, "toy clip", progress)


@torch.no_grad()
def fit_tokens_proj(role: ClipRole, stim: Stimuli, ridge: float, chunk: int = 512) -> torch.Tensor:
    """Least squares ``mean_T(tokens) @ proj ≈ text_pooled(caption)`` over every training frame -> ``(D, Dt)``."""
    x = chunked(lambda f: role.image_tokens(f).mean(dim=1), stim.flat_frames(), chunk)  # (N*F, D)
    y = role.text_pooled(stim.captions)[stim.frame_clip()]  # (N*F, Dt)
    gram = x.T.double() @ x.double()
    lam = ridge * gram.diagonal().mean()
    proj = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T.double() @ y.double())
    return proj.float()


def save_clip(role: ClipRole, cfg: dict[str, Any], proj: torch.Tensor, folder: Path) -> None:
    atomic_write_json(folder / CONFIG_FILE, cfg)
    atomic_save_safetensors(folder / WEIGHTS_FILE, {k: v.detach().cpu() for k, v in role.model.state_dict().items()})
    atomic_torch_save(folder / PROJ_FILE, {"proj": proj.detach().cpu().contiguous()})


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
    """Train the toy CLIP, fit the projection and save both into ``folder`` -> stats."""
    recipe = RECIPES[scale]
    role, stats = train_clip(stim, recipe, seed, progress)
    proj = fit_tokens_proj(role, stim, recipe.proj_ridge)
    save_clip(role, recipe.open_clip_config(), proj, folder)
    return {**stats, "num_tokens": role.num_tokens, "token_dim": role.token_dim, "text_dim": role.text_dim}


def proj_path(weights_root: str | Path) -> Path:
    """Where the toy ``coco_tokens_avg_proj.pth`` lives (the real one lives in data_root)."""
    return Path(weights_root) / "clip" / PROJ_FILE


def load_proj(weights_root: str | Path) -> torch.Tensor:
    """``(D, Dt)`` toy tokens->text projection."""
    return torch.load(proj_path(weights_root), map_location="cpu", weights_only=True)["proj"]


def load_clip(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> ClipRole:
    """Rebuild the role from ``folder`` (strict load), frozen, on ``device``."""
    from safetensors.torch import load_file

    require_toy_files(folder, "clip", CONFIG_FILE, WEIGHTS_FILE)
    role = make_role(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    role.model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    finish(role.model, device, dtype)
    return role


def build_toy(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> ClipRole:
    """The toy/smoke CLIP from ``weights_root/clip/``."""
    return load_clip(Path(weights_root) / "clip", device, dtype)
