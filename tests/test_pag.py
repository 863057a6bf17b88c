"""Pipelines whose UNet batch has three parts, with the reuse policies: PAG (perturbed-attention
guidance: [uncond, cond, perturbed], PAG's processor on the chosen self-attentions for the call) and
InstructPix2Pix ([text, image, uncond], an 8-channel UNet input). A patched pipeline must give the
latents of the method's statement (hooks on an unpatched copy, keyframes set step by step from the
policy's schedule). T-GATE with PAG: tests/test_tgate_adapters.py.
"""
import copy

import pytest
import torch

import frkern
from test_ip_adapter import CASES, STEPS
from tiny import ddim, sd_prompt_kwargs, sd_unet, vae

COMMON = dict(text_encoder=None, tokenizer=None, scheduler=None, safety_checker=None, feature_extractor=None,
              requires_safety_checker=False)


def pag_pipeline(layers=("mid",)):
    from diffusers import StableDiffusionPAGPipeline

    pipe = StableDiffusionPAGPipeline(**dict(COMMON, vae=vae(), unet=sd_unet(), scheduler=ddim()),
                                      pag_applied_layers=list(layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pix2pix_pipeline():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(**dict(COMMON, vae=vae(), unet=sd_unet(in_channels=8),
                                                         scheduler=ddim()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, callback=None, **kw):
    if callback is not None:
        kw["callback_on_step_end"] = callback
    return pipe(**sd_prompt_kwargs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="latent", **kw).images


def check_against_statement(pipe, name, **kw):
    policy, make_hooks = CASES[name]
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

    want = generate(ref, next_step, **kw)
    assert batches == [3] * STEPS  # three parts on every call
    handle = frkern.patch(pipe, policy, backend="torch")
    got = generate(pipe, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stats = handle.stats
    assert stats.get("reuse", 0) > 0 and stats.get("promoted", 0) == 0, stats
    return got


@pytest.mark.parametrize("layers", [("mid",), ("down_blocks.1", "up_blocks.1")], ids=["mid", "down1-up1"])
@pytest.mark.parametrize("name", list(CASES))
def test_reuse_on_a_pag_pipeline_matches_the_statement(name, layers):
    pipe = pag_pipeline(layers)
    got = check_against_statement(pipe, name, pag_scale=2.0)
    assert (got - generate(pipe, pag_scale=0.0)).abs().max() > 1e-3  # PAG acts


@pytest.mark.parametrize("name", list(CASES))
def test_reuse_on_an_instruct_pix2pix_pipeline_matches_the_statement(name):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    check_against_statement(pix2pix_pipeline(), name, image=image, image_guidance_scale=1.5)
