"""The stimuli the toy foundation models are pretrained on: frames and captions of a toy world's TRAINING split.

The test split is read only by the quality checks (:mod:`models.foundation.toy.evaluate`); no toy model is trained
on test clips or fMRI.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.data_catalog import WORLD_FILE, annotation_file, frames_file, toy_scenes_file
from utils.errors import DataError
from utils.io import sha256_file


@dataclass(frozen=True)
class Stimuli:
    """One split of a toy world: ``frames`` float32 ``(N, F, 3, R, R)`` in [0, 1], ``captions`` (N strings),
    ``scene`` int64 ``(N,)``: the shot of each clip (clips of one shot show the same scene; their captions may differ
    only in the motion direction, which a single frame cannot tell)."""

    frames: torch.Tensor
    captions: list[str]
    scene: torch.Tensor
    world_hash: str

    @property
    def n_clips(self) -> int:
        return int(self.frames.shape[0])

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.frames.shape[-1])

    def flat_frames(self) -> torch.Tensor:
        """``(N*F, 3, R, R)`` clip-major."""
        return self.frames.reshape(-1, *self.frames.shape[2:])

    def frame_clip(self) -> torch.Tensor:
        """``(N*F,)`` clip index of each flat frame."""
        return torch.arange(self.n_clips).repeat_interleave(self.n_frames)


TRAINED_ON = (frames_file("train"), annotation_file("train"), toy_scenes_file("train"))  # what every role reads


def world_hash(world_root: Path) -> str:
    """The hash of what the toy models are trained on: the world's training frames, captions and scenes (their
    sha256 from ``world.json``, else read from disk). The fMRI settings (SNR, voxels, subjects) do not enter it, so
    worlds that differ only there share one set of toy weights."""
    try:
        files = json.loads((world_root / WORLD_FILE).read_text(encoding="utf-8"))["files"]
        digests = [str(files[name]["sha256"]) for name in TRAINED_ON]
    except (OSError, ValueError, KeyError, TypeError):
        digests = [sha256_file(world_root / name) for name in TRAINED_ON if (world_root / name).is_file()]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def load_stimuli(world_root: str | Path, split: str = "train") -> Stimuli:
    """Read ``GT_<split>_3fps.pt`` and the captions of ``split``; :class:`DataError` when missing or inconsistent."""
    root = Path(world_root)
    frames_path, captions_path = root / frames_file(split), root / annotation_file(split)
    for path in (frames_path, captions_path):
        if not path.is_file():
            raise DataError(f"missing {path}", "build the toy world first with `python download_dataset.py --toy`")
    frames = torch.load(frames_path, map_location="cpu", weights_only=True)
    items = sorted(json.loads(captions_path.read_text(encoding="utf-8")), key=lambda it: int(it["idx"]))
    captions = [str(it["caption"]) for it in items]
    if frames.ndim != 5 or frames.shape[2] != 3 or len(captions) != frames.shape[0]:
        raise DataError(
            f"{frames_path} {tuple(frames.shape)} does not match {len(captions)} captions", "rebuild the toy world"
        )
    return Stimuli(frames.float().contiguous(), captions, scene_ids(root, split, captions), world_hash(root))


def scene_ids(root: Path, split: str, captions: list[str]) -> torch.Tensor:
    """``(N,)`` shot index per clip from ``toy_scenes_<split>.json``; without it, one id per distinct caption."""
    path = root / toy_scenes_file(split)
    scene = torch.full((len(captions),), -1, dtype=torch.long)
    if path.is_file():
        for shot in json.loads(path.read_text(encoding="utf-8")):
            scene[int(shot["start_clip"]) : int(shot["start_clip"]) + int(shot["n_clips"])] = int(shot["index"])
    if bool((scene < 0).any()):
        lookup: dict[str, int] = {}
        scene = torch.tensor([lookup.setdefault(c, len(lookup)) for c in captions], dtype=torch.long)
    return scene
