"""Paper loader of role ``video_classifier``: VideoMAE-B Kinetics-400 from its local folder, ``num_frames`` frames."""

from __future__ import annotations

from pathlib import Path

import torch

from models.foundation.catalog import hf_dir
from models.foundation.common import hf_model_and_processor
from models.foundation.video_classifier import PAPER_NUM_FRAMES, VideoClassifierRole


def build_paper(
    weights_root: Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    num_frames: int = PAPER_NUM_FRAMES,
    **_: object,
) -> VideoClassifierRole:
    from transformers import AutoImageProcessor, VideoMAEForVideoClassification

    local = hf_dir(weights_root, "video_classifier")
    parts = hf_model_and_processor(
        local, VideoMAEForVideoClassification, AutoImageProcessor, "VideoMAE", device, dtype, num_frames=num_frames
    )
    return VideoClassifierRole(*parts)
