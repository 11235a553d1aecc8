"""Small NEURONS heads: frozen CLIP projection, motion projection, concept classifier, GPT-2 prefix captioner.

Also the two helpers behind the caption-padding (defect 21) and concept-name granularity (defect 22) fixes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from einops import rearrange
from torch import nn

from models.sizes import CaptionPad
from utils.errors import ConfigError, DataError

if TYPE_CHECKING:  # transformers is imported only where GPT-2 is built
    from transformers import GPT2LMHeadModel

IGNORE_INDEX = -100
EOT_ID = 49407  # CLIP-BPE end of text
UPSTREAM_PAD_ID = 0  # upstream zero-pads CLIP-BPE ids; id 0 is also the real token "!"


class CLIPProj(nn.Module):
    """Frozen map from CLIP image tokens to the caption-embedding space: mean over tokens, then @ proj.

    x (B, T, D) → (B, Dt). `proj` (D, Dt) comes from `coco_tokens_avg_proj.pth` (paper) or the toy foundation.
    """

    def __init__(self, clip_dim: int, text_dim: int):
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(clip_dim, text_dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1) @ self.proj


class MotionProj(nn.Module):
    """Expand prior tokens to per-frame tokens: (B, T, D) → (B, F, T, D).

    One Linear(D → D·F) per token; its outputs are read channel-major / frame-minor (feature index c·F + f).
    """

    def __init__(self, clip_dim: int, n_frames: int):
        super().__init__()
        self.n_frames = n_frames
        self.motion_proj = nn.Linear(clip_dim, clip_dim * n_frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.motion_proj(x), "b n (c f) -> b f n c", f=self.n_frames)


class MultiLabelClassifier(nn.Module):
    """Concept logits from motion tokens: mean over frames and tokens → Linear(D, Dt) → Linear(Dt, n_classes).

    x (B, F, T, D) → (B, n_classes). No non-linearity between the two linears (as upstream).
    """

    def __init__(self, clip_dim: int, text_dim: int, n_classes: int):
        super().__init__()
        self.vision_proj_channel = nn.Linear(clip_dim, text_dim)
        self.classifier = nn.Linear(text_dim, n_classes)

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        pooled = motion.mean(dim=(1, 2))  # (B, D)
        return self.classifier(self.vision_proj_channel(pooled))


class TextDecoder(nn.Module):
    """GPT-2 prefix captioner: one prefix token Linear(Dt → n_embd) before the caption token embeddings.

    `decoder` is a `transformers.GPT2LMHeadModel` (pretrained weights are loaded by the gpt2 foundation role).
    """

    def __init__(self, prefix_dim: int, decoder: GPT2LMHeadModel):
        super().__init__()
        self.decoder = decoder
        n_embd = decoder.config.n_embd
        self.clip_project = nn.Linear(prefix_dim, n_embd)

    def forward(
        self, prefix: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """prefix (B, Dt); tokens (B, L) int; attention_mask (B, L) bool/int or None → logits (B, L, V).

        logits[:, i] predicts tokens[:, i] (position 0, the prefix, predicts the first token). Masked positions may
        hold any value (e.g. -100); they are replaced by id 0 before the embedding lookup and masked out.
        """
        return self.decoder.lm_head(self.hidden(prefix, tokens, attention_mask))

    def hidden(
        self, prefix: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last hidden states that :meth:`forward` turns into logits: (B, L, E), position i predicts tokens[:, i].
        The LM head (E → V, 49,408-way for CLIP-BPE) is most of the caption cost; callers that need logits only at
        some positions apply ``decoder.lm_head`` to those rows alone."""
        if attention_mask is not None:
            tokens = torch.where(attention_mask.bool(), tokens, torch.zeros_like(tokens))
        tok_emb = self.decoder.transformer.wte(tokens)  # (B, L, E)
        pre = self.clip_project(prefix).unsqueeze(1).to(tok_emb.dtype)  # (B, 1, E)
        embeds = torch.cat((pre, tok_emb), dim=1)  # (B, L+1, E)
        mask = None
        if attention_mask is not None:
            ones = torch.ones_like(attention_mask[:, :1], dtype=torch.long)
            mask = torch.cat((ones, attention_mask.long()), dim=1)
        hidden = self.decoder.transformer(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, L+1, E)
        return hidden[:, :-1]

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, max_new_tokens: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding, batched. prefix (B, Dt) → (tokens (B, n) long, mask (B, n) bool).

        Each row is decoded causally without padding, so a row's result does not depend on the other rows.
        mask is True up to and including the first `eos_id`.
        """
        b = prefix.shape[0]
        embeds = self.clip_project(prefix).unsqueeze(1)  # (B, 1, E)
        tokens = torch.zeros(b, 0, dtype=torch.long, device=prefix.device)
        alive = torch.ones(b, dtype=torch.bool, device=prefix.device)
        mask = torch.zeros(b, 0, dtype=torch.bool, device=prefix.device)
        for _ in range(max_new_tokens):
            logits = self.decoder(inputs_embeds=embeds).logits[:, -1]  # (B, V)
            nxt = logits.argmax(dim=-1)
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)
            mask = torch.cat((mask, alive[:, None]), dim=1)
            alive = alive & (nxt != eos_id)
            if not alive.any():
                break
            embeds = torch.cat((embeds, self.decoder.transformer.wte(nxt)[:, None].to(embeds.dtype)), dim=1)
        return tokens, mask


def caption_labels(tokens: torch.Tensor, attention_mask: torch.Tensor | None, pad_mode: CaptionPad) -> torch.Tensor:
    """Targets for the caption cross-entropy, ignored positions = `IGNORE_INDEX` (-100). tokens (B, L) → (B, L).

    "dedicated": positions outside `attention_mask` are ignored (a real id 0 stays a target).
    "clip_zero": upstream, every id-0 position is ignored, pads and real "!" tokens alike (defect 21).
    """
    if pad_mode == "clip_zero":
        return torch.where(tokens == UPSTREAM_PAD_ID, torch.full_like(tokens, IGNORE_INDEX), tokens)
    if attention_mask is None:
        raise ValueError("caption_pad='dedicated' needs the tokenizer's attention mask")
    return torch.where(attention_mask.bool(), tokens, torch.full_like(tokens, IGNORE_INDEX))


ConceptNames = Literal["class", "fine", "upstream"]


@dataclass(frozen=True)
class ConceptNamer:
    """Which concept name the segmentation head's text embedding is computed from (defect 22).

    class_names: the n_classes concept-class names, in classifier-logit order.
    key_object_to_class: fine key-object name (e.g. "man") → its class name (e.g. "human"), from the data.
    mode:
      "class" (default): class names in training and at inference;
      "fine": fine key-object names in training; at inference the predicted class's `class_to_key_object` name
        (e.g. the class's most frequent training key object);
      "upstream": fine names in training, class names at inference (the upstream train/test mismatch).
    class_to_key_object: class name → the fine name used for it at inference in "fine" mode.
    no_object: the text for clips without a key object (upstream embeds the literal "None").
    """

    class_names: tuple[str, ...]
    key_object_to_class: Mapping[str, str] = field(default_factory=dict)
    mode: ConceptNames = "class"
    class_to_key_object: Mapping[str, str] = field(default_factory=dict)
    no_object: str = "None"

    def __post_init__(self) -> None:
        if self.mode not in ("class", "fine", "upstream"):
            raise ConfigError(f"bad concept-name mode {self.mode!r}", "use 'class', 'fine' or 'upstream'")

    def train_name(self, key_object: str | None) -> str:
        """Name for a training clip's key object (None or "None" = no key object)."""
        if key_object is None or key_object == "None":
            return self.no_object
        if self.mode in ("fine", "upstream") or key_object in self.class_names:
            return key_object
        if key_object not in self.key_object_to_class:
            raise DataError(
                f"key object {key_object!r} has no concept class",
                "add it to the key-object → class map built by tasks_construction",
            )
        return self.key_object_to_class[key_object]

    def infer_name(self, class_logits: torch.Tensor) -> list[str]:
        """Names for predicted clips from their arg-max concept class. class_logits (B, n_classes) → B names."""
        names = [self.class_names[i] for i in class_logits.argmax(dim=-1).tolist()]
        if self.mode != "fine":
            return names
        missing = sorted({n for n in names if n not in self.class_to_key_object})
        if missing:
            raise DataError(f"no key-object name for classes {missing}", "fill class_to_key_object from the train set")
        return [self.class_to_key_object[n] for n in names]


def key_object_classes(labels: torch.Tensor, names: Sequence[str], classes: Sequence[str]) -> dict[str, str]:
    """Fine key-object name → concept class, read off the training labels: the class with the highest lift
    P(class | key object) / P(class) among the classes present in every clip of that key object (its own concepts,
    the most specific first). Names that are class names map to themselves.

    labels (N, C) concept labels of the training clips; names: N key-object names ("None" = no key object);
    classes: the C class names."""
    labels = labels.bool()
    names_np = np.asarray(names)
    base = labels.float().mean(0).clamp(min=1e-6)  # (C,)
    out: dict[str, str] = {}
    for name in sorted(set(names_np) - {"None"} - set(classes)):
        rows = labels[torch.as_tensor(names_np == name)]  # (n_name, C)
        always = rows.all(0)
        lift = rows.float().mean(0) / base
        if always.any():
            lift = torch.where(always, lift, torch.zeros_like(lift))
        out[str(name)] = classes[int(lift.argmax())]
    return out
