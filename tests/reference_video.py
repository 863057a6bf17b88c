"""Independent plain-PyTorch statements of frkern's feature-reuse methods on the diffusers *video*
UNets, stated with forward hooks on an *unpatched* model (they share no code with frkern).

Families (diffusers 0.42.1):

* AnimateDiff ``UNetMotionModel``: CrossAttnDownBlockMotion / DownBlockMotion, UNetMidBlockCrossAttnMotion,
  UpBlockMotion / CrossAttnUpBlockMotion.
* ModelScope ``UNet3DConditionModel``: ``transformer_in``, CrossAttnDownBlock3D / DownBlock3D,
  UNetMidBlock3DCrossAttn, UpBlock3D / CrossAttnUpBlock3D.
* SVD ``UNetSpatioTemporalConditionModel``: (CrossAttn)DownBlockSpatioTemporal,
  UNetMidBlockSpatioTemporal, (CrossAttn)UpBlockSpatioTemporal.

Every statement has a ``keyframe`` attribute the caller sets before each UNet call: on a keyframe
call the named values are recorded, on any other call a hook replaces them by the recorded ones.
Forward hooks cannot stop a module from running: on non-keyframes the replaced modules still
compute before their output is discarded. These are statements about values, not cost.

What the forwards actually do (read in diffusers 0.42.1; tests/test_reference_video.py checks the
residual claims by zeroing each branch):

* ``AnimateDiffTransformer3D.forward``: ``output = residual + reshape(proj_out(...))`` where the reshape
  is (B*H*W, F, C) -> (B, H, W, F, C) -> (B, F, C, H, W) -> (B*F, C, H, W). Residual shape holds.
* ``TransformerTemporalModel.forward`` (UNet3D temp_attentions and transformer_in): the same shape,
  ``output = reshape(proj_out(...)) + residual``.
* ``TransformerSpatioTemporalModel.forward`` (SVD attentions): ``output = reshape(proj_out(h)) + residual``
  with the reshape (B*F, H*W, C) -> (B*F, C, H, W), so the residual shape holds too; but the branch
  is not a plain transformer: for each layer it runs the spatial BasicTransformerBlock, then the
  TemporalBasicTransformerBlock on (spatial + frame-position embedding), and an AlphaBlender mixes
  the two, ``h = a * spatial + (1 - a) * temporal`` (a = sigmoid(mix_factor), 1 where
  image_only_indicator is set). The residual branch is proj_out of the *blended* stream; a reuse of
  the spatial or the temporal path alone has no single tensor at proj_out to name.
* ``TemporalConvLayer.forward`` (UNet3D temp_convs): ``output = identity + conv4(conv3(conv2(conv1(x))))``
  in (B, C, F, H, W) layout, then permuted back to (B*F, C, H, W): residual shape holds, the
  branch being conv4's output (conv4 is a Sequential: GroupNorm, SiLU, Dropout, Conv3d; its output
  is the Conv3d's). diffusers zero-initialises conv4's Conv3d, so in a fresh model the branch is 0.
* ``ResnetBlock2D``: conv1's output is *not* a residual branch: temb is added after conv1, then
  norm2, SiLU, dropout, conv2, and ``output = (shortcut(x) + h) / output_scale_factor``. FRDiff's
  ResNet unit is conv1's output (the recomputed part is everything after it, including temb).
* ``TemporalResnetBlock`` (SVD): the same layout in 3-D convs (kernel (3, 1, 1)), temb added after
  conv1, ``output = shortcut(x) + conv2(...)``, no output scale. The unit is conv1's output.
* ``SpatioTemporalResBlock`` (SVD resnets) BREAKS the residual shape: there is no skip around it.
  ``s = spatial_res_block(x)`` (a ResnetBlock2D), ``t = temporal_res_block(s)`` (its own residual on
  s), ``output = a * s + (1 - a) * t`` (AlphaBlender, a = sigmoid(mix_factor)). The units inside it
  are the ResnetBlock2D's conv1 and the TemporalResnetBlock's conv1.
* ``CrossAttnDownBlockMotion`` adds ``additional_residuals`` (T2I-adapter) after the last layer's
  motion module, and ``UNetMidBlockCrossAttnMotion`` runs resnet0, then per layer
  attention -> motion module -> resnet (the motion module *before* the resnet, unlike the down/up
  blocks, where it comes last in a layer). ``UNetMidBlock3DCrossAttn`` runs resnet0, temp_conv0,
  then per layer attention -> temp_attention -> resnet -> temp_conv.
* Up blocks are called with ``hidden_states=`` as a keyword by all three UNet forwards (mid blocks
  positionally in UNetMotionModel / UNet3DConditionModel, by keyword in SVD).

DeepCache's own SVD implementation (``DeepCache/svd/`` of the ``DeepCache`` 0.1.1 package:
``unet_spatio_temporal_condition.UNetSpatioTemporalConditionModel`` with ``cache_features`` /
``cache_branch`` forward arguments, driven by its ``StableVideoDiffusionPipeline.__call__(...,
cache_interval, cache_branch)``):

* keyframes are the steps ``i in range(0, num_inference_steps, cache_interval)``; on them the
  whole UNet runs and ``cache_features`` is recorded; ``cache_branch=None`` disables caching.
* with ``each = len(down_blocks[0].resnets) + 1`` (3 for layers_per_block=2), ``B = cache_branch //
  each``, ``L = cache_branch % each``, on a cached step it runs down blocks 0..B, stops inside
  block B after its layer L (L == each - 1: after its downsampler), skips the mid block and every
  up layer up to the cached point, and feeds ``cache_features`` into the first recomputed up layer.
  The cached feature is the *input of up resnet ``1 - L``* of up block ``n - 1 - B`` (L < 2), or of
  up resnet 2 of up block ``n - 2 - B`` (L == 2): i.e. the output of the last skipped up layer.
* That is exactly ``DeepCacheVideoHooks(unet, branch=cache_branch + 1)`` for layers_per_block == 2:
  package branch 3B + L keeps down layers 0..L of block B, which is generic branch 3B + (L + 1)
  (keep layers < L + 1); package L == 2 keeps all of block B, which is generic branch 3(B + 1) + 0.
  Up: package "enter at resnet 1 - L of mirror B" skips up layers whose index from the output end
  is > L + 1, the generic rule for layer L + 1 (and "enter at resnet 2 of mirror B + 1" skips
  from-the-end layers > 0 of mirror B + 1). The package's own comment: "we ignore the first skip
  branch, whose computations only has up_blocks but without down_blocks" (generic branch 0).
  tests/test_reference_video.py checks the final latents bit for bit.
* the package cannot run unmodified with diffusers 0.42.1: ``DeepCache/svd/unet_3d_blocks.py`` line 23
  ``from diffusers.models.dual_transformer_2d import DualTransformer2DModel`` raises
  ModuleNotFoundError (and lines 31-32 import the equally moved ``diffusers.models.transformer_2d`` /
  ``transformer_temporal``), and ``DeepCache/svd/pipeline_utils.py`` line 40 ``from diffusers.utils
  import (... DIFFUSERS_CACHE ...)`` raises ImportError. With those four module paths aliased
  (the test does it, code unchanged) its UNet and pipeline run.
* the package's pipeline differs from diffusers 0.42.1's in one place that matters: for a *tensor*
  image its ``_encode_image`` skips the CLIPImageProcessor normalisation (0.42.1 applies it), so
  the comparison feeds a PIL image (both resize to 224 and normalise identically).
"""
from __future__ import annotations

