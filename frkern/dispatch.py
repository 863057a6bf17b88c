"""patch / unpatch: swap frkern wrappers into a diffusers UNet and drive them per step.

One table (`UNIT_WRAPPERS`) maps diffusers classes to wrappers; `SUPPORTED_BLOCKS` lists the UNet
blocks whose forward frkern has been checked against. Everything is validated before the first
module is touched, so a refused patch leaves the model as it was.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

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

from . import ops
from .cache import signature
from .graphs import GraphRunner
from .policies import Policy
from .runtime import Runtime
from .segments import segment_cut
from .units import CachedSegment, FusedGEGLU, ReusedResnetBlock2D, ReusedTransformer2D

# diffusers class -> (wrapper, the policy reuse kind that makes it cache its unit, or None)
UNIT_WRAPPERS: dict[type, tuple[type, str | None]] = {
    ResnetBlock2D: (ReusedResnetBlock2D, "units"),
    Transformer2DModel: (ReusedTransformer2D, "units"),
    GEGLU: (FusedGEGLU, None),
}
SUPPORTED_BLOCKS = (
    CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UNetMidBlock2D, CrossAttnUpBlock2D, UpBlock2D,
)
_HANDLE_ATTR = "_frkern_handle"


def _uncompiled(module):
    # torch.compile(unet) returns an OptimizedModule around the UNet; patch the UNet inside (the
    # compiled wrapper calls its forward, so it picks the patch up on its next call).
    return module._orig_mod if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) else module


def _find_unet(target) -> tuple[UNet2DConditionModel, Any]:
    target = _uncompiled(target)
    if isinstance(target, UNet2DConditionModel):
        return target, None
    unet = _uncompiled(getattr(target, "unet", None))
    if isinstance(unet, UNet2DConditionModel):
        return unet, target
    raise TypeError(
        f"frkern.patch: expected a diffusers UNet2DConditionModel or a pipeline with one in .unet, "
        f"got {type(target).__name__}" + (f" (its .unet is {type(unet).__name__})" if unet is not None else "")
    )


def _check_supported(unet: UNet2DConditionModel) -> None:
    problems = []
    for name, block in [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + \
            [("mid_block", unet.mid_block)] + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]:
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


def _swap(root: nn.Module, path: str, new: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = parent._modules[name]
    parent._modules[name] = new
    return parent, name, old


class _SchedulerTracker:
    """Wraps a scheduler instance: set_timesteps starts a generation, each completed step advances."""

    def __init__(self, scheduler, runtime: Runtime):
        self.scheduler = scheduler
        self.runtime = runtime
        self._set_timesteps = scheduler.set_timesteps
        self._step = scheduler.step

        def set_timesteps(*args, **kwargs):
            out = self._set_timesteps(*args, **kwargs)
            n = getattr(scheduler, "num_inference_steps", None) or len(scheduler.timesteps)
            runtime.begin(int(n))
            return out

        def step(*args, **kwargs):
            out = self._step(*args, **kwargs)
            # Two-evaluation samplers (Heun, KDPM2) finish a step only on their second call.
            if getattr(scheduler, "state_in_first_order", True):
                runtime.advance()
            return out

        scheduler.set_timesteps = set_timesteps
        scheduler.step = step

    def remove(self) -> None:
        for name in ("set_timesteps", "step"):
            self.scheduler.__dict__.pop(name, None)


class Handle:
    """What `frkern.patch` returns: step control for hand-written loops, stats, and unpatch."""

    def __init__(self, unet: UNet2DConditionModel, pipeline, policy: Policy, backend: str, cuda_graphs: bool):
        self.unet = unet
        self.policy = policy
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.runtime = Runtime(policy, unet.parameters)
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._tracker: _SchedulerTracker | None = None
        self._swaps: list[tuple[nn.Module, str, nn.Module]] = []
        self._orig_forward = unet.forward
        self._network = self._orig_forward  # what runs the network (handle.compile replaces it)
        self.graphs = GraphRunner(self._run_network_fn, self.runtime) if cuda_graphs else None
        self._own_forward = unet.__dict__.get("forward")  # restored as found by unpatch
        self.active = False

    # --- user API ----------------------------------------------------------------------------
    def begin(self, num_steps: int) -> None:
        """Start a generation of `num_steps` sampler steps (clears every cache)."""
        self.runtime.begin(num_steps)

    def set_step(self, step: int) -> None:
        """Say which sampler step (0 = noisiest) the next UNet calls belong to."""
        self.runtime.set_step(step)

    def reset(self) -> None:
        """Drop every cached feature; the next call is a keyframe."""
        if self.runtime.num_steps is None:
            self.runtime.cache.new_generation()
        else:
            self.runtime.begin(self.runtime.num_steps)

    @property
    def cache_bytes(self) -> int:
        return self.runtime.cache.nbytes

    @property
    def stats(self) -> dict:
        """UNet calls of the current generation by kind: full, reuse, skip (no network), promoted."""
        return dict(self.runtime.stats)

    def schedule(self, num_steps: int) -> list:
        return self.policy.schedule(num_steps)

    def unpatch(self) -> None:
        unpatch(self.unet)

    def compile(self, **compile_kwargs) -> "Handle":
        """Run the network through torch.compile(**compile_kwargs) (inside the CUDA graphs too,
        with cuda_graphs=True); frkern's step logic stays eager around it. Equivalent to compiling
        the patched UNet yourself (torch.compile(unet)), which also works."""
        self._network = torch.compile(self._orig_forward, **compile_kwargs)
        return self

    def _run_network_fn(self, *args, **kwargs):
        return self._network(*args, **kwargs)

    @property
    def graph_stats(self) -> dict:
        """With cuda_graphs=True: captures, replays, read_copies (cached features copied into a
        graph because the keyframe came from elsewhere), evicted."""
        return dict(self.graphs.stats) if self.graphs is not None else {}

    def run_network(self, sample, timestep, encoder_hidden_states=None, **kwargs) -> torch.Tensor:
        """One pass of the network in the runtime's current mode, outside step tracking and score
        mixing (mode "off": plain full compute, nothing cached). Used by frkern.autofr."""
        return self._orig_forward(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]

    # --- the patched forward -------------------------------------------------------------------
    def _check_scheduler(self) -> None:
        pipe = self._pipeline() if self._pipeline is not None else None
        if pipe is not None and self._tracker is not None and pipe.scheduler is not self._tracker.scheduler:
            raise RuntimeError(
                "frkern: pipe.scheduler was replaced after frkern.patch, so steps cannot be tracked; "
                "set the scheduler first and patch afterwards (or unpatch and patch again)"
            )

    # The patched forward is three frames: host logic before and after (never traced by
    # torch.compile: they read the step counter, whose value changes every step) and the network
    # between them (traced; its guards see only the runtime's mode and its reads/writes dicts).
    @torch.compiler.disable
    def _start(self, sample, encoder_hidden_states):
        self._check_scheduler()
        rt = self.runtime
        ehs = encoder_hidden_states
        call_sig = (
            signature(sample),
            signature(ehs) if isinstance(ehs, torch.Tensor) else None,
            rt.weights_token(),
        )
        return rt.start_call(call_sig), call_sig

    @torch.compiler.disable
    def _keyframe_output(self, call_sig):
        return self.runtime.keyframe_output(call_sig)

    @torch.compiler.disable
    def _finish(self, plan, call_sig, out):
        rt = self.runtime
        if plan.keyframe:
            if self.policy.keeps_keyframe_output:
                rt.store_keyframe_output(out, call_sig)
        elif plan.runs_network and plan.mix < 1.0:
            out = ops.score_mix(out, rt.keyframe_output(call_sig), plan.mix, backend=self.backend)
        rt.end_call(plan, call_sig)
        return out

    @torch.compiler.disable
    def _replay(self, call_sig, sample, timestep, ehs, args, kwargs):
        return self.graphs.run(call_sig, sample, timestep, ehs, args, kwargs)

    @torch.compiler.disable
    def _abort(self):
        self.runtime.abort_call()

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        plan, call_sig = self._start(sample, encoder_hidden_states)
        try:
            if plan.runs_network and self.graphs is not None:
                out = self._replay(call_sig, sample, timestep, encoder_hidden_states, args, kwargs)
            elif plan.runs_network:
                out = self._network(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
            else:  # a reduced-NFE jump: a copy of the keyframe's output, no network
                out = _copy(self._keyframe_output(call_sig))
            out = self._finish(plan, call_sig, out)
        except BaseException:
            self._abort()
            raise
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def _copy(t: torch.Tensor) -> torch.Tensor:
    # Its own frame, so a compiled UNet compiles it (torch.compile(fullgraph=True) refuses a call
    # that compiles nothing).
    return t.clone()


def patch(target, policy: Policy | None = None, *, backend: str = "auto", cuda_graphs: bool = False) -> Handle:
    """Patch a UNet2DConditionModel (or a pipeline holding one) in place with `policy`.

    backend: "auto" (Triton kernels on CUDA, PyTorch elsewhere), "torch" or "triton".
    With a pipeline, its scheduler is tracked: set_timesteps starts a generation, step advances.
    """
    from .policies import NoReuse

    policy = NoReuse() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(
            f"frkern.patch: policy must be a frkern policy (NoReuse, FRDiff, Keyframes, Clockwork, "
            f"DeepCache), got {type(policy).__name__}"
        )
    ops.check_backend(backend)
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"frkern.patch: cuda_graphs must be a bool, got {cuda_graphs!r}")
    unet, pipeline = _find_unet(target)
    if getattr(unet, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("frkern.patch: this UNet is already patched; call frkern.unpatch first")
    own = unet.__dict__.get("forward")
    if own is not None and not (getattr(own, "__func__", None) is type(unet).forward and own.__self__ is unet):
        raise RuntimeError(
            "frkern.patch: the UNet's forward is already replaced by something else (another "
            "caching helper such as DeepCache enabled?); disable it first"
        )
    if pipeline is not None and not (hasattr(pipeline, "scheduler") and hasattr(pipeline.scheduler, "step")):
        raise TypeError(f"frkern.patch: pipeline {type(pipeline).__name__} has no scheduler to track")
    _check_supported(unet)
    segment_paths = segment_cut(unet, policy) if policy.reuse == "segment" else []
    for p in segment_paths:
        unet.get_submodule(p)  # every path must exist before anything changes

    handle = Handle(unet, pipeline, policy, backend, cuda_graphs)
    rt = handle.runtime
    units = [(n, m) for n, m in unet.named_modules() if type(m) in UNIT_WRAPPERS]
    for name, module in units:
        wrapper_cls, cache_kind = UNIT_WRAPPERS[type(module)]
        cache_unit = cache_kind is not None and policy.reuse == cache_kind
        if not cache_unit and not wrapper_cls.swap_when_not_cached:
            continue
        handle._swaps.append(_swap(unet, name, wrapper_cls(module, rt, name, cache_unit, backend)))
    for path in segment_paths:
        handle._swaps.append(_swap(unet, path, CachedSegment(unet.get_submodule(path), rt, path, True, backend)))

    # torch.compile must not trace the host-side step logic (its guards would change every step):
    # the handle's frame is skipped, the network it calls (the UNet's own forward) is compiled.
    unet.forward = torch.compiler.disable(handle.forward, recursive=False)
    if pipeline is not None:
        handle._tracker = _SchedulerTracker(pipeline.scheduler, rt)
    setattr(unet, _HANDLE_ATTR, handle)
    handle.active = True
    return handle


def unpatch(target) -> None:
    """Restore the original modules, forward and scheduler; free every cached tensor."""
    unet, _ = _find_unet(target)
    handle: Handle | None = getattr(unet, _HANDLE_ATTR, None)
    if handle is None:
        raise RuntimeError("frkern.unpatch: this UNet is not patched")
    for parent, name, old in reversed(handle._swaps):
        wrapper = parent._modules[name]
        old.train(wrapper.training)
        if isinstance(wrapper, ReusedTransformer2D):
            wrapper.remove_hook()
        parent._modules[name] = old
    handle._swaps.clear()
    unet.__dict__.pop("forward", None)
    if handle._own_forward is not None:
        unet.forward = handle._own_forward
    if handle._tracker is not None:
        handle._tracker.remove()
    handle.runtime.cache.clear()
    if handle.graphs is not None:
        handle.graphs.clear()
    delattr(unet, _HANDLE_ATTR)
    handle.active = False
