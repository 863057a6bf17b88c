"""Exact with everything users plug in: adapters, weight edits, copies, img2img, shared and
replaced schedulers, scheduler signatures, inference-mode models, pickling (issue 9)."""
import copy
import inspect
import io

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

import frkern
from reference import FRDiffHooks
from reference_positioned import FRDiffByPosition
from test_lifecycle import assert_weight_change_promotes
from test_pipelines import generate
from tiny import (ddim, make_sd_pipeline, make_sdxl_pipeline, sd_inputs, sd_prompt_kwargs, sd_unet, sdxl_prompt_kwargs,
                  sdxl_unet, vae)

SCHED_CFG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def run(unet, inputs, t=500, **extra):
    sample, ehs, kw = inputs
    with torch.no_grad():
        return unet(sample, t, ehs, **kw, **extra).sample


# --- adapters (peft LoRA through diffusers' PeftAdapterMixin) ---------------------------------
peft = pytest.importorskip("peft")
LORA_TARGETS = ["conv1", "conv2", "time_emb_proj", "proj", "proj_in", "proj_out", "to_q"]


def add_lora(unet, name="a", seed=7):
    torch.manual_seed(seed)  # init_lora_weights=False: random, non-zero B, so the adapter matters
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False),
                     adapter_name=name)


ADAPTER_OPS = [
    ("scale 0.5", lambda u: u.set_adapters(["a"], weights=[0.5])),
    ("disable", lambda u: u.disable_adapters()),
    ("enable", lambda u: u.enable_adapters()),
    ("second adapter", lambda u: (add_lora(u, "b", seed=8), u.set_adapters(["a", "b"], weights=[1.0, 0.3]))),
    ("fuse", lambda u: u.fuse_lora(lora_scale=0.7)),
    ("unfuse", lambda u: u.unfuse_lora()),
    ("delete b", lambda u: u.delete_adapters("b")),
    ("unload", lambda u: u.unload_lora()),
]


@pytest.mark.parametrize("when", ["before patch", "after patch"])
@pytest.mark.parametrize("kind", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])  # sdxl: extended tier
def test_adapters_noreuse_bit_identical_through_every_adapter_operation(when, kind):
    make = sd_unet if kind == "sd" else sdxl_unet
    unet, ref = make(), make()
    inputs = sd_inputs(unet)
    add_lora(ref)
    if when == "before patch":
        add_lora(unet)
    handle = frkern.patch(unet, frkern.NoReuse(), backend="torch")
    if when == "after patch":
        add_lora(unet)
    without = run(make(), inputs)
    got = run(unet, inputs)
    assert torch.equal(got, run(ref, inputs)) and not torch.allclose(got, without, rtol=1e-3, atol=1e-4)
    for name, op in ADAPTER_OPS[:-1]:
        op(unet), op(ref)
        assert torch.equal(run(unet, inputs), run(ref, inputs)), name
    frkern.unpatch(unet)
    # unpatch hands the adapter layers back: the tree is the tree that ran
    lora_layers = [n for n, m in unet.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert lora_layers == [n for n, m in ref.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert lora_layers and "a" in unet.peft_config
    assert torch.equal(run(unet, inputs), run(ref, inputs))
    handle = frkern.patch(unet, frkern.NoReuse(), backend="torch")
    name, op = ADAPTER_OPS[-1]  # unload while patched: every adapter layer goes
    op(unet), op(ref)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in unet.modules())
    assert torch.equal(run(unet, inputs), run(ref, inputs))  # (unfuse leaves rounding: not `without`)
    handle.unpatch()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_frdiff_with_an_adapter_added_after_patch_matches_the_definition(kind):
    make = sd_unet if kind == "sd" else sdxl_unet
    unet, ref = make(), make()
    add_lora(ref)
    hooks = FRDiffHooks(ref)  # hooks the LoRA-wrapped conv1 / proj_out: what really runs
    handle = frkern.patch(unet, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
    add_lora(unet)
    sample, ehs, kw = sd_inputs(unet)
    handle.begin(4)
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        x = torch.randn(sample.shape, generator=g)
        handle.set_step(i)
        hooks.keyframe = i % 2 == 0
        got, want = run(unet, (x, ehs, kw), t=900 - 100 * i), run(ref, (x, ehs, kw), t=900 - 100 * i)
        assert torch.equal(got, want), i
    assert handle.stats == {"full": 2, "reuse": 2}


def test_adapter_scale_change_inside_a_generation_is_not_read_stale():
    unet = sd_unet()
    add_lora(unet)
    assert_weight_change_promotes(unet, lambda: unet.set_adapters(["a"], weights=[0.5]))
    unet = sd_unet()
    add_lora(unet)
    assert_weight_change_promotes(unet, lambda: unet.fuse_lora(lora_scale=0.5))


def lora_state_dict(seed):
    donor = sd_unet()
    add_lora(donor, "x", seed=seed)
    return peft.get_peft_model_state_dict(donor, adapter_name="x")


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "enable_lora_hotswap"])
def test_lora_hotswap_inside_a_generation_is_not_read_stale(prepared):
    """diffusers' hotswap (`load_lora_weights` / `load_lora_adapter` with hotswap=True) copies the new
    adapter's weights in through `.data`: same storage, adapter name and scaling, no version counter
    moves. The patched model's load_lora_adapter tells the watch, so the next call is promoted and
    equals the unpatched model with the new adapter (before, reuse read the old adapter's features)."""
    unet = sd_unet()
    if prepared:  # scalings become tensors, filled in place on a swap
        unet.enable_lora_hotswap(target_rank=8)
    unet.load_lora_adapter(lora_state_dict(7), adapter_name="a", prefix=None)
    new = lora_state_dict(8)
    assert_weight_change_promotes(unet, lambda: unet.load_lora_adapter(new, adapter_name="a", prefix=None, hotswap=True))
    assert "load_lora_adapter" not in unet.__dict__  # unpatched: the class's method again


