"""Caption embeddings: the pooled CLIP text embedding of every caption, in the real file format.

    python -m tasks_construction.gen_GT_clip_embeds --profile toy                 # GT_{train,test}_caption_emb.pt
    python -m tasks_construction.gen_GT_clip_embeds --profile paper --source qwen # qwen_annotation/GT_*_caption_qwen*
    python -m tasks_construction.gen_GT_clip_embeds --profile paper --data-root DIR  # another data folder

The text tower is the profile's ``clip`` foundation role (OpenCLIP bigG for ``paper``, the toy CLIP otherwise), so the
embeddings live in the space that the brain model's ``clipproj`` maps into. ``blip2`` reads ``GT_<split>_caption.pt``
and writes ``GT_<split>_caption_emb.pt`` (float32 ``(N, Dt)``); ``qwen`` reads the Qwen captions of
``qwen_annotation/qwen_<split>_caption_tag_category_id.json`` and writes ``GT_<split>_caption_qwen.pt`` (numpy strings)
and ``GT_<split>_caption_qwen_emb.pt`` beside it, as upstream did. Existing, newer outputs are kept (``--force``
recomputes them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.foundation import build_role, foundation_impl
from models.foundation.clip.toy import load_proj
from utils.cli import OneLineParser, add_set_argument, report_error
from utils.config import load_config
from utils.data import load_json, load_strings
from utils.data_catalog import SOURCES, TOKENS_PROJ_FILE, annotation_file, caption_emb_file, caption_file
from utils.errors import NeuronsError
from utils.io import atomic_torch_save
from utils.runs import setup_logging
from utils.stage_configs import Stage1Config

log = logging.getLogger(__name__)


def caption_files(root: Path, split: str, source: str) -> tuple[Path, Path]:
    """(captions, embeddings) paths of ``split`` for caption ``source``."""
    return root / caption_file(split, source), root / caption_emb_file(split, source)


def read_captions(root: Path, split: str, source: str) -> list[str]:
    if source == "blip2":
        path = caption_files(root, split, source)[0]
        return [str(c) for c in load_strings(path, "python download_dataset.py")]
    path = root / annotation_file(split)
    return [str(item["caption"]) for item in load_json(path, "python download_dataset.py")]


@torch.no_grad()
def embed_captions(clip, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Pooled text embeddings ``(N, Dt)`` float32, in batches."""
    chunks = [
        clip.text_pooled(list(captions[i : i + batch_size])).float().cpu()
        for i in tqdm(range(0, len(captions), batch_size), desc="caption embeddings", leave=False)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, clip.text_dim)


def run(data_root: Path, clip, source: str = "blip2", force: bool = False) -> dict[str, list[int]]:
    """Write the embeddings of both splits; returns their shapes."""
    shapes = {}
    for split in SOURCES:
        captions = read_captions(data_root, split, source)
        text_path, emb_path = caption_files(data_root, split, source)
        if emb_path.exists() and not force and emb_path.stat().st_mtime_ns >= _source_mtime(data_root, split, source):
            log.info("%s is up to date; kept", emb_path)
            shapes[split] = list(torch.load(emb_path, weights_only=True, mmap=True).shape)
            continue
        emb = embed_captions(clip, captions)
        if source == "qwen":
            atomic_torch_save(text_path, np.array(captions))
        atomic_torch_save(emb_path, emb)
        shapes[split] = list(emb.shape)
        log.info("wrote %s %s", emb_path, tuple(emb.shape))
    return shapes


def copy_toy_tokens_proj(weights_root: Path, data_root: Path) -> Path:
    """Put the toy CLIP's tokens->text map where the real one lives (``data_root/coco_tokens_avg_proj.pth``).

    An identical file is kept as it is: rewriting it would change its mtime and make every stage that read it stale.
    """
    path, proj = data_root / TOKENS_PROJ_FILE, load_proj(weights_root).float().contiguous()
    if path.is_file():
        try:
            old = torch.load(path, map_location="cpu", weights_only=True).get("proj")
        except Exception:  # unreadable: rewrite it
            old = None
        if isinstance(old, torch.Tensor) and old.shape == proj.shape and torch.equal(old, proj):
            log.info("%s is up to date; kept", path)
            return path
    return atomic_torch_save(path, {"proj": proj})


def _source_mtime(root: Path, split: str, source: str) -> int:
    if source == "blip2":
        return caption_files(root, split, source)[0].stat().st_mtime_ns
    return (root / annotation_file(split)).stat().st_mtime_ns


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="toy", help="paper, toy, smoke or a YAML path (default toy)")
    parser.add_argument("--source", choices=("blip2", "qwen"), help="caption source (default: data.caption_source)")
    parser.add_argument("--force", action="store_true", help="recompute even when the outputs are up to date")
    parser.add_argument("--data-root", type=Path, help="data folder (default: the profile's paths.data_root)")
    add_set_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    try:
        cfg = load_config(Stage1Config, args.profile, args.overrides)
        data_root = Path(args.data_root or cfg.paths.data_root)
        device = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
        clip = build_role("clip", foundation_impl(cfg.model.size), cfg.paths.weights_root, device)
        run(data_root, clip, args.source or cfg.data.caption_source, args.force)
        if cfg.model.size != "paper":
            copy_toy_tokens_proj(Path(cfg.paths.weights_root), data_root)
    except NeuronsError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
