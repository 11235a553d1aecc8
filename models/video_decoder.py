"""Text-driven video decoder: key-object masks and blurry-video VAE latents from per-frame CLIP tokens.

`TextDrivenDecoder` (cross-attention of the frame tokens to a text vector, a 1×1-conv projector, `DecoderVideo` and
two 3×3-conv heads) follows upstream NEURONS `TextDrivenDecoder`; `DecoderVideo` is a small VAE-decoder-style stack
in plain torch whose spatial self-attention after every ResNet layer is blended with a temporal self-attention:
``w · spatial + (1 − w) · temporal`` with a learnable scalar `w` initialised to 1.

Two upstream defects are fixed by default and reproducible by flag (`DecoderConfig`):

* `text_attention="own"` (defect 14): the tokens of a clip's frames attend to that clip's text only; ``"batch"`` is
  upstream: keys are the text vectors of every clip in the mini-batch. Two additions are switched separately (both on
  by default, off upstream): `text_attention_null_kv` prepends a learned null key/value to the keys, and
  `text_attention_residual` adds the attention output to the projected vision tokens instead of replacing them (so
  spatial information survives when there is one text vector).
* `temporal_scope="clip"` (defect 15): temporal attention runs over the F frames of one clip; ``"batch"`` is upstream
  (over all B·F frames of the mini-batch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.sizes import DecoderConfig


class ResnetBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN → SiLU → conv3×3, plus a 1×1 shortcut when the width changes. (N,Ci,H,W)→(N,Co,H,W)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SequenceSelfAttention(nn.Module):
    """One-head self-attention over a sequence with GroupNorm over (channels × sequence) and a residual.

    x (N, L, C) → (N, L, C).
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group_norm(x.transpose(1, 2)).transpose(1, 2)  # (N, L, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        attn = (q @ k.transpose(1, 2) * q.shape[-1] ** -0.5).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return x + self.to_out[0](attn @ v)


class SpatioTemporalAttention(nn.Module):
    """Spatial self-attention blended with temporal self-attention. x (N·t, C, H, W) → same shape.

    `time` is the length of each temporal sequence: N·t frames are read as N groups of `time` consecutive frames.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.spatial = SequenceSelfAttention(channels, groups)
        self.temporal = SequenceSelfAttention(channels, groups)
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, time: int) -> torch.Tensor:
        _, _, h, w = x.shape
        s = rearrange(self.spatial(rearrange(x, "n c h w -> n (h w) c")), "n (h w) c -> n c h w", h=h, w=w)
        t = rearrange(s, "(n t) c h w -> (n h w) t c", t=time)
        t = rearrange(self.temporal(t), "(n h w) t c -> (n t) c h w", h=h, w=w)
        return self.weight * s + (1 - self.weight) * t


class MidBlock(nn.Module):
    """ResNet → spatio-temporal attention → ResNet at constant width."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups) for _ in range(2))
        self.attention = SpatioTemporalAttention(channels, groups)

    def forward(self, x: torch.Tensor, time: int) -> torch.Tensor:
        return self.resnets[1](self.attention(self.resnets[0](x), time))


class UpBlock(nn.Module):
    """`n_layers` × (ResNet → spatio-temporal attention), then an optional nearest ×2 upsample + conv3×3."""

    def __init__(self, in_channels: int, out_channels: int, n_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(n_layers)
        )
        self.attentions = nn.ModuleList(SpatioTemporalAttention(out_channels, groups) for _ in range(n_layers))
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor, time: int) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x), time)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class DecoderVideo(nn.Module):
    """(N, C_in, g, g) → (N, block_out_channels[0], g·2^(k−1), g·2^(k−1)); ends with GroupNorm + SiLU (no conv_out)."""

    def __init__(self, in_channels: int, cfg: DecoderConfig):
        super().__init__()
        widths = list(reversed(cfg.block_out_channels))  # e.g. 128, 64, 32
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], cfg.norm_groups)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                widths[max(i - 1, 0)],
                widths[i],
                cfg.layers_per_block + 1,
                cfg.norm_groups,
                upsample=i < len(widths) - 1,
            )
            for i in range(len(widths))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=1e-6)

    def forward(self, x: torch.Tensor, time: int) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x), time)
        for block in self.up_blocks:
            x = block(x, time)
        return F.silu(self.conv_norm_out(x))


