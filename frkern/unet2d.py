"""The diffusers UNet2DConditionModel family (SD 1.x/2.x, SDXL, and pipelines built on them)."""
from __future__ import annotations

import inspect

from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    ResnetDownsampleBlock2D,
    ResnetUpsampleBlock2D,
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UNetMidBlock2DSimpleCrossAttn,
    UpBlock2D,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .family import Call, Level, ModelFamily, Parts, register_family, uncompiled
from .units import FusedGEGLU, ReusedResnetBlock2D, ReusedTransformer2D

SUPPORTED_BLOCKS = (
    CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UNetMidBlock2D, CrossAttnUpBlock2D, UpBlock2D,
    # Kandinsky 2.2's and DeepFloyd IF's: resamplers are ResNets (down=True / up=True, which the
    # ResNet unit handles), attentions are bare Attention modules (added-KV processors, their
    # residual add inside the processor), not reuse units: they compute on every call
    ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D, UNetMidBlock2DSimpleCrossAttn, SimpleCrossAttnUpBlock2D,
    ResnetUpsampleBlock2D,
)


class UNetFamily(ModelFamily):
    """What the diffusers UNets share: down blocks, a mid block and mirrored up blocks whose layers
    are lists of modules by index (resnets[i], attentions[i], ...). A subclass names its model class,
    blocks, unit types and the per-layer module lists."""

    model_cls: type = None
    output_cls: type = None
    supported_blocks: tuple = ()
    layer_kinds: tuple[str, ...] = ("resnets", "attentions")  # the module lists of a block, by layer index
    entry: tuple[str, ...] = ("conv_in",)
    unit_types: dict[type, str] = {}  # module class -> unit kind

    def mutates_outputs(self, model, call) -> bool:
        # FreeU (enable_freeu: s1, s2, b1, b2 on every up block) scales the first half of an up
        # block's input channels in place: that input is the output of the block (or layer) before
        return self.freeu_enabled(model) or self.residuals_added_in_place(call)

    @staticmethod
    def freeu_enabled(model) -> bool:
        # the up blocks' own test (diffusers' CrossAttnUpBlock2D / UpBlock2D and their video kin)
        return any(all(getattr(b, k, None) for k in ("s1", "s2", "b1", "b2")) for b in model.up_blocks)

    def residuals_added_in_place(self, call) -> bool:
        return False

    def find(self, target):
        target = uncompiled(target)
        if isinstance(target, self.model_cls):
            return target, None
        model = uncompiled(getattr(target, "unet", None))
        if isinstance(model, self.model_cls):
            return model, target
        return None

    def _blocks(self, model):
        blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)] + [("mid_block", model.mid_block)]
        return blocks + [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]

    def check_supported(self, model) -> None:
        problems = [f"{name} is {type(block).__name__}" for name, block in self._blocks(model)
                    if block is not None and type(block) not in self.supported_blocks]
        if len(model.up_blocks) != len(model.down_blocks):
            problems.append(f"{len(model.down_blocks)} down blocks but {len(model.up_blocks)} up blocks")
        problems += self._module_problems(model)
        if problems:
            raise ValueError(
                f"frkern.patch: this {self.name} has parts frkern does not support: " + "; ".join(problems)
                + f". Supported blocks: {', '.join(c.__name__ for c in self.supported_blocks)}"
            )

    def _module_problems(self, model) -> list[str]:
        problems = []
        for name, m in model.named_modules():
            if type(m) is ResnetBlock2D and m.time_embedding_norm not in ("default", "scale_shift"):
                problems.append(f"{name} has time_embedding_norm={m.time_embedding_norm!r}")
            if type(m) is Transformer2DModel and not m.is_input_continuous:
                problems.append(f"{name} is a Transformer2DModel without continuous input")
        return problems

    def _layers(self, prefix, block) -> tuple[tuple[str, ...], ...]:
        lists = [(kind, getattr(block, kind, None) or []) for kind in self.layer_kinds]
        return tuple(tuple(f"{prefix}.{kind}.{i}" for kind, mods in lists if i < len(mods))
                     for i in range(len(block.resnets)))

    def parts(self, model) -> Parts:
        n = len(model.down_blocks)
        levels = []
        for i, down in enumerate(model.down_blocks):
            up_path = f"up_blocks.{n - 1 - i}"
            up = model.up_blocks[n - 1 - i]
            levels.append(Level(
                down_block=f"down_blocks.{i}",
                down_layers=self._layers(f"down_blocks.{i}", down),
                downsamplers=tuple(f"down_blocks.{i}.downsamplers.{j}"
                                   for j in range(len(getattr(down, "downsamplers", None) or []))),
                up_block=up_path,
                up_layers=self._layers(up_path, up),
            ))
        units = {name: self.unit_types[type(m)] for name, m in model.named_modules() if type(m) in self.unit_types}
        return Parts(
            units=units, entry=self.entry, levels=tuple(levels),
            mid="mid_block" if model.mid_block is not None else None,
            gated_convs=self._gated_convs(model), time_embedding="time_embedding",
            text_dim=model.config.cross_attention_dim,
        )

    def _gated_convs(self, model) -> tuple[str, ...]:
        # Every ResNet's conv1 and conv2: most of a UNet's convolution FLOPs, inputs that change
        # smoothly between steps. conv_in/conv_out, shortcuts and resamplers stay dense (small, or
        # strided).
        return tuple(f"{name}.{conv}" for name, m in model.named_modules() if isinstance(m, ResnetBlock2D)
                     for conv in ("conv1", "conv2"))

    def _forward_args(self) -> list[str]:
        return [p.name for p in inspect.signature(self.model_cls.forward).parameters.values()
                if p.kind is p.POSITIONAL_OR_KEYWORD][1:]  # without self

    def bind_call(self, args, kwargs):
        # forward(sample, timestep, encoder_hidden_states, ..., return_dict=True)
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
                raise TypeError(f"{self.name}.forward() missing required argument: '{name}'")
        # the other positional arguments by name, so per-call options are found however they are passed
        forward_args = self._forward_args()
        names = forward_args[3:]
        if len(args) > len(names):
            raise TypeError(f"{self.name}.forward() takes {len(forward_args)} positional arguments "
                            f"but {len(args) + 3} were given")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{self.name}.forward() got multiple values for argument '{name}'")
            kwargs[name] = value
        return_dict = kwargs.pop("return_dict", return_dict)
        return Call(roles["sample"], roles["timestep"], roles["encoder_hidden_states"], (), kwargs), return_dict

    def call_options(self, model, call):
        # A LoRA scale passed per call (diffusers pops it from cross_attention_kwargs and scales
        # every adapter layer during the forward) changes the result: a keyframe made with one
        # scale is not read by a call with another. So do FreeU's factors (enable_freeu /
        # disable_freeu between calls): they are attributes of the up blocks, not weights.
        options = ()
        cak = call.kwargs.get("cross_attention_kwargs")
        if cak and "scale" in cak:
            scale = cak["scale"]
            options += (("lora_scale", float(scale) if isinstance(scale, (int, float)) else id(scale)),)
        if self.freeu_enabled(model):
            options += (("freeu", tuple(tuple(getattr(b, k, None) for k in ("s1", "s2", "b1", "b2"))
                                        for b in model.up_blocks)),)
        return options

    def residuals_added_in_place(self, call):
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
        return self.output_cls(sample=out) if return_dict else (out,)


class UNet2DFamily(UNetFamily):
    name = "UNet2DConditionModel"
    model_cls = UNet2DConditionModel
    output_cls = UNet2DConditionOutput
    supported_blocks = SUPPORTED_BLOCKS
    unit_types = {ResnetBlock2D: "resnet", Transformer2DModel: "transformer", GEGLU: "geglu"}
    wrappers = {"resnet": ReusedResnetBlock2D, "transformer": ReusedTransformer2D, "geglu": FusedGEGLU}


register_family(UNet2DFamily())
