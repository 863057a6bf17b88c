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


def test_search_with_jumps_keeps_the_best_iterate():
    unet = sd_unet()
    res = autofr.search(unet, conditions(unet), ddim, steps=STEPS, iters=4, lr=0.5, penalty=0.05, seed=2,
                        jumps=True, progress=False)
    best = min(range(4), key=lambda k: res.history[k]["hard_loss"])
    assert res.best_iter == best
    h = res.history[best]
    assert len(res.policy.keyframes) == h["keyframes"] and len(res.policy.jumps) == h["jumps"]
    assert len(res.reuse_probs) == STEPS - 1 and frkern.from_json(res.policy.to_json()) == res.policy
    with pytest.raises(ValueError, match="both keyframes and jumps"):
        frkern.Keyframes(keyframes=(0, 2), jumps=(2,))
