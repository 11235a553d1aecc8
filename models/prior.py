"""MindEye2's diffusion prior re-implemented in plain torch (dalle2-pytorch is not a dependency).

Module and parameter names follow MindEye2's `BrainDiffusionPrior(net=PriorNetwork(...))` so that the
`diffusion_prior.*` entries of MindEye2's `last.pth` load with ``strict=True``:

* `net.learned_query` (T, D): positional embedding added to the noisy image tokens ("pos_emb" query mode);
* `net.null_brain_embeds`, `net.null_image_embed` (T, D): learned nulls for condition dropout;
* `net.to_time_embeds.0.1.net.*`: continuous time embedding, sinusoidal → 2-layer SiLU MLP;
* `net.causal_transformer.*`: non-causal pre-LN transformer with multi-query cosine-similarity attention, rotary
  embedding on the first `rotary_dim` head features, T5 relative position bias and SwiGLU feed-forward;
* `noise_scheduler.*`: the 13 persistent buffers of a cosine-schedule DDPM.

The network predicts the clean image tokens x0 directly. The sequence it sees is
``[brain tokens (T) | time token (1) | noisy image tokens + pos emb (T)]`` and its output is the last T positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.sizes import PriorConfig

Generators = torch.Generator | Sequence[torch.Generator] | None


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain `g` and no bias (dalle2 style); ``stable`` divides by the row max first."""

    def __init__(self, dim: int, eps: float = 1e-5, fp16_eps: float = 1e-3, stable: bool = False):
        super().__init__()
        self.eps, self.fp16_eps, self.stable = eps, fp16_eps, stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if x.dtype == torch.float32 else self.fp16_eps
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var = torch.var(x, dim=-1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=-1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class SinusoidalTimeEmbedding(nn.Module):
    """(B,) float times → (B, dim) [sin | cos] features."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -step)
        args = t[:, None] * freqs[None, :]  # (B, half)
        return torch.cat((args.sin(), args.cos()), dim=-1)


class TimeMLP(nn.Module):
    """Linear → SiLU → Linear → SiLU → Linear; keys ``net.0.0``, ``net.1.0``, ``net.2`` as in dalle2's MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU()),
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU()),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[-1].weight.dtype))  # dalle2 casts times to the (fp32) weights' dtype


class RotaryEmbedding(nn.Module):
    """Interleaved rotary position embedding on the first `dim` features; one instance is shared by all layers.

    `freqs` is a persistent buffer because MindEye2's checkpoint stores it once per attention layer.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.register_buffer("freqs", self.default_freqs(), persistent=True)

    def default_freqs(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2)[: self.dim // 2].float() / self.dim))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n, d) → same shape, positions 0..n-1 along dim -2."""
        n = x.shape[-2]
        pos = torch.arange(n, device=x.device, dtype=self.freqs.dtype)
        angles = torch.einsum("n,f->nf", pos, self.freqs)
        angles = repeat(angles, "n f -> n (f r)", r=2).to(x.dtype)  # (n, dim) as f0 f0 f1 f1 ...
        x_rot, x_pass = x[..., : self.dim], x[..., self.dim :]
        pairs = rearrange(x_rot, "... (f r) -> ... f r", r=2)
        x1, x2 = pairs.unbind(-1)
        half_turn = rearrange(torch.stack((-x2, x1), dim=-1), "... f r -> ... (f r)")
        return torch.cat((x_rot * angles.cos() + half_turn * angles.sin(), x_pass), dim=-1)


