"""Stage-6 metric library against scikit-image, torchmetrics, scipy or brute force on tiny cases, including the
cases where the "neurons" and "standard" protocols differ."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2gray
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from utils.errors import ConfigError, DataError
from utils.metrics import (
    blurry_video_ssim,
    caption_bleu,
    caption_bleu_per_sample,
    chance_level,
    chance_levels,
    clip_pcc,
    concept_f1,
    dice_per_sample,
    evaluate_videos,
    n_way_accuracy,
    psnr,
    retrieval_accuracy,
    ssim,
    summarise,
)

UPSTREAM_SSIM = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}


def _videos(n: int = 2, f: int = 3, h: int = 20, w: int = 18, noise: float = 0.25, seed: int = 0):
    """Smooth-ish ground truth and a noisy prediction, (n, f, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, f, 3, h, w, generator=g).cumsum(-1) / w
    pred = (gt + noise * (torch.rand(n, f, 3, h, w, generator=g) - 0.5)).clamp(0, 1)
    return pred, gt


def _hwc_uint8(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) float → (H, W, 3) uint8 truncated, as upstream's GIFs."""
    return (frame.float() * 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ---- SSIM / PSNR ---------------------------------------------------------------------------------------------------
def test_ssim_neurons_equals_upstream_skimage_call():
    pred, gt = _videos()
    ours = ssim(pred, gt, "neurons")
    ref = [
        [
            structural_similarity(rgb2gray(_hwc_uint8(p)), rgb2gray(_hwc_uint8(g)), channel_axis=-1, **UPSTREAM_SSIM)
            for p, g in zip(pv, gv)
        ]
        for pv, gv in zip(pred, gt)
    ]
    assert ours.shape == (2, 3)
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-10)


def test_ssim_neurons_is_per_column_1d_not_2d():
    """Defect 29: the upstream call is the mean of 1-D SSIMs down the columns, not a 2-D SSIM of the grey image."""
    pred, gt = _videos(n=1, f=1)
    x, y = rgb2gray(_hwc_uint8(pred[0, 0])), rgb2gray(_hwc_uint8(gt[0, 0]))
    per_column = np.mean([structural_similarity(x[:, j], y[:, j], **UPSTREAM_SSIM) for j in range(x.shape[1])])
    two_d = structural_similarity(x, y, **UPSTREAM_SSIM)
    ours = ssim(pred, gt, "neurons").item()
    assert ours == pytest.approx(per_column, abs=1e-10)
    assert abs(ours - two_d) > 1e-3


def test_ssim_standard_equals_skimage_colour_ssim_and_differs_from_neurons():
    pred, gt = _videos(seed=1)
    ours = ssim(pred, gt)  # default protocol = standard
    ref = [
        [
            structural_similarity(
                p.permute(1, 2, 0).double().numpy(), g.permute(1, 2, 0).double().numpy(), channel_axis=-1, data_range=1
            )
            for p, g in zip(pv, gv)
        ]
        for pv, gv in zip(pred, gt)
    ]
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-10)
    assert (ours - ssim(pred, gt, "neurons")).abs().min() > 1e-3


def test_ssim_identical_is_one_and_blurry_uses_same_function():
    pred, gt = _videos(n=1, f=2)
    for protocol in ("neurons", "standard"):
        torch.testing.assert_close(ssim(gt, gt, protocol), torch.ones(1, 2, dtype=torch.float64))
        torch.testing.assert_close(blurry_video_ssim(pred, gt, protocol), ssim(pred, gt, protocol))


def test_psnr_both_protocols_against_libraries():
    from torchmetrics.functional import peak_signal_noise_ratio as tm_psnr

    pred, gt = _videos(seed=2, noise=0.05)
    neurons = psnr(pred, gt, "neurons")
    ref = [
        [peak_signal_noise_ratio(_hwc_uint8(g), _hwc_uint8(p), data_range=255) for p, g in zip(pv, gv)]
        for pv, gv in zip(pred, gt)
    ]
    torch.testing.assert_close(neurons, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-9)
    standard = psnr(pred, gt, "standard")
    flat = (pred.reshape(-1, *pred.shape[2:]).double(), gt.reshape(-1, *gt.shape[2:]).double())
    tm = tm_psnr(*flat, data_range=1.0, reduction="none", dim=(1, 2, 3)).reshape(2, 3)
    torch.testing.assert_close(standard, tm, rtol=0, atol=1e-5)  # torchmetrics works in float32
    assert (standard - neurons).abs().max() > 1e-3  # uint8 truncation changes the neurons value
    assert torch.isinf(psnr(gt, gt)).all()


