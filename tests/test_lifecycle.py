"""Generations, shape changes, stale-cache protection, cache accounting."""
import pytest
import torch

import frkern
from frkern.cache import FeatureCache, signature
from tiny import make_sd_pipeline, sd_inputs, sd_prompt_kwargs, sd_unet
from test_pipelines import generate


def test_same_seed_twice_gives_identical_images():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    handle = frkern.patch(pipe, frkern.FRDiff(2))
    a = generate(pipe, prompt, seed=3)
    gen_a = handle.runtime.cache.generation
    b = generate(pipe, prompt, seed=3)
    assert torch.equal(a, b)
    assert handle.runtime.cache.generation == gen_a + 1  # set_timesteps started a new generation


@pytest.mark.parametrize("policy", [frkern.FRDiff(2), pytest.param(frkern.Clockwork(2), marks=pytest.mark.slow),
                                    frkern.DeepCache(3)])  # units and a segment cut; Clockwork's cut: extended
def test_batch_resolution_and_steps_may_change_between_calls(policy):
    pipe = make_sd_pipeline()
    frkern.patch(pipe, policy)
    # each result equals what a freshly patched pipeline gives for the same request
    requests = [dict(size=32, steps=6), dict(size=48, steps=6, num_images_per_prompt=2), dict(size=32, steps=9),
                dict(size=40, steps=4)]
    got = [generate(pipe, sd_prompt_kwargs(), **r) for r in requests]
    for r, g in zip(requests, got):
        fresh = make_sd_pipeline()
        frkern.patch(fresh, policy)
        assert torch.equal(generate(fresh, sd_prompt_kwargs(), **r), g)


def test_shape_change_inside_a_generation_recomputes():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.FRDiff(interval=4, score_mix=False), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    small, ehs_small = sample[:1], ehs[:1]
    handle.begin(4)
    with torch.no_grad():
        unet(sample, 900, ehs)
        handle.set_step(1)
        out = unet(small, 800, ehs_small).sample  # a reuse step, but the batch changed
        handle.set_step(1)
    assert handle.stats["promoted"] == 1
    # the promoted call is a full call: equal to the unpatched model
    frkern.unpatch(unet)
    with torch.no_grad():
        assert torch.equal(out, unet(small, 800, ehs_small).sample)


def assert_weight_change_promotes(unet, change, after_patch=lambda: None):
    """Patch, `after_patch()`, keyframe, `change()` the weights, then a reuse step: it must run in
    full (promoted) and equal the unpatched model with the changed weights."""
    handle = frkern.patch(unet, frkern.FRDiff(interval=4, score_mix=False), backend="torch")
    after_patch()
    sample, ehs, _ = sd_inputs(unet)
    handle.begin(4)
    with torch.no_grad():
        unet(sample, 900, ehs)
        change()
        handle.set_step(1)
        out = unet(sample, 800, ehs).sample
    assert handle.stats["promoted"] == 1
    frkern.unpatch(unet)
    with torch.no_grad():
        assert torch.equal(out, unet(sample, 800, ehs).sample)


def test_weight_change_inside_a_generation_recomputes():
    unet = sd_unet()
    assert_weight_change_promotes(unet, lambda: unet.down_blocks[0].resnets[0].conv1.weight.mul_(1.5))


def test_freeu_toggled_inside_a_generation_recomputes():
    """FreeU's factors are attributes of the up blocks, not weights: enabling, changing or disabling
    it between a keyframe and a reuse call makes that call a full one."""
    on = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    for before, change in ((None, lambda u: u.enable_freeu(**on)),
                           (on, lambda u: u.enable_freeu(**dict(on, s1=0.8))),
                           (on, lambda u: u.disable_freeu())):
        unet = sd_unet()
        if before:
            unet.enable_freeu(**before)
        assert_weight_change_promotes(unet, lambda: change(unet))


def test_freeu_toggled_between_cuda_graph_replays_is_a_new_graph():
    """Under cuda_graphs=True (emulated capture on a CPU) a graph captured with FreeU's factors is not
    replayed with others: the call options key the graphs."""
    from devices import EmulatedCapture

    unet = sd_unet()
    handle = frkern.patch(unet, frkern.NoReuse(), backend="torch", cuda_graphs=True)
    handle.graphs.capture = EmulatedCapture()
    sample, ehs, _ = sd_inputs(unet)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with torch.no_grad():
        unet(sample, 500, ehs)
        unet.enable_freeu(s1=0.6, s2=0.2, b1=1.2, b2=1.4)
        got = unet(sample, 500, ehs).sample
        frkern.unpatch(unet)
        assert torch.equal(got, unet(sample, 500, ehs).sample)
    assert handle.graph_stats["captures"] == 2


