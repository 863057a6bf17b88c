"""frkern.EncoderPropagation(prior_noise=...) (Faster Diffusion's prior noise injection) against the
independent statement of tests/reference_prior_noise.py: the encoder-propagation hook statement on
the UNet plus the injection on the scheduler instance, on a deep copy of the pipeline, bit for bit
(torch backend); DDIM with two generations, PLMS without CFG, DPM-Solver++; parallel decoding;
the default (off); validation and JSON.

Tiny SD pipeline, 32x32, latents out. Key steps: interval 3 (UNet calls 0, 3, 6, 9).

Bit for bit means the injected step input is computed as ``sample + scale * z`` (the product rounded
to the sample's dtype, then the sum), as the authors write it: a fused multiply-add (e.g.
``sample.add(z, alpha=scale)``) rounds once and differs in the last bit (rel ~2e-8 here), which these
tests report as a difference."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

import frkern
from reference_prior_noise import AUTHORS_BELOW, AUTHORS_SCALE, statement_on_a_copy
from test_pipelines import generate, rel
from tiny import ddim, make_sd_pipeline, sd_prompt_kwargs

INTERVAL = 3
SEEDS = (31, 32)  # latents of the first and the second generation
PROMPT_SEED = 7
SCHED_CFG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

# name -> (scheduler, inference steps, pipeline kwargs, injected[i] for the i-th scheduler.step call).
# The injection pattern is written out from each schedule (t < 500, strictly), independently of the
# statement's own record, so a statement that injected at the wrong steps would fail here too.
CASES = {
    # DDIM-10: 901 801 701 601 501 | 401 301 201 101 1 (501 just above the threshold)
    "ddim": (ddim, 10, {}, [False] * 5 + [True] * 5),
    # PLMS-9 evaluates 10 times: 889 778 778 667 556 | 445 334 223 112 1 (the repeated timestep
    # gets a step call of its own); no CFG (batch-1 UNet calls)
    "pndm": (lambda: PNDMScheduler(skip_prk_steps=True, **SCHED_CFG), 9, dict(guidance_scale=1.0),
             [False] * 5 + [True] * 5),
    # DPM-Solver++(2M)-10: 999 899 799 699 599 500 | 400 300 200 100: t = 500 is not below 500
    "dpm": (lambda: DPMSolverMultistepScheduler(**SCHED_CFG), 10, {}, [False] * 6 + [True] * 4),
}


def _is_key(i: int) -> bool:
    return i % INTERVAL == 0


def _pipe(case):
    # deterministic: tiny's components are built from fixed seeds
    return make_sd_pipeline(scheduler=CASES[case][0]())


def _run(pipe, case, seed):
    _, steps, kw, _ = CASES[case]
    return generate(pipe, sd_prompt_kwargs(seed=PROMPT_SEED), steps=steps, seed=seed, **kw)


@functools.lru_cache(maxsize=None)
def _statement(case, scale, seeds, below=AUTHORS_BELOW):
    """The statement's latents for consecutive generations (one per seed) on one deep copy of a fresh
    pipeline, with the per-generation injection record and UNet sample inputs. Cached: several tests
    compare against the same run."""
    st = statement_on_a_copy(_pipe(case), _is_key, scale, below)
    inputs = []

    def record(module, args, kwargs):
        inputs[-1].append((args[0] if args else kwargs["sample"]).clone())

    hook = st.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    outs = []
    for seed in seeds:
        inputs.append([])
        outs.append(_run(st.pipe, case, seed))
    hook.remove()
    injected = None if st.injection is None else [st.injection.injected(g) for g in range(len(seeds))]
    assert st.keys == [[_is_key(i) for i in range(len(st.keys[0]))]] * len(seeds)
    st.remove()
    return outs, injected, inputs


def _patched(case, **policy_kw):
    pipe = _pipe(case)
    handle = frkern.patch(pipe, frkern.EncoderPropagation(interval=INTERVAL, **policy_kw), backend="torch")
    return pipe, handle


def _assert_stats(handle, case):
    calls = len(CASES[case][3])
    full = len([i for i in range(calls) if _is_key(i)])
    assert (handle.stats["full"], handle.stats["reuse"]) == (full, calls - full), handle.stats


def test_off_by_default():
    """frkern's default (prior_noise 0: off) equals the plain encoder-propagation hook statement (no
    scheduler wrapper at all) bit for bit. (The statement with a zero-scale injection also equals
    it bit for bit; that is a check of the statement, run when it was written, not repeated here.)"""
    assert frkern.EncoderPropagation(interval=INTERVAL).prior_noise == 0.0
    plain, _, _ = _statement("ddim", None, SEEDS[:1])
    pipe, handle = _patched("ddim")
    got = _run(pipe, "ddim", SEEDS[0])
    _assert_stats(handle, "ddim")
    frkern.unpatch(pipe)
    assert torch.isfinite(got).all() and torch.equal(got, plain[0])


def test_ddim_equals_the_statement_and_a_second_generation_rearms_z():
    """DDIM with CFG, the authors' scale 0.003: two generations on one patched pipeline (seeds 31,
    then 32) each equal the statement bit for bit; the second one's z is its own initial latents,
    not the first generation's (the statement re-arms at set_timesteps, and a stale z differs). The
    UNet sees exactly the statement's inputs at every call (the injection never reaches it)."""
    pipe, handle = _patched("ddim", prior_noise=AUTHORS_SCALE)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["sample"]).clone()), with_kwargs=True)
    got = []
    for seed in SEEDS:
        got.append(_run(pipe, "ddim", seed))
        _assert_stats(handle, "ddim")
    hook.remove()
    frkern.unpatch(pipe)
    want, injected, inputs = _statement("ddim", AUTHORS_SCALE, SEEDS)
    assert injected == [CASES["ddim"][3]] * 2 and sum(injected[0]) == 5
    for g, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all() and torch.equal(a, b), f"generation {g}: rel {rel(a, b):.3g}"
    flat = [x for gen in inputs for x in gen]
    assert len(seen) == len(flat) == 20 and all(torch.equal(a, b) for a, b in zip(seen, flat))
    # non-vacuous: the injection changes the result (rel ~2e-3 here)
    off, _, _ = _statement("ddim", None, SEEDS[:1])
    assert not torch.equal(want[0], off[0]) and rel(want[0], off[0]) > 1e-4


