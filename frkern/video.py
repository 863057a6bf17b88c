"""Video UNet families: diffusers' UNetMotionModel (AnimateDiff), UNet3DConditionModel (ModelScope
text-to-video) and UNetSpatioTemporalConditionModel (Stable Video Diffusion).

A video UNet runs frames as a batch of images through 2-D blocks (ResNets and spatial
transformers, exactly the image UNet's) with temporal modules between them that mix frames at
each pixel. Every frame of a call shares the call's step, so the image UNet's reuse units apply
frame by frame, and the temporal modules are residual units of their own.
"""
from __future__ import annotations

from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer, TemporalResnetBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModel,
)
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn
from diffusers.models.unets.unet_3d_blocks import (
    CrossAttnDownBlock3D,
    CrossAttnDownBlockSpatioTemporal,
    CrossAttnUpBlock3D,
    CrossAttnUpBlockSpatioTemporal,
    DownBlock3D,
    DownBlockSpatioTemporal,
    UNetMidBlock3DCrossAttn,
    UNetMidBlockSpatioTemporal,
    UpBlock3D,
    UpBlockSpatioTemporal,
)
from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel, UNet3DConditionOutput
from diffusers.models.unets.unet_motion_model import (
    AnimateDiffTransformer3D,
    CrossAttnDownBlockMotion,
    CrossAttnUpBlockMotion,
    DownBlockMotion,
    UNetMidBlockCrossAttnMotion,
    UNetMotionModel,
    UNetMotionOutput,
    UpBlockMotion,
)
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionModel,
    UNetSpatioTemporalConditionOutput,
)

from .family import register_family
from .unet2d import UNetFamily
from .units import FusedGEGLU, ReusedMotionModule, ReusedResnetBlock2D, ReusedTransformer2D
from .video_units import (
    ReusedSpatioTemporalTransformer,
    ReusedTemporalConv,
    ReusedTemporalResnetBlock,
    ReusedTemporalTransformer,
)


class UNetMotionFamily(UNetFamily):
    """AnimateDiffPipeline / AnimateDiffVideoToVideoPipeline (a UNet2DConditionModel with a
    MotionAdapter). Units: every ResNet's conv1 output and every spatial transformer's residual
    branch (as the image UNet), and every motion module's residual branch. A layer of a block is
    (resnets[i], attentions[i], motion_modules[i]), the order the blocks run them."""

    name = "UNetMotionModel"
    model_cls = UNetMotionModel
    output_cls = UNetMotionOutput
    supported_blocks = (CrossAttnDownBlockMotion, DownBlockMotion, UNetMidBlockCrossAttnMotion,
                        UNetMidBlock2DCrossAttn, CrossAttnUpBlockMotion, UpBlockMotion)
    layer_kinds = ("resnets", "attentions", "motion_modules")
    unit_types = {ResnetBlock2D: "resnet", Transformer2DModel: "transformer", AnimateDiffTransformer3D: "motion",
                  GEGLU: "geglu"}
    wrappers = {"resnet": ReusedResnetBlock2D, "transformer": ReusedTransformer2D, "motion": ReusedMotionModule,
                "geglu": FusedGEGLU}

    def residuals_added_in_place(self, call):
        # UNetMotionModel adds ControlNet / adapter residuals out of place
        return False


