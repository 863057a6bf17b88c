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
    rt = Runtime(FRDiff(interval=2, score_mix=False), block.parameters())
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
