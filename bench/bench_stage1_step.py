"""Stage-1 training-step throughput of the brain model at a registry size, with random inputs (no data, no weights).

    python bench/bench_stage1_step.py --size toy --batch 32 --steps 20
    python bench/bench_stage1_step.py --size paper --batch 120 --device cuda   # on a GPU

Prints one line per setting: size, batch, device, parameters, ms per step (median) and clips per second, so runs on
different machines or commits can be compared. The foundation dims of ``toy``/``smoke`` are passed in here (64 tokens
of width 96, text 64 for toy; 16 x 48, 48 for smoke), matching the toy CLIP recipes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.brain import NeuronsBrainModel  # noqa: E402
from models.sizes import STAGE1_PARTS, FoundationDims, brain_config  # noqa: E402
from utils.losses import mixco, mixco_nce, symmetric_infonce  # noqa: E402

TOY_DIMS = {
    "toy": FoundationDims(clip_tokens=64, clip_dim=96, text_dim=64, latent_channels=4, latent_size=8),
    "smoke": FoundationDims(clip_tokens=16, clip_dim=48, text_dim=48, latent_channels=4, latent_size=8),
}


def bench(size: str, batch: int, steps: int, voxels: int, device: str, precision: str) -> dict[str, float]:
    cfg = brain_config(size, n_voxels=(voxels,), n_classes=1, dims=TOY_DIMS.get(size), parts=STAGE1_PARTS)
    model = NeuronsBrainModel(cfg).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, voxels, device=device)
    targets = torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, device=device)
    captions = torch.randn(batch, cfg.text_dim, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            mixed = mixco(x, generator=gen)
            preds = model.encode(mixed.voxels)
            loss = mixco_nce(preds, targets, 0.006, mixed.perm, mixed.betas)
            loss = loss + 0.25 * symmetric_infonce(model.text_embed(preds), captions, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[2:]) * 1000
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "ms_per_step": ms, "clips_per_s": batch / ms * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("smoke", "toy", "paper"), action="append")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--voxels", type=int, default=1344, help="voxels of subject 1 (toy: 1344, paper: 13447)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.size or ["smoke", "toy"]:
        r = bench(size, args.batch, args.steps, args.voxels, args.device, args.precision)
        print(f"stage1-step size={size} batch={args.batch} device={args.device} precision={args.precision} "
              f"threads={torch.get_num_threads()} params={r['params']:,} ms/step={r['ms_per_step']:.1f} "
              f"clips/s={r['clips_per_s']:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
