"""Each reuse policy against an independent plain-PyTorch statement of its definition
(tests/reference.py: hooks on an unpatched copy), step by step through a CFG DDIM loop."""
import copy

import pytest
import torch

import frkern
from reference import FRDiffHooks, SegmentHooks, ddim_loop, lam
from tiny import ddim, sd_inputs, sd_unet, sdxl_unet

# Relative L2 error of each step's UNet output. frkern (torch backend) and the references run the
# same ops in the same order; on CPU they agree bit for bit in both dtypes (seen: 0.0). The
# tolerances leave room for backends whose kernels pick algorithms by memory address.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
STEPS = 8


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(kind, dtype):
    unet = (sd_unet() if kind == "sd" else sdxl_unet()).to(dtype)
    return unet, copy.deepcopy(unet)


def patched_call(unet, handle, inputs):
    _, ehs, kw = inputs

    def call(i, x, t):
        handle.set_step(i)
        with torch.no_grad():
            return unet(x, t, torch.cat([ehs, ehs]) if ehs.shape[0] != x.shape[0] else ehs, **kw).sample

    return call


def latents_and_inputs(unet, dtype):
    sample, ehs, kw = sd_inputs(unet, batch=2, dtype=dtype)
    return sample[:1], (sample, ehs, kw)


def _bf16_once(cases, keep):
    """bf16 (CPU bf16 is slow) on one case by default, the rest in the extended tier."""
    return [c if c[1] is torch.float32 or c == keep else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("kind, dtype, interval, score_mix", _bf16_once(
    [(k, d, i, m) for k in ("sd", "sdxl") for d in (torch.float32, torch.bfloat16) for i, m in ((2, True), (3, False),
                                                                                               (2, False))],
    keep=("sd", torch.bfloat16, 2, True)))
def test_frdiff_matches_definition(kind, dtype, interval, score_mix):
    unet, ref_unet = make(kind, dtype)
    latents, inputs = latents_and_inputs(unet, dtype)
    _, ehs, kw = inputs
    hooks = FRDiffHooks(ref_unet)
    key_eps = {}

    def ref_call(i, x, t):
        keyframe = i % interval == 0
        m = 1.0 if keyframe or not score_mix else lam(i, STEPS)
        hooks.keyframe = keyframe
        if keyframe:
            with torch.no_grad():
                key_eps[0] = ref_unet(x, t, ehs, **kw).sample
            return key_eps[0]
        if m == 0.0:
            return key_eps[0]
        with torch.no_grad():
            fr = ref_unet(x, t, ehs, **kw).sample
        return (m * fr.float() + (1 - m) * key_eps[0].float()).to(dtype)

    handle = frkern.patch(unet, frkern.FRDiff(interval=interval, score_mix=score_mix), backend="torch")
    handle.begin(STEPS)
    x_ref, eps_ref = ddim_loop(ref_call, ddim(), latents, STEPS)
    x_got, eps_got = ddim_loop(patched_call(unet, handle, inputs), ddim(), latents, STEPS)
    for i, (a, b) in enumerate(zip(eps_got, eps_ref)):
        assert not torch.isnan(a).any()
        assert rel(a, b) <= TOL[dtype], f"step {i}: {rel(a, b)}"
    assert rel(x_got, x_ref) <= TOL[dtype]
    n_key = len(range(0, STEPS, interval))
    skips = sum(1 for i in range(STEPS) if i % interval and score_mix and lam(i, STEPS) == 0)
    assert handle.stats == {k: v for k, v in
                            {"full": n_key, "skip": skips, "reuse": STEPS - n_key - skips}.items() if v}
    # Reuse really changes the result, so the comparison above could not pass with reuse off.
    hooks.keyframe = True
    with torch.no_grad():
        x_full, _ = ddim_loop(lambda i, x, t: ref_unet(x, t, ehs, **kw).sample, ddim(), latents, STEPS)
    assert rel(x_got, x_full) > 10 * TOL[dtype]


@pytest.mark.parametrize("kind, dtype, clock", _bf16_once(
    [(k, d, c) for k in ("sd", "sdxl") for d in (torch.float32, torch.bfloat16) for c in (2, 3)],
    keep=("sd", torch.bfloat16, 2)))
def test_clockwork_matches_definition(kind, dtype, clock):
    unet, ref_unet = make(kind, dtype)
    latents, inputs = latents_and_inputs(unet, dtype)
    _, ehs, kw = inputs
    hooks = SegmentHooks(ref_unet, levels=1)

    def ref_call(i, x, t):
        hooks.keyframe = i % clock == 0
        with torch.no_grad():
            return ref_unet(x, t, ehs, **kw).sample

    handle = frkern.patch(unet, frkern.Clockwork(clock=clock), backend="torch")
    handle.begin(STEPS)
    x_ref, eps_ref = ddim_loop(ref_call, ddim(), latents, STEPS)
    x_got, eps_got = ddim_loop(patched_call(unet, handle, inputs), ddim(), latents, STEPS)
    for i, (a, b) in enumerate(zip(eps_got, eps_ref)):
        assert rel(a, b) <= TOL[dtype], f"step {i}: {rel(a, b)}"
    assert handle.stats["reuse"] == STEPS - len(range(0, STEPS, clock))


def test_clockwork_skips_inner_blocks_and_the_outer_downsampler():
    # Hooks on a convolution inside each block (a hook on a cached block itself runs on every call,
    # around the output the wrapper returns; one inside it runs only when the block computes).
    unet = sd_unet()
    calls = []
    for name in ("down_blocks.0.downsamplers.0.conv", "down_blocks.1.resnets.0.conv1", "mid_block.resnets.0.conv1",
                 "up_blocks.1.resnets.0.conv1", "up_blocks.2.resnets.0.conv1", "conv_in"):
        unet.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    handle = frkern.patch(unet, frkern.Clockwork(clock=2), backend="torch")
    sample, ehs, kw = sd_inputs(unet)
    handle.begin(2)
    with torch.no_grad():
        unet(sample, 10, ehs)
        assert len(calls) == 6
        calls.clear()
        handle.set_step(1)
        unet(sample, 5, ehs)
    assert sorted(calls) == ["conv_in", "up_blocks.2.resnets.0.conv1"]


def test_score_mixing_jump_steps_do_not_run_the_network(monkeypatch):
    unet = sd_unet()
    calls, mixes = [], []
    unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    blend = frkern.ops.score_mix
    monkeypatch.setattr(frkern.ops, "score_mix", lambda fr, key, mix, **kw: (mixes.append(mix), blend(fr, key, mix, **kw))[1])
    handle = frkern.patch(unet, frkern.FRDiff(interval=2, score_mix=True), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    handle.begin(10)
    outs = []
    with torch.no_grad():
        for i in range(10):
            handle.set_step(i)
            outs.append(unet(sample + i, 999 - 100 * i, ehs).sample)
    # steps 1 and 3: lambda = 0 -> the keyframe output, network not run
    assert len(calls) == 8
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[3], outs[2])
    assert outs[1] is not outs[0]  # a copy: the caller may change it in place
    assert handle.stats == {"full": 5, "skip": 2, "reuse": 3}
    # the blend runs on reuse steps only (and only where lambda < 1), never on jumps
    plans = handle.schedule(10)
    assert mixes == [p.mix for p in plans if not p.keyframe and 0 < p.mix < 1]
