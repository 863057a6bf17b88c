"""Self-checks of the encoder-propagation statement (tests/reference_encoder_propagation.py) on a
tiny SD1.x-shaped UNet2DConditionModel, all bit for bit (torch.equal):

* keyframe calls are the plain UNet;
* a non-keyframe call at the keyframe's own inputs is the plain UNet;
* a non-keyframe call with another sample at the keyframe's timestep is the keyframe's output
  (the encoder is the only place the sample enters);
* with another timestep it differs, the time embedding sees the current timestep, and it equals
  the keyframe's decoder rerun at that timestep whatever the sample;
* on non-keyframes no module inside the encoder runs, every decoder module does;
* a later keyframe re-records; hooks leave the UNet unpatched.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from reference_encoder_propagation import (
    FASTER_DIFFUSION_SD50_KEYS,
    EncoderPropagationHooks,
    encoder_propagation_reference,
    uniform_keys,
)

CFG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 48, 64), norm_num_groups=16, cross_attention_dim=32,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
BATCH, SIZE, TOKENS = 2, 16, 7  # batch 2: a CFG pair


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**CFG).eval().float()


def _x(seed):
    return torch.randn(BATCH, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ehs():
    return torch.randn(BATCH, TOKENS, 32, generator=torch.Generator().manual_seed(100))


def call(x, t, ehs):
    return dict(sample=x, timestep=torch.tensor(t), encoder_hidden_states=ehs)


@torch.no_grad()
def plain(unet, kw):
    assert not any("forward" in m.__dict__ for m in unet.modules()), "UNet left patched"
    return unet(**kw).sample


def test_key_steps_constants():
    assert FASTER_DIFFUSION_SD50_KEYS == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert uniform_keys(10, 4) == (0, 4, 8)
    assert uniform_keys(3, 1) == (0, 1, 2)
    with pytest.raises(ValueError):
        uniform_keys(10, 0)


def test_keyframes_and_same_inputs_equal_plain(unet, ehs):
    calls = [call(_x(1), 981, ehs), call(_x(1), 981, ehs),   # non-key at the key's own inputs
             call(_x(2), 961, ehs), call(_x(2), 961, ehs)]
    outs = encoder_propagation_reference(unet, calls, keys={0, 2})
    for i, kw in enumerate(calls):
        assert torch.equal(outs[i], plain(unet, kw)), i


def test_non_key_ignores_sample_and_follows_timestep(unet, ehs):
    x_key, x_other = _x(3), _x(4)
    calls = [
        call(x_key, 761, ehs),
        call(x_other, 761, ehs),        # 1: other sample, same t -> the keyframe's output
        call(x_other, 741, ehs),        # 2: other t -> differs
        call(x_key, 741, ehs),          # 3: the key's sample at that t -> same as 2
        call(x_key * 0 + 5.0, 741, ehs),  # 4: any sample at that t -> same as 2
    ]
    outs = encoder_propagation_reference(unet, calls, keys={0})
    assert torch.equal(outs[1], outs[0])
    assert not torch.equal(plain(unet, calls[1]), outs[0])  # the sample does matter when run
    assert not torch.equal(outs[2], outs[0])
    assert (outs[2] - outs[0]).abs().max() > 1e-4
    assert torch.equal(outs[3], outs[2])
    assert torch.equal(outs[4], outs[2])
    # Not the plain UNet at that timestep either (the encoder is stale there).
    assert not torch.equal(outs[3], plain(unet, calls[3]))


def test_non_key_uses_current_text_conditioning(unet, ehs):
    x = _x(5)
    other = ehs.flip(0)
    outs = encoder_propagation_reference(unet, [call(x, 501, ehs), call(x, 501, other)], keys={0})
    assert not torch.equal(outs[1], outs[0])


@torch.no_grad()
def test_encoder_skipped_decoder_runs_with_current_timestep(unet, ehs):
    enc = [unet.conv_in, *unet.down_blocks, unet.mid_block]
    inner_enc = [m for e in enc for m in e.modules()]
    dec = [m for blk in unet.up_blocks for m in blk.modules()] + [unet.conv_norm_out, unet.conv_out]
    counts: dict[int, int] = {}
    seen_t = []
    handles = [m.register_forward_pre_hook(
        lambda mod, args: counts.__setitem__(id(mod), counts.get(id(mod), 0) + 1))
        for m in set(inner_enc) | set(dec)]
    handles.append(unet.time_proj.register_forward_hook(lambda m, a, o: seen_t.append(a[0].clone())))
    try:
        with EncoderPropagationHooks(unet) as hooks:
            hooks.keyframe = True
            unet(**call(_x(6), 901, ehs))
            ran_key = dict(counts)
            counts.clear()
            hooks.keyframe = False
            unet(**call(_x(7), 881, ehs))
            assert hooks.ran == {name: 1 for name in hooks.unit_names}
            assert hooks.unit_names == ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2",
                                        "mid_block"]
    finally:
        for h in handles:
            h.remove()
    # Module-level pre-hooks still fire for the 5 swapped units themselves (nn.Module.__call__),
    # but nothing inside them runs.
    inside = [m for m in inner_enc if all(m is not e for e in enc) and id(m) in ran_key]
    assert any(m is unet.down_blocks[0].resnets[0] for m in inside)
    assert any(m is unet.mid_block.attentions[0] for m in inside)
    assert not any(id(m) in counts for m in inside)
    dec_ran_key = {id(m): ran_key[id(m)] for m in dec if id(m) in ran_key}
    assert id(unet.up_blocks[2].attentions[2]) in dec_ran_key and id(unet.conv_out) in dec_ran_key
    assert {id(m): counts[id(m)] for m in dec if id(m) in counts} == dec_ran_key
    assert [t.tolist() for t in seen_t] == [[901] * BATCH, [881] * BATCH]


def test_rekey_and_cleanup(unet, ehs):
    calls = [call(_x(8), 981, ehs), call(_x(9), 961, ehs),
             call(_x(10), 941, ehs), call(_x(11), 941, ehs)]
    outs = encoder_propagation_reference(unet, calls, keys={0, 2})
    assert torch.equal(outs[2], plain(unet, calls[2]))
    assert torch.equal(outs[3], outs[2])  # propagated from the second keyframe, not the first
    assert not torch.equal(outs[1], plain(unet, calls[1]))


def test_errors(unet, ehs):
    with pytest.raises(ValueError):
        encoder_propagation_reference(unet, [call(_x(1), 981, ehs)], keys=set())
    with torch.no_grad(), EncoderPropagationHooks(unet) as hooks:
        hooks.keyframe = False
        with pytest.raises(RuntimeError):
            unet(**call(_x(1), 981, ehs))
        hooks.keyframe = True
        unet(**call(_x(1), 981, ehs))
        hooks.keyframe = False
        with pytest.raises(ValueError):  # the batch of a non-keyframe must match the keyframe's
            unet(sample=_x(1)[:1], timestep=torch.tensor(961), encoder_hidden_states=ehs[:1])
    assert plain(unet, call(_x(1), 981, ehs)) is not None  # unpatched after an error
