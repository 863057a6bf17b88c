"""patch / unpatch: swap frkern wrappers into a model and drive them per call.

Generic over model families (frkern.family): the family finds the model, validates it, names the
modules to wrap and the call convention. Everything is validated before the first module is
touched, so a refused patch leaves the model as it was.
"""
from __future__ import annotations

import copy
import warnings
from functools import partial
import weakref
from typing import Any

import torch
from torch import nn

from . import ops
from .cache import signature
from .family import Call, ModelFamily
from .graphs import GraphRunner
from .adaptive import AdaptiveGate, ProbedModule, commit_state, run_probe
from .clockwork import AdaptedSegment, TappedSegment, _Tap
from .policies import Adaptive, NoReuse, Policy
from .runtime import _PICKLE_MESSAGE, COMPUTE_MODE, PROBE_MODE, REUSE_MODE, CallSignature, Runtime
from .tracking import SchedulerTracker
from .unet2d import UNet2DFamily, uncompiled
from .units import CachedSegment, ConvGate, ReusedTransformer2D, gated_conv_supported

FAMILIES: tuple[ModelFamily, ...] = (UNet2DFamily(),)
_HANDLE_ATTR = "_frkern_handle"


def find_model(target) -> tuple[ModelFamily, nn.Module, Any]:
    """(family, model, pipeline or None) for a patch target, or a TypeError saying what is accepted."""
    for family in FAMILIES:
        found = family.find(target)
        if found is not None:
            return (family, *found)
    inner = getattr(uncompiled(target), "unet", None)
    raise TypeError(
        f"frkern.patch: expected a diffusers UNet2DConditionModel or a pipeline with one in .unet, "
        f"got {type(target).__name__}" + (f" (its .unet is {type(inner).__name__})" if inner is not None else "")
    )


def handle_of(target) -> "Handle | None":
    """The handle of a patched model (or of a pipeline's patched model), else None."""
    _, model, _ = find_model(target)
    return model.__dict__.get(_HANDLE_ATTR)


