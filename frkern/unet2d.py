"""The diffusers UNet2DConditionModel family (SD 1.x/2.x, SDXL, and pipelines built on them)."""
from __future__ import annotations

import inspect

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .family import Call, ModelFamily
from .segments import adaptive_gate, segment_cut
from .units import FusedGEGLU, ReusedResnetBlock2D, ReusedTransformer2D

SUPPORTED_BLOCKS = (
    CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UNetMidBlock2D, CrossAttnUpBlock2D, UpBlock2D,
)


_FORWARD_ARGS = [p.name for p in inspect.signature(UNet2DConditionModel.forward).parameters.values()
                 if p.kind is p.POSITIONAL_OR_KEYWORD][1:]  # without self


def uncompiled(module):
    # torch.compile(unet) returns an OptimizedModule around the UNet; patch the UNet inside (the
    # compiled wrapper calls its forward, so it picks the patch up on its next call).
    return module._orig_mod if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) else module


class UNet2DFamily(ModelFamily):
    name = "UNet2DConditionModel"
    unit_wrappers = {
        ResnetBlock2D: (ReusedResnetBlock2D, "units"),
        Transformer2DModel: (ReusedTransformer2D, "units"),
        GEGLU: (FusedGEGLU, None),
    }

    def find(self, target):
        target = uncompiled(target)
        if isinstance(target, UNet2DConditionModel):
            return target, None
        unet = uncompiled(getattr(target, "unet", None))
        if isinstance(unet, UNet2DConditionModel):
            return unet, target
        return None

    def check_supported(self, unet) -> None:
        problems = []
        blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid_block", unet.mid_block)]
        blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
        for name, block in blocks:
            if block is not None and type(block) not in SUPPORTED_BLOCKS:
                problems.append(f"{name} is {type(block).__name__}")
        for name, m in unet.named_modules():
            if type(m) is ResnetBlock2D and m.time_embedding_norm not in ("default", "scale_shift"):
                problems.append(f"{name} has time_embedding_norm={m.time_embedding_norm!r}")
            if type(m) is Transformer2DModel and not m.is_input_continuous:
                problems.append(f"{name} is a Transformer2DModel without continuous input")
        if problems:
            raise ValueError(
                "frkern.patch: this UNet has parts frkern does not support: " + "; ".join(problems)
                + f". Supported blocks: {', '.join(c.__name__ for c in SUPPORTED_BLOCKS)}"
            )

    def segment_paths(self, unet, policy):
        return segment_cut(unet, policy)

    def adaptive_gate(self, unet, policy):
        return adaptive_gate(unet, policy)

    def gated_conv_paths(self, unet):
        # Every ResNet's conv1 and conv2: most of a UNet's convolution FLOPs, inputs that change
        # smoothly between steps. conv_in/conv_out, shortcuts and resamplers stay dense (small, or
        # strided).
        return [f"{name}.{conv}" for name, m in unet.named_modules() if isinstance(m, ResnetBlock2D)
                for conv in ("conv1", "conv2")]

    def bind_call(self, args, kwargs):
        # UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ..., return_dict=True)
        kwargs = dict(kwargs)
        return_dict = kwargs.pop("return_dict", True)
        args = list(args)
        roles = {}
        for name in ("sample", "timestep", "encoder_hidden_states"):
            if args:
                roles[name] = args.pop(0)
            elif name in kwargs:
                roles[name] = kwargs.pop(name)
            elif name == "encoder_hidden_states":
                roles[name] = None
            else:
                raise TypeError(f"UNet2DConditionModel.forward() missing required argument: '{name}'")
        # the other positional arguments by name, so per-call options are found however they are passed
        names = _FORWARD_ARGS[3:]
        if len(args) > len(names):
            raise TypeError(f"UNet2DConditionModel.forward() takes {len(_FORWARD_ARGS)} positional arguments "
                            f"but {len(args) + 3} were given")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"UNet2DConditionModel.forward() got multiple values for argument '{name}'")
            kwargs[name] = value
        return_dict = kwargs.pop("return_dict", return_dict)
        return Call(roles["sample"], roles["timestep"], roles["encoder_hidden_states"], (), kwargs), return_dict

    def call_options(self, call):
        # A LoRA scale passed per call (diffusers pops it from cross_attention_kwargs and scales
        # every adapter layer during the forward) changes the result: a keyframe made with one
        # scale is not read by a call with another.
        cak = call.kwargs.get("cross_attention_kwargs")
        if not cak or "scale" not in cak:
            return ()
        scale = cak["scale"]
        return (("lora_scale", float(scale) if isinstance(scale, (int, float)) else id(scale)),)

    def mutates_outputs(self, call):
        # diffusers adds T2I-Adapter residuals to a plain down block's and the mid block's output
        # with `sample +=` (also when they come through the deprecated down_block_additional_residuals
        # without a mid residual)
        kw = call.kwargs
        return kw.get("down_intrablock_additional_residuals") is not None or (
            kw.get("down_block_additional_residuals") is not None and kw.get("mid_block_additional_residual") is None)

    def run(self, network, call):
        call = call.fresh()
        return network(call.sample, call.timestep, call.context, *call.args, return_dict=False, **call.kwargs)[0]

    def wrap_output(self, out, return_dict):
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
