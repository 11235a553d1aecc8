"""Rule-based key-object discovery (upstream spec §2.3): one moving foreground object per clip, with its masks.

Per clip, every labelled non-background object that is present in two consecutive annotated frames adds the distance
its mask centroid moved (doubled for priority categories, e.g. people and animals) to its category's score; the area
ratio of its latest mask is kept. If a priority category scored, the best-scoring priority category is the key object;
else the best-scoring category whose area ratio is below ``max_area`` (any category if none is). Clips without a
candidate get category "None" and empty masks.

Outputs (per split): ``masks/key_objects_info_{split}.json`` ``{"<clip>": {"category": name}}`` and
``masks/key_objects_masks_{split}.pt`` float32 (N, F, R, R) with values 0/1, where N is the split's clip count.

Fixes over upstream (defect 9): the test file is sized to the test set (not 4320 clips); frames are never loaded unless
a visualisation is asked for (then memory-mapped, one frame per shown clip); a frame's mask is the union of all
instances of the key category (``--instances last``: upstream's last instance in label order overwrites); names in
both the background and the priority list count as background, explicitly. Category lists come from
``<data_root>/masks/key_object_categories.json`` (a toy world ships one) or else
``tasks_construction/key_object_categories.json``.

Usage: ``python -m tasks_construction.find_key_obj --data-root DIR [--splits train test] [--instances union|last]
[--vis 8]``
"""

from __future__ import annotations

import io
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from utils.cli import OneLineParser, add_data_root_args, data_root_of, report_error
from utils.data import load_json, load_tensor, save_tensor_file
from utils.data_catalog import (
    KEY_OBJECT_CATEGORIES_FILE,
    frames_file,
    key_objects_info_file,
    key_objects_masks_file,
    key_objects_vis_dir,
    mask_frame_key,
    mask_labels_file,
    mask_png_dir,
)
from utils.errors import DataError, NeuronsError
from utils.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_CATEGORIES = Path(__file__).resolve().parent / "key_object_categories.json"
NO_KEY = "None"
Instances = Literal["union", "last"]  # defect 9: how a frame's instances of the key category make its mask


@dataclass(frozen=True)
class KeyObjectRules:
    background: frozenset[str]
    priority: frozenset[str]
    top_k: int = 1  # upstream uses 1; with k > 1 the masks are the union of the top k categories
    max_area: float = 0.5  # non-priority candidates must cover less than this fraction of the frame
    instances: Instances = "union"  # defect 9: "last" = upstream, the last instance in label order overwrites

    def __post_init__(self) -> None:
        if self.instances not in ("union", "last"):
            raise DataError(f"bad key-object instances rule {self.instances!r}", "use 'union' or 'last'")

    @classmethod
    def from_file(
        cls, path: Path, top_k: int = 1, max_area: float = 0.5, instances: Instances = "union"
    ) -> KeyObjectRules:
        lists = load_json(path, "give --categories a JSON file with 'background' and 'priority' lists")
        if not isinstance(lists, dict) or not all(isinstance(lists.get(k), list) for k in ("background", "priority")):
            raise DataError(f"{path} needs lists 'background' and 'priority'", "fix the category file")
        background = frozenset(map(str, lists["background"]))
        overlap = background & set(map(str, lists["priority"]))
        if overlap:
            log.warning(
                "%d names are both background and priority; they count as background: %s",
                len(overlap),
                sorted(overlap),
            )
        return cls(background, frozenset(map(str, lists["priority"])) - background, top_k, max_area, instances)


def categories_file(data_root: Path, override: Path | None = None) -> Path:
    """The category lists to use: an explicit file, the world's own lists, or the real-data default."""
    if override is not None:
        return override
    own = data_root / KEY_OBJECT_CATEGORIES_FILE
    return own if own.is_file() else DEFAULT_CATEGORIES


def centroid(mask: np.ndarray) -> np.ndarray | None:
    """(x, y) mean of the non-zero pixels of a (H, W) mask, None when empty."""
    ys, xs = np.nonzero(mask)
    return None if len(xs) == 0 else np.array([xs.mean(), ys.mean()])


