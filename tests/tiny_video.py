"""Tiny diffusers *video* components for the tests: built from configs, seeded random weights, no hub.

Three UNet families, each with a builder, a helper returning the kwargs of one UNet call, and a
tiny end-to-end pipeline:

* AnimateDiff: ``UNetMotionModel`` = tiny ``UNet2DConditionModel`` + tiny ``MotionAdapter`` joined
  with ``UNetMotionModel.from_unet2d``; sample (B, C, F, H, W).
* ModelScope text-to-video: ``UNet3DConditionModel``; sample (B, C, F, H, W).
* Stable Video Diffusion: ``UNetSpatioTemporalConditionModel``; sample (B, F, C, H, W), encoder
  hidden states (B, 1, D), added_time_ids (B, 3).

Shape constraints found in diffusers 0.42.1 (why the configs look the way they do):

* SVD hard-codes ``GroupNorm(32, ...)`` in TransformerSpatioTemporalModel.norm, in both norms of
  TemporalResnetBlock, in the spatial ResnetBlock2D of SpatioTemporalResBlock (default groups) and
  in conv_norm_out, and AutoencoderKLTemporalDecoder's decoder does the same: every SVD channel
  count must be a multiple of 32.
* UNetMotionModel's motion modules take their GroupNorm groups from the UNet's ``norm_num_groups``
  (not from the adapter's ``motion_norm_num_groups``; only the parameter shapes are shared).
* TemporalConvLayer (UNet3D temp_convs) zero-initialises its conv4, so a fresh UNet3D's temporal
  convolutions are exact identities. ``unet3d()`` re-draws those conv4 weights (seeded, default
  Conv3d init) unless ``zero_temp_convs=True``, so that statements about temp_convs are not vacuous.
"""
from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)

from tiny import SD_TEXT_DIM, ddim, vae

MOTION_CHANNELS = (24, 40, 56, 64)
SVD_TIME_DIM = 8  # addition_time_embed_dim; three added time ids (fps, motion bucket, noise aug)
SVD_IMAGE_DIM = 32  # CLIP image embedding size = SVD cross_attention_dim


# ---------------------------------------------------------------------------------------------
# AnimateDiff
# ---------------------------------------------------------------------------------------------

def _motion_levels(levels: int):
    if not 2 <= levels <= 4:
        raise ValueError(f"levels must be 2..4, got {levels}")
    channels = MOTION_CHANNELS[:levels]
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    return channels, down, up


def motion_adapter(seed: int = 0, levels: int = 3, **overrides) -> MotionAdapter:
    """A tiny MotionAdapter matching ``motion_unet(levels=levels)``: 2 motion layers per down block
    (3 per up block), a 1-layer motion mid block, per-level temporal head counts (2, 4, 4, 4)."""
    channels, _, _ = _motion_levels(levels)
    torch.manual_seed(seed)
    cfg = dict(
        block_out_channels=channels, motion_layers_per_block=2,
        motion_transformer_layers_per_block=1, motion_mid_block_layers_per_block=1,
        motion_transformer_layers_per_mid_block=1,
        motion_num_attention_heads=(2, 4, 4, 4)[:levels], motion_norm_num_groups=8,
        motion_max_seq_length=16, use_motion_mid_block=True,
    )
    cfg.update(overrides)
    return MotionAdapter(**cfg).eval()


def motion_unet(seed: int = 0, levels: int = 3, adapter_overrides=None, **overrides) -> UNetMotionModel:
    """UNetMotionModel.from_unet2d(tiny SD-style UNet2DConditionModel, tiny MotionAdapter).

    levels=3: channels (24, 40, 56), down (CrossAttnDownBlockMotion, CrossAttnDownBlockMotion,
    DownBlockMotion), up (UpBlockMotion, CrossAttnUpBlockMotion, CrossAttnUpBlockMotion), mid
    UNetMidBlockCrossAttnMotion (resnet, then [attention, motion module, resnet]), 2 layers per
    down block, 3 per up block, norm groups 8, spatial heads 8, text dim 32. ``overrides`` go to the
    UNet2DConditionModel config, ``adapter_overrides`` to the MotionAdapter's.
    """
    channels, down, up = _motion_levels(levels)
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=SD_TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    cfg.update(overrides)
    unet2d = UNet2DConditionModel(**cfg)
    adapter = motion_adapter(seed + 1, levels=levels, **(adapter_overrides or {}))
    return UNetMotionModel.from_unet2d(unet2d, adapter).eval()


