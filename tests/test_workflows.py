"""The newest features in the workflows users combine them with (issue 23), each against an
independent statement or the unpatched model, on UNet layouts unlike the rest of the suite
(3 levels, 1 or 2 layers per block, odd channel counts):
- Adaptive's rules on every DeepCache cut (the gate inside a cached segment);
- call arguments a forward consumes or adds in place (T2I-Adapter residual lists, with ControlNet's);
- SkipConv on LoRA-adapted convolutions (adapters added before and after patching);
- attributes set on patched blocks (FreeU, gradient checkpointing), attention processors and fused
  projections set after patching;
- weight storage hooks (diffusers' layerwise casting, group offloading) with every policy."""
import copy
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import skip_unless_slow
import frkern
from reference import ddim_loop
from reference_deepcache import DeepCacheCutHooks
from test_adaptive import RuleStatement
from test_skip_conv import GatedConvHooks
from tiny import ddim, make_sd_pipeline, sd_prompt_kwargs

STEPS = 10


def unet_3x2(seed=0, **kw):
    """3 levels, 2 layers per block, channels not powers of two, 4 norm groups of 6/10/14."""
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(24, 40, 56),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=8, norm_num_groups=4)
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


def unet_3x1(seed=0, **kw):
    """SDXL-like: plain top level, 1 layer per block, linear projections, 3 norm groups."""
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(18, 42, 48),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 1, 2), attention_head_dim=(3, 6, 8), use_linear_projection=True,
               cross_attention_dim=32, norm_num_groups=3)
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


MODELS = {"3x2": unet_3x2, "3x1": unet_3x1}


