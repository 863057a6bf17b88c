"""Wrappers for the units of the video UNets beyond AnimateDiff's (frkern.video): ModelScope's
UNet3DConditionModel and Stable Video Diffusion's UNetSpatioTemporalConditionModel.

Each follows the unit protocol of frkern.units (`self.cached(sig, compute, reuse)`):
- ReusedTemporalTransformer (TransformerTemporalModel: UNet3D's transformer_in and temp_attentions):
  the residual branch, proj_out's output laid back out as (batch * frames, C, H, W); a reuse step
  is input + branch.
- ReusedTemporalConv (TemporalConvLayer: UNet3D's temp_convs): the residual branch, conv4's output
  (B, C, F, H, W) laid back out as (batch * frames, C, H, W); a reuse step is input + branch.
- ReusedSpatioTemporalTransformer (TransformerSpatioTemporalModel: SVD's attentions): the residual
  branch, proj_out's output (of the AlphaBlender-mixed spatial/temporal stream) laid back out as
  (batch * frames, C, H, W); a reuse step is input + branch.
- ReusedTemporalResnetBlock (SVD's TemporalResnetBlock, inside each SpatioTemporalResBlock):
  conv1's output, conv1(SiLU(norm1(x))); the rest (temb, norm2, conv2, shortcut) is recomputed.

Each reuse reproduces, bit for bit, what the module returns on a keyframe from the same input:
the branch is exactly the tensor diffusers adds to the input, in the input's layout (reshapes and
permutes move values, they do not round), and IEEE addition is commutative. None of them runs a
fused kernel, so none is swapped in when a policy caches nothing there (`swap_when_not_cached`).
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

from .cache import signature
from .units import _ResidualBranch, _Wrapper, frames_to_batch


class _ReturnsTuple(_ResidualBranch):
    """A transformer whose forward takes return_dict (diffusers' TransformerTemporalModelOutput)."""

    def _output(self, hidden_states, args, kwargs):
        return self.run_original(hidden_states, *args, **dict(kwargs, return_dict=False))[0]

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        if self.cache_unit:
            out = self._reused(hidden_states, args, kwargs)
        else:
            out = self._output(hidden_states, args, kwargs)
        return TransformerTemporalModelOutput(sample=out) if return_dict else (out,)


class ReusedTemporalTransformer(_ReturnsTuple):
    """diffusers' TransformerTemporalModel (attention over frames at each pixel: UNet3D's
    transformer_in and temp_attentions): output = input + branch, the branch being proj_out's
    output (batch * H * W, frames, C) laid out as (batch * frames, C, H, W)."""

    def _frames(self, args, kwargs) -> int:
        # forward(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames, ...)
        return int(kwargs["num_frames"] if "num_frames" in kwargs else args[3] if len(args) > 3 else 1)

    def _branch(self, projected, hidden_states, frames):
        return frames_to_batch(projected, hidden_states, frames)


class ReusedSpatioTemporalTransformer(_ReturnsTuple):
    """diffusers' TransformerSpatioTemporalModel (SVD's attentions: per layer a spatial transformer
    block, a temporal one on it, and an AlphaBlender mixing the two): output = input + branch, the
    branch being proj_out's output (batch * frames, H * W, C) laid out as (batch * frames, C, H, W)."""

    def _frames(self, args, kwargs) -> int:
        # forward(hidden_states, encoder_hidden_states, image_only_indicator, return_dict)
        indicator = kwargs["image_only_indicator"] if "image_only_indicator" in kwargs else args[1]
        return int(indicator.shape[-1])

    def _branch(self, projected, hidden_states, frames):
        bf, c, h, w = hidden_states.shape
        return projected.reshape(bf, h, w, c).permute(0, 3, 1, 2).contiguous()


class ReusedTemporalConv(_ResidualBranch):
    """diffusers' TemporalConvLayer (UNet3D's temp_convs: four (3, 1, 1) convolutions over frames):
    output = input + branch, the branch being conv4's output (batch, C, frames, H, W) laid out as
    (batch * frames, C, H, W). conv4 is a Sequential (GroupNorm, SiLU, Dropout, Conv3d): its output
    is the Conv3d's."""

    branch_child = "conv4"
    # each Sequential's Conv3d (SkipConv gates them: the wrapper is swapped in to call them)
    gated_children = ("conv1.2", "conv2.3", "conv3.3", "conv4.3")

    def _frames(self, args, kwargs) -> int:
        # forward(hidden_states, num_frames=1)
        return int(kwargs["num_frames"] if "num_frames" in kwargs else args[0] if args else 1)

    def _branch(self, branch, hidden_states, frames):
        b, c, f, h, w = branch.shape
        return branch.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)

    def forward(self, hidden_states, *args, **kwargs):
        if self.cache_unit:
            return self._reused(hidden_states, args, kwargs)
        if self.gates:
            return self._gated(hidden_states, self._frames(args, kwargs))
        return self.run_original(hidden_states, *args, **kwargs)

    def _gated(self, hidden_states, frames):
        # diffusers' TemporalConvLayer.forward, each Sequential's convolution called through its gate
        x = hidden_states[None, :].reshape((-1, frames) + hidden_states.shape[1:]).permute(0, 2, 1, 3, 4)
        h = x
        for name in ("conv1", "conv2", "conv3", "conv4"):
            layers = list(self._modules[name])
            for layer in layers[:-1]:
                h = layer(h)
            h = self._conv(f"{name}.{len(layers) - 1}", h)
        h = x + h
        return h.permute(0, 2, 1, 3, 4).reshape((h.shape[0] * h.shape[2], -1) + h.shape[3:])


class ReusedTemporalResnetBlock(_Wrapper):
    """SVD's TemporalResnetBlock ((3, 1, 1) convolutions over frames on (batch, C, frames, H, W))
    with conv1's output, conv1(SiLU(norm1(x))), cached on keyframes and read on reuse steps; the
    rest is diffusers' op sequence, unchanged."""

    swap_when_not_cached = False  # nothing fused: only there to cache (or to gate its convolutions)
    gated_children = ("conv1", "conv2")

    def forward(self, input_tensor, temb=None):
        o = self.original  # its children are ours (shared dicts): whatever is in the tree now

        def conv1_branch():
            return self._conv("conv1", o.nonlinearity(o.norm1(input_tensor)))

        hidden_states = self.cached(signature(input_tensor), conv1_branch)
        if o.time_emb_proj is not None:
            temb = o.nonlinearity(temb)
            temb = o.time_emb_proj(temb)[:, :, :, None, None]
            temb = temb.permute(0, 2, 1, 3, 4)
            hidden_states = hidden_states + temb

        hidden_states = o.norm2(hidden_states)
        hidden_states = o.nonlinearity(hidden_states)
        hidden_states = o.dropout(hidden_states)
        hidden_states = self._conv("conv2", hidden_states)

        if o.conv_shortcut is not None:
            input_tensor = o.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


__all__ = ["ReusedTemporalTransformer", "ReusedSpatioTemporalTransformer", "ReusedTemporalConv",
           "ReusedTemporalResnetBlock"]
