"""Per-clip work split over the processes of an ``accelerate launch`` / torchrun (stages 3 to 6).

Generation and evaluation stages give every clip its own seed, so a clip's result does not depend on which process
made it. Clips are dealt round-robin (``clip = rank + i·world``, upstream's rule). Two ways to bring the shares back:

* :func:`write_shard` / :func:`merge_shards`: every process writes ``shard_<rank>.safetensors`` (its tensors, one row
  per clip, its clip indices and per-clip strings in the metadata); after a barrier the main process merges them in
  clip order and removes them. For large outputs (keyframes, videos): nothing large crosses the process group.
* :func:`gather_values`: small per-clip values (captions, classifier scores) gathered to every process.

On one process both are a plain pass-through.
"""

from __future__ import annotations

import json
from collections.abc import Sized
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open

from utils.io import atomic_save_safetensors

SHARD_PATTERN = "shard_{rank}.safetensors"
CLIPS_KEY = "clips"
TEXT_KEY = "per_clip_text"  # metadata entry: JSON {name: [str per clip]}


def my_clips(n_clips: int, rank: int, world: int) -> list[int]:
    """Round-robin share of process ``rank`` of ``world`` (upstream's ``rank + i·num_processes``)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"process {rank} of {world}")
    return list(range(rank, n_clips, world))


def shard_path(folder: Path, rank: int) -> Path:
    return folder / SHARD_PATTERN.format(rank=rank)


def remove_shards(folder: Path) -> None:
    """Remove the shards a killed run left behind (the main process calls this before any process writes)."""
    for path in folder.glob(SHARD_PATTERN.format(rank="*")):
        path.unlink(missing_ok=True)


def write_shard(
    folder: Path,
    rank: int,
    clips: list[int],
    tensors: dict[str, torch.Tensor],
    texts: dict[str, list[str]] | None = None,
) -> Path:
    """Write process ``rank``'s rows: every tensor (len(clips), ...) and every text list has one entry per clip."""
    texts = texts or {}
    entries: list[tuple[str, Sized]] = [*tensors.items(), *texts.items()]
    for name, rows in entries:
        if len(rows) != len(clips):
            raise ValueError(f"shard {rank}: {name} has {len(rows)} rows for {len(clips)} clips")
    payload = {**tensors, CLIPS_KEY: torch.tensor(clips, dtype=torch.long)}
    return atomic_save_safetensors(shard_path(folder, rank), payload, {TEXT_KEY: json.dumps(texts)})


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    with safe_open(str(path), framework="pt") as fh:
        texts = json.loads((fh.metadata() or {}).get(TEXT_KEY, "{}"))
    return load_file(path), texts


def merge_shards(folder: Path, world: int, n_clips: int) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The ``world`` shards in ``folder`` → (tensors (n_clips, ...), texts [n_clips]) in clip order, each clip exactly
    once; the shards are removed. Raises ``RuntimeError`` when the shards do not cover ``0..n_clips-1``."""
    parts = [read_shard(shard_path(folder, r)) for r in range(world)]
    clips = torch.cat([tensors[CLIPS_KEY] for tensors, _ in parts])
    if sorted(clips.tolist()) != list(range(n_clips)):
        raise RuntimeError(f"the {world} shards hold clips {sorted(clips.tolist())[:8]}..., not 0..{n_clips - 1}")
    merged: dict[str, torch.Tensor] = {}
    texts: dict[str, list[str]] = {}
    for tensors, text in parts:
        idx = tensors.pop(CLIPS_KEY)
        for name, rows in tensors.items():
            if name not in merged:
                merged[name] = torch.empty((n_clips, *rows.shape[1:]), dtype=rows.dtype)
            merged[name][idx] = rows
        for name, values in text.items():
            column = texts.setdefault(name, [""] * n_clips)
            for i, value in zip(idx.tolist(), values, strict=True):
                column[i] = value
    for r in range(world):
        shard_path(folder, r).unlink()
    return merged, texts


def gather_values(accelerator: Any, clips: list[int], values: list[Any], n_clips: int) -> list[Any]:
    """This process's per-clip ``values`` for ``clips`` → every clip's value on every process, in clip order."""
    if len(values) != len(clips):
        raise ValueError(f"{len(values)} values for {len(clips)} clips")
    parts = [(list(clips), list(values))]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    out: list[Any] = [None] * n_clips
    seen: list[int] = []
    for part_clips, part_values in parts:
        for clip, value in zip(part_clips, part_values, strict=True):
            out[clip] = value
        seen += part_clips
    if sorted(seen) != list(range(n_clips)):
        raise RuntimeError(f"the gathered values hold clips {sorted(seen)[:8]}..., not 0..{n_clips - 1}")
    return out
