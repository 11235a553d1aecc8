"""Toy ``blip2`` role: a tiny ``Blip2ForConditionalGeneration`` (ViT + Q-Former + OPT) trained to caption single
frames of the toy world's TRAINING split; greedy decoding like the paper captioner.

* Tokenizer: a byte-level ``GPT2Tokenizer`` built in memory, whose merges spell every word of the training captions
  as one token (``"Ġ" + word``, ``add_prefix_space=True``); any other text still tokenises, byte by byte.
  ``<|endoftext|>`` (id 0) is BOS, EOS and padding; ``<image>`` is the image placeholder token.
* Training sequence, as ``generate`` starts it: ``num_query_tokens`` x ``<image>``, BOS, the caption, EOS; the loss is
  the next-token cross-entropy on the caption and its EOS. Frames go through the input mapping of the saved
  ``BlipImageProcessor`` (uint8, resize to the world's resolution, mean/std 0.5).
* Decoding uses ``generate()``'s defaults like the paper role: greedy, at most 20 new tokens (toy captions have at
  most 16 words + EOS; transformers warns that it uses its default length).

Files in ``weights_root/blip2/``: ``save_pretrained`` of the model and of the ``Blip2Processor`` (image processor +
tokenizer), ``manifest.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from models.foundation.blip2 import Blip2Role
from models.foundation.frame_classifier.toy import processor_inputs
from models.foundation.toy.common import (
    TrainRecipe,
    generator,
    load_hf_model,
    random_frames,
    save_hf_model,
    train,
)
from models.foundation.toy.data import Stimuli

if TYPE_CHECKING:
    from transformers import Blip2ForConditionalGeneration

log = logging.getLogger(__name__)

SPECIAL = "<|endoftext|>"  # id 0: BOS = EOS = padding
IMAGE_TOKEN = "<image>"
SPACE = "\u0120"  # "Ġ": GPT-2's byte symbol of " "


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build each ``"Ġ" + word`` left to right (shared prefixes once, in first-use order)."""
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        piece = SPACE + word
        for i in range(2, len(piece) + 1):
            merges.setdefault((piece[: i - 1], piece[i - 1]), None)
    return list(merges)


