"""frkern.TGate against its oracle, the `tgate` package (1.0.0): the same latents, bit for bit, as
its SD, SDXL, SD+DeepCache, SDXL+DeepCache and SVD loaders (pipe.tgate(...)) on tiny pipelines,
with the pipeline left as diffusers wrote it (frkern drops CFG inside the patched UNet after the
gate). Plus LoRA, guidance_rescale and the refusals. (TGate with FRDiff: tests/test_tgate_frdiff.py.)"""
from __future__ import annotations

import copy

import pytest
import torch

import frkern
from tiny import ddim, make_sd_pipeline, make_sdxl_pipeline, sd_prompt_kwargs, sdxl_prompt_kwargs

tgate = pytest.importorskip("tgate")

RUN = dict(num_inference_steps=8, height=32, width=32, output_type="latent")
PARAMS = [dict(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1),
          dict(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1),
          dict(gate_step=3, sp_interval=3, fi_interval=1, warm_up=0)]


def _oracle(pipe, loader, prompt, params, **kw):
    ref = loader(copy.deepcopy(pipe))  # the package rewrites every Attention's forward for good
    return ref.tgate(**prompt, **RUN, generator=torch.Generator().manual_seed(0), **params, **kw).images


def _frkern(pipe, prompt, params, **kw):
    handle = frkern.patch(pipe, frkern.TGate(**params), backend="torch")
    try:
        out = pipe(**prompt, **dict(RUN, **kw), generator=torch.Generator().manual_seed(0)).images
        return out, dict(handle.stats)
    finally:
        frkern.unpatch(pipe)


@pytest.mark.parametrize("kind, params", [("sd", PARAMS[0]), ("sd", PARAMS[1]), ("sd", PARAMS[2]), ("sdxl", PARAMS[0]),
                                          pytest.param("sdxl", PARAMS[1], marks=pytest.mark.slow),
                                          pytest.param("sdxl", PARAMS[2], marks=pytest.mark.slow)],
                         ids=["sd-g4", "sd-g5", "sd-g3", "sdxl-g4", "sdxl-g5", "sdxl-g3"])
