"""Step tracking for pipelines: a tracker on the scheduler tells the runtimes where sampling is.

One tracker per scheduler instance, shared by every patched model whose pipeline uses that
scheduler (two pipelines built from one set of components share it; unpatching one leaves the
other tracked). It replaces `set_timesteps`, `set_begin_index` and `step` on the instance with
callables that keep the originals' signatures (`inspect.signature` follows `__wrapped__`, so
pipelines still pass `generator`, `eta`, custom `timesteps` / `sigmas`):
- set_timesteps: a new generation of `num_inference_steps` steps;
- set_begin_index (img2img / inpaint with strength < 1): the generation starts at that position
  of the whole schedule; schedulers without it (DDIM, PNDM, DDPM) are located from the timestep
  the pipeline passes to the first `step` (a view into `scheduler.timesteps`: its offset is read
  from the data pointers, no device read);
- step: one more step done (two-evaluation samplers such as Heun: once per completed step); after
  the schedule's last entry the generation is closed, so a later call by someone else (another
  pipeline with this UNet but its own scheduler) computes in full instead of reading features
  of a finished image.
"""
from __future__ import annotations

import functools
import threading
import weakref

import torch

from .runtime import _PICKLE_MESSAGE, Runtime

_ATTR = "_frkern_tracker"
_OF_LOCK = threading.RLock()
_METHODS = ("set_timesteps", "set_begin_index", "step")


class _Tracked:
    """Stands in for one scheduler method; `__wrapped__` is the original bound method."""

    def __init__(self, tracker: "SchedulerTracker", name: str, method):
        functools.update_wrapper(self, method)
        self._tracker = tracker
        self._name = name

    def __call__(self, *args, **kwargs):
        return getattr(self._tracker, "_" + self._name)(self.__wrapped__, args, kwargs)

    def __deepcopy__(self, memo):
        # Copied with its scheduler (a pipeline's deepcopy): the copy's own tracker and method.
        # Copied without it (StableDiffusionPanoramaPipeline saves `deepcopy(scheduler.__dict__)` and
        # restores it with `__dict__.update` per view): itself, still bound to this scheduler; a copy
        # would bind `step` to a copy of the scheduler, whose state the pipeline never sees.
        if id(self._tracker.scheduler) not in memo:
            return self
        import copy

        return _Tracked(copy.deepcopy(self._tracker, memo), self._name, copy.deepcopy(self.__wrapped__, memo))


