"""The ResNet wrapper against diffusers' ResnetBlock2D in every variant it accepts."""
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from frkern.policies import FRDiff
from frkern.runtime import Runtime
from frkern.units import ReusedResnetBlock2D

VARIANTS = {
    "default": dict(in_channels=16, out_channels=32, temb_channels=24, groups=8),
    "scale_shift": dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, time_embedding_norm="scale_shift"),
    "up": dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, up=True),
    "down": dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, down=True),
    "no temb": dict(in_channels=16, out_channels=16, temb_channels=None, groups=8),
    "skip_time_act, scale 2": dict(in_channels=16, out_channels=16, temb_channels=24, groups=8,
                                   skip_time_act=True, output_scale_factor=2.0),
    "mish": dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, non_linearity="mish"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_wrapper_full_step_is_bit_identical_and_reuse_is_the_definition(name):
    torch.manual_seed(0)
    block = ResnetBlock2D(**VARIANTS[name]).eval()
    x0, x1 = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    temb = torch.randn(2, 24) if VARIANTS[name]["temb_channels"] else None
    rt = Runtime(FRDiff(interval=2, score_mix=False), block)
    rt.begin(2)
    wrapper = ReusedResnetBlock2D(block, rt, "r", True, "torch")
    with torch.no_grad():
        call = ("call signature",)
        plan = rt.start_call(call)  # step 0: keyframe
        assert torch.equal(wrapper(x0, temb), block(x0, temb))
        rt.end_call(plan, call)
        rt.set_step(1)
        plan = rt.start_call(call)  # step 1: reuse
        assert not plan.keyframe
        got = wrapper(x1, temb)
        rt.end_call(plan, call)
        assert rt.stats["unit_miss"] == 0
        # definition: conv1's output from the keyframe input, everything else on the fresh input
        stored = {}
        h = block.conv1.register_forward_hook(lambda m, a, o: stored.setdefault("key", o))
        block(x0, temb)
        h.remove()
        h = block.conv1.register_forward_hook(lambda m, a, o: stored["key"])
        want = block(x1, temb)
        h.remove()
    assert torch.equal(got, want)
    assert not torch.equal(got, block(x1, temb))


def test_geglu_wrapper_is_swapped_for_every_policy_and_matches_diffusers():
    from diffusers.models.activations import GEGLU

    import frkern
    from frkern.units import FusedGEGLU
    from tiny import sd_unet

    for policy in (frkern.NoReuse(), frkern.FRDiff(2), frkern.Clockwork(2)):
        unet = sd_unet()
        n = sum(type(m) is GEGLU for m in unet.modules())
        assert n > 0
        frkern.patch(unet, policy)
        assert sum(type(m) is FusedGEGLU for m in unet.modules()) == n
        assert not any(type(m) is GEGLU for m in unet.modules())
        frkern.unpatch(unet)
        assert sum(type(m) is GEGLU for m in unet.modules()) == n

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # triton: the interpreter on a CPU
    geglu = GEGLU(16, 24).to(device)
    x = torch.randn(2, 5, 16, device=device)
    for backend, tol in (("torch", 0.0), ("triton", 1e-5)):
        wrapped = FusedGEGLU(geglu, None, "g", False, backend)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), geglu(x), atol=tol, rtol=tol)