def test_lora_loader_of_a_copied_patched_model_is_the_copys():
    unet = sd_unet()
    handle = frkern.patch(unet, frkern.FRDiff(interval=2), backend="torch")
    twin = copy.deepcopy(unet)
    assert unet.load_lora_adapter.__self__ is handle
    assert twin.load_lora_adapter.__self__.unet is twin and twin.load_lora_adapter.__self__ is not handle
    twin.load_lora_adapter(lora_state_dict(7), adapter_name="a", prefix=None)
    assert not any("lora" in name for name, _ in unet.named_parameters())


def test_per_call_lora_scale_is_part_of_the_call_signature():
    unet = sd_unet()
    add_lora(unet)
    handle = frkern.patch(unet, frkern.FRDiff(interval=4, score_mix=False), backend="torch")
    inputs = sd_inputs(unet)
    handle.begin(4)
    run(unet, inputs, cross_attention_kwargs={"scale": 1.0})
    handle.set_step(1)
    out = run(unet, inputs, cross_attention_kwargs={"scale": 0.5})
    assert handle.stats["promoted"] == 1
    frkern.unpatch(unet)
    assert torch.equal(out, run(unet, inputs, cross_attention_kwargs={"scale": 0.5}))


# --- weight changes that keep version counters still ------------------------------------------
def test_replaced_parameter_object_is_seen():
    unet = sd_unet()
    conv = unet.down_blocks[0].resnets[0].conv1
    assert_weight_change_promotes(unet, lambda: setattr(conv, "weight", torch.nn.Parameter(conv.weight * 1.5)))


def test_swapped_storages_are_seen():
    unet = sd_unet()
    a, b = unet.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[1].conv1.weight
    assert a.shape == b.shape

    def swap():
        a.data, b.data = b.data, a.data

    assert_weight_change_promotes(unet, swap)


def test_load_state_dict_assign_is_seen():
    unet = sd_unet()
    sd = {k: v * 1.1 for k, v in sd_unet(seed=1).state_dict().items()}
    assert_weight_change_promotes(unet, lambda: unet.load_state_dict(sd, assign=True))