class UNet3DFamily(UNetFamily):
    """TextToVideoSDPipeline / VideoToVideoSDPipeline (ModelScope text-to-video). The forward runs
    conv_in, then transformer_in (a temporal transformer over the frames of conv_in's output), then
    the down path: both are the entry, computed on every call by the segment policies.

    A layer of a block is (resnets[i], temp_convs[i], attentions[i], temp_attentions[i]), the order
    the blocks run them (plain blocks: resnets[i], temp_convs[i]); the mid block runs resnet 0,
    temp_conv 0, then per layer attention, temp_attention, resnet, temp_conv.

    Units: every ResNet's conv1 output and every spatial transformer's residual branch (as the
    image UNet); every TransformerTemporalModel's residual branch (transformer_in and the
    temp_attentions: proj_out's output laid back out as (batch * frames, C, H, W)); every
    TemporalConvLayer's residual branch (conv4's output laid back out the same way); the GEGLUs
    (fused kernel, nothing cached). ControlNet residuals are added out of place.

    SkipConv gates the ResNets' conv1/conv2 (2-D, frame by frame) and the four (3, 1, 1) Conv3d of
    every TemporalConvLayer. A temporal conv's output at (frame f, pixel p) reads frames f-1..f+1
    at pixel p only: each frame is gated as an image, and an output tile is recomputed when the
    same tile changed within one frame of it (kernels/skip_conv.py, skip_conv_temporal_reference)."""

    name = "UNet3DConditionModel"
    model_cls = UNet3DConditionModel
    output_cls = UNet3DConditionOutput
    supported_blocks = (CrossAttnDownBlock3D, DownBlock3D, UNetMidBlock3DCrossAttn, CrossAttnUpBlock3D, UpBlock3D)
    layer_kinds = ("resnets", "temp_convs", "attentions", "temp_attentions")
    entry = ("conv_in", "transformer_in")
    unit_types = {ResnetBlock2D: "resnet", Transformer2DModel: "transformer",
                  TransformerTemporalModel: "temporal_transformer", TemporalConvLayer: "temporal_conv",
                  GEGLU: "geglu"}
    wrappers = {"resnet": ReusedResnetBlock2D, "transformer": ReusedTransformer2D,
                "temporal_transformer": ReusedTemporalTransformer, "temporal_conv": ReusedTemporalConv,
                "geglu": FusedGEGLU}

    def _gated_convs(self, model) -> tuple[str, ...]:
        return super()._gated_convs(model) + tuple(
            f"{name}.{seq}.{len(getattr(m, seq)) - 1}" for name, m in model.named_modules()
            if isinstance(m, TemporalConvLayer) for seq in ("conv1", "conv2", "conv3", "conv4"))

    def residuals_added_in_place(self, call):
        # UNet3DConditionModel adds ControlNet residuals out of place (`res + residual`,
        # `sample = sample + mid_block_additional_residual`); it takes no T2I-Adapter residuals
        return False


class SVDFamily(UNetFamily):
    """StableVideoDiffusionPipeline (UNetSpatioTemporalConditionModel; sample (batch, frames, C, H, W),
    forward(sample, timestep, encoder_hidden_states, added_time_ids, return_dict): added_time_ids
    goes by name with the call's other arguments). A layer of a block is (resnets[i],
    attentions[i]); each resnet is a SpatioTemporalResBlock (a spatial ResnetBlock2D, a
    TemporalResnetBlock on its output, an AlphaBlender of the two: no skip around the block).

    Units: the spatial ResnetBlock2D's conv1 output (the image UNet's unit, frame by frame); the
    TemporalResnetBlock's conv1 output; every TransformerSpatioTemporalModel's residual branch
    (proj_out's output of the blended spatial/temporal stream, laid back out as
    (batch * frames, C, H, W)); the GEGLUs (fused kernel, nothing cached). Nothing is added to the
    blocks' outputs in place.

    SkipConv gates the spatial ResNets' conv1/conv2 (2-D, frame by frame) and the temporal ResNets'
    (3, 1, 1) conv1/conv2: a temporal conv's output at (frame f, pixel p) reads frames f-1..f+1 at
    pixel p only, so each frame is gated as an image and an output tile is recomputed when the same
    tile changed within one frame of it (kernels/skip_conv.py, skip_conv_temporal_reference)."""

    name = "UNetSpatioTemporalConditionModel"
    model_cls = UNetSpatioTemporalConditionModel
    output_cls = UNetSpatioTemporalConditionOutput
    supported_blocks = (DownBlockSpatioTemporal, CrossAttnDownBlockSpatioTemporal, UNetMidBlockSpatioTemporal,
                        UpBlockSpatioTemporal, CrossAttnUpBlockSpatioTemporal)
    layer_kinds = ("resnets", "attentions")
    entry = ("conv_in",)
    unit_types = {ResnetBlock2D: "resnet", TemporalResnetBlock: "temporal_resnet",
                  TransformerSpatioTemporalModel: "temporal_transformer", GEGLU: "geglu"}
    wrappers = {"resnet": ReusedResnetBlock2D, "temporal_resnet": ReusedTemporalResnetBlock,
                "temporal_transformer": ReusedSpatioTemporalTransformer, "geglu": FusedGEGLU}

    def _gated_convs(self, model) -> tuple[str, ...]:
        return super()._gated_convs(model) + tuple(
            f"{name}.{conv}" for name, m in model.named_modules() if isinstance(m, TemporalResnetBlock)
            for conv in ("conv1", "conv2"))

    def residuals_added_in_place(self, call):
        return False  # no residuals are added to its blocks' outputs


register_family(UNetMotionFamily())
register_family(UNet3DFamily())
register_family(SVDFamily())