def motion_inputs(unet, batch=2, frames=8, size=16, seed=1, dtype=torch.float32) -> dict:
    """kwargs of one UNetMotionModel call: sample (B, C, F, H, W), timestep, encoder_hidden_states
    (B * F, 7, cross_attention_dim), return_dict=False.

    UNetMotionModel, unlike UNet3DConditionModel, does not repeat the text states over frames
    itself: AnimateDiffPipeline passes ``prompt_embeds.repeat_interleave(num_frames, dim=0)``, and so
    does this helper (one prompt per video, repeated frame-major within each video)."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, frames, size, size, generator=g).to(dtype)
    ehs = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g).to(dtype)
    ehs = ehs.repeat_interleave(frames, dim=0)
    return dict(sample=sample, timestep=torch.tensor(501), encoder_hidden_states=ehs, return_dict=False)


# ---------------------------------------------------------------------------------------------
# ModelScope text-to-video (UNet3DConditionModel)
# ---------------------------------------------------------------------------------------------

def unet3d(seed: int = 0, zero_temp_convs: bool = False, **overrides) -> UNet3DConditionModel:
    """A tiny UNet3DConditionModel: channels (24, 40, 56), down (CrossAttnDownBlock3D,
    CrossAttnDownBlock3D, DownBlock3D), up (UpBlock3D, CrossAttnUpBlock3D, CrossAttnUpBlock3D),
    UNetMidBlock3DCrossAttn, 2 layers per down block (3 per up block), norm groups 8,
    attention_head_dim 8 (which UNet3D reads as 8 heads; transformer_in gets 8 heads of 8),
    text dim 32. Every TemporalConvLayer's zero-initialised conv4 is re-drawn (see module doc)."""
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(24, 40, 56),
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=SD_TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    cfg.update(overrides)
    model = UNet3DConditionModel(**cfg)
    if not zero_temp_convs:
        from diffusers.models.resnet import TemporalConvLayer

        torch.manual_seed(seed + 1)
        for m in model.modules():
            if isinstance(m, TemporalConvLayer):
                m.conv4[-1].reset_parameters()
    return model.eval().float()


def unet3d_inputs(unet, batch=2, frames=8, size=16, seed=1, dtype=torch.float32) -> dict:
    """kwargs of one UNet3DConditionModel call: sample (B, C, F, H, W), timestep,
    encoder_hidden_states (B, 7, cross_attention_dim), return_dict=False."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, frames, size, size, generator=g).to(dtype)
    ehs = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g).to(dtype)
    return dict(sample=sample, timestep=torch.tensor(501), encoder_hidden_states=ehs, return_dict=False)


# ---------------------------------------------------------------------------------------------
# Stable Video Diffusion (UNetSpatioTemporalConditionModel)
# ---------------------------------------------------------------------------------------------

def svd_unet(seed: int = 0, **overrides) -> UNetSpatioTemporalConditionModel:
    """A tiny UNetSpatioTemporalConditionModel: channels (32, 64, 64) (multiples of 32, see module
    doc), down (CrossAttnDownBlockSpatioTemporal x2, DownBlockSpatioTemporal), up
    (UpBlockSpatioTemporal, CrossAttnUpBlockSpatioTemporal x2), UNetMidBlockSpatioTemporal,
    2 layers per down block (3 per up block), heads (2, 4, 4), in 8 (4 noise + 4 image-latent
    channels), out 4, cross_attention_dim 32 (= CLIP image embedding), addition_time_embed_dim 8,
    projection_class_embeddings_input_dim 24 = 3 added time ids x 8."""
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16, in_channels=8, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                          "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                        "CrossAttnUpBlockSpatioTemporal"),
        num_attention_heads=(2, 4, 4), cross_attention_dim=SVD_IMAGE_DIM,
        addition_time_embed_dim=SVD_TIME_DIM, projection_class_embeddings_input_dim=3 * SVD_TIME_DIM,
        num_frames=4,
    )
    cfg.update(overrides)
    return UNetSpatioTemporalConditionModel(**cfg).eval().float()


def svd_inputs(unet, batch=2, frames=4, size=16, seed=1, dtype=torch.float32) -> dict:
    """kwargs of one UNetSpatioTemporalConditionModel call: sample (B, F, C, H, W), timestep,
    encoder_hidden_states (B, 1, D), added_time_ids (B, 3) = (fps - 1, motion bucket, noise aug),
    return_dict=False."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, frames, unet.config.in_channels, size, size, generator=g).to(dtype)
    ehs = torch.randn(batch, 1, unet.config.cross_attention_dim, generator=g).to(dtype)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * batch).to(dtype)
    return dict(sample=sample, timestep=torch.tensor(1.5), encoder_hidden_states=ehs,
                added_time_ids=ids, return_dict=False)


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

