"""The unit protocol: a new reuse unit kind is a small class plus a table row, with no mode logic.

This file is also the worked example CONTRIBUTING.md points to.
"""
import copy
from functools import partial

import pytest
import torch
from diffusers.models.attention_processor import Attention

import frkern
from frkern.cache import signature
from frkern.runtime import FULL_MODE, REUSE_MODE, Runtime
from frkern.unet2d import UNet2DFamily
from frkern.units import _Wrapper
from tiny import sd_inputs, sd_unet


class ReusedAttention(_Wrapper):
    """Example unit kind: every attention layer's output, cached on keyframes (what FRDiff does
    for DiT attention outputs). All it says is what to compute; the runtime decides the rest."""

    swap_when_not_cached = False  # nothing fused: swapped in only where a policy caches it

    def forward(self, hidden_states, *args, **kwargs):
        return self.cached(signature(hidden_states), lambda: self.run_original(hidden_states, *args, **kwargs))


class AttentionHooks:
    """Independent statement: record each attention output on keyframes, substitute it otherwise."""

    def __init__(self, unet):
        self.keyframe, self.store = True, {}
        for name, m in unet.named_modules():
            if isinstance(m, Attention):
                m.register_forward_hook(partial(self._hook, name))

    def _hook(self, name, module, args, out):
        if self.keyframe:
            self.store[name] = out
            return None
        return self.store[name]


def test_a_new_unit_kind_is_a_class_and_a_table_row(monkeypatch):
    # the family's two tables: which modules are units of the new kind, which wrapper takes their place
    monkeypatch.setattr(UNet2DFamily, "unit_types", {Attention: "attention"})
    monkeypatch.setattr(UNet2DFamily, "wrappers", {"attention": ReusedAttention})
    unet = sd_unet()
    ref = copy.deepcopy(unet)
    hooks = AttentionHooks(ref)
    handle = frkern.patch(unet, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
    assert sum(isinstance(m, ReusedAttention) for m in unet.modules()) == sum(isinstance(m, Attention) for m in ref.modules())
    sample, ehs, _ = sd_inputs(unet)
    g = torch.Generator().manual_seed(0)
    handle.begin(4)
    with torch.no_grad():
        for i in range(4):
            x = torch.randn(sample.shape, generator=g)
            handle.set_step(i)
            hooks.keyframe = i % 2 == 0
            assert torch.equal(unet(x, 900 - 100 * i, ehs).sample, ref(x, 900 - 100 * i, ehs).sample), i
    assert handle.stats == {"full": 2, "reuse": 2}
    assert len(handle.runtime.cache) == len(hooks.store)
    frkern.unpatch(unet)
    assert not any(isinstance(m, ReusedAttention) for m in unet.modules())


def test_a_unit_may_cache_several_tensors_and_map_them_back_to_its_output():
    rt = Runtime(frkern.FRDiff(interval=2, score_mix=False), torch.nn.Linear(2, 2))
    rt.begin(2)
    x0, x1 = torch.randn(3, 4), torch.randn(3, 4)
    calls = []

    def compute(x):
        calls.append("compute")
        state = {"mean": x.mean(0), "scale": x.std(0)}
        return (x - state["mean"]) / state["scale"], state

    def reuse(x, state):  # normalise the fresh input with the keyframe's statistics
        return (x - state["mean"]) / state["scale"]

    plan = rt.start_call(("sig",))
    assert rt.mode == FULL_MODE
    out0 = rt.unit("norm", signature(x0), partial(compute, x0), partial(reuse, x0))
    rt.end_call(plan, ("sig",))
    assert set(rt.cache.slot_view(0)["norm"][0]) == {"mean", "scale"}
    assert rt.cache.nbytes == 2 * 4 * 4
    rt.set_step(1)
    plan = rt.start_call(("sig",))
    assert rt.mode == REUSE_MODE
    out1 = rt.unit("norm", signature(x1), partial(compute, x1), partial(reuse, x1))
    rt.end_call(plan, ("sig",))
    assert calls == ["compute"]
    assert torch.equal(out0, (x0 - x0.mean(0)) / x0.std(0))
    assert torch.equal(out1, (x1 - x0.mean(0)) / x0.std(0))
    # a different input signature is computed fresh, never read
    rt.set_step(1)
    plan = rt.start_call(("sig",))
    rt.unit("norm", signature(x1[:2]), partial(compute, x1[:2]), partial(reuse, x1[:2]))
    rt.end_call(plan, ("sig",))
    assert calls == ["compute", "compute"] and rt.stats["unit_miss"] == 1


def test_a_unit_run_several_times_in_one_call_reads_back_each_run():
    """diffusers' split inference runs a block once per chunk of the batch: each run of a unit in a
    call stores its own state and the same run of a later call reads that one (not the last
    chunk's, which every run read before: AnimateDiff with FRDiff was off by rel 5e-2)."""
    rt = Runtime(frkern.FRDiff(interval=2, score_mix=False), torch.nn.Linear(2, 2))
    rt.begin(2)
    chunks = [torch.randn(2, 3) for _ in range(3)]  # equal shapes: the signature cannot tell them apart
    plan = rt.start_call(("sig",))
    stored = [rt.unit("block", signature(c), lambda c=c: c * 2) for c in chunks]
    rt.end_call(plan, ("sig",))
    assert sorted(rt.cache.slot_view(0)) == ["block", "block#2", "block#3"]
    rt.set_step(1)
    plan = rt.start_call(("sig",))
    assert rt.mode == REUSE_MODE
    read = [rt.unit("block", signature(c), lambda: pytest.fail("computed on a reuse call")) for c in chunks]
    rt.end_call(plan, ("sig",))
    for got, want in zip(read, stored):
        assert got is want
    assert "unit_miss" not in rt.stats
