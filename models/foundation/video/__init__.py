"""Role ``video``: AnimateDiff v3 + SparseCtrl-RGB on RealisticVision V6.0 B1 (SD-1.5), on diffusers, for stage 5.

The four paper files and their key maps are loaded by :mod:`models.foundation.video.paper`; the toy model is
:mod:`models.foundation.video.toy`.

* Parity patch (on by default): diffusers' ``AnimateDiffTransformer3D`` GroupNorm pools statistics over all frames,
  AnimateDiff/NeuroClips normalise each frame; :func:`apply_per_frame_norm` swaps the class of those 20 (UNet) + 8
  (SparseCtrl) norms for :class:`PerFrameGroupNorm` (same keys).
* DDIM: ``beta_schedule="linear"``, 0.00085 -> 0.012, ``steps_offset=1``, no clipping, "leading" spacing, eta 0.

A toy builder returns ``VideoRole(tiny UNetMotionModel, tiny SparseControlNetModel, tiny AutoencoderKL,
tiny CLIPTextModel, tokenizer)``.
"""

from __future__ import annotations

import gzip
import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from models.foundation.common import SD_BETAS, ModuleRole
from models.foundation.weight_file import MB, WeightFile

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, SparseControlNetModel, UNetMotionModel

log = logging.getLogger(__name__)

# AnimateDiff v3 + SparseCtrl-RGB on RealisticVision V6.0 B1 (SD-1.5)
WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile("video", "animatediff/v3_sd15_mm.ckpt", "guoyww/animatediff", "v3_sd15_mm.ckpt", 1_673 * MB),
    WeightFile("video", "animatediff/v3_sd15_adapter.ckpt", "guoyww/animatediff", "v3_sd15_adapter.ckpt", 102 * MB),
    WeightFile(
        "video",
        "animatediff/v3_sd15_sparsectrl_rgb.ckpt",
        "guoyww/animatediff",
        "v3_sd15_sparsectrl_rgb.ckpt",
        1_988 * MB,
    ),
    WeightFile(
        "video",
        "animatediff/realisticVisionV60B1_v51VAE.safetensors",
        "guoyww/animatediff_t2i_backups",
        "realisticVisionV60B1_v51VAE.safetensors",
        2_133 * MB,
    ),
)

# ---------------------------------------------------------------------------------------------------------------------
# per-frame GroupNorm (AnimateDiff / NeuroClips parity)


class PerFrameGroupNorm(nn.GroupNorm):
    """GroupNorm that, on 5-D ``(B, C, F, H, W)`` input, normalises every frame on its own (frames folded into the
    batch), as AnimateDiff's motion modules do. Same parameters and keys as ``nn.GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def apply_per_frame_norm(model: nn.Module) -> int:
    """Swap the input GroupNorm of every ``AnimateDiffTransformer3D`` in ``model`` for :class:`PerFrameGroupNorm`
    (in place, keys unchanged). Returns how many were patched (20 for the v3 UNet, 8 for SparseCtrl-RGB)."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    count = 0
    for module in model.modules():
        if isinstance(module, AnimateDiffTransformer3D) and type(module.norm) is nn.GroupNorm:
            module.norm.__class__ = PerFrameGroupNorm
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer and scheduler


