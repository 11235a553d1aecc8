"""What every stage needs: the subject's data, the foundation roles, the brain-model config and its weights."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.foundation import foundation_impl, require_roles, role_fingerprint
from models.foundation.toy.common import read_manifest, role_dir
from models.sizes import PAPER_FOUNDATION_DIMS, FoundationDims, GPT2Dims
from utils.checkpoint import read_weights, resolve_checkpoint
from utils.clip_target_cache import ClipTargetCache
from utils.data import BrainVideoData, SubjectSet
from utils.errors import ConfigError, WeightsError
from utils.stage_configs import SharedConfig

log = logging.getLogger(__name__)


def load_data(cfg: SharedConfig, fields: tuple[str, ...]) -> BrainVideoData:
    """The subject's data, with ``fields`` validated before any work starts (one subject: stages 2-6)."""
    data = BrainVideoData(cfg.paths.data_root, cfg.run.subject, cfg.data)
    data.validate(fields)
    return data


def load_subject_set(cfg: SharedConfig, fields: tuple[str, ...]) -> SubjectSet:
    """The data of every subject of ``run.subj`` (one or a set), with ``fields`` validated before any work starts."""
    data = SubjectSet(cfg.paths.data_root, cfg.run.subjects, cfg.data)
    data.validate(fields)
    return data


def voxel_counts(cfg: SharedConfig) -> tuple[int, ...]:
    """The voxel count of each subject of ``run.subj``, in ridge order (the brain model's ridge shapes)."""
    return tuple(BrainVideoData(cfg.paths.data_root, k, cfg.data).n_voxels for k in cfg.run.subjects)


CROSS_FIT_DIR = "cross_fit"  # stage 1's cross-fit models (data.cross_fit_folds), in its stage folder


def cross_fit_dir(stage1_dir: Path, fold: int) -> Path:
    """The folder of stage 1's cross-fit model ``fold`` (its ``checkpoints/best`` and ``last``)."""
    return Path(stage1_dir) / CROSS_FIT_DIR / f"fold_{fold}"


def adaptation_source(cfg: SharedConfig, stage: str) -> Path:
    """The ``best`` checkpoint of stage ``stage`` ("1" or "2") of ``train.init_from`` (a subject set's run folder,
    or its stage folder), checked to be a model of this size that did not train on this run's one subject."""
    root, folder_name = Path(cfg.train.init_from), f"stage{stage}"  # type: ignore[attr-defined]
    if len(cfg.run.subjects) != 1:
        raise ConfigError("train.init_from adapts a model to ONE new subject", "set run.subj to that subject")
    found = [f for f in (root / folder_name / "checkpoints" / "best", root / "checkpoints" / "best")
             if (f.is_dir() or f.with_name("best.old").is_dir()) and f.parent.parent.name == folder_name]  # fmt: skip
    if not found:
        raise WeightsError(f"train.init_from: no stage-{stage} checkpoint under {root}",
                           "give the run folder of a subject-set model (<exp_root>/exp_<EXP>/subj_1-2) whose stage "
                           f"{stage} has finished")  # fmt: skip
    folder = resolve_checkpoint(found[0])
    _, meta = read_weights(folder)
    subjects = [int(v) for v in meta.get("subj", "").split(",") if v]
    if cfg.run.subject in subjects:
        raise ConfigError(f"subject {cfg.run.subject} is one of the subjects {meta['subj']} that {folder} trained on",
                          "adapt the model to a subject outside its set, or use it as it is")  # fmt: skip
    if meta.get("model_size") != cfg.model.size:
        raise WeightsError(f"{folder} is a model of size {meta.get('model_size')}, this run's is {cfg.model.size}",
                           "use the profile (model.size) that trained it")  # fmt: skip
    return folder


def require_foundation(cfg: SharedConfig, roles: Sequence[str]) -> None:
    """Stage preflight: every weight file of ``roles`` is present (paper: all listed at once) and, for the toy
    roles, whole (the size its manifest records, a readable safetensors header), before any work or output."""
    impl, root = foundation_impl(cfg.model.size), Path(cfg.paths.weights_root)
    if impl == "paper":
        require_roles(impl, root, tuple(roles))
        return
    missing, broken = [], []
    for role in roles:
        folder = role_dir(root, role)
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None:  # no manifest: the role's own loader names what it lacks
            missing += [] if folder.is_dir() else [f"{role}/"]
            continue
        for rel, fp in manifest.get("files", {}).items():
            why = _toy_file_problem(folder / rel, fp)
            if why == "missing":
                missing.append(f"{role}/{rel}")
            elif why:
                broken.append(f"{folder / rel} ({why})")
    fix = f"build them with `python download_dataset.py --toy-weights --profile {cfg.run.profile}`"
    if missing:
        raise WeightsError(f"missing toy weights under {root}: {', '.join(missing)}", fix)
    if broken:
        raise WeightsError(f"toy weight file(s) corrupt or truncated: {'; '.join(broken)}", "re" + fix)


