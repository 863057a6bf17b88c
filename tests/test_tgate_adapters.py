"""frkern.TGate with adapters that feed the UNet more than (sample, t, text): ControlNet residuals and
IP-Adapter image embeddings, against statements written from T-GATE's definition
(tests/reference_tgate_adapters.py) and the `tgate` package, never from frkern's code.

ControlNet: the statement is the package's SD loader whose UNet runs the same ControlNet on each
call's inputs. After the gate the package calls the UNet with the unconditional half only, so its
ControlNet runs at batch B, while in frkern the diffusers ControlNet pipeline runs the ControlNet on
both halves (2B) and frkern hands the UNet the first half of the residuals. The ControlNet is per
sample, so the two agree up to batch-size-dependent rounding of the ControlNet: on CPU torch its
residuals for a sample differ at batch 1 and 2 (max abs ~8e-7), and the final latents are not bit
equal (relative L2 5e-8 for g4-sp2-fi1-w1, 7e-8 for g3-sp3-fi2-w0). The test allows relative L2 1e-6:
residuals from the wrong (conditional) half after the gate give 8e-5 / 1.5e-4, the conditioning
scale 1.0 instead of 0.7 3.5e-2.

IP-Adapter (scale 0): the IP branch is skipped by diffusers' processor, so T-GATE on that UNet is
plain T-GATE on the same weights, and the package (which computes attention itself and cannot run an
IP-Adapter processor) is the oracle on a copy with the IP-Adapter unloaded: bit for bit.
IP-Adapter (scale 1): the package ignores IP processors, so the statement is TGateHooks (package's
per-step flags, forward hooks storing / averaging / freezing each Attention's full output, IP branch
included, and the first-half UNet call after the gate): bit for bit. The statement itself is checked
against the package at scale 0."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import frkern
from reference_tgate_adapters import TGateHooks, ip_adapter_state_dict, with_controlnet
from tiny import ddim, make_sd_pipeline, sd_prompt_kwargs, sd_unet, vae

tgate = pytest.importorskip("tgate")

STEPS = 8
RUN = dict(num_inference_steps=STEPS, height=32, width=32, output_type="latent", guidance_scale=5.0)
PARAMS = [dict(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1),
          dict(gate_step=3, sp_interval=3, fi_interval=2, warm_up=0)]
IDS = ["g4-sp2-fi1-w1", "g3-sp3-fi2-w0"]
CN_SCALE = 0.7
CN_RTOL = 1e-6


def _gen():
    return torch.Generator().manual_seed(0)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _record_latents(pipe):
    """The initial latents a pipeline draws (prepare_latents' result), recorded on the instance."""
    seen, inner = [], pipe.prepare_latents

    def prepare_latents(*args, **kwargs):
        out = inner(*args, **kwargs)
        seen.append(out.clone())
        return out

    pipe.prepare_latents = prepare_latents
    return seen


def _frkern(pipe, params, **kw):
    handle = frkern.patch(pipe, frkern.TGate(**params), backend="torch")
    try:
        out = pipe(**kw, **RUN, generator=_gen()).images
        stats = dict(handle.stats)
    finally:
        frkern.unpatch(pipe)
    return out, stats


# --- ControlNet ---------------------------------------------------------------------------------
def _controlnet_setup():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    unet = sd_unet()
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    # from_unet zero-initialises the zero convs (and the cond embedding's last conv): the residuals
    # would be 0 and the ControlNet inert; give them random weights so the test is not vacuous
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for mod in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                    controlnet.controlnet_cond_embedding.conv_out]:
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cn_pipe = StableDiffusionControlNetPipeline(
        vae=vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet, scheduler=ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd_pipe = StableDiffusionPipeline(
        vae=cn_pipe.vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=cn_pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (cn_pipe, sd_pipe):
        p.set_progress_bar_config(disable=True)
    return cn_pipe, sd_pipe


def _control_image():
    from PIL import Image

    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), mode="RGB")


