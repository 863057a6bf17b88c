"""SkipConv (residual skipping) against independent statements of its definition (issue 10, torch
backend; the tile-predicated Triton convolution is tested against the reference in
test_kernel_skip_conv.py)."""
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

import frkern
from frkern.kernels.skip_conv import skip_conv_reference
from test_pipelines import generate
from tiny import make_sd_pipeline, sd_inputs, sd_prompt_kwargs, sd_unet


def skip_conv_fp64_loops(x, x_ref, z, weight, bias, tile, threshold):
    """The definition, tile by tile in fp64 with Python loops: (output, new x_ref)."""
    x, x_ref, z = x.double(), x_ref.double().clone(), z.double().clone()
    weight, bias = weight.double(), None if bias is None else bias.double()
    n, _, h, w = x.shape
    k = weight.shape[-1]
    rows = [(i, min(i + tile, h)) for i in range(0, h, tile)]
    cols = [(j, min(j + tile, w)) for j in range(0, w, tile)]
    for b in range(n):
        scale = x_ref[b].abs().sum(0).mean()
        active = [(r, c) for r in rows for c in cols
                  if (x[b, :, r[0]:r[1], c[0]:c[1]] - x_ref[b, :, r[0]:r[1], c[0]:c[1]]).abs().sum(0).mean() > threshold * scale]
        for r, c in active:
            x_ref[b, :, r[0]:r[1], c[0]:c[1]] = x[b, :, r[0]:r[1], c[0]:c[1]]
        full = F.conv2d(x_ref[b:b + 1], weight, bias, padding=k // 2)[0]
        halo = k // 2
        for r in rows:
            for c in cols:  # recompute an output tile if its receptive field meets an active tile
                if any(ar[0] <= r[1] - 1 + halo and r[0] - halo <= ar[1] - 1 and ac[0] <= c[1] - 1 + halo
                       and c[0] - halo <= ac[1] - 1 for ar, ac in active):
                    z[b, :, r[0]:r[1], c[0]:c[1]] = full[:, r[0]:r[1], c[0]:c[1]]
    return z, x_ref


@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("tile, size", [(4, (13, 9)), (8, (16, 16)), (3, (7, 11))])
@pytest.mark.parametrize("threshold", [0.0, 0.15, 0.4, 1e9])
def test_skip_conv_reference_matches_the_fp64_definition_step_by_step(k, tile, size, threshold):
    g = torch.Generator().manual_seed(tile * 100 + k)
    conv = torch.nn.Conv2d(6, 5, k, padding=k // 2)
    x = torch.randn(2, 6, *size, generator=g)
    x_ref, z = x.clone(), conv(x).detach()
    x_ref64, z64 = x_ref.double(), z.double()
    with torch.no_grad():
        for step in range(3):
            # changes concentrated in some regions, as between denoising steps
            x = x + torch.randn(x.shape, generator=g) * (torch.rand(1, 1, *size, generator=g) > 0.6) * 0.8
            out, x_ref, active, affected = skip_conv_reference(x, x_ref, z, conv.weight, conv.bias, tile, threshold, k // 2)
            want, x_ref64 = skip_conv_fp64_loops(x, x_ref64, z64, conv.weight, conv.bias, tile, threshold)
            z64 = want
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x_ref.double(), x_ref64, rtol=0, atol=0)
            z = out
            if threshold == 0.0:  # every change recomputed: exactly the dense convolution
                torch.testing.assert_close(out, conv(x), rtol=1e-6, atol=1e-6)
            if threshold == 1e9:
                assert not active.any() and not affected.any()
            assert (affected | ~active).all()  # an active tile's own output tile is recomputed


def test_skip_conv_bad_arguments():
    x = torch.randn(1, 4, 8, 8)
    w3 = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="3x3 padding 1 and 1x1"):
        skip_conv_reference(x, x, x, torch.randn(4, 4, 5, 5), None, 4, 0.1, 2)
    with pytest.raises(ValueError, match="tile must be an int >= 1"):
        skip_conv_reference(x, x, x, w3, None, 0, 0.1, 1)
    with pytest.raises(ValueError, match="one shape"):
        skip_conv_reference(x, x[:, :2], x, w3, None, 4, 0.1, 1)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        frkern.SkipConv(-1.0)
    with pytest.raises(ValueError, match="tile must be an int >= 1"):
        frkern.SkipConv(0.1, tile=0)
    assert frkern.from_json(frkern.SkipConv(0.2, 4, 5).to_json()) == frkern.SkipConv(0.2, 4, 5)


class GatedConvHooks:
    """Hooks on every ResNet conv1/conv2 of an unpatched UNet: keyframes record (x, conv(x));
    other steps replace the conv's output by the fp64 definition's."""

    def __init__(self, unet, tile, threshold):
        self.keyframe, self.state, self.tile, self.threshold = True, {}, tile, threshold
        for name, m in unet.named_modules():
            if isinstance(m, ResnetBlock2D):
                for c in ("conv1", "conv2"):
                    getattr(m, c).register_forward_hook(partial(self._hook, f"{name}.{c}"))

    def weights(self, conv):
        """(weight, bias) of the convolution the module computes."""
        return conv.weight, conv.bias

    def _hook(self, name, conv, args, out):
        x = args[0]
        if self.keyframe:
            self.state[name] = (x.double(), out.double())
            return None
        x_ref, z = self.state[name]
        z, x_ref = skip_conv_fp64_loops(x, x_ref, z, *self.weights(conv), self.tile, self.threshold)
        self.state[name] = (x_ref, z)
        return z.to(out.dtype)


@pytest.mark.parametrize("threshold", [0.1, 0.5, 1e9])
def test_patched_unet_matches_the_definition_step_by_step(threshold):
    unet = sd_unet()
    ref = copy.deepcopy(unet)
    hooks = GatedConvHooks(ref, tile=4, threshold=threshold)
    handle = frkern.patch(unet, frkern.SkipConv(threshold, tile=4, interval=3), backend="torch")
    sample, ehs, _ = sd_inputs(unet)
    g = torch.Generator().manual_seed(5)
    handle.begin(5)
    with torch.no_grad():
        x = sample
        for i in range(5):
            x = x + 0.3 * torch.randn(x.shape, generator=g) * (torch.rand(1, 1, 16, 16, generator=g) > 0.7)
            handle.set_step(i)
            hooks.keyframe = i % 3 == 0
            got, want = unet(x, 900 - 100 * i, ehs).sample, ref(x, 900 - 100 * i, ehs).sample
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    stats = handle.stats
    assert stats["full"] == 2 and stats["reuse"] == 3 and set(stats["active_fraction"]) == {1, 2, 4}
    if threshold == 1e9:
        assert all(v == 0.0 for v in stats["active_fraction"].values())


def test_threshold_zero_is_full_compute_in_a_pipeline_and_unpatch_restores():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    want = generate(pipe, prompt)
    handle = frkern.patch(pipe, frkern.SkipConv(0.0, tile=4), backend="torch")
    assert torch.equal(generate(pipe, prompt), want)
    assert handle.stats["reuse"] == 7
    frkern.unpatch(pipe)
    frkern.patch(pipe, frkern.SkipConv(0.3, tile=4), backend="torch")
    out = generate(pipe, prompt)
    assert torch.isfinite(out).all() and 0 < (out - want).norm() / want.norm() < 0.5
    frkern.unpatch(pipe)
    assert torch.equal(generate(pipe, prompt), want)


def test_cuda_graphs_equal_eager_skip_conv():
    # stateful units under graphs: each reuse replay reads the state the last call committed.
    # Without CUDA: the emulated capture on the CPU, bit for bit. With CUDA: pipelines on the GPU,
    # the real capture, TF32 off, within devices.GPU_GRAPH_RTOL (the Triton kernels under real
    # capture: test_graphs.py::test_real_capture_triton_skip_conv_equals_eager).
    from devices import assert_matches_eager, assert_same_stats, exact_fp32, graphed, to_device

    policy = frkern.SkipConv(0.2, tile=4, interval=4)
    with exact_fp32():  # no-op without CUDA
        eager, prompt = to_device(make_sd_pipeline(), sd_prompt_kwargs())
        eager_handle = frkern.patch(eager, policy, backend="torch")
        want = generate(eager, prompt, steps=7)
        pipe, prompt = to_device(make_sd_pipeline(), sd_prompt_kwargs())
        handle = graphed(pipe, policy, backend="torch")
        for generation in range(2):
            assert_matches_eager(generate(pipe, prompt, steps=7), want, generation)
            assert_same_stats(handle.stats, eager_handle.stats)
    assert handle.graph_stats["captures"] == 2
