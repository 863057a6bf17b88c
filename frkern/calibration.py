"""Calibration of the adaptive rule (an offline tool on the unpatched model; frkern.adaptive holds
the rule itself)."""
from __future__ import annotations

import dataclasses

import torch

from .adaptive import relative_change
from .family import find_model
from .policies import Adaptive
from .segments import adaptive_gate, clockwork_cut, deepcache_cut
from .units import _primary_input


def indicator_gate(target, policy: Adaptive) -> str:
    """The path of the module whose input is `policy`'s indicator on `target`'s model."""
    family, model, _ = find_model(target)
    parts = family.parts(model)
    cut = None if policy.reuse == "units" else (
        clockwork_cut(parts, policy.levels) if policy.reuse == "clockwork" else deepcache_cut(parts, policy.branch))
    return adaptive_gate(parts, cut)[1]


def calibrate(target, policy, run, degree: int = 2, note: str = ""):
    """Fit the accumulated rule's polynomial (TeaCache's rescaling) on a full-compute run.

    target: the unpatched UNet (or a pipeline holding it); run(): samples with it (e.g.
    `lambda: pipe(prompt, num_inference_steps=50)`). For each UNet call after the first, records
    d = the indicator's relative change since the previous call and o = the output's (both the
    largest over the batch), and fits o ~ poly(d) by least squares (numpy.polyfit). Returns
    `policy` (an Adaptive) with rule "accumulated", that poly and `calibrated_for` = note; the
    policy's threshold is then in units of accumulated relative output change.
    """
    import numpy as np

    if not isinstance(policy, Adaptive):
        raise TypeError(f"calibrate: expected a frkern.Adaptive policy, got {type(policy).__name__}")
    family, model, _ = find_model(target)
    if "_frkern_handle" in model.__dict__:
        raise RuntimeError("calibrate: the model is patched; calibrate on the plain model (frkern.unpatch first)")
    gate = indicator_gate(model, policy)
    seen = {"g": None, "out": None}
    pairs = []

    def on_gate(module, args, kwargs):
        seen["g_new"] = _primary_input(args, kwargs).detach()

    def on_output(module, args, kwargs, output):
        out = (output[0] if isinstance(output, tuple) else output.sample).detach()
        g = seen.pop("g_new")
        if seen["g"] is not None and seen["g"].shape == g.shape and seen["out"].shape == out.shape:
            pairs.append((float(relative_change(g, seen["g"])), float(relative_change(out, seen["out"]))))
        seen["g"], seen["out"] = g, out

    hooks = [model.get_submodule(gate).register_forward_pre_hook(on_gate, with_kwargs=True),
             model.register_forward_hook(on_output, with_kwargs=True)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    if len(pairs) <= degree:
        raise ValueError(f"calibrate: {len(pairs)} pairs of UNet calls recorded, a degree-{degree} fit needs more")
    d, o = np.array(pairs).T
    poly = tuple(float(c) for c in np.polyfit(d, o, degree))
    return dataclasses.replace(policy, rule="accumulated", poly=poly, calibrated_for=note)
