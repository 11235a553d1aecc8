"""The toy tokens->text projection is copied into the data root once: an identical copy keeps its mtime, because the
stage manifests fingerprint it by size and mtime and a rewrite would make every stage that read it stale."""

from __future__ import annotations

import torch

from tasks_construction import gen_GT_clip_embeds
from tests.smoke_env import smoke_env


def test_identical_projection_is_kept_and_a_changed_one_rewritten(smoke_world, tmp_path_factory):
    env = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    data = tmp_path_factory.mktemp("proj_data")
    path = gen_GT_clip_embeds.copy_toy_tokens_proj(env.weights, data)
    first = path.stat().st_mtime_ns
    assert gen_GT_clip_embeds.copy_toy_tokens_proj(env.weights, data) == path
    assert path.stat().st_mtime_ns == first  # identical: not rewritten

    proj = torch.load(path, weights_only=True)["proj"]
    torch.save({"proj": proj + 1.0}, path)  # a stale copy
    gen_GT_clip_embeds.copy_toy_tokens_proj(env.weights, data)
    assert torch.equal(torch.load(path, weights_only=True)["proj"], proj)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from utils.io import atomic_write_text

    path = atomic_write_text(tmp_path / "report.html", "<html></html>")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
