"""Adaptive reuse (issue 11) against independent plain-PyTorch statements of its rules, step by
step through CFG sampling loops (DDIM and DPM-Solver++), and its contract with the rest of frkern."""
import copy
import json
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import frkern
from reference import FRDiffHooks, SegmentHooks, ddim_loop, lam
from test_pipelines import generate, rel
from tiny import ddim, make_sd_pipeline, sd_inputs, sd_prompt_kwargs, sd_unet

STEPS = 10


def dpmpp():
    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       algorithm_type="dpmsolver++", steps_offset=1)


SCHEDULERS = {"ddim": ddim, "dpm++": dpmpp}


class RuleStatement:
    """The decision rules as the issue states them, in fp64, from the gate input `g` of an
    unpatched UNet (a forward pre-hook): reuse iff past warm-up, fewer than max_reuse reuse calls
    in a row, and v < threshold, where per image r(a, b) = mean|a - b| / mean|b| and
    first_block: v = max_b r(g, g at the last full call);
    accumulated: v = acc + max(poly(max_b r(g, g at the previous call)), 0), acc reset on full calls."""

    def __init__(self, policy, on_decision):
        self.p, self.on_decision = policy, on_decision
        self.step, self.key, self.prev, self.acc, self.run = 0, None, None, 0.0, 0
        self.values, self.decisions = {}, []

    @staticmethod
    def r(a, b):
        a, b = a.double(), b.double()
        return max(((a[i] - b[i]).abs().mean() / b[i].abs().mean()).item() for i in range(a.shape[0]))

    def pre_hook(self, module, args, kwargs):
        # the first input, however the block is called (motion blocks pass ResNets input_tensor=)
        g = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        p = self.p
        reuse = False
        if self.step >= p.warmup and self.run < p.max_reuse and p.threshold > 0:
            if p.rule == "first_block":
                v = self.r(g, self.key)
            else:
                d = self.r(g, self.prev)
                v = self.acc + max(sum(c * d ** k for k, c in enumerate(reversed(p.poly))), 0.0)
            self.values[self.step] = v
            reuse = v < p.threshold
        if reuse:
            self.run += 1
            self.acc = v if p.rule == "accumulated" else 0.0
        else:
            self.run, self.acc, self.key = 0, 0.0, g.clone()
        self.prev = g.clone()
        self.decisions.append(reuse)
        self.on_decision(not reuse)


def gate_module(unet, reuse):
    # Independently of frkern's path logic: DeepCache branch 0 caches all of down_blocks[0], so its
    # indicator is conv_in's output; Clockwork (1 level) and unit reuse compute down_blocks[0]'s
    # layers and cache from its downsampler on.
    return unet.down_blocks[0] if reuse == "deepcache" else unet.down_blocks[0].downsamplers[0]


@pytest.mark.parametrize("sched, reuse, rule, threshold, poly, score_mix", [
    ("ddim", "clockwork", "first_block", 0.12, (1.0, 0.0), False),
    ("dpm++", "units", "first_block", 0.12, (1.0, 0.0), False),
    pytest.param("dpm++", "clockwork", "accumulated", 0.12, (3.0, 0.8, 0.0), False, marks=pytest.mark.slow),
    pytest.param("dpm++", "clockwork", "first_block", 0.12, (1.0, 0.0), True, marks=pytest.mark.slow),
    ("ddim", "units", "accumulated", 0.12, (3.0, 0.8, 0.0), True),
])
def test_decisions_and_outputs_match_the_rule_statement(sched, reuse, rule, threshold, poly, score_mix):
    unet = sd_unet()
    ref_unet = copy.deepcopy(unet)
    sample, ehs, _ = sd_inputs(unet, batch=4)  # CFG over a batch of 2 images
    latents = sample[:2]
    policy = frkern.Adaptive(threshold, rule=rule, reuse=reuse, warmup=2, max_reuse=2, poly=poly, score_mix=score_mix)

    hooks = SegmentHooks(ref_unet, levels=1) if reuse == "clockwork" else FirstBlockComputedHooks(ref_unet)
    statement = RuleStatement(policy, lambda keyframe: setattr(hooks, "keyframe", keyframe))
    gate_module(ref_unet, reuse).register_forward_pre_hook(statement.pre_hook, with_kwargs=True)
    key_eps = {}

    def ref_call(i, x, t):
        statement.step = i
        with torch.no_grad():
            eps = ref_unet(x, t, ehs).sample
        if not statement.decisions[-1]:
            key_eps[0] = eps
        elif score_mix:
            eps = lam(i, STEPS) * eps + (1 - lam(i, STEPS)) * key_eps[0]
        return eps

    handle = frkern.patch(unet, policy, backend="torch")
    handle.begin(STEPS)

    def call(i, x, t):
        handle.set_step(i)
        with torch.no_grad():
            return unet(x, t, ehs).sample

    _, eps_ref = ddim_loop(ref_call, SCHEDULERS[sched](), latents, STEPS)
    _, eps_got = ddim_loop(call, SCHEDULERS[sched](), latents, STEPS)
    for i, (a, b) in enumerate(zip(eps_got, eps_ref)):
        assert torch.isfinite(a).all()
        assert rel(a, b) <= 1e-6, f"step {i}: {rel(a, b)}"
    decisions = statement.decisions
    assert handle.stats["reuse"] == sum(decisions) and handle.stats["full"] == STEPS - sum(decisions)
    # the rule decided both ways (the test would not tell anything otherwise), not only at the cap
    assert 0 < sum(decisions) and any(not d for i, d in enumerate(decisions) if i >= 2 and statement.values.get(i, 0) >= threshold)
    got = handle.stats["indicator"]
    assert sorted(got) == sorted(statement.values)
    for i, v in statement.values.items():
        assert math.isclose(got[i], v, rel_tol=1e-5), (i, got[i], v)


