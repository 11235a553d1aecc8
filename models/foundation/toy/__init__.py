"""Toy models of the foundation roles: tiny models of the same library classes, pretrained on the toy world's
training stimuli in minutes on 2 CPU cores, behind the same role classes as the paper weights.

``models/foundation/toy/<role>.py`` holds a role's recipes (one per scale, ``toy`` and ``smoke``), its pretraining
and its ``build_toy`` loader (named in :data:`models.foundation.registry.BUILDERS`). :func:`build_toy_weights` writes
the weights (the loaders only read them); :func:`evaluate_toy_weights` measures their quality on the world's test
split.
"""

from models.foundation.toy.build import build_toy_weights
from models.foundation.toy.evaluate import evaluate_toy_weights

__all__ = ["build_toy_weights", "evaluate_toy_weights"]
