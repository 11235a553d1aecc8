"""Role ``clip``: OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k), frozen.

* ``image_tokens(frames01)`` -> ``(N, 256, 1664)``: the visual tower's ``ln_post`` output without the class token and
  WITHOUT ``visual.proj`` (sgm ``FrozenOpenCLIPImageEmbedder(output_tokens=True, only_tokens=True)``). Input quirk
  (upstream §3.3, MindEye2 §4): the embedder expects [-1, 1] but is fed [0, 1] frames, so it sees ``(x + 1) / 2`` in
  [0.5, 1] before the CLIP mean/std. Reproduced on purpose: the unclip6 checkpoint and the MindEye2 prior were trained
  on these targets.
* ``text_pooled(texts)`` -> ``(N, 1280)``: the EOT token after ``ln_final`` times ``text_projection``
  (sgm ``FrozenOpenCLIPEmbedder2(layer="last", legacy=False, always_return_pooled=True)`` pooled output).
* ``tokenize(texts)`` -> ``(N, 77)`` CLIP-BPE ids (``open_clip.tokenize``: SOT 49406 ... EOT 49407, zero padded).

A toy builder returns ``ClipRole(open_clip.CLIP(**tiny_cfg), tokenizer)``; every size comes from the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from models.foundation.common import ModuleRole
from models.foundation.weight_file import MB, WeightFile, repo_files

if TYPE_CHECKING:
    import open_clip

BIGG_REPO = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
# OpenCLIP ViT-bigG/14 laion2b_s39b_b160k (image tokens + pooled text)
WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        "clip",
        f"{BIGG_REPO}/open_clip_model.safetensors",
        BIGG_REPO,
        "open_clip_model.safetensors",
        10_200 * MB,
        alternatives=repo_files(BIGG_REPO, "open_clip_pytorch_model.bin"),
    ),
)

# CLIP normalisation used by sgm's FrozenOpenCLIPImageEmbedder (OpenAI constants)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipRole(ModuleRole):
    """Frozen OpenCLIP image-token and pooled-text encoder.

    Attributes: ``token_dim`` (D, 1664), ``num_tokens`` (T, 256), ``text_dim`` (Dt, 1280), ``image_size`` (224),
    ``context_length`` (77).
    """

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer: Callable[[list[str]], torch.Tensor],
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ):
        self.model = model
        self.tokenizer = tokenizer
        visual = model.visual
        visual.output_tokens = True
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        grid = visual.grid_size
        self.num_tokens = int(grid[0] * grid[1])
        self.token_dim = int(visual.conv1.out_channels)
        self.text_dim = int(model.text_projection.shape[1])
        self.context_length = int(model.context_length)
        self._mean = torch.tensor(mean).view(1, 3, 1, 1)
        self._std = torch.tensor(std).view(1, 3, 1, 1)

    def preprocess(self, frames01: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> normalised ``(N, 3, S, S)``: bicubic resize to S, then ``(x + 1) / 2``
        (the upstream quirk), then CLIP mean/std. Resize is skipped when already S x S (as kornia's is an identity)."""
        x = frames01.to(device=self.device, dtype=torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=True, antialias=True
            )
        x = (x + 1.0) / 2.0
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.to(self.dtype)

    @torch.no_grad()
    def image_tokens(self, frames01: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W)`` in [0, 1] -> ``(..., T, D)`` tokens after ``ln_post``, before ``proj``."""
        lead = frames01.shape[:-3]
        x = self.preprocess(frames01.reshape(-1, *frames01.shape[-3:]))
        _, tokens = self.model.visual(x)
        return tokens.reshape(*lead, *tokens.shape[1:])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` (N) -> ``(N, context_length)`` int64 CLIP-BPE ids on the CPU."""
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def text_pooled(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` (N) -> ``(N, Dt)`` pooled, projected, unnormalised text embeddings."""
        tokens = self.tokenize(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=False)
