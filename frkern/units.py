"""Module wrappers that take the place of diffusers modules in a patched model.

A wrapper owns the original's children, parameters and buffers by sharing the original's very
dicts: a child replaced while patched (a LoRA layer injected by peft, a swapped conv) is replaced
in both, the forward uses it, and `unpatch` needs to hand nothing back. The state dict keeps its
keys. Reuse units go through the runtime's unit protocol (`Runtime.unit`): they say what they
cache and how to compute it, the runtime decides whether to compute, read or blend.
- ReusedResnetBlock2D: conv1's output, conv1(SiLU(norm1(x))) (FRDiff's S(x)).
- ReusedTransformer2D: the residual branch (the output minus the input).
- CachedSegment: a whole module's output (Clockwork's and DeepCache's inner blocks).
- InnerSegment: a cached segment whose output only other cached segments read: it keeps the
  output's shapes, and hands out zero stand-ins of them on reuse calls.
FusedGEGLU caches nothing: it only swaps in a fused kernel.

A new unit kind is a wrapper whose forward calls `self.cached(sig, compute, reuse)` plus a row in
its model family's table (CONTRIBUTING.md shows one).
"""
from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import ops
from .cache import signature
from .cache_format import Encoded, decoded
from .runtime import Runtime


def _primary_input(args, kwargs) -> torch.Tensor:
    # the first input, however the block is called (diffusers' motion blocks pass ResNets theirs as
    # input_tensor=...)
    x = args[0] if args else next((kwargs[k] for k in ("hidden_states", "input_tensor", "sample") if k in kwargs), None)
    if not isinstance(x, torch.Tensor):
        raise TypeError("frkern: expected the module's first input (hidden_states) to be a tensor")
    return x


_SHARED_DICTS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set",
                 "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


