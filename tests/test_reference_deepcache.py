"""The hooks statement of DeepCache (tests/reference_deepcache.py) IS DeepCache: a 10-step CFG DDIM
run through StableDiffusionPipeline gives bit-identical final latents with the `deepcache`
package's DeepCacheSDHelper and with DeepCacheCutHooks, for each cache branch, on two tiny UNets
of unusual shape."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from reference_deepcache import DeepCacheCutHooks
from tiny import make_sd_pipeline, sd_prompt_kwargs

STEPS, INTERVAL, GUIDANCE, SIZE = 10, 3, 5.0, 8

CONFIGS = {
    # (a) SD1.x-like, 2 layers per block, channels that are not powers of two.
    "a": dict(
        sample_size=SIZE, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(24, 40, 56), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    ),
    # (b) SDXL-like: plain top level, linear projections, 2 transformer layers at the bottom,
    # varied head counts, 1 layer per block (so layer id 2 of a branch names no layer).
    "b": dict(
        sample_size=SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 40, 48), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 6),
        use_linear_projection=True, cross_attention_dim=48,
    ),
}

_UNETS: dict[str, UNet2DConditionModel] = {}


def unet_for(kind: str) -> UNet2DConditionModel:
    if kind not in _UNETS:
        torch.manual_seed(0)
        _UNETS[kind] = UNet2DConditionModel(**CONFIGS[kind]).eval().float()
    return _UNETS[kind]


def run(unet, setup=None):
    """10-step CFG DDIM through StableDiffusionPipeline; returns final latents."""
    pipe = make_sd_pipeline(unet=unet)
    ctx = setup(pipe) if setup is not None else None
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, SIZE, SIZE, generator=g)
    prompt = sd_prompt_kwargs(batch=2, dim=unet.config.cross_attention_dim)
    with torch.no_grad():
        out = pipe(**prompt, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   output_type="latent", return_dict=False)[0]
    return out, ctx


def with_package(branch):
    from DeepCache import DeepCacheSDHelper

    def setup(pipe):
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch)
        helper.enable()
        return helper
    return setup


def with_hooks(branch):
    def setup(pipe):
        hooks = DeepCacheCutHooks(pipe.unet, branch)
        calls = [0]

        def pre(module, args):  # one UNet call per step (CFG batched): call index = step index
            hooks.keyframe = calls[0] % INTERVAL == 0
            calls[0] += 1
        pipe.unet.register_forward_pre_hook(pre)
        return hooks, calls
    return setup


_PLAIN: dict[str, torch.Tensor] = {}


# every branch position kind (whole block, a layer, a downsampler, a layer id past the block's
# layers) on each level; the branches tests/test_workflows.py uses are among them
@pytest.mark.parametrize("kind, branch", [("a", b) for b in (0, 1, 2, 3, 5, 7)] + [("b", b) for b in (0, 1, 2, 5, 6)])
def test_hooks_equal_deepcache_package(kind, branch):
    base = unet_for(kind)
    if branch // 3 >= len(base.down_blocks):
        pytest.skip("branch past the UNet's depth")
    ref, helper = run(copy.deepcopy(base), with_package(branch))
    helper.disable()
    got, (hooks, calls) = run(copy.deepcopy(base), with_hooks(branch))
    assert calls[0] == STEPS
    assert torch.isfinite(ref).all() and torch.isfinite(got).all()
    assert torch.equal(ref, got), (kind, branch, (ref - got).abs().max().item())
    # Not vacuous: caching changed the result against the plain pipeline.
    if kind not in _PLAIN:
        _PLAIN[kind] = run(copy.deepcopy(base))[0]
    assert not torch.equal(ref, _PLAIN[kind])


EXPECTED_SKIPPED = {
    ("a", 0): ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
               "up_blocks.0", "up_blocks.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
               "up_blocks.2.resnets.0", "up_blocks.2.resnets.1"],
    ("a", 1): ["down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0", "down_blocks.0.resnets.1",
               "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1",
               "up_blocks.2.attentions.0", "up_blocks.2.resnets.0"],
    ("a", 2): ["down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.2", "mid_block",
               "up_blocks.0", "up_blocks.1"],
    ("a", 3): ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
               "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
               "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"],
    ("b", 0): ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
               "up_blocks.0", "up_blocks.1", "up_blocks.2.resnets.0"],
    ("b", 1): ["down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.2", "mid_block",
               "up_blocks.0", "up_blocks.1"],
    ("b", 2): ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"],
    ("b", 3): ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
               "up_blocks.1.attentions.0", "up_blocks.1.resnets.0"],
}


@pytest.mark.parametrize("kind,branch", sorted(EXPECTED_SKIPPED))
def test_skipped_units_and_first(kind, branch):
    unet = copy.deepcopy(unet_for(kind))
    hooks = DeepCacheCutHooks(unet, branch)
    assert hooks.skipped_names == EXPECTED_SKIPPED[(kind, branch)]
    # first_skipped_module is the skipped unit a forward actually reaches first.
    order = []
    mods = dict(unet.named_modules())
    hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n in hooks.skipped_names]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        unet(torch.randn(2, 4, SIZE, SIZE, generator=g), 500,
             encoder_hidden_states=torch.randn(2, 7, unet.config.cross_attention_dim, generator=g))
    for h in hs:
        h.remove()
    assert order[0] == hooks.first_skipped_name and mods[order[0]] is hooks.first_skipped_module
    hooks.remove()
    assert not any(m._forward_hooks for m in unet.modules())