from functools import partial

import torch
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer, TemporalResnetBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModel,
)
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

KINDS = ("resnet", "transformer", "temporal_transformer", "temporal_conv", "temporal_resnet")

# kind -> (module classes, attribute of the module whose output is the unit)
_UNIT_CLASSES = {
    "resnet": ((ResnetBlock2D,), "conv1"),
    "transformer": ((Transformer2DModel,), "proj_out"),
    "temporal_transformer": ((AnimateDiffTransformer3D, TransformerTemporalModel,
                              TransformerSpatioTemporalModel), "proj_out"),
    "temporal_conv": ((TemporalConvLayer,), "conv4"),
    "temporal_resnet": ((TemporalResnetBlock,), "conv1"),
}

# The per-layer module lists of a down/up block, in the order a layer runs them in all three
# families (motion: resnet, attention, motion module; UNet3D: resnet, temp_conv, attention,
# temp_attention; SVD: resnet, attention). Layer i of a block is element i of each list present.
LAYER_LISTS = ("resnets", "temp_convs", "attentions", "temp_attentions", "motion_modules")


def unit_kind(module) -> str | None:
    """The FRDiff unit kind of a module (None if it holds no unit)."""
    for kind, (classes, _) in _UNIT_CLASSES.items():
        # exact class match: no subclass of one kind hides in another's list
        if type(module) in classes:
            return kind
    return None