class FirstBlockComputedHooks(FRDiffHooks):
    """FRDiff's unit reuse, except down_blocks[0]'s units, which always compute (the indicator)."""

    def _hook(self, name, module, args, out):
        return None if name.startswith("down_blocks.0.") else super()._hook(name, module, args, out)


def test_threshold_zero_is_full_compute_bit_for_bit():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs(batch=2)
    want = generate(pipe, prompt)
    for reuse in ("deepcache", "units"):
        handle = frkern.patch(pipe, frkern.Adaptive(0.0, reuse=reuse), backend="torch")
        assert torch.equal(generate(pipe, prompt), want)
        assert handle.stats["full"] == 8 and "reuse" not in handle.stats
        frkern.unpatch(pipe)


@pytest.mark.parametrize("sched, reuse, fixed, rule", [
    ("ddim", "deepcache", lambda n: frkern.DeepCache(n, 0), "first_block"),
    ("dpm++", "deepcache", lambda n: frkern.DeepCache(n, 0), "accumulated"),
    ("dpm++", "clockwork", lambda n: frkern.Clockwork(n), "first_block"),
    ("ddim", "clockwork", lambda n: frkern.Clockwork(n), "accumulated"),
])
def test_threshold_above_every_change_is_the_fixed_interval_with_the_longest_run(sched, reuse, fixed, rule):
    pipe = make_sd_pipeline(scheduler=SCHEDULERS[sched]())
    prompt = sd_prompt_kwargs(batch=2)
    frkern.patch(pipe, fixed(3), backend="torch")
    want = generate(pipe, prompt, steps=9)
    frkern.unpatch(pipe)
    handle = frkern.patch(pipe, frkern.Adaptive(1e9, rule=rule, reuse=reuse, max_reuse=2), backend="torch")
    got = generate(pipe, prompt, steps=9)
    assert torch.equal(got, want)
    assert handle.stats["full"] == 3 and handle.stats["reuse"] == 6 and handle.stats["forced"] == 2


def test_mid_threshold_in_a_pipeline_with_every_reuse_kind():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs(batch=2)
    want = generate(pipe, prompt, steps=10)
    for reuse in ("deepcache", "clockwork", "units"):
        handle = frkern.patch(pipe, frkern.Adaptive(0.3, reuse=reuse, max_reuse=4))
        got = generate(pipe, prompt, steps=10)
        assert torch.isfinite(got).all() and 0 < rel(got, want) < 0.5
        assert handle.stats["reuse"] > 0 and handle.stats["full"] >= 1
        frkern.unpatch(pipe)
    assert torch.equal(generate(pipe, prompt, steps=10), want)


