"""cuda_graphs=True: graph keying, static buffers, the cache living in the full graph's outputs.

On a CPU the CUDA capture is replaced by frkern.graphs.EmulatedCapture, which keeps the contract
that matters here: a replay reads only the static buffers the capture saw and rewrites its
outputs in place. The same tests run with real CUDA graphs when a GPU is present.
"""
import pytest
import torch

import frkern
from frkern.graphs import EmulatedCapture
from test_pipelines import generate
from tiny import make_sd_pipeline, make_sdxl_pipeline, sd_inputs, sd_prompt_kwargs, sd_unet, sdxl_prompt_kwargs

KINDS = {"sd": (make_sd_pipeline, sd_prompt_kwargs), "sdxl": (make_sdxl_pipeline, sdxl_prompt_kwargs)}
CUDA = torch.cuda.is_available()
# With a GPU the Triton kernels run inside real graphs too; without one they are covered by
# test_triton_backend.py (interpreter) and the emulated capture would only re-run them.
BACKENDS = ["torch", "triton"] if CUDA else ["torch"]


def graphed(target, policy, **kw):
    """frkern.patch(target (pipeline or UNet), cuda_graphs=True), emulated where there is no GPU."""
    handle = frkern.patch(target, policy, cuda_graphs=True, **kw)
    if not CUDA:
        handle.graphs.capture = EmulatedCapture()
    return handle


def unets_and_inputs():
    """Two equal tiny UNets (one to graph, one as the eager reference) and inputs, on the device."""
    unet, ref_unet = sd_unet(), sd_unet()
    inputs = sd_inputs(unet)
    if CUDA:
        unet, ref_unet = unet.cuda(), ref_unet.cuda()
        inputs = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs)
    return unet, ref_unet, inputs


def on_device(pipe, prompt):
    if CUDA:
        pipe.to("cuda")
        prompt = {k: v.cuda() for k, v in prompt.items()}
    return pipe, prompt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, policy, step_kinds", [
    ("sd", frkern.FRDiff(interval=2), 2),
    ("sdxl", frkern.FRDiff(interval=3, score_mix=False), 2),
    ("sd", frkern.Clockwork(clock=2), 2),
    ("sdxl", frkern.DeepCache(interval=3, branch=1), 2),
    ("sd", frkern.NoReuse(), 1),
])
def test_graphs_equal_the_eager_patched_unet_and_capture_once_per_step_kind(kind, policy, step_kinds, backend):
    make, prompt_kwargs = KINDS[kind]
    eager_pipe, prompt = on_device(make(), prompt_kwargs())
    eager_handle = frkern.patch(eager_pipe, policy, backend=backend)
    want = generate(eager_pipe, prompt, steps=7)

    pipe, prompt = on_device(make(), prompt_kwargs())
    handle = graphed(pipe, policy, backend=backend)
    for generation in range(2):
        got = generate(pipe, prompt, steps=7)
        assert torch.equal(got, want), f"generation {generation}"
        assert handle.stats == eager_handle.stats
    gs = handle.graph_stats
    assert gs["captures"] == step_kinds  # one full graph, one reuse graph, reused across generations
    assert gs["replays"] == 2 * (handle.stats["full"] + handle.stats.get("reuse", 0))
    # the cache holds the full graph's own outputs, so reuse replays read them in place
    assert gs.get("read_copies", 0) == 0


def test_new_shapes_recapture_and_stay_correct():
    policy = frkern.FRDiff(interval=2)
    pipe, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    handle = graphed(pipe, policy)
    requests = [dict(size=32), dict(size=40), dict(size=32, num_images_per_prompt=2), dict(size=32)]
    got = [generate(pipe, prompt, steps=5, **r) for r in requests]
    for r, g in zip(requests, got):
        fresh, p = on_device(make_sd_pipeline(), sd_prompt_kwargs())
        frkern.patch(fresh, policy)
        assert torch.equal(generate(fresh, p, steps=5, **r), g)
    assert handle.graph_stats["captures"] == 6  # 3 distinct input shapes x (full, reuse); the last request replays


def test_outputs_are_not_aliased_to_static_buffers():
    # PLMS keeps earlier model outputs: returning the graph's static output would let the next
    # replay overwrite them.
    from diffusers import PNDMScheduler

    def make():
        return make_sd_pipeline(scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1))

    eager, prompt = on_device(make(), sd_prompt_kwargs())
    frkern.patch(eager, frkern.FRDiff(interval=2, score_mix=False))
    pipe, prompt = on_device(make(), sd_prompt_kwargs())
    graphed(pipe, frkern.FRDiff(interval=2, score_mix=False))
    # guidance 1: no CFG combine, the scheduler keeps the UNet's output tensor itself
    assert torch.equal(generate(pipe, prompt, steps=6, guidance_scale=1.0),
                       generate(eager, prompt, steps=6, guidance_scale=1.0))


