"""Host-side state of a patched model, and the unit protocol every reuse unit goes through.

Step tracking: which generation and step we are in. Nothing here reads a device tensor: the step
index comes from the scheduler tracker (frkern.tracking) or from the user's `set_step`, so the
host can run ahead of the GPU.

The unit protocol: a reuse unit (a wrapper in frkern.units) says what it caches and how to compute
it, by calling `Runtime.unit(name, sig, compute, reuse)`. The runtime alone decides, from its mode,
whether the unit computes and stores, reads the cache, or hands its fresh value to a custom mode
(Auto-FR's gated blend, frkern.autofr). A unit writes no mode logic of its own.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from .cache import FeatureCache, run_key
from .policies import FULL, Policy, StepPlan
from .watch import WeightsWatch

# Built-in modes. OFF: between calls (units compute, nothing is cached). COMPUTE: a call that must
# not touch the cache (outside any tracked generation). FULL: compute and record every unit's
# state. REUSE: read each unit's state from the last keyframe. PROBE (adaptive policies): run the
# network up to the indicator only (frkern.adaptive), recording what it computed on the way.
OFF, COMPUTE_MODE, FULL_MODE, REUSE_MODE, PROBE_MODE = "off", "compute", "full", "reuse", "probe"
EPS_UNIT = "unet.out"

_PICKLE_MESSAGE = (
    "frkern: a patched model cannot be pickled (torch.save of the module, multiprocessing): its "
    "forward and cache belong to this process. Call frkern.unpatch(model) first, save it, and "
    "patch again after loading (copy.deepcopy of a patched model does work)."
)


class UnitMode:
    """A custom mode: every unit computes its fresh state and passes it through `state`, whose
    return value the unit then uses (Auto-FR blends it with the previous step's)."""

    def state(self, unit: str, fresh: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class CallSignature(NamedTuple):
    """What a cached feature's call must share with the call that reads it."""

    sample: tuple  # (shape, dtype, device) of the primary input
    context: tuple | None  # the same of the conditioning (encoder hidden states), if a tensor
    weights: tuple  # WeightsWatch.token()
    options: tuple  # hashable call options that change the result but no shape (e.g. a LoRA scale)


class Runtime:
    """Shared by the patched forward and every wrapper of one patched model.

    Calls are grouped into steps; the k-th call within a step is its slot k (a sampler that calls
    the model twice per step, e.g. Heun, or a pipeline running CFG as two calls, gets two slots).
    Reuse reads only what the same slot stored on its last keyframe.
    """

    def __init__(self, policy: Policy, model: nn.Module, caches: bool = True, reuse_limit: int | None = None,
                 codec=None):
        self.policy = policy  # its plan(step, num_steps) says what each call does
        # Is anything kept between calls (the installation's plan says)? If not, no step protocol.
        self.caches = caches
        self.reuse_limit = reuse_limit  # the longest run of reuse calls a decided plan may make
        self.cache = FeatureCache(codec)  # codec: the cache format's encoding (None: stored as computed)
        self.watch = WeightsWatch(model)
        self.num_steps: int | None = None
        self.step = 0
        self.start = 0  # the position of the generation's first step in the whole schedule
        self.slot = 0
        self.mode: Any = OFF
        # A generation is open from begin() until its scheduler has run its last step (tracked
        # pipelines) or forever (hand-written loops). Calls outside it never touch the cache.
        self.open = False
        self.driver = None  # the scheduler tracker whose set_timesteps began the generation
        self.scheduler_driven = False  # set by the tracker: calls outside a generation run in full
        self._calls_in_generation = 0
        self._key_sigs: dict[int, CallSignature] = {}
        self._reuse_run: dict[int, int] = {}  # slot -> reuse calls since its last keyframe
        # What the network may touch during one call: `reads` (unit -> (value, input signature)),
        # filled on the host from the validated cache before a reuse call, and `writes`, filled by
        # the units on a full call and committed to the cache after it. Both dicts keep their
        # identity for the runtime's whole life, so torch.compile and CUDA graphs see the same
        # objects on every call and never the cache's bookkeeping (generation ids, slots).
        self.reads: dict[str, tuple] = {}
        self.writes: dict[str, tuple] = {}
        # How often each unit has run in this call: a unit run once per chunk of the batch
        # (diffusers' split inference) stores and reads each run under a key of its own (run_key).
        self.runs: dict[str, int] = {}
        # States the host sets for this call outside the network (an adaptive gate's state after a
        # probe), committed with its writes: they hold whether or not the network reaches the unit.
        self.pending: dict[str, tuple] = {}
        # Does this call's forward change block outputs in place (family.mutates_outputs)? Cached
        # segments then hand out copies.
        self.outputs_mutated = False
        # Outputs computed ahead (EncoderPropagation's parallel decoding): (slot, step) -> (output,
        # what the later call must pass for it to apply); dropped with the generation.
        self.ahead: dict = {}
        self.attention_modes = None  # step -> AttentionModes, from the plan (T-GATE's attention units)
        self.gate_modes = None  # the AttentionModes of T-GATE's gate step (run again when its outputs are gone)
        # This call's AttentionModes (None outside a tracked call): set on the host, so a compiled
        # network sees a few distinct values (one graph per step kind), not the step number.
        self.attention_now = None
        # (scale, below): what each tracked scheduler step adds to its sample (step_sample), and the
        # generation's first step's sample it adds (None until that step).
        self.prior_noise: tuple[float, float] | None = None
        self.prior_latents: torch.Tensor | None = None
        self.stats: collections.Counter = collections.Counter()
        # What units are, declared by their wrappers when installed (declare()); fixed from then on,
        # so a compiled network's guards on them never change.
        self.stateful_units: set[str] = set()  # their state moves on at every reuse call (update())
        # Stateful units whose state outlives keyframes (T-GATE's stored attention outputs): a
        # keyframe reads and moves it on like a reuse call, and does not drop it.
        self.persistent_units: set[str] = set()
        # Units whose consumers decode a compressed cached state themselves (a fused kernel reads
        # it): their reads are handed over as stored (frkern.cache_format.Encoded).
        self.encoded_units: set[str] = set()
        # Every unit read through unit(): a compressed state of theirs is decoded there, when (and
        # only if) the call reaches the unit, not for the whole slot before the call.
        self.protocol_units: set[str] = set()
        # begin_checks(num_steps) run when a generation starts (e.g. a learned adaptor made for
        # another step count refuses it before anything runs)
        self.begin_checks: list = []  # units whose state moves on in reuse calls
        # Per-step device scalars about what units did (SkipConv: fraction of active tiles), read
        # on the host only when someone asks (Handle.stats).
        self.measures: dict[str, dict[int, torch.Tensor]] = collections.defaultdict(dict)

    def measure(self, name: str, value) -> None:
        """Record a per-step measure; a step of several calls (CFG run as two calls) keeps the largest,
        as one batched call's measure is the largest over its images."""
        by_step = self.measures[name]
        prev = by_step.get(self.step)
        if prev is None:
            by_step[self.step] = value
        elif isinstance(value, torch.Tensor):
            by_step[self.step] = torch.maximum(prev, value)  # stays on the device
        else:
            by_step[self.step] = max(prev, value)

    # A copy of a patched model gets a runtime of its own: same policy, empty cache.
    def __deepcopy__(self, memo):
        import copy

        new = Runtime(self.policy, copy.deepcopy(self.watch.model, memo), self.caches, self.reuse_limit,
                      self.cache.codec)
        new.begin_checks = list(self.begin_checks)
        new.stateful_units, new.persistent_units = set(self.stateful_units), set(self.persistent_units)
        new.encoded_units, new.protocol_units = set(self.encoded_units), set(self.protocol_units)
        new.attention_modes, new.gate_modes, new.prior_noise = self.attention_modes, self.gate_modes, self.prior_noise
        memo[id(self)] = new
        return new

    def __reduce__(self):
        raise TypeError(_PICKLE_MESSAGE)

    @property
    def _params(self) -> list:  # the watched parameters (bench/host_overhead.py reports their count)
        return self.watch.params

    # --- step tracking -------------------------------------------------------------------------
    def begin(self, num_steps: int, start: int = 0, driver=None) -> None:
        """Start a new generation of `num_steps` steps (every cache dropped) at step `start`: a
        pipeline that runs only the last steps of its schedule (img2img, strength < 1) starts
        there, and policies plan by position in the whole schedule."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        for check in self.begin_checks:
            check(num_steps)
        self.cache.new_generation()
        self.ahead.clear()
        self.prior_latents = None
        self.watch.refresh()
        self._key_sigs.clear()
        self._reuse_run.clear()
        self.num_steps = num_steps
        self.open = True
        self.driver = driver  # the scheduler tracker whose set_timesteps began it (None: handle.begin)
        self._calls_in_generation = 0
        self.step = 0
        self.slot = 0
        self.stats.clear()
        self.measures.clear()
        self.locate(start)

    def relocate(self, step: int) -> None:
        """Say that the current step is `step` of the schedule (the tracker learns where a
        pipeline starts only after set_timesteps). Cached features stay: they belong to this
        generation's calls whatever their position is called."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.step = step

    def restart(self) -> None:
        """Drop every cached feature of the open generation (the next call is a keyframe); the
        generation, where it started and its first sample stay."""
        start, prior_latents = self.start, self.prior_latents
        self.begin(self.num_steps, self.step, self.driver)
        self.start, self.prior_latents = start, prior_latents

    def locate(self, start: int) -> None:
        """Say that the generation's first step, the current one, is `start` of the schedule."""
        self.relocate(start)
        self.start = start

    def plan_position(self) -> tuple[int, int]:
        """(step, num_steps) as the policy counts them (Policy.counts_from_first_step)."""
        if self.policy.counts_from_first_step:
            if self.step < self.start:
                raise ValueError(f"frkern: {self.policy.name} counts steps from the generation's first step, "
                                 f"{self.start} (handle.begin(num_steps, start)); set_step({self.step}) is before it")
            return self.step - self.start, self.num_steps - self.start
        return self.step, self.num_steps

    def set_step(self, step: int) -> None:
        if self.num_steps is None:
            raise RuntimeError("call begin(num_steps) before set_step(i)")
        self.relocate(step)
        self.slot = 0

    def advance(self) -> None:
        self.step += 1
        self.slot = 0

    def step_sample(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The sample a tracked scheduler step of this generation receives: `sample`, plus
        scale * (the generation's first step's sample) where timestep < below (prior_noise). A
        timestep on the host is compared there, one on the device on the device (no host read)."""
        if self.prior_noise is None or not self.open:
            return sample
        if self.prior_latents is None:
            self.prior_latents = sample.detach().clone()
        scale, below = self.prior_noise
        if not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu":
            t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
            return sample + scale * self.prior_latents if t < below else sample
        # the same sum as on the host (scale a Python number: one rounding of the product), chosen
        # on the device
        return torch.where(timestep < below, sample + scale * self.prior_latents, sample)

    @property
    def in_generation(self) -> bool:
        """Has this runtime's model been called in the open generation?"""
        return self.open and self._calls_in_generation > 0

    def finish(self) -> None:
        """The generation's sampler has run its last step: later calls are outside it."""
        self.open = False
        self.cache.clear()  # nothing of it can be read again: free it
        self.ahead.clear()
        self._key_sigs.clear()
        self._reuse_run.clear()

    # --- one call ------------------------------------------------------------------------------
    def weights_token(self) -> tuple:
        return self.watch.token()

    def start_call(self, call_sig: CallSignature) -> StepPlan:
        if self.mode != OFF:
            raise RuntimeError("frkern: nested call of a patched model")
        self.attention_now = None
        if not self.caches:
            # Kernels only: no step protocol needed, nothing is read or written. Every call is
            # slot 0 (without set_step the slot would count calls, and each call would key a
            # CUDA graph of its own).
            self.slot = 0
            self.mode = FULL_MODE
            self.stats["full"] += 1
            self.reads.clear()
            self.writes.clear()
            self.runs.clear()
            return FULL
        if not self.open:
            if not self.scheduler_driven:
                raise RuntimeError(
                    "frkern: no generation started. A patched pipeline starts one in "
                    "scheduler.set_timesteps: if this model runs inside a pipeline, patch the pipeline, "
                    "not its UNet (frkern.patch(pipe, policy)), so that its scheduler is tracked. In a "
                    "hand-written loop call handle.begin(num_steps) and handle.set_step(i) before each call."
                )
            # Called outside its scheduler's generation (e.g. by another pipeline whose scheduler
            # frkern does not track): correct, full compute, nothing cached.
            self.mode = COMPUTE_MODE
            self.stats["untracked"] += 1
            return FULL
        self._calls_in_generation += 1
        position, num_steps = self.plan_position()
        plan = self.policy.plan(position, num_steps)
        if self.persistent_units and self._key_sigs.get(self.slot, call_sig) != call_sig:
            # States that outlive keyframes (T-GATE's stored attention outputs) were made by a call of
            # other shapes, weights or LoRA scale: none of them may be read again.
            self.cache.drop_slot(self.slot)
        # A call that cannot reuse computes in full; what it runs (one CFG half) stays as planned.
        if not plan.keyframe and not self._can_reuse(call_sig, plan):
            self.stats["promoted"] += 1
            plan = FULL if not plan.cfg_half else StepPlan(keyframe=True, cfg_half=True)
        if plan.decide and self.reuse_limit is not None and self._reuse_run.get(self.slot, 0) >= self.reuse_limit:
            self.stats["forced"] += 1  # the longest run of reuse calls is reached
            plan = FULL
        if self.attention_modes is not None:
            modes = self.attention_modes(position)
            if modes.cross[1] and not self.cache.slot_view(self.slot, only=self.persistent_units,
                                                           encoded=self.persistent_units):
                # It would return stored cross-attention outputs, and none are stored (dropped by a
                # reset or a change of weights after the gate): this call is the gate again, both
                # halves computed, the attention outputs stored as at gate_step - 1.
                modes, plan = self.gate_modes, FULL
                self.stats["regated"] += 1
            self.attention_now = modes
        self.reads.clear()
        self.writes.clear()
        self.runs.clear()
        self.pending.clear()
        if plan.decide:
            self.mode = PROBE_MODE  # the dispatcher probes, then calls resolve()
            self.probe_reads()
        else:
            self._enter(plan)
        return plan

    def _enter(self, plan: StepPlan) -> None:
        self.mode = FULL_MODE if plan.keyframe else REUSE_MODE
        self.stats["full" if plan.keyframe else ("reuse" if plan.runs_network else "skip")] += 1
        if not plan.keyframe:
            self.probe_reads()
        elif self.persistent_units:
            self.reads.update(self.cache.slot_view(self.slot, only=self.persistent_units, encoded=self.protocol_units))

    def probe_reads(self) -> None:
        """The slot's cached states, readable by the units (a reuse call; a probe compares the
        indicator with its state)."""
        self.reads.update(self.cache.slot_view(self.slot, skip=(EPS_UNIT,), encoded=self.protocol_units))

    def resolve(self, plan: StepPlan, reuse: bool) -> StepPlan:
        """After a probe: the call's final plan. What the probe computed (its `writes`) becomes
        readable, so the rest of the call starts where the probe stopped."""
        probed = dict(self.writes)
        self.reads.clear()
        self.writes.clear()
        self.runs.clear()  # a unit the resumed pass runs again reads what the probe stored
        plan = plan if reuse else FULL
        self._enter(plan)
        self.reads.update(probed)
        return plan

    def _can_reuse(self, call_sig: CallSignature, plan: StepPlan) -> bool:
        if self._key_sigs.get(self.slot) != call_sig:
            return False
        if plan.mix < 1.0 and not self.cache.has((self.slot, EPS_UNIT), call_sig):
            return False
        return True

    def end_call(self, plan: StepPlan, call_sig: CallSignature) -> None:
        if self.mode == FULL_MODE and plan.keyframe and self.caches:
            # A keyframe replaces the slot's whole cache: no entry of an older keyframe survives.
            self.cache.drop_slot(self.slot, keep=(EPS_UNIT, *self.persistent_units))
            memo = {}  # a tensor under two units is stored once (an encoded cache encodes it once)
            for unit, (value, sig) in (*self.writes.items(), *self.pending.items()):
                self.cache.put((self.slot, unit), value, sig, memo)
            self._key_sigs[self.slot] = call_sig
            self._reuse_run[self.slot] = 0
            # outputs decoded ahead (EncoderPropagation) were made from the features just replaced
            # (a promoted call, e.g. after a weight change, is such a keyframe)
            self.ahead.clear()
        elif self.mode == REUSE_MODE:
            memo = {}
            for unit, (value, sig) in (*self.writes.items(), *self.pending.items()):  # stateful units moved on
                self.cache.put((self.slot, unit), value, sig, memo)
            self._reuse_run[self.slot] = self._reuse_run.get(self.slot, 0) + 1
        self.reads.clear()
        self.writes.clear()
        self.runs.clear()
        self.pending.clear()
        self.mode = OFF
        self.slot += 1

    def abort_call(self) -> None:
        """A call raised: free every cached feature of the generation (an interrupted generation
        holds no memory; nothing half-written is ever reused). The generation stays open: a later
        call computes in full and starts caching again."""
        self.cache.clear()
        self.ahead.clear()
        self._key_sigs.clear()
        self._reuse_run.clear()
        self.reads.clear()
        self.writes.clear()
        self.runs.clear()
        self.pending.clear()
        self.mode = OFF

    def keyframe_output(self, call_sig: CallSignature) -> torch.Tensor | None:
        return self.cache.get((self.slot, EPS_UNIT), call_sig)

    def store_keyframe_output(self, out: torch.Tensor, call_sig: CallSignature) -> None:
        # A copy: the pipeline owns `out` and may change it in place.
        self.cache.put((self.slot, EPS_UNIT), out.detach().clone(), call_sig)

    # --- the unit protocol ---------------------------------------------------------------------
    # Runs inside the network (and so inside torch.compile's graph): it touches only `mode`,
    # `reads` and `writes`, whose guards do not change from one step to the next.
    @property
    def stores(self) -> bool:
        """Does this call store the states its units compute (a keyframe)? A unit may produce that
        state in its stored form then (a kernel encoding it for a compressed cache)."""
        return self.mode == FULL_MODE

    def declare(self, name: str, stateful: bool = False, persistent: bool = False, encoded: bool = False) -> None:
        """What unit `name` is (its wrapper says so when installed): stateful (update() moves its state
        on at every reuse call), persistent (that state outlives keyframes too), encoded (its reuse()
        takes the state as a compressed cache stores it and decodes it itself)."""
        self.protocol_units.add(name)
        for flag, units in ((stateful or persistent, self.stateful_units), (persistent, self.persistent_units),
                            (encoded, self.encoded_units)):
            if flag:
                units.add(name)

    def unit(self, name: str, sig: tuple, compute: Callable[[], Any], reuse: Callable[[Any], Any] | None = None,
             update: Callable[[Any], tuple] | None = None):
        """The output of reuse unit `name` for this call.

        compute() computes it fresh: it returns the output, or (output, state) when the unit
        caches something else than its output; reuse(state) turns a cached state back into the
        output (default: the state is the output). A stateful unit (Skip-Convolution) passes
        update(state) -> (output, new state) instead of reuse: its state moves on every reuse call
        and is committed after it (declare() says which units are stateful, persistent or take their
        state encoded). `sig` describes the unit's input; a cached state is read only if
        it was made from an input of the same signature. A state may be any pytree of tensors (a
        unit may cache more than one tensor).
        """
        mode = self.mode
        run = self.runs.get(name, 0)
        self.runs[name] = run + 1
        key = run_key(name, run)  # `name` itself on the first run
        if mode == REUSE_MODE or (mode == FULL_MODE and name in self.persistent_units):
            entry = self.reads.get(key)
            if entry is not None and entry[1] == sig:
                state = entry[0]
                if self.cache.codec is not None and name not in self.encoded_units:
                    state = self.cache.codec.decode(state)  # a compressed state, decoded where it is read
                if update is not None:
                    output, new_state = update(state)
                    self.writes[key] = (new_state, sig)
                    return output
                return state if reuse is None else reuse(state)
            if mode == REUSE_MODE:
                self.stats["unit_miss"] += 1
        result = compute()
        output, state = (result, result) if reuse is None and update is None else result
        if mode == FULL_MODE:
            self.writes[key] = (state, sig)
        elif isinstance(mode, UnitMode):
            new_state = mode.state(key, state)
            if new_state is not state:
                output = new_state if reuse is None else reuse(new_state)
        return output
