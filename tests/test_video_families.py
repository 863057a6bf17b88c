"""The video UNet families (frkern.video) through their real diffusers pipelines: ModelScope's
UNet3DConditionModel (TextToVideoSDPipeline), Stable Video Diffusion's
UNetSpatioTemporalConditionModel (StableVideoDiffusionPipeline) and AnimateDiff's UNetMotionModel.

Each patched pipeline's latents are compared with the unpatched pipeline run under the matching
independent statement of tests/reference_video.py (hooks; `keyframe` set per UNet call by a
pre-hook that counts calls: one call per step, CFG batched), bit for bit for every policy, FRDiff
included: with backend="torch" a reused unit gives exactly what the statement's substituted value
gives (a residual unit returns input + cached branch, the very tensor diffusers adds, and IEEE
addition commutes; a ResNet recomputes everything after conv1 in diffusers' op order).
DeepCache on SVD is also checked against the `deepcache` package's own SVD pipeline (package branch
k = frkern branch k + 1), bit for bit.
"""
from __future__ import annotations

import functools

import pytest
import torch

import frkern
import tiny_video as tv
from reference_video import ClockworkVideoHooks, DeepCacheVideoHooks, FRDiffVideoHooks

STEPS, FRAMES, PX = 4, 4, 16  # 4 sampler steps, 4 frames, 16x16 pixels (8x8 latents)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _t2v_run(pipe, batch, frames=FRAMES, px=PX, **kw):
    return pipe(**tv.prompt_kwargs(batch=batch), num_frames=frames, height=px, width=px,
                num_inference_steps=STEPS, guidance_scale=5.0, generator=_gen(), output_type="latent",
                return_dict=False, **kw)[0]


def _svd_image(batch):
    return torch.cat([tv.svd_image(seed=3 + i) for i in range(batch)])


def _svd_run(pipe, batch, frames=FRAMES, px=PX, **kw):
    kw = dict(dict(min_guidance_scale=1.0, max_guidance_scale=3.0, output_type="latent"), **kw)
    out = pipe(_svd_image(batch), height=px, width=px, num_frames=frames, num_inference_steps=STEPS,
               generator=_gen(), return_dict=False, **kw)
    return out[0] if isinstance(out, tuple) else out  # "latent" returns the tensor itself


def _motion_run(pipe, batch, frames=FRAMES, px=PX, **kw):
    return pipe(**tv.prompt_kwargs(batch=batch), num_frames=frames, height=px, width=px,
                num_inference_steps=STEPS, guidance_scale=5.0, generator=_gen(), output_type="latent",
                return_dict=False, **kw)[0]


# family -> (pipeline builder, run(pipe, batch, **kw), the statement's FRDiff unit kinds, frkern family name)
FAMILIES = {
    "unet3d": (tv.t2v_pipeline, _t2v_run, ("resnet", "transformer", "temporal_transformer", "temporal_conv"),
               "UNet3DConditionModel"),
    "svd": (tv.svd_pipeline, _svd_run, ("resnet", "temporal_transformer", "temporal_resnet"),
            "UNetSpatioTemporalConditionModel"),
    "motion": (tv.animatediff_pipeline, _motion_run, ("resnet", "transformer", "temporal_transformer"),
               "UNetMotionModel"),
}

POLICIES = {
    "FRDiff": frkern.FRDiff(interval=2, score_mix=False),
    "DeepCache-1": frkern.DeepCache(interval=2, branch=1),
    "DeepCache-5": frkern.DeepCache(interval=2, branch=5),
    "Clockwork": frkern.Clockwork(clock=2, levels=1),
}


@functools.cache
def pipeline(family):
    return FAMILIES[family][0]()


def run(family, batch, **kw):
    with torch.no_grad():
        return FAMILIES[family][1](pipeline(family), batch, **kw)


@functools.cache
def plain(family, batch):
    return run(family, batch)


