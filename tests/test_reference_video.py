"""Checks of the video statements themselves (tests/reference_video.py) on the tiny video models of
tests/tiny_video.py: they run, keyframes are the plain model bit for bit, reuse on the same input
reproduces it, reuse on another input is not a no-op and replaces exactly the modules the
definitions name, the residual claims about diffusers' forwards hold, and DeepCacheVideoHooks is
the `DeepCache` package's own SVD implementation (final latents bit for bit)."""
from __future__ import annotations

import functools
import importlib
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.resnet import SpatioTemporalResBlock

import tiny_video as tv
from reference_video import (
    KINDS,
    ClockworkVideoHooks,
    DeepCacheVideoHooks,
    FRDiffVideoHooks,
    frdiff_units,
)

FAMILIES = {
    "motion": (tv.motion_unet, tv.motion_inputs),
    "unet3d": (tv.unet3d, tv.unet3d_inputs),
    "svd": (tv.svd_unet, tv.svd_inputs),
}
SMALL = dict(batch=1, frames=3, size=8)


@functools.cache
def model(family):
    return FAMILIES[family][0]()


@functools.cache
def inputs(family, seed):
    return FAMILIES[family][1](model(family), seed=seed, **SMALL)


@functools.cache
def plain(family, seed):
    with torch.no_grad():
        return model(family)(**inputs(family, seed))[0]


def _call(family, seed):
    with torch.no_grad():
        return model(family)(**inputs(family, seed))[0]


# ---------------------------------------------------------------------------------------------
# builders and pipelines
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_builder_runs(family):
    build, make_inputs = FAMILIES[family]
    m = model(family)
    assert not m.training and next(m.parameters()).dtype == torch.float32
    kw = make_inputs(m)  # the helper's defaults: batch 2, 8 frames (SVD 4), 16x16
    with torch.no_grad():
        out = m(**kw)[0]
    s = kw["sample"]
    if family == "svd":  # (B, F, C, H, W); 8 input channels (noise + image latents) -> 4
        assert s.shape == (2, 4, 8, 16, 16) and out.shape == (2, 4, 4, 16, 16)
        assert kw["encoder_hidden_states"].shape == (2, 1, 32) and kw["added_time_ids"].shape == (2, 3)
    else:  # (B, C, F, H, W)
        assert s.shape == (2, 4, 8, 16, 16) and out.shape == s.shape
    assert torch.isfinite(out).all()
    # same seed, same weights
    assert all(torch.equal(a, b) for a, b in zip(build().state_dict().values(), m.state_dict().values()))


def test_motion_adapter_and_temp_convs():
    a = tv.motion_adapter()
    assert len(a.down_blocks) == 3 and a.mid_block is not None and len(a.up_blocks[0].motion_modules) == 3
    m = model("motion")
    # from_unet2d loaded the adapter's motion modules (seed 1) into the UNet
    assert torch.equal(m.down_blocks[1].motion_modules[0].proj_out.weight,
                       tv.motion_adapter(1).down_blocks[1].motion_modules[0].proj_out.weight)
    # UNet3D: the temp convs' conv4 is re-drawn (diffusers zero-initialises it) unless asked not to
    z = tv.unet3d(zero_temp_convs=True)
    assert not z.down_blocks[0].temp_convs[0].conv4[-1].weight.any()
    assert model("unet3d").down_blocks[0].temp_convs[0].conv4[-1].weight.abs().sum() > 0


def _gen():
    return torch.Generator().manual_seed(0)


def test_pipelines_run():
    steps = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)
    with torch.no_grad():
        pipe = tv.animatediff_pipeline()
        video = pipe(**tv.prompt_kwargs(), num_frames=5, generator=_gen(), output_type="pt",
                     return_dict=False, **steps)[0]
        assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()

        pipe = tv.animatediff_v2v_pipeline()
        lat = pipe(video=torch.rand(1, 4, 3, 32, 32, generator=_gen()), strength=0.7, **tv.prompt_kwargs(),
                   generator=_gen(), output_type="latent", return_dict=False, **steps)[0]
        assert lat.shape == (1, 4, 4, 16, 16) and torch.isfinite(lat).all()

        pipe = tv.t2v_pipeline()
        lat = pipe(**tv.prompt_kwargs(), num_frames=5, generator=_gen(), output_type="latent",
                   return_dict=False, **steps)[0]
        assert lat.shape == (1, 4, 5, 16, 16) and torch.isfinite(lat).all()

        pipe = tv.svd_pipeline()
        video = pipe(tv.svd_image(), height=32, width=32, num_frames=5, num_inference_steps=3,
                     generator=_gen(), output_type="pt", return_dict=False)
        assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()


