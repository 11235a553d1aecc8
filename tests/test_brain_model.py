"""The NEURONS brain model on a tiny CPU config: shapes, wiring, the prior, the heads and the defect-14/15/21/22 fixes.

The foundation dims below are test-local stand-ins (the real toy dims come from the toy foundation models).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from models.brain import NeuronsBrainModel, clip_generators, initialize_weights, parameter_counts
from models.heads import IGNORE_INDEX, ConceptNamer, caption_labels
from models.prior import RotaryEmbedding
from models.sizes import STAGE1_PARTS, FoundationDims, GPT2Dims, brain_config
from models.video_decoder import SpatioTemporalAttention, TextDrivenDecoder
from utils.errors import ConfigError, DataError


def clip_seeds(base: int, indices) -> list[torch.Generator]:
    return clip_generators([base * 1000 + i for i in indices])


DIMS = FoundationDims(
    clip_tokens=16,
    clip_dim=24,
    text_dim=20,
    latent_channels=4,
    latent_size=6,
    gpt2=GPT2Dims(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32),
)
N_VOX, N_CLS, F_ = 40, 7, 3


def make_model(**overrides) -> NeuronsBrainModel:
    torch.manual_seed(0)
    cfg = brain_config("smoke", n_voxels=(N_VOX, 30), n_classes=N_CLS, dims=DIMS, n_frames=F_, **overrides)
    return NeuronsBrainModel(cfg).eval()


def blend_half(module: torch.nn.Module) -> None:
    """Give the temporal branch weight (at init every blend is pure spatial)."""
    for m in module.modules():
        if isinstance(m, SpatioTemporalAttention):
            m.weight.data.fill_(0.5)


@pytest.fixture(scope="module")
def model() -> NeuronsBrainModel:
    return make_model()


def test_config_registry_and_errors():
    cfg = brain_config("paper", n_voxels=[13447], n_classes=51)
    assert (cfg.widths.hidden_dim, cfg.clip_tokens, cfg.clip_dim, cfg.text_dim, cfg.n_frames) == (
        4096,
        256,
        1664,
        1280,
        6,
    )
    assert (cfg.widths.prior.depth, cfg.widths.prior.heads, cfg.widths.prior.dim_head) == (6, 32, 52)
    assert (cfg.dims.gpt2.n_embd, cfg.decoder_size, cfg.token_grid) == (768, 64, 16)
    with pytest.raises(ConfigError, match="foundation dims"):
        brain_config("toy", n_voxels=[10], n_classes=3)
    with pytest.raises(ConfigError):
        brain_config("huge", n_voxels=[10], n_classes=3)
    with pytest.raises(ConfigError, match="square"):
        brain_config("smoke", n_voxels=[10], n_classes=3, dims=FoundationDims(15, 8, 8, 4, 4))
    with pytest.raises(ConfigError):
        brain_config("smoke", n_voxels=[10], n_classes=3, dims=DIMS, text_attention="everyone")
    flagged = brain_config(
        "smoke",
        n_voxels=[10],
        n_classes=3,
        dims=DIMS,
        text_attention="batch",
        temporal_scope="batch",
        caption_pad="clip_zero",
    )
    assert (flagged.widths.decoder.text_attention, flagged.widths.decoder.temporal_scope) == ("batch", "batch")


def test_forward_shapes(model):
    b, t, d, dt = 2, DIMS.clip_tokens, DIMS.clip_dim, DIMS.text_dim
    cond = model.encode(torch.randn(b, 1, 30), subj_idx=1)
    assert cond.shape == (b, t, d)
    mse, pred = model.diffusion_prior(cond, torch.randn(b, t, d), generator=torch.Generator().manual_seed(0))
    assert mse.ndim == 0 and pred.shape == (b, t, d)
    motion = model.motion(pred)
    assert motion.shape == (b, F_, t, d)
    assert model.text_embed(motion).shape == (b, dt) and model.concept_logits(motion).shape == (b, N_CLS)
    s = model.cfg.decoder_size
    assert s == 16
    assert model.decode_masks(motion, torch.randn(b, dt)).shape == (b, F_, 1, s, s)
    assert model.decode_latents(motion, torch.randn(b, dt)).shape == (b, F_, 4, 6, 6)
    tokens = torch.randint(0, 50, (b, 9))
    logits, labels, keep = model.caption_logits(torch.randn(b, dt), tokens, torch.ones(b, 9, dtype=torch.bool))
    assert logits.shape == (b * 9, 50) and keep.all() and torch.equal(labels, tokens.flatten())


def test_backbone_residual_wiring_matches_manual_reference(model):
    bb = model.backbone
    x = torch.randn(3, 1, model.cfg.widths.hidden_dim)
    r1, r2, h = x, x.transpose(1, 2), x
    for blk1, blk2 in zip(bb.mixer_blocks1, bb.mixer_blocks2):
        h = blk1[1](F.layer_norm(h, h.shape[-1:], blk1[0].weight, blk1[0].bias)) + r1
        r1 = h
        h = blk2(h.transpose(1, 2)) + r2  # each branch's residual is its own previous output
        r2 = h
        h = h.transpose(1, 2)
    tokens = bb.backbone_linear(h.flatten(1)).view(3, DIMS.clip_tokens, DIMS.clip_dim)
    voxels_embed, clip_embeds = bb(x)
    assert torch.allclose(voxels_embed, tokens, atol=1e-6)
    assert torch.allclose(clip_embeds, bb.clip_proj(tokens), atol=1e-6)


def test_motion_proj_is_channel_major_frame_minor(model):
    x = torch.randn(2, DIMS.clip_tokens, DIMS.clip_dim)
    raw = model.motion_proj.motion_proj(x)  # (B, T, D·F)
    motion = model.motion(x)
    for f in range(F_):
        for c in (0, 5, DIMS.clip_dim - 1):
            assert torch.equal(motion[:, f, :, c], raw[:, :, c * F_ + f])


def test_prior_training_forward_and_condition_dropout():
    m = make_model(prior_overrides={"cond_drop_prob": 1.0}).train()
    prior = m.diffusion_prior
    b, t, d = 2, DIMS.clip_tokens, DIMS.clip_dim
    target = torch.randn(b, t, d)
    mse, pred = prior(torch.randn(b, t, d), target, generator=torch.Generator().manual_seed(1))
    assert mse.item() == pytest.approx(F.mse_loss(pred, target).item())
    # every condition dropped: the brain tokens no longer matter
    _, pred2 = prior(torch.randn(b, t, d), target, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(pred, pred2)
    prior.eval()  # no dropout in eval: the condition matters again
    _, a = prior(torch.randn(b, t, d), target, generator=torch.Generator().manual_seed(1))
    _, c = prior(torch.randn(b, t, d), target, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def test_noise_scheduler_tables():
    sched = make_model().diffusion_prior.noise_scheduler
    betas = sched.betas.double()
    ac = torch.cumprod(1 - betas, 0)
    assert sched.num_timesteps == 20 and torch.allclose(sched.alphas_cumprod.double(), ac, atol=1e-6)
    assert torch.all(betas > 0) and torch.all(betas <= 0.999 + 1e-6) and torch.all(sched.p2_loss_weight == 1)
    t = 7
    assert sched.posterior_mean_coef1[t].item() == pytest.approx(
        (betas[t] * ac[t - 1].sqrt() / (1 - ac[t])).item(), rel=1e-5
    )


def test_rotary_scores_depend_only_on_relative_position():
    rot = RotaryEmbedding(8)
    q, k = torch.randn(16), torch.randn(16)
    rq = rot.rotate(q.expand(10, 16).clone())  # (n, d): the same vector at positions 0..9
    rk = rot.rotate(k.expand(10, 16).clone())
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(10), atol=1e-5)
    assert torch.allclose(rq[:, 8:], q[8:].expand(10, 8))  # only the first 8 features rotate
    assert (rq[3] @ rk[1]).item() == pytest.approx((rq[7] @ rk[5]).item(), abs=1e-4)


@pytest.mark.parametrize("steps", [None, 3])
def test_prior_sampling_is_seeded_and_batch_independent(steps):
    prior = make_model().diffusion_prior.double()  # float64: BLAS blocking differs with the batch size
    cond = torch.randn(5, DIMS.clip_tokens, DIMS.clip_dim, dtype=torch.float64)
    batch = prior.sample(cond, clip_seeds(42, range(5)), steps)
    alone = prior.sample(cond[3:4], clip_seeds(42, [3]), steps)
    assert torch.allclose(batch[3:4], alone, atol=1e-9)
    assert torch.equal(prior.sample(cond[3:4], clip_seeds(42, [3]), steps), alone)
    assert not torch.allclose(batch[2], batch[3])


def test_strided_prior_sampling_follows_the_posterior_between_kept_steps():
    """``steps`` < timesteps: x starts as noise, each kept step t moves to the next kept s with the posterior
    q(x_s | x_t, x0) written out here from the cumulative alphas (one noise draw per step), and the last kept step
    (t = 0) returns x0; ``steps`` ≥ timesteps is the full ancestral sampler."""
    prior = make_model().diffusion_prior.double()
    sched, n = prior.noise_scheduler, prior.noise_scheduler.num_timesteps
    cond = torch.randn(2, DIMS.clip_tokens, DIMS.clip_dim, dtype=torch.float64)
    times = torch.linspace(n - 1, 0, 3).round().long().tolist()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(cond.shape, generator=gen, dtype=torch.float64)
    for t_now, t_next in zip(times, times[1:]):
        x0 = prior.net(x, torch.full((2,), t_now), cond)
        a_t, a_s = sched.alphas_cumprod[t_now].double(), sched.alphas_cumprod[t_next].double()
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        mean = a_s.sqrt() * (1 - a_t / a_s) / (1 - a_t) * x0 + (a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t) * x
        x = mean + var.sqrt() * torch.randn(cond.shape, generator=gen, dtype=torch.float64)
    expected = prior.net(x, torch.zeros(2, dtype=torch.long), cond)
    torch.testing.assert_close(prior.sample(cond, torch.Generator().manual_seed(5), steps=3), expected)
    full = prior.sample(cond, torch.Generator().manual_seed(5))
    assert torch.equal(prior.sample(cond, torch.Generator().manual_seed(5), steps=n), full)


def _decode_one_vs_five(dec: TextDrivenDecoder, head: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    vision = torch.randn(5, F_, DIMS.clip_tokens, DIMS.clip_dim)
    text = torch.randn(5, DIMS.text_dim)
    with torch.no_grad():
        return dec(vision, text, head=head)[2:3], dec(vision[2:3], text[2:3], head=head)


@pytest.mark.parametrize("head", ["seg", "recon"])
def test_decoder_is_batch_independent_by_default(head):
    dec = make_model().text_seg_dec
    blend_half(dec)
    in_batch, alone = _decode_one_vs_five(dec, head)
    assert torch.allclose(in_batch, alone, atol=1e-5)


@pytest.mark.parametrize("flag", [{"text_attention": "batch"}, {"temporal_scope": "batch"}])
def test_decoder_depends_on_the_batch_under_upstream_flags(flag):
    dec = make_model(**flag).text_seg_dec
    blend_half(dec)
    in_batch, alone = _decode_one_vs_five(dec, "seg")
    assert (in_batch - alone).abs().max() > 1e-4


DECODED = ("prior_tokens", "motion", "caption_vector", "concept_logits", "mask_logits", "latents", "top_concept")


@pytest.mark.parametrize("steps", [None, 4])
def test_brain_only_decoding_is_batch_independent(steps):
    model = make_model().double()  # float64: BLAS blocking differs with the batch size
    blend_half(model)
    voxels = torch.randn(5, 1, N_VOX, dtype=torch.float64)
    table = torch.randn(N_CLS, DIMS.text_dim, dtype=torch.float64)
    batch = model.decode_voxels(voxels, clip_seeds(7, range(5)), steps, key_table=table)
    alone = model.decode_voxels(voxels[1:2], clip_seeds(7, [1]), steps, key_table=table)
    for name in DECODED:
        assert torch.allclose(getattr(batch, name)[1:2], getattr(alone, name), atol=1e-8), name


def test_brain_only_decoding_shapes_and_mask_queries():
    """One call gives every head's output; the mask is queried with the given key text, or with the key-table row of
    each clip's top concept, and both routes agree when the given text is that row."""
    model = make_model()
    b, s, dt = 3, model.cfg.decoder_size, DIMS.text_dim
    voxels, table = torch.randn(b, N_VOX), torch.randn(N_CLS, dt)
    dec = model.decode_voxels(voxels, clip_seeds(1, range(b)), 2, key_table=table, latent_size=5)
    shapes = {name: tuple(getattr(dec, name).shape) for name in DECODED}
    t, d = DIMS.clip_tokens, DIMS.clip_dim
    assert shapes == {"prior_tokens": (b, t, d), "motion": (b, F_, t, d), "caption_vector": (b, dt),
                      "concept_logits": (b, N_CLS), "mask_logits": (b, F_, s, s), "latents": (b, F_, 4, 5, 5),
                      "top_concept": (b,)}  # fmt: skip
    assert torch.equal(dec.top_concept, dec.concept_logits.argmax(-1))
    given = model.decode_voxels(voxels, clip_seeds(1, range(b)), 2, key_text=table[dec.top_concept], latent_size=5)
    for name in DECODED:
        assert torch.equal(getattr(given, name), getattr(dec, name)), name
    torch.testing.assert_close(dec.caption_prefix.norm(dim=-1), torch.ones(b))
    with pytest.raises(ValueError, match="exactly one"):
        model.decode_voxels(voxels, clip_seeds(1, range(b)), 2)


