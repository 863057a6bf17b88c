"""Auto-FR: gates get gradients, the penalty turns gates off, gated sampling matches the definition,
its samplers are the diffusers pipeline loop for every supported scheduler, failures leave the model
as it was, saved policies reload."""
import copy

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2DiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

import frkern
from frkern import autofr
from reference import FRDiffHooks
from tiny import ddim, make_sd_pipeline, sd_unet

STEPS = 4
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SCHEDULERS = {
    "ddim": ddim,
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2),
    "euler": lambda: EulerDiscreteScheduler(**SD_BETAS),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(**SD_BETAS),
    "unipc": lambda: UniPCMultistepScheduler(**SD_BETAS),
}
START = frkern.Keyframes(keyframes=(0, 2), num_steps=STEPS, jumps=(1,))  # a keyframe, a jump, a reuse step


def conditions(unet, batch=1):
    def draw(g):
        noise = torch.randn(batch, 4, 8, 8, generator=g)
        ehs = torch.randn(2 * batch, 5, unet.config.cross_attention_dim, generator=g)
        return noise, ehs, {}
    return draw


def _diffusers_loop(unet_call, factory, noise, guidance=3.0):
    """StableDiffusionPipeline's denoising loop for a scheduler without step noise, written out;
    unet_call(i, x_in, t) -> eps of the CFG batch [uncond; cond]."""
    sch = factory()
    sch.set_timesteps(STEPS)
    x = noise * sch.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            eps = unet_call(i, sch.scale_model_input(torch.cat([x, x]), t), t)
            u, c = eps.chunk(2)
            x = sch.step(u + guidance * (c - u), t, x, return_dict=False)[0]
    return x


def test_gated_sampler_with_hard_gates_is_feature_reuse():
    """a = (1, 0, 1, 0): the gated sampler equals FRDiff with keyframes {0, 2} (no score mixing),
    stated independently with hooks on an unpatched copy."""
    unet = sd_unet()
    ref_unet = copy.deepcopy(unet)
    noise, ehs, kw = conditions(unet)(torch.Generator().manual_seed(0))
    gates = [torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0)]
    handle = frkern.patch(unet, frkern.FRDiff(interval=1, score_mix=False), backend="torch")
    with torch.no_grad():
        x = autofr.sample_gated(handle, ddim, noise, ehs, kw, STEPS, 3.0, gates, use_checkpoint=False)
    frkern.unpatch(unet)

    hooks = FRDiffHooks(ref_unet)

    def call(i, x_in, t):
        hooks.keyframe = i in (0, 2)
        return ref_unet(x_in, t, ehs).sample

    xr = _diffusers_loop(call, ddim, noise)
    torch.testing.assert_close(x, xr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc", "euler_a"])
def test_gates_receive_gradients_and_checkpointing_agrees(name):
    """Checkpointing recomputes only the network and the blend: a multistep scheduler's state moves on
    once per step, and the gradients equal those without checkpointing (issue 23.4)."""
    factory = SCHEDULERS[name]
    unet = sd_unet().requires_grad_(False)
    noise, ehs, kw = conditions(unet)(torch.Generator().manual_seed(1))
    handle = frkern.patch(unet, frkern.FRDiff(interval=1, score_mix=False), backend="torch")
    x_ref = autofr.sample_full(handle, factory, noise, ehs, kw, STEPS, 3.0, autofr.step_generator(1))
    grads = []
    for ckpt in (False, True):
        logits = torch.tensor([0.1, -0.1, 0.1], requires_grad=True)
        x = autofr.sample_gated(handle, factory, noise, ehs, kw, STEPS, 3.0, autofr.straight_through(logits), ckpt,
                                generator=autofr.step_generator(1))
        torch.nn.functional.mse_loss(x, x_ref).backward()
        assert torch.isfinite(logits.grad).all() and (logits.grad != 0).any()
        grads.append(logits.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-9)
    frkern.unpatch(unet)


def test_penalty_drives_gates_off_as_w_grows():
    unet = sd_unet()
    n_key = {}
    for w in (0.0, 10.0):
        res = autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=8, lr=0.1, penalty=w, progress=False)
        n_key[w] = len(res.policy.keyframes)
        assert len(res.history) == 8 and res.policy.num_steps == STEPS and res.policy.keyframes[0] == 0
    assert n_key[10.0] < n_key[0.0]
    assert n_key[10.0] == 1  # only the always-computed step 0 survives a large penalty
    # the model is given back unpatched, frozen state restored, in eval mode
    assert getattr(unet, "_frkern_handle", None) is None and all(p.requires_grad for p in unet.parameters())


