"""Role ``blip2``: BLIP-2 OPT-2.7b keyframe captioner (stage 4; upstream §5).

``caption(frames01)``: ``(N, 3, H, W)`` in [0, 1] -> N strings. Like upstream: each frame becomes uint8 the way
``ToPILImage`` does it, no text prompt (unconditional captioning), ``generate()`` with the model's generation defaults
(greedy), decoded with special tokens skipped and stripped. Upstream ran fp16 (pass ``dtype=torch.float16``).

A toy builder returns ``Blip2Role(Blip2ForConditionalGeneration(tiny Blip2Config), Blip2Processor(...))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from models.foundation.common import ModuleRole, to_uint8_images
from models.foundation.weight_file import KB, MB, WeightFile, hf_model, repo_files

if TYPE_CHECKING:
    from transformers import Blip2ForConditionalGeneration

BLIP2_REPO = "Salesforce/blip2-opt-2.7b"
BLIP2_REVISION = "51572668da0eb669e01a189dc22abe6088589a24"
# The keyframe captioner at upstream's pinned revision: the safetensors index and both shards it names (the hub's file
# listing at that revision: 10 GB + 5.5 GB, fp32; the index's total_size is 15,493,505,024 bytes). transformers needs
# every shard, so each one is an entry of its own; the .bin layout of the same revision also counts.
BLIP2_SHARDS = {f"model-0000{i}-of-00002.safetensors": f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)}
WEIGHTS: tuple[WeightFile, ...] = hf_model(
    "blip2",
    BLIP2_REPO,
    {
        "config.json": 7 * KB,
        "model.safetensors.index.json": 127 * KB,
        "model-00001-of-00002.safetensors": 10_000 * MB,
        "model-00002-of-00002.safetensors": 5_500 * MB,
        "preprocessor_config.json": 1 * KB,
        "tokenizer_config.json": 1 * KB,
        "tokenizer.json": 2 * MB,
        "special_tokens_map.json": 1 * KB,
    },
    revision=BLIP2_REVISION,
    alternatives={
        "model.safetensors.index.json": repo_files(BLIP2_REPO, "pytorch_model.bin.index.json"),
        **{shard: repo_files(BLIP2_REPO, alt) for shard, alt in BLIP2_SHARDS.items()},
        "tokenizer.json": repo_files(BLIP2_REPO, "vocab.json"),
    },
)


class Blip2Role(ModuleRole):
    def __init__(self, model: Blip2ForConditionalGeneration, processor: Any):
        self.model = model
        self.processor = processor

    @torch.no_grad()
    def caption(self, frames01: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """``(N, 3, H, W)`` in [0, 1] (or uint8) -> N captions."""
        inputs = self.processor(images=to_uint8_images(frames01), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
        ids = self.model.generate(pixel_values=pixels, **kwargs)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]
