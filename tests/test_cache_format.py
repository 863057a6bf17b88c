"""The cache format (`frkern.patch(..., cache=...)`): every cached tensor of every policy is stored
encoded and read decoded, and a patched model equals its policy's independent statement with each
stored tensor replaced by the format's quantize-dequantize (tests/reference_quant.py, written from
the definition apart from frkern), step by step.

Statements: the hook-based ones of the contract suite (tests/reference_video.py: FRDiff units,
DeepCache and Clockwork segments; test_adaptive.RuleStatement for the adaptive reference), with
what they record on a keyframe passed through qdq first; the keyframe's output (score mixing) too.
Tolerances as the contract suite's: 0 for segment policies, TOL for units (fused GroupNorm+SiLU).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import frkern
from reference_quant import qdq_statement
from reference_video import ClockworkVideoHooks, DeepCacheVideoHooks, FRDiffVideoHooks
from test_adaptive import RuleStatement
from test_contract import FAMILIES, STEPS, TOL, assert_close, calls, keyframes_of, run_patched, run_plain
from devices import EmulatedCapture
from reference import lam
from tiny import sd_inputs

FORMATS = {
    "fp16": frkern.CacheFormat("fp16"),
    "bf16": frkern.CacheFormat("bf16"),
    "int8": frkern.CacheFormat("int8"),
    "int8-group": frkern.CacheFormat("int8", scales="group", group_size=16),
    "fp8": frkern.CacheFormat("fp8_e4m3"),
}


def qdq(fmt: frkern.CacheFormat):
    """The format's round trip on one stored value (a pytree), from the statement's definition:
    floating tensors of 2 or more dims are encoded, anything else is kept."""

    def one(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            return t
        if fmt.dtype in ("fp16", "bf16"):
            return t.to({"fp16": torch.float16, "bf16": torch.bfloat16}[fmt.dtype]).to(t.dtype)
        return qdq_statement(t, fmt.dtype, fmt.scales, fmt.group_size)

    def tree(v):
        if isinstance(v, (tuple, list)):
            return type(v)(tree(x) for x in v)
        if isinstance(v, dict):
            return {k: tree(x) for k, x in v.items()}
        return one(v)

    return tree


def in_feature_layout(round_trip):
    """Scales belong to a feature map's (sample, channel): a linear projection's output (tokens,
    channels last: (N, HW, C), SVD's spatio-temporal transformers) is cached laid out as (N, C, H, W),
    so its round trip runs in that layout."""

    def tree(v):
        if isinstance(v, torch.Tensor) and v.dim() == 3:
            return round_trip(v.transpose(1, 2)).transpose(1, 2)
        return round_trip(v)

    return tree


def stored_through(hooks, round_trip):
    """A statement's hooks whose keyframe records are passed through `round_trip` (the keyframe
    itself computes on with the fresh value, as frkern's keyframe does)."""
    take = hooks._take
    round_trip = in_feature_layout(round_trip)

    def _take(name, value):
        if hooks.keyframe:
            take(name, round_trip(value))
            return None
        return take(name, value)

    hooks._take = _take
    return hooks


POLICIES = {
    "FRDiff-mix": frkern.FRDiff(interval=3, score_mix=True, bias=0.3),
    "DeepCache-1": frkern.DeepCache(interval=2, branch=1),
    "Clockwork": frkern.Clockwork(clock=2, levels=1),
    "Adaptive-units": frkern.Adaptive(0.5, reuse="units", warmup=1, max_reuse=2),
}


def statement(name, policy, ref, kinds, seq, rt):
    if name.startswith("FRDiff"):
        hooks = stored_through(FRDiffVideoHooks(ref, kinds=kinds), rt)
        keys, key_out, outs = keyframes_of(policy, len(seq)), None, []
        with torch.no_grad():
            for i, kw in enumerate(seq):
                hooks.keyframe = i in keys
                mix = lam(i, len(seq), policy.bias) if policy.score_mix and i not in keys else 1.0
                out = ref(**kw, return_dict=False)[0]
                if i in keys:
                    key_out = rt(out)  # the keyframe's output is a cached tensor too
                outs.append(mix * out + (1 - mix) * key_out if mix < 1.0 else out)
        return outs, TOL
    if name.startswith("DeepCache") or name == "Clockwork":
        hooks = (DeepCacheVideoHooks(ref, policy.branch) if name.startswith("DeepCache")
                 else ClockworkVideoHooks(ref, policy.levels))
        stored_through(hooks, rt)
        keys = keyframes_of(policy, len(seq))
        return run_plain(ref, seq, before=lambda i: setattr(hooks, "keyframe", i in keys)), 0
    # Adaptive (units, first_block): the outermost down block computes on every call; the reference
    # input of the indicator is a cached tensor, so the rule compares with its round trip
    hooks = stored_through(_outer_units(ref, kinds), rt)
    rule = RuleStatement(policy, lambda keyframe: setattr(hooks, "keyframe", keyframe))
    pre = rule.pre_hook

    def pre_hook(module, args, kwargs):
        pre(module, args, kwargs)
        if not rule.decisions[-1]:  # a full call: its gate input became the reference
            rule.key = rt(rule.key)

    handle = ref.down_blocks[0].downsamplers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        return run_plain(ref, seq, before=lambda i: setattr(rule, "step", i)), TOL
    finally:
        handle.remove()


def _outer_units(ref, kinds):
    hooks = FRDiffVideoHooks(ref, kinds=kinds)
    take = hooks._take
    hooks._take = lambda name, value: None if name.startswith("down_blocks.0.") or name == "transformer_in" \
        else take(name, value)
    return hooks


# Every policy in int8 and fp8; the cast formats and group scales (one code path per policy kind:
# units, segments) on FRDiff and DeepCache.
CASES = [(f, p, "sd") for f in FORMATS for p in POLICIES
         if f == "int8" or p in ("FRDiff-mix", "DeepCache-1")] + [("int8", "FRDiff-mix", "svd")] + [
    pytest.param("fp8", p, "sd", marks=pytest.mark.slow) for p in ("Clockwork", "Adaptive-units")] + [
    pytest.param(f, p, "svd", marks=pytest.mark.slow)  # extended tier: the same paths as above
    for f, p in (("fp8", "FRDiff-mix"), ("int8", "DeepCache-1"), ("fp8", "DeepCache-1"))]


@pytest.mark.parametrize("fmt, name, family", CASES)
def test_each_format_equals_the_statement_with_its_round_trip(fmt, name, family):
    make, inputs, kinds = FAMILIES[family]
    base = make()
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    seq = calls(base, inputs)
    policy, cache = POLICIES[name], FORMATS[fmt]
    handle = frkern.patch(model, policy, backend="torch", cache=cache)
    handle.begin(STEPS)
    got = run_patched(model, handle, seq)
    want, tol = statement(name, policy, ref, kinds, seq, qdq(cache))
    assert_close(got, want, tol, f"{family} {name} {fmt}")
    assert handle.stats.get("reuse", 0) + handle.stats.get("skip", 0) > 0, handle.stats
    # and the round trip changed something: the statement without it differs
    if cache.dtype in ("int8", "fp8_e4m3"):
        plain, _ = statement(name, policy, copy.deepcopy(base), kinds, seq, lambda v: v)
        assert any(not torch.equal(a, b) for a, b in zip(got, plain))


def test_default_format_is_the_uncompressed_cache():
    make, inputs, _ = FAMILIES["sd"]
    base = make()
    seq = calls(base, inputs)
    outs = {}
    for cache in (None, "model", frkern.CacheFormat()):
        model = copy.deepcopy(base)
        handle = frkern.patch(model, POLICIES["FRDiff-mix"], backend="torch", cache=cache)
        assert handle.runtime.cache.codec is None and handle.cache_format == frkern.CacheFormat()
        handle.begin(STEPS)
        outs[repr(cache)] = run_patched(model, handle, seq)
    first = next(iter(outs.values()))
    for got in outs.values():
        assert all(torch.equal(a, b) for a, b in zip(got, first))


@pytest.mark.parametrize("name", list(POLICIES))
def test_int8_and_fp8_at_least_halve_the_bytes_of_an_fp16_cache(name):
    # 16x16 latents: the smallest maps (4x4) still have 16 values per float32 scale
    make, _, _ = FAMILIES["sd"]
    base = make()
    sample, ehs, _ = sd_inputs(base, batch=2, size=16)
    seq = [dict(sample=sample, encoder_hidden_states=ehs, timestep=torch.tensor(900))]  # one keyframe
    sizes = {}
    formats = dict(FORMATS, **{"int8-group": frkern.CacheFormat("int8", scales="group", group_size=64)})
    for fmt in ("fp16", "int8", "int8-group", "fp8"):
        model = copy.deepcopy(base)
        handle = frkern.patch(model, POLICIES[name], backend="torch", cache=formats[fmt])
        handle.begin(STEPS)
        run_patched(model, handle, seq)
        sizes[fmt] = handle.cache_bytes
    assert sizes["fp16"] > 0
    for fmt in ("int8", "int8-group", "fp8"):
        assert sizes[fmt] <= 0.55 * sizes["fp16"], sizes


def test_cache_format_validation_and_json():
    f = frkern.CacheFormat("int8", scales="group", group_size=32)
    assert frkern.CacheFormat.from_json(f.to_json()) == f
    assert json.loads(f.to_json())["cache_format"] == 1
    for bad, match in [(dict(dtype="int4"), "cache format 'int4' not supported"),
                       (dict(dtype="int8", scales="row"), "cache scales 'row'"),
                       (dict(dtype="int8", group_size=0), "group_size must be an int >= 1"),
                       (dict(dtype="int8", group_size=True), "group_size must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            frkern.CacheFormat(**bad)
    with pytest.raises(ValueError, match="unknown cache format fields"):
        frkern.CacheFormat.from_json('{"cache_format": 1, "dtype": "int8", "bits": 4}')
    with pytest.raises(ValueError, match="not a cache format of version 1"):
        frkern.CacheFormat.from_json('{"dtype": "int8"}')


def _untouched(unet, modules_before):
    return (frkern.handle_of(unet) is None if hasattr(frkern, "handle_of") else True) and \
        all(m is modules_before[n] for n, m in unet.named_modules())


@pytest.mark.parametrize("cache, error, match", [
    ("int4", ValueError, "cache format 'int4' not supported; accepted: model, fp16, bf16, int8, fp8_e4m3"),
    (8, TypeError, "cache must be a format name"),
])
def test_bad_formats_are_refused_before_anything_is_patched(cache, error, match):
    unet = FAMILIES["sd"][0]()
    before = dict(unet.named_modules())
    with pytest.raises(error, match=match):
        frkern.patch(unet, frkern.FRDiff(3), cache=cache)
    assert _untouched(unet, before)


def test_skipconv_state_is_refused_in_a_compressed_format():
    unet = FAMILIES["sd"][0]()
    before = dict(unet.named_modules())
    with pytest.raises(ValueError, match="cannot hold SkipConv's state.*policy SkipConv"):
        frkern.patch(unet, frkern.SkipConv(0.1), cache="int8")
    assert _untouched(unet, before)
    frkern.unpatch(frkern.patch(unet, frkern.SkipConv(0.1), cache="model"))  # its exact format works


def test_fp8_is_refused_where_torch_has_no_float8(monkeypatch):
    unet = FAMILIES["sd"][0]()
    before = dict(unet.named_modules())
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="fp8_e4m3 needs torch.float8_e4m3fn"):
        frkern.patch(unet, frkern.FRDiff(3), cache="fp8_e4m3")
    assert _untouched(unet, before)


def test_a_copy_keeps_the_format_and_a_new_shape_is_never_read_stale():
    make, inputs, _ = FAMILIES["sd"]
    base = make()
    model = copy.deepcopy(base)
    handle = frkern.patch(model, frkern.FRDiff(interval=2, score_mix=False), backend="torch", cache="int8")
    twin = copy.deepcopy(model)
    assert frkern.handle_of(twin).cache_format == frkern.CacheFormat("int8")
    assert frkern.handle_of(twin).runtime.cache.codec is not None
    handle.begin(STEPS)
    run_patched(model, handle, calls(base, inputs)[:1])
    # a reuse call at another batch size computes in full (a miss), never decodes the old cache
    other = calls(base, inputs, batch=1)[1:2]
    handle.set_step(1)
    with torch.no_grad():
        out = model(**other[0], return_dict=False)[0]
    with torch.no_grad():
        want = base(**other[0], return_dict=False)[0]
    assert rel_ok(out, want)


def rel_ok(a, b, tol=TOL):
    return ((a.double() - b.double()).norm() / b.double().norm()).item() <= tol


@pytest.mark.parametrize("name", ["FRDiff-mix", "Adaptive-units"])
def test_emulated_cuda_graphs_equal_eager_in_a_compressed_format(name):
    """The codec runs on the host side of a call (commit after it, reads before it): the graphs'
    replays read the decoded features as eager does (torch.compile traces the same network: the
    codec is outside it as well)."""
    make, inputs, _ = FAMILIES["sd"]
    base = make()
    seq = calls(base, inputs)
    policy = POLICIES[name]
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    h_eager = frkern.patch(eager, policy, backend="torch", cache="int8")
    h_graph = frkern.patch(graphed, policy, backend="torch", cache="int8", cuda_graphs=True)
    h_graph.graphs.capture = EmulatedCapture()
    for generation in range(2):
        h_eager.begin(STEPS), h_graph.begin(STEPS)
        assert_close(run_patched(graphed, h_graph, seq), run_patched(eager, h_eager, seq), 0, f"graphs {name}")
        assert h_graph.stats == h_eager.stats
    assert h_graph.graph_stats["replays"] > 0


def test_resnet_and_branch_caches_are_coded_inside_their_consumers():
    """int8 FRDiff: a keyframe's ResNet conv1 outputs are encoded by the fused norm2 (no
    quantize_cache pass for them), a reuse call decodes them in norm2's prologue and the transformer
    branches inside `input + branch` (dequantize_add): no separate decode pass at all."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    make, inputs, _ = FAMILIES["sd"]
    model = make()
    seq = calls(model, inputs)
    transformers = sum(isinstance(m, Transformer2DModel) for m in model.modules())
    handle = frkern.patch(model, frkern.FRDiff(interval=2, score_mix=False), backend="torch", cache="int8")
    handle.begin(STEPS)
    frkern.kernel_report(reset=True)
    got = run_patched(model, handle, seq)
    report = frkern.kernel_report(reset=True)
    assert handle.stats == {"full": 2, "reuse": 2} and all(torch.isfinite(t).all() for t in got)
    assert transformers > 0
    assert report["quantize_cache"]["torch"] == 2 * transformers  # the branches, at each keyframe
    assert report["dequantize_cache"]["torch"] == 0
    assert report["dequantize_add"]["torch"] == 2 * transformers  # each branch, at each reuse call

