"""Shared machinery of the toy foundation models: tiny models of the same library classes, pretrained on the toy
world's training stimuli in minutes on 2 CPU cores, behind the same role classes as the paper weights.

Each role's own toy recipes (one per scale, ``toy`` and ``smoke``), pretraining and ``build_toy`` loader live in
``models/foundation/<role>/toy.py`` (named in :data:`models.foundation.registry.BUILDERS`). Here:
:func:`~models.foundation.toy.build.build_toy_weights` writes the weights of every role (the loaders only read them),
:func:`~models.foundation.toy.evaluate.evaluate_toy_weights` measures their quality on the world's test split,
:mod:`~models.foundation.toy.common` holds the training loop, its sampling helpers and the role folders,
:mod:`~models.foundation.toy.data` the training stimuli. This package imports nothing itself, so the role modules can
use its helpers.
"""
