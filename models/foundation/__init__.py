"""Pretrained foundation models ("roles") behind one interface per role.

How a stage gets a role::

    from models.foundation import build_role, require_roles
    require_roles(cfg.profile_kind, cfg.weights_root, ["clip", "vae"])      # preflight, before any work
    clip = build_role("clip", cfg.profile_kind, cfg.weights_root, device)   # -> ClipRole
    tokens = clip.image_tokens(frames01)                                    # (B, F, 256, 1664)

| role | class (module) | paper weights | main methods |
|---|---|---|---|
| clip | ``ClipRole`` | OpenCLIP ViT-bigG/14 laion2b_s39b_b160k | ``image_tokens``, ``text_pooled``, ``tokenize`` |
| vae | ``VaeRole`` | SD-1.5 VAE | ``encode``, ``decode`` |
| unclip | ``UnclipRole`` | MindEye2 ``unclip6_epoch0_step110000.ckpt`` | ``reconstruct``, ``sample_latents`` |
| video | ``VideoRole`` | AnimateDiff v3 mm + adapter + SparseCtrl-RGB, RealisticVision | ``generate`` and parts |
| gpt2 | ``Gpt2Role`` | ``openai-community/gpt2`` | ``model``, ``embed_tokens`` |
| blip2 | ``Blip2Role`` | ``Salesforce/blip2-opt-2.7b`` | ``caption`` |
| frame_classifier | ``FrameClassifierRole`` | ``google/vit-base-patch16-224`` | ``probs`` |
| video_classifier | ``VideoClassifierRole`` | ``MCG-NJU/videomae-base-finetuned-kinetics`` | ``probs`` |
| clip_pcc | ``ClipPccRole`` | ``openai/clip-vit-large-patch14`` | ``image_features`` |

Each role lives in ``models/foundation/<role>.py``.

Rules for every paper loader: local files only (no hub calls; ``from_pretrained``/``from_single_file`` only with
``local_files_only=True`` on folders under ``weights_root``); explicit key maps; strict loads; dropped keys logged;
missing or corrupt files raise :class:`utils.errors.WeightsError` with a one-line cause and fix. The file list is
``catalog.CATALOG``.

Toy builders (later step): register ``@register(role, "toy")`` (and ``"smoke"``) in the role's module; the builder
takes ``(weights_root, device, dtype, **options)`` and returns the SAME role class wrapping tiny instances of the same
library classes (each role module's docstring names them). All sizes a stage needs are read from the role object
(``token_dim``, ``num_tokens``, ``text_dim``, ``latent_channels``...), never copied as literals.
"""

from models.foundation.catalog import (
    CATALOG,
    ROLES,
    WeightFile,
    catalog_rows,
    describe_missing,
    missing_weights,
    print_catalog,
    require_weights,
)
from models.foundation.registry import available, build_role, register, require_roles

__all__ = [
    "CATALOG",
    "ROLES",
    "WeightFile",
    "available",
    "build_role",
    "catalog_rows",
    "describe_missing",
    "missing_weights",
    "print_catalog",
    "register",
    "require_roles",
    "require_weights",
]
