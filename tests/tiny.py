"""Tiny diffusers components for the tests: built from configs, random weights, seeded."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

SD_TEXT_DIM = 32
XL_TEXT_DIM = 64
XL_POOLED_DIM = 32


def sd_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """SD1.x-style: CrossAttn down blocks, a plain bottom level, conv projections."""
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 48, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=SD_TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg).eval()


def sdxl_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """SDXL-style: plain top level, several transformer layers per block, linear projections,
    text-time added conditioning, varied head dims."""
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(4, 6, 8),
        use_linear_projection=True, cross_attention_dim=XL_TEXT_DIM, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + XL_POOLED_DIM,
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg).eval()


def vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def ddim() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd_inputs(unet, batch=2, size=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g).to(dtype)
    ehs = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g).to(dtype)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, XL_POOLED_DIM, generator=g).to(dtype),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch).to(dtype),
        }
    return sample, ehs, kw


def make_sd_pipeline(unet=None, scheduler=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=None, tokenizer=None, unet=unet or sd_unet(),
        scheduler=scheduler or ddim(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_pipeline(unet=None, scheduler=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet or sdxl_unet(), scheduler=scheduler or ddim(), force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_prompt_kwargs(batch=1, seed=2, dim=SD_TEXT_DIM):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 7, dim, generator=g),
                negative_prompt_embeds=torch.randn(batch, 7, dim, generator=g))


def sdxl_prompt_kwargs(batch=1, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, 7, XL_TEXT_DIM, generator=g),
        negative_prompt_embeds=torch.randn(batch, 7, XL_TEXT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(batch, XL_POOLED_DIM, generator=g),
        negative_pooled_prompt_embeds=torch.randn(batch, XL_POOLED_DIM, generator=g),
    )