def _loop(unet, handle, inputs, steps, offset=0.0, float_keyframes=False):
    sample, ehs, _ = inputs
    handle.begin(steps)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            handle.set_step(i)
            t = 900 - 100 * i
            if float_keyframes and handle.policy.plan(i, steps).keyframe:
                t = float(t)  # another timestep dtype: another full graph, other feature buffers
            outs.append(unet(sample + offset + 0.1 * i, t, ehs).sample)
    return outs


def test_reuse_graph_copies_features_it_did_not_capture():
    unet, ref_unet, inputs = unets_and_inputs()
    policy = frkern.FRDiff(interval=3, score_mix=False)
    ref = frkern.patch(ref_unet, policy)
    handle = graphed(unet, policy)
    for g, w in zip(_loop(unet, handle, inputs, 6), _loop(ref_unet, ref, inputs, 6)):
        assert torch.equal(g, w)
    assert handle.graph_stats.get("read_copies", 0) == 0
    # Keyframes now come from a second full graph; the reuse graph captured above reads the first
    # one's buffers, which hold the last generation's features: it must copy the new ones in.
    want = _loop(ref_unet, ref, inputs, 6, offset=0.5, float_keyframes=True)
    got = _loop(unet, handle, inputs, 6, offset=0.5, float_keyframes=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert handle.graph_stats["read_copies"] > 0
    assert handle.graph_stats["captures"] == 3


def test_replaced_weights_drop_every_graph():
    unet, plain, inputs = unets_and_inputs()
    handle = graphed(unet, frkern.FRDiff(interval=4, score_mix=False), backend="torch")
    _loop(unet, handle, inputs, 2)
    assert len(handle.graphs.graphs) == 2
    with torch.no_grad():
        w = unet.conv_in.weight
        w.data = w.data * 1.5  # a new tensor: the graphs point at the old one
        plain.conv_in.weight.data = plain.conv_in.weight.data * 1.5
    sample, ehs, _ = inputs
    handle.set_step(2)  # a reuse step in the same generation: promoted to full, recaptured
    with torch.no_grad():
        got = unet(sample, 500, ehs).sample
        want = plain(sample, 500, ehs).sample
    assert torch.equal(got, want)
    assert handle.stats["promoted"] == 1
    assert len(handle.graphs.graphs) == 1


def test_graph_errors_are_clear():
    unet = sd_unet()
    sample, ehs, _ = sd_inputs(unet)
    handle = frkern.patch(unet, frkern.NoReuse(), cuda_graphs=True)
    handle.begin(1)
    handle.set_step(0)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="torch.no_grad"):
        unet(sample, 10, ehs)
    with torch.no_grad(), pytest.raises(RuntimeError, match="on CUDA, got cpu"):
        unet(sample, 10, ehs)
    handle.graphs.capture = EmulatedCapture()
    with torch.no_grad(), pytest.raises(TypeError, match="hashable"):
        unet(sample, 10, ehs, cross_attention_kwargs={"scale": {1.0}})
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, ehs).sample, sd_unet()(sample, 10, ehs).sample)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        frkern.patch(sd_unet(), frkern.NoReuse(), cuda_graphs="yes")


def test_compiled_network_inside_graphs():
    # handle.compile(): frkern's graphs capture the compiled network (eager dynamo backend here).
    import torch._dynamo
    from torch._dynamo.utils import counters

    policy = frkern.FRDiff(interval=2)
    eager, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    frkern.patch(eager, policy, backend="torch")
    want = generate(eager, prompt, steps=6)
    pipe, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    handle = graphed(pipe, policy, backend="torch").compile(backend="eager" if not CUDA else "inductor")
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        got = generate(pipe, prompt, steps=6)
        if CUDA:
            assert ((got - want).norm() / want.norm()).item() < 1e-4
        else:
            assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 2 and sum(counters["graph_break"].values()) == 0
    assert handle.graph_stats["captures"] == 2


@pytest.mark.parametrize("policy", [frkern.FRDiff(interval=2), frkern.Clockwork(clock=2), frkern.DeepCache(interval=3)])
def test_every_step_kind_runs_on_meta_tensors(policy):
    # A CUDA graph cannot capture a device-to-host read (.item(), printing, data-dependent shapes).
    # Meta tensors have no data, so any such read in frkern's step logic or in the patched
    # network fails here, on a CPU.
    with torch.device("meta"):
        unet = sd_unet()
        sample, ehs = torch.empty(2, 4, 16, 16), torch.empty(2, 7, unet.config.cross_attention_dim)
    handle = frkern.patch(unet, policy, backend="torch", cuda_graphs=True)
    handle.graphs.capture = lambda fn, warmup=2: ((lambda: None), fn())  # replay: nothing to run
    handle.begin(8)
    with torch.no_grad():
        for i in range(8):
            handle.set_step(i)
            out = unet(sample, torch.empty((), dtype=torch.long, device="meta"), ehs).sample
            assert out.shape == sample.shape and out.device.type == "meta"
    assert handle.stats["reuse"] > 0 and handle.graph_stats["captures"] == 2