def statement(policy, unet, kinds):
    if isinstance(policy, frkern.FRDiff):
        return FRDiffVideoHooks(unet, kinds=kinds)
    if isinstance(policy, frkern.DeepCache):
        return DeepCacheVideoHooks(unet, policy.branch)
    return ClockworkVideoHooks(unet, policy.levels)


def run_statement(family, policy, batch, **kw):
    """The unpatched pipeline under the policy's statement; keyframes by UNet call (= step)."""
    unet = pipeline(family).unet
    assert frkern.handle_of(unet) is None
    hooks = statement(policy, unet, FAMILIES[family][2])
    keys = {i for i, p in enumerate(policy.schedule(STEPS)) if p.keyframe}
    calls = [0]

    def pre(module, args):
        hooks.keyframe = calls[0] in keys
        calls[0] += 1

    handle = unet.register_forward_pre_hook(pre)
    try:
        out = run(family, batch, **kw)
    finally:
        handle.remove()
        hooks.remove()
    assert calls[0] == STEPS
    return out


@functools.cache
def statement_latents(family, name, batch):
    return run_statement(family, POLICIES[name], batch)


def run_patched(family, policy, batch, **kw):
    pipe = pipeline(family)
    modules = dict(pipe.unet.named_modules())
    handle = frkern.patch(pipe, policy, backend="torch")
    try:
        out = run(family, batch, **kw)
        stats = dict(handle.stats)
    finally:
        frkern.unpatch(pipe)
    assert all(m is modules[n] for n, m in pipe.unet.named_modules()), "unpatch left a wrapper in the tree"
    return out, stats


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_matches(got, want, what):
    assert got.shape == want.shape and torch.isfinite(got).all(), what
    assert torch.equal(got, want), (what, rel(got, want))


CASES = [("unet3d", 1), ("unet3d", 2), ("svd", 1), ("svd", 2), ("motion", 1)]


@pytest.mark.parametrize("family,batch", CASES)
def test_noreuse_is_the_unpatched_pipeline_bit_for_bit(family, batch):
    handle_name = FAMILIES[family][3]
    got, stats = run_patched(family, frkern.NoReuse(), batch)
    assert frkern.find_model(pipeline(family))[0].name == handle_name
    assert got.shape[0] == batch and torch.equal(got, plain(family, batch))
    assert stats["full"] == STEPS


# batch 2: FRDiff and one DeepCache branch (every policy at batch 1); AnimateDiff: one DeepCache branch
@pytest.mark.parametrize("family,batch,name", [
    (f, b, n) for f, b in CASES for n in POLICIES
    if (b == 1 or n in ("FRDiff", "DeepCache-5")) and not (f == "motion" and n == "DeepCache-5")])
def test_policy_equals_its_statement(family, batch, name):
    want = statement_latents(family, name, batch)
    got, stats = run_patched(family, POLICIES[name], batch)
    assert_matches(got, want, f"{family} batch {batch} {name}")
    assert stats.get("reuse", 0) == STEPS // 2 and stats["full"] == STEPS // 2, stats
    assert stats.get("unit_miss", 0) == 0 and stats.get("promoted", 0) == 0, stats
    assert not torch.equal(got, plain(family, batch))  # reuse changed the result: not vacuous


# --- SVD specifics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [(1.0, 1.0), (2.0, 4.0)])
def test_svd_frame_wise_guidance(guidance):
    """min/max_guidance_scale: no CFG at all (one image per call) and a frame-wise CFG ramp."""
    lo, hi = guidance
    kw = dict(min_guidance_scale=lo, max_guidance_scale=hi)
    for policy in (POLICIES["FRDiff"], POLICIES["DeepCache-5"]):
        want = run_statement("svd", policy, 1, **kw)
        got, stats = run_patched("svd", policy, 1, **kw)
        assert_matches(got, want, f"svd guidance {guidance} {policy}")
        assert stats["reuse"] == STEPS // 2


