"""Offloading hooks around a patched UNet: diffusers' `enable_model_cpu_offload` (accelerate's
CpuOffload hook on the whole UNet, removed and re-added by the pipeline around every call) and
group offloading at block level (diffusers' HookRegistry on the UNet itself), added before or after
patching. frkern's forward sits beneath them (frkern.forward_chain): the same latents and the same
reuse as the patched pipeline without hooks, hooks that stay through unpatch, frkern that stays
through the hooks' removal.

The offload device is the CPU here (`enable_model_cpu_offload(device="cpu")`: the hook's moves are
no-ops, its wrapping of the forward is the same as on a GPU). Sequential offload is not tested: on a
CPU it fails in accelerate itself without frkern (`set_module_tensor_to_device` on a CPU execution
device). CUDA graphs under offloading: graphs are dropped and recaptured when the weights come back
at new addresses (checked by moving every parameter's storage by hand, which the CPU "offload"
does not do), and refused for hooks that re-store weights inside the forward.
"""
import copy

import pytest
import torch

import frkern
from frkern import forward_chain
from devices import assert_matches_eager, needs_cuda, no_tf32  # noqa: F401  (no_tf32: a fixture)
from frkern.graphs import EmulatedCapture
from tiny import make_sd_pipeline, sd_prompt_kwargs

pytest.importorskip("accelerate")

STEPS = 6
POLICIES = [frkern.DeepCache(interval=3), frkern.FRDiff(interval=3), frkern.Clockwork(clock=2)]


def generate(pipe, seed=0):
    return pipe(**sd_prompt_kwargs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type="latent").images


def patched_without_hooks(base, policy, **kw):
    pipe = copy.deepcopy(base)
    return pipe, frkern.patch(pipe, policy, **kw)


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_model_cpu_offload_keeps_latents_and_reuse(policy, order):
    base = make_sd_pipeline()
    ref_pipe, ref_handle = patched_without_hooks(base, policy)
    want = [generate(ref_pipe, seed) for seed in (0, 1)]
    want_stats = ref_handle.stats

    pipe = copy.deepcopy(base)
    if order == "offload_then_patch":
        pipe.enable_model_cpu_offload(device="cpu")
    handle = frkern.patch(pipe, policy)
    if order == "patch_then_offload":
        pipe.enable_model_cpu_offload(device="cpu")
    for seed, w in zip((0, 1), want):  # the pipeline removes and re-adds its hooks around each call
        assert torch.equal(generate(pipe, seed), w), (order, seed)
        assert handle.stats == want_stats and want_stats.get("reuse", 0) + want_stats.get("skip", 0) > 0
        unet = pipe.unet
        assert type(unet._hf_hook).__name__ == "CpuOffload"  # the hook is on the UNet, frkern beneath it
        assert unet.__dict__["_old_forward"] == handle._chain_forward
        assert list(forward_chain.links(unet))[-1][1] == handle._chain_forward  # the chain ends in frkern


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_unpatch_under_offload_leaves_the_hook_and_the_plain_forward(order):
    base = make_sd_pipeline()
    plain = copy.deepcopy(base)
    plain.enable_model_cpu_offload(device="cpu")
    want = generate(plain)

    pipe = copy.deepcopy(base)
    if order == "offload_then_patch":
        pipe.enable_model_cpu_offload(device="cpu")
    handle = frkern.patch(pipe, frkern.DeepCache(interval=3))
    if order == "patch_then_offload":
        pipe.enable_model_cpu_offload(device="cpu")
    generate(pipe)
    handle.unpatch()
    unet = pipe.unet
    assert frkern.handle_of(unet) is None
    assert type(unet._hf_hook).__name__ == "CpuOffload", "unpatch removed accelerate's hook"
    assert forward_chain.is_own_forward(unet, unet.__dict__["_old_forward"])
    assert torch.equal(generate(pipe), want)
    pipe.remove_all_hooks()  # accelerate puts back what it wrapped: the UNet's own forward
    assert forward_chain.is_own_forward(unet, unet.forward)
    assert torch.equal(generate(pipe), generate(copy.deepcopy(base)))


