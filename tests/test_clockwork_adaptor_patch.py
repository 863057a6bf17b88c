"""Clockwork with a learned adaptor in the patched UNet (issue 12), against an independent statement
with hooks on an unpatched copy."""
import copy

import pytest
import torch

import frkern
from frkern.adaptor import AdaptorConfig, ClockworkAdaptor, model_fingerprint, save_adaptor
from reference import SegmentHooks, ddim_loop
from test_pipelines import generate
from tiny import ddim, make_sd_pipeline, sd_inputs, sd_prompt_kwargs, sd_unet

STEPS = 7


def adaptor_for(unet, clock=3, steps=STEPS, zero=False, seed=0, **overrides):
    cfg = dict(in_channels=unet.down_blocks[0].resnets[-1].out_channels,
               out_channels=unet.up_blocks[-2].resnets[-1].out_channels, stride=1,
               temb_dim=unet.time_embedding.linear_2.out_features, text_dim=unet.config.cross_attention_dim,
               hidden=16, levels=1, clock=clock, sampler="DDIMScheduler", num_steps=steps,
               model=model_fingerprint(dict(unet.config)))
    cfg.update(overrides)
    torch.manual_seed(seed)
    adaptor = ClockworkAdaptor(AdaptorConfig(**cfg)).eval()
    if not zero:  # a trained adaptor's head is not zero: give it random weights
        with torch.no_grad():
            for p in adaptor.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return adaptor


def test_adaptor_on_clocked_steps_matches_the_statement(tmp_path):
    unet = sd_unet()
    ref_unet = copy.deepcopy(unet)
    adaptor = adaptor_for(unet)
    save_adaptor(adaptor, tmp_path / "a")
    sample, ehs, _ = sd_inputs(unet, batch=2)
    latents = sample[:1]

    # statement: record r_in (the downsampler's input), temb and r_out (up_blocks[-2]'s output) on
    # every call; on clocked steps feed up_blocks[-1] adaptor(r_in, r_out of the last keyframe, ...)
    seen = {}
    ref_unet.down_blocks[0].downsamplers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("r_in", a[0]))
    ref_unet.time_embedding.register_forward_hook(lambda m, a, o: seen.__setitem__("temb", o))
    hooks = SegmentHooks(ref_unet, levels=1)
    original_pre = hooks._pre

    def pre(module, args, kwargs):
        if hooks.keyframe:
            return original_pre(module, args, kwargs)
        with torch.no_grad():
            r_out = adaptor(seen["r_in"], hooks.stored, seen["temb"], ehs)
        return args, dict(kwargs, hidden_states=r_out)

    hooks._pre = pre
    ref_unet.up_blocks[-1]._forward_pre_hooks.clear()
    ref_unet.up_blocks[-1].register_forward_pre_hook(pre, with_kwargs=True)

    def ref_call(i, x, t):
        hooks.keyframe = i % 3 == 0
        with torch.no_grad():
            return ref_unet(x, t, ehs).sample

    handle = frkern.patch(unet, frkern.Clockwork(clock=3, adaptor=str(tmp_path / "a")), backend="torch")
    handle.begin(STEPS)

    def call(i, x, t):
        handle.set_step(i)
        with torch.no_grad():
            return unet(x, t, ehs).sample

    _, want = ddim_loop(ref_call, ddim(), latents, STEPS)
    _, got = ddim_loop(call, ddim(), latents, STEPS)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {i}")
    assert handle.stats["reuse"] == 4


def test_a_fresh_adaptor_is_the_identity_adaptor_bit_for_bit(tmp_path):
    pipe, prompt = make_sd_pipeline(), sd_prompt_kwargs(batch=2)
    save_adaptor(adaptor_for(pipe.unet, clock=2, steps=8, zero=True), tmp_path / "zero")
    frkern.patch(pipe, frkern.Clockwork(clock=2), backend="torch")
    want = generate(pipe, prompt)
    frkern.unpatch(pipe)
    handle = frkern.patch(pipe, frkern.Clockwork(clock=2, adaptor=str(tmp_path / "zero")), backend="torch")
    assert torch.equal(generate(pipe, prompt), want)
    assert handle.stats["reuse"] == 4


def test_cuda_graphs_and_copies_run_the_adaptor(tmp_path):
    from frkern.graphs import EmulatedCapture

    pipe, prompt = make_sd_pipeline(), sd_prompt_kwargs()
    save_adaptor(adaptor_for(pipe.unet, clock=2, steps=8), tmp_path / "a")
    policy = frkern.Clockwork(clock=2, adaptor=str(tmp_path / "a"))
    frkern.patch(pipe, policy, backend="torch")
    want = generate(pipe, prompt)
    copied = copy.deepcopy(pipe)
    assert torch.equal(generate(copied, prompt), want)
    frkern.unpatch(pipe)
    frkern.patch(pipe, frkern.Clockwork(clock=2), backend="torch")
    assert not torch.equal(generate(pipe, prompt), want)  # the adaptor changes the result
    frkern.unpatch(pipe)
    handle = frkern.patch(pipe, policy, backend="torch", cuda_graphs=True)
    handle.graphs.capture = EmulatedCapture()
    assert torch.equal(generate(pipe, prompt), want)


def test_a_wrong_adaptor_is_refused_before_anything_changes(tmp_path):
    unet = sd_unet()
    before = {n: type(m) for n, m in unet.named_modules()}
    cases = [(dict(clock=3), frkern.Clockwork(clock=2), "trained for clock 3, the policy has clock 2"),
             (dict(in_channels=7), frkern.Clockwork(clock=3), "r_in with 7 channels"),
             (dict(model="0123456789abcdef"), frkern.Clockwork(clock=3), "trained on UNet model")]
    for i, (over, policy, match) in enumerate(cases):
        save_adaptor(adaptor_for(unet, **over), tmp_path / f"w{i}")
        with pytest.raises(ValueError, match=match):
            frkern.patch(unet, frkern.Clockwork(clock=policy.clock, adaptor=str(tmp_path / f"w{i}")))
        assert {n: type(m) for n, m in unet.named_modules()} == before and frkern.handle_of(unet) is None
    with pytest.raises(ValueError, match="missing file"):
        frkern.patch(unet, frkern.Clockwork(clock=3, adaptor=str(tmp_path / "nothing")))
    save_adaptor(adaptor_for(unet, steps=50), tmp_path / "s50")
    handle = frkern.patch(unet, frkern.Clockwork(clock=3, adaptor=str(tmp_path / "s50")))
    with pytest.raises(ValueError, match="trained for 50 steps"):
        handle.begin(20)
    handle.begin(50)
    with pytest.raises(ValueError, match="adaptor must be the path"):
        frkern.Clockwork(adaptor=3)