def test_svd_decode_chunk_size():
    policy = POLICIES["DeepCache-1"]
    kw = dict(output_type="pt", decode_chunk_size=2)
    want = run_statement("svd", policy, 1, **kw)
    got, _ = run_patched("svd", policy, 1, **kw)
    assert got.shape == (1, FRAMES, 3, PX, PX)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["svd", "unet3d"])
def test_a_new_generation_with_other_frames_or_size_starts_a_new_cache(family):
    """One patched pipeline, three generations: 4 frames at 16 px, 6 frames, then 24 px. Each equals
    its own statement (an unpatched run): nothing read from an earlier generation's cache."""
    policy = POLICIES["FRDiff"]
    settings = [dict(), dict(frames=6), dict(px=24)]
    want = [statement_latents(family, "FRDiff", 1)] + [run_statement(family, policy, 1, **kw) for kw in settings[1:]]
    pipe = pipeline(family)
    handle = frkern.patch(pipe, policy, backend="torch")
    try:
        for kw, w in zip(settings, want):
            got = run(family, 1, **kw)
            assert_matches(got, w, f"{family} {kw}")
            stats = handle.stats
            assert stats["reuse"] == STEPS // 2 and stats.get("unit_miss", 0) == 0, (kw, stats)
    finally:
        frkern.unpatch(pipe)
    assert want[1].shape[1 if family == "svd" else 2] == 6 and want[2].shape[-1] == 12


# --- the deepcache package's own SVD implementation -------------------------------------------------
@pytest.mark.parametrize("pkg_branch", [1, 5])
def test_deepcache_equals_the_deepcache_package_svd_pipeline(pkg_branch):
    from test_reference_video import SVD_INTERVAL, _svd_run as pkg_run, svd_pipes

    pkg, ours = svd_pipes()  # the package's pipeline and UNet; diffusers' with the same weights
    want = pkg_run(pkg, cache_interval=SVD_INTERVAL, cache_branch=pkg_branch)
    handle = frkern.patch(ours, frkern.DeepCache(interval=SVD_INTERVAL, branch=pkg_branch + 1), backend="torch")
    try:
        got = pkg_run(ours)
        assert handle.stats["reuse"] > 0
    finally:
        frkern.unpatch(ours)
    assert torch.isfinite(want).all() and torch.equal(got, want), (got - want).abs().max().item()


# --- every other policy works on both new families (hand-driven calls) -------------------------------
def _unet_calls(family):
    if family == "unet3d":
        unet, kw = tv.unet3d(), tv.unet3d_inputs
    else:
        unet, kw = tv.svd_unet(), tv.svd_inputs
    kw = kw(unet, batch=1, frames=3, size=8)
    x = kw.pop("sample")
    g = _gen(4)
    seq = []
    for i in range(STEPS):
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        seq.append(dict(kw, sample=x.clone(), timestep=torch.tensor(900.0 - 90 * i)))
    return unet, seq


def _hand_run(unet, seq, handle=None):
    outs = []
    with torch.no_grad():
        for i, kw in enumerate(seq):
            if handle is not None:
                handle.set_step(i)
            outs.append(unet(**kw)[0])
    return outs


def _adaptor(unet, tmp_path, zero):
    from frkern.adaptor import AdaptorConfig, ClockworkAdaptor, model_fingerprint, save_adaptor

    def channels(resnet):  # SVD's SpatioTemporalResBlock: its spatial ResNet's
        return getattr(resnet, "spatial_res_block", resnet).out_channels

    cfg = AdaptorConfig(in_channels=channels(unet.down_blocks[0].resnets[-1]),
                        out_channels=channels(unet.up_blocks[-2].resnets[-1]), stride=1,
                        temb_dim=unet.time_embedding.linear_2.out_features,
                        text_dim=unet.config.cross_attention_dim, hidden=16, levels=1, clock=2,
                        sampler="EulerDiscreteScheduler", num_steps=STEPS, model=model_fingerprint(dict(unet.config)))
    torch.manual_seed(0)
    adaptor = ClockworkAdaptor(cfg).eval()
    if not zero:
        with torch.no_grad():
            for p in adaptor.parameters():
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / ("zero" if zero else "random")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adaptor(adaptor, path)
    return str(path)


