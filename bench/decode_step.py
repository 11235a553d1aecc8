"""Time and peak memory of the decoding stages at paper shapes, random weights (issue 19): stage 3 and stage 5 per
clip, stage 6 on N clips.

    python bench/decode_step.py --stage 3 --device cuda --clips 4          # paper shapes (GPU)
    python bench/decode_step.py --stage 5 --device cuda --clips 2
    python bench/decode_step.py --stage 6 --device cuda --clips 1200
    python bench/decode_step.py --stage 5 --shrink --clips 1               # a CPU dry run at toy widths (tests)

Prints ONE line of JSON: the stage, the settings, seconds per clip (stages 3 and 5: median over the clips after one
warm-up clip; stage 6: the whole run), peak memory (CUDA ``max_memory_allocated``; on the CPU peak RSS) and the
parameter counts of what ran.

What runs is the stages' own inference, on random inputs:

* stage 3 (``pipeline/stage3.py``): the brain model's :meth:`~models.brain.NeuronsBrainModel.decode_voxels` (prior
  sampling with ``sample.prior_steps``, every head; the mask queried with the top concept's row of a random key
  table), the VAE decode of the blurry latents (``vae`` role, SD-1.5 VAE), GPT-2 greedy caption tokens
  (``caption_max_tokens``, the prefix from the caption vector) and the unCLIP keyframe
  (:meth:`~models.foundation.unclip.UnclipRole.reconstruct`: ``unclip_steps`` Euler steps with CFG at the
  unclip6 UNet's 1664-d cross-attention, 96² latents → 768² px);
* stage 5 (``pipeline/stage5.generate_clip``): AnimateDiff v3 (SD-1.5 UNet + motion module) with SparseCtrl RGB,
  16 frames at 256², the keyframe and the blurry video VAE-encoded, ``noisy_start`` and all 25 DDIM steps with CFG
  (:meth:`~models.foundation.video.VideoRole.denoise`); the prompt embeddings are random (the text encoder is one
  77-token pass per clip, not run);
* stage 6 (``pipeline/stage6.model_scores``): the paper's metric models (VideoMAE-B Kinetics-400 on 6 frames, ViT-B/16
  ImageNet, CLIP ViT-L/14 image features; transformers' configs of those checkpoints, default processors) on N
  ground-truth and N generated 6-frame clips at 256², read ``--batch`` clips at a time as stage 6 streams them.

``--shrink`` replaces every width by a tiny one (same architectures and code paths; for a CPU test). Needs torch,
diffusers (stages 3, 5) and transformers (stages 3, 6); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.brain import NeuronsBrainModel, clip_generators, parameter_counts  # noqa: E402
from models.sizes import ALL_PARTS, brain_config  # noqa: E402
from utils.stage_configs import Stage3Sample, Stage5Video  # noqa: E402

PAPER_VOXELS = 13447
N_CLASSES = 51
N_FRAMES = 6
TINY = {"block": 32, "groups": 8, "heads": 2}  # --shrink


def shrink_unet(cfg: dict[str, Any]) -> dict[str, Any]:
    """A diffusers UNet / ControlNet / VAE / motion-adapter config with tiny widths (same blocks and code paths)."""
    cfg = dict(cfg)
    n = len(cfg.get("block_out_channels", ()))
    small = {"block_out_channels": [TINY["block"]] * n, "layers_per_block": 1, "norm_num_groups": TINY["groups"],
             "motion_norm_num_groups": TINY["groups"], "motion_layers_per_block": 1,
             "motion_num_attention_heads": TINY["heads"],
             "conditioning_embedding_out_channels": [8, 8, 8, TINY["block"]]}  # fmt: skip
    for key, value in small.items():
        if key in cfg:
            cfg[key] = value
    if isinstance(cfg.get("transformer_layers_per_block"), list):
        cfg["transformer_layers_per_block"] = [1] * n
    if "attention_head_dim" in cfg:
        head = cfg["attention_head_dim"]
        cfg["attention_head_dim"] = [TINY["heads"]] * n if isinstance(head, list) else TINY["heads"]
    return cfg


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ---- stage 3 -------------------------------------------------------------------------------------------------------
def brain_model(args: argparse.Namespace, device: torch.device) -> NeuronsBrainModel:
    if args.shrink:  # the smoke registry size with the smoke toy foundation dims
        from bench.train_step import foundation_dims

        cfg = brain_config("smoke", n_voxels=(300,), n_classes=N_CLASSES, n_frames=N_FRAMES, parts=ALL_PARTS,
                           dims=foundation_dims("smoke"))  # fmt: skip
    else:
        cfg = brain_config("paper", n_voxels=(PAPER_VOXELS,), n_classes=N_CLASSES, n_frames=N_FRAMES, parts=ALL_PARTS)
    with torch.device(device):
        return NeuronsBrainModel(cfg).eval()


def unclip_role(args: argparse.Namespace, token_dim: int, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from models.foundation.unclip import UnclipRole
    from models.foundation.unclip.paper import unet_config_paper, vae_config_paper

    unet_cfg, vae_cfg = unet_config_paper(), vae_config_paper()
    if args.shrink:
        unet_cfg = shrink_unet(unet_cfg) | {"cross_attention_dim": token_dim}
        vae_cfg = shrink_unet(vae_cfg)
    with torch.device(device):
        unet, vae = UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg)
    sp = Stage3Sample()
    latent = 8 if args.shrink else sp.unclip_size // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return UnclipRole(unet.to(dtype).eval(), vae.eval(), num_steps=2 if args.shrink else sp.unclip_steps,
                      guidance=sp.unclip_guidance, latent_size=latent)  # fmt: skip


def sd15_vae(args: argparse.Namespace, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    from models.foundation.vae import VaeRole
    from models.foundation.vae.paper import sd15_vae_config

    cfg = shrink_unet(sd15_vae_config()) if args.shrink else sd15_vae_config()
    with torch.device(device):
        return VaeRole(AutoencoderKL.from_config(cfg).eval())


def stage3(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model = brain_model(args, device)
    d = model.cfg.dims
    unclip = unclip_role(args, d.clip_dim, device, dtype)
    vae = sd15_vae(args, device)
    sp = Stage3Sample()
    steps = 2 if args.shrink else sp.prior_steps
    table = torch.randn(N_CLASSES, d.text_dim, device=device)
    times = []
    for clip in range(args.clips + 1):  # the first clip warms up
        voxels = torch.randn(1, model.cfg.n_voxels[0], device=device)
        gens = clip_generators([clip], device)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            dec = model.decode_voxels(voxels, gens, steps, key_table=table)
            vae.decode(dec.latents.flatten(0, 1))  # (F, 3, R, R)
            # stage 3's greedy GPT-2 captions; an EOS id that never comes: every clip runs all its tokens
            model.text_dec.generate(dec.caption_prefix, 3 if args.shrink else sp.caption_max_tokens, -1)
            unclip.reconstruct(dec.prior_tokens, gens)
        sync(device)
        if clip:
            times.append(time.perf_counter() - t0)
    return {"sec_per_clip": round(statistics.median(times), 4), "prior_steps": steps,
            "unclip_steps": unclip.num_steps, "keyframe_px": unclip.latent_size * 8,
            "params": {"brain": parameter_counts(model)["total"], "unclip_unet": n_params(unclip.unet),
                       "unclip_vae": n_params(unclip.vae), "vae": n_params(vae.vae)}}  # fmt: skip


# ---- stage 5 -------------------------------------------------------------------------------------------------------
def video_role(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, MotionAdapter, SparseControlNetModel, UNet2DConditionModel, UNetMotionModel

    from models.foundation.common import config_path
    from models.foundation.vae.paper import sd15_vae_config
    from models.foundation.video import VideoRole
    from models.foundation.video.paper import motion_adapter_config, sparsectrl_config

    unet_cfg = json.loads((config_path("sd15_single_file") / "unet" / "config.json").read_text())
    cfgs = [unet_cfg, motion_adapter_config(), sparsectrl_config(), sd15_vae_config()]
    if args.shrink:
        cfgs = [shrink_unet(c) for c in cfgs]
    with torch.device(device):
        unet = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_config(cfgs[0]),
                                           MotionAdapter.from_config(cfgs[1]))  # fmt: skip
        control = SparseControlNetModel.from_config(cfgs[2])
        vae = AutoencoderKL.from_config(cfgs[3])
    return VideoRole(unet.to(dtype).eval(), control.to(dtype).eval(), vae.to(dtype).eval(), None, None)


def stage5(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    role = video_role(args, device, dtype)
    v = Stage5Video()
    res, frames, steps = (32, 4, 2) if args.shrink else (v.resolution, v.num_frames, v.steps)
    times = []
    for clip in range(args.clips + 1):
        gen = torch.Generator(device).manual_seed(clip)
        key = torch.rand(1, 3, res, res, generator=gen, device=device)
        blurry = torch.rand(1, frames, 3, res, res, generator=gen, device=device)
        embeds = torch.randn(2, 77, role.text_dim, generator=gen, device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            key_latents = role.encode_frames(key, generator=gen)  # (1, C, s, s)
            cond, mask = role.keyframe_condition(key_latents, frames)
            init = torch.stack([role.encode_frames(f[None], generator=gen)[0] for f in blurry[0]], dim=1)[None]
            noise = torch.randn(init.shape, generator=gen, device=device)
            start = role.noisy_start(init, noise, steps)
            out = role.denoise(start, embeds[1:], embeds[:1], cond, mask, steps, v.guidance, v.controlnet_scale)
            role.decode_latents(out)
        sync(device)
        if clip:
            times.append(time.perf_counter() - t0)
    return {"sec_per_clip": round(statistics.median(times), 4), "frames": frames, "resolution": res, "steps": steps,
            "params": {"unet": n_params(role.unet), "sparsectrl": n_params(role.controlnet),
                       "vae": n_params(role.vae)}}  # fmt: skip


# ---- stage 6 -------------------------------------------------------------------------------------------------------
def metric_roles(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        VideoMAEConfig,
        VideoMAEForVideoClassification,
        VideoMAEImageProcessor,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    from models.foundation.clip_pcc import ClipPccRole
    from models.foundation.frame_classifier import FrameClassifierRole
    from models.foundation.video_classifier import PAPER_NUM_FRAMES, VideoClassifierRole

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    small = tiny if args.shrink else {}
    video = VideoMAEConfig(num_frames=PAPER_NUM_FRAMES, num_labels=400, **small)
    frame = ViTConfig(num_labels=1000, **small)
    vision = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
              "patch_size": 14} if not args.shrink else tiny | {"patch_size": 14}  # fmt: skip
    text = tiny if args.shrink else {}
    clip = CLIPConfig(vision_config=vision, text_config=text, projection_dim=32 if args.shrink else 768)
    with torch.device(device):
        roles = {"video_classifier": VideoClassifierRole(VideoMAEForVideoClassification(video).eval(),
                                                         VideoMAEImageProcessor()),
                 "frame_classifier": FrameClassifierRole(ViTForImageClassification(frame).eval(), ViTImageProcessor()),
                 "clip_pcc": ClipPccRole(CLIPModel(clip).eval(), CLIPImageProcessor())}  # fmt: skip
    return roles


def stage6(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from pipeline.stage6 import Clips, model_scores

    roles = metric_roles(args, device)
    res = 32 if args.shrink else Stage5Video().resolution

    def read(rows: Any) -> torch.Tensor:  # a few clips, as stage 6 reads them from disk
        gen = torch.Generator().manual_seed(int(rows[0]))
        return torch.rand(len(rows), N_FRAMES, 3, res, res, generator=gen)

    frames = (Clips(args.clips, read, (N_FRAMES, 3, res, res)), Clips(args.clips, read, (N_FRAMES, 3, res, res)))
    accelerator = types.SimpleNamespace(process_index=0, num_processes=1, device=device)  # one process
    sync(device)
    t0 = time.perf_counter()
    scores = model_scores(frames, roles, args.batch, accelerator)
    sync(device)
    sec = time.perf_counter() - t0
    assert scores.video[0].shape[0] == args.clips
    return {"sec_total": round(sec, 3), "sec_per_clip": round(sec / args.clips, 5), "batch": args.batch,
            "resolution": res, "params": {k: n_params(r.model) for k, r in roles.items()}}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", type=int, choices=(3, 5, 6), required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clips", type=int, default=None, help="clips (default: 3: 4, 5: 2, 6: 1200; --shrink: 2)")
    p.add_argument("--batch", type=int, default=32, help="stage 6: clips per read and per model call")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16",
                   help="weights of the diffusion models and autocast of the brain model (stages 3, 5)")
    p.add_argument("--shrink", action="store_true", help="tiny widths, for a dry run on a CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.clips is None:
        args.clips = 2 if args.shrink else {3: 4, 5: 2, 6: 1200}[args.stage]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 convolutions are slow or missing on CPUs
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
        result = {3: stage3, 5: stage5, 6: stage6}[args.stage](args, device, dtype)
    out = {"bench": "decode_step", "stage": args.stage, "shrink": args.shrink, "clips": args.clips,
           "precision": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
           **result, **peak_memory(device)}  # fmt: skip
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