# ---- N-way classification and chance -------------------------------------------------------------------------------
def _exact_n_way(pred: list[float], positives: list[int], n_way: int, top_k: int = 1) -> float:
    """Brute force over every distractor subset: fraction where < top_k distractors score ≥ the best positive."""
    best = max(pred[i] for i in positives)
    pool = [i for i in range(len(pred)) if i not in positives]
    subsets = list(itertools.combinations(pool, n_way - 1))
    return sum(sum(pred[d] >= best for d in s) < top_k for s in subsets) / len(subsets)


def test_n_way_matches_subset_enumeration():
    g = torch.Generator().manual_seed(3)
    gt, pred = torch.rand(4, 8, generator=g), torch.rand(4, 8, generator=g)
    acc, std = n_way_accuracy(gt, pred, 3, trials=4000, seed=1)
    positives = gt.topk(3, dim=1).indices.tolist()
    exact = torch.tensor([_exact_n_way(p, pos, 3) for p, pos in zip(pred.tolist(), positives)], dtype=torch.float64)
    torch.testing.assert_close(acc, exact, rtol=0, atol=0.04)
    torch.testing.assert_close(std, (acc * (1 - acc) / 4000).sqrt())
    # all remaining classes as distractors: deterministic and exact
    full, _ = n_way_accuracy(gt, pred, 6, trials=7, top_k=2)
    exact_full = [_exact_n_way(p, pos, 6, top_k=2) for p, pos in zip(pred.tolist(), positives)]
    assert full.tolist() == exact_full


def test_n_way_seeded_frame_level_and_perfect_prediction():
    g = torch.Generator().manual_seed(4)
    gt = torch.rand(3, 2, 20, generator=g).softmax(-1)
    pred = torch.rand(3, 2, 20, generator=g).softmax(-1)
    a1, _ = n_way_accuracy(gt, pred, 5, seed=7)
    a2, _ = n_way_accuracy(gt, pred, 5, seed=7)
    assert a1.shape == (3, 2) and torch.equal(a1, a2)
    per_frame = [n_way_accuracy(gt[:, f], pred[:, f], 5, trials=2000, seed=f)[0] for f in range(2)]
    torch.testing.assert_close(
        n_way_accuracy(gt, pred, 5, trials=2000)[0], torch.stack(per_frame, 1), atol=0.05, rtol=0
    )
    perfect, perfect_std = n_way_accuracy(gt, gt, 5)
    assert perfect.eq(1).all() and perfect_std.eq(0).all()
    constant, _ = n_way_accuracy(gt, torch.full_like(gt, 0.05), 2)  # ties count against the positive
    assert constant.eq(0).all()


def test_chance_level_analytic_equals_enumeration_and_simulation():
    assert chance_levels() == pytest.approx({"2-way": 0.75, "50-way": 3 / 52})
    assert chance_level(10, gt_top_k=1) == pytest.approx(0.1)  # retrieval: 1/n
    for n, k, t in [(2, 3, 1), (3, 3, 1), (4, 2, 2)]:  # random rankings of k positives + n−1 distractors
        perms = list(itertools.permutations(range(n - 1 + k)))  # ranking, best first; items < k are positives
        wins = sum(next(j for j, x in enumerate(p) if x < k) < t for p in perms)  # distractors above best positive
        assert chance_level(n, k, t) == pytest.approx(wins / len(perms))
    g = torch.Generator().manual_seed(5)
    gt, pred = torch.rand(300, 60, generator=g), torch.rand(300, 60, generator=g)
    for n in (2, 50):
        sim = n_way_accuracy(gt, pred, n, trials=50)[0].mean().item()
        assert sim == pytest.approx(chance_level(n), abs=0.02)


def test_n_way_input_errors():
    x = torch.rand(4, 10)
    with pytest.raises(DataError, match="distractors"):
        n_way_accuracy(x, x, 9)  # 10 classes − 3 positives < 8 distractors
    with pytest.raises(DataError, match="shape"):
        n_way_accuracy(x, torch.rand(4, 11), 2)
    with pytest.raises(DataError, match="invalid rule"):
        n_way_accuracy(x, x, 2, top_k=2)


