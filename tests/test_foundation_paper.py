"""Paper side of the foundation roles: key maps against the checkpoint manifests (meta tensors, strict loads),
the weights catalog, and the role interfaces on tiny real-library models (no mocks, no weights, no network)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.foundation import (
    blip2,
    build_role,
    catalog,
    catalog_table,
    describe_missing,
    frame_classifier,
    gpt2,
    missing_weights,
    require_weights,
    unclip,
    video,
)
from models.foundation import clip as clip_role
from models.foundation.clip import paper as clip_paper
from models.foundation.common import build_empty, count_params, load_strict, read_checkpoint, read_json_config
from models.foundation.manifest import header_int, read_manifest
from models.foundation.unclip import paper as unclip_paper
from models.foundation.video import paper as video_paper
from utils.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]


FIXTURES = Path(__file__).resolve().parent / "fixtures"  # key/shape manifests of the real checkpoints


def _manifest(name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    return read_manifest(FIXTURES / name)


# ---------------------------------------------------------------------------------------------------------------------
# manifests -> our key maps -> strict meta loads


def test_unclip6_manifest_converts_and_loads_strictly():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sd, header = _manifest("mindeye2_unclip6.tsv")
    unet_sd, vae_sd, dropped = unclip_paper.convert_checkpoint(sd)
    unet_cfg = unclip_paper.unet_config_paper()
    unet = load_strict(build_empty(lambda: UNet2DConditionModel.from_config(unet_cfg)), unet_sd, "u")
    vae = load_strict(build_empty(lambda: AutoencoderKL.from_config(unclip_paper.vae_config_paper())), vae_sd, "v")
    assert len(unet_sd) == 1680 and len(vae_sd) == 248
    assert count_params(unet) == header_int(header, r"numel\[model\.diffusion_model\]=(\d+)") == 2_501_272_324
    assert count_params(vae) == header_int(header, r"numel\[first_stage_model\]=(\d+)") == 83_653_863
    assert set(dropped) == {k for k in sd if k.startswith(("conditioner.", "denoiser."))} and len(dropped) == 591
    assert vae.config.scaling_factor == 0.13025 and unet.config.cross_attention_dim == 1664


def test_unclip6_key_map_rejects_unknown_keys():
    sd, _ = _manifest("mindeye2_unclip6.tsv")
    sd["model.diffusion_model.extra_block.weight"] = torch.empty(1, device="meta")
    with pytest.raises(WeightsError, match="no mapping"):
        unclip_paper.convert_checkpoint(sd)


def test_unclip6_bigg_tower_is_the_clip_role_architecture():
    """The frozen embedder saved in unclip6 is open_clip ViT-bigG-14 minus its text transformer: the clip role's model
    (so the clip role's image tokens are the unCLIP conditioning), with the paper sizes 256 x 1664 and 1280."""
    import open_clip

    sd, _ = _manifest("mindeye2_unclip6.tsv")
    prefix = "conditioner.embedders.0.model."
    tower = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    model = build_empty(lambda: open_clip.CLIP(**clip_paper.bigg_config()))
    own = model.state_dict()
    assert set(tower) <= set(own)
    assert all(own[k].shape == v.shape for k, v in tower.items())
    assert {k.split(".")[0] for k in set(own) - set(tower)} == {"transformer"} and len(set(own) - set(tower)) == 384
    role = clip_role.ClipRole(model, open_clip.SimpleTokenizer())
    assert (role.num_tokens, role.token_dim, role.text_dim, role.image_size) == (256, 1664, 1280, 224)


def test_motion_module_manifest_converts_and_loads_strictly():
    from diffusers import MotionAdapter

    sd, header = _manifest("animatediff_v3_sd15_mm.tsv")
    conv = video_paper.convert_animatediff(sd, "mm")
    mm_cfg = video_paper.motion_adapter_config()
    adapter = load_strict(build_empty(lambda: MotionAdapter.from_config(mm_cfg)), conv, "mm")
    assert len(sd) == 560 and len(conv) == 540
    assert count_params(adapter) == header_int(header, r"parameters \(excluding pe\): (\d+)") == 417_137_600
    assert sum(1 for k in conv if k.endswith("pos_embed.pe")) == 20


def test_sparsectrl_manifest_converts_and_loads_strictly():
    from diffusers import SparseControlNetModel

    sd, header = _manifest("animatediff_v3_sd15_sparsectrl_rgb.tsv")
    conv = video_paper.convert_animatediff(sd, "sparsectrl")
    sc_cfg = video_paper.sparsectrl_config()
    net = load_strict(build_empty(lambda: SparseControlNetModel.from_config(sc_cfg)), conv, "sc")
    pe = sum(b.numel() for n, b in net.named_buffers() if n.endswith("pos_embed.pe"))
    assert len(conv) == len(sd) == 486
    assert count_params(net) == 496_730_880
    assert count_params(net) + pe == header_int(header, r"elements: (\d+)")
    assert video.apply_per_frame_norm(net) == 8


def test_adapter_lora_manifest_resolves_every_target_of_the_sd15_unet():
    from diffusers import UNet2DConditionModel

    sd, header = _manifest("animatediff_v3_sd15_adapter.tsv")
    pairs = video_paper.lora_pairs(sd)
    unet = build_empty(
        lambda: UNet2DConditionModel.from_config(read_json_config("sd15_single_file", "unet", "config.json"))
    )
    assert len(pairs) == 128
    assert sum(up.numel() + down.numel() for up, down in pairs.values()) == header_int(header, r"elements: (\d+)")
    assert {up.shape[1] for up, _ in pairs.values()} == {128}
    assert video_paper.merge_lora(unet, pairs) == 128  # shape-checked against the UNet, then merged (on meta)
    peft = video_paper.lora_peft_state_dict(sd)
    assert len(peft) == 256 and all(k.startswith("unet.") for k in peft)


def test_adapter_lora_rejects_foreign_keys():
    bad = {"down_blocks.0.attentions.0.proj_in.weight": torch.zeros(2, 2)}
    with pytest.raises(WeightsError, match="unknown keys"):
        video_paper.lora_pairs(bad)


# ---------------------------------------------------------------------------------------------------------------------
# tiny real-library models: interfaces, shapes and the upstream quirks


def _tiny_clip():
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 24, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    return clip_role.ClipRole(model, open_clip.SimpleTokenizer(context_length=16))


def test_clip_image_tokens_use_the_half_shift_quirk_and_skip_proj():
    role = _tiny_clip()
    seen = {}
    h1 = role.model.visual.conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0].clone()))
    h2 = role.model.visual.ln_post.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_post", out.clone()))
    frames = torch.rand(2, 3, 3, 40, 40)  # (B, F, 3, H, W) in [0, 1]
    tokens = role.image_tokens(frames)
    h1.remove()
    h2.remove()
    assert (role.num_tokens, role.token_dim, role.text_dim) == (16, 24, 16)
    assert tokens.shape == (2, 3, 16, 24)  # token width 24, not the projected 16
    x = F.interpolate(frames.reshape(6, 3, 40, 40), size=(32, 32), mode="bicubic", align_corners=True, antialias=True)
    mean = torch.tensor(clip_role.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_role.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["input"], ((x + 1) / 2 - mean) / std)
    torch.testing.assert_close(tokens.reshape(6, 16, 24), seen["ln_post"][:, 1:])
    # at the native size there is no resize: the input is exactly ((x+1)/2 - mean)/std
    native = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(role.preprocess(native), ((native + 1) / 2 - mean) / std)