@pytest.mark.parametrize("case", ["pndm", "dpm"])
def test_plms_and_dpm_solver_equal_the_statement(case):
    """PLMS (10 step calls for 9 steps, a repeated timestep; no CFG) and a multistep solver that keeps
    earlier model outputs: frkern equals the statement bit for bit."""
    pipe, handle = _patched(case, prior_noise=AUTHORS_SCALE)
    got = _run(pipe, case, SEEDS[0])
    _assert_stats(handle, case)
    frkern.unpatch(pipe)
    want, injected, _ = _statement(case, AUTHORS_SCALE, SEEDS[:1])
    assert injected == [CASES[case][3]]
    assert torch.isfinite(got).all() and torch.equal(got, want[0]), rel(got, want[0])


def test_parallel_decoding_equals_the_sequential_form():
    """parallel=3 (the non-key runs [1, 2], [4, 5], [7, 8] decoded at once) with prior_noise=0.05
    equals the sequential statement within rel 1e-5: batching three decoder passes into one UNet
    call changes only fp32 rounding of the batched matmuls (as in test_encoder_propagation), while
    the injection itself moves the result by ~3e-2, far above that bound."""
    pipe, handle = _patched("ddim", prior_noise=0.05, parallel=3)
    got = _run(pipe, "ddim", SEEDS[0])
    stats = dict(handle.stats)
    frkern.unpatch(pipe)
    assert stats.get("decoded_ahead", 0) > 0, stats  # parallel decoding did happen
    want, injected, _ = _statement("ddim", 0.05, SEEDS[:1])
    off, _, _ = _statement("ddim", None, SEEDS[:1])
    assert injected == [CASES["ddim"][3]]
    assert torch.isfinite(got).all() and rel(got, want[0]) <= 1e-5, rel(got, want[0])
    assert rel(want[0], off[0]) > 1e-2 and rel(got, off[0]) > 1e-2


