"""Read the key/shape/dtype manifests (``fixtures/*.tsv``) into ``meta`` tensors, to test key maps without weights.

Format: ``#`` header lines, then ``name<TAB>shape as JSON list<TAB>torch dtype name`` per state-dict entry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch


def read_manifest(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """-> (``{name: meta tensor}`` in file order, header lines without the leading ``#``)."""
    tensors: dict[str, torch.Tensor] = {}
    header: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith("#"):
                header.append(line[1:].strip())
                continue
            name, shape, dtype = line.split("\t")
            tensors[name] = torch.empty(json.loads(shape), dtype=getattr(torch, dtype), device="meta")
    return tensors, header


def header_int(header: list[str], pattern: str) -> int | None:
    """First integer captured by regex ``pattern`` (one group) in the header, or None."""
    for line in header:
        match = re.search(pattern, line)
        if match:
            return int(match.group(1))
    return None