def test_probe_does_not_compute_the_prefix_twice():
    unet = sd_unet()
    calls = []
    # (inside down_blocks.1, which the reuse call returns cached: a hook on the block itself runs
    # around every call of it)
    for name in ("conv_in", "down_blocks.0.resnets.0.conv2", "down_blocks.0.attentions.1",
                 "down_blocks.1.resnets.0.conv1", "up_blocks.2"):
        unet.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    handle = frkern.patch(unet, frkern.Adaptive(1e9, reuse="clockwork"), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    handle.begin(3)
    with torch.no_grad():
        unet(sample, 10, ehs)
        calls.clear()
        handle.set_step(1)
        unet(sample, 5, ehs)  # probe, then a reuse call
    assert sorted(calls) == ["conv_in", "down_blocks.0.attentions.1", "down_blocks.0.resnets.0.conv2", "up_blocks.2"]


def test_policy_round_trip_and_bad_arguments(tmp_path):
    p = frkern.Adaptive(0.2, rule="accumulated", reuse="units", warmup=3, max_reuse=5, poly=(0.5, 1.0, 0.0),
                        calibrated_for="tiny ddim 50", score_mix=True, bias=0.4)
    assert frkern.from_json(p.to_json()) == p
    frkern.save_policy(p, tmp_path / "a.json")
    assert frkern.load_policy(tmp_path / "a.json") == p
    assert json.loads(p.to_json())["poly"] == [0.5, 1.0, 0.0]
    for kwargs, match in [({"threshold": -1}, "threshold must be a finite number >= 0"),
                          ({"threshold": float("nan")}, "threshold"),
                          ({"rule": "teacache"}, "rule must be one of"),
                          ({"reuse": "segment"}, "reuse must be one of"),
                          ({"warmup": 0}, "warmup must be an int >= 1"),
                          ({"max_reuse": 0}, "max_reuse must be an int >= 1"),
                          ({"poly": ()}, "poly must be a non-empty"),
                          ({"poly": "1,0"}, "poly must be a sequence"),
                          ({"poly": (1.0, float("inf"))}, "finite")]:
        with pytest.raises(ValueError, match=match):
            frkern.Adaptive(**kwargs)
    with pytest.raises(ValueError, match="poly must be a JSON list"):
        frkern.from_json('{"policy": "Adaptive", "poly": 3}')


def test_a_cache_of_another_shape_is_never_compared():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.Adaptive(1e9, reuse="deepcache"), backend="torch")
    ref = copy.deepcopy(unet)
    frkern.unpatch(ref)
    handle.begin(4)
    with torch.no_grad():
        for i, size in enumerate((16, 16, 8, 8)):
            handle.set_step(i)
            sample, ehs, _ = sd_inputs(unet, batch=2, size=size, seed=i)
            out = unet(sample, 500, ehs).sample
            if i == 2:  # new shape: full compute, equal to the plain model
                assert torch.equal(out, ref(sample, 500, ehs).sample)
    assert handle.stats["promoted"] == 1 and handle.stats["reuse"] == 2


def test_unpatch_restores_every_module():
    unet = sd_unet()
    before = {n: type(m) for n, m in unet.named_modules()}
    for reuse in ("deepcache", "clockwork", "units"):
        frkern.patch(unet, frkern.Adaptive(0.1, reuse=reuse))
        frkern.unpatch(unet)
        assert {n: type(m) for n, m in unet.named_modules()} == before


@pytest.mark.parametrize("rule", ["accumulated"])  # the stateful rule; first_block's state is a plain unit
def test_cuda_graphs_equal_eager_with_probe_and_resume_graphs(rule):
    # Without CUDA: the emulated capture on the CPU, bit for bit. With CUDA: pipelines on the GPU,
    # the real capture, TF32 off, outputs within devices.GPU_GRAPH_RTOL and the same decisions (the
    # Triton backend under real capture: test_graphs.py::test_real_capture_adaptive_probe_equals_eager).
    from devices import assert_matches_eager, assert_same_stats, exact_fp32, graphed, to_device

    policy = frkern.Adaptive(0.3, rule=rule, reuse="clockwork", max_reuse=3)
    with exact_fp32():  # no-op without CUDA
        eager_pipe, prompt = to_device(make_sd_pipeline(), sd_prompt_kwargs())
        eager = frkern.patch(eager_pipe, policy, backend="torch")
        want = generate(eager_pipe, prompt, steps=10)
        pipe, prompt = to_device(make_sd_pipeline(), sd_prompt_kwargs())
        handle = graphed(pipe, policy, backend="torch")
        for generation in range(2):
            assert_matches_eager(generate(pipe, prompt, steps=10), want, f"generation {generation}")
            assert_same_stats(handle.stats, eager.stats)
    assert eager.stats["reuse"] > 0 and eager.stats["full"] > 1
    gs = handle.graph_stats
    # step 0 (plain full), probe, full after a probe, reuse after a probe: captured once each
    assert gs["captures"] == 4
    probes = 2 * (10 - 1)  # every call after the warm-up step probes, except those at the reuse cap
    probes -= 2 * eager.stats.get("forced", 0)
    assert gs["replays"] == 2 * (eager.stats["full"] + eager.stats["reuse"]) + probes


