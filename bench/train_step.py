"""Training-step throughput and memory of stage 1 or stage 2 at a registry size, random weights and inputs.

    python bench/train_step.py --profile toy --stage 1
    python bench/train_step.py --profile paper --stage 1 --device cuda --bf16 --grad-ckpt --adamw fused
    python bench/train_step.py --profile paper --stage 2 --device cuda --batch 10
    python bench/train_step.py --profile paper --stage 1 --count-only        # parameter counts on the meta device
    python bench/train_step.py --profile paper --stage 2 --device cuda --bf16 --grad-ckpt --cond-cache --micro-batch 5
    python bench/train_step.py --profile paper --stage 1 --device cuda --upstream-baseline   # as upstream trains

Prints ONE line of JSON: the settings, parameter counts, seconds per step (median of the timed steps), samples/s,
peak memory (CUDA ``max_memory_allocated``; on the CPU the process's peak RSS, imports included) and, on a GPU, the
achieved TFLOP/s of the dominant matmuls and their fraction of the device's dense datasheet peak for the precision.

What a step is: exactly the optimiser step of ``pipeline/stage1.py`` / ``pipeline/stage2.py`` (BiMixCo + text
InfoNCE; prior + the six head losses, progressive multipliers at 1) with AdamW, on random tensors shaped like the
data. The CLIP image tokens are random inputs, i.e. what the stages read from the CLIP-target cache
(``tasks_construction/cache_clip_targets.py``); the image tower and the VAE are not run. Stage 2 freezes ridge,
backbone and clipproj as the stage does.

FLOP estimate: every ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d`` call is counted by a forward hook
(2·rows·in·out), times 3 when its weight is trained (forward, input and weight gradients), 2 when it is frozen on the
autograd path, 1 under ``no_grad``; the forward passes that gradient checkpointing repeats are not counted (model
FLOPs). Attention score products, norms and element-wise ops are not counted either, so the figure is a lower bound
of the work done (the linears are > 95 % of it at paper scale).

Stage 2 with ``--cond-cache`` (``stage2.train.condition_cache``): the prior's condition is a random fp16 tensor, as
read from the condition cache, and the model is built without ridge and backbone (the stage keeps them on the CPU).
``--micro-batch N`` (``stage2.train.micro_batch``) runs the step as the stage's gradient cache does
(``pipeline.stage2.GradientCache``): every micro batch of N clips without gradients, the losses on the whole batch,
then each micro batch again with gradients.

``--upstream-baseline``: the step as upstream trains it, to compare against: no CLIP-target cache (the CLIP
ViT-bigG/14 image tower, a torch-only stand-in with its shapes and parameter count (:class:`ImageTower`, random
weights; toy and smoke: the toy CLIP's vision shapes), runs without gradients on the frames of every clip in every
step: stage 1 one frame, stage 2 every frame), fp16 autocast with a gradient scaler, the default (foreach) AdamW, no
gradient checkpointing, and for stage 2 the backbone run in every step. Upstream's stage 2 also VAE-encodes the
frames in every step; that is not run here, so the baseline's time is a lower bound and the ratio to it conservative.

Needs only torch and einops (plus transformers for stage 2's GPT-2 captioner; without it stage 2 runs without the
caption head and says so: ``"caption_head": false``). Paper scale is never built for real on a CPU: there the
script prints the counts (as ``--count-only``) unless ``--force-cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.brain import NeuronsBrainModel, parameter_counts  # noqa: E402
from models.sizes import ALL_PARTS, PAPER_FOUNDATION_DIMS, STAGE1_PARTS, FoundationDims, GPT2Dims, brain_config  # noqa: E402
from utils import losses as L  # noqa: E402
from utils.grad_cache import GradientCache  # noqa: E402
from utils.stage_configs import Stage1Train, Stage2LossWeights, Stage2Train  # noqa: E402

DIFFERENTIABLE = L.STAGE2_OUTPUTS  # the per-clip outputs the stage-2 losses read (pipeline.stage2's)

# Global batch of each profile (utils/stage_configs.py defaults for paper, configs/toy.yaml and configs/smoke.yaml).
BATCH = {("paper", 1): 120, ("paper", 2): 10, ("toy", 1): 32, ("toy", 2): 8, ("smoke", 1): 8, ("smoke", 2): 4}
VOXELS = {"paper": 13447, "toy": 1344, "smoke": 300}  # subject 1: cc2017, configs/toy.yaml world, configs/smoke.yaml
N_CLASSES = 51  # concept classes of the real annotations
N_FRAMES = 6
# Dense datasheet peaks in TFLOP/s (no sparsity): {name substring: {precision: peak}}; the first match wins.
PEAKS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},  # SXM5
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
}


def foundation_dims(profile: str) -> FoundationDims:
    """The paper's constants, or the dims of the toy foundation recipes (tokens, width, text, latents, GPT-2)."""
    if profile == "paper":
        return PAPER_FOUNDATION_DIMS
    from models.foundation.clip.toy import RECIPES as CLIP
    from models.foundation.gpt2.toy import CLIP_VOCAB
    from models.foundation.gpt2.toy import RECIPES as GPT2
    from models.foundation.vae.toy import RECIPES as VAE
    from utils.toy_world import ToyWorldConfig

    c, g, v = CLIP[profile], GPT2[profile], VAE[profile]
    latent = ToyWorldConfig().resolution // 2 ** (len(v.block_out_channels) - 1)
    gpt2 = GPT2Dims(g.n_embd, g.n_layer, g.n_head, CLIP_VOCAB, g.n_positions)
    return FoundationDims((c.image_size // c.patch_size) ** 2, c.vision_width, c.embed_dim, v.latent_channels, latent,
                          gpt2)  # fmt: skip


# CLIP ViT-bigG/14's image tower (open_clip "ViT-bigG-14" vision_cfg): 224 px, patch 14, width 1664, 48 layers,
# 16 heads, MLP 8192 (1.84 B parameters)
BIGG_TOWER = {"image_size": 224, "patch_size": 14, "width": 1664, "layers": 48, "heads": 16, "mlp": 8192,
              "embed_dim": 1280}


def tower_dims(profile: str) -> dict[str, int]:
    if profile == "paper":
        return BIGG_TOWER
    from models.foundation.clip.toy import RECIPES

    r = RECIPES[profile]
    heads = r.vision_width // r.vision_head_width
    return {"image_size": r.image_size, "patch_size": r.patch_size, "width": r.vision_width, "heads": heads,
            "layers": r.vision_layers, "mlp": 4 * r.vision_width, "embed_dim": r.embed_dim}  # fmt: skip


class ImageTower(torch.nn.Module):
    """A torch-only ViT with the shapes of a CLIP image tower (pre-norm blocks, GELU MLP, class token): the work of
    upstream's per-step CLIP targets. images (N, 3, S, S) → tokens (N, 1 + (S / patch)², embed_dim)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp: int,
                 embed_dim: int):  # fmt: skip
        super().__init__()
        self.image_size = image_size
        self.conv1 = torch.nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.zeros(width))
        self.positional_embedding = torch.nn.Parameter(torch.zeros((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = torch.nn.LayerNorm(width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=True)  # fmt: skip
        self.transformer = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_post = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (N, P, width)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1).to(x.dtype), x], dim=1)
        x = self.ln_post(self.transformer(self.ln_pre(x + self.positional_embedding.to(x.dtype))))
        return x @ self.proj.to(x.dtype)


def build_model(args: argparse.Namespace, device: torch.device | str) -> tuple[NeuronsBrainModel, bool]:
    """The brain model with random weights, built directly on ``device``; returns it and whether it has GPT-2."""
    parts = STAGE1_PARTS if args.stage == 1 else ALL_PARTS
    if args.stage == 2 and args.cond_cache:  # the stage keeps them on the CPU and reads their output from the cache
        parts = tuple(p for p in parts if p not in ("ridge", "backbone"))
    has_gpt2 = args.stage == 2 and not args.no_caption
    if has_gpt2:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: stage 2 runs without its GPT-2 caption head", file=sys.stderr)
            has_gpt2 = False
    if args.stage == 2 and not has_gpt2:
        parts = tuple(p for p in parts if p != "text_dec")
    cfg = brain_config(args.profile, n_voxels=(VOXELS[args.profile],), n_classes=N_CLASSES,
                       dims=None if args.profile == "paper" else foundation_dims(args.profile), n_frames=N_FRAMES,
                       parts=parts)  # fmt: skip
    with torch.device(device):
        model = NeuronsBrainModel(cfg)
    if args.stage == 2:
        for part in frozen(model, args):
            model.get_submodule(part).requires_grad_(False)
    return model, has_gpt2


def frozen(model: NeuronsBrainModel, args: argparse.Namespace) -> list[str]:
    return [p for p in ("ridge", "backbone", "clipproj", *args.freeze) if hasattr(model, p)]


def set_modes(model: NeuronsBrainModel, args: argparse.Namespace) -> None:
    model.train()
    if args.stage == 2 and not args.upstream_baseline:  # upstream's model.train(): the backbone's dropout on
        for part in frozen(model, args):
            model.get_submodule(part).eval()


def make_inputs(model: NeuronsBrainModel, args: argparse.Namespace, device: Any) -> dict[str, torch.Tensor]:
    """Random tensors shaped like one step's data (targets as read from the CLIP-target cache)."""
    c, b, g = model.cfg, args.batch, torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x = {"voxels": randn(b, VOXELS[args.profile]), "caption_emb": randn(b, c.text_dim)}
    if args.upstream_baseline:  # the frames themselves: the image tower makes the targets in every step
        size, frames = tower_dims(args.profile)["image_size"], 1 if args.stage == 1 else N_FRAMES
        x["frames"] = torch.rand(b * frames, 3, size, size, generator=g).to(device)
    if args.stage == 1:
        return x | {"targets": randn(b, c.clip_tokens, c.clip_dim)}
    if args.cond_cache:
        x["cond"] = randn(b, c.clip_tokens, c.clip_dim).half()  # as read from the fp16 condition cache
    size, length = c.decoder_size, Stage2Train().caption_max_len
    vocab = c.dims.gpt2.vocab_size
    return x | {
        "targets": randn(b, N_FRAMES, c.clip_tokens, c.clip_dim),
        "latents": randn(b, N_FRAMES, c.dims.latent_channels, c.dims.latent_size, c.dims.latent_size),
        "concepts": (torch.rand(b, c.n_classes, generator=g) < 0.1).float().to(device),
        "masks": (torch.rand(b, N_FRAMES, size, size, generator=g) < 0.2).float().to(device),
        "key_text": randn(b, c.text_dim),
        "tokens": torch.randint(0, vocab, (b, length), generator=g).to(device),
        "token_mask": (torch.arange(length) < length * 3 // 4).expand(b, length).to(device),
    }


def stage1_loss(model: NeuronsBrainModel, x: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """pipeline.stage1.step_loss with BiMixCo on (one process)."""
    t = Stage1Train()
    mixed = L.mixco(x["voxels"], t.bimixco_beta, t.bimixco_prob, gen)
    labels = L.mixco_soft_labels(mixed.perm, mixed.betas).to(x["voxels"].device)
    preds = model.encode(mixed.voxels)  # (B, T, D)
    image = L.mixco_nce(preds, x["targets"], t.temp_image, mixed.perm, mixed.betas, True)
    text = L.symmetric_infonce(model.text_embed(preds), x["caption_emb"], t.temp_text, labels)
    return image + t.text_weight * text


def stage2_outputs(model: NeuronsBrainModel, x: dict[str, torch.Tensor], rows: torch.Tensor, seeds: list[int]
                   ) -> dict[str, torch.Tensor]:  # fmt: skip
    """pipeline.stage2.share_outputs of clips ``rows``: the per-clip outputs the losses read (the keys of
    ``pipeline.stage2.DIFFERENTIABLE``)."""
    t = Stage2Train()
    with torch.no_grad():  # frozen: read from the condition cache, or run
        cond = x["cond"][rows].float() if "cond" in x else model.prior_condition(x["voxels"][rows]).float()
    gens = [torch.Generator().manual_seed(seeds[int(r)]) for r in rows]
    _, prior_tokens = model.diffusion_prior(cond, x["targets"][rows, t.target_frame], gens)
    motion = model.motion(model.head_tokens(cond, prior_tokens))  # (b, F, T, D), upstream.head_input
    text = model.text_embed(motion)
    out = {
        "prior_tokens": prior_tokens,
        "motion": motion,
        "text": text,
        "mask_logits": model.decode_masks(motion, x["key_text"][rows])[:, :, 0].float(),
        "concept_logits": model.concept_logits(motion).float(),
        "pred_latents": model.decode_latents(motion, text).float(),
    }
    if hasattr(model, "text_dec"):  # as pipeline/stage2.py: the LM head runs on the labelled positions only
        prefix = F.normalize(text, dim=-1)
        logits, labels, keep = model.caption_logits(prefix, x["tokens"][rows], x["token_mask"][rows])
        out["token_loss"] = L.caption_token_losses(logits, labels, keep, t.caption_label_smoothing)
    return out


def stage2_loss(model: NeuronsBrainModel, x: dict[str, torch.Tensor], seeds: list[int], micro_batch: int = 0
                ) -> torch.Tensor:  # fmt: skip
    """pipeline.stage2.head_losses on one process, progressive multipliers at 1; with ``micro_batch`` through the
    stage's gradient cache."""
    t, b = Stage2Train(), len(seeds)
    rows = torch.arange(b, device=x["targets"].device)
    if micro_batch and micro_batch < b and torch.is_grad_enabled():
        chunks = [rows[a:a + micro_batch] for a in range(0, b, micro_batch)]
        runs = [lambda r=r: stage2_outputs(model, x, r, seeds) for r in chunks]
        keys = [k for k in DIFFERENTIABLE if k != "token_loss" or hasattr(model, "text_dec")]
        outs = GradientCache.apply(torch.zeros((), requires_grad=True), runs, rows.device, {}, tuple(keys))
        g = dict(zip(keys, outs, strict=True))
    else:
        g = stage2_outputs(model, x, rows, seeds)
    targets = x["targets"]
    losses = {
        "prior": F.mse_loss(g["prior_tokens"], targets[:, t.target_frame]),
        "video_softclip": L.soft_clip_loss(g["motion"].flatten(0, 1), targets.flatten(0, 1), t.softclip_temp_start),
        "text_nce": L.symmetric_infonce(g["text"], x["caption_emb"], t.temp_text),
        "dice": L.dice_loss(g["mask_logits"], x["masks"]),
        "concepts": L.concept_bce(g["concept_logits"], x["concepts"]),
        "latent": L.latent_l1(g["pred_latents"], x["latents"]),
    }
    if "token_loss" in g:
        losses["caption"] = g["token_loss"].sum() / x["token_mask"].sum().clamp(min=1)
    return L.total_loss(losses, Stage2LossWeights())[0]


class FlopCounter:
    """Forward hooks on linear / Conv1D / conv layers; see the module docstring for the multipliers."""

    def __init__(self, model: torch.nn.Module):
        self.flops, self.handles, self.active = 0.0, [], True  # set inactive for the backward pass (recomputation)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) or type(m).__name__ == "Conv1D":
                self.handles.append(m.register_forward_hook(self.hook))

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self.active:
            return
        w = module.weight
        if isinstance(module, torch.nn.Conv2d):
            per_out = w.shape[1] * w.shape[2] * w.shape[3]  # in/groups · kh · kw
            flops = 2.0 * output.numel() * per_out
        else:  # Linear weight (out, in); GPT-2 Conv1D weight (in, out)
            flops = 2.0 * output.numel() * (w.shape[1] if isinstance(module, torch.nn.Linear) else w.shape[0])
        if torch.is_grad_enabled():
            flops *= 3 if w.requires_grad else 2
        self.flops += flops

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def device_peak(precision: str) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    for key, peaks in PEAKS.items():
        if key in name:
            return name, peaks[precision]
    return name, None


def build_optimizer(params: list[torch.nn.Parameter], impl: str) -> torch.optim.Optimizer:
    """``utils.training.build_optimizer`` (train.adamw_impl); a plain torch AdamW where numpy is missing."""
    t = Stage1Train()
    try:
        from utils.training import build_optimizer as build
    except ImportError:  # utils.training imports numpy; the bench itself needs torch and einops only
        if impl == "8bit":
            raise
        return torch.optim.AdamW(params, lr=t.max_lr, weight_decay=t.weight_decay,
                                 **{"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True},
                                    "fused": {"fused": True}}[impl])  # fmt: skip
    return build(params, dataclasses.replace(t, adamw_impl=impl))


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.precision == "tf32" and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if args.upstream_baseline:  # upstream's settings, whatever else was asked
        args.precision, args.adamw, args.grad_ckpt = "fp16", "foreach", False
        args.cond_cache, args.micro_batch = False, 0
    model, has_gpt2 = build_model(args, device)
    tower = None
    if args.upstream_baseline:
        with torch.device(device):
            tower = ImageTower(**tower_dims(args.profile)).eval().requires_grad_(False)
    counts = parameter_counts(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    set_modes(model, args)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], args.adamw)
    x = make_inputs(model, args, device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    gen = torch.Generator().manual_seed(0)
    times, flops = [], 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        counter = FlopCounter(model) if step == args.warmup else None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if tower is not None:  # upstream: the CLIP targets of this step's frames (discarded: random targets)
                with torch.no_grad():
                    tower(x["frames"])
            if args.stage == 1:
                loss = stage1_loss(model, x, gen)
            else:
                loss = stage2_loss(model, x, [step * 100_003 + i for i in range(args.batch)], args.micro_batch)
        if counter is not None:
            counter.active = False  # checkpointed layers run forward again in the backward pass: not model FLOPs
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if counter is not None:
            counter.remove()
            flops = counter.flops
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"non-finite loss at step {step}")
    sec = statistics.median(times)
    out: dict[str, Any] = {
        "bench": "train_step",
        "profile": args.profile,
        "stage": args.stage,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "precision": args.precision,
        "grad_ckpt": args.grad_ckpt,
        "adamw": args.adamw,
        "freeze": list(args.freeze),
        "cond_cache": args.cond_cache if args.stage == 2 else None,
        "micro_batch": args.micro_batch if args.stage == 2 else None,
        "upstream_baseline": args.upstream_baseline,
        "image_tower_params": sum(p.numel() for p in tower.parameters()) if tower is not None else None,
        "caption_head": has_gpt2 if args.stage == 2 else None,
        "params": counts["total"],
        "trainable_params": trainable,
        "steps": args.steps,
        "warmup": args.warmup,
        "sec_per_step": round(sec, 5),
        "sec_per_step_min": round(min(times), 5),
        "samples_per_s": round(args.batch / sec, 2),
        "final_loss": round(float(loss.detach()), 5),
        "linear_gflop_per_step": round(flops / 1e9, 2),
    }
    if cuda:
        name, peak = device_peak(args.precision)
        achieved = flops / sec / 1e12
        out |= {
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
            "tflops": round(achieved, 2),
            "device_peak_tflops": peak,
            "mfu": round(achieved / peak, 4) if peak else None,
        }
    else:
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def count_only(args: argparse.Namespace) -> dict[str, Any]:
    """Parameter counts of the model on the meta device (no memory), and the memory its fp32 training state needs."""
    model, has_gpt2 = build_model(args, "meta")
    counts = parameter_counts(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = {"for_loop": 16, "foreach": 16, "fused": 16, "auto": 16, "8bit": 10}[args.adamw]  # weight+grad+2 moments
    gib = (4 * (counts["total"] - trainable) + state * trainable) / 2**30
    return {"bench": "train_step", "profile": args.profile, "stage": args.stage, "count_only": True,
            "caption_head": has_gpt2 if args.stage == 2 else None, "params": counts["total"],
            "trainable_params": trainable, "parts": counts, "adamw": args.adamw,
            "weights_grads_optimizer_gib": round(gib, 2), "cond_cache": args.cond_cache,
            "image_tower_params": tower_params(args) if args.upstream_baseline else None}  # fmt: skip


def tower_params(args: argparse.Namespace) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in ImageTower(**tower_dims(args.profile)).parameters())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=("paper", "toy", "smoke"), default="toy")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="global batch (default: the profile's, e.g. paper 120 / 10)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16", "fp16"), default="fp32")
    p.add_argument("--bf16", action="store_const", const="bf16", dest="precision", help="= --precision bf16")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of backbone and prior")
    p.add_argument("--adamw", choices=("auto", "for_loop", "foreach", "fused", "8bit"), default="auto")
    p.add_argument("--fused", action="store_const", const="fused", dest="adamw", help="= --adamw fused")
    p.add_argument("--freeze", default="", help="stage 2: extra parts to freeze, comma-separated (train.freeze)")
    p.add_argument("--no-caption", action="store_true", help="stage 2 without the GPT-2 caption head")
    p.add_argument("--cond-cache", action="store_true", help="stage 2: the condition from the fp16 cache, no backbone")
    p.add_argument("--micro-batch", type=int, default=0, help="stage 2: clips per pass of the gradient cache")
    p.add_argument("--upstream-baseline", action="store_true",
                   help="upstream's step: the image tower on the frames every step, fp16 autocast, foreach AdamW")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--count-only", action="store_true", help="parameter counts on the meta device, then exit")
    p.add_argument("--force-cpu", action="store_true", help="really build paper scale on a CPU")
    args = p.parse_args(argv)
    args.batch = args.batch or BATCH[(args.profile, args.stage)]
    args.freeze = tuple(f for f in args.freeze.split(",") if f)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paper_on_cpu = args.profile == "paper" and args.device == "cpu" and not args.force_cpu
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
        result = count_only(args) if args.count_only or paper_on_cpu else run(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
