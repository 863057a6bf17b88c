"""frkern.TGate against its oracle, the `tgate` package (1.0.0): the same latents, bit for bit, as
its SD and SDXL loaders (pipe.tgate(...)) on tiny pipelines, with the pipeline left as diffusers
wrote it (frkern drops CFG inside the patched UNet after the gate). Plus LoRA, guidance_rescale and
the refusals."""
from __future__ import annotations

import copy

import pytest
import torch

import frkern
from tiny import make_sd_pipeline, make_sdxl_pipeline, sd_prompt_kwargs, sdxl_prompt_kwargs

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
        out = pipe(**prompt, **RUN, generator=torch.Generator().manual_seed(0), **kw).images
        return out, dict(handle.stats)
    finally:
        frkern.unpatch(pipe)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("params", PARAMS, ids=["g4-sp2-fi1-w1", "g5-sp2-fi2-w1", "g3-sp3-fi1-w0"])
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


def test_refusals():
    from tiny_video import motion_unet

    with pytest.raises(ValueError, match="covers image UNets.*model family UNetMotionModel, policy TGate"):
        frkern.patch(motion_unet(), frkern.TGate())
    pipe = make_sd_pipeline()
    with pytest.raises(ValueError, match="cuda_graphs=True is not supported"):
        frkern.patch(pipe, frkern.TGate(), cuda_graphs=True)
    assert frkern.handle_of(pipe) is None
    # a pipeline without classifier-free guidance has no halves to drop: refused at the first halved call
    frkern.patch(pipe, frkern.TGate(gate_step=2))
    with pytest.raises(ValueError, match="no \\[uncond, cond\\] halves"):
        pipe(**sd_prompt_kwargs(), **dict(RUN, num_inference_steps=3), guidance_scale=1.0)
    frkern.unpatch(pipe)
    for kwargs, match in [(dict(gate_step=0), "gate_step must be an int >= 1"),
                          (dict(fi_interval=0), "fi_interval must be an int >= 1"),
                          (dict(warm_up=-1), "warm_up must be an int >= 0"),
                          (dict(cfg=1), "cfg must be True or False")]:
        with pytest.raises(ValueError, match=match):
            frkern.TGate(**kwargs)
    p = frkern.TGate(gate_step=7, sp_interval=3)
    assert frkern.from_json(p.to_json()) == p


def test_without_cfg_nothing_is_halved_or_averaged():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    handle = frkern.patch(pipe, frkern.TGate(gate_step=3, sp_interval=2, warm_up=1, cfg=False), backend="torch")
    out = pipe(**prompt, **RUN, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all() and handle.stats == {"full": 1, "reuse": 7}
    frkern.unpatch(pipe)
