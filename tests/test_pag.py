"""PAG (perturbed-attention guidance) pipelines with the reuse policies: the UNet is called on
[uncond, cond, perturbed] (batch 3) with PAG's processor on the chosen self-attentions for the call.
A patched PAG pipeline must give the latents of the method's statement (hooks on an unpatched copy,
keyframes set step by step from the policy's schedule). T-GATE with PAG: tests/test_tgate_adapters.py.
"""
import copy

import pytest
import torch

import frkern
from test_ip_adapter import CASES, STEPS
from tiny import ddim, sd_prompt_kwargs, sd_unet, vae


def pag_pipeline(layers=("mid",)):
    from diffusers import StableDiffusionPAGPipeline

    pipe = StableDiffusionPAGPipeline(vae=vae(), text_encoder=None, tokenizer=None, unet=sd_unet(), scheduler=ddim(),
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                      pag_applied_layers=list(layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, callback=None, pag_scale=2.0):
    kw = {} if callback is None else {"callback_on_step_end": callback}
    return pipe(**sd_prompt_kwargs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="latent", pag_scale=pag_scale, **kw).images


@pytest.mark.parametrize("layers", [("mid",), ("down_blocks.1", "up_blocks.1")], ids=["mid", "down1-up1"])
@pytest.mark.parametrize("name", list(CASES))
def test_reuse_on_a_pag_pipeline_matches_the_statement(name, layers):
    policy, make_hooks = CASES[name]
    pipe = pag_pipeline(layers)
    ref = copy.deepcopy(pipe)
    hooks = make_hooks(ref.unet)
    kinds = [p.keyframe for p in policy.schedule(STEPS)]
    hooks.keyframe = kinds[0]
    batches = []
    ref.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))

    def next_step(p, i, t, kw):
        if i + 1 < STEPS:
            hooks.keyframe = kinds[i + 1]
        return {}

    want = generate(ref, next_step)
    assert batches == [3] * STEPS  # [uncond, cond, perturbed]
    handle = frkern.patch(pipe, policy, backend="torch")
    got = generate(pipe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stats = handle.stats
    assert stats.get("reuse", 0) > 0 and stats.get("promoted", 0) == 0, stats
    assert (got - generate(pipe, pag_scale=0.0)).abs().max() > 1e-3  # PAG acts