def test_search_is_deterministic_with_a_seed():
    unet = sd_unet()
    a = autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=3, lr=0.1, penalty=1.0, seed=4, progress=False)
    b = autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=3, lr=0.1, penalty=1.0, seed=4, progress=False)
    assert a.gate_probs == b.gate_probs and a.policy == b.policy


def test_searched_policy_saves_reloads_and_drives_a_patch(tmp_path):
    policy = frkern.Keyframes(keyframes=(0, 2, 3), num_steps=5)
    path = tmp_path / "autofr.json"
    frkern.save_policy(policy, path)
    loaded = frkern.load_policy(path)
    assert loaded == policy
    assert [p.keyframe for p in loaded.schedule(5)] == [True, False, True, True, False]
    unet = sd_unet()
    handle = frkern.patch(unet, loaded, backend="torch")
    handle.begin(5)
    x = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 5, 32)
    with torch.no_grad():
        for i in range(5):
            handle.set_step(i)
            unet(x, 900 - 100 * i, ehs)
    assert handle.stats == {"full": 3, "reuse": 2}


@pytest.mark.parametrize("text, match", [("not json", "does not parse"), ('{"policy": "Keyframes", "keyframes": [0, -1]}', "keyframe"),
                                         ('{"policy": "Keyframes", "keyframes": [0, 1], "num_steps": 1}', "outside")])
