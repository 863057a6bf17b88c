"""AnimateDiff through its pipelines: frkern patched into AnimateDiffPipeline and
AnimateDiffVideoToVideoPipeline equals the unpatched pipeline with the policy's independent hook
statement (tests/reference_video.py) on its UNet, also with FreeInit (the loop runs several
times), FreeNoise (frames in overlapping windows), a motion adapter loaded after patching, a LoRA
on the UNet added after patching, and video-to-video with strength < 1 (planned by position)."""
from __future__ import annotations


import pytest
import torch

import frkern
from reference_video import DeepCacheVideoHooks, FRDiffVideoHooks
from tiny_video import animatediff_pipeline, animatediff_v2v_pipeline, motion_adapter, prompt_kwargs

STEPS = 4
KINDS = ("resnet", "transformer", "temporal_transformer")


def generate(pipe, frames=4, steps=STEPS, **kw):
    return pipe(**prompt_kwargs(), num_frames=frames, height=32, width=32, num_inference_steps=steps,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                return_dict=False, **kw)[0]


def with_statement(pipe, hooks, keyframe):
    """Drive `hooks.keyframe` from a pre-hook counting the UNet's calls: keyframe(call index)."""
    count = [0]

    def pre(module, args, kwargs):
        hooks.keyframe = keyframe(count[0])
        count[0] += 1

    return pipe.unet.register_forward_pre_hook(pre, with_kwargs=True), count


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("policy", [frkern.DeepCache(interval=2, branch=1), frkern.FRDiff(interval=2, score_mix=False)],
                         ids=lambda p: p.name)
def test_pipeline_equals_the_statement(policy):
    pipe, ref = animatediff_pipeline(), animatediff_pipeline()
    hooks = (DeepCacheVideoHooks(ref.unet, policy.branch) if isinstance(policy, frkern.DeepCache)
             else FRDiffVideoHooks(ref.unet, kinds=KINDS))
    with_statement(ref, hooks, lambda i: i % 2 == 0)
    want = generate(ref)
    handle = frkern.patch(pipe, policy, backend="torch")
    got = generate(pipe)
    assert handle.stats == {"full": 2, "reuse": 2}
    assert torch.isfinite(got).all()
    if isinstance(policy, frkern.DeepCache):
        assert torch.equal(got, want)
    else:
        assert rel(got, want) <= 1e-5
    # a new frame count on the same patched pipeline: a new cache, never a stale read
    hooks.keyframe = True
    assert torch.equal(generate(pipe, frames=6, steps=1), generate(ref, frames=6, steps=1))


def test_noreuse_is_bit_identical_with_freeinit():
    pipe, ref = animatediff_pipeline(), animatediff_pipeline()
    frkern.patch(pipe, frkern.NoReuse(), backend="torch")
    for p in (pipe, ref):
        p.enable_free_init(num_iters=2, use_fast_sampling=False)
    assert torch.equal(generate(pipe, steps=2), generate(ref, steps=2))


def test_freeinit_starts_a_generation_per_iteration():
    """FreeInit re-runs the whole loop from re-noised latents: each run is a generation of its own
    (set_timesteps again), so step 0 of the second run is a keyframe, never a read of the first."""
    policy = frkern.DeepCache(interval=2, branch=0)
    pipe, ref = animatediff_pipeline(), animatediff_pipeline()
    hooks = DeepCacheVideoHooks(ref.unet, policy.branch)
    with_statement(ref, hooks, lambda i: (i % 3) % 2 == 0)  # 3 steps per run
    handle = frkern.patch(pipe, policy, backend="torch")
    for p in (pipe, ref):
        p.enable_free_init(num_iters=2, use_fast_sampling=False)
    got, want = generate(pipe, steps=3), generate(ref, steps=3)
    assert torch.equal(got, want)
    assert handle.stats == {"full": 2, "reuse": 1}  # the last run's


@pytest.mark.parametrize("policy", [frkern.NoReuse(), frkern.FRDiff(interval=2, score_mix=False)], ids=lambda p: p.name)
def test_freenoise_windows(policy):
    """FreeNoise (enabled after patching) swaps the motion modules' transformer blocks for ones that
    attend over overlapping frame windows. Its pipeline path needs a text encoder (prompt
    interpolation), so the UNet is driven by hand here, 6 frames in windows of 4."""
    pipe, ref = animatediff_pipeline(), animatediff_pipeline()
    handle = frkern.patch(pipe, policy, backend="torch")
    for p in (pipe, ref):
        p.enable_free_noise(context_length=4, context_stride=2)
    hooks = FRDiffVideoHooks(ref.unet, kinds=KINDS)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 8, 8, generator=g)
    ehs = torch.randn(2, 7, 32, generator=g).repeat_interleave(6, dim=0)
    handle.begin(STEPS)
    with torch.no_grad():
        for i in range(STEPS):
            x = x + 0.05 * torch.randn(x.shape, generator=g)
            handle.set_step(i)
            hooks.keyframe = policy.name == "NoReuse" or i % 2 == 0
            got = pipe.unet(x, 900 - 100 * i, ehs).sample
            want = ref.unet(x, 900 - 100 * i, ehs).sample
            if policy.name == "NoReuse":
                assert torch.equal(got, want), i
            else:
                assert rel(got, want) <= 1e-5, (i, rel(got, want))


def test_motion_adapter_loaded_after_patching_is_what_runs():
    policy = frkern.DeepCache(interval=2, branch=2)
    pipe, ref = animatediff_pipeline(), animatediff_pipeline()
    handle = frkern.patch(pipe, policy, backend="torch")
    generate(pipe)
    other = motion_adapter(seed=7)
    for p in (pipe, ref):
        p.unet.load_motion_modules(other)
    hooks = DeepCacheVideoHooks(ref.unet, policy.branch)
    with_statement(ref, hooks, lambda i: i % 2 == 0)
    assert torch.equal(generate(pipe), generate(ref))
    assert handle.stats == {"full": 2, "reuse": 2}


def test_lora_added_after_patching_is_what_runs():
    peft = pytest.importorskip("peft")
    policy = frkern.DeepCache(interval=2, branch=1)
    pipe, ref = animatediff_pipeline(), animatediff_pipeline()
    frkern.patch(pipe, policy, backend="torch")
    generate(pipe, steps=2)
    for p in (pipe, ref):
        torch.manual_seed(3)
        p.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    hooks = DeepCacheVideoHooks(ref.unet, policy.branch)
    with_statement(ref, hooks, lambda i: i % 2 == 0)
    assert torch.equal(generate(pipe), generate(ref))


def test_video_to_video_plans_by_position_in_the_whole_schedule():
    """strength 0.5 of 6 steps runs positions 3, 4, 5: position 3 has nothing cached (a full call),
    4 is a keyframe of interval 2, 5 reuses it."""
    policy = frkern.DeepCache(interval=2, branch=1)
    pipe, ref = animatediff_v2v_pipeline(), animatediff_v2v_pipeline()
    hooks = DeepCacheVideoHooks(ref.unet, policy.branch)
    with_statement(ref, hooks, lambda i: i < 2)
    handle = frkern.patch(pipe, policy, backend="torch")
    video = torch.rand(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    def run(p):
        return p(video=video, **prompt_kwargs(), height=32, width=32, strength=0.5, num_inference_steps=6,
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                 return_dict=False)[0]

    assert torch.equal(run(pipe), run(ref))
    assert handle.stats == {"full": 2, "reuse": 1}