class RelPosBias(nn.Module):
    """T5 relative position bias: (heads, i, j) from `relative_attention_bias` (buckets, heads)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """Only non-negative distances q - k are told apart (the T5 causal bucketing); the rest fall in bucket 0."""
        n = torch.clamp(-rel, min=0)
        max_exact = self.num_buckets // 2
        is_small = n < max_exact
        large = (
            max_exact
            + (
                torch.log(n.clamp(min=1).float() / max_exact)
                / math.log(self.max_distance / max_exact)
                * (self.num_buckets - max_exact)
            ).long()
        )
        large = torch.clamp(large, max=self.num_buckets - 1)
        return torch.where(is_small, n, large)

    def forward(self, i: int, j: int, device: torch.device) -> torch.Tensor:
        q_pos = torch.arange(i, dtype=torch.long, device=device)
        k_pos = torch.arange(j, dtype=torch.long, device=device)
        rel = k_pos[None, :] - q_pos[:, None]  # (i, j)
        return rearrange(self.relative_attention_bias(self.bucket(rel)), "i j h -> h i j")


class MultiQueryAttention(nn.Module):
    """Pre-LN multi-query attention: `heads` query heads share one K/V head; cosine-similarity logits × scale.

    A learned null key/value is prepended to the keys. x (B, N, dim) → (B, N, dim).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        rotary: RotaryEmbedding,
        cosine_sim_scale: float,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads, self.scale = heads, cosine_sim_scale
        self.norm = GainLayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.null_kv = nn.Parameter(torch.zeros(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.rotary_emb = rotary
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), GainLayerNorm(dim))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.norm(x)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, dh)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (B, N, dh) each
        q, k = self.rotary_emb.rotate(q), self.rotary_emb.rotate(k)
        null_k, null_v = (repeat(t, "d -> b 1 d", b=b) for t in self.null_kv.unbind(dim=0))
        k = torch.cat((null_k, k), dim=1)  # (B, N+1, dh)
        v = torch.cat((null_v, v), dim=1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) * self.scale + attn_bias  # (B, H, N, N+1)
        attn = self.dropout(sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype))
        out = torch.einsum("bhij,bjd->bhid", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def feed_forward(dim: int, mult: int, dropout: float = 0.0) -> nn.Sequential:
    """Pre-LN SwiGLU feed-forward; indices 0..5 match dalle2's `FeedForward` keys (3 is an unused norm slot)."""
    inner = mult * dim
    return nn.Sequential(
        GainLayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        SwiGLU(),
        nn.Identity(),
        nn.Dropout(dropout),
        nn.Linear(inner, dim, bias=False),
    )


class PriorTransformer(nn.Module):
    """MindEye2's `FlaggedCausalTransformer` with causal=False: (B, N, dim) → (B, N, dim)."""

    def __init__(self, dim: int, cfg: PriorConfig):
        super().__init__()
        self.init_norm = nn.Identity()
        self.rel_pos_bias = RelPosBias(cfg.heads, cfg.rel_pos_buckets, cfg.rel_pos_max_distance)
        rotary = RotaryEmbedding(cfg.rotary_dim)  # shared by every layer, as upstream
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    MultiQueryAttention(dim, cfg.heads, cfg.dim_head, rotary, cfg.cosine_sim_scale),
                    feed_forward(dim, cfg.ff_mult),
                ]
            )
            for _ in range(cfg.depth)
        )
        self.norm = GainLayerNorm(dim, stable=True)
        self.project_out = nn.Linear(dim, dim, bias=False)
        self.grad_checkpointing = False  # recompute each layer in the backward pass instead of storing activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        x = self.init_norm(x)
        # (H, N, N+1); the null key sits at index 0, so real key p is biased as position p+1 (upstream layout).
        attn_bias = self.rel_pos_bias(n, n + 1, device=x.device)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for attn, ff in self.layers:
            if ckpt:
                x = checkpoint(_prior_layer, attn, ff, x, attn_bias, use_reentrant=False)
            else:
                x = _prior_layer(attn, ff, x, attn_bias)
        return self.project_out(self.norm(x))