def test_bad_policy_files(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        frkern.load_policy(path)


def test_gated_sampler_with_jumps_equals_the_keyframes_policy_with_jumps():
    """a = (0, 1, 0), b = (0, -, 1): step 1 is a jump (the keyframe's output), step 2 a keyframe,
    step 3 feature reuse; the runtime's Keyframes(jumps=...) runs the same schedule."""
    unet = sd_unet()
    noise, ehs, kw = conditions(unet)(torch.Generator().manual_seed(3))
    handle = frkern.patch(unet, frkern.FRDiff(interval=1, score_mix=False), backend="torch")
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    with torch.no_grad():
        x = autofr.sample_gated(handle, ddim, noise, ehs, kw, STEPS, 3.0, [zero, one, zero], use_checkpoint=False,
                                reuse_gates=[zero, one, one])
    frkern.unpatch(unet)

    policy = frkern.Keyframes(keyframes=(0, 2), num_steps=STEPS, jumps=(1,))
    handle = frkern.patch(unet, policy, backend="torch")
    handle.begin(STEPS)

    def call(i, x_in, t):
        handle.set_step(i)
        return unet(x_in, t, ehs).sample

    xr = _diffusers_loop(call, ddim, noise)
    assert handle.stats == {"full": 2, "skip": 1, "reuse": 1}
    torch.testing.assert_close(x, xr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("validate", [False, True])
def test_search_with_jumps_keeps_the_best_iterate(validate):
    unet = sd_unet()
    res = autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=4, lr=0.5, penalty=0.05, seed=2,
                        jumps=True, progress=False, validate=validate)
    best = min(range(4), key=lambda k: res.history[k]["val_loss" if validate else "hard_loss"])
    assert res.best_iter == best
    h = res.history[best]
    assert len(res.policy.keyframes) == h["keyframes"] and len(res.policy.jumps) == h["jumps"]
    assert len(res.reuse_probs) == STEPS - 1 and frkern.from_json(res.policy.to_json()) == res.policy
    with pytest.raises(ValueError, match="both keyframes and jumps"):
        frkern.Keyframes(keyframes=(0, 2), jumps=(2,))


def test_hard_schedule_of_frdiff_with_score_mixing():
    """Keyframes every M; non-keyframes jump where FRDiff's lambda (stated here from REFERENCE §1.2:
    clip((30 (t/N - 1/2) + 2) / 4, 0, 1)) is below 1/2, else reuse."""
    n, m = 50, 3
    keys, jumps = autofr.hard_schedule(frkern.FRDiff(m, score_mix=True), n)
    lam = [min(1.0, max(0.0, (30 * (t / n - 0.5) + 2) / 4)) for t in range(n)]
    assert keys == tuple(range(0, n, m))
    assert jumps == tuple(t for t in range(n) if t % m and lam[t] < 0.5)
    assert autofr.hard_schedule(frkern.FRDiff(m, score_mix=False), n) == (tuple(range(0, n, m)), ())
    pol = frkern.Keyframes(keyframes=(0, 3), num_steps=6, jumps=(1, 5))
    assert autofr.hard_schedule(pol, 6) == ((0, 3), (1, 5))
    with pytest.raises(ValueError, match="feature-reuse policy"):
        autofr.hard_schedule(frkern.DeepCache(2), n)


def _pipeline_latents(unet, factory, policy, noise, ehs, generator=None, eta=0.0, guidance=3.0):
    """A real StableDiffusionPipeline's final latents from `noise`, ehs = [negative; prompt], run with
    frkern and `policy` (None: without frkern), and frkern's call stats."""
    b = noise.shape[0]
    pipe = make_sd_pipeline(unet=unet, scheduler=factory())
    handle = frkern.patch(pipe, policy, backend="torch") if policy is not None else None
    size = noise.shape[-1] * pipe.vae_scale_factor
    try:
        with torch.no_grad():
            out = pipe(prompt_embeds=ehs[b:], negative_prompt_embeds=ehs[:b], latents=noise.clone(),
                       guidance_scale=guidance, num_inference_steps=STEPS, output_type="latent",
                       generator=generator, eta=eta, height=size, width=size).images
    finally:
        if handle is not None:
            frkern.unpatch(pipe)
    return out, (handle.stats if handle is not None else None)


def _rel_mse(x, ref):
    return (torch.nn.functional.mse_loss(x, ref) / ref.pow(2).mean()).item()


def _rel_mse_through_the_runtime(unet, policy, noise, ehs):
    """The policy run by frkern's runtime in a DDIM pipeline (not the gated sampler), against the
    pipeline without frkern."""
    full, _ = _pipeline_latents(unet, ddim, None, noise, ehs)
    fr, _ = _pipeline_latents(unet, ddim, policy, noise, ehs)
    return _rel_mse(fr, full)


def test_search_from_a_fixed_schedule_starts_there_and_validates_on_a_held_out_batch():
    """init_policy is iterate 0 exactly; each iterate's held-out loss is the rel. MSE of its schedule
    run by the runtime on the held-out batch (val_conditions, seed 2**31 - 1 - seed) plus the cost term."""
    unet = sd_unet()
    start = frkern.Keyframes(keyframes=(0, 2), num_steps=STEPS, jumps=(1,))
    cond, val_cond = conditions(unet), conditions(unet, batch=2)
    res = autofr.search(unet, cond, ddim, steps=STEPS, iters=3, lr=0.3, penalty=0.01, seed=5, jumps=True,
                        init_policy=start, progress=False, val_conditions=val_cond)
    h0 = res.history[0]
    assert (h0["keyframes"], h0["jumps"]) == (2, 1)
    noise, ehs, _ = val_cond(torch.Generator().manual_seed(2**31 - 1 - 5))
    assert noise.shape[0] == 2
    rel = _rel_mse_through_the_runtime(unet, start, noise, ehs)
    assert rel > 0 and abs(h0["val_rel_mse"] - rel) <= 1e-5 * rel + 1e-9
    assert h0["val_loss"] == pytest.approx(rel + 0.01 * (1 + 0.33 * 1), rel=1e-5)
    best = res.history[res.best_iter]
    assert best["val_loss"] == min(h["val_loss"] for h in res.history)
    rel_best = _rel_mse_through_the_runtime(unet, res.policy, noise, ehs)
    assert abs(best["val_rel_mse"] - rel_best) <= 1e-5 * max(rel_best, 1e-6) + 1e-9
    # a tiny learning rate cannot move gates at +-1: the start comes back
    still = autofr.search(unet, cond, ddim, steps=STEPS, iters=2, lr=1e-6, penalty=0.01, seed=5, jumps=True,
                          init_policy=start, progress=False)
    assert still.policy == start


def test_search_refuses_a_bad_start():
    unet = sd_unet()
    with pytest.raises(ValueError, match="jumps=True"):
        autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=1, init_policy=frkern.FRDiff(2, score_mix=True),
                      progress=False)
    with pytest.raises(ValueError, match="feature-reuse policy"):
        autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=1, init_policy=frkern.Clockwork(2),
                      progress=False)
    with pytest.raises(ValueError, match="init_logit"):
        autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=1, init_policy=frkern.FRDiff(2, score_mix=False),
                      init_logit=0, progress=False)
    assert getattr(unet, "_frkern_handle", None) is None


