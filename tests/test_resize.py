"""The three resizes of utils.resize, each pinned against a hand-written reference."""

from __future__ import annotations

import torch

from utils.resize import resize_frames_bilinear, resize_maps_nearest, resize_masks_majority


def test_nearest_reads_the_top_left_source_pixel_of_each_output_pixel() -> None:
    """Output pixel i reads input pixel ⌊i · in / out⌋, on every leading axis alike, dtype kept."""
    maps = torch.arange(2 * 3 * 7 * 7, dtype=torch.float64).view(2, 3, 7, 7)
    out = resize_maps_nearest(maps, 3)
    rows = [int(i * 7 / 3) for i in range(3)]  # 0, 2, 4
    assert out.shape == (2, 3, 3, 3) and out.dtype == torch.float64
    assert torch.equal(out, maps[..., rows, :][..., rows])
    latents = torch.randn(2, 3, 4, 5, 5)  # (B, F, C, S, S): five dims, channels never mixed
    assert torch.equal(resize_maps_nearest(latents, 10), latents.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_majority_sets_a_pixel_when_at_least_half_its_area_is_set() -> None:
    """Shrinking 4 x 4 → 2 x 2: each output pixel is a 2 x 2 block, set with 2, 3 or 4 of its pixels set."""
    masks = torch.zeros(1, 4, 4)
    masks[0, 0, 0] = 1.0  # top-left block: 1 of 4
    masks[0, 0, 2:] = 1.0  # top-right block: 2 of 4
    masks[0, 2:, :2] = 1.0  # bottom-left block: all 4
    masks[0, 3, 3] = 1.0  # bottom-right block: 1 of 4
    assert resize_masks_majority(masks, 2).tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    grown = resize_masks_majority(masks, 8)  # growing by 2: each pixel replicated
    assert torch.equal(grown, masks.repeat_interleave(2, -1).repeat_interleave(2, -2))
    same = resize_masks_majority(masks * 0.3, 4)  # same size: any non-zero value is set
    assert same.dtype == torch.float32 and torch.equal(same, masks)


def test_bilinear_frames_are_antialiased_clamped_and_float32() -> None:
    frames = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0)).half()  # (B, F, 3, H, W)
    out = resize_frames_bilinear(frames, 4)
    assert out.shape == (2, 3, 3, 4, 4) and out.dtype == torch.float32
    # shrinking by 2 with antialiasing: the triangle filter over each 2 x 2 block and its neighbours
    ref = torch.nn.functional.interpolate(frames.float().flatten(0, 1), size=(4, 4), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, ref.view_as(out))
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2  # (8, 8) alternating 0 / 1
    flat = resize_frames_bilinear(checker.float().expand(3, 8, 8), 4)
    torch.testing.assert_close(flat, torch.full((3, 4, 4), 0.5), atol=0.07, rtol=0)  # antialiased: no aliasing
    bright = resize_frames_bilinear(torch.full((3, 4, 4), 1.0), 9)
    assert bright.max() <= 1.0 and bright.min() >= 0.0
    assert torch.equal(resize_frames_bilinear(frames, 8), frames.float())