def _prior_layer(attn: nn.Module, ff: nn.Module, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
    """One pre-LN transformer layer with residuals: (B, N, dim) → (B, N, dim)."""
    x = attn(x, attn_bias=attn_bias) + x
    return ff(x) + x


def keep_mask(batch: int, drop_prob: float, device: torch.device, generator: Generators = None) -> torch.Tensor:
    """(B, 1, 1) bool: True where the condition is kept."""
    if drop_prob <= 0:
        return torch.ones(batch, 1, 1, dtype=torch.bool, device=device)
    if drop_prob >= 1:
        return torch.zeros(batch, 1, 1, dtype=torch.bool, device=device)
    u = rand_per_sample((batch,), generator, device, torch.float32)
    return (u >= drop_prob).view(batch, 1, 1)


class PriorNetwork(nn.Module):
    """Denoiser: (noisy image tokens, t, brain tokens) → predicted clean image tokens, all (B, T, D)."""

    def __init__(self, dim: int, num_tokens: int, cfg: PriorConfig):
        super().__init__()
        self.dim, self.num_tokens = dim, num_tokens
        self.learned_query = nn.Parameter(torch.zeros(num_tokens, dim))
        self.null_brain_embeds = nn.Parameter(torch.zeros(num_tokens, dim))
        self.null_image_embed = nn.Parameter(torch.zeros(num_tokens, dim))
        self.to_time_embeds = nn.Sequential(
            nn.Sequential(SinusoidalTimeEmbedding(dim), TimeMLP(dim, cfg.time_mlp_expansion * dim))
        )
        self.causal_transformer = PriorTransformer(dim, cfg)

    def forward(
        self,
        image_embed: torch.Tensor,
        times: torch.Tensor,
        brain_embed: torch.Tensor,
        brain_cond_drop_prob: float = 0.0,
        image_cond_drop_prob: float = 0.0,
        generator: Generators = None,
    ) -> torch.Tensor:
        """image_embed (B, T, D) noisy tokens; times (B,) int; brain_embed (B, T, D) → (B, T, D)."""
        b, device = image_embed.shape[0], image_embed.device
        brain_keep = keep_mask(b, brain_cond_drop_prob, device, generator)
        image_keep = keep_mask(b, image_cond_drop_prob, device, generator)
        brain_embed = torch.where(brain_keep, brain_embed, self.null_brain_embeds.to(brain_embed.dtype)[None])
        image_embed = torch.where(image_keep, image_embed, self.null_image_embed.to(image_embed.dtype)[None])
        time_embed = self.to_time_embeds(times.to(image_embed.dtype)).unsqueeze(1)  # (B, 1, D)
        image_embed = image_embed + self.learned_query[None]  # pos_emb query mode
        tokens = torch.cat((brain_embed, time_embed.to(image_embed.dtype), image_embed), dim=1)  # (B, 2T+1, D)
        return self.causal_transformer(tokens)[:, -self.num_tokens :]

    def forward_with_cond_scale(self, image_embed, times, brain_embed, cond_scale: float = 1.0) -> torch.Tensor:
        pred = self.forward(image_embed, times, brain_embed)
        if cond_scale == 1:
            return pred
        null = self.forward(image_embed, times, brain_embed, brain_cond_drop_prob=1.0, image_cond_drop_prob=1.0)
        return null + (pred - null) * cond_scale


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule, float64 (T,)."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return torch.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)


class NoiseScheduler(nn.Module):
    """Cosine DDPM tables as persistent buffers (names as in dalle2's `NoiseScheduler`)."""

    def __init__(self, timesteps: int):
        super().__init__()
        self.num_timesteps = timesteps
        betas = cosine_betas(timesteps)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = F.pad(ac[:-1], (1, 0), value=1.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "p2_loss_weight": torch.ones_like(betas),  # p2 gamma 0: uniform weighting
        }
        for name, value in tables.items():
            self.register_buffer(name, value.to(torch.float32), persistent=True)

    @staticmethod
    def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return table.gather(0, t).view(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, xt.ndim) * x0
            + self.extract(self.posterior_mean_coef2, t, xt.ndim) * xt
        )
        return mean, self.extract(self.posterior_log_variance_clipped, t, xt.ndim)


def _as_list(generator: Generators, batch: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} per-sample generators for a batch of {batch}")
    return gens


