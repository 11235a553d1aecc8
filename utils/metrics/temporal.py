"""Spatio-temporal consistency "CLIP-pcc" from per-frame CLIP image features of the *predicted* video (the
``clip_pcc`` role gives them; ground truth is not used in either protocol).

protocol="neurons" (upstream ``run_metrics.py``, defect 30): cosine-similarity matrix of the F frames, diagonal
  zeroed, summed and divided by F·(F−1) = mean cosine over all ordered frame pairs (not adjacent, not Pearson).
protocol="standard" (NeuroClips paper text, Mind-Animator ``CLIP_consist.py``): mean cosine of adjacent frames
  (t, t+1), t = 0..F−2. Mind-Animator additionally zeroes videos whose VIFI-CLIP similarity to the ground truth is
  ≤ 0.6; that gate needs a video-text model we do not ship and is not applied here.
A frozen video scores 1.0 in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.errors import DataError
from utils.metrics._common import Protocol, check_finite, check_min_size, check_protocol


def clip_pcc(features: torch.Tensor, protocol: Protocol = "standard") -> torch.Tensor:
    """features: (N, F, D) per-frame image features (unnormalised is fine) → (N,) float64 per-video consistency."""
    protocol = check_protocol(protocol)
    if features.ndim != 3:
        raise DataError(
            f"CLIP-pcc: features of shape {tuple(features.shape)}",
            "pass (videos, frames, dim) features, e.g. role.image_features(frames).view(N, F, -1)",
        )
    check_finite(features, "CLIP-pcc features")
    f = features.shape[1]
    check_min_size(f, 2, "CLIP-pcc frames per video", "score videos with at least 2 frames")
    unit = F.normalize(features.double(), dim=-1)
    if protocol == "neurons":
        gram = unit @ unit.transpose(1, 2)  # (N, F, F)
        off_diag = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
        return off_diag / (f * (f - 1))
    return (unit[:, :-1] * unit[:, 1:]).sum(dim=-1).mean(dim=1)