OTHER = {
    "FRDiff-mix": frkern.FRDiff(interval=3, score_mix=True, bias=0.3),
    "Keyframes-jumps": frkern.Keyframes(keyframes=(0, 2), jumps=(3,), num_steps=STEPS),
    "SkipConv": frkern.SkipConv(threshold=0.3, tile=4),
    "Adaptive-units": frkern.Adaptive(0.5, reuse="units", max_reuse=2),
    "Adaptive-deepcache": frkern.Adaptive(0.5, reuse="deepcache", branch=1, max_reuse=2),
    "Adaptive-clockwork": frkern.Adaptive(0.5, rule="accumulated", reuse="clockwork", levels=1, max_reuse=2),
}


@pytest.mark.parametrize("family", ["unet3d", "svd"])
def test_every_other_policy_runs_and_unpatches(family):
    """The policies the statements above do not cover apply to both families (the contract suite,
    tests/test_contract.py, states them exactly): each patches, runs finite, reuses, and unpatch
    restores the very modules."""
    unet, seq = _unet_calls(family)
    modules = dict(unet.named_modules())
    plain_out = _hand_run(unet, seq)
    for name, policy in OTHER.items():
        handle = frkern.patch(unet, policy, backend="torch")
        handle.begin(STEPS)
        outs = _hand_run(unet, seq, handle)
        stats = handle.stats
        frkern.unpatch(unet)
        assert all(torch.isfinite(o).all() for o in outs), name
        assert torch.equal(outs[0], plain_out[0]), name  # step 0 is a full call
        assert stats.get("reuse", 0) + stats.get("skip", 0) > 0, (name, stats)
        assert all(m is modules[n] for n, m in unet.named_modules()), name


@pytest.mark.parametrize("family", ["unet3d", "svd"])
def test_clockwork_adaptor_runs_frame_by_frame(family, tmp_path):
    """A learned Clockwork adaptor on a video UNet runs on each frame (the batch the up blocks see):
    it changes the clocked steps, and a zero adaptor is the identity adaptor bit for bit."""
    unet, seq = _unet_calls(family)
    results = []
    for policy in (frkern.Clockwork(clock=2), frkern.Clockwork(clock=2, adaptor=_adaptor(unet, tmp_path, True)),
                   frkern.Clockwork(clock=2, adaptor=_adaptor(unet, tmp_path, False))):
        handle = frkern.patch(unet, policy, backend="torch")
        handle.begin(STEPS)
        results.append(_hand_run(unet, seq, handle))
        assert handle.stats["reuse"] == STEPS // 2
        frkern.unpatch(unet)
    identity, zero, learned = results
    assert all(torch.equal(a, b) for a, b in zip(zero, identity))
    assert torch.equal(learned[0], identity[0]) and not torch.equal(learned[1], identity[1])
    assert all(torch.isfinite(o).all() for o in learned)


# --- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["unet3d", "svd"])
def test_a_refused_patch_changes_nothing(family, tmp_path):
    unet, seq = _unet_calls(family)
    want = _hand_run(unet, seq[:1])[0]
    # an adaptor trained on another model of the family (another config: another fingerprint)
    other = tv.unet3d(norm_num_groups=4) if family == "unet3d" else tv.svd_unet(num_attention_heads=(2, 2, 2))
    adaptor, wrong = _adaptor(unet, tmp_path, False), _adaptor(other, tmp_path / "other", False)
    modules = dict(unet.named_modules())
    cases = [(frkern.DeepCache(interval=2, branch=9), "DeepCache: branch 9 is past the UNet's 3 levels"),
             (frkern.Clockwork(clock=2, levels=3), "Clockwork: levels must lie in 1..2"),
             # levels 2 would take r_out from up_blocks.0, a block without cross-attention
             (frkern.Clockwork(clock=2, levels=2, adaptor=adaptor), "Clockwork adaptor: up_blocks.0 .* gets no text")]
    cases.append((frkern.Clockwork(clock=2, adaptor=wrong), "adaptor was trained on UNet model"))
    family_name = {"unet3d": "UNet3DConditionModel", "svd": "UNetSpatioTemporalConditionModel"}[family]
    for policy, match in cases:
        with pytest.raises(ValueError, match=match) as refused:
            frkern.patch(unet, policy, backend="torch")
        assert f"model family {family_name}, policy {policy.name}" in str(refused.value)
        assert dict(unet.named_modules()).keys() == modules.keys(), policy
        assert all(m is modules[n] for n, m in unet.named_modules()), policy
        assert frkern.handle_of(unet) is None and "forward" not in unet.__dict__, policy
    assert torch.equal(_hand_run(unet, seq[:1])[0], want)