def _swap(root: nn.Module, path: str, new: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = parent._modules[name]
    parent._modules[name] = new
    return parent, name, old


class Handle:
    """What `frkern.patch` returns: step control for hand-written loops, stats, and unpatch."""

    def __init__(self, model: nn.Module, family: ModelFamily, policy: Policy, backend: str, cuda_graphs: bool,
                 runtime: Runtime | None = None):
        self.unet = model
        self.family = family
        self.policy = policy
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.runtime = runtime if runtime is not None else Runtime(policy, model)
        self._pipelines: list[weakref.ref] = []  # pipelines whose scheduler drives this model
        self._trackers: dict[int, SchedulerTracker] = {}  # id(pipeline) -> tracker of its scheduler
        self._swaps: list[tuple[nn.Module, str, nn.Module]] = []
        self._orig_forward = model.forward
        self._own_forward = model.__dict__.get("forward")  # restored as found by unpatch
        self._compile_kwargs: dict | None = None
        self._network = self._orig_forward  # what runs the network (handle.compile replaces it)
        self.graphs = GraphRunner(self._run_network_fn, self.runtime) if cuda_graphs else None
        self._warned_untracked = False
        self._gated: list[ConvGate] = []  # SkipConv's gates, for the active-tile measure
        self.active = False


    # A deep copy of a patched model (or of a pipeline holding one) is patched in its own right:
    # same policy, backend and graphs setting, its own runtime and empty cache, its own pipeline's
    # scheduler tracked (attached on the copy's first call).
    def __deepcopy__(self, memo):
        model = copy.deepcopy(self.unet, memo)
        new = Handle.__new__(Handle)
        memo[id(self)] = new
        new.__init__(model, self.family, self.policy, self.backend, self.cuda_graphs,
                     runtime=copy.deepcopy(self.runtime, memo))
        new._orig_forward = copy.deepcopy(self._orig_forward, memo)
        new._own_forward = copy.deepcopy(self._own_forward, memo)
        new._network = new._orig_forward
        if self._compile_kwargs is not None:
            new.compile(**self._compile_kwargs)
        if self.graphs is not None:
            new.graphs.capture = self.graphs.capture
        new._swaps = copy.deepcopy(self._swaps, memo)
        new._gated = copy.deepcopy(self._gated, memo)
        for ref in self._pipelines:
            pipe = ref()
            if pipe is not None and id(pipe) in memo:  # the pipeline is being copied with it
                new._pipelines.append(weakref.ref(memo[id(pipe)]))
        new.active = self.active
        return new

    def __reduce__(self):
        raise TypeError(_PICKLE_MESSAGE)

    # --- user API ----------------------------------------------------------------------------
    def begin(self, num_steps: int, start: int = 0) -> None:
        """Start a generation of `num_steps` sampler steps (clears every cache), at step `start`."""
        self.runtime.begin(num_steps, start)

    def set_step(self, step: int) -> None:
        """Say which sampler step (0 = noisiest) the next calls belong to."""
        self.runtime.set_step(step)

    def reset(self) -> None:
        """Drop every cached feature; the next call is a keyframe."""
        rt = self.runtime
        if rt.num_steps is None or not rt.open:
            rt.cache.new_generation()
        else:
            rt.begin(rt.num_steps, rt.step)

    @property
    def cache_bytes(self) -> int:
        return self.runtime.cache.nbytes

    @property
    def stats(self) -> dict:
        """Calls of the current generation by kind: full, reuse, skip (no network), promoted
        (a reuse step that had to run in full), untracked (outside any tracked generation); with
        SkipConv also active_fraction: {step: fraction of input tiles recomputed} (reads the device);
        Adaptive also indicator: {step: the indicator value}. A step of several calls (CFG run as two
        calls) shows the largest of them, as a batched call's value is the largest over its images."""
        out = dict(self.runtime.stats)
        for name, by_step in self.runtime.measures.items():
            out[name] = {step: float(v) for step, v in sorted(by_step.items())}
        return out

    def schedule(self, num_steps: int) -> list:
        return self.policy.schedule(num_steps)

    def unpatch(self) -> None:
        unpatch(self.unet)

    def track(self, pipeline) -> None:
        """Let `pipeline`'s scheduler drive this model too (a second pipeline sharing the model)."""
        if pipeline is None:
            return
        if not (hasattr(pipeline, "scheduler") and hasattr(pipeline.scheduler, "step")):
            raise TypeError(f"frkern.patch: pipeline {type(pipeline).__name__} has no scheduler to track")
        if all(ref() is not pipeline for ref in self._pipelines):
            self._pipelines.append(weakref.ref(pipeline))
        self._attach(pipeline, resume=False)

    def compile(self, **compile_kwargs) -> "Handle":
        """Run the network through torch.compile(**compile_kwargs) (inside the CUDA graphs too,
        with cuda_graphs=True); frkern's step logic stays eager around it. Equivalent to compiling
        the patched model yourself (torch.compile(unet)), which also works."""
        self._compile_kwargs = dict(compile_kwargs)
        self._network = torch.compile(self._orig_forward, **compile_kwargs)
        return self

    def _run_network_fn(self, *args, **kwargs):
        return self._network(*args, **kwargs)

    @property
    def graph_stats(self) -> dict:
        """With cuda_graphs=True: captures, replays, read_copies (cached features copied into a
        graph because the keyframe came from elsewhere), evicted, staging_waits (replays whose host
        inputs had to wait for the previous copy out of the graph's pinned staging buffer)."""
        return dict(self.graphs.stats) if self.graphs is not None else {}

    def run_network(self, sample, timestep, encoder_hidden_states=None, **kwargs) -> torch.Tensor:
        """One pass of the network in the runtime's current mode, outside step tracking and score
        mixing. Used by frkern.autofr."""
        return self.family.run(self._orig_forward, Call(sample, timestep, encoder_hidden_states, (), kwargs))

    # --- scheduler tracking ------------------------------------------------------------------
    def _attach(self, pipeline, resume: bool = True) -> None:
        """Track `pipeline.scheduler` (again, if it was replaced since). resume: its set_timesteps
        may already have run (a scheduler replaced after patch, a copied pipeline): join that
        generation."""
        key = id(pipeline)
        old = self._trackers.get(key)
        if old is not None and old.scheduler is pipeline.scheduler:
            return
        tracker = SchedulerTracker.of(pipeline.scheduler)
        tracker.subscribe(self.runtime)
        self._trackers[key] = tracker
        if old is not None and old not in self._trackers.values():
            old.unsubscribe(self.runtime)
        if resume:
            tracker.resume(self.runtime)

    def _follow_schedulers(self) -> None:
        for ref in self._pipelines:
            pipe = ref()
            if pipe is not None:
                tracker = self._trackers.get(id(pipe))
                if tracker is None or pipe.scheduler is not tracker.scheduler:
                    self._attach(pipe)

    # --- the patched forward -------------------------------------------------------------------
    # The patched forward is three frames: host logic before and after (never traced by
    # torch.compile: they read the step counter, whose value changes every step) and the network
    # between them (traced; its guards see only the runtime's mode and its reads/writes dicts).
    @torch.compiler.disable
    def _start(self, call: Call):
        if self._pipelines:
            self._follow_schedulers()
        rt = self.runtime
        ctx = call.context
        call_sig = CallSignature(
            signature(call.sample),
            signature(ctx) if isinstance(ctx, torch.Tensor) else None,
            rt.weights_token(),
            self.family.call_options(call),
        )
        plan = rt.start_call(call_sig)
        if rt.mode == COMPUTE_MODE and not self._warned_untracked:
            self._warned_untracked = True
            warnings.warn(
                "frkern: the patched model was called outside any generation its tracked scheduler(s) "
                "drive (another pipeline sharing this model?): such calls run in full and reuse "
                "nothing. frkern.patch(other_pipeline) lets that pipeline's scheduler drive it too.",
                stacklevel=4,
            )
        return plan, call_sig

    @torch.compiler.disable
    def _keyframe_output(self, call_sig):
        return self.runtime.keyframe_output(call_sig)

    @torch.compiler.disable
    def _finish(self, plan, call_sig, out):
        rt = self.runtime
        if rt.mode == REUSE_MODE and self._gated:
            active = [u.last_active for u in self._gated if u.last_active is not None]
            if active:  # one small device reduction, no host read
                rt.measure("active_fraction", sum(a.sum() for a in active).float() / sum(a.numel() for a in active))
        if rt.mode != COMPUTE_MODE:
            if plan.keyframe:
                if self.policy.keeps_keyframe_output:
                    rt.store_keyframe_output(out, call_sig)
            elif plan.runs_network and plan.mix < 1.0:
                out = ops.score_mix(out, rt.keyframe_output(call_sig), plan.mix, backend=self.backend)
        rt.end_call(plan, call_sig)
        return out

    @torch.compiler.disable
    def _replay(self, call_sig, call):
        return self.graphs.run(call_sig, call, self.family)

    @torch.compiler.disable
    def _probe(self, plan, call_sig, call):
        """An adaptive call: measure the indicator, read it (the host waits here, once per
        call), decide; returns the call's final plan."""
        rt = self.runtime
        if self.graphs is not None:
            v = self.graphs.run(call_sig, call, self.family, runner=partial(run_probe, rt, self.family))
        else:
            v = run_probe(rt, self.family, self._network, call)
        value = float(v)
        rt.measure("indicator", value)
        reuse = self.policy.reuses(value)
        plan = rt.resolve(plan, reuse)
        commit_state(rt, self.policy.rule, reuse)
        return plan

    @torch.compiler.disable
    def _abort(self):
        self.runtime.abort_call()

    @torch.compiler.disable(recursive=False)
    def forward(self, *args, **kwargs):
        call, return_dict = self.family.bind_call(args, kwargs)
        self.runtime.outputs_mutated = self.family.mutates_outputs(call)
        plan, call_sig = self._start(call)
        try:
            if self.runtime.mode == PROBE_MODE:
                plan = self._probe(plan, call_sig, call)
            if plan.runs_network and self.graphs is not None and self.runtime.mode != COMPUTE_MODE:
                out = self._replay(call_sig, call)
            elif plan.runs_network:
                out = self.family.run(self._network, call)
            else:  # a reduced-NFE jump: a copy of the keyframe's output, no network
                out = _copy(self._keyframe_output(call_sig))
            out = self._finish(plan, call_sig, out)
        except BaseException:
            self._abort()
            raise
        return self.family.wrap_output(out, return_dict)


def _check_adaptor_steps(config, num_steps: int) -> None:
    if num_steps != config.num_steps:
        raise ValueError(f"frkern: the Clockwork adaptor was trained for {config.num_steps} steps "
                         f"({config.sampler}), this generation has {num_steps}")


def _copy(t: torch.Tensor) -> torch.Tensor:
    # Its own frame, so a compiled model compiles it (torch.compile(fullgraph=True) refuses a call
    # that compiles nothing).
    return t.clone()


def patch(target, policy: Policy | None = None, *, backend: str = "auto", cuda_graphs: bool = False) -> Handle:
    """Patch a UNet2DConditionModel (or a pipeline holding one) in place with `policy`.

    backend: "auto" (Triton kernels on CUDA, PyTorch elsewhere), "torch" or "triton".
    With a pipeline, its scheduler is tracked: set_timesteps starts a generation, step advances.
    Patching a second pipeline that shares an already patched model (with the same settings)
    returns the existing handle and tracks that pipeline's scheduler too.
    """
    policy = NoReuse() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(
            f"frkern.patch: policy must be a frkern policy (NoReuse, FRDiff, Keyframes, Clockwork, "
            f"DeepCache, SkipConv, Adaptive), got {type(policy).__name__}"
        )
    ops.check_backend(backend)
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"frkern.patch: cuda_graphs must be a bool, got {cuda_graphs!r}")
    family, model, pipeline = find_model(target)
    if pipeline is not None and not (hasattr(pipeline, "scheduler") and hasattr(pipeline.scheduler, "step")):
        raise TypeError(f"frkern.patch: pipeline {type(pipeline).__name__} has no scheduler to track")
    existing: Handle | None = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None:
        if pipeline is not None and (existing.policy, existing.backend, existing.cuda_graphs) == (policy, backend, cuda_graphs):
            existing.track(pipeline)
            return existing
        raise RuntimeError(
            "frkern.patch: this model is already patched"
            + (f" (with {existing.policy}, backend={existing.backend!r}, cuda_graphs={existing.cuda_graphs})"
               if pipeline is not None else "")
            + "; call frkern.unpatch first"
        )
    own = model.__dict__.get("forward")
    if own is not None and not (getattr(own, "__func__", None) is type(model).forward and own.__self__ is model):
        raise RuntimeError(
            "frkern.patch: the model's forward is already replaced by something else (another "
            "caching helper such as DeepCache enabled?); disable it first"
        )
    family.check_supported(model)
    segment_paths = family.segment_paths(model, policy) if policy.cached_parts == "segment" else []
    for p in segment_paths:
        model.get_submodule(p)  # every path must exist before anything changes
    adaptor, adapted = None, ()
    if getattr(policy, "adaptor", ""):
        from .adaptor import load_adaptor
        from .clockwork import adaptor_fit

        param = next(model.parameters())
        adaptor = load_adaptor(policy.adaptor, device=param.device, dtype=param.dtype)
        adapted = adaptor_fit(model, policy, adaptor)
    gated_paths = family.gated_conv_paths(model) if policy.cached_parts == "gated_conv" else []
    probed_paths, gate_path = family.adaptive_gate(model, policy) if isinstance(policy, Adaptive) else ([], None)
    bad = [f"{p} ({model.get_submodule(p)})" for p in gated_paths if not gated_conv_supported(model.get_submodule(p))]
    for p in gated_paths:  # gated through its parent's wrapper, which must call it through a gate
        parent_path, _, child = p.rpartition(".")
        wrapper_cls = family.unit_wrappers.get(type(model.get_submodule(parent_path)), (None,))[0]
        if child not in getattr(wrapper_cls, "gated_children", ()):
            raise ValueError(f"frkern.patch: {policy.name} cannot gate {p}: its parent is not a wrapper that "
                             "calls it through a gate")
    if bad:
        raise ValueError(f"frkern.patch: {policy.name} gates stride-1 3x3 (padding 1) or 1x1 nn.Conv2d only; "
                         f"these are not: {'; '.join(bad)}")

    handle = Handle(model, family, policy, backend, cuda_graphs)
    rt = handle.runtime
    units = [(n, m) for n, m in model.named_modules() if type(m) in family.unit_wrappers]
    for name, module in units:
        wrapper_cls, cache_kind = family.unit_wrappers[type(module)]
        cache_unit = cache_kind is not None and policy.cached_parts == cache_kind
        if any(name == p or name.startswith(p + ".") for p in probed_paths):
            cache_unit = False  # computed on every call: the adaptive indicator comes from them
        if not cache_unit and not wrapper_cls.swap_when_not_cached:
            continue
        handle._swaps.append(_swap(model, name, wrapper_cls(module, rt, name, cache_unit, backend)))
    tap = _Tap()
    for path in segment_paths:
        module = model.get_submodule(path)
        if path in adapted:
            wrapper = (TappedSegment(module, rt, path, True, backend, tap) if path == adapted[0]
                       else AdaptedSegment(module, rt, path, True, backend, tap, adaptor))
        else:
            wrapper = CachedSegment(module, rt, path, True, backend)
        handle._swaps.append(_swap(model, path, wrapper))
    if adaptor is not None:
        rt.begin_checks.append(partial(_check_adaptor_steps, adaptor.config))
    for path in gated_paths:  # the convolution stays in the tree; its parent calls it through the gate
        parent_path, _, child = path.rpartition(".")
        handle._gated.append(ConvGate(rt, path, backend))
        model.get_submodule(parent_path).gates[child] = handle._gated[-1]
    for path in probed_paths:
        handle._swaps.append(_swap(model, path, ProbedModule(model.get_submodule(path), rt, path, False, backend)))
    if gate_path is not None:
        handle._swaps.append(_swap(model, gate_path, AdaptiveGate(model.get_submodule(gate_path), rt, gate_path, True, backend)))

    # torch.compile must not trace the host-side step logic (its guards would change every step):
    # the handle's frame is skipped, the network it calls (the model's own forward) is compiled.
    model.forward = handle.forward
    model.__dict__[_HANDLE_ATTR] = handle
    handle.active = True
    handle.track(pipeline)
    return handle


def unpatch(target) -> None:
    """Restore the original modules (with any child replaced meanwhile, e.g. an adapter layer),
    forward and scheduler; free every cached tensor."""
    _, model, _ = find_model(target)
    handle: Handle | None = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        raise RuntimeError("frkern.unpatch: this model is not patched")
    for parent, name, old in reversed(handle._swaps):
        wrapper = parent._modules[name]
        old.train(wrapper.training)
        if isinstance(wrapper, ReusedTransformer2D):
            wrapper.remove_hook()
        parent._modules[name] = old
    handle._swaps.clear()
    model.__dict__.pop("forward", None)
    if handle._own_forward is not None:
        model.forward = handle._own_forward
    for tracker in set(handle._trackers.values()):
        tracker.unsubscribe(handle.runtime)
    handle._trackers.clear()
    handle._pipelines.clear()
    handle.runtime.scheduler_driven = False
    handle.runtime.cache.clear()
    if handle.graphs is not None:
        handle.graphs.clear()
    del model.__dict__[_HANDLE_ATTR]
    handle.active = False
