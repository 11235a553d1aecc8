"""Toy and smoke builders of the foundation roles: tiny models of the same library classes, pretrained on the toy
world's training stimuli in minutes on 2 CPU cores, behind the same role classes as the paper weights.

Importing this package registers every ``toy``/``smoke`` builder with :mod:`models.foundation.registry`
(``clip``, ``vae``, ``gpt2``, ``unclip``, ``frame_classifier``, ``video_classifier``, ``clip_pcc``, ``blip2``,
``video``). :func:`build_toy_weights` writes the weights (the builders only load them);
:func:`evaluate_toy_weights` measures their quality on the world's test split.
"""

from models.foundation.toy import (  # noqa: F401  (registers the builders)
    blip2,
    clip,
    clip_pcc,
    frame_classifier,
    gpt2,
    unclip,
    vae,
    video,
    video_classifier,
)
from models.foundation.toy.build import build_toy_weights
from models.foundation.toy.evaluate import evaluate_toy_weights

__all__ = ["build_toy_weights", "evaluate_toy_weights"]
