"""Video UNet families: diffusers' UNetMotionModel (AnimateDiff).

A video UNet runs frames as a batch of images through 2-D blocks (ResNets and spatial
transformers, exactly the image UNet's) with temporal modules between them that mix frames at
each pixel. Every frame of a call shares the call's step, so the image UNet's reuse units apply
frame by frame, and the temporal modules are residual units of their own.
"""
from __future__ import annotations

from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn
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

from .family import register_family
from .unet2d import UNetFamily
from .units import FusedGEGLU, ReusedMotionModule, ReusedResnetBlock2D, ReusedTransformer2D


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

    def mutates_outputs(self, call):
        # UNetMotionModel adds ControlNet / adapter residuals out of place
        return False


register_family(UNetMotionFamily())
