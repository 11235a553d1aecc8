"""The files under ``data_root``: their names (the one place they are spelled) and, for the real cc2017 files,
their sources and sizes (spec: upstream §1.3, dataset §1.4-1.5).

Names are relative POSIX paths under ``data_root``; ``source`` is ``train`` or ``test`` (the validation split is part
of the training files), ``subj`` the subject digit. Nothing here downloads; ``download_dataset.py`` does, when a hub
can be reached, and otherwise prints the list below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SOURCES = ("train", "test")
TOKENS_PROJ_FILE = "coco_tokens_avg_proj.pth"  # frozen CLIP tokens -> caption space map {"proj": (D, Dt)}
CONCEPT_CLASSES_FILE = "qwen_annotation/concept_classes.json"  # optional: the C concept class names
KEY_OBJECT_CATEGORIES_FILE = "masks/key_object_categories.json"  # optional: find_key_obj's category lists
RIDGE_BASELINE_FILE = "ridge_baseline.json"  # per-subject identification of tasks_construction.ridge_baseline
# only in a toy world:
WORLD_FILE = "world.json"  # its config, hash and file list (written last)
CEILING_FILE = "ceiling.json"  # the noise ceiling of every subject
ENCODING_MODEL_DIR = "encoding_model"  # the true encoding model: model.json and one file per subject


def subject_name(subj: int) -> str:
    """``subj01`` for subject 1 (the prefix of its fMRI files and its key in per-subject tables)."""
    return f"subj0{subj}"


def fmri_file(subj: int, source: str) -> str:
    """fMRI float32 (N, repeats, V)."""
    return f"{subject_name(subj)}_{source}_fmri.pt"


def frames_file(source: str) -> str:
    """Frames float32 (N, F, 3, R, R) in [0,1]."""
    return f"GT_{source}_3fps.pt"


def caption_file(source: str, caption_source: str = "blip2") -> str:
    """Caption strings (N,): BLIP-2's, or the Qwen captions that ``gen_GT_clip_embeds --source qwen`` extracts."""
    return f"GT_{source}_caption.pt" if caption_source == "blip2" else f"qwen_annotation/GT_{source}_caption_qwen.pt"


def caption_emb_file(source: str, caption_source: str = "blip2") -> str:
    """Caption embeddings float32 (N, Dt) of :func:`caption_file`."""
    if caption_source == "blip2":
        return f"GT_{source}_caption_emb.pt"
    return f"qwen_annotation/GT_{source}_caption_qwen_emb.pt"


def annotation_file(source: str) -> str:
    """Qwen annotations: a list of ``{idx, caption, tags, category_id (C multi-hot)}``."""
    return f"qwen_annotation/qwen_{source}_caption_tag_category_id.json"


def mask_labels_file(source: str) -> str:
    """The categories of the per-object PNG masks: ``{mask_frame_key: {label: category}}``."""
    return f"masks/mask_cls_dict_{source}_qwen_video.json"


def mask_png_dir(source: str) -> str:
    """The per-object PNG masks (shipped as ``<dir>.tar.gz``)."""
    return f"masks/mask_cls_{source}_qwen_video"


def key_objects_info_file(source: str) -> str:
    """``{"<clip>": {"category": name}}`` written by ``find_key_obj``."""
    return f"masks/key_objects_info_{source}.json"


def key_objects_masks_file(source: str) -> str:
    """Key-object masks float32 (N, F, R, R) with values 0/1 written by ``find_key_obj``."""
    return f"masks/key_objects_masks_{source}.pt"


def key_objects_vis_dir(source: str) -> str:
    """``find_key_obj --vis`` previews."""
    return f"masks/key_objects_vis_{source}"


def mask_frame_key(clip: int, frame: int) -> str:
    """The key of one annotated frame in :func:`mask_labels_file`; its PNGs are ``<key>_<label>.png``."""
    return f"mask_{clip}_f{frame}"


def toy_scenes_file(source: str) -> str:
    """Toy world: the scene of every shot."""
    return f"toy_scenes_{source}.json"


def caption_tags_file(source: str) -> str:
    """Toy world: the caption tags of every clip."""
    return f"qwen_{source}_caption_tag.json"


def encoding_model_file(subj: int) -> str:
    """Toy world: the per-voxel parameters of the true encoding model of subject ``subj``."""
    return f"{ENCODING_MODEL_DIR}/{subject_name(subj)}.safetensors"


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
        DataFile(fmri_file(subj, "train"), CC2017_REPO, "dataset", 4320 * 2 * v * 4, subj),
        DataFile(fmri_file(subj, "test"), CC2017_REPO, "dataset", 1200 * 10 * v * 4, subj),
    ]


SHARED_FILES = [
    DataFile(frames_file("train"), CC2017_REPO, "dataset", int(15.6 * GB)),
    DataFile(frames_file("test"), CC2017_REPO, "dataset", int(4.34 * GB)),
    DataFile(caption_file("train"), CC2017_REPO, "dataset", int(1 * MB)),
    DataFile(caption_file("test"), CC2017_REPO, "dataset", int(0.3 * MB)),
    DataFile(caption_emb_file("train"), CC2017_REPO, "dataset", 4320 * 1280 * 4),
    DataFile(caption_emb_file("test"), CC2017_REPO, "dataset", 1200 * 1280 * 4),
    DataFile(TOKENS_PROJ_FILE, CC2017_REPO, "dataset", 1664 * 1280 * 4),
    *(DataFile(f"{mask_png_dir(s)}.tar.gz", NEURONS_REPO, "model", 0, extract=True) for s in SOURCES),
    *(DataFile(mask_labels_file(s), NEURONS_REPO, "model", 0) for s in SOURCES),
    *(DataFile(annotation_file(s), NEURONS_REPO, "model", 0) for s in SOURCES),
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
