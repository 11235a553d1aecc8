"""How a stage gets a foundation role: ``build_role(role, profile_kind, weights_root, device)``.

Each role module registers one builder per profile kind with :func:`register`. The ``paper`` builders load the real
upstream weights from ``weights_root`` (local files only). ``toy`` (and ``smoke``) builders are a later step: they
must return an instance of the SAME role class, wrapping tiny models of the same library classes, so that stages never
branch on the profile.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.foundation.catalog import ROLES, require_weights
from utils.errors import WeightsError

log = logging.getLogger(__name__)

# builder(weights_root, device, dtype, **options) -> role object
Builder = Callable[..., Any]

_BUILDERS: dict[tuple[str, str], Builder] = {}

# role -> module that holds its interface and builders
ROLE_MODULES: dict[str, str] = {role: f"models.foundation.{role}" for role in ROLES}

PROFILE_KINDS = ("paper", "toy", "smoke")


def register(role: str, kind: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn`` as the ``kind`` builder of ``role``."""
    if role not in ROLE_MODULES or kind not in PROFILE_KINDS:
        raise ValueError(f"unknown role/kind {role!r}/{kind!r}")

    def deco(fn: Builder) -> Builder:
        _BUILDERS[(role, kind)] = fn
        return fn

    return deco


def _load_role_module(role: str) -> None:
    if role not in ROLE_MODULES:
        raise WeightsError(f"unknown foundation role {role!r}", f"use one of {sorted(ROLE_MODULES)}")
    importlib.import_module(ROLE_MODULES[role])
    toy_module = f"models.foundation.toy.{role}"  # the in-house toy builders, where the role has them
    if importlib.util.find_spec(toy_module) is not None:
        importlib.import_module(toy_module)


def available(role: str) -> list[str]:
    """Profile kinds that have a builder for ``role``."""
    _load_role_module(role)
    return [k for k in PROFILE_KINDS if (role, k) in _BUILDERS]


def build_role(
    role: str,
    profile_kind: str,
    weights_root: str | Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Any:
    """Build the ``role`` object for ``profile_kind`` ("paper" | "toy" | "smoke") on ``device``.

    For ``paper`` every file of the role must be under ``weights_root`` first; otherwise a one-line
    :class:`WeightsError` names them all before anything is loaded. ``options`` go to the role's builder
    (e.g. ``per_frame_norm=False`` for video, ``allow_unsafe_pickle=True`` for unclip).
    """
    _load_role_module(role)
    if profile_kind == "paper":
        require_weights(weights_root, [role])
    builder = _BUILDERS.get((role, profile_kind))
    if builder is None:
        raise WeightsError(
            f"no {profile_kind!r} builder for foundation role {role!r} (have {available(role)})",
            "toy/smoke builders are added with the toy weights (see models/foundation/__init__.py)",
        )
    log.info("building foundation role %s (%s) from %s on %s", role, profile_kind, weights_root, device)
    return builder(Path(weights_root), device, dtype, **options)


def require_roles(profile_kind: str, weights_root: str | Path, roles: list[str] | tuple[str, ...]) -> None:
    """Stage preflight: raise before any work if a ``paper`` role lacks a file (no-op for other kinds)."""
    if profile_kind == "paper":
        require_weights(weights_root, list(roles))