def make_tokenizer(captions: list[str]) -> Any:
    """In-memory byte-level BPE ``GPT2Tokenizer`` with one token per (lower-case ASCII) word of ``captions``."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import GPT2Tokenizer

    words = sorted({w for c in captions for w in c.lower().split() if w.isascii() and w.isalpha()})
    merges = word_merges(words)
    vocab = {SPECIAL: 0}
    for symbol in [*bytes_to_unicode().values(), *(a + b for a, b in merges)]:
        vocab.setdefault(symbol, len(vocab))
    tok = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        add_prefix_space=True,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        unk_token=SPECIAL,
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


@dataclass(frozen=True)
class ToyBlip2Recipe:
    """Architecture and training of the toy BLIP-2 (vision ``(R / patch_size)^2`` patches + CLS)."""

    patch_size: int = 4
    width: int = 64
    vision_layers: int = 2
    qformer_layers: int = 1
    text_layers: int = 2
    heads: int = 4
    num_query_tokens: int = 8
    max_caption_tokens: int = 20  # generate()'s default budget of new tokens (as for the paper model)
    train: TrainRecipe = field(
        default_factory=lambda: TrainRecipe(steps=400, batch_size=32, lr=2e-3, weight_decay=0.01, warmup=40)
    )

    def hf_config(self, resolution: int, vocab_size: int, image_token: int) -> dict[str, Any]:
        """Keyword arguments of ``Blip2Config`` (JSON-able)."""
        common = {"hidden_size": self.width, "intermediate_size": 2 * self.width, "num_attention_heads": self.heads}
        return {
            "vision_config": {
                **common,
                "num_hidden_layers": self.vision_layers,
                "image_size": resolution,
                "patch_size": self.patch_size,
            },
            "qformer_config": {
                **common,
                "num_hidden_layers": self.qformer_layers,
                "encoder_hidden_size": self.width,
                "vocab_size": 8,
                "cross_attention_frequency": 1,
            },
            "text_config": {
                "model_type": "opt",
                "hidden_size": self.width,
                "ffn_dim": 2 * self.width,
                "num_attention_heads": self.heads,
                "num_hidden_layers": self.text_layers,
                "vocab_size": vocab_size,
                "word_embed_proj_dim": self.width,
                "max_position_embeddings": 2 * (self.num_query_tokens + 2 + self.max_caption_tokens),
                "bos_token_id": 0,
                "eos_token_id": 0,
                "pad_token_id": 0,
            },
            "num_query_tokens": self.num_query_tokens,
            "image_token_index": image_token,
        }


RECIPES: dict[str, ToyBlip2Recipe] = {
    "toy": ToyBlip2Recipe(),
    "smoke": ToyBlip2Recipe(
        patch_size=8,
        width=32,
        vision_layers=1,
        text_layers=1,
        heads=2,
        num_query_tokens=4,
        train=TrainRecipe(steps=300, batch_size=16, lr=4e-3, weight_decay=0.01, warmup=30),
    ),
}


def make_processor(tokenizer: Any, resolution: int, num_query_tokens: int) -> Any:
    from transformers import Blip2Processor, BlipImageProcessor

    images = BlipImageProcessor(
        size={"height": resolution, "width": resolution}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


def caption_batch(tokenizer: Any, captions: list[str], recipe: ToyBlip2Recipe) -> tuple[torch.Tensor, ...]:
    """-> ``ids (N, L)`` = image tokens, BOS, caption, EOS, padding; ``mask (N, L)``; ``labels (N, L)`` (caption and
    EOS ids, else -100). ``L = num_query_tokens + 2 + max_caption_tokens``."""
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    q, n = recipe.num_query_tokens, recipe.max_caption_tokens
    ids = torch.zeros(len(captions), q + 2 + n, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, caption in enumerate(captions):
        words = tokenizer(caption.lower(), add_special_tokens=False).input_ids[:n] + [0]
        ids[row, :q] = image
        ids[row, q + 1 : q + 1 + len(words)] = torch.tensor(words)
        labels[row, q + 1 : q + 1 + len(words)] = torch.tensor(words)
        mask[row, : q + 1 + len(words)] = 1
    return ids, mask, labels


def caption_loss(
    model: Blip2ForConditionalGeneration,
    pixels: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Next-token cross-entropy on the labelled positions (``pixels (B, 3, R, R)`` normalised, the rest ``(B, L)``)."""
    logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    return F.cross_entropy(logits[keep].float(), target[keep])


def train_blip2(
    stim: Stimuli, recipe: ToyBlip2Recipe, seed: int, progress: bool
) -> tuple[Blip2ForConditionalGeneration, Any, dict[str, Any]]:
    """Train on (random frame of a random training clip, its caption) -> (model, tokenizer, stats)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    gen = generator(seed)
    tokenizer = make_tokenizer(stim.captions)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model = Blip2ForConditionalGeneration(
        Blip2Config(**recipe.hf_config(stim.resolution, len(tokenizer), image_token))
    )
    ids, mask, labels = caption_batch(tokenizer, stim.captions, recipe)

    def loss_fn(step: int) -> torch.Tensor:
        clips, frames = random_frames(stim, recipe.train.batch_size, gen)
        return caption_loss(model, processor_inputs(frames), ids[clips], mask[clips], labels[clips])

    stats = train(model, loss_fn, recipe.train, "toy blip2", progress)
    return model, tokenizer, {**stats, "vocab_size": len(tokenizer)}


def build(stim: Stimuli, folder: Path, scale: str, seed: int, progress: bool) -> dict[str, Any]:
    """Train the toy BLIP-2; save model and processor (image processor + tokenizer) into ``folder``."""
    recipe = RECIPES[scale]
    model, tokenizer, stats = train_blip2(stim, recipe, seed, progress)
    save_hf_model(model, make_processor(tokenizer, stim.resolution, recipe.num_query_tokens), folder)
    return stats


def build_toy(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> Blip2Role:
    """The toy/smoke BLIP-2 from ``weights_root/blip2/``."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    classes = (Blip2ForConditionalGeneration, Blip2Processor)
    return Blip2Role(*load_hf_model(weights_root, "blip2", "BLIP-2", classes, device, dtype))