def _per_sample(
    draw: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: Generators, device, dtype
) -> torch.Tensor:
    """``draw`` (``torch.randn`` / ``torch.rand``) of ``shape`` (B, ...). With a list of generators, sample i uses
    generator i (batch-size independent)."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return draw(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    return torch.stack(
        [draw(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in _as_list(generator, shape[0])]
    )


def randn_per_sample(shape: tuple[int, ...], generator: Generators, device, dtype) -> torch.Tensor:
    """Normal noise (B, ...), per-sample generators as in `_per_sample`."""
    return _per_sample(torch.randn, shape, generator, device, dtype)


def rand_per_sample(shape: tuple[int, ...], generator: Generators, device, dtype) -> torch.Tensor:
    """Uniform [0, 1) values (B, ...), per-sample generators as in `_per_sample`."""
    return _per_sample(torch.rand, shape, generator, device, dtype)


class BrainDiffusionPrior(nn.Module):
    """x0-predicting DDPM over CLIP image tokens, conditioned on brain tokens."""

    def __init__(self, dim: int, num_tokens: int, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.net = PriorNetwork(dim, num_tokens, cfg)
        self.noise_scheduler = NoiseScheduler(cfg.timesteps)

    def forward(
        self, brain_embed: torch.Tensor, image_embed: torch.Tensor, generator: Generators = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training step. brain_embed, image_embed (B, T, D) → (mse, pred_x0 (B, T, D)).

        A uniform t in [0, timesteps) is drawn per sample; in training mode brain and image conditions are each
        replaced by their learned null with probability `cond_drop_prob`.
        """
        b, device = image_embed.shape[0], image_embed.device
        u = rand_per_sample((b,), generator, device, torch.float32)
        times = (u * self.noise_scheduler.num_timesteps).long().clamp(max=self.noise_scheduler.num_timesteps - 1)
        noise = randn_per_sample(tuple(image_embed.shape), generator, device, image_embed.dtype)
        noisy = self.noise_scheduler.q_sample(image_embed, times, noise)
        drop = self.cfg.cond_drop_prob if self.training else 0.0
        pred = self.net(
            noisy, times, brain_embed, brain_cond_drop_prob=drop, image_cond_drop_prob=drop, generator=generator
        )
        return F.mse_loss(pred, image_embed), pred

    @torch.no_grad()
    def sample(
        self,
        brain_embed: torch.Tensor,
        generator: Generators = None,
        steps: int | None = None,
        cond_scale: float = 1.0,
    ) -> torch.Tensor:
        """Brain-only ancestral sampling. brain_embed (B, T, D) → sampled image tokens (B, T, D).

        ``steps`` None (or at least ``timesteps``) runs every DDPM timestep; otherwise ``steps`` evenly strided
        timesteps, moving between consecutive kept timesteps with the posterior q(x_s | x_t, x0). Pass one generator
        per sample (seeded from the base seed and the clip index) to make the result independent of the batch
        composition.
        """
        if steps is None or steps >= self.noise_scheduler.num_timesteps:
            return self._sample_every_step(brain_embed, generator, cond_scale)
        return self._sample_strided(brain_embed, generator, steps, cond_scale)

    def _sample_every_step(self, brain_embed: torch.Tensor, generator: Generators, cond_scale: float) -> torch.Tensor:
        """Ancestral DDPM over all timesteps: (B, T, D) → (B, T, D)."""
        b, device, dtype = brain_embed.shape[0], brain_embed.device, brain_embed.dtype
        x = randn_per_sample(tuple(brain_embed.shape), generator, device, dtype)
        for i in reversed(range(self.noise_scheduler.num_timesteps)):
            t = torch.full((b,), i, device=device, dtype=torch.long)
            x0 = self.net.forward_with_cond_scale(x, t, brain_embed, cond_scale=cond_scale)
            mean, log_var = self.noise_scheduler.q_posterior(x0, x, t)
            noise = randn_per_sample(tuple(x.shape), generator, device, dtype)
            x = mean + (0.5 * log_var).exp() * noise if i > 0 else mean
        return x

    def _sample_strided(
        self, brain_embed: torch.Tensor, generator: Generators, steps: int, cond_scale: float
    ) -> torch.Tensor:
        """``steps`` evenly strided timesteps from the last to 0: (B, T, D) → (B, T, D)."""
        sched, cond = self.noise_scheduler, brain_embed
        n = sched.num_timesteps
        times = torch.linspace(n - 1, 0, max(steps, 1)).round().long().unique_consecutive().tolist()
        x = randn_per_sample(tuple(cond.shape), generator, cond.device, cond.dtype)
        for k, t_now in enumerate(times):
            t = torch.full((len(cond),), t_now, device=cond.device, dtype=torch.long)
            x0 = self.net.forward_with_cond_scale(x, t, cond, cond_scale=cond_scale)
            if k == len(times) - 1:  # the last kept step is t = 0, whose posterior mean is x0 itself
                return x0
            a_t, a_s = sched.alphas_cumprod[t_now], sched.alphas_cumprod[times[k + 1]]  # s < t: the next kept step
            beta = 1 - a_t / a_s
            mean = (a_s.sqrt() * beta * x0 + (a_t / a_s).sqrt() * (1 - a_s) * x) / (1 - a_t)
            std = (beta * (1 - a_s) / (1 - a_t)).clamp(min=1e-20).sqrt()
            x = mean + std * randn_per_sample(tuple(x.shape), generator, x.device, x.dtype)
        return x
