"""The contract every model family meets under every policy (the pattern of diffusers'
CacheTesterMixin): one suite parametrised over families x policies instead of per-family copies.

For each family (a tiny model of it) and each policy, on a hand-driven sequence of calls:
- NoReuse is bit-identical to the unpatched model; unpatch restores the very modules;
- each policy equals its independent statement (tests/reference_video.py, hook-based, on an
  unpatched copy; the adaptive rule: test_adaptive.RuleStatement; SkipConv: the fp64 definition in
  reference_skip_conv_video.VideoGatedConvHooks, 2-D and temporal convolutions), step by step;
- CUDA graphs (emulated on a CPU) give what eager gives, bit for bit;
- torch.compile of the patched model (a smaller model of each family, one mechanism each): no graph
  break, no recompile over generations.
A new family adds one row to FAMILIES (a builder and the call inputs); a new policy one row to
POLICIES with its statement.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

import frkern
from conftest import skip_unless_slow
from devices import EmulatedCapture
from reference import lam
from reference_video import ClockworkVideoHooks, DeepCacheVideoHooks, FRDiffVideoHooks
from test_adaptive import RuleStatement
from reference_skip_conv_video import VideoGatedConvHooks
from tiny import sd_inputs, sd_unet, sdxl_unet
from tiny_video import motion_inputs, motion_unet, svd_inputs, svd_unet, unet3d, unet3d_inputs

STEPS = 4
TOL = 1e-5  # fp32, relative L2 per call: reuse = input + cached branch, fused GroupNorm+SiLU rounding


def _image_inputs(unet, batch):
    sample, ehs, kw = sd_inputs(unet, batch=batch, size=8)
    return dict(sample=sample, encoder_hidden_states=ehs, **kw)


def _video_inputs(make_inputs):
    def inputs(unet, batch):
        kw = make_inputs(unet, batch=batch, frames=4, size=8)
        kw.pop("timestep"), kw.pop("return_dict", None)
        return kw
    return inputs


# family -> (builder, inputs(model, batch) -> call kwargs without timestep, FRDiff unit kinds)
FAMILIES = {
    "sd": (lambda: sd_unet(), _image_inputs, ("resnet", "transformer")),
    "sdxl": (lambda: sdxl_unet(), _image_inputs, ("resnet", "transformer")),
    "motion": (lambda: motion_unet(), _video_inputs(motion_inputs), ("resnet", "transformer", "temporal_transformer")),
    "unet3d": (lambda: unet3d(), _video_inputs(unet3d_inputs),
               ("resnet", "transformer", "temporal_transformer", "temporal_conv")),
    "svd": (lambda: svd_unet(), _video_inputs(svd_inputs), ("resnet", "temporal_transformer", "temporal_resnet")),
}


# Smaller models of each family for the compile test (2 levels, 1 layer per block): dynamo's tracing
# time grows with the number of modules, and the wrappers and guards are what is tested.
COMPILE_MODELS = {
    "sd": lambda: sd_unet(layers_per_block=1, block_out_channels=(32, 48), down_block_types=(
        "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "motion": lambda: motion_unet(levels=2, layers_per_block=1, adapter_overrides={"motion_layers_per_block": 1}),
    "unet3d": lambda: unet3d(layers_per_block=1, block_out_channels=(24, 40), down_block_types=(
        "CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
    "svd": lambda: svd_unet(layers_per_block=1, block_out_channels=(32, 64), num_attention_heads=(2, 4),
                            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
}


def calls(model, inputs, steps=STEPS, batch=2, seed=0, t0=900, dt=90):
    """`steps` calls of slowly changing latents at timesteps t0, t0 - dt, ..., as a sampler makes them."""
    kw = inputs(model, batch)
    g = torch.Generator().manual_seed(seed)
    x = kw.pop("sample")
    out = []
    for i in range(steps):
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        out.append(dict(kw, sample=x.clone(), timestep=torch.tensor(t0 - dt * i)))
    return out


def run_patched(model, handle, seq):
    outs = []
    with torch.no_grad():
        for i, kw in enumerate(seq):
            handle.set_step(i)
            outs.append(model(**kw, return_dict=False)[0])
    return outs


def run_plain(model, seq, before=lambda i: None):
    outs = []
    with torch.no_grad():
        for i, kw in enumerate(seq):
            before(i)
            outs.append(model(**kw, return_dict=False)[0])
    return outs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), (what, i)
        if tol == 0:
            assert torch.equal(a, b), (what, i, rel(a, b))
        else:
            assert rel(a, b) <= tol, (what, i, rel(a, b))


# --- statements -----------------------------------------------------------------------------------
def keyframes_of(policy, steps=STEPS):
    return {i for i, p in enumerate(policy.schedule(steps)) if p.keyframe}


def frdiff_statement(ref, kinds, policy, seq):
    hooks = FRDiffVideoHooks(ref, kinds=kinds)
    keys, key_out, outs = keyframes_of(policy, len(seq)), None, []
    with torch.no_grad():
        for i, kw in enumerate(seq):
            hooks.keyframe = i in keys
            mix = lam(i, len(seq), policy.bias) if policy.score_mix and i not in keys else 1.0
            if i in getattr(policy, "jumps", ()):  # a reduced-NFE jump: the keyframe's output
                mix = 0.0
            if mix == 0.0:
                outs.append(key_out.clone())
                continue
            out = ref(**kw, return_dict=False)[0]
            if i in keys:
                key_out = out
            outs.append(mix * out + (1 - mix) * key_out if mix < 1.0 else out)
    return outs


def segment_statement(hooks, policy, ref, seq):
    keys = keyframes_of(policy, len(seq))
    return run_plain(ref, seq, before=lambda i: setattr(hooks, "keyframe", i in keys))


class _OuterUnits(FRDiffVideoHooks):
    """FRDiff's units except those computed before the outermost level's downsampler (the UNet3D's
    transformer_in, the outermost down block), which compute on every call and give the adaptive
    indicator (First-Block-Cache's first block)."""

    def _hook(self, name, module, args, out):
        computed = name.startswith("down_blocks.0.") or name == "transformer_in"
        return None if computed else super()._hook(name, module, args, out)


def adaptive_statement(ref, kinds, policy, seq):
    if policy.reuse == "deepcache":
        hooks = DeepCacheVideoHooks(ref, policy.branch)
        gate = hooks.first_skipped_module
    elif policy.reuse == "clockwork":
        hooks = ClockworkVideoHooks(ref, policy.levels)
        gate = ref.down_blocks[policy.levels - 1].downsamplers[0]
    else:
        hooks = _OuterUnits(ref, kinds=kinds)
        gate = ref.down_blocks[0].downsamplers[0]
    statement = RuleStatement(policy, lambda keyframe: setattr(hooks, "keyframe", keyframe))
    handle = gate.register_forward_pre_hook(statement.pre_hook, with_kwargs=True)
    try:
        outs = run_plain(ref, seq, before=lambda i: setattr(statement, "step", i))
    finally:
        handle.remove()
    return outs, statement


# --- the matrix -----------------------------------------------------------------------------------
POLICIES = {
    "NoReuse": frkern.NoReuse(),
    "FRDiff": frkern.FRDiff(interval=2, score_mix=False),
    "FRDiff-mix": frkern.FRDiff(interval=3, score_mix=True, bias=0.3),
    "Keyframes-jumps": frkern.Keyframes(keyframes=(0, 2), num_steps=STEPS, jumps=(3,)),
    "DeepCache-0": frkern.DeepCache(interval=2, branch=0),
    "DeepCache-4": frkern.DeepCache(interval=3, branch=4),
    "Clockwork": frkern.Clockwork(clock=2, levels=1),
    "SkipConv": frkern.SkipConv(threshold=0.3, tile=4),
    "Adaptive-units": frkern.Adaptive(0.5, reuse="units", warmup=1, max_reuse=2),
    "Adaptive-deepcache": frkern.Adaptive(0.5, rule="accumulated", reuse="deepcache", branch=1, warmup=1,
                                          max_reuse=2, poly=(2.0, 0.0)),
    "Adaptive-clockwork": frkern.Adaptive(0.5, reuse="clockwork", levels=1, warmup=1, max_reuse=2),
}


def statement_outputs(name, policy, ref, kinds, seq):
    if name == "NoReuse":
        return run_plain(ref, seq), 0, None
    if name.startswith("FRDiff") or name.startswith("Keyframes"):
        return frdiff_statement(ref, kinds, policy, seq), TOL, None
    if name.startswith("DeepCache"):
        return segment_statement(DeepCacheVideoHooks(ref, policy.branch), policy, ref, seq), 0, None
    if name == "Clockwork":
        return segment_statement(ClockworkVideoHooks(ref, policy.levels), policy, ref, seq), 0, None
    if name == "SkipConv":
        hooks = VideoGatedConvHooks(ref, tile=policy.tile, threshold=policy.threshold)
        keys = keyframes_of(policy, len(seq))
        return run_plain(ref, seq, before=lambda i: setattr(hooks, "keyframe", i in keys)), 1e-5, None
    outs, statement = adaptive_statement(ref, kinds, policy, seq)
    return outs, TOL, statement


# On the video families, rows whose mechanism another row already runs there (units without mixing:
# FRDiff-mix's reuse steps; a second DeepCache branch; the third adaptive reuse kind: Clockwork's cut
# and Adaptive's decision each have rows) run in the extended tier, as do the graph rows other than
# a segment cut and the stateful SkipConv: the default run stays within its 10-minute budget.
VIDEO = ("motion", "unet3d", "svd")
EXTENDED_ON_VIDEO = {"FRDiff", "DeepCache-0", "Adaptive-clockwork"}
GRAPHS_ON_VIDEO = {"DeepCache-4", "SkipConv"}
# sdxl is the sd family's class with another layout: its cuts and units by default, the rest extended
SDXL_DEFAULT = {"NoReuse", "FRDiff-mix", "DeepCache-4", "Clockwork", "SkipConv", "Adaptive-units"}
GRAPHS_ON_SDXL = {"DeepCache-4"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_case(request):
    make, inputs, kinds = FAMILIES[request.param]
    model = make()
    return request.param, model, inputs, kinds


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_equals_its_statement_and_unpatch_restores(family_case, name, request):
    family, base, inputs, kinds = family_case
    if (family in VIDEO and name in EXTENDED_ON_VIDEO) or (family == "sdxl" and name not in SDXL_DEFAULT):
        skip_unless_slow(request, f"{name} on {family}")
    policy = POLICIES[name]
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    seq = calls(model, inputs)
    modules = dict(model.named_modules())
    want, tol, statement = statement_outputs(name, policy, ref, kinds, seq)

    handle = frkern.patch(model, policy, backend="torch")
    handle.begin(STEPS)
    got = run_patched(model, handle, seq)
    assert_close(got, want, tol, f"{family} {name}")
    stats = handle.stats
    if statement is not None:  # the adaptive rule decided as stated, both ways
        assert stats["reuse"] == sum(statement.decisions) > 0, (stats, statement.decisions)
        assert not all(statement.decisions[policy.warmup:]), statement.decisions
        for i, v in statement.values.items():
            assert math.isclose(stats["indicator"][i], v, rel_tol=1e-5), (i, stats["indicator"][i], v)
    elif name != "NoReuse":
        assert stats.get("reuse", 0) + stats.get("skip", 0) == STEPS - len(keyframes_of(policy)), stats
        assert handle.cache_bytes > 0

    frkern.unpatch(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules()), "unpatch left a wrapper in the tree"
    assert "forward" not in model.__dict__
    assert_close(run_plain(model, seq[:1]), run_plain(base, seq[:1]), 0, "after unpatch")


@pytest.mark.parametrize("name", ["FRDiff-mix", "DeepCache-4", "SkipConv", "Adaptive-units"])
def test_emulated_cuda_graphs_equal_eager(family_case, name, request):
    family, base, inputs, _ = family_case
    if (family in VIDEO and name not in GRAPHS_ON_VIDEO) or (family == "sdxl" and name not in GRAPHS_ON_SDXL):
        skip_unless_slow(request, f"graphs of {name} on {family}")
    policy = POLICIES[name]
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    seq = calls(base, inputs)
    h_eager = frkern.patch(eager, policy, backend="torch")
    h_graph = frkern.patch(graphed, policy, backend="torch", cuda_graphs=True)
    h_graph.graphs.capture = EmulatedCapture()
    for generation in range(2):
        h_eager.begin(STEPS), h_graph.begin(STEPS)
        assert_close(run_patched(graphed, h_graph, seq), run_patched(eager, h_eager, seq), 0, f"{family} {name}")
        assert h_graph.stats == h_eager.stats
    assert h_graph.graph_stats["captures"] > 0 and h_graph.graph_stats["replays"] > 0


# One mechanism per family, alternating (compiling costs 10-30 s a case on a CPU): units with score
# mixing and its jump copy, or a segment cut; tests/test_compile.py compiles FRDiff and SkipConv
# through a whole SD pipeline.
COMPILED = {"sd": frkern.DeepCache(interval=2, branch=1), "motion": frkern.FRDiff(interval=3, bias=0.3),
            "unet3d": frkern.DeepCache(interval=2, branch=1), "svd": frkern.FRDiff(interval=3, bias=0.3)}
# svd's units also run with an int8 cache: the compiled reuse call reads the encoded states and
# decodes them in its consumers (norm2's prologue, input + branch)
COMPILED_CACHE = {"svd": "int8"}


# svd by default (units, with an int8 cache); sd (a segment cut), motion and unet3d in the extended tier
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f != "svd" else f
                                    for f in COMPILE_MODELS])