# ---- retrieval -----------------------------------------------------------------------------------------------------
def test_retrieval_hand_case_and_sampled_n_way():
    image = torch.eye(3)
    brain = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.2, 1.0]])
    # cos(brain_i, image_j) = normalised brain rows; brain 1 is closest to image 0
    out = retrieval_accuracy(brain, image)
    assert out["brain_to_image"].tolist() == [1.0, 0.0, 1.0]
    # image 0's closest brain is brain 0 (cos 1 > 0.994); image 1's is brain 2 (0.196 > 0.110); image 2 → brain 2
    assert out["image_to_brain"].tolist() == [1.0, 0.0, 1.0]
    g = torch.Generator().manual_seed(6)
    b, i = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    sampled = retrieval_accuracy(b, i, 3, trials=4000, seed=2)["brain_to_image"]
    sim = (torch.nn.functional.normalize(b, dim=1) @ torch.nn.functional.normalize(i, dim=1).T).tolist()
    exact = torch.tensor([_exact_n_way(row, [q], 3) for q, row in enumerate(sim)], dtype=torch.float64)
    torch.testing.assert_close(sampled, exact, rtol=0, atol=0.04)
    with pytest.raises(DataError, match="candidates left"):
        retrieval_accuracy(b, i, 7)


# ---- CLIP-pcc ------------------------------------------------------------------------------------------------------
def test_clip_pcc_all_pairs_vs_adjacent():
    angles = torch.tensor([0.0, 0.5, 1.0, 1.5])  # frames drift on a circle: adjacent cos 0.5 rad, far pairs less
    feats = torch.stack([angles.cos(), angles.sin(), torch.zeros(4)], dim=-1)[None] * 3.0  # (1, 4, 3) unnormalised
    pairs = [math.cos(a - b) for a, b in itertools.permutations(angles.tolist(), 2)]
    adjacent = [math.cos(0.5)] * 3
    assert clip_pcc(feats, "neurons").item() == pytest.approx(sum(pairs) / len(pairs))
    assert clip_pcc(feats, "standard").item() == pytest.approx(sum(adjacent) / 3)
    assert clip_pcc(feats, "neurons").item() < clip_pcc(feats).item() - 0.1
    frozen = torch.randn(2, 1, 8).expand(2, 6, 8)
    for protocol in ("neurons", "standard"):
        torch.testing.assert_close(clip_pcc(frozen, protocol), torch.ones(2, dtype=torch.float64))
    with pytest.raises(DataError, match="at least 2"):
        clip_pcc(torch.randn(2, 1, 8))


# ---- tasks: concept F1, Dice, BLEU ---------------------------------------------------------------------------------
def test_concept_f1_against_torchmetrics_and_sklearn():
    from sklearn.metrics import f1_score
    from torchmetrics.functional.classification import multilabel_f1_score

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(12, 6, generator=g)
    targets = (torch.rand(12, 6, generator=g) < 0.4).long()
    logits[:, 5], targets[:, 5] = -5.0, 0  # a class absent from targets and predictions
    out = concept_f1(logits, targets, from_logits=True)
    micro = multilabel_f1_score(logits.sigmoid(), targets, num_labels=6, average="micro").item()
    assert out["micro"] == pytest.approx(micro, abs=1e-6)
    ref_per = multilabel_f1_score(logits.sigmoid(), targets, num_labels=6, average="none")
    torch.testing.assert_close(out["per_class_f1"][:5].float(), ref_per[:5])
    # macro skips the undefined class (sklearn zero_division=nan); torchmetrics would count it as 0
    binary = (logits.sigmoid() > 0.5).numpy()
    macro = f1_score(targets.numpy(), binary, average="macro", zero_division=np.nan)
    assert out["macro"] == pytest.approx(macro)
    assert math.isnan(out["per_class_f1"][5]) and math.isnan(out["per_class_recall"][5])
    assert concept_f1(logits.sigmoid(), targets)["micro"] == pytest.approx(out["micro"])
    with pytest.raises(DataError, match="outside"):
        concept_f1(logits, targets)


