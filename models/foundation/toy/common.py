"""Shared machinery of the toy foundation models: the training recipe, seeding, the training loop, batch sampling,
the v-prediction noising of the diffusion roles, role folders and their loaders.

A role folder ``weights_root/<role>/`` is written into a temporary sibling folder and renamed into place with its
``manifest.json`` (config hash + size and sha256 of every file) already inside, so a reader sees a complete folder or
none. ``is_complete`` is what makes a rerun on complete weights a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.foundation.common import count_params, finish
from utils.errors import WeightsError
from utils.io import atomic_write_json, sha256_file

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from models.foundation.toy.data import Stimuli

log = logging.getLogger(__name__)

#: Bump when the toy recipes or their code change the weights for a given recipe (invalidates old manifests).
TOY_VERSION = 1
MANIFEST = "manifest.json"
SAMPLING_FILE = "sampling.json"  # sampler settings saved beside a toy diffusion role's weights
#: Noise schedule of the toy diffusion roles (unclip, video): cosine betas, v-prediction.
COSINE_V_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}


@dataclass(frozen=True)
class TrainRecipe:
    """Optimisation of one toy model: AdamW, linear warm-up then cosine decay to 10 %, optional EMA."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup: int = 50
    grad_clip: float = 1.0
    ema: float = 0.0  # 0 = no EMA