def _toy_file_problem(path: Path, fingerprint: dict[str, Any]) -> str:
    """Why a toy weight file is unusable ("missing", a size mismatch, an unreadable header), or ""."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != fingerprint.get("size", size):
        return f"{size} bytes, its manifest records {fingerprint['size']}"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, ValueError) as err:
            return f"unreadable header: {str(err).splitlines()[0][:80]}"
    return ""


def foundation_dims(
    cfg: SharedConfig, clip: Any, data: BrainVideoData, vae: Any = None, gpt2: Any = None
) -> FoundationDims:
    """Dimensions fixed by the foundation models: the paper's constants, or read from the toy models."""
    if foundation_impl(cfg.model.size) == "paper":
        return PAPER_FOUNDATION_DIMS
    latent_size = data.resolution // vae.downsample if vae is not None else 1
    gpt = GPT2Dims(gpt2.hidden_size, gpt2.model.config.n_layer, gpt2.model.config.n_head, gpt2.vocab_size,
                   gpt2.max_positions) if gpt2 is not None else GPT2Dims()  # fmt: skip
    latent_channels = vae.latent_channels if vae is not None else 4
    return FoundationDims(clip.num_tokens, clip.token_dim, clip.text_dim, latent_channels, latent_size, gpt)


class ClipTargets:
    """The CLIP image tokens that stages 1 and 2 train against (and stage 2's VAE latents): read from the fp16
    CLIP-target cache (``data.clip_targets=cache``, :mod:`utils.clip_target_cache`) or computed by the
    clip (vae) role."""

    def __init__(
        self,
        data: BrainVideoData,
        clip: Any,
        cache: ClipTargetCache | None,
        device: torch.device | str,
        vae: Any = None,
    ):
        self.data, self.clip, self.cache, self.device, self.vae = data, clip, cache, device, vae

    def __call__(self, split: str, idx: Any, frames: int | Sequence[int]) -> torch.Tensor:
        """float32 tokens of split-local clips ``idx`` on the device: (b, T, D) for one frame, (b, k, T, D) for a
        sequence of frames."""
        if self.cache is not None:
            rows = self.data.indices(split)[np.asarray(idx, dtype=np.int64)]
            source = "test" if split == "test" else "train"
            return self.cache.read(source, rows, frames).to(self.device).float()
        pick = frames if isinstance(frames, int) else list(frames)
        video = self.data.frames(split, idx)[:, pick].to(self.device)  # (b, 3, R, R) or (b, k, 3, R, R)
        return self.clip.image_tokens(video).float()

    def latents(self, split: str, idx: Any) -> torch.Tensor:
        """float32 VAE latents (posterior mode) of every frame of split-local clips ``idx``: (b, F, C, h, w); from
        the cache when it holds them."""
        source = "test" if split == "test" else "train"
        if self.cache is not None and self.cache.has_latents(source):
            rows = self.data.indices(split)[np.asarray(idx, dtype=np.int64)]
            return self.cache.read_latents(source, rows).to(self.device).float()
        return self.vae.encode(self.data.frames(split, idx).to(self.device)).float()


def uses_clip_cache(cfg: SharedConfig) -> bool:
    return cfg.data.clip_targets == "cache"


def clip_targets(
    cfg: SharedConfig,
    data: BrainVideoData,
    clip: Any,
    device: Any,
    needs: Mapping[str, Sequence[int]],
    vae: Any = None,
) -> ClipTargets:
    """The stage's :class:`ClipTargets`; with the cache, first check that it holds ``needs`` ({source: frames})."""
    if not uses_clip_cache(cfg):
        return ClipTargets(data, clip, None, device, vae)
    impl = foundation_impl(cfg.model.size)
    fingerprint = functools.partial(role_fingerprint, impl=impl, weights_root=cfg.paths.weights_root)
    cache = ClipTargetCache(cfg.paths.data_root, fingerprint, cfg.run.profile)
    for source, frames in needs.items():
        cache.require(source, frames)
    return ClipTargets(data, clip, cache, device, vae)