def test_equals_the_tgate_package(kind, params):
    make, prompt, loader = ((make_sd_pipeline, sd_prompt_kwargs(), tgate.TgateSDLoader) if kind == "sd"
                            else (make_sdxl_pipeline, sdxl_prompt_kwargs(), tgate.TgateSDXLLoader))
    pipe = make()
    want = _oracle(pipe, loader, prompt, params)
    got, stats = _frkern(pipe, prompt, params)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    assert stats == {"full": 1, "reuse": RUN["num_inference_steps"] - 1}
    # and it is not full compute
    plain = pipe(**prompt, **RUN, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(got, plain)


DEEPCACHE_PARAMS = [dict(gate_step=6, sp_interval=1, fi_interval=1, warm_up=0),  # the loaders' defaults but g
                    dict(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1),
                    dict(gate_step=5, sp_interval=3, fi_interval=1, warm_up=1)]


@pytest.mark.parametrize("kind, params", [("sd", DEEPCACHE_PARAMS[0]), ("sd", DEEPCACHE_PARAMS[1]),
                                          ("sd", DEEPCACHE_PARAMS[2]), ("sdxl", DEEPCACHE_PARAMS[1])],
                         ids=["sd-g6-sp1-fi1-w0", "sd-g4-sp2-fi2-w1", "sd-g5-sp3-fi1-w1", "sdxl-g4-sp2-fi2-w1"])
def test_with_deepcache_equals_the_packages_deepcache_loaders(kind, params):
    """The package's loaders run DeepCache's helper with cache_interval 3, branch 0, restarted at the
    gate: full steps are i % 3 == 0 before gate - 1, gate - 1, gate, and (i - gate) % 3 == 0 after."""
    make, prompt, loader = ((make_sd_pipeline, sd_prompt_kwargs(), tgate.TgateSDDeepCacheLoader) if kind == "sd"
                            else (make_sdxl_pipeline, sdxl_prompt_kwargs(), tgate.TgateSDXLDeepCacheLoader))
    pipe = make()
    run = dict(RUN, num_inference_steps=10)
    ref = loader(copy.deepcopy(pipe))
    want = ref.tgate(**prompt, **run, generator=torch.Generator().manual_seed(0), **params).images
    policy = frkern.TGate(**params, reuse=frkern.DeepCache(interval=3, branch=0))
    handle = frkern.patch(pipe, policy, backend="torch")
    got = pipe(**prompt, **run, generator=torch.Generator().manual_seed(0)).images
    stats = dict(handle.stats)
    frkern.unpatch(pipe)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    g = params["gate_step"]
    full = [i for i in range(10) if (i < g - 1 and i % 3 == 0) or i in (g - 1, g) or (i > g and (i - g) % 3 == 0)]
    assert stats == {"full": len(full), "reuse": 10 - len(full)}
    assert [p.keyframe for p in policy.schedule(10)] == [i in full for i in range(10)]
    # DeepCache changes the result (the comparison is not T-GATE alone again)
    alone, _ = _frkern(pipe, prompt, params, num_inference_steps=10)
    assert not torch.equal(got, alone)


@pytest.mark.parametrize("params", [PARAMS[0], pytest.param(dict(gate_step=5, sp_interval=3, fi_interval=2, warm_up=0),
                                                             marks=pytest.mark.slow)],
                         ids=["g4-sp2-fi1-w1", "g5-sp3-fi2-w0"])
def test_svd_equals_the_packages_svd_loader(params):
    """SVD: every attention of the spatio-temporal transformers (spatial and temporal, self and
    cross) is gated, and after the gate the conditional half runs (half="auto" on SVD), as the
    package's SVD loader does; its per-frame guidance then yields that half exactly."""
    import tiny_video as tv

    pipe = tv.svd_pipeline()
    run = dict(height=32, width=32, num_frames=4, num_inference_steps=8, min_guidance_scale=1.0,
               max_guidance_scale=3.0, output_type="latent")
    ref = tgate.TgateSVDLoader(copy.deepcopy(pipe))
    want = ref.tgate(tv.svd_image(), **run, generator=torch.Generator().manual_seed(0), **params).frames
    handle = frkern.patch(pipe, frkern.TGate(**params), backend="torch")
    got = pipe(tv.svd_image(), **run, generator=torch.Generator().manual_seed(0)).frames
    assert handle.stats == {"full": 1, "reuse": 7}
    frkern.unpatch(pipe)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    # the other half is not what the package runs
    frkern.patch(pipe, frkern.TGate(**params, half="uncond"), backend="torch")
    other = pipe(tv.svd_image(), **run, generator=torch.Generator().manual_seed(0)).frames
    frkern.unpatch(pipe)
    assert not torch.equal(other, want)


def test_with_a_lora_on_the_unet():
    from peft import LoraConfig

    pipe = make_sd_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    prompt, params = sd_prompt_kwargs(), PARAMS[0]
    want = _oracle(pipe, tgate.TgateSDLoader, prompt, params)
    got, _ = _frkern(pipe, prompt, params)
    assert torch.equal(got, want)


def test_guidance_rescale_is_exact_up_to_its_rounding():
    """After the gate the pipeline rescales the guided prediction by std(cond) / std(guided): both
    are the same tensor, so the factor is 1 and only phi * x + (1 - phi) * x rounds (the package
    skips the rescale there)."""
    pipe = make_sd_pipeline()
    prompt, params = sd_prompt_kwargs(), PARAMS[0]
    want = _oracle(pipe, tgate.TgateSDLoader, prompt, params, guidance_rescale=0.7)
    got, _ = _frkern(pipe, prompt, params, guidance_rescale=0.7)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6


def test_no_cfg_refusal_reads_only_the_pipeline_running_the_generation():
    """Two pipelines share the patched UNet: one without CFG is refused; the other, with CFG, must not
    be refused for the first one's flag (do_classifier_free_guidance keeps its last call's value)."""
    from diffusers import StableDiffusionPipeline

    with_cfg = make_sd_pipeline()
    without = StableDiffusionPipeline(**dict(with_cfg.components, scheduler=ddim()))
    without.set_progress_bar_config(disable=True)
    policy = frkern.TGate(gate_step=2, sp_interval=2, warm_up=1)
    ref = copy.deepcopy(with_cfg)
    frkern.patch(ref, policy, backend="torch")
    want = ref(**sd_prompt_kwargs(), **RUN, generator=torch.Generator().manual_seed(0)).images
    handle = frkern.patch(with_cfg, policy, backend="torch")
    assert frkern.patch(without, policy, backend="torch") is handle
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        without(**sd_prompt_kwargs(), **RUN, guidance_scale=1.0)
    got = with_cfg(**sd_prompt_kwargs(), **RUN, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(got, want) and handle.stats == {"full": 1, "reuse": RUN["num_inference_steps"] - 1}
    # a hand-written loop on the same handle is judged by its batch alone
    handle.begin(2)
    handle.set_step(0)
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        with_cfg.unet(x, 900, torch.randn(2, 7, 32))


def test_refusals():
    from tiny_video import motion_unet

    with pytest.raises(ValueError, match="is defined on UNet2DConditionModel and UNetSpatioTemporalConditionModel.*"
                                         "model family UNetMotionModel, policy TGate"):
        frkern.patch(motion_unet(), frkern.TGate())
    pipe = make_sd_pipeline()
    # a pipeline without classifier-free guidance has no halves to drop: refused at its first call
    handle = frkern.patch(pipe, frkern.TGate(gate_step=2))
    ran = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: ran.append(1))
    with pytest.raises(ValueError, match="without classifier-free guidance .*TGate\\(cfg=False\\)"):
        pipe(**sd_prompt_kwargs(), **dict(RUN, num_inference_steps=3), guidance_scale=1.0)
    assert ran == []  # refused before the network ran (the gate would have come at the second step)
    frkern.unpatch(pipe)
    # a hand-written loop whose batch has no halves: refused at its first call as well
    unet, x = pipe.unet, torch.randn(3, 4, 16, 16)
    handle = frkern.patch(unet, frkern.TGate(gate_step=2))
    handle.begin(3)
    handle.set_step(0)
    with pytest.raises(ValueError, match=r"batch of 3 does not split in two.*PAG.*InstructPix2Pix"):
        unet(x, 900, torch.randn(3, 7, 32))
    frkern.unpatch(unet)
    for kwargs, match in [(dict(gate_step=0), "gate_step must be an int >= 1"),
                          (dict(fi_interval=0), "fi_interval must be an int >= 1"),
                          (dict(warm_up=-1), "warm_up must be an int >= 0"),
                          (dict(cfg=1), "cfg must be True or False"),
                          (dict(half="first"), "half must be one of auto, uncond, cond"),
                          (dict(reuse=frkern.Clockwork()), "reuse must be None, a frkern.DeepCache or a frkern.FRDiff"),
                          (dict(reuse="DeepCache"), "reuse must be None")]:
        with pytest.raises(ValueError, match=match):
            frkern.TGate(**kwargs)
    for p in [frkern.TGate(gate_step=7, sp_interval=3), frkern.TGate(reuse=frkern.DeepCache(interval=2, branch=1)),
              frkern.TGate(half="cond", reuse=frkern.FRDiff(interval=3, score_mix=False))]:
        assert frkern.from_json(p.to_json()) == p


IMG2IMG_STEPS = 10


@pytest.mark.parametrize("scheduler, strength, gate_step", [("ddim", 0.6, 3), ("dpm", 0.6, 3), ("ddim", 0.3, 4)],
                         ids=["ddim-0.6", "dpm-0.6", "ddim-0.3-gate-not-reached"])
def test_img2img_counts_steps_from_the_pipelines_first_step(scheduler, strength, gate_step):
    """img2img runs the last steps of its schedule. TGate plans them as the package's loop counts
    its steps (from the first step run): the statement is TGateHooks (per-call flags from the
    package's tgate_scheduler, hooks on every Attention, the first-half UNet call after the gate) on
    the same img2img pipeline. Located two ways: DDIM from the first step's timestep (after the
    first UNet call), DPM-Solver++ from set_begin_index (before it). With the gate beyond the run's
    last step nothing is halved or frozen."""
    from diffusers import DPMSolverMultistepScheduler

    from reference_tgate_adapters import TGateHooks
    from test_ecosystem import SCHED_CFG, img2img_pipeline
    from tiny import ddim

    sched = ddim() if scheduler == "ddim" else DPMSolverMultistepScheduler(**SCHED_CFG)
    pipe, prompt = img2img_pipeline("img2img", sched)
    params = dict(gate_step=gate_step, sp_interval=2, fi_interval=1, warm_up=1)
    run = dict(num_inference_steps=IMG2IMG_STEPS, strength=strength, output_type="latent")
    ref = copy.deepcopy(pipe)
    hooks = TGateHooks(ref.unet, **params)
    want = ref(**prompt, **run, generator=torch.Generator().manual_seed(0)).images
    n = len(hooks.halved_inputs)
    assert 0 < n < IMG2IMG_STEPS  # the pipeline starts inside its schedule
    assert hooks.halved_inputs == [2] * min(gate_step, n) + [1] * max(0, n - gate_step)

    handle = frkern.patch(pipe, frkern.TGate(**params), backend="torch")
    got = pipe(**prompt, **run, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(got).all() and torch.equal(got, want)
    assert handle.stats == {"full": 1, "reuse": n - 1}
    if n > gate_step:  # with DeepCache, the keyframe grid is the text-to-image one of the n steps run
        frkern.unpatch(pipe)
        policy = frkern.TGate(**params, reuse=frkern.DeepCache(interval=2, branch=1))
        handle = frkern.patch(pipe, policy, backend="torch")
        out = pipe(**prompt, **run, generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(out).all() and not torch.equal(out, got)
        full = sum(p.keyframe for p in policy.schedule(n))
        assert handle.stats == {"full": full, "reuse": n - full}, handle.stats
    frkern.unpatch(pipe)


def test_without_cfg_nothing_is_halved_or_averaged():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    handle = frkern.patch(pipe, frkern.TGate(gate_step=3, sp_interval=2, warm_up=1, cfg=False), backend="torch")
    out = pipe(**prompt, **RUN, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all() and handle.stats == {"full": 1, "reuse": 7}
    frkern.unpatch(pipe)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [frkern.TGate(gate_step=3, sp_interval=2, fi_interval=1, warm_up=0,
                                                 reuse=frkern.DeepCache(interval=2, branch=1))], ids=["with-deepcache"])
def test_compiled_has_no_breaks_and_no_recompiles(policy):
    """torch.compile of the patched UNet: the attention modes are set on the host per call (a
    compiled graph sees a few values, one graph per step kind), the halved call goes through the
    compiled network; the second generation compiles nothing, outputs equal eager."""
    from test_contract import COMPILE_MODELS, FAMILIES, assert_compiles_once, calls

    base = COMPILE_MODELS["sd"]()
    stats = assert_compiles_once(base, policy, calls(base, FAMILIES["sd"][1], steps=6, batch=2), 6, what="TGate")
    assert stats.get("reuse", 0) > 0


def _hand_loop_inputs(unet):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)  # one latent, [uncond, cond]
    ehs = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return x, ehs


@pytest.mark.parametrize("how", ["reset", "weights"])
def test_the_gate_runs_again_when_its_stored_outputs_are_gone(how):
    """After the gate a call returns stored cross-attention outputs. When they are gone (handle.reset()
    mid-generation, or weights changed so they may not be read), the next call is the gate again:
    both halves run in full (equal to the plain UNet's output bit for bit, as at gate_step - 1), the
    means are stored, and the calls after it run one half reading them."""
    from tiny import sd_unet

    unet = sd_unet()
    plain = copy.deepcopy(unet)
    x, ehs = _hand_loop_inputs(unet)
    handle = frkern.patch(unet, frkern.TGate(gate_step=2, sp_interval=2, warm_up=0), backend="torch")
    handle.begin(8)

    def call(i, model=unet):
        handle.set_step(i)
        with torch.no_grad():
            return model(x, 900 - 100 * i, ehs).sample

    for i in range(4):
        call(i)
    assert handle.stats == {"full": 1, "reuse": 3}
    if how == "reset":
        handle.reset()
    else:
        with torch.no_grad():
            for m in (unet, plain):
                m.conv_out.bias.add_(0.01)
    with torch.no_grad():
        gate = call(4)
        want = plain(x, 500, ehs).sample
    assert torch.equal(gate, want), "the call after the stored outputs went must run as the gate, in full"
    assert handle.stats["regated"] == 1
    halved = call(5)
    u, c = halved.chunk(2)
    assert torch.equal(u, c) and handle.stats["regated"] == 1  # one half again, reading the new means
    frkern.unpatch(unet)