def choose_key_categories(
    clip_masks: dict[int, dict[str, tuple[str, np.ndarray]]], rules: KeyObjectRules
) -> list[str]:
    """Key categories of one clip. clip_masks: frame -> label -> (category, (H, W) mask)."""
    score: dict[str, float] = defaultdict(float)
    area: dict[str, float] = {}
    frames = sorted(clip_masks)
    for prev, cur in zip(frames, frames[1:]):
        for label, (category, mask) in clip_masks[cur].items():
            if category in rules.background or label not in clip_masks[prev]:
                continue
            c_now, c_before = centroid(mask), centroid(clip_masks[prev][label][1])
            if c_now is None or c_before is None:
                continue
            step = float(np.linalg.norm(c_now - c_before))
            score[category] += 2.0 * step if category in rules.priority else step
            area[category] = float(np.count_nonzero(mask)) / mask.size
    ranked = sorted(score, key=lambda c: -score[c])  # stable: ties keep first-seen order
    priority = [c for c in ranked if c in rules.priority]
    if priority:
        return priority[: rules.top_k]
    small = [c for c in ranked if area[c] < rules.max_area]
    return (small or ranked)[: rules.top_k]


def key_frame_mask(
    objects: dict[str, tuple[str, np.ndarray]], keys: Sequence[str], rules: KeyObjectRules
) -> np.ndarray | None:
    """One frame's key-object mask (H, W) float32 in {0, 1} from its label -> (category, mask) objects, None when no
    object of a key category is in the frame: the union of those instances, or the last one ("last", upstream)."""
    hits = [mask > 0 for category, mask in objects.values() if category in keys]
    if not hits:
        return None
    out = hits[-1] if rules.instances == "last" else np.logical_or.reduce(hits)
    return out.astype(np.float32)


def read_clip_masks(mask_dir: Path, mask_dict: dict[str, dict[str, str]], clip: int, n_frames: int, missing: list):
    """frame -> label -> (category, mask (H, W) uint8) for the annotated frames of a clip (missing PNGs are noted)."""
    out: dict[int, dict[str, tuple[str, np.ndarray]]] = {}
    for f in range(n_frames):
        labels = mask_dict.get(mask_frame_key(clip, f))
        if not labels:
            continue
        out[f] = {}
        for label, category in labels.items():
            path = mask_dir / f"{mask_frame_key(clip, f)}_{label}.png"
            if not path.is_file():
                missing.append(path.name)
                continue
            with Image.open(path) as img:
                out[f][label] = (str(category), np.asarray(img.convert("L")))
    return out


def split_shape(data_root: Path, split: str) -> tuple[int, int, int, int]:
    """(N, F, H, W) of a split, read from the frame file's header (memory-mapped, no frame data is read)."""
    path = data_root / frames_file(split)
    frames = load_tensor(path, f"download or build the data into {data_root}", mmap=True)
    if not isinstance(frames, torch.Tensor) or frames.ndim != 5:
        raise DataError(f"{path} is not a (clips, frames, 3, H, W) tensor", f"re-create {path}")
    n, f, _, h, w = frames.shape
    return int(n), int(f), int(h), int(w)


