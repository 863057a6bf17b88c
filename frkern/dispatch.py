"""patch / unpatch, and the Handle that drives a patched model call by call.

patch = find the model's family (frkern.family), prepare the policy's installer over the family's
map of parts (frkern.install: validates everything, changes nothing), install (swap the wrappers
in) and replace the model's forward by the handle's. A refused patch leaves the model as it was;
`unpatch` uninstalls (each wrapper detaches itself) and restores the forward.
"""
from __future__ import annotations

import copy
import warnings
import weakref

import torch
from torch import nn

from . import decode_ahead, forward_chain, ops
from .cache import signature
from .cache_format import CacheFormat, as_cache_format, check_device_support, codec_for
from .executor import Executor
from .family import Call, ModelFamily, find_model
from .install import Installation, Plan, Target, install, prepare
from .policies import POLICIES, NoReuse, Policy
from .runtime import _PICKLE_MESSAGE, COMPUTE_MODE, FULL_MODE, PROBE_MODE, REUSE_MODE, CallSignature, Runtime
from .tracking import SchedulerTracker
from . import unet2d as _unet2d, video as _video  # noqa: F401  (register the built-in families)

_HANDLE_ATTR = "_frkern_handle"


def handle_of(target) -> "Handle | None":
    """The handle of a patched model (or of a pipeline's patched model), else None."""
    _, model, _ = find_model(target)
    return model.__dict__.get(_HANDLE_ATTR)