def test_parameters_added_after_patch_are_watched_from_the_next_generation():
    # e.g. an adapter injected after patch, before the next generation starts
    unet = sd_unet()
    torch.manual_seed(5)
    new_conv = torch.nn.Conv2d(4, unet.conv_in.out_channels, 3, padding=1)
    assert_weight_change_promotes(unet, lambda: new_conv.weight.mul_(1.5),
                                  after_patch=lambda: setattr(unet, "conv_in", new_conv))


def test_dtype_change_inside_a_generation_recomputes():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.Clockwork(2), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    handle.begin(4)
    with torch.no_grad():
        unet(sample, 900, ehs)
        unet.to(torch.bfloat16)
        handle.set_step(1)
        unet(sample.bfloat16(), 800, ehs.bfloat16())
    assert handle.stats["promoted"] == 1


def test_failed_call_leaves_no_half_written_keyframe():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    handle.begin(4)
    with torch.no_grad():
        with pytest.raises(Exception):
            unet(sample, 900, ehs[:, :, :5])  # wrong text width: fails inside the network
        handle.set_step(1)
        unet(sample, 800, ehs)
    assert handle.stats["promoted"] == 1 and handle.runtime.mode == "off"


def test_cache_size_and_free_on_unpatch():
    import copy

    from reference import FRDiffHooks

    unet = sd_unet()
    ref_unet = copy.deepcopy(unet)
    hooks = FRDiffHooks(ref_unet)
    handle = frkern.patch(unet, frkern.FRDiff(2), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    handle.begin(2)
    with torch.no_grad():
        out = unet(sample, 900, ehs).sample
        ref_unet(sample, 900, ehs)
    # the whole CFG batch of every conv1 output and transformer branch, plus the keyframe output
    expected = sum(t.numel() * t.element_size() for t in hooks.store.values()) + out.numel() * out.element_size()
    assert handle.cache_bytes == expected
    assert len(handle.runtime.cache) == len(hooks.store) + 1
    frkern.unpatch(unet)
    assert handle.cache_bytes == 0


def test_feature_cache_validation():
    c = FeatureCache()
    c.new_generation()
    t = torch.randn(2, 3)
    c.put("a", t, signature(t))
    assert c.get("a", signature(t)) is t
    assert c.get("a", signature(t.double())) is None
    assert c.get("a", signature(t[:1])) is None
    assert c.get("b", signature(t)) is None
    c.new_generation()
    assert c.get("a", signature(t)) is None and len(c) == 0


def test_hand_loop_errors():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.FRDiff())
    with pytest.raises(RuntimeError, match="begin"):
        handle.set_step(0)
    with pytest.raises(ValueError, match="num_steps"):
        handle.begin(0)
    handle.begin(3)
    with pytest.raises(ValueError, match="step"):
        handle.set_step(-1)


def test_handle_refuses_after_unpatch():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.FRDiff(), backend="torch")
    handle.begin(2)
    frkern.unpatch(unet)
    for use in (lambda: handle.begin(2), lambda: handle.set_step(0), handle.reset, handle.unpatch,
                lambda: handle.compile(), lambda: handle.track(None)):
        with pytest.raises(RuntimeError, match="unpatched"):
            use()
    assert handle.cache_bytes == 0 and handle.stats == {}


def test_a_failed_call_frees_the_generation_and_the_next_call_computes():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.DeepCache(interval=3, branch=1), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    handle.begin(6)
    with torch.no_grad():
        for i in range(2):
            handle.set_step(i)
            unet(sample, 900 - 100 * i, ehs)
        assert handle.cache_bytes > 0
        handle.set_step(2)
        with pytest.raises(Exception):
            unet(sample, 700, ehs[:, :, :5])  # another text width: promoted to full, fails inside the network
        assert handle.cache_bytes == 0  # an interrupted generation holds no memory
        handle.set_step(2)
        unet(sample, 700, ehs)  # nothing cached: promoted to a full call
    assert handle.stats == {"full": 3, "reuse": 1, "promoted": 2}


def test_patching_the_unet_of_a_pipeline_says_to_patch_the_pipeline():
    from tiny import make_sd_pipeline, sd_prompt_kwargs

    pipe = make_sd_pipeline()
    frkern.patch(pipe.unet, frkern.FRDiff(), backend="torch")
    with pytest.raises(RuntimeError, match=r"patch the pipeline, not its UNet"):
        pipe(**sd_prompt_kwargs(), num_inference_steps=2, output_type="latent")


def test_cache_bytes_of_meta_tensors_count_each_tensor():
    """Cost estimates run on the meta device, where every tensor's address is 0: distinct tensors
    of one size are still distinct (the same tensor stored twice counts once)."""
    c = FeatureCache()
    c.new_generation()
    a, b = torch.empty(3, 4, device="meta"), torch.empty(3, 4, device="meta")
    c.put("a", a, signature(a))
    c.put("b", b, signature(b))
    c.put("a2", a, signature(a))
    assert c.nbytes == 2 * 3 * 4 * 4