def _position(timestep, timesteps) -> int | None:
    """Index of `timestep` in `timesteps` without reading device memory, or None."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        return None
    if isinstance(timestep, torch.Tensor):
        if (timestep.numel() >= 1 and timestep.dtype == timesteps.dtype
                and timestep.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()):
            index, rest = divmod(timestep.data_ptr() - timesteps.data_ptr(), timesteps.element_size())
            return index if rest == 0 and 0 <= index < timesteps.numel() else None
        if timestep.device.type != "cpu" or timestep.numel() != 1:
            return None
        timestep = timestep.item()  # a host tensor: no device read
    if timesteps.device.type != "cpu":
        return None
    hits = (timesteps == timestep).nonzero()
    return int(hits[0, 0]) if len(hits) else None


class SchedulerTracker:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.runtimes: list[weakref.ref] = []
        self._own = {name: scheduler.__dict__[name] for name in _METHODS if name in scheduler.__dict__}
        self._steps = 0  # step() calls in this generation
        self._first_entry = 0  # where in scheduler.timesteps the generation starts
        self._located = False
        self._last_entry = None  # weakref to the timestep the last step() got (see _stepped_twice)
        for name in _METHODS:
            if hasattr(scheduler, name):
                setattr(scheduler, name, _Tracked(self, name, getattr(scheduler, name)))
        setattr(scheduler, _ATTR, self)

    @classmethod
    def of(cls, scheduler) -> "SchedulerTracker":
        # one tracker per scheduler, also when two threads patch pipelines sharing it at once
        with _OF_LOCK:
            tracker = scheduler.__dict__.get(_ATTR)
            return tracker if tracker is not None else cls(scheduler)

    # A copy of a tracked scheduler (deepcopy of a pipeline) gets a tracker of its own with no
    # runtime; the copied model's handle attaches to it on its first call.
    def __deepcopy__(self, memo):
        import copy

        if id(self.scheduler) not in memo:  # a copy of the scheduler's __dict__ alone (see _Tracked)
            return self
        new = SchedulerTracker.__new__(SchedulerTracker)
        memo[id(self)] = new
        new.__dict__.update(scheduler=copy.deepcopy(self.scheduler, memo), runtimes=[],
                            _own=copy.deepcopy(self._own, memo), _steps=0, _first_entry=0, _located=False,
                            _last_entry=None)
        return new

    def __reduce__(self):
        raise TypeError(_PICKLE_MESSAGE)

    # --- subscribers ---------------------------------------------------------------------------
    def live(self) -> list[Runtime]:
        return [rt for rt in (r() for r in self.runtimes) if rt is not None]

    def subscribe(self, runtime: Runtime) -> None:
        if runtime not in self.live():
            self.runtimes.append(weakref.ref(runtime))
        runtime.scheduler_driven = True

    def unsubscribe(self, runtime: Runtime) -> None:
        self.runtimes = [weakref.ref(rt) for rt in self.live() if rt is not runtime]
        if not self.runtimes:
            self.remove()

    def remove(self) -> None:
        d = self.scheduler.__dict__
        for name in _METHODS:
            d.pop(name, None)
        d.update(self._own)
        d.pop(_ATTR, None)

    def resume(self, runtime: Runtime) -> None:
        """Bring a runtime that attaches now (scheduler replaced or copied) into the scheduler's
        current generation, as if it had been tracked since set_timesteps."""
        n = getattr(self.scheduler, "num_inference_steps", None)
        if n is None:
            return  # set_timesteps not called yet: the next one begins the generation
        runtime.begin(int(n), self._start_step(), driver=self)
        self._steps = 0
        self._located = getattr(self.scheduler, "begin_index", None) is not None

    # --- the tracked methods -------------------------------------------------------------------
    def _order(self) -> int:
        return int(getattr(self.scheduler, "order", 1) or 1)

    def _start_step(self) -> int:
        begin = getattr(self.scheduler, "begin_index", None)
        self._first_entry = int(begin) if begin is not None else 0
        return self._first_entry // self._order()

    def _set_timesteps(self, method, args, kwargs):
        out = method(*args, **kwargs)
        n = getattr(self.scheduler, "num_inference_steps", None) or len(self.scheduler.timesteps)
        self._steps = 0
        self._last_entry = None
        self._located = False
        start = self._start_step()
        for rt in self.live():
            rt.begin(int(n), start, driver=self)
        return out

    def _set_begin_index(self, method, args, kwargs):
        out = method(*args, **kwargs)
        self._located = True
        start = self._start_step()
        for rt in self.live():
            if rt.open:
                rt.locate(start)
        return out

    def _stepped_twice(self) -> None:
        """step() got the very timestep object of its previous call, still alive (not an equal value:
        PLMS and Heun repeat values at other entries of their schedule; not a temporary at a reused
        address: a loop's `t.to(device)` of each step is a new object): a pipeline that denoises
        several views or tiles per timestep and steps each
        (StableDiffusionPanoramaPipeline, MultiDiffusion). Each view's UNet call then looks like the
        next step, so a caching policy would hand one view the features of another: refused before
        this step uses the call's output. Policies that cache nothing are unaffected."""
        caching = [rt for rt in self.live() if rt.caches and rt.in_generation]
        if caching:
            raise ValueError(
                f"frkern: {type(self.scheduler).__name__}.step was called twice for one timestep, as a pipeline "
                "that steps several views or tiles per timestep does (StableDiffusionPanoramaPipeline, "
                f"MultiDiffusion): {caching[0].policy.name} plans one UNet call per step and would give one view "
                "another's cached features. Patch such a pipeline with a policy that caches nothing (NoReuse)")

    def _inject(self, timestep, args, kwargs):
        """step's arguments with the sample a subscribed runtime adds to (Runtime.step_sample:
        EncoderPropagation's prior noise injection); unchanged when none does."""
        # the models this generation calls (two pipelines may share a scheduler and run in turn)
        injecting = [rt for rt in self.live() if rt.prior_noise is not None and rt.in_generation]
        if not injecting:
            return args, kwargs
        if len(injecting) > 1:
            raise ValueError("frkern: two patched models with prior noise injection are called in one generation "
                             "of a shared scheduler: each would add to its step's sample; give each pipeline its "
                             "own scheduler")
        if len(args) > 2:
            args = (*args[:2], injecting[0].step_sample(timestep, args[2]), *args[3:])
        elif "sample" in kwargs:
            kwargs = dict(kwargs, sample=injecting[0].step_sample(timestep, kwargs["sample"]))
        return args, kwargs

    def _step(self, method, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if self._last_entry is not None and self._last_entry() is timestep:
            self._stepped_twice()
        self._last_entry = weakref.ref(timestep) if isinstance(timestep, torch.Tensor) else None
        if self._steps == 0 and not self._located:
            # No begin index: find where the pipeline started from the timestep it passes.
            self._located = True
            index = _position(timestep, getattr(self.scheduler, "timesteps", None))
            if index:
                self._first_entry = index
                for rt in self.live():
                    if rt.open:
                        rt.locate(index // self._order())
        args, kwargs = self._inject(timestep, args, kwargs)
        out = method(*args, **kwargs)
        self._steps += 1
        # Two-evaluation samplers (Heun, KDPM2) finish a step only on their second call.
        finished_step = getattr(self.scheduler, "state_in_first_order", True)
        done = self._first_entry + self._steps >= len(getattr(self.scheduler, "timesteps", ()))
        for rt in self.live():
            if finished_step:
                rt.advance()
            if done:
                rt.finish()
        return out
