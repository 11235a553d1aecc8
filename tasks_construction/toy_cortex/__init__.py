"""The toy cortex: a procedurally generated movie world with simulated fMRI from a known encoding model.

It writes exactly the files and formats of the preprocessed cc2017 data (read by :mod:`utils.data`), so every stage
runs on it unchanged. Entry point: ``build_world(cfg, out_dir)`` (called by ``download_dataset.py --toy``).
"""

from typing import Any

from tasks_construction.toy_cortex.config import (
    PRESETS,
    SMOKE_PRESET,
    TOY_PRESET,
    ToyWorldConfig,
    config_hash,
    make_config,
    validate_config,
)

__all__ = [
    "PRESETS",
    "SMOKE_PRESET",
    "TOY_PRESET",
    "ToyWorldConfig",
    "build_world",
    "config_hash",
    "make_config",
    "validate_config",
]


def __getattr__(name: str) -> Any:
    """Import the builder (numpy, torch, nilearn) only when it is used, so configs stay cheap to import."""
    if name == "build_world":
        from tasks_construction.toy_cortex.build import build_world

        return build_world
    raise AttributeError(name)
