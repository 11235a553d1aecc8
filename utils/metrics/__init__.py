"""Stage-6 metric library: small pure functions on tensors (no model loading; classifier scores and CLIP features are
computed by the foundation roles ``frame_classifier``, ``video_classifier``, ``clip_pcc`` and passed in).

Videos are float ``(N, F, 3, H, W)`` in [0, 1], prediction and ground truth of the same shape — never stitched GIFs.
Metrics whose definition depends on ``protocol`` ("neurons" = exactly as upstream NEURONS computes and reports them,
"standard" = the corrected / MinD-Video–Mind-Animator definitions, default): ``ssim``, ``psnr``, ``blurry_video_ssim``,
``clip_pcc``, ``summarise`` and ``evaluate_videos``. N-way accuracy and retrieval use one (seeded) rule in both; the
tasks metrics (F1, Dice, BLEU) have a single definition. Module docs give the exact settings; 95 % intervals and
``above_chance``: :mod:`utils.metrics.intervals`.
"""

from utils.metrics._common import PROTOCOLS, Protocol
from utils.metrics.intervals import (
    CI_KEY,
    CI_LEVEL,
    corpus_entry,
    is_above_chance,
    mark_chance,
    mark_shuffled,
    mean_interval,
    percentile_interval,
    resample_counts,
    wilson_interval,
)
from utils.metrics.pixel import blurry_video_ssim, psnr, ssim
from utils.metrics.semantic import (
    chance_level,
    chance_levels,
    n_way_accuracy,
    retrieval_accuracy,
    shuffled_n_way_accuracy,
)
from utils.metrics.summary import evaluate_videos, n_way_entries, summarise
from utils.metrics.tasks import (
    ConceptF1,
    F1Average,
    bleu_from_counts,
    caption_bleu,
    caption_bleu_counts,
    caption_bleu_per_sample,
    concept_f1,
    concept_f1_counts,
    dice_per_sample,
    f1_averages,
    normalise_caption,
)
from utils.metrics.temporal import clip_pcc

__all__ = [
    "CI_KEY",
    "CI_LEVEL",
    "PROTOCOLS",
    "ConceptF1",
    "F1Average",
    "Protocol",
    "bleu_from_counts",
    "blurry_video_ssim",
    "caption_bleu",
    "caption_bleu_counts",
    "caption_bleu_per_sample",
    "chance_level",
    "chance_levels",
    "clip_pcc",
    "concept_f1",
    "concept_f1_counts",
    "corpus_entry",
    "dice_per_sample",
    "evaluate_videos",
    "f1_averages",
    "is_above_chance",
    "mark_chance",
    "mark_shuffled",
    "mean_interval",
    "n_way_accuracy",
    "n_way_entries",
    "shuffled_n_way_accuracy",
    "normalise_caption",
    "percentile_interval",
    "psnr",
    "resample_counts",
    "retrieval_accuracy",
    "ssim",
    "summarise",
    "wilson_interval",
]