def test_dice_per_sample_against_scipy():
    from scipy.spatial.distance import dice as dice_dissimilarity

    g = torch.Generator().manual_seed(9)
    pred = torch.rand(4, 2, 5, 5, generator=g) > 0.5
    gt = torch.rand(4, 2, 5, 5, generator=g) > 0.6
    ref = [1 - dice_dissimilarity(p.flatten().numpy(), t.flatten().numpy()) for p, t in zip(pred, gt)]
    torch.testing.assert_close(dice_per_sample(pred, gt.float()), torch.tensor(ref, dtype=torch.float64))
    empty = torch.zeros(2, 3, 3)
    assert dice_per_sample(empty, empty).tolist() == [1.0, 1.0]
    with pytest.raises(DataError, match="0 and 1"):
        dice_per_sample(torch.rand(2, 3, 3), empty)


def test_caption_bleu_hand_computed():
    # BLEU-3: p1 5/6, p2 3/5, p3 1/4, equal lengths (BP 1) → (1/8)^(1/3) = 0.5
    assert caption_bleu(["The cat sat on the mat."], ["the cat is on the mat"], n_gram=3) == pytest.approx(0.5)
    # BLEU-4: p 9/9, 7/8, 5/7, 3/6; c 9 < r 10 → BP exp(1 − 10/9)
    pred, ref = "a man is riding a horse on the beach", "a man is riding a brown horse on the beach"
    expected = math.exp(-1 / 9) * (5 / 16) ** 0.25
    assert caption_bleu([pred], [[ref, "something else entirely"]]) == pytest.approx(expected, rel=1e-6)
    per = caption_bleu_per_sample([pred, "the cat sat on the mat"], [ref, "the cat is on the mat"])
    assert per.tolist() == pytest.approx([expected, 0.0])  # no 4-gram match → 0
    with pytest.raises(DataError, match="references"):
        caption_bleu(["a"], ["a", "b"])


# ---- reporting -----------------------------------------------------------------------------------------------------
def test_summarise_protocols_differ_only_in_the_spread():
    values = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])  # (N=3, F=2)
    std = torch.full((3, 2), 0.1)
    # neurons: per frame index mean/std over videos, then averaged over frames
    col_std = (np.std([0.0, 1.0, 0.5]) + np.std([1.0, 1.0, 0.0])) / 2
    assert summarise(values, protocol="neurons") == pytest.approx({"mean": 3.5 / 6, "std": col_std, "n": 3})
    assert summarise(values, std, "neurons") == pytest.approx({"mean": 3.5 / 6, "std": 0.1, "n": 3})
    # standard: per-video mean first, then mean/std over videos; per-sample std ignored
    expected = {"mean": 3.5 / 6, "std": np.std([0.5, 1.0, 0.25]), "n": 3}
    assert summarise(values) == pytest.approx(expected)
    assert summarise(values, std) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="protocol"):
        summarise(values, protocol="mindvideo")  # type: ignore[arg-type]


def test_evaluate_videos_and_input_checks():
    pred, gt = _videos(n=4, f=2, h=12, w=12)
    g = torch.Generator().manual_seed(10)
    video = (torch.rand(4, 60, generator=g), torch.rand(4, 60, generator=g))
    frame = (torch.rand(4, 2, 60, generator=g), torch.rand(4, 2, 60, generator=g))
    out = evaluate_videos(
        pred,
        gt,
        protocol="neurons",
        video_scores=video,
        frame_scores=frame,
        clip_features=torch.randn(4, 2, 8, generator=g),
        blurry=gt,
    )
    expected_keys = {
        "video_2way",
        "video_50way",
        "frame_2way",
        "frame_50way",
        "clip_pcc",
        "ssim",
        "psnr",
        "blurry_ssim",
    }
    assert set(out) == expected_keys
    assert out["video_50way"]["chance"] == pytest.approx(3 / 52) and out["ssim"]["n"] == 4
    assert out["blurry_ssim"]["mean"] == pytest.approx(1.0)
    assert set(evaluate_videos(pred, gt)) == {"ssim", "psnr"}
    with pytest.raises(DataError, match="shape"):
        ssim(pred, gt[:, :1])
    with pytest.raises(DataError, match="outside"):
        psnr(pred * 2, gt)
    with pytest.raises(DataError, match="start with"):
        evaluate_videos(pred, gt, clip_features=torch.randn(3, 2, 8))