def test_clip_text_pooled_is_open_clip_encode_text():
    role = _tiny_clip()
    texts = ["a man riding a horse", "None"]
    pooled = role.text_pooled(texts)
    assert pooled.shape == (2, role.text_dim)
    torch.testing.assert_close(pooled, role.model.encode_text(role.tokenize(texts), normalize=False))
    assert role.tokenize(["a plane"])[0, :4].tolist() == [49406, 320, 5363, 49407]


def _tiny_vae(scale: float = 0.5):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        scaling_factor=scale,
    ).eval()


def test_vae_role_scales_latents_and_maps_to_unit_range():
    from models.foundation.vae import VaeRole

    role = VaeRole(_tiny_vae(0.5))
    frames = torch.rand(2, 3, 3, 16, 16)
    z = role.encode(frames)
    assert z.shape == (2, 3, 4, 8, 8) and role.downsample == 2
    ref = role.vae.encode(frames.reshape(6, 3, 16, 16) * 2 - 1).latent_dist.mode() * 0.5
    torch.testing.assert_close(z.reshape(6, 4, 8, 8), ref)
    out = role.decode(z)
    assert out.shape == frames.shape and out.min() >= 0 and out.max() <= 1
    raw = role.vae.decode(z.reshape(6, 4, 8, 8) / 0.5).sample
    torch.testing.assert_close(out.reshape(6, 3, 16, 16), (raw / 2 + 0.5).clamp(0, 1))


def _tiny_unclip() -> unclip.UnclipRole:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=4,
        use_linear_projection=True,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=32,
    ).eval()
    return unclip.UnclipRole(unet, _tiny_vae(0.13025), num_steps=4)


