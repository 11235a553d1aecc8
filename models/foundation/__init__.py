"""Pretrained foundation models ("roles") behind one interface per role.

How a stage gets a role::

    from models.foundation import build_role, foundation_impl, require_roles
    impl = foundation_impl(cfg.model.size)                                      # "paper" or "toy"
    require_roles(impl, cfg.paths.weights_root, ["clip", "vae"])                # preflight, before any work
    clip = build_role("clip", impl, cfg.paths.weights_root, device)             # -> ClipRole
    tokens = clip.image_tokens(frames01)                                        # (B, F, 256, 1664)

| role | class | paper weights | main methods |
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

Each role is one package, ``models/foundation/<role>/``: ``__init__.py`` holds its class and ``WEIGHTS`` (its paper
files), ``paper.py`` its paper loader ``build_paper`` with the key maps, ``toy.py`` its toy models (recipes,
pretraining and ``build_toy``). ``catalog.CATALOG`` gathers every role's ``WEIGHTS`` and ``registry.BUILDERS`` names
both builders of every role; ``common.py`` and ``toy/`` hold what the roles share.

Rules for every paper loader: local files only (no hub calls; ``from_pretrained``/``from_single_file`` only with
``local_files_only=True`` on folders under ``weights_root``); explicit key maps; strict loads; dropped keys logged;
missing or corrupt files raise :class:`utils.errors.WeightsError` with a one-line cause and fix.

A toy builder takes the paper builder's arguments ``(weights_root, device, dtype, **options)`` and returns the same
role class wrapping tiny instances of the same library classes. Sizes a stage needs are read from the role object
(``ClipRole.num_tokens`` / ``token_dim`` / ``text_dim``, ``VaeRole.latent_channels`` / ``downsample``,
``Gpt2Role.hidden_size`` ...), never copied as literals.
"""

from models.foundation.catalog import (
    CATALOG,
    ROLES,
    WeightFile,
    catalog_rows,
    catalog_table,
    describe_missing,
    missing_weights,
    require_weights,
)
from models.foundation.registry import (
    BUILDERS,
    IMPLS,
    Impl,
    build_role,
    foundation_impl,
    require_roles,
    role_fingerprint,
)

__all__ = [
    "BUILDERS",
    "CATALOG",
    "IMPLS",
    "ROLES",
    "Impl",
    "WeightFile",
    "build_role",
    "catalog_rows",
    "catalog_table",
    "describe_missing",
    "foundation_impl",
    "missing_weights",
    "require_weights",
    "require_roles",
    "role_fingerprint",
]