# ---- upstream's GIF grids (spec §6 step 6, §7, defect 29) -----------------------------------------------------------
def _upstream_gif(tmp_path):
    """One GIF grid as upstream's stage 5 writes it: GT clip frames (224 px, resized to 256) beside 6 generated
    frames (256 px), a noisy copy of the GT."""
    from utils.gif_grid import write_upstream_gif

    gt224 = 0.2 + 0.6 * _videos(n=1, f=6, h=224, w=224, noise=0.0)[1][0]  # (6, 3, 224, 224), no black pixel
    g = torch.Generator().manual_seed(3)
    pred = (torch.nn.functional.interpolate(gt224, size=(256, 256), mode="bilinear") +
            0.2 * (torch.rand(6, 3, 256, 256, generator=g) - 0.5)).clamp(0, 1)  # fmt: skip
    path = tmp_path / "0.gif"
    write_upstream_gif(path, gt224, pred)
    return path


def test_gif_grid_layout(tmp_path) -> None:
    """Each GIF frame is 260 × 518 (make_grid of the two images of a time step, nrow=6, padding 2); the halves are
    259 wide with the padding of upstream's split: GT 2 px left / 1 px right, prediction 1 px left / 2 px right."""
    import imageio.v3 as iio

    from utils.gif_grid import read_upstream_gif, upstream_grid_frames

    path = _upstream_gif(tmp_path)
    full = iio.imread(path)
    assert full.shape == (6, 260, 518, 3) and full.dtype == np.uint8
    gt, pred = read_upstream_gif(path)
    assert gt.shape == pred.shape == (6, 260, 259, 3)
    for half, left, right in ((gt, 2, 1), (pred, 1, 2)):
        assert half[:, :2].max() == 0 and half[:, -2:].max() == 0, "2 px top and bottom"
        assert half[:, :, :left].max() == 0 and half[:, :, -right:].max() == 0
        assert half[:, 2:-2, left].max() > 0 and half[:, 2:-2, -right - 1].max() > 0, "image right after the border"
    raw = upstream_grid_frames(torch.zeros(6, 3, 224, 224), torch.full((6, 3, 256, 256), 0.999))
    assert raw.shape == (6, 260, 518, 3) and raw.max() == 254, "x*255 truncated to uint8, as upstream"


def test_neurons_protocol_on_a_gif_grid_equals_skimage(tmp_path) -> None:
    """SSIM and PSNR of the neurons protocol on the GIF halves equal skimage's upstream calls on the same GIF: halves
    cut from the grid, per frame index, then the mean over the frame indices."""
    import imageio.v3 as iio

    from utils.gif_grid import read_upstream_gif

    path = _upstream_gif(tmp_path)
    gt, pred = (torch.from_numpy(h).permute(0, 3, 1, 2)[None] for h in read_upstream_gif(path))  # (1, 6, 3, 260, 259)
    out = evaluate_videos(pred, gt, protocol="neurons")
    video = iio.imread(path)
    halves = [(video[f, :, :259], video[f, :, 259:]) for f in range(6)]
    ref_ssim = np.mean([structural_similarity(rgb2gray(g), rgb2gray(p), channel_axis=-1, **UPSTREAM_SSIM)
                        for g, p in halves])  # fmt: skip
    ref_psnr = np.mean([peak_signal_noise_ratio(p, g, data_range=255) for g, p in halves])
    assert out["ssim"]["mean"] == pytest.approx(ref_ssim, abs=1e-12)
    assert out["psnr"]["mean"] == pytest.approx(ref_psnr, abs=1e-9)
    assert set(np.unique(video[:, :, 258])) == {0}, "the GT half's right border is padding"


