"""The real cc2017 files under ``data_root``: names, sources and sizes (spec: upstream §1.3, dataset §1.4-1.5).

Nothing here downloads; ``download_dataset.py`` does, when a hub can be reached, and otherwise prints this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CC2017_REPO = "gongzx/cc2017_dataset"  # NeuroClips' preprocessed cc2017 (a dataset repo)
NEURONS_REPO = "McGregorW/NEURONS"  # NEURONS' masks and Qwen annotations (a model repo)
MB = 1_000_000
GB = 1_000_000_000
VOXELS = {1: 13447, 2: 14828, 3: 9114}  # for size estimates only; the code reads V from the tensors


@dataclass(frozen=True)
class DataFile:
    relpath: str  # under data_root
    repo: str
    repo_type: str  # "dataset" or "model"
    approx_bytes: int
    subj: int | None = None  # None: shared by all subjects
    extract: bool = False  # a .tar.gz unpacked in place after download

    @property
    def source(self) -> str:
        return f"hf {self.repo_type} {self.repo}: {self.relpath}"

    def hint(self, data_root: str | Path) -> str:
        return f"hf download {self.repo} {self.relpath} --repo-type {self.repo_type} --local-dir {data_root}"


def _fmri(subj: int) -> list[DataFile]:
    v = VOXELS[subj]
    return [
        DataFile(f"subj0{subj}_train_fmri.pt", CC2017_REPO, "dataset", 4320 * 2 * v * 4, subj),
        DataFile(f"subj0{subj}_test_fmri.pt", CC2017_REPO, "dataset", 1200 * 10 * v * 4, subj),
    ]


SHARED_FILES = [
    DataFile("GT_train_3fps.pt", CC2017_REPO, "dataset", int(15.6 * GB)),
    DataFile("GT_test_3fps.pt", CC2017_REPO, "dataset", int(4.34 * GB)),
    DataFile("GT_train_caption.pt", CC2017_REPO, "dataset", int(1 * MB)),
    DataFile("GT_test_caption.pt", CC2017_REPO, "dataset", int(0.3 * MB)),
    DataFile("GT_train_caption_emb.pt", CC2017_REPO, "dataset", 4320 * 1280 * 4),
    DataFile("GT_test_caption_emb.pt", CC2017_REPO, "dataset", 1200 * 1280 * 4),
    DataFile("coco_tokens_avg_proj.pth", CC2017_REPO, "dataset", 1664 * 1280 * 4),
    DataFile("masks/mask_cls_train_qwen_video.tar.gz", NEURONS_REPO, "model", 0, extract=True),
    DataFile("masks/mask_cls_test_qwen_video.tar.gz", NEURONS_REPO, "model", 0, extract=True),
    DataFile("masks/mask_cls_dict_train_qwen_video.json", NEURONS_REPO, "model", 0),
    DataFile("masks/mask_cls_dict_test_qwen_video.json", NEURONS_REPO, "model", 0),
    DataFile("qwen_annotation/qwen_train_caption_tag_category_id.json", NEURONS_REPO, "model", 0),
    DataFile("qwen_annotation/qwen_test_caption_tag_category_id.json", NEURONS_REPO, "model", 0),
]


def dataset_files(subjects: tuple[int, ...] = (1, 2, 3)) -> list[DataFile]:
    """Every real file the pipeline reads for ``subjects``."""
    return [f for s in subjects for f in _fmri(s)] + SHARED_FILES


def is_present(entry: DataFile, data_root: Path) -> bool:
    """A tarball counts as present once it is unpacked (its folder exists)."""
    path = Path(data_root) / entry.relpath
    if entry.extract:
        return path.exists() or Path(str(path).removesuffix(".tar.gz")).is_dir()
    return path.exists()


def missing_files(data_root: Path, subjects: tuple[int, ...] = (1, 2, 3)) -> list[DataFile]:
    return [f for f in dataset_files(subjects) if not is_present(f, data_root)]


def human_size(n: int) -> str:
    if n <= 0:
        return "?"
    for unit, scale in (("GB", GB), ("MB", MB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1000:.0f} kB"
