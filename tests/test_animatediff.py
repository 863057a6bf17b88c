"""AnimateDiff through its pipelines: frkern patched into AnimateDiffPipeline and
AnimateDiffVideoToVideoPipeline equals the unpatched pipeline with the policy's independent hook
statement (tests/reference_video.py) on its UNet, also with FreeInit (the loop runs several
times), FreeNoise (frames in overlapping windows), split inference (blocks run per chunk of the
batch), a motion adapter loaded after patching, a LoRA on the UNet added after patching, and
video-to-video with strength < 1 (planned by position)."""
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


def split_inference(pipe):
    # chunks of 4 of the 8 frames (2 videos x 4 frames) for ResNets and transformers, of 2 for the
    # motion modules: every unit runs more than once per UNet call
    pipe.enable_free_noise_split_inference(spatial_split_size=4, temporal_split_size=2)


@pytest.mark.parametrize("order", ["split_then_patch", "patch_then_split"])
def test_split_inference_reads_each_chunk_from_its_own_cache(order):
    """Split inference runs each ResNet, transformer and motion module once per chunk of the batch:
    each run stores and reads its own features. FRDiff equals its statement without split inference
    within rounding (split inference alone moves the latents by rel ~1e-6). Before, every chunk of a
    reuse call read the last chunk's features: off by rel 5e-2."""
    ref = animatediff_pipeline()
    hooks = FRDiffVideoHooks(ref.unet, kinds=KINDS)
    with_statement(ref, hooks, lambda i: i % 2 == 0)
    want = generate(ref)
    pipe = animatediff_pipeline()
    if order == "split_then_patch":
        split_inference(pipe)
    handle = frkern.patch(pipe, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
    if order == "patch_then_split":
        split_inference(pipe)
    keys = []

    def after_keyframe(p, i, t, kw):
        if i == 0:
            keys.extend(key[1] for key in handle.runtime.cache.keys())
        return {}

    got = generate(pipe, callback_on_step_end=after_keyframe)
    assert handle.stats == {"full": 2, "reuse": 2}  # no unit_miss: each run found its own state
    assert any(key.endswith("#2") for key in keys), keys
    assert torch.isfinite(got).all()
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_unpatch_keeps_split_inference_enabled_while_patched():
    """The SplitInferenceModules split inference wraps around frkern's wrappers stay after unpatch,
    around the original modules: the pipeline equals one that was never patched, bit for bit."""
    from diffusers.pipelines.free_noise_utils import SplitInferenceModule

    pipe, ref = animatediff_pipeline(), animatediff_pipeline()
    split_inference(ref)
    frkern.patch(pipe, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
    split_inference(pipe)
    frkern.unpatch(pipe)
    kinds = lambda unet: {name: type(m).__name__ for name, m in unet.named_modules()}
    assert kinds(pipe.unet) == kinds(ref.unet)
    assert sum(isinstance(m, SplitInferenceModule) for m in pipe.unet.modules()) > 0
    assert torch.equal(generate(pipe), generate(ref))


def test_adaptive_refuses_split_inference_at_the_first_call():
    """An adaptive probe measures its indicator on the whole batch; split inference would hand it
    one chunk. Refused with a message naming the cause; the pipeline is left patched and works
    once split inference is off."""
    pipe = animatediff_pipeline()
    frkern.patch(pipe, frkern.Adaptive(0.5, reuse="deepcache", branch=1, max_reuse=2), backend="torch")
    split_inference(pipe)
    with pytest.raises(RuntimeError, match="split inference"):
        generate(pipe)


def test_skipconv_with_split_inference_counts_every_chunk():
    """SkipConv's gates run once per chunk under split inference: the latents and the active-tile
    fraction of each step are those of the unsplit run (the fraction used to count the last chunk only)."""
    runs = {}
    for split in (False, True):
        pipe = animatediff_pipeline()
        if split:
            split_inference(pipe)
        handle = frkern.patch(pipe, frkern.SkipConv(threshold=0.05), backend="torch")
        runs[split] = generate(pipe), handle.stats["active_fraction"]
    (plain, plain_active), (got, got_active) = runs[False], runs[True]
    assert rel(got, plain) <= 1e-5
    assert plain_active.keys() == got_active.keys() and len(plain_active) == STEPS - 1
    for step, fraction in plain_active.items():
        assert abs(got_active[step] - fraction) <= 1e-6, (step, got_active[step], fraction)