def test_unclip_sampler_grid_vector_and_output_remap():
    role = _tiny_unclip()
    assert unclip.euler_timesteps(38)[:3] == [999, 972, 946] and unclip.euler_timesteps(38)[-1] == 26
    assert len(unclip.euler_timesteps(38)) == 38
    role.scheduler.set_timesteps(timesteps=unclip.euler_timesteps(38))
    ac = role.scheduler.alphas_cumprod.double()
    ddpm = ((1 - ac) / ac).sqrt()[unclip.euler_timesteps(38)]
    torch.testing.assert_close(role.scheduler.sigmas[:-1].double(), ddpm, rtol=1e-5, atol=0)
    vec = unclip.size_vector(1024)
    assert vec.shape == (1, 1024)
    assert torch.allclose(
        vec[0, :128], torch.cos(768 * torch.exp(-torch.arange(128) * torch.log(torch.tensor(1e4)) / 128)), atol=1e-3
    )
    assert torch.equal(vec[0, 512:], torch.cat([torch.ones(128), torch.zeros(128)] * 2))  # crop (0, 0)
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(unclip.UnclipRole.remap(x), (0.8 * x + 0.2).clamp(0, 1))
    assert role.original_size == (16, 16) and role.vector_dim == 32 and role.token_dim == 24


def test_unclip_reconstruct_shapes_remap_and_per_sample_seeds():
    role = _tiny_unclip()
    tokens = torch.randn(2, 5, 24)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = role.reconstruct(tokens, gens)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    raw = role.decode_raw(role.sample_latents(tokens, gens))
    torch.testing.assert_close(out, (0.8 * raw + 0.2).clamp(0, 1))
    single = role.reconstruct(tokens[1:], [torch.Generator().manual_seed(2)])  # batch-size independent
    torch.testing.assert_close(single, out[1:], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(role.reconstruct(tokens[:1] * 3, [torch.Generator().manual_seed(1)]), out[:1])


def _tiny_motion_unet():
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
        use_motion_mid_block=False,
    )
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    with torch.no_grad():  # make the zero-initialised motion outputs live
        for name, p in unet.named_parameters():
            if "motion_modules" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return unet2d, unet.eval()