def test_compiled_patched_model_has_no_breaks_and_no_recompiles(family):
    policy = COMPILED[family]
    base = COMPILE_MODELS[family]()
    stats = assert_compiles_once(base, policy, calls(base, FAMILIES[family][1], batch=1), STEPS,
                                 cache=COMPILED_CACHE.get(family), what=f"{family} {policy.name}")
    assert stats.get("reuse", 0) + stats.get("skip", 0) > 0


def assert_compiles_once(base, policy, seq, steps, cache=None, what=""):
    """torch.compile of a patched copy of `base` (fullgraph: a graph break raises) equals an eager
    patched copy bit for bit over two generations of `seq`, the second compiling nothing; returns
    the eager run's stats (the compiled one's are asserted equal)."""
    model, eager = copy.deepcopy(base), copy.deepcopy(base)
    h_eager = frkern.patch(eager, policy, backend="torch", cache=cache)
    handle = frkern.patch(model, policy, backend="torch", cache=cache)
    h_eager.begin(steps)
    want = run_patched(eager, h_eager, seq)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for generation in range(2):
        handle.begin(steps)
        with torch._dynamo.config.patch(error_on_recompile=generation > 0):
            got = run_patched(compiled, handle, seq)
        assert_close(got, want, 0, f"{what} generation {generation}")
        assert handle.stats == h_eager.stats
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()
    return h_eager.stats