# ---------------------------------------------------------------------------------------------
# the statements' protocol
# ---------------------------------------------------------------------------------------------

STATEMENTS = {
    "frdiff": lambda m: FRDiffVideoHooks(m),
    "deepcache0": lambda m: DeepCacheVideoHooks(m, 0),
    "deepcache2": lambda m: DeepCacheVideoHooks(m, 2),
    "deepcache4": lambda m: DeepCacheVideoHooks(m, 4),
    "deepcache7": lambda m: DeepCacheVideoHooks(m, 7),
    "clockwork1": lambda m: ClockworkVideoHooks(m, 1),
    "clockwork3": lambda m: ClockworkVideoHooks(m, 3),
}
CASES = [(f, s) for f in FAMILIES for s in STATEMENTS]


@functools.cache
def protocol(family, stmt):
    """keyframe on x1, non-keyframe on x1, non-keyframe on x2; what each call recorded/replaced."""
    m = model(family)
    st = STATEMENTS[stmt](m)
    try:
        st.keyframe = True
        key = _call(family, 1)
        rec = list(st.recorded)
        st.keyframe = False
        same = _call(family, 1)
        sub_same = list(st.substituted)
        other = _call(family, 2)
        sub_other = list(st.substituted), list(st.recorded)
    finally:
        st.remove()
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    return dict(key=key, rec=rec, same=same, sub_same=sub_same, other=other, sub_other=sub_other, st=st)


@pytest.mark.parametrize("family,stmt", CASES)
def test_keyframe_is_plain_model_bitwise(family, stmt):
    r = protocol(family, stmt)
    assert torch.equal(r["key"], plain(family, 1))


@pytest.mark.parametrize("family,stmt", CASES)
def test_reuse_on_same_input_reproduces_keyframe(family, stmt):
    r = protocol(family, stmt)
    if stmt == "frdiff":
        torch.testing.assert_close(r["same"], r["key"], rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(r["same"], r["key"])


@pytest.mark.parametrize("family,stmt", CASES)
def test_reuse_on_other_input_is_not_a_noop(family, stmt):
    r = protocol(family, stmt)
    full = plain(family, 2)
    assert torch.isfinite(r["other"]).all()
    assert (r["other"] - full).abs().max() > 1e-4 * full.abs().max()
    # every recorded value is replaced on each later call, each exactly once, nothing recorded then
    assert r["sub_same"] == r["rec"] and r["sub_other"] == (r["rec"], [])
    assert len(set(r["rec"])) == len(r["rec"])


# -- explicit expected units (tiny configs: 3 levels; down cross, cross, plain; up plain, cross,
#    cross; 2 layers per down block, 3 per up block, 1 mid layer) ------------------------------

def names(prefix, blocks, lst, n, suffix=""):
    return [f"{prefix}.{b}.{lst}.{i}{suffix}" for b in blocks for i in range(n)]


def mid(lst, n, suffix=""):
    return [f"mid_block.{lst}.{i}{suffix}" for i in range(n)]


def all_resnets(suffix=""):
    return names("down_blocks", (0, 1, 2), "resnets", 2, suffix) + mid("resnets", 2, suffix) \
        + names("up_blocks", (0, 1, 2), "resnets", 3, suffix)


def cross(lst):  # a per-layer list only the cross-attention blocks (and the mid block) have
    return names("down_blocks", (0, 1), lst, 2) + mid(lst, 1) + names("up_blocks", (1, 2), lst, 3)


def every(lst):  # a per-layer list every block has
    return names("down_blocks", (0, 1, 2), lst, 2) + names("up_blocks", (0, 1, 2), lst, 3)


EXPECTED_FRDIFF = {
    "motion": {
        "resnet": all_resnets(),
        "transformer": cross("attentions"),
        "temporal_transformer": every("motion_modules") + mid("motion_modules", 1),
    },
    "unet3d": {
        "resnet": all_resnets(),
        "transformer": cross("attentions"),
        "temporal_transformer": ["transformer_in"] + cross("temp_attentions"),
        "temporal_conv": every("temp_convs") + mid("temp_convs", 2),
    },
    "svd": {
        "resnet": all_resnets(".spatial_res_block"),
        "temporal_transformer": cross("attentions"),
        "temporal_resnet": all_resnets(".temporal_res_block"),
    },
}

# per-layer module lists of a cross-attention block and of a plain block, per family
LAYER = {
    "motion": (("resnets", "attentions", "motion_modules"), ("resnets", "motion_modules")),
    "unet3d": (("resnets", "temp_convs", "attentions", "temp_attentions"), ("resnets", "temp_convs")),
    "svd": (("resnets", "attentions"), ("resnets",)),
}


def layer(family, block, i):
    """Every module of layer i of down_blocks.b / up_blocks.k (block = 'down_blocks.0' etc)."""
    is_cross = block in ("down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2")
    return [f"{block}.{lst}.{i}" for lst in LAYER[family][0 if is_cross else 1]]


def expected_deepcache(family, branch):
    L = functools.partial(layer, family)
    return sorted({
        0: ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1",
            *L("up_blocks.2", 0), *L("up_blocks.2", 1)],
        2: ["down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.2", "mid_block",
            "up_blocks.0", "up_blocks.1"],
        4: [*L("down_blocks.1", 1), "down_blocks.1.downsamplers.0", "down_blocks.2", "mid_block",
            "up_blocks.0", *L("up_blocks.1", 0)],
        7: [*L("down_blocks.2", 1), "mid_block", *L("up_blocks.0", 0)],
    }[branch])