class TextDrivenDecoder(nn.Module):
    """Per-frame tokens + a text condition → mask logits and/or VAE latents at the decoder resolution."""

    def __init__(self, clip_dim: int, text_dim: int, latent_channels: int, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(clip_dim, text_dim, bias=False)
        self.k = nn.Linear(text_dim, text_dim, bias=False)
        self.v = nn.Linear(text_dim, text_dim, bias=False)
        self.out = nn.Linear(text_dim, text_dim, bias=False)
        # Learned "nothing relevant" key/value: lets each token gate how much of its clip's text it takes.
        self.null_kv = nn.Parameter(torch.zeros(2, text_dim)) if cfg.text_attention_null_kv else None
        self.attn_dropout = nn.Dropout(cfg.attn_dropout)
        self.proj_dropout = nn.Dropout(cfg.attn_dropout)
        m0, m1, m2 = cfg.map_channels
        self.maps_projector = nn.Sequential(
            nn.Conv2d(text_dim, m0, 1, bias=False),
            nn.GroupNorm(1, m0),
            nn.ReLU(),
            nn.Conv2d(m0, m1, 1, bias=False),
            nn.GroupNorm(1, m1),
            nn.ReLU(),
            nn.Conv2d(m1, m2, 1, bias=True),
        )
        self.dropout = nn.Dropout(cfg.map_dropout)
        self.norm = nn.GroupNorm(1, m2)
        self.video_decoder = DecoderVideo(m2, cfg)
        self.seg_head = nn.Conv2d(cfg.block_out_channels[0], 1, 3, padding=1)
        self.recon_head = nn.Conv2d(cfg.block_out_channels[0], latent_channels, 3, padding=1)

    def attend_text(self, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """vision (B, F, T, D); text (B, Dt) or (B, L, Dt) → (B·F, T, Dt)."""
        b, f = vision.shape[:2]
        q = self.q(rearrange(vision, "b f t d -> (b f) t d"))  # (B·F, T, Dt)
        scale = vision.shape[-1] ** -0.5
        k, v = self.text_keys(text, f)  # (N, K, Dt), N = B·F or 1 (shared by every frame token)
        attn = self.attn_dropout((q @ k.transpose(1, 2) * scale).softmax(dim=-1))  # (B·F, T, K)
        ctx = attn @ v  # (B·F, T, Dt)
        return self.proj_dropout(self.out(q + ctx if self.cfg.text_attention_residual else ctx))

    def text_keys(self, text: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text attention: text (B, Dt) or (B, L, Dt) → two (N, K, Dt).

        "own": N = B·F, the frames of clip b see clip b's L text vectors; "batch" (upstream): N = 1, every frame token
        sees the B text vectors of the whole mini-batch. With the null key/value K gains one leading entry."""
        if self.cfg.text_attention == "batch":
            if text.ndim != 2:
                raise ValueError("text_attention='batch' (upstream) takes one text vector per clip, (B, Dt)")
            text = text[None]  # (1, B, Dt)
        else:
            text = text[:, None] if text.ndim == 2 else text  # (B, L, Dt)
            text = text.repeat_interleave(f, dim=0)  # (B·F, L, Dt)
        k, v = self.k(text), self.v(text)
        if self.null_kv is not None:
            k = torch.cat((self.null_kv[0].expand(len(text), 1, -1), k), dim=1)  # (N, K, Dt)
            v = torch.cat((self.null_kv[1].expand(len(text), 1, -1), v), dim=1)
        return k, v

    def forward(
        self, vision: torch.Tensor, text: torch.Tensor, head: Literal["seg", "recon", "both"] = "seg"
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """vision (B, F, T, D) per-frame tokens; text (B, Dt) or (B, L, Dt).

        Returns mask logits (B, F, 1, S, S) for "seg", latents (B, F, C, S, S) for "recon", or both.
        S = sqrt(T) · 2^(len(block_out_channels) − 1).
        """
        b, f, t, _ = vision.shape
        g = int(round(t**0.5))
        x = rearrange(self.attend_text(vision, text), "n (h w) c -> n c h w", h=g, w=g)  # (B·F, Dt, g, g)
        x = self.norm(self.dropout(self.maps_projector(x)))  # (B·F, m2, g, g)
        time = f if self.cfg.temporal_scope == "clip" else b * f
        x = self.video_decoder(x, time=time)  # (B·F, C0, S, S)
        split = lambda y: rearrange(y, "(b f) c h w -> b f c h w", b=b)  # noqa: E731
        if head == "seg":
            return split(self.seg_head(x))
        if head == "recon":
            return split(self.recon_head(x))
        return split(self.seg_head(x)), split(self.recon_head(x))