def frdiff_units(model, kinds=KINDS):
    """[(owner path, kind, unit module)] in model.named_modules() order for the given kinds.

    The unit module is ``owner.conv1`` (resnet, temporal_resnet), ``owner.proj_out`` (transformer,
    temporal_transformer) or ``owner.conv4`` (temporal_conv)."""
    out = []
    for name, m in model.named_modules():
        kind = unit_kind(m)
        if kind is not None and kind in kinds:
            out.append((name, kind, getattr(m, _UNIT_CLASSES[kind][1])))
    return out


class _Statement:
    """Shared bookkeeping: ``keyframe`` flag, per-call logs cleared by a pre-hook on the model."""

    def __init__(self, model):
        self.keyframe = True
        self.store: dict[str, object] = {}
        self.recorded: list[str] = []      # names recorded during the last call (keyframe)
        self.substituted: list[str] = []   # names replaced during the last call (non-keyframe)
        self.handles = [model.register_forward_pre_hook(self._new_call)]

    def _new_call(self, module, args):
        self.recorded = []
        self.substituted = []

    def _take(self, name, value):
        """Record (keyframe) or return the recorded value (non-keyframe)."""
        if self.keyframe:
            self.store[name] = value
            self.recorded.append(name)
            return None
        if name not in self.store:
            raise RuntimeError(f"{type(self).__name__}: non-keyframe call before any keyframe ({name})")
        self.substituted.append(name)
        return self.store[name]

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class FRDiffVideoHooks(_Statement):
    """FRDiff feature reuse on a video UNet, per unit kind.

    Units (``kinds`` picks a subset of KINDS; default all):

    * "resnet": every ``ResnetBlock2D``'s conv1 output (the spatial ResnetBlock2D inside SVD's
      SpatioTemporalResBlock included);
    * "transformer": every ``Transformer2DModel``'s proj_out output (its residual branch before
      diffusers adds the input back);
    * "temporal_transformer": the proj_out output of every ``AnimateDiffTransformer3D`` (motion
      modules), ``TransformerTemporalModel`` (UNet3D temp_attentions and transformer_in) and
      ``TransformerSpatioTemporalModel`` (SVD attentions; its branch is the AlphaBlender-mixed
      spatial/temporal stream, see the module doc);
    * "temporal_conv": every ``TemporalConvLayer``'s conv4 output (UNet3D temp_convs, the mid
      block's included; output = identity + conv4 branch);
    * "temporal_resnet": every SVD ``TemporalResnetBlock``'s conv1 output.

    On a keyframe call each unit's value is recorded; on other calls it is replaced by the recorded
    one and everything downstream of it (inside and outside its module) is recomputed.

    Attributes: ``units`` {owner path: kind} in named_modules order; ``recorded`` /
    ``substituted``: owner paths, in the order the last call reached them.
    """

    def __init__(self, model, kinds=None):
        super().__init__(model)
        self.kinds = frozenset(KINDS if kinds is None else kinds)
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {KINDS}")
        self.units: dict[str, str] = {}
        for name, kind, unit in frdiff_units(model, self.kinds):
            self.units[name] = kind
            self.handles.append(unit.register_forward_hook(partial(self._hook, name)))

    def _hook(self, name, module, args, out):
        return self._take(name, out)