def test_caption_padding_dedicated_vs_upstream():
    m = make_model()
    prefix = torch.randn(2, DIMS.text_dim)
    tokens = torch.tensor([[5, 0, 9, 3, 0, 0], [7, 8, 0, 0, 0, 0]])  # id 0 is a real token at [0, 1]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    logits, labels, keep = m.caption_logits(prefix, tokens, mask)
    assert keep.tolist() == mask.tolist() and labels.tolist() == [5, 0, 9, 3, 7, 8]
    other_pads = torch.where(mask, tokens, torch.full_like(tokens, 33))
    logits2, _, _ = m.caption_logits(prefix, other_pads, mask)
    assert torch.allclose(logits, logits2, atol=1e-5)  # pad contents never reach real positions
    assert caption_labels(tokens, mask, "clip_zero")[0, 1].item() == IGNORE_INDEX  # upstream drops the real "0"
    up = make_model(caption_pad="clip_zero")
    _, _, up_keep = up.caption_logits(prefix, tokens, mask)
    assert not up_keep[0, 1]


@pytest.mark.parametrize("pad", ["dedicated", "clip_zero"])
def test_caption_logits_at_labelled_positions_equal_the_full_logits(pad):
    """The LM head runs on the labelled positions only: the same logits and labels as the full (B, L, V) logits of
    the text decoder there, in row-major order, and the same label-smoothed loss."""
    from utils.losses import caption_ce

    m = make_model(caption_pad=pad)
    prefix = torch.randn(2, DIMS.text_dim)
    tokens = torch.tensor([[5, 0, 9, 3, 0, 0], [7, 8, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    full = m.text_dec(prefix, tokens, mask if pad == "dedicated" else None)  # (B, L, V) reference
    labels = caption_labels(tokens, mask, pad)
    part, part_labels, keep = m.caption_logits(prefix, tokens, mask)
    assert keep.tolist() == (labels != IGNORE_INDEX).tolist() and part.shape == (int(keep.sum()), full.shape[-1])
    assert part_labels.tolist() == labels[keep].tolist()
    torch.testing.assert_close(part, full[keep], atol=1e-5, rtol=1e-5)
    loss_full = caption_ce(full, labels, 0.1)
    loss_part = torch.nn.functional.cross_entropy(part, part_labels, label_smoothing=0.1)
    torch.testing.assert_close(loss_part, loss_full, atol=1e-6, rtol=1e-5)


def test_generate_is_greedy_and_batch_independent(model):
    prefix = torch.randn(4, DIMS.text_dim)
    tokens, mask = model.text_dec.generate(prefix, max_new_tokens=6, eos_id=49)
    assert tokens.shape[0] == 4 and tokens.shape[1] <= 6 and mask[:, 0].all()
    alone, _ = model.text_dec.generate(prefix[2:3], max_new_tokens=tokens.shape[1], eos_id=49)
    assert torch.equal(alone[0], tokens[2, : alone.shape[1]])
    first = model.text_dec(prefix, tokens[:, :1], torch.ones(4, 1, dtype=torch.bool))[:, 0].argmax(-1)
    assert torch.equal(first, tokens[:, 0])


def test_concept_namer_granularity():
    names = ("animal", "human", "vehicle")
    fine = {"man": "human", "dog": "animal", "bus": "vehicle"}
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    fixed = ConceptNamer(names, fine)
    assert [fixed.train_name("man"), fixed.train_name(None), fixed.train_name("None")] == ["human", "None", "None"]
    assert fixed.infer_name(logits) == ["human", "animal"]  # same granularity as training
    upstream = ConceptNamer(names, fine, mode="upstream")
    assert upstream.train_name("man") == "man" and upstream.infer_name(logits) == ["human", "animal"]
    fine_mode = ConceptNamer(names, fine, mode="fine", class_to_key_object={"human": "man", "animal": "dog"})
    assert fine_mode.train_name("dog") == "dog" and fine_mode.infer_name(logits) == ["man", "dog"]
    with pytest.raises(DataError):
        fixed.train_name("spaceship")
    with pytest.raises(ConfigError):
        ConceptNamer(names, mode="coarse")


def test_initialisation_and_parts():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    cfg = brain_config("smoke", n_voxels=(N_VOX,), n_classes=N_CLS, dims=DIMS, n_frames=F_)
    m = NeuronsBrainModel(cfg, gpt2=gpt2)
    assert m.text_dec.decoder is gpt2
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())  # GPT-2 init untouched
    blends = [mod.weight.item() for mod in m.modules() if isinstance(mod, SpatioTemporalAttention)]
    assert blends and all(w == 1.0 for w in blends)
    assert not m.clipproj.proj.requires_grad
    initialize_weights(m)
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())
    stage1 = NeuronsBrainModel(
        brain_config("smoke", n_voxels=(N_VOX,), n_classes=N_CLS, dims=DIMS, parts=STAGE1_PARTS)
    )
    assert set(dict(stage1.named_children())) == set(STAGE1_PARTS)
    counts = parameter_counts(stage1)
    assert counts["total"] == counts["ridge"] + counts["backbone"] + counts["clipproj"]