def _control_cond(image):
    """The ControlNet conditioning as a diffusers ControlNet pipeline prepares it from an RGB PIL
    image already at the output size, stated independently: pixels / 255 as float32, NCHW, no
    normalisation to [-1, 1] (the control image processor has do_normalize=False)."""
    arr = np.asarray(image).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_controlnet_pipeline_equals_the_package_with_the_controlnet_in_its_unet_call(params):
    cn_pipe, sd_pipe = _controlnet_setup()
    prompt, image = sd_prompt_kwargs(), _control_image()
    cond = _control_cond(image)
    g = params["gate_step"]

    # the statement's conditioning is what the diffusers pipeline feeds its ControlNet (plain run)
    fed = []
    hook = cn_pipe.controlnet.register_forward_pre_hook(
        lambda m, a, kw: fed.append((a[0].shape[0], kw["controlnet_cond"].clone(), kw["conditioning_scale"])),
        with_kwargs=True)
    cn_pipe(**prompt, image=image, controlnet_conditioning_scale=CN_SCALE, **RUN, generator=_gen())
    hook.remove()
    assert len(fed) == STEPS
    for n, c, s in fed:
        assert n == 2 and s == CN_SCALE and c.dtype == torch.float32 and torch.equal(c, cond.repeat(2, 1, 1, 1))

    # the statement: the package's SD loader, its UNet running a copy of the same ControlNet first
    ref = tgate.TgateSDLoader(copy.deepcopy(sd_pipe))
    batches = with_controlnet(ref.unet, copy.deepcopy(cn_pipe.controlnet), cond, CN_SCALE)
    ref_latents = _record_latents(ref)
    want = ref.tgate(**prompt, **RUN, generator=_gen(), **params).images
    assert batches == [2] * g + [1] * (STEPS - g)  # both halves before the gate, the uncond half after

    cn_latents = _record_latents(cn_pipe)
    got, stats = _frkern(cn_pipe, params, **prompt, image=image, controlnet_conditioning_scale=CN_SCALE)
    # both pipelines start from the same noise (same seed, same prepare_latents draw)
    assert len(cn_latents) == len(ref_latents) == 1 and torch.equal(cn_latents[0], ref_latents[0])
    assert torch.isfinite(got).all()
    assert stats == {"full": 1, "reuse": STEPS - 1}
    assert _rel(got, want) <= CN_RTOL, (_rel(got, want), (got - want).abs().max().item())

    # not vacuous: the ControlNet changes the T-GATE result far beyond the tolerance
    without, _ = _frkern(sd_pipe, params, **prompt)
    assert _rel(got, without) > 1e3 * CN_RTOL


# --- IP-Adapter -----------------------------------------------------------------------------------
IMAGE_EMBED_DIM = 16


def _ip_setup():
    """A tiny SD pipeline with one IP-Adapter (ImageProjection + IPAdapterAttnProcessor2_0 on every
    cross-attention) loaded through diffusers' own converter from a random state dict, and a copy
    with the IP-Adapter unloaded (diffusers' unload_ip_adapter: default processors, no projection)."""
    unet = sd_unet()
    unet._load_ip_adapter_weights([ip_adapter_state_dict(unet, IMAGE_EMBED_DIM, seed=5)], low_cpu_mem_usage=False)
    procs = unet.attn_processors
    assert sum(type(p).__name__ == "IPAdapterAttnProcessor2_0" for p in procs.values()) == len(procs) // 2
    pipe = make_sd_pipeline(unet=unet)
    bare = copy.deepcopy(pipe)
    bare.unload_ip_adapter()
    assert bare.unet.encoder_hid_proj is None
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in bare.unet.attn_processors.values())
    # [negative; positive] image embeddings, (batch 1, 1 image, dim) each
    embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(6))]
    return pipe, bare, embeds


def _statement(pipe, params, **kw):
    ref = copy.deepcopy(pipe)
    hooks = TGateHooks(ref.unet, **params)
    out = ref(**kw, **RUN, generator=_gen()).images
    g = params["gate_step"]
    assert hooks.halved_inputs == [2] * g + [1] * (STEPS - g)
    return out


def test_ip_adapter_at_scale_zero_is_plain_tgate_exactly():
    """Scale 0: diffusers' IP processor skips its image branch, so (checked on plain runs) the IP
    pipeline equals the unloaded one bit for bit; T-GATE on it must equal the package's T-GATE on the
    unloaded copy bit for bit. The package cannot be run with the IP-Adapter loaded (its attention
    replaces the processor and cannot take the (text, image) pair), hence the unloaded copy; comparing
    frkern against frkern without IP-Adapter would not be independent."""
    pipe, bare, embeds = _ip_setup()
    prompt, params = sd_prompt_kwargs(), PARAMS[0]
    pipe.set_ip_adapter_scale(0.0)
    plain_bare = bare(**prompt, **RUN, generator=_gen()).images
    assert torch.equal(pipe(**prompt, ip_adapter_image_embeds=embeds, **RUN, generator=_gen()).images, plain_bare)

    want = tgate.TgateSDLoader(copy.deepcopy(bare)).tgate(**prompt, **RUN, generator=_gen(), **params).images
    got, stats = _frkern(pipe, params, **prompt, ip_adapter_image_embeds=embeds)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    assert stats == {"full": 1, "reuse": STEPS - 1}
    assert not torch.equal(got, plain_bare)
    # the statement used at scale 1 below is itself the package's T-GATE here, bit for bit
    assert torch.equal(_statement(pipe, params, **prompt, ip_adapter_image_embeds=embeds), want)


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_ip_adapter_at_scale_one_equals_the_hook_statement(params):
    """Scale 1: the IP processor's image cross-attention is part of each cross-attention output, so
    it is in the mean stored at gate_step - 1 and frozen after; the image embeddings are narrowed to
    the unconditional half with the other inputs after the gate."""
    pipe, _, embeds = _ip_setup()
    prompt = sd_prompt_kwargs()
    g = params["gate_step"]
    pipe.set_ip_adapter_scale(1.0)
    want = _statement(pipe, params, **prompt, ip_adapter_image_embeds=embeds)

    proj_batches = []
    hook = pipe.unet.encoder_hid_proj.register_forward_pre_hook(
        lambda m, a: proj_batches.append(a[0][0].shape[0]))
    got, stats = _frkern(pipe, params, **prompt, ip_adapter_image_embeds=embeds)
    hook.remove()
    assert torch.isfinite(got).all()
    assert torch.equal(got, want), (_rel(got, want), (got - want).abs().max().item())
    assert stats == {"full": 1, "reuse": STEPS - 1}
    # image_embeds reach the UNet's projection with both halves before the gate, the first after
    assert proj_batches == [2] * g + [1] * (STEPS - g)

    # not vacuous: the IP-Adapter changes the T-GATE result
    pipe.set_ip_adapter_scale(0.0)
    off, _ = _frkern(pipe, params, **prompt, ip_adapter_image_embeds=embeds)
    assert _rel(got, off) > 1e-3


