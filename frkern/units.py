"""Module wrappers that take the place of diffusers modules in a patched UNet.

A wrapper adopts the original's children, parameters and buffers (the same objects: no weight
copies, and the state dict keeps its keys), keeps the original for `unpatch`, and asks the runtime
whether to compute or to read the cache. Each reuse unit caches exactly one thing:
- ReusedResnetBlock2D: conv1's output, conv1(SiLU(norm1(x))) (FRDiff's S(x)).
- ReusedTransformer2D: the residual branch (the output minus the input).
- CachedSegment: a whole module's output (Clockwork's and DeepCache's inner blocks).
FusedGEGLU caches nothing: it only swaps in a fused kernel.
"""
from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from . import ops
from .cache import signature
from .runtime import FULL_MODE, GATED_MODE, Runtime


def _primary_input(args, kwargs) -> torch.Tensor:
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise TypeError("frkern: expected the module's first input (hidden_states) to be a tensor")
    return x


class _Wrapper(nn.Module):
    # Swapped in even when the policy caches nothing here (it runs fused kernels)?
    swap_when_not_cached: bool = True

    def __init__(self, original: nn.Module, runtime: Runtime, unit: str, cache_unit: bool, backend: str):
        super().__init__()
        # Plain attributes (not submodules), so named_modules / state_dict keys are unchanged.
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "runtime", runtime)
        self.unit = unit
        self.cache_unit = cache_unit
        self.backend = backend
        # Direct dict copies: register_* would refuse names that __getattr__ already resolves.
        self._modules.update(original._modules)
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._non_persistent_buffers_set.update(original._non_persistent_buffers_set)
        self.train(original.training)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def train(self, mode: bool = True):
        super().train(mode)
        self.original.training = mode
        return self

    def extra_repr(self) -> str:
        return f"unit={self.unit!r}, cached={self.cache_unit}"


class ReusedResnetBlock2D(_Wrapper):
    """diffusers' ResnetBlock2D with norm1+SiLU and (conv1 out + temb)+norm2+SiLU as fused ops,
    and conv1's output cached on keyframes and read on reuse steps."""

    def __init__(self, original, runtime, unit, cache_unit, backend):
        super().__init__(original, runtime, unit, cache_unit, backend)
        self.silu = isinstance(original.nonlinearity, nn.SiLU)

    def _norm_act(self, x, norm, add_channel=None):
        if self.silu:
            return ops.group_norm_act(x, norm, silu=True, add_channel=add_channel, backend=self.backend)
        if add_channel is not None:
            x = x + add_channel[:, :, None, None]
        return self.original.nonlinearity(norm(x))

    def _keep(self, conv1_out, sig):
        if not self.cache_unit:
            return conv1_out
        if self.runtime.mode == GATED_MODE:
            return self.runtime.gated(self.unit, conv1_out)
        self.runtime.write(self.unit, conv1_out, sig)
        return conv1_out

    def forward(self, input_tensor, temb, *args, **kwargs):
        o = self.original
        rt = self.runtime
        sig = signature(input_tensor)
        hidden = rt.read(self.unit, sig) if self.cache_unit else None

        if o.upsample is not None or o.downsample is not None:
            resample = o.upsample if o.upsample is not None else o.downsample
            if hidden is None:
                hidden = self._norm_act(input_tensor, o.norm1)
                if o.upsample is not None and hidden.shape[0] >= 64:
                    input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
                hidden = self._keep(o.conv1(resample(hidden)), sig)
            if o.upsample is not None and input_tensor.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
            input_tensor = resample(input_tensor)
        elif hidden is None:
            hidden = self._keep(o.conv1(self._norm_act(input_tensor, o.norm1)), sig)

        chan = None  # the time-embedding projection, one value per (batch, channel)
        if o.time_emb_proj is not None:
            if not o.skip_time_act:
                temb = o.nonlinearity(temb)
            chan = temb = o.time_emb_proj(temb)
        if o.time_embedding_norm == "default":
            if temb is not None and chan is None:
                hidden = hidden + temb
            hidden = self._norm_act(hidden, o.norm2, add_channel=chan)
        else:  # scale_shift (patch refuses other kinds)
            if temb is None:
                raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
            scale, shift = torch.chunk(temb[:, :, None, None] if chan is not None else temb, 2, dim=1)
            hidden = o.nonlinearity(o.norm2(hidden) * (1 + scale) + shift)

        hidden = o.conv2(o.dropout(hidden))
        if o.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = o.conv_shortcut(input_tensor)
        out = input_tensor + hidden
        # diffusers always divides; by 1.0 (every SD/SDXL block) that is an exact no-op and a full
        # extra pass over the block's output, so it is skipped.
        return out / o.output_scale_factor if o.output_scale_factor != 1.0 else out


class ReusedTransformer2D(_Wrapper):
    """Transformer2DModel whose residual branch (norm, proj_in, blocks, proj_out) is cached on
    keyframes; a reuse step is `x + cached` and runs nothing else."""

    swap_when_not_cached = False  # nothing fused: only there to cache

    def __init__(self, original, runtime, unit, cache_unit, backend):
        super().__init__(original, runtime, unit, cache_unit, backend)
        object.__setattr__(self, "_captured", None)
        object.__setattr__(self, "_capturing", False)
        # proj_out's output is the branch before diffusers adds the input back.
        self._hook = original.proj_out.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        if self._capturing:
            object.__setattr__(self, "_captured", output)

    def remove_hook(self):
        self._hook.remove()

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        rt = self.runtime
        sig = signature(hidden_states)
        branch = rt.read(self.unit, sig) if self.cache_unit else None
        if branch is not None:
            out = hidden_states + branch
        else:
            store = self.cache_unit and rt.mode in (FULL_MODE, GATED_MODE)
            object.__setattr__(self, "_capturing", store)
            try:
                out = self.original(hidden_states, *args, return_dict=False, **kwargs)[0]
            finally:
                object.__setattr__(self, "_capturing", False)
            if store:
                branch = self._captured
                object.__setattr__(self, "_captured", None)
                if branch.dim() == 3:  # linear projection: (B, HW, C) -> (B, C, H, W), as diffusers does
                    b, _, h, w = hidden_states.shape
                    branch = branch.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
                if rt.mode == GATED_MODE:
                    out = hidden_states + rt.gated(self.unit, branch)
                else:
                    rt.write(self.unit, branch, sig)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class FusedGEGLU(_Wrapper):
    """diffusers' GEGLU (feed-forward activation of SD/SDXL transformer blocks) with the gate,
    h * gelu(g), as one fused op after the projection. Caches nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        if args or kwargs.get("scale") is not None:  # deprecated arguments: diffusers' own path
            return self.original(hidden_states, *args, **kwargs)
        return ops.geglu(self.original.proj(hidden_states), backend=self.backend)


class CachedSegment(_Wrapper):
    """Any module whose whole output is cached on keyframes and returned on reuse steps (its
    inputs are ignored then: the module is not run)."""

    def forward(self, *args, **kwargs):
        rt = self.runtime
        sig = signature(_primary_input(args, kwargs))
        cached = rt.read(self.unit, sig)
        if cached is not None:
            return cached
        out = self.original(*args, **kwargs)
        rt.write(self.unit, out, sig)
        return out