def inputs(batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(2 * batch, 5, 32, generator=g)


def t2i_residuals(unet, batch, size=8, seed=3):
    """T2I-Adapter-like residuals: one per down block, at that block's output resolution."""
    g = torch.Generator().manual_seed(seed)
    shapes, s = [], size
    for i, block in enumerate(unet.down_blocks):
        c = unet.config.block_out_channels[i]
        # a cross-attention block adds it before its downsampler, diffusers' forward after a plain block
        if getattr(block, "has_cross_attention", False):
            shapes.append((c, s))
        s = s // 2 if block.downsamplers else s
        if not getattr(block, "has_cross_attention", False):
            shapes.append((c, s))
    shapes.append(shapes[-1])  # one more, of the mid block's output shape: added to it in place
    return [0.3 * torch.randn(batch, c, s_, s_, generator=g) for c, s_ in shapes]


class CloningCutHooks(DeepCacheCutHooks):
    """The same DeepCache statement, for a forward that adds to block outputs in place (T2I):
    a cached output is the module's own output (recorded as a copy), handed out as a copy."""

    def _hook(self, name, module, args, out):
        if self.keyframe:
            self.store[name] = _clone(out)
            return None
        return _clone(self.store[name])


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else type(v)(_clone(x) for x in v) if isinstance(v, (tuple, list)) else v


def run_adaptive_against_statement(unet, policy, branch, extra=None, cloning=False, guidance=5.0):
    """frkern's Adaptive with the DeepCache cut of `branch` against RuleStatement + the DeepCache
    hooks on an unpatched copy, step by step through a CFG DDIM loop. extra(): per-call kwargs."""
    ref = copy.deepcopy(unet)
    latents, ehs = inputs()
    hooks = (CloningCutHooks if cloning else DeepCacheCutHooks)(ref, branch)
    statement = RuleStatement(policy, lambda keyframe: setattr(hooks, "keyframe", keyframe))
    hooks.first_skipped_module.register_forward_pre_hook(statement.pre_hook, with_kwargs=True)
    extra = extra or (lambda: {})

    def ref_call(i, x, t):
        statement.step = i
        with torch.no_grad():
            return ref(x, t, ehs, **extra()).sample

    handle = frkern.patch(unet, policy, backend="torch")
    handle.begin(STEPS)

    def call(i, x, t):
        handle.set_step(i)
        with torch.no_grad():
            return unet(x, t, ehs, **extra()).sample

    x_ref, eps_ref = ddim_loop(ref_call, ddim(), latents, STEPS, guidance)
    x_got, eps_got = ddim_loop(call, ddim(), latents, STEPS, guidance)
    for i, (a, b) in enumerate(zip(eps_got, eps_ref)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}")
    decisions = statement.decisions
    stats = handle.stats
    assert stats["reuse"] == sum(decisions) and stats["full"] == STEPS - sum(decisions)
    got = stats.get("indicator", {})
    assert sorted(got) == sorted(statement.values)
    for i, v in statement.values.items():
        assert math.isclose(got[i], v, rel_tol=1e-5), (i, got[i], v)
    frkern.unpatch(unet)
    return decisions, statement.values


# (model, branch): every branch position kind - a whole block, a layer inside a block, a
# downsampler, and (3x1) layer ids past a block's layers.
CUTS = [("3x2", 0), ("3x2", 1), ("3x2", 2), ("3x2", 3), ("3x2", 5), ("3x1", 0), ("3x1", 1), ("3x1", 2), ("3x1", 5)]


# the accumulated rule on every cut (its state must move on in calls that never reach the gate);
# the first-block rule (whose state moves only on full calls) on one cut of each kind
RULE_CUTS = [(m, b, "accumulated") for m, b in CUTS] + [("3x2", 1, "first_block"), ("3x2", 5, "first_block"),
                                                         ("3x1", 2, "first_block")]


# every cut with the accumulated rule by default; the first-block rows in the extended tier (the
# contract and test_adaptive run that rule on DeepCache cuts too)
@pytest.mark.parametrize("model, branch, rule", [
    c if c[2] == "accumulated" and (c[0], c[1]) in (("3x2", 0), ("3x2", 1), ("3x2", 5), ("3x1", 2), ("3x1", 5))
    else pytest.param(*c, marks=pytest.mark.slow) for c in RULE_CUTS])
def test_adaptive_on_every_deepcache_cut_matches_the_rule_statement(model, branch, rule):
    poly = (2.0, 0.5, 0.0) if rule == "accumulated" else (1.0, 0.0)
    # a threshold between the statement's values, so that the rule decides both ways
    probe = frkern.Adaptive(1e9, rule=rule, reuse="deepcache", branch=branch, warmup=1, max_reuse=10, poly=poly)
    _, values = run_adaptive_against_statement(MODELS[model](), probe, branch)
    vals = sorted(values.values())
    threshold = vals[len(vals) // 3]
    policy = frkern.Adaptive(threshold, rule=rule, reuse="deepcache", branch=branch, warmup=1, max_reuse=3, poly=poly)
    decisions, _ = run_adaptive_against_statement(MODELS[model](), policy, branch)
    assert any(decisions) and not all(decisions[1:])


# --- call arguments a forward consumes or changes in place ------------------------------------

def adapter_kwargs(unet, controlnet=False):
    def extra():
        kw = {"down_intrablock_additional_residuals": t2i_residuals(unet, 4)}  # a fresh list per call, as pipelines do
        if controlnet:
            g = torch.Generator().manual_seed(7)
            res, s = [], 8
            kw["down_block_additional_residuals"] = tuple(
                0.2 * torch.randn(4, c, s_, s_, generator=g) for c, s_ in _skip_shapes(unet, s))
            kw["mid_block_additional_residual"] = 0.2 * torch.randn(4, unet.config.block_out_channels[-1], 2, 2, generator=g)
        return kw
    return extra


def _skip_shapes(unet, size):
    """(channels, size) of every skip connection the down path produces (ControlNet's residuals)."""
    shapes, s = [(unet.config.block_out_channels[0], size)], size
    for i, block in enumerate(unet.down_blocks):
        c = unet.config.block_out_channels[i]
        shapes += [(c, s)] * len(block.resnets)
        if block.downsamplers:
            s //= 2
            shapes.append((c, s))
    return shapes


@pytest.mark.parametrize("model, policy_kind, controlnet", [
    ("3x2", "adaptive-deepcache", False), ("3x1", "adaptive-deepcache", True),
    ("3x1", "adaptive-units", False), ("3x2", "adaptive-clockwork", True), ("3x2", "deepcache", False),
    ("3x1", "deepcache", True),
])
def test_t2i_adapter_residuals_with_reuse_match_the_statement(model, policy_kind, controlnet):
    """T2I-Adapter residuals (popped from their list, added in place to plain down blocks' and the
    mid block's outputs), alone and with ControlNet residuals."""
    unet = MODELS[model]()
    extra = adapter_kwargs(unet, controlnet)
    if policy_kind == "deepcache":
        policy = frkern.DeepCache(interval=3, branch=1)
        ref = copy.deepcopy(unet)
        hooks = CloningCutHooks(ref, 1)
        latents, ehs = inputs()
        handle = frkern.patch(unet, policy, backend="torch")
        handle.begin(STEPS)

        def ref_call(i, x, t):
            hooks.keyframe = i % 3 == 0
            with torch.no_grad():
                return ref(x, t, ehs, **extra()).sample

        def call(i, x, t):
            handle.set_step(i)
            with torch.no_grad():
                return unet(x, t, ehs, **extra()).sample

        _, eps_ref = ddim_loop(ref_call, ddim(), latents, STEPS)
        _, eps_got = ddim_loop(call, ddim(), latents, STEPS)
        for i, (a, b) in enumerate(zip(eps_got, eps_ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}")
        assert handle.stats["reuse"] == 6
        # the cache holds what the cut's last block computed, not what the forward later added to
        # it; the blocks only cached blocks read (down_blocks.2, the mid block) keep no tensor
        cached = handle.runtime.cache.slot_view(0)
        stored = [name for name, (value, _) in cached.items() if isinstance(value, (torch.Tensor, tuple, list))]
        assert stored
        for name in stored:
            torch.testing.assert_close(cached[name][0], hooks.store[name], rtol=0, atol=0)
        for name in ("mid_block", "down_blocks.2"):
            assert name not in stored and type(cached[name][0]).__name__ == "OutputShapes"
        return
    kind = policy_kind.split("-")[1]
    if kind == "deepcache":
        policy = frkern.Adaptive(0.25, rule="accumulated", reuse="deepcache", branch=0, warmup=1, max_reuse=2,
                                 poly=(2.0, 0.5, 0.0))
        decisions, _ = run_adaptive_against_statement(unet, policy, 0, extra=extra, cloning=True)
        assert any(decisions)
        return
    # Clockwork (one level) and unit reuse: the first-block rule, compared with the unpatched
    # model at threshold 0 (full compute with a probe on every call) bit for bit
    policy = frkern.Adaptive(0.0, reuse=kind, warmup=1)
    latents, ehs = inputs()
    ref = copy.deepcopy(unet)
    handle = frkern.patch(unet, policy, backend="torch")
    handle.begin(STEPS)

    def call(i, x, t):
        handle.set_step(i)
        with torch.no_grad():
            return unet(x, t, ehs, **extra()).sample

    def ref_call(i, x, t):
        with torch.no_grad():
            return ref(x, t, ehs, **extra()).sample

    x_got, _ = ddim_loop(call, ddim(), latents, STEPS)
    x_ref, _ = ddim_loop(ref_call, ddim(), latents, STEPS)
    assert torch.equal(x_got, x_ref)
    frkern.unpatch(unet)
    # a threshold that reuses: runs (the probe and the resumed pass each get the whole list)
    handle = frkern.patch(unet, frkern.Adaptive(0.5, reuse=kind, warmup=1, max_reuse=2), backend="torch")
    handle.begin(STEPS)
    x_got, _ = ddim_loop(call, ddim(), latents, STEPS)
    assert torch.isfinite(x_got).all() and handle.stats["reuse"] > 0


def test_the_callers_argument_list_is_left_as_it_was():
    unet = unet_3x2()
    handle = frkern.patch(unet, frkern.Adaptive(0.5, reuse="clockwork", warmup=1), backend="torch")
    latents, ehs = inputs()
    handle.begin(3)
    residuals = t2i_residuals(unet, 4)
    kept = list(residuals)
    with torch.no_grad():
        for i in range(3):
            handle.set_step(i)
            unet(torch.cat([latents, latents]), 500 - 100 * i, ehs, down_intrablock_additional_residuals=residuals)
            assert residuals == kept  # the same tensors, none popped
    assert handle.stats["reuse"] > 0


def test_t2i_adapter_pipeline_with_adaptive_and_deepcache():
    """StableDiffusionAdapterPipeline with a tiny T2I-Adapter: threshold 0 gives the unpatched
    pipeline's latents bit for bit; a reusing threshold runs."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    base = make_sd_pipeline(unet=unet_3x2())
    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[24, 40, 56], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter").eval()
    pipe = StableDiffusionAdapterPipeline(vae=base.vae, text_encoder=None, tokenizer=None, unet=base.unet,
                                          adapter=adapter, scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    prompt = sd_prompt_kwargs()

    def gen():
        return pipe(**prompt, image=image, num_inference_steps=6, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    want = gen()
    for policy in (frkern.Adaptive(0.0, reuse="clockwork"), frkern.Adaptive(0.0, reuse="deepcache")):
        frkern.patch(pipe, policy, backend="torch")
        assert torch.equal(gen(), want)
        frkern.unpatch(pipe)
    for policy in (frkern.Adaptive(0.3, reuse="deepcache", max_reuse=2), frkern.DeepCache(2)):
        handle = frkern.patch(pipe, policy, backend="torch")
        out = gen()
        assert torch.isfinite(out).all() and handle.stats["reuse"] > 0
        frkern.unpatch(pipe)
    assert torch.equal(gen(), want)


# --- SkipConv on LoRA-adapted convolutions ------------------------------------------------------

def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=3, lora_alpha=6, target_modules=["conv1", "conv2"], init_lora_weights=False)


def effective_weight_fp64(layer):
    """A peft LoRA conv layer's weight, stated from its parts: W + sum over active adapters of
    scaling * B (1x1) composed with A (k x k), in fp64."""
    w = layer.base_layer.weight.double()
    if layer.disable_adapters:
        return w
    for name in layer.active_adapters:
        a = layer.lora_A[name].weight.double()  # (r, cin, k, k)
        b = layer.lora_B[name].weight.double()[:, :, 0, 0]  # (cout, r)
        w = w + layer.scaling[name] * torch.einsum("or,rikl->oikl", b, a)
    return w


class AdaptedGatedConvHooks(GatedConvHooks):
    """SkipConv's definition (test_skip_conv.GatedConvHooks) on an unpatched LoRA-adapted UNet: the
    convolution is the adapted one, its weight stated independently in fp64."""

    def weights(self, layer):
        return effective_weight_fp64(layer), layer.base_layer.bias


def adapted_pair(model, when):
    """(frkern's UNet, about to be patched, and a function that adds its adapter per `when`; the
    unpatched reference with the same adapter weights)."""
    ref = MODELS[model]()
    ref.add_adapter(lora_config())
    weights = {k: v.clone() for k, v in ref.state_dict().items()}
    unet = MODELS[model]()

    def add():
        unet.add_adapter(lora_config())
        unet.load_state_dict(weights)

    if when == "before":
        add()
    return unet, ref, add


def gated_loop(unet, ref, handle, hooks=None, interval=3, steps=5):
    latents, ehs = inputs()
    x = torch.cat([latents, latents])
    g = torch.Generator().manual_seed(5)
    handle.begin(steps)
    with torch.no_grad():
        for i in range(steps):
            x = x + 0.3 * torch.randn(x.shape, generator=g) * (torch.rand(1, 1, 8, 8, generator=g) > 0.7)
            handle.set_step(i)
            if hooks is not None:
                hooks.keyframe = i % interval == 0
            yield i, unet(x, 900 - 100 * i, ehs).sample, ref(x, 900 - 100 * i, ehs).sample


@pytest.mark.parametrize("model", ["3x2", "3x1"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_skipconv_on_lora_convs_is_the_adapted_convolution(model, when):
    from peft.tuners.tuners_utils import BaseTunerLayer

    # threshold 0: the adapted model's outputs bit for bit
    unet, ref, add = adapted_pair(model, when)
    handle = frkern.patch(unet, frkern.SkipConv(0.0, tile=4), backend="torch")
    if when == "after":
        add()
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, BaseTunerLayer)
    for i, got, want in gated_loop(unet, ref, handle):
        assert torch.equal(got, want), i
    assert handle.stats["reuse"] == 4 and handle.stats.get("promoted", 0) == 0
    frkern.unpatch(unet)  # the adapter stays
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, BaseTunerLayer)
    latents, ehs = inputs()
    with torch.no_grad():
        assert torch.equal(unet(torch.cat([latents] * 2), 10, ehs).sample, ref(torch.cat([latents] * 2), 10, ehs).sample)

    # a threshold that skips: the definition with the adapted convolution's weight
    unet, ref, add = adapted_pair(model, when)
    hooks = AdaptedGatedConvHooks(ref, tile=2, threshold=0.1)
    handle = frkern.patch(unet, frkern.SkipConv(0.1, tile=2, interval=3), backend="torch")
    if when == "after":
        add()
    for i, got, want in gated_loop(unet, ref, handle, hooks):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {i}: {m}")
    fractions = handle.stats["active_fraction"]
    assert any(0 < f < 1 for f in fractions.values()), fractions


def test_adapter_changes_while_patched_with_skipconv_are_seen():
    """set_adapters with a new weight, disable, enable: the next call computes in full (promoted)
    and equals the unpatched adapted model in the same state."""
    unet, ref, _ = adapted_pair("3x2", "before")
    handle = frkern.patch(unet, frkern.SkipConv(0.0, tile=4), backend="torch")
    steps = gated_loop(unet, ref, handle, steps=6)
    for change in (None, lambda m: m.set_adapters(["default"], weights=[0.5]), None,
                   lambda m: m.disable_adapters(), lambda m: m.enable_adapters(), None):
        if change is not None:
            change(unet)
            change(ref)
        i, got, want = next(steps)
        assert torch.equal(got, want), i
    assert handle.stats["promoted"] == 3


def test_unsupported_module_at_a_gated_place_is_refused_before_anything_changes():
    unet = unet_3x2()
    unet.down_blocks[1].resnets[0].conv1 = torch.nn.Conv2d(24, 40, 3, stride=1, padding=2, dilation=2)
    before = dict(unet.named_modules())
    with pytest.raises(ValueError, match=r"down_blocks\.1\.resnets\.0\.conv1"):
        frkern.patch(unet, frkern.SkipConv(0.1), backend="torch")
    assert dict(unet.named_modules()) == before and frkern.handle_of(unet) is None


# --- attributes, processors and fused projections set on a patched model ----------------------

class _CloningSegmentHooks:
    """Clockwork's statement (reference.SegmentHooks) for a forward that changes block inputs in
    place (FreeU scales half the channels of an up block's input): the recorded input is a copy,
    and each reuse call gets a copy of it."""

    def __init__(self, unet, levels=1):
        self.keyframe = True
        self.stored = None
        unet.up_blocks[-levels].register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if self.keyframe:
            self.stored = kwargs["hidden_states"].clone()
            return None
        return args, dict(kwargs, hidden_states=self.stored.clone())


# FreeU writes into an up block's input in place: the output of the block (or layer) before it. The
# statements hand out copies of what they recorded, so a cached output scaled again on every reuse
# call (or a zero stand-in that cannot be written) shows. Branch 4 caches part of an up block (its
# inner layers return stand-ins that FreeU's up block writes into).
@pytest.mark.parametrize("policy, hooks_for", [
    (frkern.DeepCache(interval=3, branch=0), lambda ref: CloningCutHooks(ref, 0)),
    (frkern.DeepCache(interval=3, branch=4), lambda ref: CloningCutHooks(ref, 4)),
    (frkern.Clockwork(clock=3, levels=2), None),  # its cached r_out enters up_blocks[1], which FreeU scales
], ids=["deepcache-0", "deepcache-4", "clockwork-levels-2"])
def test_freeu_enabled_after_patching_acts_on_the_blocks(policy, hooks_for):
    SegmentHooks = _CloningSegmentHooks

    unet = unet_3x2()
    ref = copy.deepcopy(unet)
    handle = frkern.patch(unet, policy, backend="torch")
    freeu = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    unet.enable_freeu(**freeu)
    ref.enable_freeu(**freeu)
    hooks = hooks_for(ref) if hooks_for else SegmentHooks(ref, levels=2)
    latents, ehs = inputs()

    def call(i, x, t):
        handle.set_step(i)
        with torch.no_grad():
            return unet(x, t, ehs).sample

    def ref_call(i, x, t):
        hooks.keyframe = i % 3 == 0
        with torch.no_grad():
            return ref(x, t, ehs).sample

    handle.begin(STEPS)
    _, eps_got = ddim_loop(call, ddim(), latents, STEPS)
    _, eps_ref = ddim_loop(ref_call, ddim(), latents, STEPS)
    for i, (a, b) in enumerate(zip(eps_got, eps_ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i}: {m}")
    assert torch.equal(eps_got[0], eps_ref[0])  # the full call, bit for bit
    unet.disable_freeu()
    frkern.unpatch(unet)
    plain = copy.deepcopy(ref)
    plain.disable_freeu()
    x = torch.cat([latents] * 2)
    with torch.no_grad():
        assert torch.equal(unet(x, 10, ehs).sample, plain(x, 10, ehs).sample)


@pytest.mark.parametrize("policy", [frkern.NoReuse(), frkern.DeepCache(interval=2, branch=1), frkern.Clockwork(clock=2)],
                         ids=lambda p: p.name)
def test_gradient_checkpointing_enabled_after_patching_checkpoints_the_blocks(policy):
    """Segment policies put wrappers where whole blocks were: the flag must reach the blocks."""
    unet = unet_3x1().train()
    ref = copy.deepcopy(unet)
    handle = frkern.patch(unet, policy, backend="torch")
    if handle.caches:  # a keyframe of a generation: full compute
        handle.begin(2)
        handle.set_step(0)
    counts = {}

    def counting(key):
        def ckpt(fn, *args, **kwargs):
            counts[key] = counts.get(key, 0) + 1
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return ckpt

    unet.enable_gradient_checkpointing(counting("frkern"))
    ref.enable_gradient_checkpointing(counting("ref"))
    assert unet.is_gradient_checkpointing
    latents, ehs = inputs()
    x = torch.cat([latents] * 2)
    for model in (unet, ref):
        model(x, 10, ehs).sample.square().mean().backward()
    assert counts["frkern"] == counts["ref"] > 0
    for (name, p), q in zip(unet.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    unet.disable_gradient_checkpointing()
    frkern.unpatch(unet)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())


def test_attention_processors_and_fused_projections_set_after_patching():
    from diffusers.models.attention_processor import AttnProcessor

    unet = unet_3x2()
    ref = copy.deepcopy(unet)
    handle = frkern.patch(unet, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
    latents, ehs = inputs()
    x = torch.cat([latents] * 2)
    handle.begin(4)
    with torch.no_grad():
        handle.set_step(0)
        unet(x, 900, ehs)
        for model in (unet, ref):
            model.set_attn_processor(AttnProcessor())
            model.fuse_qkv_projections()
        handle.set_step(1)  # a reuse step after the projections changed: computed in full
        got, want = unet(x, 800, ehs).sample, ref(x, 800, ehs).sample
    assert torch.equal(got, want) and handle.stats["promoted"] == 1
    assert all(type(p) is AttnProcessor or "Fused" in type(p).__name__ for p in unet.attn_processors.values())
    frkern.unpatch(unet)
    frkern.patch(unet, frkern.NoReuse(), backend="torch")
    unet.unfuse_qkv_projections()
    ref.unfuse_qkv_projections()
    with torch.no_grad():
        assert torch.equal(unet(x, 700, ehs).sample, ref(x, 700, ehs).sample)


# --- weight storage hooks ------------------------------------------------------------------------

STORAGE_STEPS = 7
STORAGE_POLICIES = [
    frkern.FRDiff(interval=2), frkern.Keyframes(keyframes=(0, 3, 5), num_steps=STORAGE_STEPS, jumps=(4,)),
    frkern.Clockwork(clock=2), frkern.DeepCache(interval=3, branch=1), frkern.SkipConv(0.2, tile=4, interval=3),
    frkern.Adaptive(0.3, reuse="clockwork", max_reuse=2), frkern.Adaptive(0.3, reuse="deepcache", rule="accumulated",
                                                                         max_reuse=2, poly=(2.0, 0.5, 0.0)),
]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("policy", STORAGE_POLICIES, ids=lambda p: p.name)
def test_layerwise_casting_does_not_defeat_reuse(policy, when, request):
    if when == "after" and policy.name not in ("FRDiff", "SkipConv"):
        skip_unless_slow(request, f"casting enabled after patching with {policy.name}")
    """Weights stored in fp8 and upcast per call (diffusers' layerwise casting), enabled before or
    after patching: the same latents, calls and decisions as the same policy on a plain fp32 model
    whose weights are those fp8 values."""
    cast = unet_3x2()
    plain = copy.deepcopy(cast)
    if when == "before":
        cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    handle = frkern.patch(cast, policy, backend="torch")
    if when == "after":
        cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    stored = dict(cast.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if stored[name].dtype == torch.float8_e4m3fn:
                p.copy_(stored[name].float())
    plain_handle = frkern.patch(plain, policy, backend="torch")
    latents, ehs = inputs()
    results = []
    for model, h in ((cast, handle), (plain, plain_handle)):
        def call(i, x, t, model=model, h=h):
            h.set_step(i)
            with torch.no_grad():
                return model(x, t, ehs).sample
        h.begin(STORAGE_STEPS)
        results.append(ddim_loop(call, ddim(), latents, STORAGE_STEPS)[0])
    assert torch.equal(results[0], results[1])
    stats = handle.stats
    assert stats == plain_handle.stats and stats.get("promoted", 0) == 0
    assert stats.get("reuse", 0) + stats.get("skip", 0) > 0


def test_a_real_weight_change_under_layerwise_casting_is_seen():
    unet = unet_3x2()
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    handle = frkern.patch(unet, frkern.FRDiff(interval=4, score_mix=False), backend="torch")
    latents, ehs = inputs()
    x = torch.cat([latents] * 2)
    handle.begin(4)
    with torch.no_grad():
        for i in range(4):
            if i == 2:  # an in-place update of a stored (fp8) weight
                unet.down_blocks[0].resnets[0].conv1.weight.copy_(unet.down_blocks[0].resnets[0].conv1.weight.float() * 0.5)
            handle.set_step(i)
            unet(x, 900 - 100 * i, ehs)
    assert handle.stats["full"] == 2 and handle.stats["reuse"] == 2 and handle.stats["promoted"] == 1  # step 2 promoted


@pytest.mark.parametrize("policy", [frkern.FRDiff(interval=2), frkern.DeepCache(interval=2)], ids=lambda p: p.name)
def test_group_offloading_keeps_results_and_reuse(policy):
    unet = unet_3x2()
    ref = copy.deepcopy(unet)
    handle = frkern.patch(unet, policy, backend="torch")
    unet.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                              offload_type="leaf_level")
    ref_handle = frkern.patch(ref, policy, backend="torch")
    latents, ehs = inputs()
    results = []
    for model, h in ((unet, handle), (ref, ref_handle)):
        def call(i, x, t, model=model, h=h):
            if h.caches:
                h.set_step(i)
            with torch.no_grad():
                return model(x, t, ehs).sample
        if h.caches:
            h.begin(STEPS)
        results.append(ddim_loop(call, ddim(), latents, STEPS)[0])
    assert torch.equal(results[0], results[1]) and handle.stats == ref_handle.stats


# --- forward hooks on modules a reuse call skips --------------------------------------------------
@pytest.mark.parametrize("policy, skipped, running", [
    (frkern.DeepCache(interval=3, branch=0), "mid_block.attentions.0", "conv_in"),
    (frkern.Clockwork(clock=2), "mid_block.resnets.0", "up_blocks.2"),
    (frkern.Adaptive(1e9, reuse="clockwork", max_reuse=1), "mid_block.resnets.1", "conv_out"),
], ids=["deepcache", "clockwork", "adaptive"])
def test_forward_hooks_on_skipped_modules_are_named_in_a_warning(policy, skipped, running):
    """A hook on a module inside a cached segment runs on full calls only (the module does not run on
    reuse calls): said once over two generations, naming the module. A hook on a module that always
    runs: not named, and it runs on every call."""
    import warnings

    pipe = make_sd_pipeline()
    handle = frkern.patch(pipe, policy, backend="torch")
    calls = {"skipped": 0, "running": 0}
    pipe.unet.get_submodule(skipped).register_forward_hook(lambda m, a, o: calls.__setitem__("skipped", calls["skipped"] + 1))
    pipe.unet.get_submodule(running).register_forward_hook(lambda m, a, o: calls.__setitem__("running", calls["running"] + 1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            pipe(**sd_prompt_kwargs(), num_inference_steps=6, output_type="latent")
    said = [str(w.message) for w in seen if "forward hooks" in str(w.message)]
    assert len(said) == 1 and skipped in said[0] and running not in said[0], said
    stats = handle.stats
    assert calls["running"] == 12 and calls["skipped"] == 2 * stats["full"] < 12, (calls, stats)


def test_no_warning_without_hooks_in_skipped_modules():
    import warnings

    pipe = make_sd_pipeline()
    frkern.patch(pipe, frkern.DeepCache(interval=3), backend="torch")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe(**sd_prompt_kwargs(), num_inference_steps=6, output_type="latent")
    assert not [w for w in seen if "forward hooks" in str(w.message)]


def test_a_hook_on_a_cached_segment_itself_is_named_too():
    """Registered after patching on the block that a cut caches (the wrapper standing in the tree):
    it runs on every call but sees zero stand-ins on reuse calls (the mid block's output only feeds
    cached blocks under DeepCache branch 0): named in the warning."""
    import warnings

    pipe = make_sd_pipeline()
    frkern.patch(pipe, frkern.DeepCache(interval=3, branch=0), backend="torch")
    outputs = []
    pipe.unet.mid_block.register_forward_hook(lambda m, a, o: outputs.append(float(o.abs().max())))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe(**sd_prompt_kwargs(), num_inference_steps=6, output_type="latent")
    said = [str(w.message) for w in seen if "forward hooks" in str(w.message)]
    assert len(said) == 1 and "(mid_block)" in said[0], said
    assert len(outputs) == 6 and outputs.count(0.0) == 4  # the reuse calls' stand-ins


# --- hooks on the modules a fused op would read: the op calls them instead ------------------------
def _scaling_pre_hook(unet, calls):
    def pre(module, args):
        calls.append(1)
        return (args[0] * 1.5,)

    return unet.down_blocks[0].resnets[0].norm1.register_forward_pre_hook(pre)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("policy", [frkern.NoReuse(), frkern.FRDiff(interval=1, score_mix=False),
                                    frkern.DeepCache(interval=1)], ids=lambda p: p.name)
def test_a_hook_on_a_resnet_norm_runs_as_without_frkern(policy, when):
    """The fused GroupNorm+SiLU of a ResNet unit read norm1's weights directly, so a hook on norm1
    never ran (a user's, or an offloading / casting hook that moves or re-stores the weights):
    NoReuse was off by 3e-5 and the hook ran 0 times of 4. A norm with hooks is now called. Every
    call full here: bit for bit with the unpatched pipeline and its hook."""
    base = make_sd_pipeline()
    ref, ref_calls = copy.deepcopy(base), []
    _scaling_pre_hook(ref.unet, ref_calls)
    want = ref(**sd_prompt_kwargs(), num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    pipe, calls = copy.deepcopy(base), []
    if when == "before":
        _scaling_pre_hook(pipe.unet, calls)
    frkern.patch(pipe, policy, backend="torch")
    if when == "after":
        _scaling_pre_hook(pipe.unet, calls)
    got = pipe(**sd_prompt_kwargs(), num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(got, want) and len(calls) == len(ref_calls) == 4


def test_a_hooked_norm2_with_a_compressed_cache():
    """FRDiff with cache="int8": the keyframe's norm2 encodes conv1's output in the fused kernel; with
    a hook on norm2 the norm is called and the encoding is made apart, the same values."""
    base = make_sd_pipeline()
    results = {}
    for hooked in (False, True):
        pipe, calls = copy.deepcopy(base), []
        handle = frkern.patch(pipe, frkern.FRDiff(interval=2, score_mix=False), backend="torch", cache="int8")
        if hooked:  # a hook that changes nothing: the two runs must agree bit for bit
            pipe.unet.down_blocks[0].resnets[0].norm2.register_forward_hook(lambda m, a, o: calls.append(1))
        results[hooked] = pipe(**sd_prompt_kwargs(), num_inference_steps=4, output_type="latent",
                               generator=torch.Generator().manual_seed(0)).images
        if hooked:
            assert len(calls) == 4 and handle.stats == {"full": 2, "reuse": 2}  # norm2 runs on reuse calls too
    assert torch.equal(results[True], results[False])


HOOKED = {"resnet": "down_blocks.0.resnets.0", "transformer": "down_blocks.0.attentions.0",
          "geglu": "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0",
          "attention": "down_blocks.0.attentions.0.transformer_blocks.0.attn1", "block": "down_blocks.1"}


def _count_and_scale(unet, calls):
    """A counting pre-hook on each HOOKED module; the ResNet's also scales its input (so a hook that
    does not run changes the result)."""
    for key, path in HOOKED.items():
        def pre(module, args, key=key):
            calls[key] = calls.get(key, 0) + 1
            return (args[0] * 1.25, *args[1:]) if key == "resnet" else None

        unet.get_submodule(path).register_forward_pre_hook(pre)


@pytest.mark.parametrize("policy", [frkern.NoReuse(), frkern.FRDiff(interval=1, score_mix=False),
                                    frkern.DeepCache(interval=1), frkern.TGate(gate_step=10, sp_interval=1, warm_up=10),
                                    frkern.SkipConv(0.0)], ids=lambda p: p.name)
def test_hooks_registered_before_patching_run_on_the_modules_frkern_wraps(policy):
    """A wrapper stands where a ResNet, a transformer, a GEGLU, an attention or a block stood. Hooks
    registered on those modules before patching never ran when the wrapper computed the module
    itself (ResNets, GEGLUs: 0 of 4 calls, under every policy): the wrapper now takes the module's
    hook dicts. Every call full here: the same hook calls and latents as the unpatched pipeline."""
    base = make_sd_pipeline()
    ref, ref_calls = copy.deepcopy(base), {}
    _count_and_scale(ref.unet, ref_calls)
    want = ref(**sd_prompt_kwargs(), num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    pipe, calls = copy.deepcopy(base), {}
    _count_and_scale(pipe.unet, calls)
    frkern.patch(pipe, policy, backend="torch")
    got = pipe(**sd_prompt_kwargs(), num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert calls == ref_calls == {key: 4 for key in HOOKED}
    assert torch.equal(got, want)


def test_hooks_registered_while_patched_stay_after_unpatch():
    unet = unet_3x2()
    frkern.patch(unet, frkern.FRDiff(interval=2), backend="torch")
    calls = []
    unet.down_blocks[0].resnets[0].register_forward_hook(lambda m, a, o: calls.append(1))
    frkern.unpatch(unet)
    latents, ehs = inputs()
    with torch.no_grad():
        unet(torch.cat([latents] * 2), 10, ehs)
    assert calls == [1]