def test_image_processor_backends_against_pil() -> None:
    """The documented check of issue 15: transformers 5 has two backends per image processor. "pil" reproduces the PIL
    path of upstream's transformers-4 processors exactly; "torchvision" (AutoImageProcessor's pick) is up to one
    uint8 level off. Stage 6's eval.image_backend picks one (default torchvision, upstream pil)."""
    from PIL import Image, ImageFilter
    from transformers import ViTImageProcessor

    from models.foundation.common import with_image_backend

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (260, 259, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    ref = (np.asarray(img.resize((224, 224), Image.BILINEAR), dtype=np.float64) / 255 - 0.5) / 0.5
    tv = ViTImageProcessor(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pil = with_image_backend(tv, "pil")
    assert type(pil).__name__ == "ViTImageProcessorPil" and with_image_backend(pil, "torchvision").size == tv.size
    frame = torch.from_numpy(np.array(img)).permute(2, 0, 1)

    def run(proc) -> np.ndarray:
        return proc(images=[frame], return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).double().numpy()

    assert np.abs(run(pil) - ref).max() < 1e-6, "pil backend = PIL resize"
    off = np.abs(run(tv) - ref).max()
    assert off <= 2 / 255 + 1e-6, "torchvision backend: at most one uint8 level (×2 after mean/std 0.5)"


# ---- intervals (utils/metrics/intervals.py) ------------------------------------------------------------------------
def test_clip_bootstrap_interval_contains_the_mean_and_is_seeded():
    from utils.metrics import mean_interval, resample_counts

    values = torch.rand(60, 4, generator=torch.Generator().manual_seed(0))  # (N, F) per-frame values
    out = summarise(values, protocol="neurons", bootstrap=200, seed=3)
    lo, hi = out["ci95"]
    assert lo < out["mean"] < hi
    assert summarise(values, bootstrap=200, seed=3)["ci95"] == [lo, hi], "one interval in both protocols"
    assert summarise(values, bootstrap=200, seed=4)["ci95"] != [lo, hi], "seeded"
    se = values.double().mean(dim=1).std(correction=0).item() / math.sqrt(60)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25), "close to the normal interval of the mean"
    assert summarise(values, bootstrap=0)["ci95"] is None and "ci95" not in summarise(values)
    assert mean_interval(torch.tensor([1.0, math.inf]), 10, 0) is None, "PSNR of identical frames: no interval"
    draws = resample_counts(7, 5, 0)  # how often each clip is drawn
    assert draws.shape == (5, 7) and (draws.sum(axis=1) == 7).all()
    idx = np.random.default_rng(0).integers(0, 7, (5, 7))
    assert (draws == np.stack([np.bincount(row, minlength=7) for row in idx])).all()


def test_above_chance_false_at_chance_true_when_clearly_above():
    g = torch.Generator().manual_seed(0)
    n, classes = 80, 20
    gt_scores = torch.rand(n, classes, generator=g)
    unrelated = torch.rand(n, classes, generator=g)  # a prediction at chance
    close = gt_scores + 0.05 * torch.rand(n, classes, generator=g)  # clearly above chance
    pred, gt = _videos(n=n, f=2, h=8, w=8)
    rule = {"n_ways": (2, 10), "trials": 40, "bootstrap": 200}
    at_chance = evaluate_videos(pred, gt, video_scores=(gt_scores, unrelated), **rule)
    above = evaluate_videos(pred, gt, video_scores=(gt_scores, close), **rule)
    for key in ("video_2way", "video_10way"):
        e = at_chance[key]
        assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
        assert e["ci95"][0] <= e["chance"] and e["above_chance"] is False, (key, e)
        assert above[key]["ci95"][0] > above[key]["chance"] and above[key]["above_chance"] is True, above[key]
    assert "above_chance" not in at_chance["ssim"] and "ci95" in at_chance["ssim"], "no chance level for SSIM"
    plain = evaluate_videos(pred, gt, video_scores=(gt_scores, close), n_ways=(2,), trials=40)
    assert "ci95" not in plain["video_2way"] and "above_chance" not in plain["video_2way"], "no bootstrap asked"


def test_corpus_bootstrap_counts_equal_the_metrics_on_each_draw():
    """The vectorised bootstrap of concept F1 and caption BLEU (per-clip counts times the draw counts) gives what the
    metric functions give on the resampled clips."""
    from utils.metrics import (
        bleu_from_counts,
        caption_bleu_counts,
        concept_f1_counts,
        corpus_entry,
        f1_averages,
        resample_counts,
    )

    g = torch.Generator().manual_seed(2)
    n = 9
    labels = (torch.rand(n, 6, generator=g) < 0.4).float()
    probs = (0.5 * labels + 0.6 * torch.rand(n, 6, generator=g)).clamp(0, 1)
    refs: list[str | list[str]] = [f"a red ball number {i} rolls over the green grass" for i in range(n)]
    refs[1] = ["a blue cube", "the blue cube slides over the ice today"]  # two references
    preds = [f"a red ball number {i} rolls over grass" for i in range(n)]
    preds[2], preds[3] = "nothing in common", "A red ball, number 3; rolls over the green grass!"
    draws = resample_counts(n, 6, 1)
    idx = np.random.default_rng(1).integers(0, n, (6, n))
    micro, macro = f1_averages(*torch.einsum("bn,nkc->kbc", torch.from_numpy(draws), concept_f1_counts(probs, labels)))
    bleu = bleu_from_counts(torch.from_numpy(draws) @ caption_bleu_counts(preds, refs))
    for b, rows in enumerate(idx):
        f1 = concept_f1(probs[torch.as_tensor(rows)], labels[torch.as_tensor(rows)])
        assert (micro[b].item(), macro[b].item()) == pytest.approx((f1["micro"], f1["macro"]), abs=1e-12)
        expected = caption_bleu([preds[i] for i in rows], [refs[i] for i in rows])
        assert bleu[b].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert bleu_from_counts(caption_bleu_counts(["x y"], ["a b"])).item() == 0.0, "no match: 0, as torchmetrics"
    entry = corpus_entry(0.5, bleu, n)
    assert entry["std"] == pytest.approx(float(bleu.std(correction=0))) and entry["ci95"][0] <= entry["ci95"][1]
    assert corpus_entry(0.5, np.zeros(0), n) == {"mean": 0.5, "std": None, "n": n, "ci95": None}


def test_wilson_interval_known_values():
    from utils.metrics import is_above_chance, wilson_interval

    assert wilson_interval(0.5, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(0.5, 0) is None
    assert is_above_chance(wilson_interval(0.7, 100), 0.5) and not is_above_chance(wilson_interval(0.55, 100), 0.5)


def test_shuffled_chance_tells_a_biased_decoder_from_an_informative_one():
    """The analytic N-way chance assumes exchangeable class scores. A decoder that favours the same classes for every
    clip can sit below it with no information, or above it; its shuffled pairs give its own chance."""
    from utils.metrics import n_way_entries, shuffled_n_way_accuracy

    g = torch.Generator().manual_seed(0)
    n, classes = 120, 30
    popular = torch.zeros(classes)
    popular[:10] = 2.0  # the ground truth's top classes are mostly among the first 10
    gt_scores = popular + torch.rand(n, classes, generator=g)
    bias = torch.zeros(classes)
    bias[10:20] = 1.0  # a decoder that favours classes the ground truth rarely tops
    constant = bias.expand(n, classes) + 0.01 * torch.rand(n, classes, generator=g)  # no clip information
    informative = 0.5 * bias + (gt_scores - popular)  # the clip's own scores, plus the same bias
    rule = {"trials": 50, "gt_top_k": 3, "top_k": 1, "seed": 0}
    blind = n_way_entries("video", (gt_scores, constant), (2,), "standard", 200, 5, **rule)["video_2way"]
    seeing = n_way_entries("video", (gt_scores, informative), (2,), "standard", 200, 5, **rule)["video_2way"]
    assert blind["mean"] < blind["chance"] - 0.1 and blind["above_chance"] is False, blind
    assert abs(blind["chance_shuffled"] - blind["mean"]) < 0.05 and blind["above_shuffled"] is False, blind
    assert seeing["mean"] > seeing["chance_shuffled"] + 0.1 and seeing["above_shuffled"] is True, seeing
    lo, hi = seeing["ci95_vs_shuffled"]
    assert 0 < lo <= seeing["mean"] - seeing["chance_shuffled"] <= hi
    acc = shuffled_n_way_accuracy(gt_scores[:, None].expand(-1, 4, -1), constant[:, None].expand(-1, 4, -1), 2, **rule)
    assert acc is not None and acc.shape == (n, 4), "frame scores (N, F, C): per clip and frame"
    assert shuffled_n_way_accuracy(gt_scores[:1], constant[:1], 2, **rule) is None, "one clip: no other pairing"
    plain = n_way_entries("video", (gt_scores, constant), (2,), "standard", 200, 0, **rule)["video_2way"]
    assert "chance_shuffled" not in plain, "shuffles=0: off"