def find_key_objects(data_root: Path, split: str, rules: KeyObjectRules, vis: int = 0) -> dict[str, Any]:
    """Write the key-object files of one split; return a summary (clip count, clips with a key object, top names)."""
    from tqdm import tqdm

    n, n_frames, h, w = split_shape(data_root, split)
    fix = f"download the NEURONS annotations (or build the toy world) into {data_root}"
    mask_dir, labels_path = data_root / mask_png_dir(split), data_root / mask_labels_file(split)
    mask_dict = load_json(labels_path, fix)
    if not isinstance(mask_dict, dict):
        raise DataError(f"malformed {labels_path.name}: expected an object", fix)
    if not mask_dir.is_dir():
        raise DataError(f"missing folder {mask_dir}", f"{fix}; untar {mask_dir.name}.tar.gz in masks/")
    masks = torch.zeros((n, n_frames, h, w), dtype=torch.float32)
    info: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    for clip in tqdm(range(n), desc=f"key objects {split}", unit="clip", leave=False):
        clip_masks = read_clip_masks(mask_dir, mask_dict, clip, n_frames, missing)
        keys = choose_key_categories(clip_masks, rules)
        info[str(clip)] = {"category": keys[0] if keys else NO_KEY}
        for f, objects in clip_masks.items():
            mask = key_frame_mask(objects, keys, rules)
            if mask is None:
                continue
            if mask.shape != (h, w):
                raise DataError(f"mask of clip {clip} frame {f} is {mask.shape}, frames are {(h, w)}", fix)
            masks[clip, f] = torch.from_numpy(mask)
    if missing:
        log.warning("%s: %d PNGs listed in the mask dict are missing (e.g. %s)", split, len(missing), missing[0])
    atomic_write_json(data_root / key_objects_info_file(split), info)
    save_tensor_file(data_root / key_objects_masks_file(split), masks)
    if vis > 0:
        save_visualisations(data_root, split, info, masks, vis)
    names = [v["category"] for v in info.values()]
    found = sum(name != NO_KEY for name in names)
    common = sorted({c: names.count(c) for c in set(names)}.items(), key=lambda kv: -kv[1])[:10]
    return {"split": split, "n_clips": n, "with_key_object": found, "missing_pngs": len(missing), "top": dict(common)}


def save_visualisations(data_root: Path, split: str, info: dict, masks: torch.Tensor, count: int, frame: int = 2):
    """PNGs of frame ``frame`` next to its key-object overlay for the first ``count`` clips with a key object."""
    frames = load_tensor(data_root / frames_file(split), "re-create the frame file", mmap=True)
    out = data_root / key_objects_vis_dir(split)
    shown = [int(c) for c, v in info.items() if v["category"] != NO_KEY][:count]
    frame = min(frame, frames.shape[1] - 1)
    for clip in shown:
        img = frames[clip, frame].permute(1, 2, 0).numpy()
        overlay = img * 0.4 + masks[clip, frame].numpy()[..., None] * np.array([0.6, 0.0, 0.0])
        both = (np.clip(np.concatenate([img, overlay], axis=1), 0, 1) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(both).save(buf, format="PNG")
        atomic_write_bytes(out / f"clip_{clip}_{info[str(clip)]['category'].replace(' ', '_')}.png", buf.getvalue())


def run(
    data_root: Path,
    splits: Sequence[str] = ("train", "test"),
    categories: Path | None = None,
    top_k: int = 1,
    vis: int = 0,
    instances: Instances = "union",
) -> list[dict[str, Any]]:
    """Key objects for ``splits`` of a data root (the library entry point; e.g. after building a toy world)."""
    path = categories_file(Path(data_root), categories)
    rules = KeyObjectRules.from_file(path, top_k=top_k, instances=instances)
    log.info("category lists: %s", path)
    return [find_key_objects(Path(data_root), split, rules, vis) for split in splits]


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add_data_root_args(parser)
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"])
    parser.add_argument("--categories", type=Path, help="JSON with 'background' and 'priority' lists")
    parser.add_argument("--top-k", type=int, default=1, help="key categories per clip (upstream: 1)")
    parser.add_argument("--vis", type=int, default=0, help="save this many overlay PNGs per split (reads frames)")
    parser.add_argument("--instances", choices=["union", "last"], default="union",
                        help="a frame's key mask: the union of the key category's instances, or upstream's last one "
                        "(defect 9)")  # fmt: skip
    args = parser.parse_args(argv)
    args.data_root = data_root_of(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for summary in run(args.data_root, args.splits, args.categories, args.top_k, args.vis, args.instances):
            log.info("%s", summary)
    except NeuronsError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