class DeepCacheVideoHooks(_Statement):
    """DeepCache's cache branch on a video UNet, stated with forward hooks.

    The rule of tests/reference_deepcache.py, with a "layer" widened to every per-layer module of
    that index. Branch m: block B = m // 3, layer L = m % 3. Layer i (< n = len(resnets)) of a
    down/up block is {resnets[i], temp_convs[i], attentions[i], temp_attentions[i],
    motion_modules[i]} (those the block has: motion blocks resnets/attentions/motion_modules, UNet3D
    blocks resnets/temp_convs/attentions/temp_attentions, SVD blocks resnets/attentions); layer n of
    a down block is its downsampler. On a non-keyframe call these are replaced by their last
    keyframe outputs:

    * down: every layer of a block b > B, and in block B every layer with index >= L;
    * the whole mid block;
    * up: every layer of an up block whose mirror index f (up_blocks[k] mirrors down block
      f = len(up_blocks) - 1 - k) is > B, and in the mirror block B every layer whose index from the
      output end (n - 1 - i for resnets[i]) is > L. Upsamplers (layer 0 from the end) always run.

    A block whose layers are all skipped (down b > B, or b == B with L == 0; up f > B) is replaced
    as one unit. UNet3D's ``transformer_in`` runs on conv_in's output before the down path and, like
    conv_in, is always recomputed (its output is also the skip connection of the last up layer,
    which is never skipped). Everything outside the down/mid/up blocks (time embedding, conv_in,
    conv_out) always runs.

    Attributes: ``skipped_names`` (sorted outermost skipped paths), ``units`` (the same, in forward
    order), ``first_skipped_name`` / ``first_skipped_module`` (the skipped unit a forward reaches
    first), ``recorded`` / ``substituted`` per call.
    """

    def __init__(self, model, branch: int):
        if branch < 0:
            raise ValueError(f"branch must be >= 0, got {branch}")
        super().__init__(model)
        self.branch = branch
        self.block, self.layer = divmod(branch, 3)
        units = self._skipped_units(model)
        self.units = [name for name, _ in units]
        self.skipped_names = sorted(self.units)
        self.first_skipped_name, self.first_skipped_module = units[0]
        for name, module in units:
            self.handles.append(module.register_forward_hook(partial(self._hook, name)))

    def _down_skipped(self, b, layer):
        return b > self.block or (b == self.block and layer >= self.layer)

    def _up_skipped(self, f, layer_from_end):
        return f > self.block or (f == self.block and layer_from_end > self.layer)

    @staticmethod
    def _layer_modules(prefix, blk, i):
        out = []
        for attr in LAYER_LISTS:
            lst = getattr(blk, attr, None)
            if lst is not None and i < len(lst):
                out.append((f"{prefix}.{attr}.{i}", lst[i]))
        return out

    def _skipped_units(self, model):
        units = []
        for b, blk in enumerate(model.down_blocks):
            n = len(blk.resnets)
            if self._down_skipped(b, 0):
                units.append((f"down_blocks.{b}", blk))
                continue
            for i in range(n):
                if self._down_skipped(b, i):
                    units += self._layer_modules(f"down_blocks.{b}", blk, i)
            if getattr(blk, "downsamplers", None) is not None and self._down_skipped(b, n):
                for k, ds in enumerate(blk.downsamplers):
                    units.append((f"down_blocks.{b}.downsamplers.{k}", ds))
        units.append(("mid_block", model.mid_block))
        n_up = len(model.up_blocks)
        for k, blk in enumerate(model.up_blocks):
            f = n_up - 1 - k
            if f > self.block:
                units.append((f"up_blocks.{k}", blk))
                continue
            n = len(blk.resnets)
            for i in range(n):
                if self._up_skipped(f, n - 1 - i):
                    units += self._layer_modules(f"up_blocks.{k}", blk, i)
        return units

    def _hook(self, name, module, args, out):
        return self._take(name, out)


class ClockworkVideoHooks(_Statement):
    """Clockwork on a video UNet: on keyframes record the input ``hidden_states`` of
    ``up_blocks[-levels]``; on other calls replace it by the recorded one.

    All three families call their up blocks with ``hidden_states=`` as a keyword (a positional
    first argument is handled too). Equivalent to caching everything inside the outer ``levels``
    resolution levels: the down path still runs (its skip connections into up_blocks[-levels:]
    stay live), the deeper down blocks, the mid block and up_blocks[:-levels] are reused through
    the one recorded tensor. ``levels == len(up_blocks)`` reuses the mid block's output.
    """

    def __init__(self, model, levels: int = 1):
        if not 1 <= levels <= len(model.up_blocks):
            raise ValueError(f"levels must be in 1..{len(model.up_blocks)}, got {levels}")
        super().__init__(model)
        self.levels = levels
        self.name = f"up_blocks.{len(model.up_blocks) - levels}:hidden_states"
        self.handles.append(model.up_blocks[-levels].register_forward_pre_hook(self._pre, with_kwargs=True))

    def _pre(self, module, args, kwargs):
        value = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        new = self._take(self.name, value)
        if new is None:
            return None
        if "hidden_states" in kwargs:
            return args, dict(kwargs, hidden_states=new)
        return (new,) + tuple(args[1:]), kwargs