def sd15_tokenizer(max_length: int = 77) -> Any:
    """SD-1.5's CLIP tokenizer (49408 tokens) built in memory from ``bpe_simple_vocab_16e6.txt.gz`` shipped in the
    open_clip wheel: byte symbols, the same with ``</w>``, the first 48894 merges, then the two specials."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def make_ddim() -> DDIMScheduler:
    """AnimateDiff v3 / NeuroClips DDIM (bit-identical timesteps 961, 921, ..., 1 for 25 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SD_BETAS,
        beta_schedule="linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


# ---------------------------------------------------------------------------------------------------------------------
# role


class VideoRole(ModuleRole):
    """Keyframe-conditioned text-to-video generator. Latent videos are ``(B, C, F, h, w)``; frames ``(B, F, 3, H, W)``
    in [0, 1]. Attributes: ``num_frames`` (16), ``latent_channels`` (4), ``vae_scale`` (0.18215), ``downsample`` (8),
    ``text_dim`` (768), ``per_frame_norm``."""

    MAIN = "unet"

    def __init__(
        self,
        unet: UNetMotionModel,
        controlnet: SparseControlNetModel,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: DDIMScheduler | None = None,
        *,
        num_frames: int = 16,
        per_frame_norm: bool = True,
    ):
        self.unet, self.controlnet, self.vae = unet, controlnet, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler = scheduler or make_ddim()
        self.num_frames = num_frames
        self.latent_channels = int(unet.config.in_channels)
        self.vae_scale = float(vae.config.scaling_factor)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.text_dim = int(unet.config.cross_attention_dim)
        self.per_frame_norm = per_frame_norm
        if per_frame_norm:
            n_unet, n_ctrl = apply_per_frame_norm(unet), apply_per_frame_norm(controlnet)
            log.info("per-frame GroupNorm parity patch: %d UNet + %d SparseCtrl motion norms", n_unet, n_ctrl)

    @torch.no_grad()
    def encode_prompt(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` (N) -> ``(N, L, text_dim)`` last hidden states of the CLIP text encoder."""
        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def encode_frames(self, frames01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(..., 3, H, W)`` in [0, 1] -> ``(..., C, H/8, W/8)``: posterior sample of ``2x - 1`` times the scale."""
        lead = frames01.shape[:-3]
        x = frames01.reshape(-1, *frames01.shape[-3:]).to(self.device, self.vae.dtype) * 2.0 - 1.0
        z = self.vae.encode(x).latent_dist.sample(generator=generator) * self.vae_scale
        return z.reshape(*lead, *z.shape[1:])

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` -> ``(B, F, 3, 8h, 8w)`` in [0, 1], decoded frame by frame."""
        b, _, f = latents.shape[:3]
        z = latents.permute(0, 2, 1, 3, 4).reshape(b * f, *latents.shape[1:2], *latents.shape[3:])
        frames = [self.vae.decode(zi[None].to(self.device, self.vae.dtype) / self.vae_scale).sample for zi in z]
        x = (torch.cat(frames).float() / 2.0 + 0.5).clamp(0.0, 1.0)
        return x.reshape(b, f, *x.shape[1:])

    @staticmethod
    def keyframe_condition(
        key_latents: torch.Tensor, num_frames: int, index: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, h, w)`` keyframe latents -> SparseCtrl ``cond (B, C, F, h, w)`` (zeros except frame ``index``)
        and ``mask (B, 1, F, h, w)`` (1 at ``index``)."""
        b, c, h, w = key_latents.shape
        cond = key_latents.new_zeros(b, c, num_frames, h, w)
        mask = key_latents.new_zeros(b, 1, num_frames, h, w)
        cond[:, :, index] = key_latents
        mask[:, :, index] = 1.0
        return cond, mask

    def time_condition(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor | None:
        """Extra input of the UNet's time embedding (``timestep_cond``, ``(B, time_cond_proj_dim)``) computed from the
        SparseCtrl condition; None for the paper model, which has none. Toy models override it."""
        return None

    def noisy_start(self, init_latents: torch.Tensor, noise: torch.Tensor, num_steps: int = 25) -> torch.Tensor:
        """NeuroClips "low_strength" start: ``init_latents`` noised at the FIRST timestep of the ``num_steps`` DDIM
        grid (t = 961 for 25 steps, whatever the strength). ``(B, C, F, h, w)`` -> same."""
        self.scheduler.set_timesteps(num_steps, device=self.device)
        t0 = self.scheduler.timesteps[:1]
        return self.scheduler.add_noise(init_latents.to(self.device), noise.to(self.device), t0)

    @staticmethod
    def strength_steps(num_steps: int, strength: float) -> int:
        """How many of ``num_steps`` DDIM steps an img2img start at ``strength`` in [0, 1] runs:
        ``round(num_steps * strength)``."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        return round(num_steps * strength)

    def img2img_start(
        self, init_latents: torch.Tensor, noise: torch.Tensor, num_steps: int, strength: float
    ) -> tuple[torch.Tensor, int]:
        """A real img2img start (fixes defect 26): of the ``num_steps`` DDIM timesteps the last
        ``k = round(num_steps * strength)`` are run; ``init_latents (B, C, F, h, w)`` are noised to exactly the first
        of them. Returns ``(start latents, index of the first step to run)``; k = 0 returns the init latents and
        ``num_steps`` (nothing to denoise)."""
        self.scheduler.set_timesteps(num_steps, device=self.device)
        start = num_steps - self.strength_steps(num_steps, strength)
        init = init_latents.to(self.device)
        if start >= num_steps:
            return init, num_steps
        t = self.scheduler.timesteps[start : start + 1]
        return self.scheduler.add_noise(init, noise.to(self.device), t), start

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        num_steps: int = 25,
        guidance: float = 8.5,
        cond_scale: float = 1.0,
        start_step: int = 0,
    ) -> torch.Tensor:
        """DDIM (eta 0) with CFG [negative, positive] and SparseCtrl residuals, over the ``num_steps`` grid from
        step ``start_step`` on (img2img, :meth:`img2img_start`).
        ``latents (B, C, F, h, w)``, embeds ``(B, L, D)``, ``cond (B, C, F, h, w)``, ``cond_mask (B, 1, F, h, w)``
        -> ``(B, C, F, h, w)``."""
        sched = self.scheduler
        sched.set_timesteps(num_steps, device=self.device)
        x = latents.to(self.device, self.dtype)
        frames = latents.shape[2]
        # diffusers 0.42 motion models take per-frame text states (B*F, L, D), as its pipeline repeats them
        embeds = torch.cat([negative_embeds, prompt_embeds]).repeat_interleave(frames, dim=0)
        embeds = embeds.to(self.device, self.dtype)
        cond2 = torch.cat([cond, cond]).to(self.device, self.dtype)
        mask2 = torch.cat([cond_mask, cond_mask]).to(self.device, self.dtype)
        time_cond = self.time_condition(cond, cond_mask)
        extra = {} if time_cond is None else {"timestep_cond": torch.cat([time_cond] * 2).to(self.device, self.dtype)}
        for t in sched.timesteps[start_step:]:
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            down, mid = self.controlnet(
                x_in,
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=cond2,
                conditioning_mask=mask2,
                conditioning_scale=cond_scale,
                return_dict=False,
            )
            eps = self.unet(
                x_in,
                t,
                encoder_hidden_states=embeds,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                **extra,
            ).sample
            eps_u, eps_c = eps.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        return x

    def generate(
        self,
        prompts: list[str],
        negative_prompt: str,
        keyframes01: torch.Tensor,
        init_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_steps: int = 25,
        guidance: float = 8.5,
        cond_scale: float = 1.0,
        strength: float | None = None,
    ) -> torch.Tensor:
        """Keyframe ``(B, 3, H, W)`` in [0, 1] at frame 0 + captions -> video ``(B, F, 3, H, W)`` in [0, 1].
        ``init_latents (B, C, F, h, w)`` (e.g. the encoded blurry video) are noised at the first timestep and all
        steps run (upstream, ``strength=None``), or img2img at ``strength`` (:meth:`img2img_start`); without them the
        start is pure noise. RNG order: keyframe VAE sample, then the start noise."""
        key = self.encode_frames(keyframes01, generator=generator)
        b, c, h, w = key.shape
        cond, mask = self.keyframe_condition(key, self.num_frames)
        shape = (b, c, self.num_frames, h, w)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=gen_device).to(self.device)
        first = 0
        if init_latents is None:
            start = noise
        elif strength is None:
            start = self.noisy_start(init_latents, noise, num_steps)
        else:
            start, first = self.img2img_start(init_latents, noise, num_steps, strength)
        pos = self.encode_prompt(prompts)
        neg = self.encode_prompt([negative_prompt] * b)
        out = self.denoise(start, pos, neg, cond, mask, num_steps, guidance, cond_scale, start_step=first)
        return self.decode_latents(out)
