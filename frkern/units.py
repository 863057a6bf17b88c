"""Module wrappers that take the place of diffusers modules in a patched model.

A wrapper owns the original's children, parameters and buffers by sharing the original's very
dicts: a child replaced while patched (a LoRA layer injected by peft, a swapped conv) is replaced
in both, the forward uses it, and `unpatch` needs to hand nothing back. The state dict keeps its
keys. Reuse units go through the runtime's unit protocol (`Runtime.unit`): they say what they
cache and how to compute it, the runtime decides whether to compute, read or blend.
- ReusedResnetBlock2D: conv1's output, conv1(SiLU(norm1(x))) (FRDiff's S(x)).
- ReusedTransformer2D: the residual branch (the output minus the input).
- CachedSegment: a whole module's output (Clockwork's and DeepCache's inner blocks).
FusedGEGLU caches nothing: it only swaps in a fused kernel.

A new unit kind is a wrapper whose forward calls `self.cached(sig, compute, reuse)` plus a row in
its model family's table (CONTRIBUTING.md shows one).
"""
from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from . import ops
from .cache import signature
from .runtime import Runtime


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
        # The original's own dicts, not copies: one module tree, whoever changes it.
        for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            object.__setattr__(self, name, getattr(original, name))
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

    def cached(self, sig, compute, reuse=None, update=None):
        """This unit's output through the runtime's unit protocol (see Runtime.unit), or simply
        computed when the policy caches nothing here."""
        if not self.cache_unit:
            result = compute()
            return result if reuse is None and update is None else result[0]
        return self.runtime.unit(self.unit, sig, compute, reuse, update)

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

    def forward(self, input_tensor, temb, *args, **kwargs):
        o = self.original  # its children are ours (shared dicts): whatever is in the tree now
        resample = o.upsample if o.upsample is not None else o.downsample

        def conv1_branch():
            hidden = self._norm_act(input_tensor, o.norm1)
            if resample is None:
                return o.conv1(hidden)
            if o.upsample is not None and hidden.shape[0] >= 64:
                hidden = hidden.contiguous()
            return o.conv1(resample(hidden))

        hidden = self.cached(signature(input_tensor), conv1_branch)
        if resample is not None:
            if o.upsample is not None and input_tensor.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
            input_tensor = resample(input_tensor)

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
        object.__setattr__(self, "_hook", None)
        self.rebind()

    def rebind(self):
        """Hook whatever proj_out is now: its output is the branch before diffusers adds the input
        back. Called again (by the weights watch) whenever a module is registered anywhere, e.g.
        a LoRA layer wrapping proj_out."""
        proj_out = self._modules["proj_out"]
        if self._hook is not None and self._hook[0] is proj_out:
            return
        self.remove_hook()
        object.__setattr__(self, "_hook", (proj_out, proj_out.register_forward_hook(self._capture)))

    def _capture(self, module, args, output):
        if self._capturing:
            object.__setattr__(self, "_captured", output)

    def remove_hook(self):
        if self._hook is not None:
            self._hook[1].remove()
            object.__setattr__(self, "_hook", None)

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        def branch_and_output():
            object.__setattr__(self, "_capturing", True)
            try:
                out = self.original(hidden_states, *args, return_dict=False, **kwargs)[0]
            finally:
                object.__setattr__(self, "_capturing", False)
            branch = self._captured
            object.__setattr__(self, "_captured", None)
            if branch.dim() == 3:  # linear projection: (B, HW, C) -> (B, C, H, W), as diffusers does
                b, _, h, w = hidden_states.shape
                branch = branch.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            return out, branch

        if self.cache_unit:
            out = self.cached(signature(hidden_states), branch_and_output, lambda branch: hidden_states + branch)
        else:
            out = self.original(hidden_states, *args, return_dict=False, **kwargs)[0]
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
        return self.cached(signature(_primary_input(args, kwargs)), lambda: self.original(*args, **kwargs))


class GatedConv2d(_Wrapper):
    """A 3x3 (padding 1) or 1x1 stride-1 convolution computed only where its input changed
    (Skip-Convolutions with an exact reference input, kernels/skip_conv.py). State: (x_ref, z,
    active tiles); keyframes compute densely, other calls move the state on (stateful unit)."""

    def __init__(self, original, runtime, unit, cache_unit, backend):
        super().__init__(original, runtime, unit, cache_unit, backend)
        policy = runtime.policy
        self.tile, self.threshold = policy.tile, float(policy.threshold)
        object.__setattr__(self, "last_active", None)
        object.__setattr__(self, "last_affected", None)

    def forward(self, x):
        o = self.original

        def dense():
            z = o(x)
            # the same state structure as a step's (CUDA graphs read it leaf by leaf); x_ref is our
            # own copy, not the caller's tensor: the Triton step updates x_ref (and z) in place
            n, _, h, w = x.shape
            none_active = torch.zeros(n, 1, -(-h // self.tile), -(-w // self.tile), dtype=torch.bool, device=x.device)
            return z, (x.clone(), z, none_active)

        def step(state):
            x_ref, z, _ = state
            out, x_ref, active, affected = ops.skip_conv(x, x_ref, z, o.weight, o.bias, tile=self.tile,
                                                         threshold=self.threshold, padding=o.padding, backend=self.backend)
            object.__setattr__(self, "last_active", active)
            object.__setattr__(self, "last_affected", affected)  # what a tile-predicated conv computes
            return out, (x_ref, out, active)

        object.__setattr__(self, "last_active", None)
        object.__setattr__(self, "last_affected", None)
        return self.cached(signature(x), dense, update=step)


def gated_conv_supported(conv: nn.Module) -> bool:
    k = conv.kernel_size
    return (isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and k in ((3, 3), (1, 1)) and conv.padding == (k[0] // 2, k[1] // 2) and conv.padding_mode == "zeros")
