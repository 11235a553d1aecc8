"""A smoke world ready for stages 1 and 2: toy weights, caption embeddings, the tokens projection and a profile.

Shared by ``test_stage1.py`` and ``test_stage2.py`` (built once per test session). The smoke toy weights take minutes
to pretrain on 2 CPU cores, so the repository's ``pretrained_weights/toy_smoke`` is used when it holds up-to-date
clip / vae / gpt2 weights for this world (checked by their manifests' config hashes); otherwise they are built.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPO_SMOKE_WEIGHTS = REPO / "pretrained_weights" / "toy_smoke"
ROLES = ("clip", "vae", "gpt2")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmokeEnv:
    world: Path
    weights: Path
    exp_root: Path
    profile: Path  # a YAML profile (extends smoke) pointing at the three folders above


@functools.cache
def built_smoke_weights(world: Path) -> tuple[Path, dict]:
    """Every smoke toy role for ``world``, built once per test session beside it (1 thread, minutes); the build's
    summary comes with it (``tests/test_foundation_toy.py`` checks it)."""
    from models.foundation.toy.build import build_toy_weights

    root = world.parent / "toy_smoke_weights"
    summary = build_toy_weights(world, root, "smoke", seed=0, progress=False, num_threads=1)
    return root, summary


def smoke_weights(world: Path, roles: tuple[str, ...] = ROLES) -> Path:
    """The repository's ``pretrained_weights/toy_smoke`` when it holds up-to-date ``roles`` for ``world``, else the
    session's build (:func:`built_smoke_weights`)."""
    from models.foundation.toy.build import role_hashes
    from models.foundation.toy.common import is_complete, role_dir
    from models.foundation.toy.data import world_hash

    hashes = role_hashes(world_hash(world), "smoke", 0)
    if all(is_complete(role_dir(REPO_SMOKE_WEIGHTS, r), hashes[r]) for r in roles):
        return REPO_SMOKE_WEIGHTS
    log.warning("no up-to-date smoke toy weights in %s; building them once for the session", REPO_SMOKE_WEIGHTS)
    return built_smoke_weights(world)[0]


@functools.cache
def smoke_env(world: Path, scratch: Path) -> SmokeEnv:
    """Weights, caption embeddings and tokens projection for ``world`` (a copy owned by the test session)."""
    from models.foundation import build_role
    from tasks_construction import gen_GT_clip_embeds

    scratch.mkdir(parents=True, exist_ok=True)
    weights = smoke_weights(world)
    gen_GT_clip_embeds.run(world, build_role("clip", "toy", weights, "cpu"))
    gen_GT_clip_embeds.copy_toy_tokens_proj(weights, world)
    exp_root = scratch / "EXP"
    profile = scratch / "smoke_test.yaml"
    profile.write_text(
        "extends: smoke\n"
        f"paths:\n  data_root: {world}\n  weights_root: {weights}\n  exp_root: {exp_root}\n"
        "run:\n  device: cpu\n"
    )
    return SmokeEnv(world, weights, exp_root, profile)


# ---- helpers shared by the stage tests (test_stage3, test_stage4, ...) ---------------------------------------------
def stage_config(env: SmokeEnv, stage: str, exp: str, *overrides: str, mode: str = "enhance"):
    """The resolved config of ``stage`` for run ``exp`` under ``env.profile``."""
    from utils.config import load_config
    from utils.stage_configs import STAGE_CONFIGS

    return load_config(STAGE_CONFIGS[stage], str(env.profile), list(overrides), {"exp": exp, "mode": mode})


def run_paths(env: SmokeEnv, exp: str, mode: str = "enhance"):
    """The ``RunPaths`` of run ``exp`` (subject 1)."""
    from utils.runs import RunPaths

    return RunPaths.from_config(stage_config(env, "3", exp, mode=mode))


def copy_stages(src: Path, dst: Path, folders: tuple[str, ...] = ("stage1", "stage2")) -> None:
    """Another run with the same outputs of ``folders`` (fingerprints kept: copytree preserves mtimes). Only
    folders whose manifests name no file of an earlier stage's folder stay fresh (stage 1 and 2 do)."""
    import shutil

    for folder in folders:
        shutil.copytree(src / folder, dst / folder)


def with_toy_roles(env: SmokeEnv, roles: tuple[str, ...], scratch: Path) -> SmokeEnv:
    """``env`` with a weights folder that also holds the smoke toy ``roles`` (1 thread, seconds each): ``env``'s roles
    are linked, not copied (a role of ``roles`` only when up to date; the others are built here), so the weights of
    ``env`` are never written to."""
    from models.foundation.toy.build import build_toy_weights, role_hashes
    from models.foundation.toy.common import is_complete
    from models.foundation.toy.data import world_hash

    hashes = role_hashes(world_hash(env.world), "smoke", 0)
    weights = scratch / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for role in env.weights.iterdir():  # the session's up-to-date roles are linked, not rebuilt
        current = role.name not in roles or is_complete(role, hashes.get(role.name, ""))
        if role.is_dir() and current and not (weights / role.name).exists():
            (weights / role.name).symlink_to(role.resolve(), target_is_directory=True)
    build_toy_weights(env.world, weights, "smoke", seed=0, progress=False, num_threads=1, roles=roles)
    profile = scratch / "smoke_roles.yaml"
    profile.write_text(f"extends: {env.profile}\npaths:\n  weights_root: {weights}\n")
    return SmokeEnv(env.world, weights, env.exp_root, profile)


def fmri_variant(env: SmokeEnv, scratch: Path, **world: object) -> SmokeEnv:
    """A copy of the smoke world that differs from ``env.world`` only in its simulated fMRI (``world`` keys of
    :class:`utils.toy_world.ToyWorldConfig`, e.g. ``snr=1.0``), ready for stages 1 and 2 with ``env``'s toy weights:
    their hash covers the stimuli, not the fMRI (checked here). Seconds to build."""
    from models.foundation import build_role
    from models.foundation.toy.data import world_hash
    from tasks_construction import find_key_obj, gen_GT_clip_embeds
    from tasks_construction.toy_cortex.build import build_world
    from utils.toy_world import make_config

    root = scratch / "toy_cortex_smoke"
    build_world(make_config("smoke", **world), root, progress=False)
    find_key_obj.run(root)
    if world_hash(root) != world_hash(env.world):
        raise AssertionError(f"{world} changed the smoke stimuli: {env.weights} does not fit them")
    gen_GT_clip_embeds.run(root, build_role("clip", "toy", env.weights, "cpu"))
    gen_GT_clip_embeds.copy_toy_tokens_proj(env.weights, root)
    profile = scratch / "smoke_variant.yaml"
    profile.write_text(f"extends: {env.profile}\npaths:\n  data_root: {root}\n  exp_root: {scratch / 'EXP'}\n")
    return SmokeEnv(root, env.weights, scratch / "EXP", profile)