class _NaivePerFrameNorm(nn.Module):
    """Reference: the AnimateDiff GroupNorm applied frame by frame in a Python loop."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([nn.GroupNorm.forward(self.norm, x[:, :, f]) for f in range(x.shape[2])], dim=2)


def test_per_frame_norm_patch_matches_a_naive_reference():
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    _, unet = _tiny_motion_unet()
    reference, patched = copy.deepcopy(unet), copy.deepcopy(unet)
    for module in reference.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            module.norm = _NaivePerFrameNorm(module.norm)
    assert video.apply_per_frame_norm(patched) == 6  # 2 down + 4 up motion modules, none in the mid block
    assert video.apply_per_frame_norm(patched) == 0  # idempotent
    assert list(patched.state_dict()) == list(unet.state_dict())  # same keys, loads the same checkpoints
    x = torch.randn(1, 4, 6, 8, 8) * torch.linspace(0.2, 3, 6).view(1, 1, 6, 1, 1)  # frames of different scale
    args = dict(timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(6, 7, 16))  # (B*F, L, D)
    with torch.no_grad():
        out_ref, out_new, out_old = (m(x, **args).sample for m in (reference, patched, unet))
    torch.testing.assert_close(out_new, out_ref, atol=1e-5, rtol=1e-5)
    assert (out_old - out_ref).abs().max() > 1e-3  # diffusers' all-frames statistics differ


def test_per_frame_group_norm_normalises_each_frame():
    norm = video.PerFrameGroupNorm(2, 4, eps=1e-6)
    x = torch.randn(2, 4, 3, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1, 1) + 7
    y = norm(x).reshape(2, 2, 2, 3, 25).transpose(2, 3).reshape(2, 2, 3, 50)  # (B, group, F, values)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 2, 3), atol=1e-3, rtol=0)
    flat = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(norm(flat), F.group_norm(flat, 2, norm.weight, norm.bias, 1e-6))


def test_lora_merge_adds_up_times_down():
    unet2d, _ = _tiny_motion_unet()
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"
    w = unet2d.state_dict()[target].clone()
    up, down = torch.randn(w.shape[0], 3), torch.randn(3, w.shape[1])
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora"
    pairs = video_paper.lora_pairs({f"{prefix}.up.weight": up, f"{prefix}.down.weight": down})
    assert video_paper.merge_lora(unet2d, pairs, scale=0.5) == 1
    torch.testing.assert_close(unet2d.state_dict()[target], w + 0.5 * up @ down)
    with pytest.raises(WeightsError, match="shape"):
        video_paper.merge_lora(unet2d, {target: (up[:, :2], down[:2, :-1])})


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = video.sd15_tokenizer(max_length=12)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=12,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg).eval(), tok


def test_video_role_generate_end_to_end_on_tiny_models():
    from diffusers import SparseControlNetModel

    _, unet = _tiny_motion_unet()
    torch.manual_seed(0)
    controlnet = SparseControlNetModel(
        in_channels=4,
        conditioning_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        cross_attention_dim=16,
        conditioning_embedding_out_channels=(8, 8),
        norm_num_groups=4,
        attention_head_dim=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
        use_simplified_condition_embedding=True,
        concat_conditioning_mask=True,
    ).eval()
    text_encoder, tok = _tiny_text_encoder()
    role = video.VideoRole(unet, controlnet, _tiny_vae(0.18215), text_encoder, tok, num_frames=4)
    assert role.per_frame_norm and type(controlnet.down_blocks[0].motion_modules[0].norm) is video.PerFrameGroupNorm
    keyframe = torch.rand(1, 3, 16, 16)
    cond, mask = role.keyframe_condition(role.encode_frames(keyframe), 4)
    assert cond.shape == (1, 4, 4, 8, 8) and mask[0, 0, :, 0, 0].tolist() == [1, 0, 0, 0]
    init = torch.randn(1, 4, 4, 8, 8)
    out = role.generate(
        ["a plane"],
        "cartoon",
        keyframe,
        init_latents=init,
        generator=torch.Generator().manual_seed(0),
        num_steps=3,
        guidance=8.5,
    )
    assert out.shape == (1, 4, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    role.scheduler.set_timesteps(25)
    assert role.scheduler.timesteps[:2].tolist() == [961, 921] and role.scheduler.timesteps[-1] == 1


def test_sd15_tokenizer_matches_open_clip_ids():
    import open_clip

    tok = video.sd15_tokenizer()
    text = "A man riding a horse, 8k uhd, dslr!"
    ids = tok(text).input_ids
    assert len(tok) == 49408 and tok("a plane").input_ids == [49406, 320, 5363, 49407]
    assert ids == open_clip.tokenize([text])[0, : len(ids)].tolist()


def test_hf_roles_on_tiny_models():
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        VideoMAEConfig,
        VideoMAEForVideoClassification,
        VideoMAEImageProcessor,
    )

    from models.foundation.clip_pcc import ClipPccRole
    from models.foundation.video_classifier import VideoClassifierRole

    torch.manual_seed(0)
    vm = VideoMAEForVideoClassification(
        VideoMAEConfig(
            image_size=32,
            patch_size=8,
            num_frames=6,
            tubelet_size=2,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            num_labels=5,
        )
    ).eval()
    vrole = VideoClassifierRole(
        vm, VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    )
    probs = vrole.probs(torch.rand(2, 6, 3, 40, 40))
    assert probs.shape == (2, 5) and vrole.num_frames == 6
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "vocab_size": 100,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=12,
    )
    crole = ClipPccRole(
        CLIPModel(cfg).eval(), CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    )
    assert crole.image_features(torch.rand(3, 3, 48, 40)).shape == (3, 12)


def test_blip2_role_captions_on_a_tiny_model():
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    from models.foundation.blip2 import Blip2Role

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(bytes_to_unicode().values())}, "<image>": 257}
    tok = GPT2Tokenizer(
        vocab=vocab, merges=[], bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    small = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 1}
    cfg = Blip2Config(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        qformer_config={**small, "encoder_hidden_size": 16, "vocab_size": 100},
        text_config={
            "model_type": "opt",
            "hidden_size": 16,
            "ffn_dim": 24,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "vocab_size": len(tok),
            "word_embed_proj_dim": 16,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        },
        num_query_tokens=2,
        image_token_index=257,
    )
    torch.manual_seed(0)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok, num_query_tokens=2
    )
    role = Blip2Role(Blip2ForConditionalGeneration(cfg).eval(), processor)
    captions = role.caption(torch.rand(2, 3, 40, 40), max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) and "<image>" not in c for c in captions)


def test_hf_paper_loaders_read_local_folders_strictly(tmp_path):
    """The transformers paper loaders run end to end on tiny checkpoints saved in the catalog layout."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification, ViTImageProcessor

    gpt_dir = tmp_path / gpt2.GPT2_REPO
    GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt_dir)
    vit_dir = tmp_path / frame_classifier.VIT_REPO
    ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            num_labels=7,
        )
    ).save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_dir)
    assert missing_weights(tmp_path, ["gpt2", "frame_classifier"]) == []
    gpt = build_role("gpt2", "paper", tmp_path, "cpu")
    assert gpt.hidden_size == 16 and all(p.requires_grad for p in gpt.model.parameters())  # stage 2 trains it
    assert gpt.embed_tokens(torch.tensor([[1, 2]])).shape == (1, 2, 16)
    vit = build_role("frame_classifier", "paper", tmp_path, "cpu")
    assert vit.probs(torch.rand(2, 3, 40, 40)).shape == (2, 7) and not vit.model.training
    sd = load_file(gpt_dir / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "h.0.mlp.c_fc" not in k}, gpt_dir / "model.safetensors")
    with pytest.raises(WeightsError, match="missing keys"):
        build_role("gpt2", "paper", tmp_path, "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# catalog, missing and corrupt weights


def test_missing_weights_stop_before_work_with_one_line(tmp_path):
    with pytest.raises(WeightsError) as err:
        require_weights(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "fix:" in msg and "download_dataset.py --weights" in msg
    assert all(e.relpath in msg for e in catalog.CATALOG)
    with pytest.raises(WeightsError, match="unclip6_epoch0_step110000.ckpt") as err:
        build_role("unclip", "paper", tmp_path, "cpu")
    assert "v3_sd15_mm.ckpt" not in str(err.value)
    video_files = [e.relpath for e in catalog.entries(["video"])]
    (tmp_path / "animatediff").mkdir()
    (tmp_path / video_files[0]).write_bytes(b"x")
    assert [e.relpath for e in missing_weights(tmp_path, ["video"])] == video_files[1:]
    assert video_files[0] not in describe_missing(tmp_path, ["video"])
    with pytest.raises(WeightsError, match="unknown foundation role"):
        missing_weights(tmp_path, ["dalle"])


def test_sharded_weights_count_only_when_every_shard_is_there(tmp_path):
    folder = tmp_path / blip2.BLIP2_REPO
    folder.mkdir(parents=True)
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "s1.safetensors").write_bytes(b"x")
    index_entry = next(e for e in catalog.entries(["blip2"]) if e.filename == "model.safetensors.index.json")
    assert index_entry in missing_weights(tmp_path, ["blip2"])
    (folder / "s2.safetensors").write_bytes(b"x")
    assert index_entry not in missing_weights(tmp_path, ["blip2"])


def test_catalog_table_lists_every_file_with_presence(tmp_path):
    (tmp_path / "unclip6_epoch0_step110000.ckpt").write_bytes(b"x")
    rows = catalog.catalog_rows(tmp_path)
    assert len(rows) == len(catalog.CATALOG)
    present = {r["file"]: r["present"] for r in rows}
    assert present["unclip6_epoch0_step110000.ckpt"] == "yes" and present["animatediff/v3_sd15_mm.ckpt"] == "no"
    assert next(r for r in rows if r["role"] == "unclip")["download"].startswith(
        "hf download pscotti/mindeyev2 unclip6_epoch0_step110000.ckpt --repo-type dataset"
    )
    text = catalog_table(tmp_path)
    assert len(text.splitlines()) == len(catalog.CATALOG) + 1 and "present" in text.splitlines()[0]


class _Opaque:
    """A non-allow-listed Python object inside a checkpoint."""


def test_lightning_checkpoint_unwraps_and_unsafe_pickle_needs_consent(tmp_path):
    from models.foundation.common import unwrap_state_dict

    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": {"a.w": torch.ones(2), "a.note": "text"},
            "epoch": 0,
            "global_step": 110000,
            "pytorch-lightning_version": "1.5.0",
        },
        path,
    )
    assert list(unwrap_state_dict(read_checkpoint(path), path)) == ["a.w"]
    opaque = tmp_path / "opaque.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": _Opaque()}, opaque)
    with pytest.raises(WeightsError, match="allow_unsafe_pickle"):
        read_checkpoint(opaque)
    assert list(unwrap_state_dict(read_checkpoint(opaque, allow_unsafe_pickle=True), opaque)) == ["w"]


def test_corrupt_and_truncated_checkpoints_raise_weights_error(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, good)
    assert torch.equal(read_checkpoint(good)["state_dict"]["w"], torch.ones(64, 64))
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        read_checkpoint(truncated)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        read_checkpoint(bad)
    with pytest.raises(WeightsError, match="missing weight file"):
        read_checkpoint(tmp_path / "absent.pth")