class _Wrapper(nn.Module):
    # Does it cache features when a policy reuses units (FRDiff)? (Else it only runs fused kernels.)
    reusable: bool = True
    # Swapped in even when the policy caches nothing here (it runs fused kernels)?
    swap_when_not_cached: bool = True
    # Children the wrapper's forward calls through `gates[name]` when one is installed (SkipConv).
    gated_children: tuple = ()
    # Does it take the original's hook dicts (its hooks run around every call of the wrapper)? Not
    # for wrappers called twice in one UNet call (an adaptive probe and its resumed pass): there the
    # original's hooks stay its own and run when it computes.
    shares_hooks: bool = True

    def __init__(self, original: nn.Module, runtime: Runtime, unit: str, cache_unit: bool, backend: str):
        super().__init__()
        # Plain attributes (not submodules), so named_modules / state_dict keys are unchanged.
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "runtime", runtime)
        # The wrapper's own attributes (set into its __dict__ so they are not forwarded).
        self.__dict__.update(unit=unit, cache_unit=cache_unit, backend=backend)
        self.__dict__["gates"] = {}  # gated child path -> ConvGate (SkipConv): the child is called through it
        # The original's own dicts, not copies: one module tree, whoever changes it. Its hook dicts
        # too: hooks registered on the module before patching run when the wrapper is called (on
        # every call, around what it returns, computed or cached), and hooks registered on the
        # wrapper stay on the module after unpatch. The original is then run through run_original
        # (its forward, not its __call__), so that they do not run twice.
        for name in _SHARED_DICTS if self.shares_hooks else _SHARED_DICTS[:4]:
            if name in original.__dict__:
                object.__setattr__(self, name, original.__dict__[name])
        if self.shares_hooks:
            object.__setattr__(self, "_is_full_backward_hook", original.__dict__.get("_is_full_backward_hook"))
        self.train(original.training)
        if cache_unit:
            runtime.declare(unit)  # read through the unit protocol

    def run_original(self, *args, **kwargs):
        """The original module's computation: its forward (an instance one, such as an accelerate hook's,
        included), without its __call__'s hooks, which ran around this wrapper's call (or, for a
        wrapper that does not share them, through its __call__, hooks and all)."""
        if self.shares_hooks:
            return self.original.forward(*args, **kwargs)
        return self.original(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    # Attributes set on the wrapper that are not its own go to the original, whose forward reads
    # them: diffusers' enable_freeu (s1, s2, b1, b2 on each up block), gradient checkpointing
    # (gradient_checkpointing, _gradient_checkpointing_func), anything a user sets on a block.
    # Submodules and parameters live in the shared dicts either way.
    def __setattr__(self, name, value):
        d = self.__dict__
        if "original" in d and name not in d and not isinstance(value, (nn.Module, nn.Parameter)) \
                and not hasattr(type(self), name):
            setattr(d["original"], name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name):
        if name not in self.__dict__ and "original" in self.__dict__ and hasattr(self.__dict__["original"], name):
            delattr(self.__dict__["original"], name)
        else:
            super().__delattr__(name)

    def attach(self, parent: nn.Module, name: str) -> None:
        """Take the original's place in `parent`."""
        self.__dict__["_place"] = (parent, name)
        parent._modules[name] = self

    def detach(self) -> None:
        """Put the original back where this wrapper stands (with whatever children it has now). A
        module the user put in the wrapper's place keeps it; if that module holds the wrapper
        (diffusers' split inference wraps blocks in a SplitInferenceModule), it gets the original."""
        parent, name = self.__dict__.pop("_place")
        self.original.train(self.training)
        here = parent._modules.get(name)
        if here is self:
            parent._modules[name] = self.original
            return
        if here is None:
            return
        holders = [m for m in here.modules() if m is not self]
        for holder in holders:
            for key, child in holder._modules.items():
                if child is self:
                    holder._modules[key] = self.original

    def train(self, mode: bool = True):
        super().train(mode)
        self.original.training = mode
        return self

    def _conv(self, path, x):
        """The child convolution at `path` (one of gated_children) on x: whatever module is there now
        (a peft LoRA layer injected before or after patching, a conv with diffusers' casting hooks),
        through its gate when SkipConv gates it."""
        module = self._modules[path] if "." not in path else self.get_submodule(path)
        gate = self.gates.get(path)
        return module(x) if gate is None else gate(module, x)

    def cached(self, sig, compute, reuse=None, update=None):
        """This unit's output through the runtime's unit protocol (see Runtime.unit), or simply
        computed when the policy caches nothing here."""
        if not self.cache_unit:
            result = compute()
            return result if reuse is None and update is None else result[0]
        return self.runtime.unit(self.unit, sig, compute, reuse, update)

    @property
    def quantize(self) -> tuple[str, str, int] | None:
        """(format, scales, group size) when this unit caches into an int8 / fp8 cache: its kernels
        then encode what they cache and decode what they read (frkern.cache_format)."""
        codec = self.runtime.cache.codec
        return codec.quantize if self.cache_unit and codec is not None else None

    def extra_repr(self) -> str:
        return f"unit={self.unit!r}, cached={self.cache_unit}"


class ReusedResnetBlock2D(_Wrapper):
    """diffusers' ResnetBlock2D with norm1+SiLU and (conv1 out + temb)+norm2+SiLU as fused ops,
    and conv1's output cached on keyframes and read on reuse steps."""

    gated_children = ("conv1", "conv2")

    def __init__(self, original, runtime, unit, cache_unit, backend):
        super().__init__(original, runtime, unit, cache_unit, backend)
        self.__dict__["silu"] = isinstance(original.nonlinearity, nn.SiLU)
        if cache_unit:
            runtime.declare(unit, encoded=True)  # norm2's prologue decodes a cached conv1 output

    def _norm_act(self, x, norm, add_channel=None):
        if self.silu and _plain_norm(norm):
            return ops.group_norm_act(x, norm, silu=True, add_channel=add_channel, backend=self.backend)
        # a norm with hooks (offloading, casting, a user's) is called, so that they run
        if add_channel is not None:
            x = x + add_channel[:, :, None, None]
        return self.original.nonlinearity(norm(x))

    def _norm2(self, conv1_out, chan):
        """SiLU(norm2(conv1's output + the time-embedding projection)); a cached conv1 output in an
        int8 / fp8 cache is decoded in the fused kernel's prologue."""
        h = conv1_out
        if isinstance(h, Encoded) and h.scale is not None and self.silu and _plain_norm(self.original.norm2):
            return ops.group_norm_act(h.data, self.original.norm2, silu=True, add_channel=chan, backend=self.backend,
                                      x_scale=h.scale, x_group_size=h.group_size, x_dtype=h.dtype)
        return self._norm_act(decoded(h, self.backend), self.original.norm2, add_channel=chan)

    def forward(self, input_tensor, temb, *args, **kwargs):
        o = self.original  # its children are ours (shared dicts): whatever is in the tree now
        resample = o.upsample if o.upsample is not None else o.downsample

        def conv1_branch():
            hidden = self._norm_act(input_tensor, o.norm1)
            if resample is None:
                return self._conv("conv1", hidden)
            if o.upsample is not None and hidden.shape[0] >= 64:
                hidden = hidden.contiguous()
            return self._conv("conv1", resample(hidden))

        chan = None  # the time-embedding projection, one value per (batch, channel)
        if o.time_emb_proj is not None:
            if not o.skip_time_act:
                temb = o.nonlinearity(temb)
            chan = temb = o.time_emb_proj(temb)
        fused = self.silu and o.time_embedding_norm == "default" and (temb is None or chan is not None)
        if fused:
            # The unit's output is norm2's (conv1 output + chan, normalised, SiLU); its state is conv1's
            # output, which a keyframe's norm2 kernel encodes into an int8 / fp8 cache as it reads it.
            quantize = self.quantize

            def compute():
                h = conv1_branch()
                if quantize is not None and self.runtime.stores:
                    if _plain_norm(o.norm2):
                        y, (q, scale) = ops.group_norm_act(h, o.norm2, silu=True, add_channel=chan,
                                                           backend=self.backend, quantize=quantize)
                    else:  # norm2 is called (its hooks run); the encoding is the same op's, unfused
                        y = self._norm_act(h, o.norm2, add_channel=chan)
                        q, scale = ops.quantize_cache(h, *quantize, backend=self.backend)
                    return y, Encoded(q, scale, h.dtype, quantize[2])
                return self._norm2(h, chan), h

            hidden = self.cached(signature(input_tensor), compute, lambda h: self._norm2(h, chan))
        else:
            hidden = decoded(self.cached(signature(input_tensor), conv1_branch), self.backend)
        if resample is not None:
            if o.upsample is not None and input_tensor.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
            input_tensor = resample(input_tensor)

        if not fused and o.time_embedding_norm == "default":
            if temb is not None and chan is None:
                hidden = hidden + temb
            hidden = self._norm_act(hidden, o.norm2, add_channel=chan)
        elif not fused:  # scale_shift (patch refuses other kinds)
            if temb is None:
                raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
            scale, shift = torch.chunk(temb[:, :, None, None] if chan is not None else temb, 2, dim=1)
            hidden = o.nonlinearity(o.norm2(hidden) * (1 + scale) + shift)

        hidden = self._conv("conv2", o.dropout(hidden))
        if o.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = o.conv_shortcut(input_tensor)
        out = input_tensor + hidden
        # diffusers always divides; by 1.0 (every SD/SDXL block) that is an exact no-op and a full
        # extra pass over the block's output, so it is skipped.
        return out / o.output_scale_factor if o.output_scale_factor != 1.0 else out


class _ResidualBranch(_Wrapper):
    """A module whose output is input + branch, the branch being one child's output (`branch_child`)
    laid back out in the input's layout (`_branch`). A forward hook on that child captures its output
    during a keyframe's computation; reuse returns input + the cached branch and runs nothing else."""

    swap_when_not_cached = False  # nothing fused: only there to cache
    branch_child = "proj_out"

    def __init__(self, original, runtime, unit, cache_unit, backend):
        super().__init__(original, runtime, unit, cache_unit, backend)
        object.__setattr__(self, "_captured", None)
        object.__setattr__(self, "_capturing", False)
        object.__setattr__(self, "_hook", None)
        self.rebind()
        if cache_unit:
            runtime.declare(unit, encoded=True)  # input + branch decodes a cached branch

    def rebind(self):
        """Hook whatever the branch's child is now (called again by the weights watch whenever a
        module is registered anywhere, e.g. a LoRA layer wrapping it)."""
        child = self._modules[self.branch_child]
        if self._hook is not None and self._hook[0] is child:
            return
        self.remove_hook()
        object.__setattr__(self, "_hook", (child, child.register_forward_hook(self._capture)))

    def _capture(self, module, args, output):
        if self._capturing:
            object.__setattr__(self, "_captured", output)

    def remove_hook(self):
        if self._hook is not None:
            self._hook[1].remove()
            object.__setattr__(self, "_hook", None)

    def detach(self) -> None:
        self.remove_hook()
        super().detach()

    def _branch(self, captured, hidden_states, frames):  # pragma: no cover - per subclass
        raise NotImplementedError

    def _frames(self, args, kwargs) -> int | None:
        """Frames per video of this call (temporal modules: it fixes the branch's layout), or None."""
        return None

    def _output(self, hidden_states, args, kwargs):
        """The module's output tensor (the original's forward)."""
        return self.run_original(hidden_states, *args, **kwargs)

    def _reused(self, hidden_states, args, kwargs):
        """The output tensor through the unit protocol."""
        frames = self._frames(args, kwargs)

        def branch_and_output():
            object.__setattr__(self, "_capturing", True)
            try:
                out = self._output(hidden_states, args, kwargs)
            finally:
                object.__setattr__(self, "_capturing", False)
            branch = self._branch(self._captured, hidden_states, frames)
            object.__setattr__(self, "_captured", None)
            return out, branch

        # a frame count is part of the signature: (batch * frames) alone does not fix the layout
        sig = signature(hidden_states) if frames is None else signature(hidden_states) + (frames,)
        return self.cached(sig, branch_and_output, lambda branch: self._add_branch(hidden_states, branch))

    def _add_branch(self, x, branch):
        """x + a cached branch; one in an int8 / fp8 cache is decoded inside the add."""
        if isinstance(branch, Encoded) and branch.scale is not None and branch.dtype == x.dtype:
            return ops.dequantize_add(x, branch.data, branch.scale, branch.group_size, backend=self.backend)
        return x + decoded(branch, self.backend)


class ReusedTransformer2D(_ResidualBranch):
    """Transformer2DModel whose residual branch (norm, proj_in, blocks, proj_out) is cached on
    keyframes; a reuse step is `x + cached` and runs nothing else."""

    def _branch(self, projected, hidden_states, frames):
        if projected.dim() == 3:  # linear projection: (B, HW, C) -> (B, C, H, W), as diffusers does
            b, _, h, w = hidden_states.shape
            projected = projected.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return projected

    def _output(self, hidden_states, args, kwargs):
        return self.run_original(hidden_states, *args, **dict(kwargs, return_dict=False))[0]

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        if self.cache_unit:
            out = self._reused(hidden_states, args, kwargs)
        else:
            out = self._output(hidden_states, args, kwargs)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def frames_to_batch(projected, hidden_states, frames):
    """(batch * H * W, frames, C) -> (batch * frames, C, H, W), as diffusers' temporal
    transformers (AnimateDiff's motion modules, TransformerTemporalModel) lay proj_out's output out."""
    bf, c, h, w = hidden_states.shape
    return (projected[None, None, :].reshape(bf // frames, h, w, frames, c).permute(0, 3, 4, 1, 2)
            .contiguous().reshape(bf, c, h, w))


class ReusedMotionModule(_ResidualBranch):
    """AnimateDiff's motion module (diffusers' AnimateDiffTransformer3D: attention over frames at
    each pixel) whose residual branch is cached on keyframes: its output is input + branch, the
    branch being proj_out's output laid back out as (batch * frames, C, H, W)."""

    def _frames(self, args, kwargs) -> int:
        # forward(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames, ...)
        return int(kwargs["num_frames"] if "num_frames" in kwargs else args[3] if len(args) > 3 else 1)

    def _branch(self, projected, hidden_states, frames):
        return frames_to_batch(projected, hidden_states, frames)

    def forward(self, hidden_states, *args, **kwargs):
        if not self.cache_unit:
            return self.run_original(hidden_states, *args, **kwargs)
        return self._reused(hidden_states, args, kwargs)


class FusedGEGLU(_Wrapper):
    """diffusers' GEGLU (feed-forward activation of SD/SDXL transformer blocks) with the gate,
    h * gelu(g), as one fused op after the projection. Caches nothing."""

    reusable = False

    def forward(self, hidden_states, *args, **kwargs):
        if args or kwargs.get("scale") is not None:  # deprecated arguments: diffusers' own path
            return self.run_original(hidden_states, *args, **kwargs)
        return ops.geglu(self.original.proj(hidden_states), backend=self.backend)


def _clone_tensors(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


class CachedSegment(_Wrapper):
    """Any module whose whole output is cached on keyframes and returned on reuse steps (its
    inputs are ignored then: the module is not run).

    When the model's forward changes this call's block outputs in place (the runtime's
    `outputs_mutated`, from the family: diffusers adds T2I-Adapter residuals with `sample +=`),
    the cache keeps its own copy and each call gets a fresh one, so no call sees another's add."""

    def forward(self, *args, **kwargs):
        if not self.runtime.outputs_mutated:
            return self.cached(signature(_primary_input(args, kwargs)), lambda: self.run_original(*args, **kwargs))

        def compute():
            out = self.run_original(*args, **kwargs)
            return out, _clone_tensors(out)

        return self.cached(signature(_primary_input(args, kwargs)), compute, reuse=_clone_tensors)


class OutputShapes:
    """The structure of a module's output (its pytree and each tensor's shape, dtype and device):
    what an InnerSegment caches instead of the output, with one 0-d zero per dtype and device that
    the stand-ins broadcast (made once, on the keyframe: a reuse call launches no kernel for them).
    Not a tuple, so the cache and its codec keep it as one opaque leaf (its bytes are not counted:
    2 to 4 per dtype)."""

    __slots__ = ("spec", "leaves", "zeros")

    def __init__(self, value):
        leaves, self.spec = tree_flatten(value)
        self.leaves = tuple((True, tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else (False, x)
                            for x in leaves)
        self.zeros = {}
        for leaf in self.leaves:
            if leaf[0] and leaf[2:] not in self.zeros:
                self.zeros[leaf[2:]] = torch.zeros((), dtype=leaf[2], device=leaf[3])

    def stand_ins(self, writable: bool):
        """Zeros of the output's structure: broadcast views of a 0-d zero (no memory), or real zero
        tensors when the model's forward adds to block outputs in place (writable)."""
        leaves = []
        for leaf in self.leaves:
            if not leaf[0]:
                leaves.append(leaf[1])
                continue
            _, shape, dtype, device = leaf
            leaves.append(torch.zeros(shape, dtype=dtype, device=device) if writable
                          else self.zeros[dtype, device].expand(shape))
        return tree_unflatten(leaves, self.spec)


class InnerSegment(CachedSegment):
    """A cached segment whose output feeds only other cached segments (a Clockwork or DeepCache cut
    is U-shaped: only its last module's output, and skip connections of computed blocks, reach the
    modules that run on a reuse call). The model's forward still calls it on reuse calls and passes
    its output on to cached modules, which ignore their inputs: so it caches the output's shapes,
    and a reuse call gets zero stand-ins of them. Nothing of its output is stored, encoded or decoded.
    (Were a running module to read a stand-in, the result would change: the exactness tests against
    the deepcache package and the Clockwork statements would see it.)"""

    def forward(self, *args, **kwargs):
        def compute():
            out = self.run_original(*args, **kwargs)
            return out, OutputShapes(out)

        return self.cached(signature(_primary_input(args, kwargs)), compute,
                           reuse=lambda shapes: shapes.stand_ins(self.runtime.outputs_mutated))


def _base_conv(module: nn.Module) -> nn.Module:
    """The convolution a module computes with: itself, or the base layer of a peft adapter layer
    (LoRA and its kin add a term with the same kernel, stride and padding)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def _plain(module: nn.Module, types: tuple) -> bool:
    """A bare module of one of `types` whose weights are what it computes with and whose call does
    nothing else: no forward replaced (accelerate's and diffusers' offloading and casting hooks),
    no forward hooks or pre-hooks (a user's, or torch's global ones). Only then may a fused op read
    its weight and bias directly instead of calling it."""
    return (type(module) in types and "forward" not in module.__dict__ and not module._forward_hooks
            and not module._forward_pre_hooks and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks)


def _plain_conv(module: nn.Module) -> bool:
    """A bare nn.Conv2d / nn.Conv3d (no adapter, no hooks that cast or move its weights): the Triton
    step may read its weight and bias directly."""
    return _plain(module, (nn.Conv2d, nn.Conv3d))


def _plain_norm(module: nn.Module) -> bool:
    """A bare nn.GroupNorm: the fused GroupNorm+SiLU may read its weight and bias directly."""
    return _plain(module, (nn.GroupNorm,))


class ConvGate:
    """Skip-Convolution (kernels/skip_conv.py, with an exact reference input) on whatever module sits
    at one convolution's place: a 3x3 (padding 1) or 1x1 stride-1 nn.Conv2d, a (3, 1, 1) (padding
    (1, 0, 0)) or (1, 1, 1) nn.Conv3d over frames (video UNets' temporal convolutions: each frame gated
    as an image, recomputed tiles dilated over the frames the kernel spans), a peft LoRA layer around
    one (added before or after patching), or one with diffusers' layerwise-casting hooks. It is not
    a module of the tree (so peft, casting and offloading hooks see the convolution itself); the
    parent wrapper calls the child through it. State (x_ref, z = module(x_ref), active tiles): a
    keyframe computes densely; other calls move the state on (a stateful unit).

    The Triton step reads a plain convolution's weight and bias; any other module (adapter layer,
    hooks) takes the PyTorch reference path, which calls the module itself on the whole map, so
    what is computed is exactly the adapted convolution."""

    def __init__(self, runtime: Runtime, unit: str, backend: str, tile: int, threshold: float):
        self.runtime, self.unit, self.backend = runtime, unit, backend
        self.tile, self.threshold = tile, float(threshold)
        runtime.declare(unit, stateful=True)
        self._place = None
        self.last_affected = None
        self.last_shape = None  # (n, cin, cout, k, h, w) of the last gated step (FLOP accounting)
        self.active_runs = []  # the active tiles of each gated step of this call (split inference: one per chunk)
        self._checked = None  # the module last found supported

    def attach(self, parent: nn.Module, name: str) -> None:
        """Make `parent` (a wrapper with `name` in its gated_children) call its child through this gate."""
        self._place = (parent, name)
        parent.gates[name] = self

    def detach(self) -> None:
        parent, name = self._place
        parent.gates.pop(name, None)
        self._place = None

    @property
    def owner(self) -> nn.Module | None:
        """The wrapper that calls the convolution through this gate (None once detached)."""
        return self._place[0] if self._place else None

    def __repr__(self) -> str:
        return f"ConvGate(unit={self.unit!r}, tile={self.tile}, threshold={self.threshold})"

    def __call__(self, module: nn.Module, x: torch.Tensor):
        if module is not self._checked:  # replaced since (an adapter injected or unloaded)
            if not gated_conv_supported(module):
                raise ValueError(f"frkern: {self.unit} is now {module}, which SkipConv cannot gate "
                                 f"({GATED_CONVS}, or an adapter layer around one)")
            self._checked = module
        conv = _base_conv(module)
        self.last_affected = None
        if not self.runtime.runs.get(self.unit):  # the call's first run of this gate
            self.active_runs = []
        temporal = isinstance(conv, nn.Conv3d)

        def dense():
            z = module(x)
            # the same state structure as a step's (CUDA graphs read it leaf by leaf); x_ref is our
            # own copy, not the caller's tensor: the Triton step updates x_ref (and z) in place
            *lead, h, w = x.shape
            none_active = torch.zeros(lead[0], 1, *lead[2:], -(-h // self.tile), -(-w // self.tile),
                                      dtype=torch.bool, device=x.device)
            return z, (x.clone(), z, none_active)

        def step(state):
            x_ref, z, _ = state
            fn = None if _plain_conv(module) else module
            if temporal:
                out, x_ref, active, affected = ops.skip_conv_temporal(
                    x, x_ref, z, conv.weight, conv.bias, tile=self.tile, threshold=self.threshold,
                    backend=self.backend, conv=fn)
                n, cin, f, h, w = x.shape
                self.last_affected = affected
                self.active_runs.append(active)
                self.last_shape = (n * f, cin, conv.out_channels, conv.kernel_size[0], h, w)
                return out, (x_ref, out, active)
            out, x_ref, active, affected = ops.skip_conv(x, x_ref, z, conv.weight, conv.bias, tile=self.tile,
                                                         threshold=self.threshold, padding=conv.padding,
                                                         backend=self.backend, conv=fn)
            n, cin, h, w = x.shape
            self.last_affected = affected  # what a tile-predicated conv computes (FLOP accounting)
            self.active_runs.append(active)
            self.last_shape = (n, cin, conv.out_channels, conv.kernel_size[0] * conv.kernel_size[1], h, w)
            return out, (x_ref, out, active)

        return self.runtime.unit(self.unit, signature(x), dense, update=step)


GATED_CONVS = ("a stride-1 3x3 (padding 1) or 1x1 nn.Conv2d, or a stride-1 (3, 1, 1) (padding (1, 0, 0)) or "
               "(1, 1, 1) nn.Conv3d over frames")


def gated_conv_supported(module: nn.Module) -> bool:
    conv = _base_conv(module)
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)) or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    k = conv.kernel_size
    if isinstance(conv, nn.Conv3d):
        return (conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and k in ((3, 1, 1), (1, 1, 1))
                and conv.padding == (k[0] // 2, 0, 0))
    return (conv.stride == (1, 1) and conv.dilation == (1, 1)
            and k in ((3, 3), (1, 1)) and conv.padding == (k[0] // 2, k[1] // 2))