# --- PAG (perturbed-attention guidance) and fused projections: diffusers finds attentions by type --
def _pag_pipeline():
    from diffusers import StableDiffusionPAGPipeline

    pipe = StableDiffusionPAGPipeline(vae=vae(), text_encoder=None, tokenizer=None, unet=sd_unet(), scheduler=ddim(),
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                      pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


PAG_PARAMS = dict(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)


def test_pag_finds_its_self_attentions_under_tgate_and_equals_the_statement():
    """PAG's pipeline sets its processor on the self-attentions it finds by isinstance(Attention)
    (here the mid block's) for the call; T-GATE's wrappers stand where those attentions were. With
    CFG the batch is [uncond, cond, perturbed]: TGate(cfg=False) stores and reuses whole outputs,
    as TGateHooks(cfg=False) on an unpatched copy does: bit for bit."""
    pipe = _pag_pipeline()
    prompt = sd_prompt_kwargs()
    ref = copy.deepcopy(pipe)
    hooks = TGateHooks(ref.unet, **PAG_PARAMS, cfg=False)
    want = ref(**prompt, **RUN, pag_scale=2.0, generator=_gen()).images
    assert hooks.halved_inputs == [3] * STEPS  # [uncond, cond, perturbed] on every call

    handle = frkern.patch(pipe, frkern.TGate(**PAG_PARAMS, cfg=False), backend="torch")
    seen = []
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1

    def record(p, i, t, kw):
        seen.append(type(attn.processor).__name__)
        return {}

    got = pipe(**prompt, **RUN, pag_scale=2.0, generator=_gen(), callback_on_step_end=record).images
    assert type(attn).__name__ == "TGateAttention" and all("PAG" in name for name in seen), seen
    assert torch.equal(got, want), _rel(got, want)
    assert handle.stats == {"full": 1, "reuse": STEPS - 1}
    assert not torch.equal(got, pipe(**prompt, **RUN, pag_scale=0.0, generator=_gen()).images)  # PAG acts


def test_tgate_with_cfg_halves_refuses_pags_batch_of_three():
    pipe = _pag_pipeline()
    frkern.patch(pipe, frkern.TGate(**PAG_PARAMS), backend="torch")
    with pytest.raises(ValueError, match=r"batch of 3 .*PAG.*TGate\(cfg=False\)"):
        pipe(**sd_prompt_kwargs(), **RUN, pag_scale=2.0, generator=_gen())


@pytest.mark.parametrize("params", PARAMS[:1], ids=IDS[:1])
def test_fused_projections_after_patching_with_tgate(params):
    """fuse_qkv_projections fuses the attentions it finds by isinstance(Attention): under T-GATE's
    wrappers too (it failed with "'Attention' object has no attribute 'to_qkv'" when they did not
    pass as attentions). Against the statement on a copy fused the same way."""
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    ref = copy.deepcopy(pipe)
    ref.fuse_qkv_projections()
    TGateHooks(ref.unet, **params)
    want = ref(**prompt, **RUN, generator=_gen()).images
    handle = frkern.patch(pipe, frkern.TGate(**params), backend="torch")
    pipe.fuse_qkv_projections()
    assert all("Fused" in type(p).__name__ for p in pipe.unet.attn_processors.values())
    assert "(attn1): TGateAttention(" in repr(pipe.unet)  # passes as an Attention, still says what it is
    got = pipe(**prompt, **RUN, generator=_gen()).images
    assert torch.equal(got, want), _rel(got, want)
    assert handle.stats == {"full": 1, "reuse": STEPS - 1}
    pipe.unfuse_qkv_projections()
    frkern.unpatch(pipe)
    assert not any("Fused" in type(p).__name__ for p in pipe.unet.attn_processors.values())
