"""Host-side state of a patched UNet: which generation and step we are in, and what this call does.

Nothing here reads a device tensor: the step index comes from the scheduler wrapper or from the
user's `set_step`, so the host can run ahead of the GPU.
"""
from __future__ import annotations

import collections
import operator
from typing import Callable, Iterable

import torch

from .cache import FeatureCache
from .policies import FULL, Policy, StepPlan

OFF, FULL_MODE, REUSE_MODE, GATED_MODE = "off", "full", "reuse", "gated"
EPS_UNIT = "unet.out"
_VERSION = operator.attrgetter("_version")


class Runtime:
    """Shared by the UNet forward and every wrapper of one patched UNet.

    Calls are grouped into steps; the k-th UNet call within a step is its slot k (a sampler that
    calls the UNet twice per step, e.g. Heun, or a pipeline running CFG as two calls, gets two
    slots). Reuse reads only what the same slot stored on the last keyframe.
    """

    def __init__(self, policy: Policy, params: Callable[[], Iterable[torch.Tensor]]):
        self.policy = policy
        self.cache = FeatureCache()
        # Re-listed at every generation, so parameters added since (adapters, swapped modules) are
        # watched too; within a generation in-place updates and replaced tensors are detected.
        self._param_source = params
        self._params = list(params())
        self.num_steps: int | None = None
        self.step = 0
        self.slot = 0
        self.mode = OFF
        self._key_sigs: dict[int, tuple] = {}
        # What the network may touch during one call: `reads` (unit -> (value, input signature)),
        # filled on the host from the validated cache before a reuse call, and `writes`, filled by
        # the wrappers on a full call and committed to the cache after it. Both dicts keep their
        # identity for the runtime's whole life, so torch.compile and CUDA graphs see the same
        # objects on every call and never the cache's bookkeeping (generation ids, slots).
        self.reads: dict[str, tuple] = {}
        self.writes: dict[str, tuple] = {}
        # Auto-FR search (frkern.autofr): every unit is computed fresh and blended with its value
        # from the previous step, value = gate * fresh + (1 - gate) * previous, differentiably.
        self.gate: torch.Tensor | None = None
        self.gated_prev: dict[str, torch.Tensor] = {}
        self.gated_new: dict[str, torch.Tensor] = {}
        self.stats: collections.Counter = collections.Counter()

    # --- step tracking -------------------------------------------------------------------------
    def begin(self, num_steps: int) -> None:
        """Start a new generation of `num_steps` steps: every cache is dropped."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.cache.new_generation()
        self._params = list(self._param_source())
        self._key_sigs.clear()
        self.num_steps = num_steps
        self.step = 0
        self.slot = 0
        self.stats.clear()

    def set_step(self, step: int) -> None:
        if self.num_steps is None:
            raise RuntimeError("call begin(num_steps) before set_step(i)")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.step = step
        self.slot = 0

    def advance(self) -> None:
        self.step += 1
        self.slot = 0

    # --- one UNet call -------------------------------------------------------------------------
    def weights_token(self) -> tuple:
        # In-place updates bump _version; replaced or moved tensors change data_ptr. map() with C
        # accessors: this runs on every call over every parameter (686 for SD1.5).
        ps = self._params
        return len(ps), sum(map(_VERSION, ps)), sum(map(torch.Tensor.data_ptr, ps))

    def start_call(self, call_sig: tuple) -> StepPlan:
        if self.num_steps is None:
            raise RuntimeError(
                "frkern: no generation started. A patched pipeline starts one in "
                "scheduler.set_timesteps; in a hand-written loop call handle.begin(num_steps) and "
                "handle.set_step(i) before each UNet call."
            )
        if self.mode != OFF:
            raise RuntimeError("frkern: nested call of a patched UNet")
        plan = self.policy.plan(self.step, self.num_steps)
        if not plan.keyframe and not self._can_reuse(call_sig, plan):
            self.stats["promoted"] += 1
            plan = FULL
        self.mode = FULL_MODE if plan.keyframe else REUSE_MODE
        self.stats["full" if plan.keyframe else ("reuse" if plan.runs_network else "skip")] += 1
        self.reads.clear()
        self.writes.clear()
        if not plan.keyframe:
            self.reads.update(self.cache.slot_view(self.slot))
            self.reads.pop(EPS_UNIT, None)
        return plan

    def _can_reuse(self, call_sig: tuple, plan: StepPlan) -> bool:
        if self._key_sigs.get(self.slot) != call_sig:
            return False
        if plan.mix < 1.0 and self.cache.get((self.slot, EPS_UNIT), call_sig) is None:
            return False
        return True

    def end_call(self, plan: StepPlan, call_sig: tuple) -> None:
        if plan.keyframe:
            # A keyframe replaces the slot's whole cache: no entry of an older keyframe survives.
            self.cache.drop_slot(self.slot, keep=(EPS_UNIT,))
            for unit, (value, sig) in self.writes.items():
                self.cache.put((self.slot, unit), value, sig)
            self._key_sigs[self.slot] = call_sig
        self.reads.clear()
        self.writes.clear()
        self.mode = OFF
        self.slot += 1

    def abort_call(self) -> None:
        """A call raised: forget the slot's keyframe so nothing half-written is ever reused."""
        self._key_sigs.pop(self.slot, None)
        self.reads.clear()
        self.writes.clear()
        self.mode = OFF

    def keyframe_output(self, call_sig: tuple) -> torch.Tensor | None:
        return self.cache.get((self.slot, EPS_UNIT), call_sig)

    def store_keyframe_output(self, out: torch.Tensor, call_sig: tuple) -> None:
        # A copy: the pipeline owns `out` and may change it in place.
        self.cache.put((self.slot, EPS_UNIT), out.detach().clone(), call_sig)

    # --- for the wrappers ----------------------------------------------------------------------
    # These run inside the network (and so inside torch.compile's graph): they touch only
    # `mode`, `reads` and `writes`, whose guards do not change from one step to the next.
    def read(self, unit: str, sig: tuple):
        """The cached value of `unit` for this slot, or None when this call must compute it."""
        if self.mode != REUSE_MODE:
            return None
        entry = self.reads.get(unit)
        if entry is None or entry[1] != sig:
            self.stats["unit_miss"] += 1
            return None
        return entry[0]

    def write(self, unit: str, value, sig: tuple) -> None:
        if self.mode == FULL_MODE:
            self.writes[unit] = (value, sig)

    def gated(self, unit: str, fresh: torch.Tensor) -> torch.Tensor:
        prev = self.gated_prev.get(unit)
        value = fresh if prev is None else self.gate * fresh + (1 - self.gate) * prev
        self.gated_new[unit] = value
        return value
