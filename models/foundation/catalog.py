"""The weights catalog: every file the ``paper`` profile reads from ``weights_root``, where to get it, how big it is.

Nothing here downloads. ``missing_weights`` / ``describe_missing`` / ``require_weights`` let a stage stop before any
work with one line naming every missing file; ``catalog_rows`` / ``catalog_table`` feed
``download_dataset.py --weights``.

Layout under ``weights_root``: single upstream files keep their upstream names (``unclip6_epoch0_step110000.ckpt``,
``animatediff/v3_sd15_mm.ckpt``); Hugging Face model repos live in ``<org>/<name>/`` exactly as
``hf download <org>/<name> --local-dir <weights_root>/<org>/<name>`` writes them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from utils.errors import WeightsError

log = logging.getLogger(__name__)

GB = 1_000_000_000
MB = 1_000_000
KB = 1_000


@dataclass(frozen=True)
class WeightFile:
    """One file of the paper profile.

    ``relpath`` is relative to ``weights_root``. ``alternatives`` are other names that satisfy the entry (e.g. a
    ``.bin`` instead of a ``.safetensors``); an ``*.index.json`` alternative counts only when every shard it names is
    there. ``repo``/``filename``/``revision`` say where to get it (text only; nothing here downloads).
    """

    role: str
    relpath: str
    repo: str
    filename: str
    approx_bytes: int
    repo_type: str = "model"
    revision: str | None = None
    alternatives: tuple[str, ...] = ()
    note: str = ""

    @property
    def source(self) -> str:
        kind = "hf dataset" if self.repo_type == "dataset" else "hf"
        rev = f"@{self.revision[:8]}" if self.revision else ""
        return f"{kind} {self.repo}{rev}: {self.filename}"

    def download_hint(self, weights_root: str | Path) -> str:
        """A command that fetches this file into place (shown to the user, never run here)."""
        local_dir = Path(weights_root) / self.relpath[: len(self.relpath) - len(self.filename)].rstrip("/")
        opts = f" --repo-type {self.repo_type}" if self.repo_type != "model" else ""
        opts += f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo} {self.filename}{opts} --local-dir {local_dir}"

    def candidates(self) -> tuple[str, ...]:
        return (self.relpath, *self.alternatives)


def _hf_model(
    role: str,
    repo: str,
    files: dict[str, int],
    *,
    revision: str | None = None,
    alternatives: dict[str, tuple[str, ...]] | None = None,
) -> list[WeightFile]:
    alternatives = alternatives or {}
    return [
        WeightFile(
            role, f"{repo}/{name}", repo, name, size, revision=revision, alternatives=alternatives.get(name, ())
        )
        for name, size in files.items()
    ]


def _alt(repo: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{repo}/{n}" for n in names)


BIGG_REPO = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
GPT2_REPO = "openai-community/gpt2"
BLIP2_REPO = "Salesforce/blip2-opt-2.7b"
BLIP2_REVISION = "51572668da0eb669e01a189dc22abe6088589a24"
VIT_REPO = "google/vit-base-patch16-224"
VIDEOMAE_REPO = "MCG-NJU/videomae-base-finetuned-kinetics"
CLIPL_REPO = "openai/clip-vit-large-patch14"

# transformers checkpoints: the single-file name first, then the other layouts the hub uses
_HF_WEIGHT_ALTS = ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _weights_alts(repo: str) -> tuple[str, ...]:
    return _alt(repo, *_HF_WEIGHT_ALTS)


CATALOG: tuple[WeightFile, ...] = (
    # clip: OpenCLIP ViT-bigG/14 laion2b_s39b_b160k (image tokens + pooled text)
    WeightFile(
        "clip",
        f"{BIGG_REPO}/open_clip_model.safetensors",
        BIGG_REPO,
        "open_clip_model.safetensors",
        10_200 * MB,
        alternatives=_alt(BIGG_REPO, "open_clip_pytorch_model.bin"),
    ),
    # vae: SD-1.5 VAE (diffusers layout; the config ships in models/foundation/configs/sd15_single_file/vae)
    WeightFile(
        "vae",
        f"{SD15_REPO}/vae/diffusion_pytorch_model.safetensors",
        SD15_REPO,
        "vae/diffusion_pytorch_model.safetensors",
        335 * MB,
        alternatives=_alt(SD15_REPO, "vae/diffusion_pytorch_model.bin"),
    ),
    # unclip: MindEye2 SDXL unCLIP (UNet + VAE + frozen bigG image tower), Lightning checkpoint
    WeightFile(
        "unclip",
        "unclip6_epoch0_step110000.ckpt",
        "pscotti/mindeyev2",
        "unclip6_epoch0_step110000.ckpt",
        17_980 * MB,
        repo_type="dataset",
    ),
    # video: AnimateDiff v3 + SparseCtrl-RGB on RealisticVision V6.0 B1 (SD-1.5)
    WeightFile("video", "animatediff/v3_sd15_mm.ckpt", "guoyww/animatediff", "v3_sd15_mm.ckpt", 1_673 * MB),
    WeightFile("video", "animatediff/v3_sd15_adapter.ckpt", "guoyww/animatediff", "v3_sd15_adapter.ckpt", 102 * MB),
    WeightFile(
        "video",
        "animatediff/v3_sd15_sparsectrl_rgb.ckpt",
        "guoyww/animatediff",
        "v3_sd15_sparsectrl_rgb.ckpt",
        1_988 * MB,
    ),
    WeightFile(
        "video",
        "animatediff/realisticVisionV60B1_v51VAE.safetensors",
        "guoyww/animatediff_t2i_backups",
        "realisticVisionV60B1_v51VAE.safetensors",
        2_133 * MB,
    ),
    # gpt2 (scene-description decoder, fine-tuned in stage 2; tokens are CLIP BPE ids, so no GPT-2 tokenizer)
    *_hf_model(
        "gpt2",
        GPT2_REPO,
        {"config.json": 1 * KB, "model.safetensors": 548 * MB},
        alternatives={"model.safetensors": _weights_alts(GPT2_REPO)},
    ),
    # blip2: keyframe captioner, pinned revision as upstream
    *_hf_model(
        "blip2",
        BLIP2_REPO,
        {
            "config.json": 10 * KB,
            "model.safetensors.index.json": 120 * KB,
            "preprocessor_config.json": 1 * KB,
            "tokenizer_config.json": 1 * KB,
            "tokenizer.json": 2 * MB,
            "special_tokens_map.json": 1 * KB,
        },
        revision=BLIP2_REVISION,
        alternatives={
            "model.safetensors.index.json": _alt(BLIP2_REPO, "pytorch_model.bin.index.json"),
            "tokenizer.json": _alt(BLIP2_REPO, "vocab.json"),
        },
    ),
    # frame_classifier: ViT-B/16 ImageNet-1k (frame-based n-way metric)
    *_hf_model(
        "frame_classifier",
        VIT_REPO,
        {"config.json": 70 * KB, "model.safetensors": 346 * MB, "preprocessor_config.json": 1 * KB},
        alternatives={"model.safetensors": _weights_alts(VIT_REPO)},
    ),
    # video_classifier: VideoMAE-B Kinetics-400 (video-based n-way metric)
    *_hf_model(
        "video_classifier",
        VIDEOMAE_REPO,
        {"config.json": 30 * KB, "pytorch_model.bin": 346 * MB, "preprocessor_config.json": 1 * KB},
        alternatives={"pytorch_model.bin": _alt(VIDEOMAE_REPO, "model.safetensors")},
    ),
    # clip_pcc: CLIP ViT-L/14 image features (CLIP-pcc metric)
    *_hf_model(
        "clip_pcc",
        CLIPL_REPO,
        {"config.json": 5 * KB, "model.safetensors": 1_710 * MB, "preprocessor_config.json": 1 * KB},
        alternatives={"model.safetensors": _weights_alts(CLIPL_REPO)},
    ),
)

ROLES: tuple[str, ...] = tuple(dict.fromkeys(e.role for e in CATALOG))


def entries(roles: list[str] | tuple[str, ...] | None = None) -> list[WeightFile]:
    """Catalog entries of ``roles`` (all roles when None)."""
    if roles is not None:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise WeightsError(f"unknown foundation role(s) {unknown}", f"use one of {list(ROLES)}")
    return [e for e in CATALOG if roles is None or e.role in roles]


def _index_complete(index: Path) -> bool:
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((index.parent / s).is_file() for s in shards)


def resolve(entry: WeightFile, weights_root: str | Path) -> Path | None:
    """The local file satisfying ``entry``, or None."""
    for rel in entry.candidates():
        path = Path(weights_root) / rel
        if path.is_file() and (not rel.endswith(".index.json") or _index_complete(path)):
            return path
    return None


def missing_weights(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> list[WeightFile]:
    """Entries of ``roles`` with no local file under ``weights_root``."""
    return [e for e in entries(roles) if resolve(e, weights_root) is None]


def _human(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.0f} MB" if n >= MB else f"{max(n // KB, 1)} KB"


def _missing_cause_and_fix(missing: list[WeightFile], weights_root: str | Path) -> tuple[str, str]:
    """What is missing (every file, its source and size) and how to get it, for a one-line error."""
    total = sum(e.approx_bytes for e in missing)
    files = ", ".join(f"{e.relpath} [{e.role}, {e.source}, ~{_human(e.approx_bytes)}]" for e in missing)
    cause = f"missing {len(missing)} weight file(s) under {weights_root} (~{_human(total)}): {files}"
    fix = (f"run `python download_dataset.py --weights` (or `hf download <repo> <file> --local-dir "
           f"{weights_root}/<dir>` per file)")  # fmt: skip
    return cause, fix


def describe_missing(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> str:
    """One line naming every missing file (with its source) and the fix; empty string when nothing is missing."""
    missing = missing_weights(weights_root, roles)
    if not missing:
        return ""
    return WeightsError(*_missing_cause_and_fix(missing, weights_root)).one_line()


def require_weights(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> None:
    """Raise :class:`WeightsError` (one line, every missing file) unless all files of ``roles`` are present."""
    missing = missing_weights(weights_root, roles)
    if missing:
        raise WeightsError(*_missing_cause_and_fix(missing, weights_root))


def catalog_rows(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """One row per file: role, file, source, approx size, local path, present ("yes"/"no"), download command."""
    rows = []
    for e in entries(roles):
        found = resolve(e, weights_root)
        rows.append(
            {
                "role": e.role,
                "file": e.relpath,
                "source": e.source,
                "size": _human(e.approx_bytes),
                "local_path": str(found or Path(weights_root) / e.relpath),
                "present": "yes" if found else "no",
                "download": e.download_hint(weights_root),
            }
        )
    return rows


def catalog_table(weights_root: str | Path, roles: list[str] | tuple[str, ...] | None = None) -> str:
    """The catalog as aligned text rows (header first): role, file, source, size, present, local path."""
    cols = ("role", "file", "source", "size", "present", "local_path")
    rows = [dict(zip(cols, cols))] + catalog_rows(weights_root, roles)
    widths = {c: max(len(r[c]) for r in rows) for c in cols}
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() for r in rows)
