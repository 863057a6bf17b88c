"""The SimpleCrossAttn / ResnetDownsample block family of UNet2DConditionModel (Kandinsky 2.2's and
DeepFloyd IF's UNets): every policy against its independent statement on an unpatched copy, bit
for bit (torch backend), on a Kandinsky-2.2-style UNet (image embeddings as conditioning, scale-shift
ResNets, 3 levels, 2 layers per block, odd channel counts) and on DeepFloyd IF's two UNets; and the
Kandinsky 2.2 decoder pipeline end to end. The blocks' attentions (added-KV processors) are not reuse units: FRDiff reuses the
ResNets there."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

import frkern
from reference import FRDiffHooks, SegmentHooks
from reference_deepcache import DeepCacheCutHooks
from reference_encoder_propagation import encoder_propagation_reference

STEPS = 4
EMBED = 32


def kandinsky_unet(seed=0, levels=3) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    down = ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (levels - 1)
    up = ("SimpleCrossAttnUpBlock2D",) * (levels - 1) + ("ResnetUpsampleBlock2D",)
    return UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(24, 40, 48)[:levels], layers_per_block=2,
        encoder_hid_dim=EMBED, encoder_hid_dim_type="image_proj", cross_attention_dim=40, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8).eval()


def calls():
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, EMBED, generator=g)
    return [dict(sample=x + 0.05 * i * torch.randn(x.shape, generator=g), timestep=900 - 100 * i,
                 encoder_hidden_states=emb, added_cond_kwargs={"image_embeds": emb}) for i in range(STEPS)]


def run_patched(policy, seq):
    unet = kandinsky_unet()
    handle = frkern.patch(unet, policy, backend="torch")
    handle.begin(STEPS)
    outs = []
    with torch.no_grad():
        for i, call in enumerate(seq):
            handle.set_step(i)
            outs.append(unet(**call).sample)
    return outs, handle


def run_statement(hooks_for, seq, keyframe=lambda i: i % 2 == 0):
    ref = kandinsky_unet()
    hooks = hooks_for(ref) if hooks_for else None
    outs = []
    with torch.no_grad():
        for i, call in enumerate(seq):
            if hooks is not None:
                hooks.keyframe = keyframe(i)
            outs.append(ref(**call).sample)
    return outs


@pytest.mark.parametrize("policy, hooks_for", [
    (frkern.NoReuse(), None),
    (frkern.FRDiff(interval=2, score_mix=False), FRDiffHooks),
    (frkern.DeepCache(interval=2, branch=0), lambda u: DeepCacheCutHooks(u, 0)),
    (frkern.DeepCache(interval=2, branch=3), lambda u: DeepCacheCutHooks(u, 3)),
    (frkern.Clockwork(clock=2, levels=2), lambda u: SegmentHooks(u, 2)),
    (frkern.SkipConv(threshold=0.0), None),  # threshold 0 computes what full compute computes
], ids=["NoReuse", "FRDiff", "DeepCache-0", "DeepCache-3", "Clockwork-2", "SkipConv-0"])
def test_equals_the_statement(policy, hooks_for):
    seq = calls()
    got, handle = run_patched(policy, seq)
    want = run_statement(hooks_for, seq)
    if handle.caches and policy.name != "SkipConv":
        assert handle.stats["reuse"] == 2, handle.stats
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all() and torch.equal(a, b), (i, (a - b).abs().max().item())


def test_encoder_propagation_equals_the_statement():
    seq = calls()
    got, handle = run_patched(frkern.EncoderPropagation(interval=2), seq)
    with torch.no_grad():
        want = encoder_propagation_reference(kandinsky_unet(), seq, keys=(0, 2))
    assert handle.stats == {"full": 2, "reuse": 2}
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


def test_tgate_is_refused_and_the_model_is_unchanged():
    unet = kandinsky_unet()
    forward = unet.forward
    with pytest.raises(ValueError, match="no transformer attention"):
        frkern.patch(unet, frkern.TGate(gate_step=2))
    assert unet.forward == forward and "_frkern_handle" not in unet.__dict__
    assert not any(type(m).__module__.startswith("frkern") for m in unet.modules())


def kandinsky_pipeline():
    torch.manual_seed(0)
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, steps_offset=1, prediction_type="epsilon", thresholding=False)
    pipe = KandinskyV22Pipeline(unet=kandinsky_unet(levels=2), scheduler=scheduler, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=STEPS):
    g = torch.Generator().manual_seed(3)
    embeds, negative = torch.randn(1, EMBED, generator=g), torch.randn(1, EMBED, generator=g)
    return pipe(image_embeds=embeds, negative_image_embeds=negative, height=32, width=32, guidance_scale=4.0,
                num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_kandinsky_pipeline_end_to_end():
    """NoReuse is bit for bit the unpatched pipeline; DeepCache in the pipeline (its scheduler
    tracked) equals its statement with keyframes at the even steps, over two generations."""
    plain = generate(kandinsky_pipeline())
    pipe = kandinsky_pipeline()
    frkern.patch(pipe, frkern.NoReuse(), backend="torch")
    assert torch.equal(generate(pipe), plain)
    frkern.unpatch(pipe)
    assert torch.equal(generate(pipe), plain)

    ref = kandinsky_pipeline()
    hooks = DeepCacheCutHooks(ref.unet, 1)
    count = [0]

    def pre(module, args, kwargs):
        hooks.keyframe = count[0] % 2 == 0
        count[0] += 1

    ref.unet.register_forward_pre_hook(pre, with_kwargs=True)
    want = generate(ref)
    handle = frkern.patch(pipe, frkern.DeepCache(interval=2, branch=1), backend="torch")
    for _ in range(2):
        assert torch.equal(generate(pipe), want)
        assert handle.stats == {"full": 2, "reuse": 2}
        count[0] = 0


def if_unet(super_resolution: bool) -> UNet2DConditionModel:
    """DeepFloyd IF's UNets, as diffusers' IF tests build them: GELU ResNets, text addition
    embeddings, group-normed cross-attention; the super-resolution stage also takes the noise level
    as a timestep class label and a layer count per block."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(0)
    config = dict(
        sample_size=32, layers_per_block=[1, 2] if super_resolution else 1, block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=6 if super_resolution else 3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32,
        attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu")
    if super_resolution:
        config.update(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                      time_embedding_dim=32)
    unet = UNet2DConditionModel(**config)
    unet.set_attn_processor(AttnAddedKVProcessor())
    return unet.eval()


@pytest.mark.parametrize("super_resolution", [False, True], ids=["if-stage1", "if-stage2"])
@pytest.mark.parametrize("policy, hooks_for", [
    (frkern.NoReuse(), None),
    (frkern.FRDiff(interval=2, score_mix=False), FRDiffHooks),
    (frkern.DeepCache(interval=2, branch=1), lambda u: DeepCacheCutHooks(u, 1)),
], ids=["NoReuse", "FRDiff", "DeepCache-1"])
def test_deepfloyd_if_unets_equal_the_statement(super_resolution, policy, hooks_for):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6 if super_resolution else 3, 16, 16, generator=g)
    ehs = torch.randn(2, 7, 32, generator=g)
    extra = dict(class_labels=torch.tensor([250, 250])) if super_resolution else {}
    seq = [dict(sample=x + 0.05 * i, timestep=900 - 100 * i, encoder_hidden_states=ehs, **extra) for i in range(STEPS)]
    unet, ref = if_unet(super_resolution), if_unet(super_resolution)
    handle = frkern.patch(unet, policy, backend="torch")
    hooks = hooks_for(ref) if hooks_for else None
    if handle.caches:
        handle.begin(STEPS)
    with torch.no_grad():
        for i, call in enumerate(seq):
            if handle.caches:
                handle.set_step(i)
            if hooks is not None:
                hooks.keyframe = i % 2 == 0
            assert torch.equal(unet(**call).sample, ref(**call).sample), i
    if handle.caches:
        assert handle.stats == {"full": 2, "reuse": 2}
