"""Auto-FR: gates get gradients, the penalty turns gates off, gated sampling matches the definition,
saved policies reload."""
import copy

import pytest
import torch

import frkern
from frkern import autofr
from reference import FRDiffHooks
from tiny import ddim, sd_unet

STEPS = 4


def conditions(unet, batch=1):
    def draw(g):
        noise = torch.randn(batch, 4, 8, 8, generator=g)
        ehs = torch.randn(2 * batch, 5, unet.config.cross_attention_dim, generator=g)
        return noise, ehs, {}
    return draw


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
    sch = ddim()
    sch.set_timesteps(STEPS)
    xr = noise
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            hooks.keyframe = i in (0, 2)
            eps = ref_unet(torch.cat([xr, xr]), t, ehs).sample
            u, c = eps.chunk(2)
            xr = sch.step(u + 3.0 * (c - u), t, xr).prev_sample
    torch.testing.assert_close(x, xr, rtol=1e-5, atol=1e-6)


def test_gates_receive_gradients_and_checkpointing_agrees():
    unet = sd_unet().requires_grad_(False)
    noise, ehs, kw = conditions(unet)(torch.Generator().manual_seed(1))
    handle = frkern.patch(unet, frkern.FRDiff(interval=1, score_mix=False), backend="torch")
    x_ref = autofr.sample_full(handle, ddim, noise, ehs, kw, STEPS, 3.0)
    grads = []
    for ckpt in (False, True):
        logits = torch.tensor([0.1, -0.1, 0.1], requires_grad=True)
        x = autofr.sample_gated(handle, ddim, noise, ehs, kw, STEPS, 3.0, autofr.straight_through(logits), ckpt)
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
    sch = ddim()
    sch.set_timesteps(STEPS)
    xr = noise
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            handle.set_step(i)
            eps = unet(torch.cat([xr, xr]), t, ehs).sample
            u, c = eps.chunk(2)
            xr = sch.step(u + 3.0 * (c - u), t, xr).prev_sample
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


def _rel_mse_through_the_runtime(unet, policy, noise, ehs):
    """The policy run by frkern's runtime (not the gated sampler), against full compute."""
    outs = []
    for pol in (None, policy):
        handle = frkern.patch(unet, pol, backend="torch") if pol is not None else None
        sch = ddim()
        sch.set_timesteps(STEPS)
        if handle is not None:
            handle.begin(STEPS)
        x = noise
        with torch.no_grad():
            for i, t in enumerate(sch.timesteps):
                if handle is not None:
                    handle.set_step(i)
                eps = unet(torch.cat([x, x]), t, ehs).sample
                u, c = eps.chunk(2)
                x = sch.step(u + 3.0 * (c - u), t, x).prev_sample
        if handle is not None:
            frkern.unpatch(unet)
        outs.append(x)
    return (torch.nn.functional.mse_loss(outs[1], outs[0]) / outs[0].pow(2).mean()).item()


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
