"""Loading helpers shared by the paper loaders of every foundation role.

Rules they enforce (see the package docstring): local files only, ``torch.load(weights_only=True, mmap=True)`` for
pickled checkpoints, safetensors for ``.safetensors``, strict loading into a module built with empty (meta) parameters,
and every key a key map drops is logged.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from utils.errors import WeightsError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

M = TypeVar("M", bound=nn.Module)

#: The noise range Stable Diffusion was trained with (unclip6 and AnimateDiff keep it; their beta curves differ).
SD_BETAS: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}


def config_path(*parts: str) -> Path:
    """Path of a config file shipped in ``models/foundation/configs``."""
    return CONFIG_DIR.joinpath(*parts)


def read_json_config(*parts: str) -> dict[str, Any]:
    with open(config_path(*parts), encoding="utf-8") as fh:
        return json.load(fh)


def _torch_load(path: Path, mmap: bool) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_checkpoint(path: str | Path, *, allow_unsafe_pickle: bool = False) -> Any:
    """Read a ``.safetensors`` / ``.ckpt`` / ``.pth`` / ``.bin`` file on the CPU.

    Pickled files are read with ``weights_only=True`` and memory-mapped where the format allows it (zip files).
    ``allow_unsafe_pickle`` permits a full unpickle as a last resort for a trusted upstream file that holds
    non-tensor Python objects. Corrupt or truncated files raise :class:`WeightsError`.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"missing weight file {path}", "run `python download_dataset.py --weights`")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return _torch_load(path, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Weights only" not in str(err):
            raise _corrupt(path, err) from err
        if not allow_unsafe_pickle:
            raise WeightsError(
                f"{path} holds Python objects that torch.load(weights_only=True) refuses ({_first_line(err)})",
                "re-save its state_dict as safetensors, or load it with allow_unsafe_pickle=True if you trust it",
            ) from err
        log.warning("loading %s with weights_only=False (allow_unsafe_pickle=True)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise _corrupt(path, err) from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, err) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _corrupt(path: Path, err: BaseException) -> WeightsError:
    return WeightsError(
        f"cannot read {path} ({type(err).__name__}: {_first_line(err)}); the file is corrupt or truncated",
        "delete it and download it again with `python download_dataset.py --weights`",
    )


def unwrap_state_dict(
    obj: Any, path: str | Path, wrappers: Iterable[str] = ("state_dict",)
) -> dict[str, torch.Tensor]:
    """Return the flat ``{name: tensor}`` dict of a checkpoint, unwrapping known wrapper keys and dropping
    (with a log line) top-level entries that are not tensors."""
    for key in wrappers:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            extra = sorted(k for k in obj if k != key)
            if extra:
                log.info("%s: ignoring top-level entries %s beside %r", path, extra, key)
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})", "check the file")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = sorted(k for k in obj if k not in tensors)
    if dropped:
        log.info("%s: dropping %d non-tensor entries: %s", path, len(dropped), dropped)
    return tensors


def log_dropped(what: str, keys: Iterable[str]) -> None:
    """Report every key that a key map drops on purpose: a per-prefix count at INFO, every key at DEBUG."""
    keys = sorted(keys)
    if not keys:
        return
    groups: dict[str, int] = {}
    for key in keys:
        prefix = ".".join("*" if part.isdigit() else part for part in key.split(".")[:4])
        groups[prefix] = groups.get(prefix, 0) + 1
    log.info("%s: key map drops %d keys: %s", what, len(keys), ", ".join(f"{p}.* ({n})" for p, n in groups.items()))
    log.debug("%s: dropped keys: %s", what, keys)


def build_empty(factory: Callable[[], M]) -> M:
    """Build a module with parameters on ``meta`` (no memory, no init cost); buffers stay real on the CPU, so
    non-persistent buffers (masks, sinusoid tables) keep their computed values."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """``load_state_dict(strict=True, assign=True)`` with a one-line :class:`WeightsError` listing the mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{what}: state dict does not match the model ({len(missing)} missing e.g. {missing[:3]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, {len(shapes)} shape mismatches e.g. {shapes[:3]})",
            "the file is not the expected checkpoint; download it again with `python download_dataset.py --weights`",
        )
    module.load_state_dict(dict(state_dict), strict=True, assign=True)
    return module


