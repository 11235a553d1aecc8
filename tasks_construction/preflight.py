"""Everything a run of one profile reads from disk, checked in one pass (``python download_dataset.py --check``).

The items, in the order a new user gets them:

1. ``data``: the real cc2017 and NEURONS files of :mod:`utils.data_catalog` (the mask tarballs count once unpacked),
   or a toy profile's built world (``world.json``, written last);
2. ``key objects``: ``find_key_obj``'s info and mask files of both source splits;
3. ``weights (<role>)``: every catalogue file of every role of the ``paper`` profile, with MindEye2's ``last.pth``
   when stage 1 or 2 starts from it; a toy profile's role folders (complete when every file its manifest lists has
   the recorded size);
4. ``caption embeddings``: those of ``data.caption_source`` (BLIP-2's come with the data; Qwen's and the toy
   world's are computed with the clip role, so they come after the weights).

Each :class:`Item` has its size on disk when present (``on_disk``), the catalogue's size otherwise, and the command
that fetches or makes it. Nothing here downloads or writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.foundation.catalog import CATALOG, MINDEYE2_WEIGHTS, human_bytes, resolve
from models.foundation.toy.build import ROLES as TOY_ROLES
from models.foundation.toy.common import read_manifest, role_dir
from utils.data_catalog import (
    SOURCES,
    TOKENS_PROJ_FILE,
    WORLD_FILE,
    DataFile,
    caption_emb_file,
    caption_file,
    dataset_files,
    key_objects_info_file,
    key_objects_masks_file,
)
from utils.stage_configs import Stage1Config, Stage2Config

CAPTION_EMB_BYTES = {"train": 4320 * 1280 * 4, "test": 1200 * 1280 * 4}  # (N, 1280) float32, bigG text width


@dataclass(frozen=True)
class Item:
    """One thing a run reads: ``path`` (a file or a folder), what makes it, its size on disk (None: missing)."""

    kind: str
    path: Path
    command: str
    expected_bytes: int = 0  # the catalogue's size; 0 = not known
    on_disk: int | None = None

    @property
    def present(self) -> bool:
        return self.on_disk is not None

    @property
    def size(self) -> str:
        """The size on disk when present, else ``~`` and the catalogue's size (``?`` when unknown)."""
        if self.on_disk is not None:
            return human_bytes(self.on_disk)
        return f"~{human_bytes(self.expected_bytes)}" if self.expected_bytes > 0 else "?"


def disk_bytes(path: Path) -> int | None:
    """The size of a file, or the total of a folder's files; None when neither exists."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def unpacked_dir(entry: DataFile, data_root: Path) -> Path:
    """The folder a ``.tar.gz`` data file unpacks into (beside it)."""
    return data_root / entry.relpath.removesuffix(".tar.gz")


def data_file_item(entry: DataFile, data_root: Path) -> Item:
    """A real data file; a tarball counts only once unpacked (``find_key_obj`` reads the folder)."""
    path, kind = data_root / entry.relpath, "data"
    if entry.relpath in {caption_emb_file(s) for s in SOURCES}:
        kind = "caption embeddings"
    if not entry.extract:
        return Item(kind, path, entry.hint(data_root), entry.approx_bytes, disk_bytes(path))
    folder = unpacked_dir(entry, data_root)
    unpack = f"tar -xzf {path} -C {path.parent}"
    command = unpack if path.is_file() else f"{entry.hint(data_root)} && {unpack}"
    return Item(kind, folder, command, entry.approx_bytes, disk_bytes(folder) if folder.is_dir() else None)


def real_data_items(data_root: Path, subjects: Sequence[int]) -> list[Item]:
    return [data_file_item(e, data_root) for e in dataset_files(tuple(subjects))]


def key_object_items(data_root: Path) -> list[Item]:
    command = f"python -m tasks_construction.find_key_obj --data-root {data_root}"
    paths = [data_root / f(s) for s in SOURCES for f in (key_objects_info_file, key_objects_masks_file)]
    return [Item("key objects", p, command, 0, disk_bytes(p)) for p in paths]


def paper_weight_items(weights_root: Path, mindeye2: bool) -> list[Item]:
    """Every catalogue file (MindEye2's ``last.pth`` only when ``mindeye2``), at the path that satisfies it."""
    items = []
    for entry in CATALOG:
        if entry is MINDEYE2_WEIGHTS and not mindeye2:
            continue
        found = resolve(entry, weights_root)
        path = found or weights_root / entry.relpath
        size = found.stat().st_size if found is not None else None
        hint = entry.download_hint(weights_root)
        items.append(Item(f"weights ({entry.role})", path, hint, entry.approx_bytes, size))
    return items


def toy_role_complete(folder: Path) -> bool:
    """A toy role folder whose manifest lists files, each there with its recorded size."""
    manifest = read_manifest(folder) if folder.is_dir() else None
    files = (manifest or {}).get("files") or {}
    return bool(files) and all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == fp.get("size") for rel, fp in files.items()
    )