def test_validation_and_json():
    p = frkern.EncoderPropagation()
    assert p.prior_noise == 0.0 and p.prior_noise_below == 500
    for p in [frkern.EncoderPropagation(interval=3, prior_noise=0.003),
              frkern.EncoderPropagation(key_steps=(0, 2, 5), parallel=2, prior_noise=0.05, prior_noise_below=250.5),
              frkern.EncoderPropagation(prior_noise_below=700)]:
        back = frkern.from_json(p.to_json())
        assert back == p and (back.prior_noise, back.prior_noise_below) == (p.prior_noise, p.prior_noise_below)
    # the fields take part in equality (so the round trips above say something)
    assert frkern.EncoderPropagation(interval=3, prior_noise=0.003) != frkern.EncoderPropagation(interval=3)
    assert frkern.EncoderPropagation(prior_noise=0.003, prior_noise_below=400) != \
        frkern.EncoderPropagation(prior_noise=0.003)
    bad = [-0.001, -1.0, math.nan, math.inf, -math.inf, True, False, "0.003", None]
    for value in bad:
        with pytest.raises(ValueError, match=r"prior_noise\b"):
            frkern.EncoderPropagation(interval=3, prior_noise=value)
    for value in [0, 0.0, -1, -500.0, math.nan, math.inf, True, "500", None]:
        with pytest.raises(ValueError, match=r"prior_noise_below"):
            frkern.EncoderPropagation(interval=3, prior_noise=0.003, prior_noise_below=value)


def test_a_hand_written_loop_is_warned_and_can_inject_itself():
    """No tracked scheduler step: begin() says the injection is not added, and step_sample adds it
    where the loop asks (z = the first sample it is given, added at t < below only)."""
    from tiny import sd_unet

    unet = sd_unet()
    handle = frkern.patch(unet, frkern.EncoderPropagation(interval=2, prior_noise=0.5), backend="torch")
    with pytest.warns(UserWarning, match="prior noise injection is added by a tracked pipeline"):
        handle.begin(4)
    z = torch.randn(1, 4, 8, 8)
    rt = handle.runtime
    assert torch.equal(rt.step_sample(900, z), z)  # t >= 500: nothing; z recorded
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(rt.step_sample(torch.tensor(400), x), x + 0.5 * z)
    handle.reset()  # drops cached features; the generation's z stays (it is no cached feature)
    assert torch.equal(rt.step_sample(torch.tensor(400), x), x + 0.5 * z)
    frkern.unpatch(unet)


def test_two_pipelines_sharing_a_scheduler_each_inject_their_own_generation():
    """Two UNets patched with prior noise behind one scheduler: a generation of one pipeline calls
    that pipeline's model alone, so it injects once, as the statement."""
    from diffusers import StableDiffusionPipeline

    pipe_a = _pipe("ddim")
    pipe_b = StableDiffusionPipeline(**dict(pipe_a.components, unet=copy.deepcopy(pipe_a.unet)))
    policy = frkern.EncoderPropagation(interval=INTERVAL, prior_noise=AUTHORS_SCALE)
    frkern.patch(pipe_a, policy, backend="torch")
    frkern.patch(pipe_b, policy, backend="torch")
    want, _, _ = _statement("ddim", AUTHORS_SCALE, SEEDS)
    assert torch.equal(_run(pipe_b, "ddim", SEEDS[0]), want[0])
    assert torch.equal(_run(pipe_a, "ddim", SEEDS[0]), want[0])
    frkern.unpatch(pipe_a)
    frkern.unpatch(pipe_b)


def test_refused_on_svd():
    """SVD's scheduler passes continuous noise levels, not DDPM timesteps: t < 500 would hold at
    every step. Refused, naming why; the model is left as it was."""
    from tiny_video import svd_unet

    unet = svd_unet()
    with pytest.raises(ValueError, match="prior_noise is defined on DDPM-style timesteps"):
        frkern.patch(unet, frkern.EncoderPropagation(interval=2, prior_noise=0.003))
    assert frkern.handle_of(unet) is None
    frkern.patch(unet, frkern.EncoderPropagation(interval=2))  # without it: fine
    frkern.unpatch(unet)
