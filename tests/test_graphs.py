"""cuda_graphs=True: graph keying, static buffers, the cache living in the full graph's outputs.

On a CPU the CUDA capture is replaced by frkern.graphs.EmulatedCapture, which keeps the contract
that matters here: a replay reads only the static buffers the capture saw and rewrites its
outputs in place. The same tests run with real CUDA graphs when a GPU is present (model and inputs
moved there, results compared with the eager patched model within devices.GPU_GRAPH_RTOL, TF32
off); the tests marked needs_cuda run only there.
"""
import pytest
import torch

import frkern
from devices import CUDA, assert_matches_eager, assert_same_stats, graphed, needs_cuda, no_tf32, rel  # noqa: F401
from devices import to_device as on_device
from frkern.graphs import EmulatedCapture, HostStaging
from test_pipelines import generate
from tiny import make_sd_pipeline, make_sdxl_pipeline, sd_inputs, sd_prompt_kwargs, sd_unet, sdxl_prompt_kwargs

pytestmark = pytest.mark.usefixtures("no_tf32")  # fp32 graph-vs-eager comparisons on a GPU (devices.py)

KINDS = {"sd": (make_sd_pipeline, sd_prompt_kwargs), "sdxl": (make_sdxl_pipeline, sdxl_prompt_kwargs)}
# With a GPU the Triton kernels run inside real graphs too; without one they are covered by
# test_triton_backend.py (interpreter) and the emulated capture would only re-run them.
BACKENDS = ["torch", "triton"] if CUDA else ["torch"]


def unets_and_inputs():
    """Two equal tiny UNets (one to graph, one as the eager reference) and inputs, on the device."""
    unet, ref_unet = sd_unet(), sd_unet()
    inputs = sd_inputs(unet)
    if CUDA:
        unet, ref_unet = unet.cuda(), ref_unet.cuda()
        inputs = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs)
    return unet, ref_unet, inputs


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
        assert_matches_eager(got, want, f"generation {generation}")
        assert handle.stats == eager_handle.stats
    gs = handle.graph_stats
    assert gs["captures"] == step_kinds  # one full graph, one reuse graph, reused across generations
    assert gs["replays"] == 2 * (handle.stats["full"] + handle.stats.get("reuse", 0))
    # the cache holds the full graph's own outputs, so reuse replays read them in place
    assert gs.get("read_copies", 0) == 0


def test_a_policy_without_caches_in_a_hand_written_loop_captures_once():
    """NoReuse needs no step protocol: without begin/set_step its calls are all slot 0, so one graph
    serves them all (before, the slot counted calls and every call captured a graph of its own)."""
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.NoReuse(), backend="torch", cuda_graphs=True)
    handle.graphs.capture = EmulatedCapture()
    sample, ehs, _ = sd_inputs(unet)
    with torch.no_grad():
        outs = [unet(sample, t, ehs).sample for t in (900, 800, 700, 600)]
        frkern.unpatch(unet)
        for t, out in zip((900, 800, 700, 600), outs):
            assert torch.equal(out, unet(sample, t, ehs).sample), t
    assert handle.graph_stats["captures"] == 1 and handle.graph_stats["replays"] == 4