def recipe_hash(**parts: Any) -> str:
    """Stable 16-hex digest of JSON-able parts (dataclasses are expanded)."""

    def plain(x: Any) -> Any:
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    text = json.dumps(
        {k: plain(v) for k, v in parts.items()} | {"toy_version": TOY_VERSION}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generator(seed: int) -> torch.Generator:
    """Seed torch's global RNG (module init) and return a CPU generator for the data order and noise."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_factor(step: int, recipe: TrainRecipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Ema:
    """Exponential moving average of a module's floating-point state."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v, 1.0 - self.decay)

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged floating-point tensors (integer buffers keep the module's values)."""
        module.load_state_dict({**module.state_dict(), **self.shadow}, strict=True)


def train(
    module: nn.Module, loss_fn: Callable[[int], torch.Tensor], recipe: TrainRecipe, desc: str, progress: bool = False
) -> dict[str, Any]:
    """Run ``recipe.steps`` AdamW steps of ``loss_fn(step)`` on ``module`` (left frozen in eval mode, EMA weights
    applied).

    Returns ``{"loss_first": mean of the first 5 % of steps, "loss_last": mean of the last 5 %, "seconds", "params"}``.
    """
    from tqdm import tqdm  # only the builders need it

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)  # 3x faster on CPU
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe))
    ema = Ema(module, recipe.ema) if recipe.ema > 0 else None
    losses: list[float] = []
    start = time.perf_counter()
    module.train()
    bar = tqdm(range(recipe.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(module)
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if ema is not None:
        ema.copy_to(module)
    module.eval().requires_grad_(False)
    k = max(1, len(losses) // 20)
    stats = {
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "seconds": round(time.perf_counter() - start, 2),
        "params": count_params(module),
    }
    log.info(
        "%s: %d steps in %.1f s, loss %.4f -> %.4f",
        desc,
        recipe.steps,
        stats["seconds"],
        stats["loss_first"],
        stats["loss_last"],
    )
    return stats


def batch_indices(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``(batch,)`` random indices in ``[0, n)`` (without replacement when possible)."""
    if batch <= n:
        return torch.randperm(n, generator=gen)[:batch]
    return torch.randint(0, n, (batch,), generator=gen)


def random_frames(stim: Stimuli, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random frame of each of ``batch`` random clips -> clip indices ``(B,)`` and frames ``(B, 3, R, R)``."""
    clips = batch_indices(stim.n_clips, batch, gen)
    frame = torch.randint(0, stim.n_frames, (len(clips),), generator=gen)
    return clips, stim.frames[clips, frame]


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``fn`` over ``x (N, ...)`` in slices of ``chunk`` rows, concatenated along dim 0."""
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def noise_scheduler() -> DDPMScheduler:
    """The training-time noising of the toy diffusion roles (:data:`COSINE_V_SCHEDULE`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**COSINE_V_SCHEDULE)


def v_prediction_batch(
    sched: DDPMScheduler, z0: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean latents ``z0 (B, ...)`` -> noisy ``zt (B, ...)``, timesteps ``t (B,)`` and the v target ``(B, ...)``
    (the noise is drawn from ``gen`` before the timesteps)."""
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=gen)
    return sched.add_noise(z0, noise, t), t, sched.get_velocity(z0, noise, t)


# ---------------------------------------------------------------------------------------------------------------------
# role folders and manifests


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily run torch's CPU ops on ``num_threads`` threads (None: leave as is). On a shared, oversubscribed
    machine 1 thread per process avoids OpenMP spin-wait stalls that made 2-thread runs up to 50x slower."""
    old = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def role_dir(weights_root: str | Path, role: str) -> Path:
    return Path(weights_root) / role


def require_toy_files(folder: Path, what: str, *names: str) -> Path:
    """``folder`` when it holds every file in ``names``, else a one-line :class:`WeightsError` naming ``what``."""
    if not all((folder / name).is_file() for name in names):
        raise WeightsError(
            f"missing toy {what} weights in {folder}", "build them with `python download_dataset.py --toy-weights`"
        )
    return folder


def read_sampling(folder: Path) -> dict[str, Any]:
    """The sampler settings (:data:`SAMPLING_FILE`) saved beside a toy diffusion role's weights."""
    return json.loads((folder / SAMPLING_FILE).read_text(encoding="utf-8"))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def is_complete(folder: Path, config_hash: str) -> bool:
    """True when ``folder`` holds a manifest of ``config_hash`` and every listed file matches its size and sha256."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("config_hash") != config_hash:
        return False
    for rel, fp in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != fp["size"] or sha256_file(path) != fp["sha256"]:
            return False
    return bool(manifest.get("files"))


@contextlib.contextmanager
def staged_role_dir(weights_root: str | Path, role: str, config_hash: str, info: dict[str, Any]) -> Iterator[Path]:
    """Yield an empty temporary folder; on success write its manifest (``info`` + file table) and swap it in for
    ``weights_root/<role>``. On failure the temporary folder is removed and the old folder is left untouched.
    Leftovers of a killed build are removed first (one builder per ``weights_root`` at a time)."""
    root = Path(weights_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(f".{role}.*.tmp"), *root.glob(f".{role}.*.old")]:  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{role}.", suffix=".tmp", dir=root))
    try:
        yield tmp
        atomic_write_json(
            tmp / MANIFEST, {**info, "role": role, "config_hash": config_hash, "files": _file_table(tmp)}
        )
        final = role_dir(root, role)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{role}.", suffix=".old", dir=root))
            final.rename(old / role)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_parts(folder: Path, parts: dict[str, Any], sampling: dict[str, Any]) -> None:
    """``save_pretrained`` of each part into ``folder/<name>/`` (modules as safetensors) and the sampler settings
    into :data:`SAMPLING_FILE`: the files of a toy diffusion role."""
    for name, part in parts.items():
        part.save_pretrained(folder / name, **({"safe_serialization": True} if isinstance(part, nn.Module) else {}))
    atomic_write_json(folder / SAMPLING_FILE, sampling)


def save_hf_model(model: Any, processor: Any, folder: Path) -> None:
    """``save_pretrained`` of a transformers model (safetensors) and its processor into ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def load_hf_model(
    weights_root: str | Path,
    role: str,
    what: str,
    classes: tuple[Any, Any],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """The toy ``role``'s transformers model (frozen on ``device``/``dtype``) and processor, of ``classes`` (model
    class, processor class), from ``weights_root/<role>/`` (one-line error naming ``what`` if absent)."""
    folder = require_toy_files(role_dir(weights_root, role), what, "config.json")
    model_cls, processor_cls = classes
    return finish(model_cls.from_pretrained(folder), device, dtype), processor_cls.from_pretrained(folder)
