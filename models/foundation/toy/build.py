"""``build_toy_weights``: pretrain every toy foundation model on a toy world's training split into ``weights_root``.

Order and dependencies: ``clip`` -> ``vae`` -> ``gpt2`` -> ``unclip`` (trained on the frozen toy clip tokens and toy
VAE latents, so its config hash includes theirs) -> ``frame_classifier`` -> ``video_classifier`` -> ``clip_pcc`` ->
``blip2`` -> ``video`` (trained in the frozen toy VAE's latent space; its hash includes the VAE's). The classifiers
read their labels from the world's training annotations; their manifests also record ``stats["test_eval"]``, their
accuracy on the world's ground-truth TEST clips (read only, never trained on; the ceiling of the stage-6 metrics that
use them). Each role's hash covers its recipe, the seed, the world's
config hash and :data:`~models.foundation.toy.common.TOY_VERSION`; a role whose folder holds a matching, intact
manifest is skipped, so a rerun on complete weights does nothing. Each role gets its own seed (``seed`` + a fixed
offset), so one role's weights do not depend on whether another was rebuilt. ``roles`` builds a subset (plus what
it depends on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.foundation.blip2 import toy as toy_blip2
from models.foundation.clip import toy as toy_clip
from models.foundation.clip_pcc import toy as toy_clip_pcc
from models.foundation.frame_classifier import toy as toy_frame_classifier
from models.foundation.gpt2 import toy as toy_gpt2
from models.foundation.toy.common import (
    is_complete,
    read_manifest,
    recipe_hash,
    role_dir,
    staged_role_dir,
    torch_threads,
)
from models.foundation.toy.data import Stimuli, load_stimuli
from models.foundation.unclip import toy as toy_unclip
from models.foundation.vae import toy as toy_vae
from models.foundation.video import toy as toy_video
from models.foundation.video_classifier import toy as toy_video_classifier
from utils.errors import ConfigError

log = logging.getLogger(__name__)

SCALES = ("toy", "smoke")
ROLES = ("clip", "vae", "gpt2", "unclip", "frame_classifier", "video_classifier", "clip_pcc", "blip2", "video")
DEPENDS: dict[str, tuple[str, ...]] = {"unclip": ("clip", "vae"), "video": ("vae",)}
SEED_OFFSET = {role: i for i, role in enumerate(ROLES)}
RECIPES: dict[str, dict[str, Any]] = {
    "clip": toy_clip.RECIPES,
    "vae": toy_vae.RECIPES,
    "gpt2": toy_gpt2.RECIPES,
    "unclip": toy_unclip.RECIPES,
    "frame_classifier": toy_frame_classifier.RECIPES,
    "video_classifier": toy_video_classifier.RECIPES,
    "clip_pcc": toy_clip_pcc.RECIPES,
    "blip2": toy_blip2.RECIPES,
    "video": toy_video.RECIPES,
}


def role_hashes(world_hash: str, scale: str, seed: int) -> dict[str, str]:
    """Config hash of every role (dependents include their dependencies' hashes)."""
    hashes: dict[str, str] = {}
    for role in ROLES:
        deps = {d: hashes[d] for d in DEPENDS.get(role, ())}
        hashes[role] = recipe_hash(
            role=role,
            scale=scale,
            recipe=RECIPES[role][scale],
            seed=seed + SEED_OFFSET[role],
            world=world_hash,
            deps=deps,
        )
    return hashes


def with_dependencies(roles: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``roles`` plus everything they depend on, in build order (:class:`ConfigError` for an unknown role)."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown toy roles {unknown}", f"use some of {', '.join(ROLES)}")
    wanted = set(roles)
    for role in reversed(ROLES):
        if role in wanted:
            wanted |= set(DEPENDS.get(role, ()))
    return tuple(r for r in ROLES if r in wanted)


def _builder(role: str, weights_root: Path, world_root: Path) -> Callable[..., dict[str, Any]]:
    if role in ("frame_classifier", "video_classifier"):
        module = toy_frame_classifier if role == "frame_classifier" else toy_video_classifier

        def build_classifier(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
            from models.foundation.toy.evaluate import classifier_test_eval  # it imports this module

            stats = module.build(stim, folder, scale, seed, progress, world_root)
            return {**stats, "test_eval": classifier_test_eval(role, folder, world_root)}

        return build_classifier
    if role == "video":

        def build_video(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
            return toy_video.build(stim, folder, scale, seed, progress, toy_vae.build_toy(weights_root, "cpu"))

        return build_video
    if role == "unclip":

        def build_unclip(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
            clip = toy_clip.load_clip(role_dir(weights_root, "clip"))
            vae = toy_vae.build_toy(weights_root, "cpu")
            return toy_unclip.build(stim, folder, scale, seed, progress, clip, vae)

        return build_unclip
    return {
        "clip": toy_clip.build,
        "vae": toy_vae.build,
        "gpt2": toy_gpt2.build,
        "clip_pcc": toy_clip_pcc.build,
        "blip2": toy_blip2.build,
    }[role]


def build_toy_weights(
    world_root: str | Path,
    weights_root: str | Path,
    scale: str = "toy",
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = None,
    roles: tuple[str, ...] | list[str] | None = None,
) -> dict[str, Any]:
    """Build (or keep) every toy role (or only ``roles`` and their dependencies) under ``weights_root/<role>/`` from
    ``world_root``'s training split.

    Returns ``{"scale", "seed", "world_hash", "seconds", "roles": {role: {"built": bool, "seconds", "config_hash",
    **training stats}}}``. Deterministic for a given seed, world and thread count (``num_threads``: torch CPU threads
    during the build, None = unchanged).
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown toy weights scale {scale!r}", f"use one of {', '.join(SCALES)}")
    todo = with_dependencies(ROLES if roles is None else tuple(roles))
    with torch_threads(num_threads):
        return _build_all(Path(world_root), Path(weights_root), scale, seed, progress, todo)


def _build_all(
    world_root: Path, weights_root: Path, scale: str, seed: int, progress: bool, roles: tuple[str, ...]
) -> dict[str, Any]:
    start = time.perf_counter()
    stim = load_stimuli(world_root, "train")
    hashes = role_hashes(stim.world_hash, scale, seed)
    out: dict[str, Any] = {"scale": scale, "seed": seed, "world_hash": stim.world_hash, "roles": {}}
    for role in roles:
        folder = role_dir(weights_root, role)
        if is_complete(folder, hashes[role]):
            log.info("toy %s: up to date in %s", role, folder)
            out["roles"][role] = {
                **(read_manifest(folder) or {}).get("stats", {}),
                "built": False,
                "config_hash": hashes[role],
            }
            continue
        t0 = time.perf_counter()
        info: dict[str, Any] = {"scale": scale, "seed": seed + SEED_OFFSET[role], "world_hash": stim.world_hash}
        with staged_role_dir(weights_root, role, hashes[role], info) as tmp:
            build = _builder(role, weights_root, world_root)
            info["stats"] = build(stim, tmp, scale, seed + SEED_OFFSET[role], progress)
            info["stats"]["build_seconds"] = round(time.perf_counter() - t0, 2)
        log.info("toy %s: built in %.1f s -> %s", role, time.perf_counter() - t0, folder)
        out["roles"][role] = {**info["stats"], "built": True, "config_hash": hashes[role]}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out
