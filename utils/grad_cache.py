"""A gradient cache (Gao et al. 2021): the gradients of a loss on a whole batch with the activations of one micro batch
at a time, for losses that are not sums over samples (contrastive terms). Used by stage 2's ``train.micro_batch``."""

from __future__ import annotations

from typing import Any

import torch


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class GradientCache(torch.autograd.Function):
    """The per-clip outputs of every micro batch, concatenated, computed without keeping activations; the backward
    pass reruns each micro batch with gradients (its RNG state replayed, so its dropout draws are the same) and
    back-propagates the slice of the incoming gradients that belongs to it (a gradient cache, Gao et al. 2021: the
    parameters' gradients are those of the loss on the whole batch)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, runs: list, device: torch.device, rest: dict, keys: tuple[str, ...]
                ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        ctx.runs, ctx.device, ctx.keys, ctx.states, outs = runs, device, keys, [], []
        for run in runs:
            ctx.states.append(rng_state(device))
            outs.append(run())
        ctx.sizes = [len(o[keys[0]]) for o in outs]
        rest.update({k: torch.cat([o[k] for o in outs]) for k in outs[0] if k not in keys})
        return tuple(torch.cat([o[k] for o in outs]) for k in keys)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:
        after = rng_state(ctx.device)
        start = 0
        for run, state, n in zip(ctx.runs, ctx.states, ctx.sizes, strict=True):
            set_rng_state(state, ctx.device)
            with torch.enable_grad():
                out = run()
            pairs = [(out[k], g[start:start + n]) for k, g in zip(ctx.keys, grads, strict=True)
                     if g is not None and out[k].requires_grad]  # fmt: skip
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
            start += n
        set_rng_state(after, ctx.device)
        return None, None, None, None, None
