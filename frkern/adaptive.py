"""Adaptive reuse: the change indicator, the probe that measures it, and its calibration
(the policy, which decides from a number, is frkern.policies.Adaptive).

One call that may reuse goes in three parts:
1. probe: the network runs in PROBE mode up to the gate, the first module whose output a reuse
   call would not compute. The modules before it (ProbedModule) record their outputs; the gate
   computes the indicator value v (a 0-dim fp32 tensor, the largest over the batch) and stops the
   network (GateReached; diffusers' LoRA scaling is undone by its own `finally`).
2. the host reads v: the one place an adaptive call waits for the device.
3. resume: the network runs again in FULL or REUSE mode; the probed modules return what they
   recorded (nothing before the gate is computed twice), the gate moves its state on, the rest
   computes or reuses.
With CUDA graphs the probe and each resume kind are separate graphs (frkern.graphs); under
torch.compile the gate's stop is a graph break.
"""
from __future__ import annotations

import math

import torch

from .cache import signature
from .runtime import FULL_MODE, PROBE_MODE
from .units import _primary_input, _Wrapper

INDICATOR_UNIT = "adaptive.gate"
GATE_INPUT = "adaptive.input"  # the gate's input on a probe
PROBED = "probe:"  # prefix of what a probe recorded, in runtime.writes and then runtime.reads


class GateReached(Exception):
    """Raised by the gate in PROBE mode: the rest of the network is not run."""


@torch.compiler.disable
def _stop():
    raise GateReached


def relative_change(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """max over the batch of mean|g - ref| / mean|ref| (per image, fp32): no image is carried
    by another's small change."""
    dims = tuple(range(1, g.dim()))
    g, ref = g.float(), ref.float()
    return ((g - ref).abs().mean(dims) / ref.abs().mean(dims)).amax()


def polyval(coeffs, x: torch.Tensor) -> torch.Tensor:
    """numpy.polyval on a tensor (Horner; highest degree first)."""
    out = torch.zeros_like(x)
    for c in coeffs:
        out = out * x + c
    return out


def indicator_value(rule: str, poly, g: torch.Tensor, state) -> torch.Tensor:
    """The value the policy compares with its threshold, from the gate's input g and its state."""
    if rule == "first_block":
        return relative_change(g, state)
    g_prev, acc = state
    return acc + polyval(poly, relative_change(g, g_prev)).clamp_min(0.0)


def _refuse_runs_in_chunks(rt, module: _Wrapper) -> None:
    """The probe and its gate see the whole batch once per pass. A module run once per chunk of it
    (diffusers' split inference, `enable_free_noise_split_inference`) would probe one chunk and
    hand one chunk's output to every other: refused at its second run."""
    key = "adaptive.runs:" + module.unit
    run = rt.runs.get(key, 0)
    rt.runs[key] = run + 1
    if run:
        raise RuntimeError(
            f"frkern: Adaptive's probe needs {module.unit!r} to run once per UNet call on the whole batch, "
            f"and it ran {run + 1} times in one call (split inference, e.g. AnimateDiff's "
            "enable_free_noise_split_inference, runs it once per chunk). Patch with a fixed policy "
            "(FRDiff, DeepCache, Clockwork: exact with split inference) or without split inference")


class ProbedModule(_Wrapper):
    """A module before the gate: records its output on a probe, returns it on the resumed call."""

    shares_hooks = False  # called on the probe and again on the resumed pass: hooks run when it computes

    def forward(self, *args, **kwargs):
        rt = self.runtime
        _refuse_runs_in_chunks(rt, self)
        if rt.mode == PROBE_MODE:
            out = self.run_original(*args, **kwargs)
            rt.writes[PROBED + self.unit] = (out, None)
            return out
        entry = rt.reads.get(PROBED + self.unit)
        if entry is not None:
            return entry[0]
        return self.run_original(*args, **kwargs)


class AdaptiveGate(_Wrapper):
    """The first module a reuse call may skip; its input g is the indicator. State (a unit of the
    runtime): "first_block": g on the last full call; "accumulated": (g on the previous call, the
    accumulated value).

    The state moves on with every call, also when the resumed call never reaches the gate (it can
    sit inside a cached segment, as for the DeepCache cut): after a probe the mechanism, not the
    gate's forward, commits it (commit_state); the forward records it only on full calls that had
    no probe (warm-up, a forced or promoted call)."""

    shares_hooks = False  # reached by the probe (which stops here) and again by the resumed pass

    def __init__(self, original, runtime, unit, cache_unit, backend, rule: str, poly: tuple):
        super().__init__(original, runtime, unit, cache_unit, backend)
        self.__dict__.update(rule=rule, poly=poly)

    def forward(self, *args, **kwargs):
        rt = self.runtime
        _refuse_runs_in_chunks(rt, self)
        g = _primary_input(args, kwargs)
        sig = signature(g)
        if rt.mode == PROBE_MODE:
            entry = rt.reads.get(INDICATOR_UNIT)
            if entry is None or entry[1] != sig:  # nothing to compare with: the call runs in full
                v = torch.full((), math.inf, device=g.device)
            else:
                v = indicator_value(self.rule, self.poly, g, entry[0])
            rt.writes[PROBED + INDICATOR_UNIT] = (v, None)
            rt.writes[PROBED + GATE_INPUT] = (g, None)
            _stop()
        if rt.mode == FULL_MODE and PROBED + INDICATOR_UNIT not in rt.reads:
            # clones: g may live in memory the next call rewrites (a CUDA graph's output)
            if self.rule == "first_block":
                rt.unit(INDICATOR_UNIT, sig, lambda: (None, g.clone()), reuse=lambda state: None)
            else:
                rt.unit(INDICATOR_UNIT, sig, lambda: (None, (g.clone(), g.new_zeros((), dtype=torch.float32))),
                        update=lambda state: (None, state))
        return self.run_original(*args, **kwargs)


class Decider:
    """The per-call decision of an adaptive policy, from the indicator value the probe measured."""

    def __init__(self, threshold: float, rule: str, poly: tuple):
        self.threshold, self.rule, self.poly = float(threshold), rule, tuple(poly)

    def reuses(self, value: float) -> bool:
        return value < self.threshold

    def commit(self, runtime, reuse: bool) -> None:
        commit_state(runtime, self.rule, reuse)


def commit_state(runtime, rule: str, reuse: bool) -> None:
    """After a probe and its decision: the gate's next state, from what the probe measured.
    first_block: a full call's g becomes the reference (a reuse call keeps it); accumulated: g
    becomes the previous input and the sum is the probe's value (reuse) or 0 (full). Copies, made
    on the host side of the call: the probe's tensors may live in a CUDA graph's memory."""
    g = runtime.reads[PROBED + GATE_INPUT][0]
    sig = signature(g)
    if rule == "first_block":
        if not reuse:
            runtime.pending[INDICATOR_UNIT] = (g.clone(), sig)
        return
    acc = runtime.reads[PROBED + INDICATOR_UNIT][0].clone() if reuse else g.new_zeros((), dtype=torch.float32)
    runtime.pending[INDICATOR_UNIT] = ((g.clone(), acc), sig)


def run_probe(runtime, family, network, call) -> torch.Tensor:
    """Run `network` on `call` in PROBE mode up to the gate; the indicator value (device)."""
    try:
        family.run(network, call)
    except GateReached:
        return runtime.writes[PROBED + INDICATOR_UNIT][0]
    raise RuntimeError("frkern: an adaptive call ran the whole network without reaching its gate")
