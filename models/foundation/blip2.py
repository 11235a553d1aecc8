"""Role ``blip2``: BLIP-2 OPT-2.7b keyframe captioner (stage 4; upstream §5).

``caption(frames01)``: ``(N, 3, H, W)`` in [0, 1] -> N strings. Like upstream: each frame becomes uint8 the way
``ToPILImage`` does it, no text prompt (unconditional captioning), ``generate()`` with the model's generation defaults
(greedy), decoded with special tokens skipped and stripped. Upstream ran fp16 (pass ``dtype=torch.float16``).

A toy builder returns ``Blip2Role(Blip2ForConditionalGeneration(tiny Blip2Config), Blip2Processor(...))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.foundation.common import finish, hf_dir, hf_from_pretrained, hf_processor, to_uint8_images

if TYPE_CHECKING:
    from transformers import Blip2ForConditionalGeneration


class Blip2Role:
    def __init__(self, model: Blip2ForConditionalGeneration, processor: Any):
        self.model = model
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def caption(self, frames01: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """``(N, 3, H, W)`` in [0, 1] (or uint8) -> N captions."""
        inputs = self.processor(images=to_uint8_images(frames01), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
        ids = self.model.generate(pixel_values=pixels, **kwargs)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> Blip2Role:
    """``Salesforce/blip2-opt-2.7b`` (upstream revision 51572668) from its local folder."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    local = hf_dir(weights_root, "blip2")
    model = hf_from_pretrained(Blip2ForConditionalGeneration, local, "BLIP-2", dtype)
    return Blip2Role(finish(model, device, dtype), hf_processor(Blip2Processor, local, "BLIP-2"))
