"""Dispatcher: bit-identity of NoReuse, unpatch, refusals that leave the model untouched."""
import copy

import pytest
import torch

import frkern
from frkern.units import ReusedResnetBlock2D, ReusedTransformer2D
from tiny import sd_inputs, sd_unet, sdxl_unet


def run(unet, inputs, t=500):
    sample, ehs, kw = inputs
    with torch.no_grad():
        return unet(sample, t, ehs, **kw).sample


@pytest.fixture(params=["sd", "sdxl"])
def unet(request):
    return sd_unet() if request.param == "sd" else sdxl_unet()


@pytest.mark.parametrize("policy", [frkern.NoReuse(), frkern.FRDiff(2), frkern.Clockwork(2), frkern.DeepCache(3)])
def test_keyframe_calls_are_bit_identical_with_torch_backend(unet, policy):
    inputs = sd_inputs(unet)
    ref = run(unet, inputs)
    handle = frkern.patch(unet, policy, backend="torch")
    handle.begin(4)
    assert torch.equal(run(unet, inputs), ref)  # step 0 is a full call for every policy
    if isinstance(policy, frkern.NoReuse):
        for i in range(1, 4):
            handle.set_step(i)
            assert torch.equal(run(unet, inputs), ref)


def test_unpatch_restores_tree_state_dict_and_outputs(unet):
    inputs = sd_inputs(unet)
    ref = run(unet, inputs)
    modules_before = [(n, m) for n, m in unet.named_modules()]
    sd_before = {k: v.clone() for k, v in unet.state_dict().items()}
    params_before = {n: p for n, p in unet.named_parameters()}

    handle = frkern.patch(unet, frkern.FRDiff(interval=2), backend="torch")
    # While patched: same state-dict keys, the very same parameter objects (no weight copies).
    assert list(unet.state_dict()) == list(sd_before)
    assert all(p is params_before[n] for n, p in unet.named_parameters())
    assert any(isinstance(m, ReusedResnetBlock2D) for m in unet.modules())
    assert any(isinstance(m, ReusedTransformer2D) for m in unet.modules())
    handle.begin(3)
    for i in range(3):
        handle.set_step(i)
        run(unet, inputs)
    assert handle.cache_bytes > 0

    frkern.unpatch(unet)
    assert [(n, m) for n, m in unet.named_modules()] == modules_before
    assert "forward" not in unet.__dict__
    after = unet.state_dict()
    assert list(after) == list(sd_before) and all(torch.equal(after[k], v) for k, v in sd_before.items())
    assert torch.equal(run(unet, inputs), ref)
    assert handle.cache_bytes == 0
    # and it can be patched again
    frkern.patch(unet, frkern.NoReuse())
    frkern.unpatch(unet)


def test_double_patch_is_refused_and_harmless():
    unet = sd_unet()
    frkern.patch(unet, frkern.FRDiff())
    tree = [(n, m) for n, m in unet.named_modules()]
    with pytest.raises(RuntimeError, match="already patched"):
        frkern.patch(unet, frkern.Clockwork())
    assert [(n, m) for n, m in unet.named_modules()] == tree
    frkern.unpatch(unet)
    with pytest.raises(RuntimeError, match="not patched"):
        frkern.unpatch(unet)


@pytest.mark.parametrize("policy", ["FRDiff", frkern.FRDiff, {"policy": "FRDiff"}])
def test_wrong_policy_type(policy):
    unet = sd_unet()
    tree = [(n, m) for n, m in unet.named_modules()]
    with pytest.raises(TypeError, match="policy must be a frkern policy"):
        frkern.patch(unet, policy)
    assert [(n, m) for n, m in unet.named_modules()] == tree and "forward" not in unet.__dict__


def test_unsupported_targets_and_models():
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        frkern.patch(torch.nn.Linear(2, 2), frkern.FRDiff())
    unet = sd_unet(down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D"))
    tree = [(n, m) for n, m in unet.named_modules()]
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        frkern.patch(unet, frkern.FRDiff())
    assert [(n, m) for n, m in unet.named_modules()] == tree and "forward" not in unet.__dict__
    with pytest.raises(ValueError, match="levels must lie"):
        frkern.patch(sd_unet(), frkern.Clockwork(levels=3))
    with pytest.raises(ValueError, match="branch 9 is past"):
        frkern.patch(sd_unet(), frkern.DeepCache(branch=9))
    with pytest.raises(ValueError, match="backend"):
        frkern.patch(sd_unet(), frkern.FRDiff(), backend="cuda")


def test_calls_without_a_generation_are_refused():
    unet = sd_unet()
    frkern.patch(unet, frkern.FRDiff())
    with pytest.raises(RuntimeError, match="no generation started"):
        run(unet, sd_inputs(unet))


def test_train_eval_follow_the_tree():
    unet = sd_unet()
    frkern.patch(unet, frkern.FRDiff())
    unet.train()
    frkern.unpatch(unet)
    assert all(m.training for m in unet.modules())
    unet.eval()


def test_varied_sd_configs_patch_and_match():
    # SD2-style linear projections and head dims per level; upcast attention; 1 layer per block
    for kwargs in (dict(use_linear_projection=True, attention_head_dim=(4, 8, 8)),
                   dict(layers_per_block=1, upcast_attention=True)):
        unet = sd_unet(**kwargs)
        inputs = sd_inputs(unet)
        ref = run(unet, inputs)
        h = frkern.patch(unet, frkern.FRDiff(2), backend="torch")
        h.begin(2)
        assert torch.equal(run(unet, inputs), ref)
        frkern.unpatch(unet)