def prompt_kwargs(batch=1, seed=2, dim=SD_TEXT_DIM) -> dict:
    """prompt_embeds / negative_prompt_embeds (B, 7, dim): the pipelines run without a text
    encoder or tokenizer, as tests/tiny.py's SD pipelines do."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 7, dim, generator=g),
                negative_prompt_embeds=torch.randn(batch, 7, dim, generator=g))


def animatediff_pipeline(seed: int = 0, unet=None, scheduler=None, levels: int = 3):
    """AnimateDiffPipeline(tiny AutoencoderKL (scale 2), no text encoder/tokenizer, UNetMotionModel,
    its MotionAdapter, DDIMScheduler).

    Working call (3 s order on one CPU core)::

        pipe(**prompt_kwargs(), num_frames=4, height=32, width=32, num_inference_steps=3,
             guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", return_dict=False)[0]      # latents (1, 4, F, 16, 16)

    output_type="pt" decodes through the VAE: frames (1, F, 3, 32, 32) in [0, 1].
    """
    from diffusers import AnimateDiffPipeline

    return _animatediff(AnimateDiffPipeline, seed, unet, scheduler, levels)


def animatediff_v2v_pipeline(seed: int = 0, unet=None, scheduler=None, levels: int = 3):
    """AnimateDiffVideoToVideoPipeline with the same components as ``animatediff_pipeline``.

    Working call::

        video = torch.rand(1, F, 3, 32, 32)           # frames in [0, 1]  (or a list of PIL frames)
        pipe(video=video, **prompt_kwargs(), height=32, width=32, strength=0.7,
             num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", return_dict=False)[0]      # latents (1, 4, F, 16, 16)

    (strength 0.7 of 3 steps runs 2 UNet calls.)
    """
    from diffusers import AnimateDiffVideoToVideoPipeline

    return _animatediff(AnimateDiffVideoToVideoPipeline, seed, unet, scheduler, levels)


def _animatediff(cls, seed, unet, scheduler, levels):
    adapter = motion_adapter(seed + 1, levels=levels)
    pipe = cls(
        vae=vae(seed), text_encoder=None, tokenizer=None,
        unet=unet if unet is not None else motion_unet(seed, levels=levels),
        motion_adapter=adapter, scheduler=scheduler or ddim(),
        feature_extractor=None, image_encoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t2v_pipeline(seed: int = 0, unet=None, scheduler=None):
    """TextToVideoSDPipeline(tiny AutoencoderKL (scale 2), no text encoder/tokenizer,
    UNet3DConditionModel, DDIMScheduler).

    Working call::

        pipe(**prompt_kwargs(), num_frames=4, height=32, width=32, num_inference_steps=3,
             guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", return_dict=False)[0]      # latents (1, 4, F, 16, 16)

    output_type="pt" decodes: frames (1, F, 3, 32, 32).
    """
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline(
        vae=vae(seed), text_encoder=None, tokenizer=None,
        unet=unet if unet is not None else unet3d(seed), scheduler=scheduler or ddim(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_svd() -> EulerDiscreteScheduler:
    """The scheduler config of stabilityai/stable-video-diffusion-img2vid(-xt)'s scheduler folder
    (EDM-style Euler with Karras sigmas, v-prediction, continuous timesteps)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
        use_karras_sigmas=True,
    )


def svd_vae(seed: int = 0):
    """A tiny AutoencoderKLTemporalDecoder: channels (32, 32) (scale factor 2), 4 latent channels."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    return AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
    ).eval()


def svd_image_encoder(seed: int = 0, image_size: int = 32):
    """A tiny CLIPVisionModelWithProjection (hidden 32, 2 layers, 4 heads, projection 32, patch 8,
    or 32 for 224-pixel inputs) and a CLIPImageProcessor for ``image_size`` x ``image_size`` inputs."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, projection_dim=SVD_IMAGE_DIM, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37, image_size=image_size,
                           patch_size=8 if image_size <= 64 else 32)
    enc = CLIPVisionModelWithProjection(cfg).eval()
    proc = CLIPImageProcessor(crop_size=image_size, size=image_size)
    return enc, proc


def svd_pipeline(seed: int = 0, unet=None, scheduler=None, cls=None, image_size: int = 32):
    """StableVideoDiffusionPipeline(tiny AutoencoderKLTemporalDecoder, tiny CLIP image encoder +
    CLIPImageProcessor, UNetSpatioTemporalConditionModel, EulerDiscreteScheduler as SVD ships it).

    ``cls`` swaps the pipeline class (the test of DeepCache's own SVD pipeline passes its class).
    ``image_size`` is the CLIP encoder's input size: 32 for tensor images as below, 224 for PIL
    images (which both pipelines resize to 224x224 before the CLIP processor).

    Working call::

        image = svd_image()                                  # (1, 3, 32, 32) tensor in [0, 1]
        pipe(image, height=32, width=32, num_frames=4, num_inference_steps=3,
             min_guidance_scale=1.0, max_guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", return_dict=False)        # latents (1, F, 4, 16, 16)

    A tensor image is passed to the CLIP processor without the 224x224 resize PIL inputs get, so
    its size must be the image encoder's (32). With output_type="latent" and return_dict=False the
    0.42.1 pipeline returns the latents tensor itself (not a tuple); output_type="pt" decodes
    (decode_chunk_size=F): frames (1, F, 3, 32, 32).
    """
    if cls is None:
        from diffusers import StableVideoDiffusionPipeline as cls
    enc, proc = svd_image_encoder(seed, image_size=image_size)
    pipe = cls(vae=svd_vae(seed), image_encoder=enc, unet=unet if unet is not None else svd_unet(seed),
               scheduler=scheduler or euler_svd(), feature_extractor=proc)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def svd_image(seed: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g)