def test_expected_lists_spelled_out():
    # one instance written out in full, so the helpers above are not taken on trust
    assert expected_deepcache("unet3d", 4) == sorted([
        "down_blocks.1.resnets.1", "down_blocks.1.temp_convs.1", "down_blocks.1.attentions.1",
        "down_blocks.1.temp_attentions.1", "down_blocks.1.downsamplers.0", "down_blocks.2", "mid_block",
        "up_blocks.0", "up_blocks.1.resnets.0", "up_blocks.1.temp_convs.0", "up_blocks.1.attentions.0",
        "up_blocks.1.temp_attentions.0"])
    assert expected_deepcache("svd", 7) == ["down_blocks.2.resnets.1", "mid_block", "up_blocks.0.resnets.0"]
    assert len(EXPECTED_FRDIFF["motion"]["resnet"]) == 6 + 2 + 9
    assert EXPECTED_FRDIFF["svd"]["temporal_transformer"] == [
        "down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1", "up_blocks.1.attentions.2", "up_blocks.2.attentions.0",
        "up_blocks.2.attentions.1", "up_blocks.2.attentions.2"]


@pytest.mark.parametrize("family,stmt", CASES)
def test_replaced_modules_are_the_defined_ones(family, stmt):
    r = protocol(family, stmt)
    st = r["st"]
    if stmt == "frdiff":
        exp = EXPECTED_FRDIFF[family]
        assert st.units == {n: k for k, ns in exp.items() for n in ns}
        assert sorted(r["sub_other"][0]) == sorted(n for ns in exp.values() for n in ns)
    elif stmt.startswith("deepcache"):
        exp = expected_deepcache(family, int(stmt[len("deepcache"):]))
        assert st.skipped_names == exp
        assert sorted(r["sub_other"][0]) == exp
        # the first unit in the statement's forward order is the first one the forward reaches
        assert r["sub_other"][0][0] == st.first_skipped_name
    else:
        levels = int(stmt[len("clockwork"):])
        assert r["sub_other"][0] == [f"up_blocks.{3 - levels}:hidden_states"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_frdiff_single_kind(family, kind):
    m = model(family)
    st = FRDiffVideoHooks(m, kinds={kind})
    try:
        assert st.units == {n: kind for n in EXPECTED_FRDIFF[family].get(kind, [])}
        if not st.units:  # a kind the family lacks: no hooks, the statement is the plain model
            assert len(st.handles) == 1
            return
        st.keyframe = True
        assert torch.equal(_call(family, 1), plain(family, 1))
        st.keyframe = False
        out = _call(family, 2)
        assert sorted(st.substituted) == sorted(st.units)
        full = plain(family, 2)
        assert (out - full).abs().max() > 1e-4 * full.abs().max(), f"{kind} reuse is a no-op"
    finally:
        st.remove()


def test_bad_arguments():
    m = model("motion")
    with pytest.raises(ValueError):
        FRDiffVideoHooks(m, kinds={"resnets"})
    with pytest.raises(ValueError):
        DeepCacheVideoHooks(m, -1)
    with pytest.raises(ValueError):
        ClockworkVideoHooks(m, 4)
    st = DeepCacheVideoHooks(m, 3)
    st.keyframe = False
    try:
        with pytest.raises(RuntimeError, match="before any keyframe"):
            _call("motion", 1)
    finally:
        st.remove()


# ---------------------------------------------------------------------------------------------
# the residual claims about diffusers' forwards
# ---------------------------------------------------------------------------------------------

def _first(x):
    if isinstance(x, tuple):
        return x[0]
    return getattr(x, "sample", x)


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_branches_are_output_minus_input(family):
    """Zeroing a transformer / temporal transformer / temporal conv unit makes its module the
    identity, bit for bit: module output = input + (a reshape of) the unit's output."""
    m = model(family)
    seen, handles = {}, []
    for name, kind, unit in frdiff_units(m, {"transformer", "temporal_transformer", "temporal_conv"}):
        owner = m.get_submodule(name)

        def pre(mod, args, kwargs, name=name):
            seen[name] = [args[0] if args else kwargs["hidden_states"]]

        def post(mod, args, kwargs, out, name=name):
            seen[name].append(_first(out))

        handles += [owner.register_forward_pre_hook(pre, with_kwargs=True),
                    owner.register_forward_hook(post, with_kwargs=True),
                    unit.register_forward_hook(lambda mod, a, out: torch.zeros_like(out))]
    try:
        _call(family, 1)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == sorted(n for k in ("transformer", "temporal_transformer", "temporal_conv")
                                  for n in EXPECTED_FRDIFF[family].get(k, []))
    for name, (x, y) in seen.items():
        assert torch.equal(x, y), name


def test_svd_resblock_is_a_blend_not_a_residual():
    """SpatioTemporalResBlock: out = a * s + (1 - a) * t with s = spatial ResnetBlock2D(x),
    t = TemporalResnetBlock(s), a = sigmoid(mix_factor); no skip around the block."""
    m = model("svd")
    blk = m.down_blocks[1].resnets[1]
    assert isinstance(blk, SpatioTemporalResBlock)
    got = {}
    hs = [blk.spatial_res_block.register_forward_hook(lambda mod, a, o: got.__setitem__("s", o)),
          blk.temporal_res_block.register_forward_hook(lambda mod, a, o: got.__setitem__("t", o)),
          blk.register_forward_hook(lambda mod, a, o: got.__setitem__("out", o))]
    try:
        _call("svd", 1)
    finally:
        for h in hs:
            h.remove()
    s, t, out = got["s"], got["t"], got["out"]
    bf, c, h, w = s.shape
    f = SMALL["frames"]
    s5 = s.reshape(bf // f, f, c, h, w).permute(0, 2, 1, 3, 4)
    a = torch.sigmoid(blk.time_mixer.mix_factor)
    blend = (a * s5 + (1 - a) * t).permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)
    torch.testing.assert_close(out, blend, rtol=1e-6, atol=1e-6)
    assert (out - s).abs().max() > 1e-3  # the temporal half matters


# ---------------------------------------------------------------------------------------------
# DeepCache's own SVD implementation
# ---------------------------------------------------------------------------------------------

ALIASES = {
    "diffusers.models.dual_transformer_2d": "diffusers.models.transformers.dual_transformer_2d",
    "diffusers.models.transformer_2d": "diffusers.models.transformers.transformer_2d",
    "diffusers.models.transformer_temporal": "diffusers.models.transformers.transformer_temporal",
}


@functools.cache
def deepcache_svd():
    """The package's SVD UNet and pipeline classes, imported with the four moved module paths
    aliased (the package's code itself unchanged); also the import errors without the aliases."""
    import diffusers

    errors = {}
    for mod in ("DeepCache.svd.unet_3d_blocks", "DeepCache.svd.pipeline_utils"):
        assert mod not in sys.modules
        try:
            importlib.import_module(mod)
        except ImportError as e:  # ModuleNotFoundError included
            errors[mod] = e
    added = []
    for old, new in ALIASES.items():
        if old not in sys.modules:
            sys.modules[old] = importlib.import_module(new)
            added.append(old)
    utils = types.ModuleType("DeepCache.svd.pipeline_utils")
    utils.DiffusionPipeline = diffusers.DiffusionPipeline
    sys.modules["DeepCache.svd.pipeline_utils"] = utils
    added.append("DeepCache.svd.pipeline_utils")
    try:
        unet_mod = importlib.import_module("DeepCache.svd.unet_spatio_temporal_condition")
        pipe_mod = importlib.import_module("DeepCache.svd.pipeline_stable_video_diffusion")
    finally:
        for name in added:
            del sys.modules[name]
    return unet_mod.UNetSpatioTemporalConditionModel, pipe_mod.StableVideoDiffusionPipeline, errors


def test_deepcache_svd_does_not_import_with_diffusers_0_42():
    _, _, errors = deepcache_svd()
    e = errors["DeepCache.svd.unet_3d_blocks"]
    assert isinstance(e, ModuleNotFoundError) and e.name == "diffusers.models.dual_transformer_2d"
    assert "DIFFUSERS_CACHE" in str(errors["DeepCache.svd.pipeline_utils"])


SVD_STEPS, SVD_INTERVAL, SVD_FRAMES, SVD_PX = 4, 2, 3, 16


@functools.cache
def svd_pipes():
    PkgUNet, PkgPipe, _ = deepcache_svd()
    unet = tv.svd_unet()
    pkg_unet = PkgUNet(**{k: v for k, v in unet.config.items() if not k.startswith("_")}).eval()
    pkg_unet.load_state_dict(unet.state_dict())
    pkg = tv.svd_pipeline(unet=pkg_unet, cls=PkgPipe, image_size=224)
    ours = tv.svd_pipeline(unet=unet, image_size=224)
    return pkg, ours


def _svd_image():
    rgb = np.random.RandomState(0).randint(0, 256, (SVD_PX, SVD_PX, 3), dtype=np.uint8)
    return PIL.Image.fromarray(rgb)


def _svd_run(pipe, **kw):
    with torch.no_grad():
        return pipe(_svd_image(), height=SVD_PX, width=SVD_PX, num_frames=SVD_FRAMES,
                    num_inference_steps=SVD_STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="latent", return_dict=False, **kw)


@functools.cache
def svd_plain():
    pkg, ours = svd_pipes()
    return _svd_run(pkg), _svd_run(ours)


def _svd_hooks_run(branch):
    _, ours = svd_pipes()
    st = DeepCacheVideoHooks(ours.unet, branch)
    calls = [0]

    def pre(mod, args):  # one UNet call per step (CFG batched): keyframe = step % interval == 0
        st.keyframe = calls[0] % SVD_INTERVAL == 0
        calls[0] += 1

    h = ours.unet.register_forward_pre_hook(pre)
    try:
        out = _svd_run(ours)
    finally:
        h.remove()
        st.remove()
    assert calls[0] == SVD_STEPS
    return out


def test_deepcache_svd_pipelines_agree_without_cache():
    a, b = svd_plain()
    assert a.shape == (1, SVD_FRAMES, 4, SVD_PX // 2, SVD_PX // 2) and torch.isfinite(a).all()
    assert torch.equal(a, b)


# package branch m (3 levels, 2 layers per block: m // 3 = block, m % 3 = layer) for every
# block/layer position; m = 8 (layer 2 of the last block, which has no downsampler) is degenerate
# in the package (its up_cache_block_idx becomes -1: nothing is cached) and left out.
@pytest.mark.parametrize("pkg_branch", [0, 1, 3, 5] + [pytest.param(b, marks=pytest.mark.slow) for b in (2, 4, 6, 7)])
def test_deepcache_package_svd_equals_hooks_branch_plus_one(pkg_branch):
    pkg, _ = svd_pipes()
    ref = _svd_run(pkg, cache_interval=SVD_INTERVAL, cache_branch=pkg_branch)
    got = _svd_hooks_run(pkg_branch + 1)
    assert torch.isfinite(ref).all()
    assert torch.equal(ref, got), (pkg_branch, (ref - got).abs().max().item())
    assert not torch.equal(ref, svd_plain()[0])  # caching changed the result
    if pkg_branch == 4:  # and the +1 is needed: the hooks' own branch 4 is another cut
        assert not torch.equal(ref, _svd_hooks_run(4))