def test_unsupported_blocks_are_named():
    """A UNet3D with a block frkern does not know is refused by name, the family named too."""
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn

    unet = tv.unet3d()
    unet.mid_block = UNetMidBlock2DCrossAttn(56, 128, cross_attention_dim=32, resnet_groups=8)
    modules = dict(unet.named_modules())
    with pytest.raises(ValueError, match="UNet3DConditionModel has parts.*mid_block is UNetMidBlock2DCrossAttn"):
        frkern.patch(unet, frkern.FRDiff(), backend="torch")
    assert all(m is modules[n] for n, m in unet.named_modules())


# --- the families' map of parts -------------------------------------------------------------------
def test_parts_of_the_new_families():
    fam3, unet3 = frkern.find_model(tv.unet3d())[:2]
    parts = fam3.parts(unet3)
    assert fam3.name == "UNet3DConditionModel" and parts.entry == ("conv_in", "transformer_in")
    assert parts.levels[0].down_layers[0] == ("down_blocks.0.resnets.0", "down_blocks.0.temp_convs.0",
                                              "down_blocks.0.attentions.0", "down_blocks.0.temp_attentions.0")
    assert parts.levels[2].down_layers[1] == ("down_blocks.2.resnets.1", "down_blocks.2.temp_convs.1")
    kinds3 = FRDiffVideoHooks(unet3, kinds=FAMILIES["unet3d"][2])
    kinds3.remove()
    assert {p: k for p, k in parts.units.items() if k != "geglu"} == kinds3.units
    assert parts.units["transformer_in"] == "temporal_transformer" and "geglu" in parts.units.values()
    # every ResNet's conv1/conv2 and the Conv3d closing each of a temporal conv layer's four Sequentials
    assert set(parts.gated_convs) == (
        {f"{p}.{c}" for p, k in parts.units.items() if k == "resnet" for c in ("conv1", "conv2")}
        | {f"{p}.conv1.2" for p, k in parts.units.items() if k == "temporal_conv"}
        | {f"{p}.conv{i}.3" for p, k in parts.units.items() if k == "temporal_conv" for i in (2, 3, 4)})

    famv, unetv = frkern.find_model(tv.svd_pipeline())[:2]
    parts = famv.parts(unetv)
    assert famv.name == "UNetSpatioTemporalConditionModel" and parts.entry == ("conv_in",)
    assert parts.levels[1].up_layers[2] == ("up_blocks.1.resnets.2", "up_blocks.1.attentions.2")
    kindsv = FRDiffVideoHooks(unetv, kinds=FAMILIES["svd"][2])
    kindsv.remove()
    assert {p: k for p, k in parts.units.items() if k != "geglu"} == kindsv.units
    assert set(parts.gated_convs) == {f"{p}.{c}" for p, k in parts.units.items() if k in ("resnet", "temporal_resnet")
                                      for c in ("conv1", "conv2")}
    assert all(c.endswith((".spatial_res_block.conv1", ".spatial_res_block.conv2", ".temporal_res_block.conv1",
                           ".temporal_res_block.conv2")) for c in parts.gated_convs)
    assert parts.text_dim == tv.SVD_IMAGE_DIM
