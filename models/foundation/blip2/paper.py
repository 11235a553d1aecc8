"""Paper loader of role ``blip2``: ``Salesforce/blip2-opt-2.7b`` (upstream revision) from its local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from models.foundation.blip2 import Blip2Role
from models.foundation.catalog import hf_dir
from models.foundation.common import hf_model_and_processor


def build_paper(
    weights_root: Path, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
) -> Blip2Role:
    """``Salesforce/blip2-opt-2.7b`` (upstream revision 51572668) from its local folder."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    local = hf_dir(weights_root, "blip2")
    parts = hf_model_and_processor(local, Blip2ForConditionalGeneration, Blip2Processor, "BLIP-2", device, dtype)
    return Blip2Role(*parts)