def toy_weight_items(weights_root: Path, profile: str) -> list[Item]:
    command = f"python download_dataset.py --toy-weights --profile {profile}"
    items = []
    for role in TOY_ROLES:
        folder = role_dir(weights_root, role)
        size = disk_bytes(folder) if toy_role_complete(folder) else None
        items.append(Item(f"weights ({role})", folder, command, 0, size))
    return items


def caption_items(data_root: Path, caption_source: str, profile: str, toy: bool) -> list[Item]:
    """The caption embeddings that are computed here (and the Qwen captions written with them)."""
    if caption_source == "blip2" and not toy:
        return []  # downloaded with the data (real_data_items lists them)
    if caption_source == "blip2":
        command = f"python download_dataset.py --toy-weights --profile {profile}"
        paths = [data_root / caption_emb_file(s) for s in SOURCES]
    else:
        command = (f"python -m tasks_construction.gen_GT_clip_embeds --profile {profile} --data-root {data_root} "
                   "--source qwen")  # fmt: skip
        paths = [data_root / f(s, "qwen") for s in SOURCES for f in (caption_file, caption_emb_file)]
    paths += [data_root / TOKENS_PROJ_FILE] if toy else []  # the toy CLIP's tokens -> caption map, written with them
    expected = {data_root / caption_emb_file(s, caption_source): CAPTION_EMB_BYTES[s] for s in SOURCES}
    return [Item("caption embeddings", p, command, 0 if toy else expected.get(p, 0), disk_bytes(p)) for p in paths]


def run_items(
    profile: str, overrides: Sequence[str] = (), data_root: Path | None = None, subjects: Sequence[int] = (1, 2, 3)
) -> list[Item]:
    """Every item a run of ``profile`` (with ``--set`` ``overrides``) reads, in the order to get them.

    ``data_root`` replaces the profile's ``paths.data_root``; ``subjects`` limit the real fMRI files."""
    from utils.config import load_config

    s1 = load_config(Stage1Config, profile, overrides)
    s2 = load_config(Stage2Config, profile, overrides)
    root, weights = Path(data_root or s1.paths.data_root), Path(s1.paths.weights_root)
    toy = s1.model.size != "paper"
    if toy:
        world_cmd = f"python download_dataset.py --toy --profile {profile} --out {root}"
        data = [Item("data", root / WORLD_FILE, world_cmd, 0, disk_bytes(root / WORLD_FILE))]
        models = toy_weight_items(weights, profile)
    else:
        data = real_data_items(root, subjects)
        mindeye2 = s1.train.init_from_mindeye2 or s2.train.init_from_mindeye2
        models = paper_weight_items(weights, mindeye2)
    captions = caption_items(root, s1.data.caption_source, profile, toy)
    return [*data, *key_object_items(root), *models, *captions]


def items_table(items: Sequence[Item]) -> str:
    """One row per item (state, size, kind, path), each missing one followed by the command that gets it."""
    kind_width = max((len(i.kind) for i in items), default=4)
    lines = []
    for item in items:
        state = "present" if item.present else "missing"
        lines.append(f"{state:8s} {item.size:>9s}  {item.kind:<{kind_width}s}  {item.path}")
        if not item.present:
            lines.append(f"{'':20s}get: {item.command}")
    return "\n".join(lines)


def missing_summary(items: Sequence[Item]) -> str:
    """``N of M items missing (~X)``: X adds up the catalogue sizes that are known."""
    missing = [i for i in items if not i.present]
    total = sum(i.expected_bytes for i in missing)
    return f"{len(missing)} of {len(items)} items missing" + (f" (~{human_bytes(total)})" if total else "")