@pytest.mark.parametrize("name, eta", [("ddim", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0),  # the rest: extended tier
                                       *[pytest.param(n, e, marks=pytest.mark.slow)
                                         for n, e in (("euler", 0.0), ("euler_a", 0.0), ("unipc", 0.0))]])
def test_searched_policy_replays_through_a_diffusers_pipeline(name, eta):
    """A short search runs with each scheduler; the policy it returns, replayed by frkern in a real
    StableDiffusionPipeline on the held-out batch (step noise from step_generator of its seed), scores
    the val_rel_mse the search recorded (rel. 1e-4), and the search's samplers under the same hard gates
    are that pipeline with frkern (gated) and without it (full) to fp32 rounding (rtol 1e-5, atol
    1e-5 * max |latent|) (issue 23.5)."""
    factory = SCHEDULERS[name]
    unet = sd_unet()
    val_cond, seed = conditions(unet, batch=2), 7
    res = autofr.search(unet, conditions(unet), factory, steps=STEPS, iters=2, lr=0.3, penalty=0.01, seed=seed,
                        jumps=True, init_policy=START, progress=False, val_conditions=val_cond, eta=eta)
    policy = res.policy
    assert len(policy.keyframes) < STEPS  # something is reused or jumped: the comparison means something
    val_seed = 2**31 - 1 - seed
    noise, ehs, kw = val_cond(torch.Generator().manual_seed(val_seed))
    full_pipe, _ = _pipeline_latents(unet, factory, None, noise, ehs, autofr.step_generator(val_seed), eta)
    fr_pipe, stats = _pipeline_latents(unet, factory, policy, noise, ehs, autofr.step_generator(val_seed), eta)
    n_jumps = len(policy.jumps)
    assert stats == {"full": len(policy.keyframes), "skip": n_jumps, "reuse": STEPS - len(policy.keyframes) - n_jumps}
    rel = _rel_mse(fr_pipe, full_pipe)
    assert rel > 0 and abs(res.history[res.best_iter]["val_rel_mse"] - rel) <= 1e-4 * rel

    handle = frkern.patch(unet, frkern.FRDiff(interval=1, score_mix=False), backend="torch")
    a, b = autofr.schedule_gates(policy.keyframes, policy.jumps, STEPS)
    with torch.no_grad():
        full = autofr.sample_full(handle, factory, noise, ehs, kw, STEPS, 3.0, autofr.step_generator(val_seed), eta)
        gated = autofr.sample_gated(handle, factory, noise, ehs, kw, STEPS, 3.0, a, False, reuse_gates=b,
                                    generator=autofr.step_generator(val_seed), eta=eta)
    frkern.unpatch(unet)
    tol = dict(rtol=1e-5, atol=1e-5 * full_pipe.abs().max().item())
    torch.testing.assert_close(full, full_pipe, **tol)
    torch.testing.assert_close(gated, fr_pipe, **tol)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_search_with_a_multistep_scheduler_in_its_default_configuration(name):
    """Default search (checkpointed steps) with a stateful multistep scheduler runs (issue 23.4: the
    backward recompute stepped DPM-Solver++ twice, IndexError)."""
    unet = sd_unet()
    res = autofr.search(unet, conditions(unet), SCHEDULERS[name], steps=STEPS, iters=2, lr=0.3, progress=False)
    assert len(res.history) == 2 and res.policy.keyframes[0] == 0
    assert all(h["val_rel_mse"] >= 0 for h in res.history)


