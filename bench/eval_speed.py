"""Clips per second of stage 6 (metrics) on the smoke world, from a hand-made stage-3 and stage-5 run.

    python bench/eval_speed.py                       # every smoke test clip, standard protocol
    python bench/eval_speed.py --clips 12 --protocol neurons --repeat 3

Builds (or keeps) the smoke toy metric roles (frame_classifier, video_classifier, clip_pcc) under ``--weights-root``,
writes stage-3 outputs (blurred ground truth, soft masks, noisy concepts, the GT captions) and stage-5 videos (noisy
ground truth) for the first ``--clips`` test clips into a scratch run, then times ``pipeline.stage6.evaluate`` end to
end, role loading and the report included: ``cold_wall_s`` is the first run (with the lazy imports of transformers and
friends), ``wall_s`` and ``clips_per_s`` the median of the ``--repeat`` runs after it. Prints ONE line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROLES = ("frame_classifier", "video_classifier", "clip_pcc")


def fake_run(world: Path, paths, n: int) -> None:
    """Stage-3 and stage-5 folders of ``n`` test clips with manifests (as tests/test_stage6.py makes them)."""
    from utils.data import BrainVideoData
    from utils.io import atomic_save_safetensors, atomic_write_json
    from utils.manifest import StageRecorder
    from utils.resize import resize_frames_bilinear

    data, gen = BrainVideoData(world, 1), torch.Generator().manual_seed(0)
    gt = data.frames("test", range(n))  # (n, F, 3, R, R)
    res = gt.shape[-1]
    dir3, dir5 = paths.stage_dir("3"), paths.stage_dir("5")
    blurry = F.interpolate(F.avg_pool2d(gt.flatten(0, 1), 4), size=(res, res), mode="bilinear").view_as(gt)
    labels = data.concept_labels("test")[:n]
    tensors = {
        "blurry_videos": blurry.half(),
        "masks": F.avg_pool2d(data.key_object_masks("test", range(n)), 2).half(),
        "concept_probs": (0.6 * labels + 0.5 * torch.rand(labels.shape, generator=gen)).clamp(0, 1),
    }
    rec = StageRecorder("3", dir3, "bench").begin()
    for name, value in tensors.items():
        rec.add_output(atomic_save_safetensors(dir3 / f"{name}.safetensors", {name: value.contiguous()}))
    captions = [str(c) for c in data.captions("test")[:n]]
    rec.add_output(atomic_write_json(dir3 / "captions.json", {"captions": captions}))
    rec.extra["n_clips"] = n
    rec.finish()
    pred = (resize_frames_bilinear(gt, res) + 0.15 * torch.randn(gt.shape, generator=gen)).clamp(0, 1)
    config = {"video": {"eval_frames": list(range(gt.shape[1])), "num_frames": gt.shape[1], "resolution": res}}
    rec = StageRecorder("5", dir5, "bench", config, depends_on=("3",)).begin()
    rec.add_output(atomic_save_safetensors(dir5 / "videos.safetensors", {"videos": pred.contiguous()}))
    prompts = {"caption_source": "gpt2", "captions": captions, "prompts": captions, "negative_prompt": ""}
    rec.add_output(atomic_write_json(dir5 / "prompts.json", prompts))
    rec.add_input(dir3 / "captions.json")
    rec.extra["n_clips"] = n
    rec.finish()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=REPO / "data" / "toy_cortex_smoke")
    p.add_argument("--weights-root", type=Path, default=REPO / "pretrained_weights" / "toy_smoke")
    p.add_argument("--clips", type=int, help="test clips scored (default: all)")
    p.add_argument("--protocol", choices=("standard", "neurons"), default="standard")
    p.add_argument("--repeat", type=int, default=2, help="timed runs after the first (cold) one")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from models.foundation.toy.build import build_toy_weights
    from pipeline.stage6 import evaluate
    from utils.config import load_config
    from utils.data_catalog import frames_file
    from utils.runs import RunPaths
    from utils.stage_configs import Stage6Config

    t0 = time.perf_counter()
    with _quiet():
        build_toy_weights(args.world, args.weights_root, "smoke", seed=0, progress=False, num_threads=args.threads,
                          roles=ROLES)  # fmt: skip
    build_s = time.perf_counter() - t0
    n = args.clips or torch.load(args.world / frames_file("test"), mmap=True, weights_only=True).shape[0]
    with tempfile.TemporaryDirectory() as scratch:
        profile = Path(scratch) / "bench.yaml"
        profile.write_text(f"extends: smoke\npaths:\n  data_root: {args.world}\n  weights_root: {args.weights_root}\n"
                           f"  exp_root: {scratch}/EXP\nrun:\n  device: cpu\n")  # fmt: skip
        cli = {"exp": "bench", "mode": "enhance"}
        cfg = load_config(Stage6Config, str(profile), [f"eval.protocol={args.protocol}"], cli)
        fake_run(args.world, RunPaths.from_config(cfg), n)
        times = []
        for _ in range(args.repeat + 1):
            t0 = time.perf_counter()
            with _quiet():
                evaluate(cfg)
            times.append(time.perf_counter() - t0)
    wall = statistics.median(times[1:] or times)
    print(json.dumps({
        "bench": "eval_speed", "profile": "smoke", "protocol": args.protocol, "clips": n, "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "cold_wall_s": round(times[0], 2), "wall_s": round(wall, 2), "clips_per_s": round(n / wall, 2),
        "metric_roles_build_s": round(build_s, 1),
    }))  # fmt: skip
    return 0


class _quiet:
    """Send the stages' stdout chatter to stderr, so stdout carries the JSON line only."""

    def __enter__(self):
        self._stdout, sys.stdout = sys.stdout, sys.stderr

    def __exit__(self, *exc):
        sys.stdout = self._stdout


if __name__ == "__main__":
    sys.exit(main())