# --- models and policies without the usual preconditions --------------------------------------
def test_model_created_under_inference_mode():
    with torch.inference_mode():
        unet, ref = sd_unet(), sd_unet()
        hooks = FRDiffHooks(ref)
        handle = frkern.patch(unet, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
        inputs = sd_inputs(unet)
        handle.begin(3)
        for i in range(3):
            handle.set_step(i)
            hooks.keyframe = i % 2 == 0
            assert torch.equal(run(unet, inputs, t=900 - 100 * i), run(ref, inputs, t=900 - 100 * i))
        assert handle.stats == {"full": 2, "reuse": 1}


def test_noreuse_needs_no_step_protocol():
    unet = sd_unet()
    inputs = sd_inputs(unet)
    ref = run(unet, inputs)
    frkern.patch(unet, frkern.NoReuse(), backend="torch")
    for _ in range(3):
        assert torch.equal(run(unet, inputs), ref)
    assert len(frkern.handle_of(unet).runtime.cache) == 0


# --- copies and pickling ----------------------------------------------------------------------
def test_deepcopy_of_a_patched_unet_is_patched_on_its_own():
    unet = sd_unet()
    inputs = sd_inputs(unet)
    handle = frkern.patch(unet, frkern.FRDiff(interval=2, score_mix=False), backend="torch")
    twin = copy.deepcopy(unet)
    twin_handle = frkern.handle_of(twin)
    assert twin_handle is not handle and twin_handle.runtime is not handle.runtime
    assert twin_handle.policy == handle.policy and twin_handle.unet is twin
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    twin_handle.begin(2)
    handle.begin(2)
    zeros = run(twin, inputs)
    assert torch.count_nonzero(zeros) == 0 and torch.count_nonzero(run(unet, inputs)) > 0
    assert twin_handle.stats == {"full": 1} and handle.stats == {"full": 1}
    frkern.unpatch(twin)
    assert frkern.handle_of(unet) is handle  # the original stays patched
    frkern.unpatch(unet)


@pytest.mark.parametrize("policy", [frkern.FRDiff(2), frkern.DeepCache(3)])
def test_deepcopy_of_a_patched_pipeline_drives_its_own_copy(policy):
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    handle = frkern.patch(pipe, policy)
    want = generate(pipe, prompt)
    twin = copy.deepcopy(pipe)
    twin_handle = frkern.handle_of(twin)
    assert twin_handle is not handle
    assert torch.equal(generate(twin, prompt), want)
    assert twin_handle.stats.get("reuse", 0) + twin_handle.stats.get("skip", 0) > 0
    calls_before = sum(handle.stats.values())
    generate(twin, prompt)
    assert sum(handle.stats.values()) == calls_before  # the copy never drives the original
    assert torch.equal(generate(pipe, prompt), want)


@pytest.mark.parametrize("policy", [frkern.FRDiff(), frkern.TGate(), frkern.DeepCache()], ids=lambda p: p.name)
def test_pickling_a_patched_model_fails_clearly(policy):
    unet = sd_unet()
    frkern.patch(unet, policy)
    with pytest.raises(TypeError, match="frkern: a patched model cannot be pickled.*unpatch"):
        torch.save(unet, io.BytesIO())
    frkern.unpatch(unet)
    torch.save(unet, io.BytesIO())


# --- img2img / inpaint: plan by position in the whole schedule ---------------------------------
def img2img_pipeline(kind, scheduler):
    if kind == "sdxl":
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=sdxl_unet(), scheduler=scheduler, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
        prompt = sdxl_prompt_kwargs()
    else:
        cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionImg2ImgPipeline
        pipe = cls(vae=vae(), text_encoder=None, tokenizer=None, unet=sd_unet(), scheduler=scheduler,
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        prompt = sd_prompt_kwargs()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    prompt["image"] = torch.rand(1, 3, 32, 32, generator=g)
    if kind == "inpaint":
        prompt["mask_image"] = (torch.rand(1, 1, 32, 32, generator=g) > 0.5).float()
    return pipe, prompt


@pytest.mark.parametrize("kind, scheduler", [
    ("img2img", "ddim"), ("img2img", "dpm"), ("inpaint", "ddim"), ("sdxl", "euler"),
])
@pytest.mark.parametrize("strength", [0.45, pytest.param(0.7, marks=pytest.mark.slow), 1.0])  # 0.7: extended tier
def test_img2img_plans_by_position_in_the_whole_schedule(kind, scheduler, strength):
    make_sched = {"ddim": ddim, "dpm": lambda: DPMSolverMultistepScheduler(**SCHED_CFG),
                  "euler": lambda: EulerDiscreteScheduler(**SCHED_CFG)}[scheduler]
    pipe, prompt = img2img_pipeline(kind, make_sched())
    steps, policy = 10, frkern.FRDiff(interval=3, score_mix=True)
    ref_pipe = copy.deepcopy(pipe)
    ref = FRDiffByPosition(ref_pipe.unet, ref_pipe.scheduler, policy.interval, policy.score_mix)
    want = generate(ref_pipe, prompt, steps=steps, strength=strength)
    handle = frkern.patch(pipe, policy, backend="torch")
    got = generate(pipe, prompt, steps=steps, strength=strength)
    first = ref.positions[0]
    assert (first > 0) == (strength < 1.0)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (first, handle.stats)
    # later keyframes of the whole schedule are reached: one full call per keyframe position
    assert handle.stats["full"] == 1 + sum(1 for p in ref.positions[1:] if p % 3 == 0)


@pytest.mark.parametrize("split", [0.5, 0.8])
def test_sdxl_base_with_denoising_end_and_refiner_with_denoising_start(split):
    """SDXL's ensemble of experts: the base pipeline runs the schedule's first steps (denoising_end),
    the refiner (img2img with denoising_start, its own UNet) the rest from the base's latents. Both
    patched, each planned by position in its whole schedule (FRDiffByPosition on copies); a second
    round equals the first (the base's generation, cut short, closes on its next set_timesteps)."""
    steps, policy = 10, frkern.FRDiff(interval=3, score_mix=True)
    base, prompt = make_sdxl_pipeline(scheduler=ddim()), sdxl_prompt_kwargs()
    refiner, _ = img2img_pipeline("sdxl", EulerDiscreteScheduler(**SCHED_CFG))
    refiner.unet = sdxl_unet(seed=3)

    def ensemble(base, refiner):
        latents = generate(base, prompt, steps=steps, denoising_end=split)
        return generate(refiner, prompt, steps=steps, image=latents, denoising_start=split)

    ref_base, ref_refiner = copy.deepcopy(base), copy.deepcopy(refiner)
    ref_b = FRDiffByPosition(ref_base.unet, ref_base.scheduler, policy.interval, policy.score_mix)
    ref_r = FRDiffByPosition(ref_refiner.unet, ref_refiner.scheduler, policy.interval, policy.score_mix)
    want = ensemble(ref_base, ref_refiner)
    cut = round(steps * split)
    assert ref_b.positions == list(range(cut)) and ref_r.positions[0] >= cut - 1 and ref_r.positions[-1] == steps - 1
    handles = frkern.patch(base, policy, backend="torch"), frkern.patch(refiner, policy, backend="torch")
    for _ in range(2):
        got = ensemble(base, refiner)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), [h.stats for h in handles]
    base_stats, refiner_stats = handles[0].stats, handles[1].stats
    assert base_stats["full"] == sum(1 for p in ref_b.positions if p % 3 == 0)
    assert refiner_stats["full"] == 1 + sum(1 for p in ref_r.positions[1:] if p % 3 == 0)
    assert base_stats.get("reuse", 0) + base_stats.get("skip", 0) > 0


def panorama_pipeline(scheduler):
    """StableDiffusionPanoramaPipeline (MultiDiffusion): per timestep it runs the UNet on each view
    and steps each with the scheduler's state restored from a deep copy of its __dict__. Two
    overlapping 16x16 latent views of a 16x24 latent (its get_views assumes 64-latent windows and a
    VAE factor of 8; these tiny components have a factor of 2)."""
    import warnings

    from diffusers import StableDiffusionPanoramaPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in diffusers, still shipped
        pipe = StableDiffusionPanoramaPipeline(vae=vae(), text_encoder=None, tokenizer=None, unet=sd_unet(),
                                               scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.get_views = lambda height, width, **kw: [(0, 16, 0, 16), (0, 16, 8, 24)]
    return pipe


def _panorama(pipe):
    return pipe(**sd_prompt_kwargs(), num_inference_steps=4, height=32, width=48,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("scheduler", ["euler", "dpm"])
def test_panorama_restores_the_scheduler_state_it_copies(scheduler):
    """NoReuse: bit for bit. frkern's tracked methods sit in the scheduler's __dict__; the pipeline's
    deep copy of that dict must keep them bound to this scheduler (a copy bound them to a copy of the
    scheduler, whose step state the pipeline never saw: Euler's latents were off by 10)."""
    make = {"euler": lambda: EulerDiscreteScheduler(**SCHED_CFG),
            "dpm": lambda: DPMSolverMultistepScheduler(**SCHED_CFG)}[scheduler]
    want = _panorama(panorama_pipeline(make()))
    pipe = panorama_pipeline(make())
    frkern.patch(pipe, frkern.NoReuse(), backend="torch")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    assert torch.equal(_panorama(pipe), want)
    assert len(calls) == 8  # 4 steps x 2 views


@pytest.mark.parametrize("policy", [frkern.DeepCache(interval=3), frkern.FRDiff(interval=2)], ids=lambda p: p.name)
def test_panorama_with_a_caching_policy_is_refused_before_a_view_uses_anothers_features(policy):
    """Each view's step() gets the same schedule entry: to frkern the second view's call looked like
    the next step and reused the first view's features (latents off by 27, silently). Refused at that
    step() call, before its output is used."""
    pipe = panorama_pipeline(EulerDiscreteScheduler(**SCHED_CFG))
    frkern.patch(pipe, policy, backend="torch")
    with pytest.raises(ValueError, match=r"step was called twice for one timestep.*Panorama.*NoReuse"):
        _panorama(pipe)
    # the same pipeline without the views' loop (a plain SD pipeline on these components) still works
    plain = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items()})
    plain.set_progress_bar_config(disable=True)
    out = generate(plain, sd_prompt_kwargs())
    assert torch.isfinite(out).all() and frkern.handle_of(plain).stats.get("reuse", 0) + \
        frkern.handle_of(plain).stats.get("skip", 0) > 0


# --- schedulers: shared, replaced, and their signatures ------------------------------------------
def test_two_pipelines_sharing_one_scheduler():
    sched = ddim()
    pipe_a, pipe_b = make_sd_pipeline(scheduler=sched), make_sd_pipeline(unet=sd_unet(seed=1), scheduler=sched)
    prompt = sd_prompt_kwargs()
    frkern.patch(pipe_a, frkern.FRDiff(2))
    handle_b = frkern.patch(pipe_b, frkern.FRDiff(2))
    fresh = make_sd_pipeline(unet=sd_unet(seed=1))
    frkern.patch(fresh, frkern.FRDiff(2))
    want = generate(fresh, prompt)
    frkern.unpatch(pipe_a)  # must leave pipe_b's tracking in place
    for _ in range(2):
        assert torch.equal(generate(pipe_b, prompt), want)
        assert handle_b.stats["reuse"] > 0 and handle_b.runtime.cache.generation > 0
    assert handle_b.cache_bytes == 0  # a finished generation frees its features


def test_pipeline_built_from_the_components_of_a_patched_one():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    frkern.patch(pipe, frkern.FRDiff(2))
    want = generate(pipe, prompt)
    other = StableDiffusionPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    assert torch.equal(generate(other, prompt), want)


@pytest.mark.parametrize("when", ["patched_then_from_pipe", "from_pipe_then_patched"])
def test_from_pipe_shares_the_unet_and_scheduler_and_generations_stay_apart(when):
    """`Img2Img.from_pipe(pipe)` shares the UNet and the scheduler object: generations alternating
    between the two pipelines each equal a fresh pipeline's run with the same policy."""
    prompt = sd_prompt_kwargs()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    def text(p):
        return generate(p, prompt)

    def img2img(p):
        return p(**prompt, image=image, strength=0.75, num_inference_steps=8, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images

    policy = frkern.DeepCache(interval=3)
    pipe = make_sd_pipeline()
    if when == "patched_then_from_pipe":
        handle = frkern.patch(pipe, policy)
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    assert other.unet is pipe.unet and other.scheduler is pipe.scheduler
    if when == "from_pipe_then_patched":
        handle = frkern.patch(pipe, policy)
    fresh_text, fresh_i2i = make_sd_pipeline(), StableDiffusionImg2ImgPipeline(**make_sd_pipeline().components)
    fresh_i2i.set_progress_bar_config(disable=True)
    frkern.patch(fresh_text, policy)
    frkern.patch(fresh_i2i, policy)
    want = (text(fresh_text), img2img(fresh_i2i))
    for _ in range(2):
        assert torch.equal(text(pipe), want[0])
        assert torch.equal(img2img(other), want[1])
        assert handle.stats["reuse"] > 0  # the img2img generation reused features


def test_second_pipeline_with_its_own_scheduler_never_reads_stale_features():
    unet = sd_unet()
    pipe = make_sd_pipeline(unet=unet)
    other = make_sd_pipeline(unet=unet, scheduler=ddim())
    prompt = sd_prompt_kwargs()
    full = generate(other, prompt, seed=5)
    handle = frkern.patch(pipe, frkern.FRDiff(2))
    generate(pipe, prompt)
    with pytest.warns(UserWarning, match="outside any generation"):
        got = generate(other, prompt, seed=5)
    assert torch.equal(got, full)  # untracked calls run in full
    assert handle.stats["untracked"] == 8
    # patching the second pipeline too lets its scheduler drive the shared UNet
    assert frkern.patch(other, frkern.FRDiff(2)) is handle
    fresh = make_sd_pipeline(unet=sd_unet())
    frkern.patch(fresh, frkern.FRDiff(2))
    assert torch.equal(generate(other, prompt, seed=5), generate(fresh, prompt, seed=5))
    with pytest.raises(RuntimeError, match="already patched"):
        frkern.patch(other, frkern.Clockwork(2))


@pytest.mark.parametrize("policy", [frkern.NoReuse(), frkern.FRDiff(2)])
def test_scheduler_replaced_after_patch(policy):
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    frkern.patch(pipe, policy)
    generate(pipe, prompt)
    old = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    got = generate(pipe, prompt)
    fresh = make_sd_pipeline(scheduler=EulerDiscreteScheduler.from_config(old.config))
    frkern.patch(fresh, policy)
    assert torch.equal(got, generate(fresh, prompt))
    assert "step" not in old.__dict__  # the replaced scheduler is no longer wrapped
    frkern.unpatch(pipe)
    assert "step" not in pipe.scheduler.__dict__


def test_tracked_scheduler_keeps_its_signatures():
    pipe = make_sd_pipeline(scheduler=EulerAncestralDiscreteScheduler(**SCHED_CFG))
    before = {m: inspect.signature(getattr(pipe.scheduler, m)) for m in ("set_timesteps", "step")}
    frkern.patch(pipe, frkern.FRDiff(2))
    assert {m: inspect.signature(getattr(pipe.scheduler, m)) for m in before} == before


@pytest.mark.parametrize("case", ["euler_ancestral", "ddim_eta", "lcm", "lcm_timesteps", "ays_sigmas", "dpm_timesteps"])
def test_noreuse_equals_unpatched_with_generator_eta_and_custom_schedules(case):
    sched = {
        "euler_ancestral": lambda: EulerAncestralDiscreteScheduler(**SCHED_CFG),
        "ddim_eta": ddim,
        "lcm": lambda: LCMScheduler(**SCHED_CFG),
        "lcm_timesteps": lambda: LCMScheduler(**SCHED_CFG),
        "ays_sigmas": lambda: EulerDiscreteScheduler(**SCHED_CFG),
        "dpm_timesteps": lambda: DPMSolverMultistepScheduler(**SCHED_CFG),
    }[case]()
    kw = {
        "ddim_eta": dict(eta=0.8),
        "lcm_timesteps": dict(timesteps=[999, 759, 499, 259]),
        "ays_sigmas": dict(sigmas=[14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0]),
        "dpm_timesteps": dict(timesteps=[999, 850, 736, 645, 545, 455, 343, 233, 124, 24]),
    }.get(case, {})
    steps = None if ("timesteps" in kw or "sigmas" in kw) else 4
    pipe = make_sd_pipeline(scheduler=sched)
    prompt = sd_prompt_kwargs()
    want = generate(pipe, prompt, steps=steps, seed=9, **kw)
    frkern.patch(pipe, frkern.NoReuse())
    assert torch.equal(generate(pipe, prompt, steps=steps, seed=9, **kw), want)
    frkern.unpatch(pipe)
    frkern.patch(pipe, frkern.FRDiff(2))  # and reuse runs through the same schedules
    out = generate(pipe, prompt, steps=steps, seed=9, **kw)
    assert torch.isfinite(out).all()


# --- more pipelines end to end ------------------------------------------------------------------
@pytest.mark.parametrize("policy", [frkern.NoReuse(), frkern.FRDiff(2), frkern.DeepCache(3)])
def test_controlnet_pipeline(policy):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    unet = sd_unet()
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    pipe = StableDiffusionControlNetPipeline(
        vae=vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet, scheduler=ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = dict(sd_prompt_kwargs(), image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    want = generate(pipe, prompt)
    handle = frkern.patch(pipe, policy, backend="torch")
    got = generate(pipe, prompt)
    if isinstance(policy, frkern.NoReuse):
        assert torch.equal(got, want)
    else:
        assert handle.stats.get("reuse", 0) > 0 and torch.isfinite(got).all() and 0 < (got - want).norm() < want.norm()
    frkern.unpatch(pipe)
    assert torch.equal(generate(pipe, prompt), want)


def test_sd2_style_v_prediction_pipeline():
    unet = sd_unet(attention_head_dim=(2, 4, 8), use_linear_projection=True)
    sched = DDIMScheduler(**SCHED_CFG, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    pipe = make_sd_pipeline(unet=unet, scheduler=sched)
    prompt = sd_prompt_kwargs()
    want = generate(pipe, prompt)
    frkern.patch(pipe, frkern.NoReuse(), backend="torch")
    assert torch.equal(generate(pipe, prompt), want)
    frkern.unpatch(pipe)
    ref_pipe = copy.deepcopy(pipe)
    ref = FRDiffByPosition(ref_pipe.unet, ref_pipe.scheduler, 2, score_mix=True)
    frkern.patch(pipe, frkern.FRDiff(2), backend="torch")
    assert torch.allclose(generate(pipe, prompt), generate(ref_pipe, prompt), rtol=1e-6, atol=1e-6)
    assert ref.positions == list(range(8))


def test_lcm_pipeline_with_timestep_conditioning():
    # LCM-distilled UNets take a guidance embedding (time_cond_proj_dim); the pipeline runs no CFG batch.
    from diffusers import LatentConsistencyModelPipeline

    unet = sd_unet(time_cond_proj_dim=8)
    pipe = LatentConsistencyModelPipeline(
        vae=vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=LCMScheduler(**SCHED_CFG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = {"prompt_embeds": sd_prompt_kwargs()["prompt_embeds"]}
    want = generate(pipe, prompt, steps=4)
    frkern.patch(pipe, frkern.NoReuse(), backend="torch")
    assert torch.equal(generate(pipe, prompt, steps=4), want)
    frkern.unpatch(pipe)
    handle = frkern.patch(pipe, frkern.FRDiff(2, score_mix=False), backend="torch")
    out = generate(pipe, prompt, steps=4)
    assert handle.stats == {"full": 2, "reuse": 2} and torch.isfinite(out).all()