def _train_mode_unet():
    """A UNet in train mode with one submodule in eval and mixed requires_grad."""
    unet = sd_unet().train()
    unet.conv_in.eval()
    for i, p in enumerate(unet.parameters()):
        p.requires_grad_(i % 3 != 0)
    return unet


def _model_state(unet):
    return [m.training for m in unet.modules()], [p.requires_grad for p in unet.parameters()]


@pytest.mark.parametrize("factory", [HeunDiscreteScheduler, KDPM2DiscreteScheduler,
                                     lambda: PNDMScheduler(skip_prk_steps=True)])
def test_search_refuses_schedulers_it_cannot_follow_before_the_model_changes(factory):
    unet = _train_mode_unet()
    state = _model_state(unet)
    name = type(factory()).__name__
    with pytest.raises(ValueError, match=f"once per step.*DPM-Solver\\+\\+.*{name}"):
        autofr.search(unet, conditions(unet), factory, steps=STEPS, iters=1, progress=False)
    assert _model_state(unet) == state and frkern.handle_of(unet) is None


def _raise_on_held_out(unet):
    draw = conditions(unet)

    def cond(g):
        if g.initial_seed() == 2**31 - 1:  # the held-out batch of seed 0
            raise KeyError("no held-out batch")
        return draw(g)
    return cond


def _wrong_shape(unet):
    def cond(g):
        return torch.randn(1, 3, 8, 8, generator=g), torch.randn(2, 5, unet.config.cross_attention_dim), {}
    return cond


def _factory_failing_at_call(n):
    calls = []

    def factory():
        calls.append(1)
        if len(calls) >= n:
            raise OSError("no scheduler config")
        return ddim()
    return factory


@pytest.mark.parametrize("case", ["patched", "conditions_raise", "conditions_wrong_shape", "factory_raises",
                                  "factory_raises_later"])
def test_a_failed_search_leaves_the_model_as_it_was(case):
    """Already patched: refused, the other patch untouched; conditions or a scheduler factory that fail
    (before or after the search patched the model): the error propagates and the model is unpatched, in
    its training flags and requires_grad as before, its forward bit-identical to a copy (issue 23.6)."""
    unet = _train_mode_unet()
    before = copy.deepcopy(unet)
    state = _model_state(unet)
    cond, factory, error = conditions(unet), ddim, None
    if case == "patched":
        other = frkern.patch(unet, frkern.Keyframes(keyframes=(0, 2), num_steps=STEPS), backend="torch")
        error = (RuntimeError, "already patched")
    elif case == "conditions_raise":
        cond, error = _raise_on_held_out(unet), (KeyError, "held-out")
    elif case == "conditions_wrong_shape":
        cond, error = _wrong_shape(unet), (RuntimeError, "channels")
    else:
        # call 1 is the search's up-front check, call 2 comes after it has patched the model
        factory, error = _factory_failing_at_call(1 if case == "factory_raises" else 2), (OSError, "scheduler")
    with pytest.raises(error[0], match=error[1]):
        autofr.search(unet, cond, factory, steps=STEPS, iters=2, progress=False)
    assert _model_state(unet) == state
    if case == "patched":
        assert frkern.handle_of(unet) is other and other.active
        frkern.unpatch(unet)
    assert frkern.handle_of(unet) is None
    x, ehs, _ = conditions(unet)(torch.Generator().manual_seed(9))
    x = torch.cat([x, x])
    with torch.no_grad():
        assert torch.equal(unet(x, 500, ehs).sample, before(x, 500, ehs).sample)
