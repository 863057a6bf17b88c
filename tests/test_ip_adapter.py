"""IP-Adapter with the reuse policies (T-GATE's IP-Adapter cases are in tests/test_tgate_adapters.py).

An IP-Adapter (diffusers' converter on a random state dict in the original checkpoint layout, no
hub) adds an image projection to the UNet and IP attention processors on every cross-attention; the
pipeline passes `ip_adapter_image_embeds`. Loaded before or after patching, a patched pipeline must
give the latents of the method's statement (tests/reference.py, reference_deepcache.py: hooks on an
unpatched copy with the same IP-Adapter, keyframes set step by step from the policy's schedule), and
unloading it while patched must give the patched pipeline without one.
"""
import copy

import pytest
import torch

import frkern
from reference import FRDiffHooks, SegmentHooks
from reference_deepcache import DeepCacheCutHooks
from reference_tgate_adapters import ip_adapter_state_dict
from tiny import make_sd_pipeline, sd_prompt_kwargs, sd_unet

STEPS = 6
IMAGE_EMBED_DIM = 16
CASES = {
    "FRDiff": (frkern.FRDiff(interval=3, score_mix=False), FRDiffHooks),
    "DeepCache": (frkern.DeepCache(interval=3, branch=1), lambda unet: DeepCacheCutHooks(unet, 1)),
    "Clockwork": (frkern.Clockwork(clock=2), lambda unet: SegmentHooks(unet, levels=1)),
}


def load_ip_adapter(unet):
    unet._load_ip_adapter_weights([ip_adapter_state_dict(unet, IMAGE_EMBED_DIM, seed=5)], low_cpu_mem_usage=False)
    procs = unet.attn_processors
    assert sum(type(p).__name__ == "IPAdapterAttnProcessor2_0" for p in procs.values()) == len(procs) // 2


def image_embeds(seed=6):
    # [negative; positive] image embeddings, (batch 1, 1 image, dim) each
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))]


def generate(pipe, embeds=None, callback=None):
    kw = {} if embeds is None else {"ip_adapter_image_embeds": embeds}
    if callback is not None:
        kw["callback_on_step_end"] = callback
    return pipe(**sd_prompt_kwargs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="latent", **kw).images


def statement(pipe, policy, make_hooks, embeds):
    """The method on an unpatched copy: hooks told before each step whether it is a keyframe."""
    ref = copy.deepcopy(pipe)
    hooks = make_hooks(ref.unet)
    kinds = [p.keyframe for p in policy.schedule(STEPS)]
    hooks.keyframe = kinds[0]

    def next_step(p, i, t, kw):  # after step i: set up step i + 1
        if i + 1 < STEPS:
            hooks.keyframe = kinds[i + 1]
        return {}

    return generate(ref, embeds, next_step)


@pytest.mark.parametrize("when", ["loaded_before_patch", "loaded_after_patch"])
@pytest.mark.parametrize("name", list(CASES))
def test_reuse_with_an_ip_adapter_matches_the_statement(name, when):
    policy, make_hooks = CASES[name]
    plain = make_sd_pipeline(unet=sd_unet())
    with_ip = copy.deepcopy(plain)
    load_ip_adapter(with_ip.unet)
    embeds = image_embeds()
    want = statement(with_ip, policy, make_hooks, embeds)

    if when == "loaded_before_patch":
        pipe = copy.deepcopy(with_ip)
        handle = frkern.patch(pipe, policy, backend="torch")
    else:
        pipe = copy.deepcopy(plain)
        handle = frkern.patch(pipe, policy, backend="torch")
        generate(pipe)  # a generation without the adapter first: nothing of it may be read later
        load_ip_adapter(pipe.unet)
    got = generate(pipe, embeds)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stats = handle.stats
    assert stats.get("reuse", 0) > 0 and stats.get("promoted", 0) == 0, stats
    # the image embeddings reach the result (a cache that ignored them would not show this)
    other = generate(pipe, image_embeds(seed=7))
    assert (other - got).abs().max() > 1e-3


def test_unloading_the_ip_adapter_while_patched():
    policy = frkern.DeepCache(interval=3, branch=1)
    plain = make_sd_pipeline(unet=sd_unet())
    ref = copy.deepcopy(plain)
    ref_handle = frkern.patch(ref, policy, backend="torch")
    want = generate(ref)

    pipe = copy.deepcopy(plain)
    load_ip_adapter(pipe.unet)
    handle = frkern.patch(pipe, policy, backend="torch")
    generate(pipe, image_embeds())
    pipe.unload_ip_adapter()
    assert pipe.unet.encoder_hid_proj is None
    assert torch.equal(generate(pipe), want) and handle.stats == ref_handle.stats
    handle.unpatch()
    assert torch.equal(generate(pipe), generate(copy.deepcopy(plain)))