class Handle:
    """What `frkern.patch` returns: step control for hand-written loops, stats, and unpatch."""

    def __init__(self, model: nn.Module, family: ModelFamily, policy: Policy, backend: str, cuda_graphs: bool,
                 plan: Plan, cache_format: CacheFormat | None = None):
        self.unet = model
        self.family = family
        self.policy = policy
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.cache_format = cache_format or CacheFormat()
        self.installation = Installation(plan)  # empty until patch installs the plan
        self.runtime = Runtime(policy, model, caches=plan.caches, reuse_limit=plan.reuse_limit,
                               codec=codec_for(self.cache_format, backend))
        self.runtime.begin_checks.extend(plan.begin_checks)
        self.runtime.attention_modes, self.runtime.gate_modes = plan.attention_modes, plan.gate_modes
        self.runtime.prior_noise = plan.prior_noise
        self._pipelines: list[weakref.ref] = []  # pipelines whose scheduler drives this model
        self._trackers: dict[int, SchedulerTracker] = {}  # id(pipeline) -> tracker of its scheduler
        # frkern's forward replaces the model's own at the bottom of its forward chain, beneath any
        # accelerate/diffusers hooks (frkern.forward_chain); unpatch puts back what it replaced: the
        # model's own forward, or nothing where the class forward showed through.
        self._replaced = forward_chain.bottom(model).get()
        self.executor = Executor(self._replaced or forward_chain.own_forward(model), self.runtime, cuda_graphs)
        # What stands for this handle in the chain: its forward, one bound-method object to find it
        # by (frkern.distributed's CFG split wraps it and puts its own here).
        self._chain_forward = self.forward
        self._warned_untracked = False
        self._hooks_checked = None  # the cache generation whose reuse calls were checked for hooks
        self._warned_hooks = ()  # the hooked skipped modules last warned about
        self.active = False
        # Where the callers of one generation are split over processes (frkern.distributed's CFG
        # parallel): maps the adaptive indicator (a 0-dim device tensor) to the value every rank
        # decides on (an all-reduce max over the group), so that all ranks take the same decision.
        self.indicator_reduction = None

    @property
    def graphs(self):
        """The CUDA-graph runner (cuda_graphs=True), else None."""
        return self.executor.graphs

    # A deep copy of a patched model (or of a pipeline holding one) is patched in its own right:
    # same policy, backend and graphs setting, its own runtime and empty cache, its own pipeline's
    # scheduler tracked (attached on the copy's first call).
    def __deepcopy__(self, memo):
        new = Handle.__new__(Handle)
        memo[id(self)] = new
        new.__dict__.update(
            unet=copy.deepcopy(self.unet, memo), family=self.family, policy=self.policy, backend=self.backend,
            cuda_graphs=self.cuda_graphs, cache_format=self.cache_format,
            installation=copy.deepcopy(self.installation, memo),
            runtime=copy.deepcopy(self.runtime, memo), _pipelines=[], _trackers={},
            _replaced=copy.deepcopy(self._replaced, memo), executor=copy.deepcopy(self.executor, memo),
            _chain_forward=copy.deepcopy(self._chain_forward, memo),
            _warned_untracked=False, _hooks_checked=None, _warned_hooks=(), active=self.active,
            indicator_reduction=None)
        for ref in self._pipelines:
            pipe = ref()
            if pipe is not None and id(pipe) in memo:  # the pipeline is being copied with it
                new._pipelines.append(weakref.ref(memo[id(pipe)]))
        return new

    def __reduce__(self):
        raise TypeError(_PICKLE_MESSAGE)

    # --- user API ----------------------------------------------------------------------------
    def _check_active(self) -> None:
        if not self.active:
            raise RuntimeError("frkern: this handle's model was unpatched; frkern.patch it again for a new handle")

    def begin(self, num_steps: int, start: int = 0) -> None:
        """Start a generation of `num_steps` sampler steps (clears every cache), at step `start`."""
        self._check_active()
        self.runtime.begin(num_steps, start)
        if self.runtime.prior_noise is not None and not self.runtime.scheduler_driven:
            warnings.warn(f"frkern: {self.policy.name}'s prior noise injection is added by a tracked pipeline's "
                          "scheduler.step; a hand-written loop gets none unless it passes its step "
                          "handle.runtime.step_sample(t, sample) instead of sample", stacklevel=2)

    def set_step(self, step: int) -> None:
        """Say which sampler step (0 = noisiest) the next calls belong to."""
        self._check_active()
        self.runtime.set_step(step)

    def reset(self) -> None:
        """Drop every cached feature; the next call is a keyframe."""
        self._check_active()
        rt = self.runtime
        if rt.num_steps is None or not rt.open:
            rt.cache.new_generation()
        else:
            rt.restart()

    @property
    def caches(self) -> bool:
        """Does the installed policy keep anything between calls? (Then calls need a generation:
        a tracked pipeline's, or handle.begin / set_step.)"""
        return self.runtime.caches

    @property
    def cache_bytes(self) -> int:
        return self.runtime.cache.nbytes

    @property
    def stats(self) -> dict:
        """Calls of the current generation by kind:
        full: computed in full and cached (keyframes, warm-up, promoted and forced calls);
        reuse: the network ran reading cached features (SkipConv: every gated call after a keyframe,
          whatever fraction of tiles it recomputed, see active_fraction);
        skip: no network (a reduced-NFE jump returned the keyframe's output);
        promoted: planned to reuse but computed in full (nothing cached for this call slot yet, or
          the call's shapes, dtypes, device, weights or LoRA scale differ from its keyframe's);
        forced: Adaptive calls computed in full because max_reuse reuse calls in a row were reached;
        untracked: calls outside any generation the tracked scheduler drives (full, nothing cached);
        unit_miss: units that found no state of their input's signature on a reuse call.
        With SkipConv also active_fraction: {step: fraction of input tiles recomputed} (reads the
        device); Adaptive also indicator: {step: the indicator value}. A step of several calls (CFG
        run as two calls) shows the largest of them, as a batched call's value is the largest over
        its images."""
        out = dict(self.runtime.stats)
        for name, by_step in self.runtime.measures.items():
            out[name] = {step: float(v) for step, v in sorted(by_step.items())}
        return out

    def schedule(self, num_steps: int) -> list:
        return self.policy.schedule(num_steps)

    def unpatch(self) -> None:
        self._check_active()
        unpatch(self.unet)

    def _load_lora_adapter(self, *args, **kwargs):
        """The patched model's load_lora_adapter (diffusers' LoRA loading, `pipe.load_lora_weights`):
        the class's, then the weights count as changed. A hotswap (`hotswap=True`) copies the new
        adapter's weights in through `.data`, which no version counter sees; without this, a hotswap
        inside a generation let reuse calls read features of the old adapter."""
        try:
            return type(self.unet).load_lora_adapter(self.unet, *args, **kwargs)
        finally:
            self.runtime.watch.changed()

    def track(self, pipeline) -> None:
        """Let `pipeline`'s scheduler drive this model too (a second pipeline sharing the model)."""
        self._check_active()
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
        self._check_active()
        self.executor.compile(**compile_kwargs)
        return self

    @property
    def graph_stats(self) -> dict:
        """With cuda_graphs=True: captures, replays, read_copies (cached features copied into a
        graph because the keyframe came from elsewhere), evicted, staging_waits (replays whose host
        inputs had to wait for the previous copy out of the graph's pinned staging buffer),
        storage_moves (times every graph was dropped because the weights came back at new
        addresses, as model CPU offload brings them each generation)."""
        return dict(self.graphs.stats) if self.graphs is not None else {}

    def run_network(self, sample, timestep, encoder_hidden_states=None, **kwargs) -> torch.Tensor:
        """One pass of the network in the runtime's current mode, outside step tracking and score
        mixing. Used by frkern.autofr."""
        self._check_active()
        return self.family.run(self.executor.original, Call(sample, timestep, encoder_hidden_states, (), kwargs))

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
            self.family.call_options(self.unet, call),
        )
        plan = rt.start_call(call_sig)
        if rt.mode in (REUSE_MODE, PROBE_MODE) and self._hooks_checked != rt.cache.generation:
            self._hooks_checked = rt.cache.generation  # once per generation: a walk of the cached segments
            hooked = self.installation.hooked_skipped_modules()
            if hooked and tuple(hooked) != self._warned_hooks:
                self._warned_hooks = tuple(hooked)
                warnings.warn(
                    f"frkern: {self.policy.name} reuses the cached outputs of modules with forward hooks "
                    f"({', '.join(hooked[:4])}{', ...' if len(hooked) > 4 else ''}): a reuse call does not run "
                    "them, so hooks inside them run on full calls only and hooks on them see the cached output "
                    "(zeros where only cached modules read it). StableDiffusionSAGPipeline, which reads the mid "
                    "block's attention through such a hook, is not supported with reuse policies", stacklevel=4)
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
        gates = self.installation.gates
        if rt.mode == REUSE_MODE and gates:
            active = [a for u in gates for a in u.active_runs]
            if active:  # one small device reduction, no host read
                rt.measure("active_fraction", sum(a.sum() for a in active).float() / sum(a.numel() for a in active))
        if rt.mode != COMPUTE_MODE:
            if plan.keyframe:
                if self.installation.plan.keeps_keyframe_output:
                    rt.store_keyframe_output(out, call_sig)
            elif plan.runs_network and plan.mix < 1.0:
                out = ops.score_mix(out, rt.keyframe_output(call_sig), plan.mix, backend=self.backend)
        rt.end_call(plan, call_sig)
        return out

    @torch.compiler.disable
    def _replay(self, call_sig, call):
        return self.executor.replay(self.family, call_sig, call)

    @torch.compiler.disable
    def _probe(self, plan, call_sig, call):
        """An adaptive call: measure the indicator, read it (the host waits here, once per
        call), decide; returns the call's final plan."""
        rt = self.runtime
        decider = self.installation.plan.decider
        v = self.executor.probe(self.family, call_sig, call)
        if self.indicator_reduction is not None:
            v = self.indicator_reduction(v)
        value = float(v)
        rt.measure("indicator", value)
        reuse = decider.reuses(value)
        plan = rt.resolve(plan, reuse)
        decider.commit(rt, reuse)
        return plan

    @torch.compiler.disable
    def _abort(self):
        self.runtime.abort_call()

    def _cfg_half(self, call_sig, call):
        """A call whose two CFG halves compute the same thing (StepPlan.cfg_half): one half (the
        installation's cfg_keep) runs, its output stands for both. With CUDA graphs the half runs
        in a graph of its own (its batch keys it)."""
        n = call.sample.shape[0]  # [uncond, cond]: forward checked it (_check_cfg_halves)
        keep = self.installation.plan.cfg_keep
        half = call.samples(n, keep * (n // 2), n // 2)
        if self.graphs is not None:
            out = self._replay(call_sig, half)
        else:
            out = self.family.run(self.executor.network, half)
        return torch.cat([out, out])

    @torch.compiler.disable
    def _check_cfg_halves(self, n: int) -> None:
        """A policy that averages and drops CFG halves (TGate(cfg=True)) needs every call's batch to be
        [uncond, cond]: checked on every call of a generation, so a pipeline without them is refused at
        its first call, not at the gate many steps later."""
        # only the pipeline running this generation (another one sharing the model keeps the flag of
        # its own last call)
        driver = self.runtime.driver
        pipes = [p for p in (r() for r in self._pipelines) if p is not None and self._trackers.get(id(p)) is driver]
        if driver is not None and any(getattr(p, "do_classifier_free_guidance", True) is False for p in pipes):
            raise ValueError(f"frkern: {self.policy.name} averages and drops CFG halves, but the pipeline runs "
                             "without classifier-free guidance (guidance_scale <= 1, or a callback turned it off): "
                             f"its batch holds no halves; patch with {self.policy.name}(cfg=False)")
        if n % 2:
            raise ValueError(f"frkern: {self.policy.name} averages and drops CFG halves, but this call's batch of {n} "
                             "does not split in two ([uncond, cond]): a model called without classifier-free "
                             "guidance, or with three parts (PAG's [uncond, cond, perturbed], InstructPix2Pix's "
                             f"[text, image, uncond])? Patch with {self.policy.name}(cfg=False)")

    @torch.compiler.disable
    def _decode_ahead(self, call_sig, call):
        """EncoderPropagation's parallel decoding (frkern.decode_ahead): this reuse call's output
        if an earlier call computed it, or computed now with the next non-key steps' batched in;
        None: run as usual. Eager under torch.compile (a batch of n steps is another shape)."""
        out = decode_ahead.take(self, call, call_sig)
        if out is not None:
            return out
        scheduler = decode_ahead.scheduler_of(self)
        if scheduler is None or not decode_ahead.can_batch(self, call):
            self.runtime.stats["decoded_alone"] += 1
            return None
        n = decode_ahead.steps_ahead(self, self.installation.plan.decode_ahead)
        return decode_ahead.run_batched(self, call, call_sig, n, scheduler) if n > 1 else None

    def passes_through(self, model) -> bool:
        """Does this handle's forward run `model`'s own forward unchanged? (Once unpatched: see forward.)"""
        return not self.active and self.unet is model

    @torch.compiler.disable(recursive=False)
    def forward(self, *args, **kwargs):
        if not self.active:
            # Unpatched, but still called: a wrapper added after patching (the DeepCache package's
            # helper) kept this forward and put it back. It is the model's own forward again.
            return (self._replaced or forward_chain.own_forward(self.unet))(*args, **kwargs)
        call, return_dict = self.family.bind_call(args, kwargs)
        self.runtime.outputs_mutated = self.family.mutates_outputs(self.unet, call)
        plan, call_sig = self._start(call)
        try:
            if self.installation.plan.cfg_halves and self.runtime.mode != COMPUTE_MODE:
                self._check_cfg_halves(call.sample.shape[0])
            if self.runtime.mode == PROBE_MODE:
                plan = self._probe(plan, call_sig, call)
            ahead = None
            if self.installation.plan.decode_ahead > 1 and self.runtime.mode == REUSE_MODE:
                ahead = self._decode_ahead(call_sig, call)
            if ahead is not None:
                out = ahead
            elif plan.cfg_half and plan.runs_network and self.runtime.mode in (FULL_MODE, REUSE_MODE):
                out = self._cfg_half(call_sig, call)
            elif plan.runs_network and self.graphs is not None and self.runtime.mode != COMPUTE_MODE:
                out = self._replay(call_sig, call)
            elif plan.runs_network:  # traced by torch.compile: the network is compiled, not this frame
                out = self.family.run(self.executor.network, call)
            else:  # a reduced-NFE jump: a copy of the keyframe's output, no network
                out = _copy(self._keyframe_output(call_sig))
            out = self._finish(plan, call_sig, out)
        except BaseException:
            self._abort()
            raise
        return self.family.wrap_output(out, return_dict)


def _copy(t: torch.Tensor) -> torch.Tensor:
    # Its own frame, so a compiled model compiles it (torch.compile(fullgraph=True) refuses a call
    # that compiles nothing).
    return t.clone()


def patch(target, policy: Policy | None = None, *, backend: str = "auto", cuda_graphs: bool = False,
          cache=None) -> Handle:
    """Patch a model (or a pipeline holding one) in place with `policy`.

    backend: "auto" (Triton kernels on CUDA, PyTorch elsewhere), "torch" or "triton".
    cache: how cached features are stored (frkern.cache_format): "model" (default, as computed),
    "fp16", "bf16", "int8", "fp8_e4m3", or a frkern.CacheFormat (int8/fp8 scales per channel or
    per group).
    With a pipeline, its scheduler is tracked: set_timesteps starts a generation, step advances.
    Patching a second pipeline that shares an already patched model (with the same settings)
    returns the existing handle and tracks that pipeline's scheduler too.
    """
    policy = NoReuse() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(
            f"frkern.patch: policy must be a frkern policy ({', '.join(POLICIES)}), got {type(policy).__name__}"
        )
    ops.check_backend(backend)
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"frkern.patch: cuda_graphs must be a bool, got {cuda_graphs!r}")
    cache_format = as_cache_format(cache)
    family, model, pipeline = find_model(target)
    if pipeline is not None and not (hasattr(pipeline, "scheduler") and hasattr(pipeline.scheduler, "step")):
        raise TypeError(f"frkern.patch: pipeline {type(pipeline).__name__} has no scheduler to track")
    existing: Handle | None = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None:
        if pipeline is not None and (existing.policy, existing.backend, existing.cuda_graphs, existing.cache_format) == (
                policy, backend, cuda_graphs, cache_format):
            existing.track(pipeline)
            return existing
        raise RuntimeError(
            "frkern.patch: this model is already patched"
            + (f" (with {existing.policy}, backend={existing.backend!r}, cuda_graphs={existing.cuda_graphs})"
               if pipeline is not None else "")
            + "; call frkern.unpatch first"
        )
    forward_chain.bottom(model)  # a RuntimeError if an unknown wrapper hides the model's own forward
    family.check_supported(model)
    target_parts = Target(model, family, family.parts(model), backend)
    try:
        plan = prepare(target_parts, policy)  # validates everything; nothing has changed yet
        _check_cache_format(cache_format, plan, model)
    except ValueError as e:  # name what was refused where
        raise ValueError(f"{e} [model family {family.name}, policy {policy.name}]") from None

    handle = Handle(model, family, policy, backend, cuda_graphs, plan, cache_format)
    handle.installation = install(target_parts, plan, handle.runtime)
    # torch.compile must not trace the host-side step logic (its guards would change every step):
    # the handle's frame is skipped, the network it calls (the model's own forward) is compiled.
    forward_chain.bottom(model).set(handle._chain_forward)
    model.__dict__[_HANDLE_ATTR] = handle
    if callable(getattr(type(model), _LORA_LOADER, None)) and _LORA_LOADER not in model.__dict__:
        model.__dict__[_LORA_LOADER] = handle._load_lora_adapter
    handle.active = True
    handle.track(pipeline)
    return handle


def _check_cache_format(fmt: CacheFormat, plan: Plan, model: nn.Module) -> None:
    if fmt.exact:
        return
    if plan.gated:
        raise ValueError(
            f"frkern.patch: cache format {fmt.name!r} cannot hold SkipConv's state: its exactness rests on "
            "z == conv(x_ref) after every step and on comparing each input with x_ref itself, so neither may be "
            "rounded (its active-tile masks are already bits); use cache='model'")
    param = next(model.parameters(), None)
    check_device_support(fmt, param.device if param is not None else torch.device("cpu"))


_LORA_LOADER = "load_lora_adapter"  # diffusers' PeftAdapterMixin method (see Handle._load_lora_adapter)


def unpatch(target) -> None:
    """Restore the original modules (with any child replaced meanwhile, e.g. an adapter layer),
    forward and scheduler; free every cached tensor."""
    _, model, _ = find_model(target)
    handle: Handle | None = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        raise RuntimeError("frkern.unpatch: this model is not patched")
    handle.installation.uninstall()
    slot = forward_chain.slot_of(model, handle._chain_forward)
    if slot is not None:  # else a wrapper that is no hook replaced the whole chain since: leave it
        forward_chain.put_back(model, slot, handle._replaced)
    for tracker in set(handle._trackers.values()):
        tracker.unsubscribe(handle.runtime)
    handle._trackers.clear()
    handle._pipelines.clear()
    handle.runtime.scheduler_driven = False
    handle.runtime.cache.clear()
    handle.executor.clear()
    del model.__dict__[_HANDLE_ATTR]
    if model.__dict__.get(_LORA_LOADER) == handle._load_lora_adapter:
        del model.__dict__[_LORA_LOADER]
    handle.active = False