def test_removing_the_hooks_leaves_frkern_patched():
    base = make_sd_pipeline()
    ref_pipe, ref_handle = patched_without_hooks(base, frkern.DeepCache(interval=3))
    want = generate(ref_pipe)
    pipe = copy.deepcopy(base)
    pipe.enable_model_cpu_offload(device="cpu")
    handle = frkern.patch(pipe, frkern.DeepCache(interval=3))
    pipe.remove_all_hooks()
    assert not hasattr(pipe.unet, "_hf_hook") and pipe.unet.__dict__["forward"] == handle._chain_forward
    assert torch.equal(generate(pipe), want) and handle.stats == ref_handle.stats
    handle.unpatch()
    assert "forward" not in pipe.unet.__dict__ or forward_chain.is_own_forward(pipe.unet, pipe.unet.forward)


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_block_level_group_offloading_hooks_the_unet_itself(order):
    """Block-level group offloading puts a diffusers hook on the UNet itself (and its blocks)."""
    base = make_sd_pipeline()
    ref_pipe, ref_handle = patched_without_hooks(base, frkern.DeepCache(interval=3))
    want = generate(ref_pipe)
    pipe = copy.deepcopy(base)

    def offload():
        pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1)

    if order == "offload_then_patch":
        offload()
    handle = frkern.patch(pipe, frkern.DeepCache(interval=3))
    if order == "patch_then_offload":
        offload()
    assert "_diffusers_hook" in pipe.unet.__dict__ and pipe.unet.__dict__["forward"] != handle._chain_forward
    assert torch.equal(generate(pipe), want) and handle.stats == ref_handle.stats
    handle.unpatch()
    assert forward_chain.slot_of(pipe.unet, handle._chain_forward) is None
    assert "_diffusers_hook" in pipe.unet.__dict__
    assert torch.equal(generate(pipe), generate(copy.deepcopy(base)))


def test_an_unknown_forward_wrapper_is_refused_and_the_model_left_as_it_was():
    from DeepCache import DeepCacheSDHelper

    pipe = make_sd_pipeline()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    wrapped = pipe.unet.__dict__["forward"]
    modules = list(pipe.unet.named_modules())
    with pytest.raises(RuntimeError, match="not a hook frkern can place itself beneath"):
        frkern.patch(pipe, frkern.DeepCache(interval=3))
    assert pipe.unet.__dict__["forward"] is wrapped and list(pipe.unet.named_modules()) == modules
    assert frkern.handle_of(pipe) is None
    helper.disable()


def test_a_wrapper_added_after_patching_and_removed_after_unpatch_leaves_a_plain_model():
    """patch, a user's own wrapper of unet.forward on top (logging the calls), unpatch: frkern does not
    guess what an unknown wrapper calls, so the wrapper stays and calls the unpatched handle's forward,
    which runs the model's own forward; the wrapper later put back what it saw (that forward): the
    same. Both give the plain latents."""
    pipe = make_sd_pipeline()
    want = generate(copy.deepcopy(pipe))
    frkern.patch(pipe, frkern.DeepCache(interval=3))
    seen, inner = [], pipe.unet.forward

    def logging_forward(*args, **kwargs):
        seen.append(1)
        return inner(*args, **kwargs)

    pipe.unet.forward = logging_forward
    frkern.unpatch(pipe)
    assert pipe.unet.__dict__["forward"] is logging_forward and frkern.handle_of(pipe) is None
    assert torch.equal(generate(pipe), want) and len(seen) == STEPS
    pipe.unet.forward = inner  # the wrapper removed
    assert torch.equal(generate(pipe), want)
    frkern.patch(pipe, frkern.DeepCache(interval=3))  # it can be patched again
    handle_got = generate(pipe)
    assert torch.isfinite(handle_got).all() and frkern.handle_of(pipe).stats["reuse"] > 0