@pytest.mark.slow
def test_compiled_adaptive_does_not_recompile_from_step_to_step():
    # What must hold in any torch version (not a version's graph count): after the first generation,
    # which compiles whatever each step kind needs (the probe's stop is a graph break by design),
    # later generations compile nothing (error_on_recompile raises on a recompile, and no new
    # frame is compiled either).
    import torch._dynamo
    from torch._dynamo.utils import counters

    pipe, prompt = make_sd_pipeline(), sd_prompt_kwargs()
    handle = frkern.patch(pipe, frkern.Adaptive(0.3, rule="accumulated", reuse="units", max_reuse=3), backend="torch")
    eager = generate(pipe, prompt, steps=10)
    eager_stats = handle.stats
    assert eager_stats["reuse"] > 0 and eager_stats["full"] > 1
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    for generation in range(3):
        with torch._dynamo.config.patch(error_on_recompile=generation > 0):
            assert torch.equal(generate(pipe, prompt, steps=10), eager), f"generation {generation}"
        assert handle.stats == eager_stats
        if generation == 0:
            first = counters["stats"]["unique_graphs"]
            assert first > 0
    assert counters["stats"]["unique_graphs"] == first, "compiled again in steady state"


def test_calibration_fits_the_output_change_and_round_trips():
    import numpy as np

    from frkern.calibration import calibrate

    pipe, prompt = make_sd_pipeline(), sd_prompt_kwargs(batch=2)
    policy = calibrate(pipe, frkern.Adaptive(0.2, reuse="clockwork"), lambda: generate(pipe, prompt, steps=8),
                       degree=2, note="tiny test")
    # independent record: the gate input (down_blocks[0]'s output) and the UNet output per call
    gs, outs = [], []
    h1 = pipe.unet.down_blocks[0].downsamplers[0].register_forward_pre_hook(lambda m, a: gs.append(a[0].double()))
    h2 = pipe.unet.register_forward_hook(lambda m, a, o: outs.append(o[0].double()))
    generate(pipe, prompt, steps=8)
    h1.remove(), h2.remove()

    def r(a, b):
        return max(((a[i] - b[i]).abs().mean() / b[i].abs().mean()).item() for i in range(a.shape[0]))

    d = [r(gs[i], gs[i - 1]) for i in range(1, len(gs))]
    o = [r(outs[i], outs[i - 1]) for i in range(1, len(outs))]
    np.testing.assert_allclose(policy.poly, np.polyfit(d, o, 2), rtol=1e-4, atol=1e-6)
    assert policy.rule == "accumulated" and policy.calibrated_for == "tiny test" and policy.threshold == 0.2
    assert frkern.from_json(policy.to_json()) == policy
    handle = frkern.patch(pipe, policy)  # and it runs
    generate(pipe, prompt, steps=8)
    assert handle.stats["full"] + handle.stats.get("reuse", 0) == 8
    frkern.unpatch(pipe)
    frkern.patch(pipe, policy)
    with pytest.raises(RuntimeError, match="patched"):
        calibrate(pipe, policy, lambda: None)


def test_probe_with_a_per_call_lora_scale_stays_exact():
    """The probe stops the UNet forward by an exception; diffusers must still unscale the LoRA layers,
    or every later call would run with the scale applied twice."""
    peft = pytest.importorskip("peft")
    unet = sd_unet()
    torch.manual_seed(7)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "to_q", "proj_in"],
                                     init_lora_weights=False))
    fixed = copy.deepcopy(unet)
    sample, ehs, _ = sd_inputs(unet, batch=2)
    lora = {"cross_attention_kwargs": {"scale": 0.5}}
    with torch.no_grad():
        plain = unet(sample, 500, ehs, **lora).sample
    handle = frkern.patch(unet, frkern.Adaptive(1e9, reuse="clockwork", max_reuse=2), backend="torch")
    fixed_handle = frkern.patch(fixed, frkern.Clockwork(3), backend="torch")
    handle.begin(6), fixed_handle.begin(6)
    with torch.no_grad():
        for i in range(6):
            handle.set_step(i), fixed_handle.set_step(i)
            x = sample + 0.05 * i
            assert torch.equal(unet(x, 900 - 100 * i, ehs, **lora).sample, fixed(x, 900 - 100 * i, ehs, **lora).sample), i
    assert handle.stats["reuse"] == 4
    frkern.unpatch(unet)
    with torch.no_grad():
        assert torch.equal(unet(sample, 500, ehs, **lora).sample, plain)


def test_a_step_of_two_calls_reports_the_larger_measure():
    """CFG run as two calls per step: the step's indicator is the larger of the two calls' values
    (as one batched call reports the largest over its images); device tensors stay on the device."""
    from frkern.runtime import Runtime

    rt = Runtime(frkern.Adaptive(0.1), torch.nn.Linear(1, 1))
    rt.step = 3
    rt.measure("indicator", 0.02)
    rt.measure("indicator", 0.05)
    rt.measure("indicator", 0.01)
    rt.measure("active_fraction", torch.tensor(0.5))
    rt.measure("active_fraction", torch.tensor(0.25))
    rt.step = 4
    rt.measure("indicator", 0.03)
    assert rt.measures["indicator"] == {3: 0.05, 4: 0.03}
    frac = rt.measures["active_fraction"][3]
    assert isinstance(frac, torch.Tensor) and frac.item() == 0.5