def test_new_shapes_recapture_and_stay_correct():
    policy = frkern.FRDiff(interval=2)
    pipe, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    handle = graphed(pipe, policy)
    requests = [dict(size=32), dict(size=40), dict(size=32, num_images_per_prompt=2), dict(size=32)]
    got = [generate(pipe, prompt, steps=5, **r) for r in requests]
    for r, g in zip(requests, got):
        fresh, p = on_device(make_sd_pipeline(), sd_prompt_kwargs())
        frkern.patch(fresh, policy)
        assert_matches_eager(g, generate(fresh, p, steps=5, **r), r)
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
    # (aliasing would show as a difference far above GPU_GRAPH_RTOL)
    assert_matches_eager(generate(pipe, prompt, steps=6, guidance_scale=1.0),
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
        assert_matches_eager(g, w)
    assert handle.graph_stats.get("read_copies", 0) == 0
    # Keyframes now come from a second full graph; the reuse graph captured above reads the first
    # one's buffers, which hold the last generation's features: it must copy the new ones in.
    want = _loop(ref_unet, ref, inputs, 6, offset=0.5, float_keyframes=True)
    got = _loop(unet, handle, inputs, 6, offset=0.5, float_keyframes=True)
    for g, w in zip(got, want):
        assert_matches_eager(g, w)
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
    assert_matches_eager(got, want)
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


@pytest.mark.slow
def test_compiled_network_inside_graphs():
    # handle.compile(): frkern's graphs capture the compiled network (eager dynamo backend here).
    # What must hold in any torch version: no graph breaks, and after the first generation (which
    # compiles one graph per step kind, however a version counts them) no compile at all.
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
    for generation in range(2):
        with torch._dynamo.config.patch(error_on_recompile=generation > 0):
            got = generate(pipe, prompt, steps=6)
        if CUDA:  # inductor's kernels against eager's (TF32 off)
            assert rel(got, want) < 1e-4
        else:
            assert torch.equal(got, want)
        if generation == 0:
            first = counters["stats"]["unique_graphs"]
            assert first > 0
    assert counters["stats"]["unique_graphs"] == first, "compiled again in steady state"
    assert sum(counters["graph_break"].values()) == 0
    assert handle.graph_stats["captures"] == 2


@pytest.mark.parametrize("policy, captures", [
    (frkern.FRDiff(interval=2), 2), (frkern.Clockwork(clock=2), 2), (frkern.DeepCache(interval=3), 2),
    # T-GATE: its attention modes, stored means and halved calls (a graph per step kind)
    (frkern.TGate(gate_step=3, sp_interval=2, warm_up=1, reuse=frkern.DeepCache(interval=2)), None)])
def test_every_step_kind_runs_on_meta_tensors(policy, captures):
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
    assert handle.stats["reuse"] > 0
    assert handle.graph_stats["replays"] == handle.stats["full"] + handle.stats["reuse"]  # every network call
    assert captures is None or handle.graph_stats["captures"] == captures


TGATE_RUN = dict(num_inference_steps=8, height=32, width=32, output_type="latent")


@pytest.mark.parametrize("policy", [
    frkern.TGate(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1),
    frkern.TGate(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1, reuse=frkern.DeepCache(interval=2, branch=1))],
    ids=["alone", "with-deepcache"])
def test_tgate_graphs_equal_eager_with_halved_calls_and_stored_attention(policy):
    """cuda_graphs=True (a real capture on a GPU, emulated on a CPU): one graph per step kind (mode,
    attention modes, and the halved batch after the gate), every call replayed, the stored
    attention outputs handed from the graph that wrote them to those that read them. Two
    generations equal eager; the second captures nothing."""
    pipe, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    handle = frkern.patch(pipe, policy, backend="torch")
    want = pipe(**prompt, **TGATE_RUN, generator=torch.Generator().manual_seed(0)).images
    stats = dict(handle.stats)
    frkern.unpatch(pipe)
    handle = graphed(pipe, policy, backend="torch")
    steps = TGATE_RUN["num_inference_steps"]
    for generation in range(2):
        got = pipe(**prompt, **TGATE_RUN, generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(got).all()
        assert_matches_eager(got, want, f"generation {generation}")
        assert handle.stats == stats
        if generation == 0:
            captures = handle.graph_stats["captures"]
            # at least one graph per distinct attention-mode setting (a graph replays the attention
            # work it recorded: modes must key it)
            kinds = {(policy.attention_modes(i), policy.plan(i, steps).cfg_half) for i in range(steps)}
            assert len(kinds) <= captures < 2 * steps, (captures, len(kinds))
    assert handle.graph_stats["captures"] == captures
    assert handle.graph_stats["replays"] == 2 * steps  # the halved calls too
    frkern.unpatch(pipe)


# --- host inputs (Python-number timesteps, CPU tensors) enter a graph without a host sync ---------

class _FakeFence:
    """Stands in for the CUDA event after a graph's staging copies: `done` says whether the device
    has run them (at once if `instant`); the log shows the order of host waits, writes and records."""

    def __init__(self, log, instant):
        self.log, self.instant, self.done, self.recorded = log, instant, True, False

    def record(self):
        self.log.append("record")
        self.recorded, self.done = True, self.instant  # else a new copy is in flight

    def pending(self):
        return self.recorded and not self.done

    def wait(self):
        self.log.append("wait")
        self.done = True


def _fake_staging(device_type, log, pinned, instant=False):
    """HostStaging whose page-locked buffers are plain CPU tensors (listed in `pinned`) and whose
    fence is a _FakeFence, staging for static buffers on `device_type`."""

    class FakeStaging(HostStaging):
        device_types = (device_type,)

        @staticmethod
        def pin(like):
            buf = torch.empty(like.shape, dtype=like.dtype)
            pinned.append(buf)
            return buf

        @staticmethod
        def new_fence(device):
            return _FakeFence(log, instant)

    return FakeStaging


def test_host_staging_keeps_exact_values_and_waits_only_while_its_last_copy_is_pending(monkeypatch):
    log, pinned = [], []
    statics = [torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.float64), torch.zeros(2, 3)]
    staging = _fake_staging("cpu", log, pinned)(torch.device("cpu"), list(zip((0, 2, 3), statics)))
    copies = []
    real_copy = torch.Tensor.copy_

    def copy_(dst, src, non_blocking=False):
        copies.append((any(dst is p for p in pinned), any(src is p for p in pinned), non_blocking))
        log.append("write" if copies[-1][0] else "copy")
        return real_copy(dst, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    from frkern.graphs import host_timestep

    big = 2 ** 53 + 1  # not a float64: int64 keeps it
    x = torch.randn(3, 2).t()  # a non-contiguous CPU tensor
    for step, (t, u) in enumerate([(big, 0.1), (7, 1 / 3)]):
        waited = staging.load([host_timestep(t), "value", host_timestep(u), x + step])
        assert waited == (step == 1)
        assert statics[0].item() == t and statics[1].item() == u and torch.equal(statics[2], x + step)
        assert statics[0].dtype == torch.int64 and statics[1].dtype == torch.float64
        # each host input: written into its page-locked buffer on the host, then copied from there
        # to the static buffer with non_blocking=True
        assert copies == [(True, False, False), (False, True, True)] * 3
        copies.clear()
    # the second load found the first one's copies pending and waited before writing the buffers
    assert log == ["write", "copy"] * 3 + ["record", "wait"] + ["write", "copy"] * 3 + ["record"]
    staging.fence.done = True  # the device ran them: the next load does not wait
    assert staging.load([host_timestep(3), None, host_timestep(0.5), x]) is False and staging.waits == 1
    assert log[-7:] == ["write", "copy"] * 3 + ["record"]


def test_replays_copy_host_inputs_only_from_pinned_buffers_without_blocking(monkeypatch):
    # The staged path on a device without data (meta), as it runs on CUDA: every copy from the host
    # to the device in a replay must be non_blocking and come from a page-locked buffer; no
    # torch.tensor(..., device=) or .to(device) (each a blocking host-to-device copy on CUDA).
    log, pinned = [], []
    with torch.device("meta"):  # a one-level UNet: what is checked here runs around the network
        unet = sd_unet(layers_per_block=1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                       up_block_types=("CrossAttnUpBlock2D",), norm_num_groups=4)
        sample = torch.empty(2, 4, 8, 8)
    ehs = torch.randn(2, 7, unet.config.cross_attention_dim)  # a CPU tensor input, staged too
    policy = frkern.FRDiff(interval=2, score_mix=False)
    handle = frkern.patch(unet, policy, backend="torch", cuda_graphs=True)
    handle.graphs.capture = lambda fn, warmup=2: ((lambda: None), fn())  # replay: nothing to run
    handle.graphs.staging = _fake_staging("meta", log, pinned, instant=True)

    def generation(timestep):
        handle.begin(4)
        with torch.no_grad():
            for i in range(4):
                handle.set_step(i)
                assert unet(sample, timestep(900 - 100 * i), ehs).sample.device.type == "meta"

    kinds = [int, float, torch.tensor]  # Python numbers (int64, float64) and a 0-dim CPU tensor
    for kind in kinds:
        generation(kind)  # captures a full and a reuse graph per timestep kind
    assert handle.graph_stats["captures"] == 2 * len(kinds)

    events = []
    real_copy, real_to, real_tensor = torch.Tensor.copy_, torch.Tensor.to, torch.tensor

    def copy_(dst, src, non_blocking=False):
        if src.device.type == "cpu" and dst.device.type != "cpu":
            events.append(("h2d", non_blocking, any(src is p for p in pinned), src.tolist()))
        return real_copy(dst, src, non_blocking)

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            events.append(("to", out.device))
        return out

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            events.append(("tensor", kwargs["device"]))
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "tensor", tensor)
    for kind in kinds:
        events.clear()
        generation(kind)
        assert events and all(e[0] == "h2d" and e[1] and e[2] for e in events), events
        timesteps = [e[3] for e in events if not isinstance(e[3], list) or len(e[3]) <= 1]
        assert timesteps == [900 - 100 * i if kind is real_tensor else [kind(900 - 100 * i)] for i in range(4)]
        assert len(events) == 2 * 4  # the timestep and the encoder states, per call
    monkeypatch.undo()
    assert handle.graph_stats["captures"] == 2 * len(kinds) and handle.graph_stats["replays"] == 2 * 4 * len(kinds)
    # one fence per replay that loaded inputs (a capturing call's inputs are in its buffers already)
    assert log.count("record") == 2 * 4 * len(kinds) - 2 * len(kinds)
    assert "staging_waits" not in handle.graph_stats  # the fake device runs every copy at once


# --- real capture only (GPU stage): Triton Skip-Convolution and the Adaptive probe -----------------

@needs_cuda
def test_real_capture_replays_host_inputs_without_a_synchronizing_call():
    # torch.cuda.set_sync_debug_mode("error") raises on a blocking copy (a pageable host-to-device
    # copy_, torch.tensor(..., device="cuda")): steady-state replays with Python-number and CPU
    # tensor timesteps must make none.
    unet, ref_unet, inputs = unets_and_inputs()
    policy = frkern.FRDiff(interval=2, score_mix=False)
    handle = graphed(unet, policy, backend="triton")
    ref = frkern.patch(ref_unet, policy, backend="triton")
    sample, ehs, _ = inputs
    for kind in (int, float, torch.tensor):
        for steady in (False, True):
            handle.begin(4), ref.begin(4)
            for i in range(4):
                handle.set_step(i), ref.set_step(i)
                t = kind(900 - 100 * i)
                x = sample + 0.1 * i  # made before the checked region (not part of the replay)
                with torch.no_grad():
                    want = ref_unet(x, t, ehs).sample
                    torch.cuda.set_sync_debug_mode("error" if steady else "default")
                    try:
                        got = unet(x, t, ehs).sample
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                assert_matches_eager(got, want, (kind, i))
    assert handle.graph_stats["captures"] == 6


@needs_cuda
def test_real_capture_triton_skip_conv_equals_eager():
    # stateful units in real graphs: the Triton kernels move x_ref / z on in place in the graph's
    # buffers; the warm-up and capture runs must leave the state as the last call committed it
    policy = frkern.SkipConv(0.2, tile=4, interval=4)
    eager, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    eager_handle = frkern.patch(eager, policy, backend="triton")
    want = generate(eager, prompt, steps=7)
    pipe, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    handle = graphed(pipe, policy, backend="triton")
    for generation in range(2):
        assert_matches_eager(generate(pipe, prompt, steps=7), want, generation)
        assert_same_stats(handle.stats, eager_handle.stats)
    assert handle.graph_stats["captures"] == 2


@needs_cuda
@pytest.mark.parametrize("rule, reuse", [("accumulated", "clockwork"), ("first_block", "deepcache")])
def test_real_capture_adaptive_probe_equals_eager(rule, reuse):
    # the probe graph stops the network after the gate; the host reads its indicator between the
    # probe replay and the resumed (full or reuse) replay
    policy = frkern.Adaptive(0.3, rule=rule, reuse=reuse, max_reuse=3)
    eager_pipe, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    eager = frkern.patch(eager_pipe, policy, backend="triton")
    want = generate(eager_pipe, prompt, steps=10)
    pipe, prompt = on_device(make_sd_pipeline(), sd_prompt_kwargs())
    handle = graphed(pipe, policy, backend="triton")
    for generation in range(2):
        assert_matches_eager(generate(pipe, prompt, steps=10), want, generation)
        assert_same_stats(handle.stats, eager.stats)
    assert eager.stats["reuse"] > 0 and eager.stats["full"] > 1
    assert handle.graph_stats["captures"] == 4  # plain full, probe, full after a probe, reuse after a probe