def test_cuda_graphs_recapture_when_the_offloaded_weights_come_back_elsewhere():
    """Model CPU offload moves the UNet off the GPU after each generation and back before the next:
    its parameters, watched by identity and version only under the hook, come back at new addresses,
    which the captured graphs would still read. Here accelerate's hook (the one
    enable_model_cpu_offload adds) has the CPU as its execution device, which moves nothing, and the
    move is done by hand: every graph is dropped and recaptured, results equal eager.
    (enable_model_cpu_offload(device="cpu") targets "cpu:0", which `.to` copies to on every call:
    the graphs would be recaptured on every call, correctly.)"""
    from accelerate import cpu_offload_with_hook

    base = make_sd_pipeline()
    eager_pipe, _ = patched_without_hooks(base, frkern.DeepCache(interval=3))
    want = [generate(eager_pipe, seed) for seed in (0, 1, 2)]
    pipe = copy.deepcopy(base)
    handle = frkern.patch(pipe, frkern.DeepCache(interval=3), cuda_graphs=True)
    handle.graphs.capture = EmulatedCapture()  # the real capture wants CUDA tensors
    cpu_offload_with_hook(pipe.unet, execution_device="cpu")
    assert type(pipe.unet._hf_hook).__name__ == "CpuOffload"
    assert torch.equal(generate(pipe, 0), want[0])
    captures = handle.graph_stats["captures"]
    assert torch.equal(generate(pipe, 1), want[1])
    assert handle.graph_stats["captures"] == captures and "storage_moves" not in handle.graph_stats  # replayed
    token = handle.runtime.weights_token()
    with torch.no_grad():
        for p in pipe.unet.parameters():  # what offloading and onloading again does to the storage
            p.data = p.data.clone()
    assert handle.runtime.weights_token() == token  # the cache rightly keeps it: same values
    assert torch.equal(generate(pipe, 2), want[2])
    stats = handle.graph_stats
    assert stats["storage_moves"] == 1 and stats["captures"] == 2 * captures, stats


def test_cuda_graphs_refuse_hooks_that_restore_weights_inside_the_forward():
    pipe = make_sd_pipeline()
    want = generate(copy.deepcopy(pipe))
    handle = frkern.patch(pipe, frkern.DeepCache(interval=3), cuda_graphs=True)
    handle.graphs.capture = EmulatedCapture()
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="cuda_graphs=True cannot capture .*layerwise casting"):
        generate(pipe)
    assert handle.graph_stats.get("captures", 0) == 0
    handle.unpatch()
    pipe.unet.disable_layerwise_casting() if hasattr(pipe.unet, "disable_layerwise_casting") else None
    out = generate(pipe)  # the failed call left nothing half-done: the unpatched pipeline runs
    assert out.shape == want.shape and torch.isfinite(out).all()


@needs_cuda
def test_real_cuda_graphs_under_model_cpu_offload(no_tf32):
    """On a GPU (the GPU round's tests stage): model CPU offload moves the UNet to the CPU after each
    generation and back before the next, at new addresses. With real captures, each generation
    recaptures its graphs (storage_moves) and equals the eager patched pipeline."""
    base = make_sd_pipeline()
    prompt = {k: v.cuda() for k, v in sd_prompt_kwargs().items()}

    def run(pipe, seed):
        return pipe(**prompt, num_inference_steps=STEPS, generator=torch.Generator("cuda").manual_seed(seed),
                    output_type="latent").images

    eager = copy.deepcopy(base).to("cuda")
    frkern.patch(eager, frkern.DeepCache(interval=3))
    want = [run(eager, seed) for seed in (0, 1)]
    pipe = copy.deepcopy(base)
    pipe.enable_model_cpu_offload(device="cuda")
    handle = frkern.patch(pipe, frkern.DeepCache(interval=3), cuda_graphs=True)
    got = [run(pipe, seed) for seed in (0, 1)]
    assert next(pipe.unet.parameters()).device.type == "cpu"  # offloaded after the generation
    for g, w in zip(got, want):
        assert_matches_eager(g, w)
    stats = handle.graph_stats
    assert stats["storage_moves"] >= 1 and stats["replays"] > stats["captures"], stats


def test_an_offload_hook_appended_to_another_hook_is_recognised():
    """accelerate's add_hook_to_module(..., append=True) wraps both hooks in a SequentialHook: its
    CpuOffload still marks the weights as re-stored by a hook (watched by identity and version), so
    the storage moves of offloading do not count as a weights change."""
    from accelerate.hooks import CpuOffload, ModelHook, add_hook_to_module

    pipe = make_sd_pipeline()
    handle = frkern.patch(pipe, frkern.DeepCache(interval=3))
    add_hook_to_module(pipe.unet, ModelHook())
    add_hook_to_module(pipe.unet, CpuOffload(execution_device="cpu"), append=True)
    assert type(pipe.unet._hf_hook).__name__ == "SequentialHook"
    token = handle.runtime.weights_token()
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.data = p.data.clone()
    assert handle.runtime.weights_token() == token
    generate(pipe)
    assert handle.stats.get("promoted", 0) == 0 and handle.stats["reuse"] > 0