def finish(module: M, device: torch.device | str, dtype: torch.dtype | None = None, frozen: bool = True) -> M:
    """Move a loaded module to the caller's device/dtype; frozen roles are put in eval mode without gradients."""
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise WeightsError(
            f"{type(module).__name__}: {len(leftover)} parameters were never loaded, e.g. {leftover[:3]}"
        )
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
    if frozen:
        module.eval().requires_grad_(False)
    return module


class ModuleRole:
    """Base of the role classes: ``device`` and ``dtype`` are those of the module in the attribute ``MAIN``."""

    MAIN = "model"

    @property
    def device(self) -> torch.device:
        return next(getattr(self, self.MAIN).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(getattr(self, self.MAIN).parameters()).dtype


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hf_from_pretrained(cls: Any, local_dir: Path, what: str, dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained(local_dir, local_files_only=True)`` that fails on missing or mismatched keys (strict)
    and logs unexpected ones; loader errors become :class:`WeightsError`."""
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = cls.from_pretrained(str(local_dir), local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise WeightsError(
            f"cannot load {what} from {local_dir} ({type(err).__name__}: {_first_line(err)})",
            "download it again with `python download_dataset.py --weights`",
        ) from err
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise WeightsError(
            f"{what} in {local_dir}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})",
            "the folder does not hold the expected checkpoint; download it again",
        )
    log_dropped(f"{what} (unexpected checkpoint keys)", info.get("unexpected_keys") or [])
    return model


def hf_model_and_processor(
    local_dir: Path,
    model_cls: Any,
    processor_cls: Any,
    what: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """A paper role's transformers model (strict :func:`hf_from_pretrained`, then :func:`finish`) and its processor
    from ``local_dir``; ``kwargs`` go to the model's ``from_pretrained``."""
    model = hf_from_pretrained(model_cls, local_dir, what, dtype, **kwargs)
    return finish(model, device, dtype), hf_processor(processor_cls, local_dir, what)


def hf_processor(cls: Any, local_dir: Path, what: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(str(local_dir), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise WeightsError(
            f"cannot load the {what} processor from {local_dir} ({_first_line(err)})",
            "download the repo's processor/tokenizer files with `python download_dataset.py --weights`",
        ) from err


def to_uint8_images(frames01: torch.Tensor) -> list[torch.Tensor]:
    """``(N, 3, H, W)`` in [0, 1] -> N uint8 ``(3, H, W)`` CPU tensors, truncating like ``ToPILImage`` (x*255 -> byte);
    uint8 input passes through."""
    if frames01.dtype != torch.uint8:
        frames01 = (frames01.detach().float().clamp(0, 1) * 255).to(torch.uint8)
    return list(frames01.cpu())


IMAGE_BACKENDS = ("torchvision", "pil")


def with_image_backend(processor: Any, backend: str) -> Any:
    """``processor`` (a transformers-5 image processor) on ``backend``: "torchvision" (what ``AutoImageProcessor``
    picks, resizing tensors with torchvision) or "pil" (the ``<Name>Pil`` class: PIL resizes, i.e. the slow processors
    of transformers 4 that upstream ran; they differ by up to one uint8 level per pixel, ``tests/test_metrics.py``).
    Same settings (``to_dict``); returned unchanged when already on ``backend``."""
    import transformers
    from transformers.image_processing_backends import PilBackend

    if backend not in IMAGE_BACKENDS:
        raise WeightsError(f"unknown image-processor backend {backend!r}; use one of {', '.join(IMAGE_BACKENDS)}")
    if isinstance(processor, PilBackend) == (backend == "pil"):
        return processor
    base = type(processor).__name__.removesuffix("Pil")
    cls = getattr(transformers, base + "Pil" if backend == "pil" else base, None)
    if cls is None:
        raise WeightsError(f"transformers has no {backend} backend for {type(processor).__name__}")
    return cls.from_dict(processor.to_dict())
