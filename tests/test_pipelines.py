"""Real diffusers pipelines (tiny random components, prompt embeddings passed in), end to end."""
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

import frkern
from tiny import make_sd_pipeline, make_sdxl_pipeline, sd_prompt_kwargs, sdxl_prompt_kwargs

POLICIES = [frkern.NoReuse(), frkern.FRDiff(2), frkern.FRDiff(3, score_mix=False), frkern.Clockwork(2),
            frkern.DeepCache(3)]
KINDS = {"sd": (make_sd_pipeline, sd_prompt_kwargs), "sdxl": (make_sdxl_pipeline, sdxl_prompt_kwargs)}


def generate(pipe, prompt, steps=8, seed=0, size=32, output_type="latent", **kw):
    return pipe(**prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                height=size, width=size, output_type=output_type, **kw).images


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])  # sdxl: extended tier
def test_every_policy_end_to_end(kind):
    make, prompt_kwargs = KINDS[kind]
    pipe = make()
    prompt = prompt_kwargs()
    ref_images = generate(pipe, prompt, output_type="np")
    ref = generate(pipe, prompt)
    for policy in POLICIES:
        handle = frkern.patch(pipe, policy)
        images = generate(pipe, prompt, output_type="np")
        assert images.shape == ref_images.shape and np.isfinite(images).all()
        out = generate(pipe, prompt)
        if isinstance(policy, frkern.NoReuse):
            assert torch.equal(out, ref) and np.array_equal(images, ref_images)
        else:
            assert 0 < rel(out, ref) < 0.5, policy  # reuse changes the result, but not wildly
            assert handle.stats.get("reuse", 0) + handle.stats.get("skip", 0) > 0
        frkern.unpatch(pipe)
    assert torch.equal(generate(pipe, prompt), ref)


@pytest.mark.parametrize("kind, interval, branch", [("sd", 3, 0), ("sd", 2, 1), ("sd", 4, 3), ("sdxl", 3, 0),
                                                    *[pytest.param("sdxl", i, b, marks=pytest.mark.slow)
                                                      for i, b in ((2, 1), (4, 3))]])
def test_deepcache_matches_the_deepcache_package(kind, interval, branch):
    from DeepCache import DeepCacheSDHelper

    make, prompt_kwargs = KINDS[kind]
    pipe = make()
    prompt = prompt_kwargs()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    theirs = generate(pipe, prompt, steps=10)
    helper.disable()
    full = generate(pipe, prompt, steps=10)
    handle = frkern.patch(pipe, frkern.DeepCache(interval=interval, branch=branch), backend="torch")
    ours = generate(pipe, prompt, steps=10)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, full)
    assert handle.stats["full"] == len(range(0, 10, interval))
    frkern.unpatch(pipe)


SCHEDULERS = {
    "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler, "heun": HeunDiscreteScheduler,
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_are_tracked(name):
    pipe = make_sd_pipeline()
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if name == "pndm":
        cfg["skip_prk_steps"] = True
    pipe.scheduler = SCHEDULERS[name](**cfg)
    prompt = sd_prompt_kwargs()
    ref = generate(pipe, prompt, steps=6)
    handle = frkern.patch(pipe, frkern.NoReuse())
    seen = []
    start = handle.runtime.start_call
    handle.runtime.start_call = lambda sig: (seen.append((handle.runtime.step, handle.runtime.slot)), start(sig))[1]
    out = generate(pipe, prompt, steps=6)
    assert torch.equal(out, ref)
    steps = [s for s, _ in seen]
    assert handle.runtime.num_steps == 6
    if name == "heun":  # two evaluations per step share the step index (slots 0 and 1)
        assert seen == [(i // 2, i % 2) for i in range(11)]
    elif name == "pndm":  # PLMS evaluates once more than it has steps
        assert steps == list(range(7))
    else:
        assert seen == [(i, 0) for i in range(6)]

    frkern.unpatch(pipe)
    frkern.patch(pipe, frkern.FRDiff(2, score_mix=False))
    out = generate(pipe, prompt, steps=6)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    frkern.unpatch(pipe)


def _compatible_schedulers():
    import diffusers

    names = {c.__name__ for c in make_sd_pipeline().scheduler.compatibles}
    names |= {"LCMScheduler", "TCDScheduler", "SASolverScheduler", "EDMEulerScheduler",
              "EDMDPMSolverMultistepScheduler", "IPNDMScheduler"}
    out = []
    for name in sorted(names):
        cls = getattr(diffusers, name, None)
        needs = getattr(cls, "_backends", ())
        if cls is not None and "torchsde" not in needs:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _compatible_schedulers())
def test_every_scheduler_is_tracked_step_by_step(name):
    """Every scheduler an SD pipeline can take (diffusers' `compatibles`, plus the consistency-model,
    EDM and SA-Solver ones): NoReuse gives the plain pipeline's latents bit for bit, and DeepCache's
    calls are tracked to the steps they belong to: 0 .. n-1 in order, each step reached, the
    scheduler's extra evaluations (Heun/KDPM2's second, PLMS's warm-up) in the step they serve,
    nothing untracked, and a second generation repeats the first."""
    import diffusers

    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = make_sd_pipeline()
    pipe.scheduler = getattr(diffusers, name).from_config(dict(pipe.scheduler.config, **cfg))
    prompt, steps = sd_prompt_kwargs(), 7
    plain = generate(pipe, prompt, steps=steps)
    handle = frkern.patch(pipe, frkern.NoReuse())
    assert torch.equal(generate(pipe, prompt, steps=steps), plain)
    frkern.unpatch(pipe)

    handle = frkern.patch(pipe, frkern.DeepCache(interval=3))
    seen = []
    start = handle.runtime.start_call
    handle.runtime.start_call = lambda sig: (seen.append(handle.runtime.step), start(sig))[1]
    first = generate(pipe, prompt, steps=steps)
    assert handle.runtime.num_steps == steps
    # PNDM's Runge-Kutta warm-up (skip_prk_steps=False) steps after each of its evaluations: each
    # counts as a step, one per entry of its timesteps (README, Using it)
    counted = len(pipe.scheduler.timesteps) if name == "PNDMScheduler" else steps
    assert seen == sorted(seen) and sorted(set(seen)) == list(range(counted)), seen
    stats = handle.stats
    assert "untracked" not in stats and stats["reuse"] > 0 and torch.isfinite(first).all(), stats
    assert torch.equal(generate(pipe, prompt, steps=steps), first) and handle.stats == stats
