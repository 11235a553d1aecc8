"""How a stage gets a foundation role: ``build_role(role, impl, weights_root, device)``.

Every role has two implementations behind the same role class, so that stages never branch on the profile:

- ``paper``: the upstream weights, loaded from ``weights_root`` (local files only) by
  ``models.foundation.<role>.paper.build_paper``;
- ``toy``: tiny models of the same library classes, pretrained on the toy world and loaded from
  ``weights_root/<role>/`` by ``models.foundation.<role>.toy.build_toy`` (the ``toy`` and ``smoke`` profiles differ
  only in the size of those weights).

:data:`BUILDERS` names both builders of every role.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from models.foundation.blip2 import paper as blip2_paper
from models.foundation.blip2 import toy as blip2_toy
from models.foundation.catalog import entries, require_weights, resolve
from models.foundation.clip import paper as clip_paper
from models.foundation.clip import toy as clip_toy
from models.foundation.clip_pcc import paper as clip_pcc_paper
from models.foundation.clip_pcc import toy as clip_pcc_toy
from models.foundation.frame_classifier import paper as frame_classifier_paper
from models.foundation.frame_classifier import toy as frame_classifier_toy
from models.foundation.gpt2 import paper as gpt2_paper
from models.foundation.gpt2 import toy as gpt2_toy
from models.foundation.unclip import paper as unclip_paper
from models.foundation.unclip import toy as unclip_toy
from models.foundation.vae import paper as vae_paper
from models.foundation.vae import toy as vae_toy
from models.foundation.video import paper as video_paper
from models.foundation.video import toy as video_toy
from models.foundation.video_classifier import paper as video_classifier_paper
from models.foundation.video_classifier import toy as video_classifier_toy
from utils.errors import WeightsError
from utils.io import file_fingerprint

log = logging.getLogger(__name__)

Impl = Literal["paper", "toy"]
IMPLS: tuple[Impl, ...] = ("paper", "toy")

# builder(weights_root, device, dtype, **options) -> the role object
Builder = Callable[..., Any]

BUILDERS: dict[str, dict[Impl, Builder]] = {
    "clip": {"paper": clip_paper.build_paper, "toy": clip_toy.build_toy},
    "vae": {"paper": vae_paper.build_paper, "toy": vae_toy.build_toy},
    "unclip": {"paper": unclip_paper.build_paper, "toy": unclip_toy.build_toy},
    "video": {"paper": video_paper.build_paper, "toy": video_toy.build_toy},
    "gpt2": {"paper": gpt2_paper.build_paper, "toy": gpt2_toy.build_toy},
    "blip2": {"paper": blip2_paper.build_paper, "toy": blip2_toy.build_toy},
    "frame_classifier": {"paper": frame_classifier_paper.build_paper, "toy": frame_classifier_toy.build_toy},
    "video_classifier": {"paper": video_classifier_paper.build_paper, "toy": video_classifier_toy.build_toy},
    "clip_pcc": {"paper": clip_pcc_paper.build_paper, "toy": clip_pcc_toy.build_toy},
}


def foundation_impl(model_size: str) -> Impl:
    """The foundation implementation a profile uses: ``paper`` weights with the paper-size brain model, the ``toy``
    models with the ``toy`` and ``smoke`` sizes (their dimensions follow from those models)."""
    return "paper" if model_size == "paper" else "toy"


def build_role(
    role: str,
    impl: Impl,
    weights_root: str | Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Any:
    """Build the ``role`` object of implementation ``impl`` ("paper" | "toy") on ``device``.

    For ``paper`` every file of the role must be under ``weights_root`` first; otherwise a one-line
    :class:`WeightsError` names them all before anything is loaded. ``options`` go to the role's builder
    (e.g. ``per_frame_norm=False`` for video, ``allow_unsafe_pickle=True`` for unclip).
    """
    if role not in BUILDERS or impl not in IMPLS:
        raise WeightsError(f"unknown foundation role/implementation {role!r}/{impl!r}",
                           f"use a role of {list(BUILDERS)} and one of {list(IMPLS)}")  # fmt: skip
    if impl == "paper":
        require_weights(weights_root, [role])
    log.info("building foundation role %s (%s) from %s on %s", role, impl, weights_root, device)
    return BUILDERS[role][impl](Path(weights_root), device, dtype, **options)


def require_roles(impl: Impl, weights_root: str | Path, roles: list[str] | tuple[str, ...]) -> None:
    """Stage preflight: raise before any work if a ``paper`` role lacks a file (no-op for the toy models)."""
    if impl == "paper":
        require_weights(weights_root, list(roles))


def role_fingerprint(role: str, impl: Impl, weights_root: str | Path) -> dict[str, dict[str, Any]]:
    """Size and mtime of every file foundation ``role`` of ``impl`` is built from (paths relative to
    ``weights_root``): the paper catalog's files, or every file of the toy role's folder."""
    root = Path(weights_root)
    if impl == "paper":
        files = [p for p in (resolve(e, root) for e in entries([role])) if p is not None]
    else:
        files = sorted(p for p in (root / role).rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): file_fingerprint(p) for p in files}
