"""kernels/skip_conv.py: the tile-predicated Triton Skip-Convolution against the PyTorch reference.

On machines without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET).
Masks and x_ref must equal the reference's exactly. The gate's fp32 sums run in another order than
the reference's, so a tile whose change lies within fp32 rounding of threshold * scale could decide
differently: the inputs here change some pixels by O(1) and the others by 0 or 1e-3, which keeps
every tile far from that knife edge (checked: each case's margin is printed on failure).

On a GPU every test here runs with TF32 off (devices.no_tf32): the kernel's fp32 dots are exact
(input_precision="ieee"), but the F.conv2d references and the torch backend's convolutions would run
in TF32 under cuDNN's default (allow_tf32 = True), ~1e-3 off, above the fp32 tolerances below.
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

import frkern
from devices import no_tf32  # noqa: F401
from frkern import ops
from frkern.kernels.skip_conv import _tiles_to_pixels, skip_conv_reference, skip_conv_triton
from tiny import sd_inputs, sd_unet

pytestmark = pytest.mark.usefixtures("no_tf32")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |triton - reference| relative to max |reference| (both in the I/O dtype; the reference's
# conv rounds once, the kernel's fp32 accumulation once, in another order). fp32 holds on a GPU
# because TF32 is off for this file (no_tf32): a TF32 reference alone errs ~1e-3.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_state(g, n, cin, cout, size, k, dtype, channels_last, bias=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(DEVICE, dtype)
    weight = weight.contiguous(memory_format=fmt)  # a channels_last model has channels_last weights
    b = torch.randn(cout, generator=g).to(DEVICE, dtype) if bias else None
    x = torch.randn(n, cin, *size, generator=g).to(DEVICE, dtype).contiguous(memory_format=fmt)
    z = F.conv2d(x, weight, b, padding=k // 2).contiguous(memory_format=fmt)
    return x, x.clone(), z, weight, b


def next_input(x, g, tiny=1e-3):
    """Half the pixels of a random region and a few scattered ones change by O(1), the others by
    `tiny` (or 0): changes concentrated in some regions, as between denoising steps."""
    n, c, h, w = x.shape
    top = torch.randint(0, h - h // 2 + 1, (n,), generator=g)[:, None, None, None]
    left = torch.randint(0, w - w // 2 + 1, (n,), generator=g)[:, None, None, None]
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    region = (rows >= top) & (rows < top + max(1, h // 2)) & (cols >= left) & (cols < left + max(1, w // 2))
    u = torch.rand(n, 1, h, w, generator=g)
    big = (region & (u < 0.5)) | (u < 0.02)
    noise = torch.randn(x.shape, generator=g) * torch.where(big, 0.8, tiny)
    return (x.float() + noise.to(x.device)).to(x.dtype).contiguous(memory_format=suggest_format(x))


def suggest_format(t):
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


def assert_close_to_scale(got, want, dtype):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-3), (err, scale)


def knife_edge_margin(x, x_ref, tile, threshold):
    """Smallest |tile change - threshold * scale| relative to threshold * scale (fp64)."""
    change = F.avg_pool2d((x.double() - x_ref.double()).abs().sum(1, keepdim=True), tile, ceil_mode=True)
    bar = threshold * x_ref.double().abs().sum(1, keepdim=True).mean((2, 3), keepdim=True)
    return ((change - bar).abs() / bar.clamp_min(1e-30)).min().item()


CASES = [  # (dtype, channels_last, size, tile, k, cin, cout, threshold)
    (torch.float32, False, (13, 9), 4, 3, 6, 5, 0.15),
    (torch.float32, True, (7, 11), 3, 1, 6, 5, 0.15),
    (torch.float32, False, (16, 16), 8, 3, 6, 5, 0.4),
    (torch.float32, True, (13, 9), 12, 3, 6, 5, 0.15),  # 144-pixel tiles (two pixel blocks), wider than the map
    (torch.float32, False, (6, 5), 4, 3, 72, 70, 0.15),  # two input- and two output-channel blocks
    (torch.float32, True, (5, 6), 4, 1, 136, 20, 0.15),  # gate channel chunks (> 128 channels)
    (torch.float16, False, (7, 11), 3, 3, 6, 5, 0.15),
    (torch.float16, True, (13, 9), 4, 1, 6, 5, 0.4),
    (torch.bfloat16, True, (7, 11), 4, 3, 6, 5, 0.15),
    (torch.bfloat16, False, (16, 16), 8, 1, 6, 5, 0.15),
]


# Default tier: the block-structure cases (fp32, both layouts) and one per 16-bit dtype; the rest extended.
DEFAULT_CASES = (0, 1, 3, 4, 5, 6, 8)


@pytest.mark.parametrize("dtype, channels_last, size, tile, k, cin, cout, threshold",
                         [c if i in DEFAULT_CASES else pytest.param(*c, marks=pytest.mark.slow)
                          for i, c in enumerate(CASES)])
def test_triton_matches_reference_step_by_step(dtype, channels_last, size, tile, k, cin, cout, threshold):
    g = seeded(dtype, channels_last, size, tile, k, cin, cout, threshold)
    x, x_ref, z, weight, bias = make_state(g, 2, cin, cout, size, k, dtype, channels_last, bias=cin != 72)
    ref_x_ref, ref_z = x_ref.clone(), z.clone()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    seen_partial = False
    with torch.no_grad():
        for step in range(3):  # the state is carried: each step starts from the last one's
            x = next_input(x, g, tiny=0.0 if step == 1 else 1e-3)
            assert knife_edge_margin(x, ref_x_ref, tile, threshold) > 1e-3
            want, ref_x_ref, want_active, want_affected = skip_conv_reference(
                x, ref_x_ref, ref_z, weight, bias, tile, threshold, k // 2)
            out, new_x_ref, active, affected = skip_conv_triton(x, x_ref, z, weight, bias, tile, threshold, k // 2)
            assert out is z and new_x_ref is x_ref  # in place
            assert z.is_contiguous(memory_format=fmt) and x_ref.is_contiguous(memory_format=fmt)
            assert active.dtype == affected.dtype == torch.bool and active.shape == want_active.shape
            assert torch.equal(active, want_active) and torch.equal(affected, want_affected)
            assert torch.equal(x_ref, ref_x_ref)
            assert torch.isfinite(z).all()
            assert_close_to_scale(z, want, dtype)
            ref_z = want
            seen_partial |= bool(active.any()) and not bool(affected.all())
    assert seen_partial or min(size) < 2 * tile  # some steps skip part of the map


@pytest.mark.parametrize("k, channels_last", [(3, False), (1, True)])
def test_unaffected_tiles_are_not_written_and_affected_tiles_are_recomputed(k, channels_last):
    dtype, tile, size = torch.float32, 4, (13, 18)
    g = seeded("poison", k, channels_last)
    x, x_ref, z, weight, bias = make_state(g, 2, 6, 5, size, k, dtype, channels_last)
    # only two tiles change, so most output tiles are not affected
    x = x.clone()
    x[0, :, 4:8, 8:12] += 1.0
    x[1, :, 12:13, 0:4] -= 1.0
    _, _, _, want_affected = skip_conv_reference(x, x_ref, z, weight, bias, tile, 0.1, k // 2)
    aff_px = _tiles_to_pixels(want_affected, tile, *size).expand_as(z)
    assert 0 < aff_px.float().mean() < 0.5
    z = torch.where(aff_px, float("nan"), 1234.5).to(dtype).contiguous(memory_format=suggest_format(z))
    x_ref_before = x_ref.clone()
    with torch.no_grad():
        out, x_ref, active, affected = skip_conv_triton(x, x_ref, z, weight, bias, tile, 0.1, k // 2)
    assert torch.equal(affected, want_affected)
    assert torch.isfinite(out[aff_px]).all()
    assert (out[~aff_px] == 1234.5).all()  # never written
    dense = F.conv2d(x_ref, weight, bias, padding=k // 2)  # fp32 with TF32 off on a GPU (no_tf32)
    torch.testing.assert_close(out[aff_px], dense[aff_px], rtol=1e-4, atol=1e-5)
    act_px = _tiles_to_pixels(active, tile, *size).expand_as(x)
    assert torch.equal(x_ref[act_px], x[act_px]) and torch.equal(x_ref[~act_px], x_ref_before[~act_px])


def test_threshold_zero_is_the_dense_convolution_and_a_huge_one_changes_nothing():
    g = seeded("extremes")
    for dtype in (torch.float32, torch.float16):
        x, x_ref, z, weight, bias = make_state(g, 2, 6, 5, (13, 9), 3, dtype, False)
        x = next_input(x, g)
        z_before, x_ref_before = z.clone(), x_ref.clone()
        with torch.no_grad():
            out, new_ref, active, affected = skip_conv_triton(x, x_ref.clone(), z.clone(), weight, bias, 8, 1e9)
        assert not active.any() and not affected.any()
        assert torch.equal(out, z_before) and torch.equal(new_ref, x_ref_before)  # bit for bit
        with torch.no_grad():
            out, new_ref, active, affected = skip_conv_triton(x, x_ref, z, weight, bias, 8, 0.0)
        assert active.all() and affected.all() and torch.equal(new_ref, x)
        assert_close_to_scale(out, F.conv2d(x, weight, bias, padding=1), dtype)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 4, 8, 8, device=DEVICE)
    w3 = torch.randn(4, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="3x3 padding 1 and 1x1"):
        skip_conv_triton(x, x.clone(), x.clone(), torch.randn(4, 4, 5, 5, device=DEVICE), None, 4, 0.1, 2)
    with pytest.raises(ValueError, match=r"one dtype \(float32, float16 or bfloat16\); x is torch.float32, z is torch.float16"):
        skip_conv_triton(x, x.clone(), x.half(), w3, None, 4, 0.1)
    with pytest.raises(ValueError, match="weight is torch.float16"):
        skip_conv_triton(x, x.clone(), x.clone(), w3.half(), None, 4, 0.1)
    with pytest.raises(ValueError, match="on one device; x is on .*, x_ref on meta"):
        skip_conv_triton(x, x.to("meta"), x.clone(), w3, None, 4, 0.1)
    with pytest.raises(ValueError, match="dtype torch.float64 not supported; accepted: float32, float16, bfloat16"):
        skip_conv_triton(x.double(), x.double(), x.double(), w3.double(), None, 4, 0.1)
    with pytest.raises(ValueError, match=r"weight must be \(Cout, 4, k, k\) \(groups 1\)"):
        skip_conv_triton(x, x.clone(), torch.randn(1, 2, 8, 8, device=DEVICE), torch.randn(2, 2, 3, 3, device=DEVICE),
                         None, 4, 0.1)
    with pytest.raises(ValueError, match=r"bias must be None or of shape \(4,\)"):
        skip_conv_triton(x, x.clone(), x.clone(), w3, torch.randn(3, device=DEVICE), 4, 0.1)
    with pytest.raises(ValueError, match="tile must be an int >= 1"):
        ops.skip_conv(x, x.clone(), x.clone(), w3, None, tile=0, threshold=0.1, backend="triton")


def test_op_equals_the_direct_function_and_torch_backend_is_out_of_place():
    g = seeded("op")
    x0, x_ref, z, weight, bias = make_state(g, 2, 6, 5, (7, 11), 1, torch.float32, True)
    x = next_input(x0, g)
    ref_state = (x_ref.clone(), z.clone())
    with torch.no_grad():
        want = skip_conv_triton(x, x_ref.clone(), z.clone(), weight, bias, 3, 0.15, 0)
        got = ops.skip_conv(x, x_ref, z, weight, bias, tile=3, threshold=0.15, padding=(0, 0), backend="triton")
        assert got[0] is z and got[1] is x_ref
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        xr, zz = ref_state
        out = ops.skip_conv(x, xr, zz, weight, bias, tile=3, threshold=0.15, padding=(0, 0), backend="torch")
    assert torch.equal(xr, ref_state[0]) and out[0] is not zz  # the reference does not mutate
    assert torch.equal(out[2], want[2]) and torch.equal(out[1], want[1])
    assert_close_to_scale(want[0], out[0], torch.float32)


@pytest.mark.slow
def test_patched_unet_triton_matches_torch_backend():
    # every ResNet conv1/conv2 gated; one dense keyframe, then two gated steps (the second reads the
    # state the first updated in place). The other fused ops run in the interpreter too: a one-level,
    # one-layer-per-block UNet (5 ResNets, 4 norm groups), batch 1, 8x8 latents.
    outs, fractions = {}, {}
    for backend in ("torch", "triton"):
        unet = sd_unet(layers_per_block=1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                       up_block_types=("CrossAttnUpBlock2D",), norm_num_groups=4).to(DEVICE)
        sample, ehs, _ = sd_inputs(unet, batch=1, size=8)
        sample, ehs = sample.to(DEVICE), ehs.to(DEVICE)
        handle = frkern.patch(unet, frkern.SkipConv(0.1, tile=4), backend=backend)
        handle.begin(3)
        g = torch.Generator().manual_seed(5)
        res = []
        with torch.no_grad():
            x = sample
            for i in range(3):
                x = x + (0.3 * torch.randn(x.shape, generator=g) * (torch.rand(1, 1, 8, 8, generator=g) > 0.7)).to(DEVICE)
                handle.set_step(i)
                res.append(unet(x, 900 - 100 * i, ehs).sample)
        assert handle.stats["full"] == 1 and handle.stats["reuse"] == 2
        outs[backend], fractions[backend] = res, handle.stats["active_fraction"]
    assert fractions["triton"] == fractions["torch"] and 0 < min(fractions["torch"].values()) < 1
    for a, b in zip(outs["triton"], outs["torch"]):
        assert torch.isfinite(a).all()
        # fp32, relative L2 1e-5: on a GPU the torch backend's cuDNN convolutions and cuBLAS
        # matmuls run in exact fp32 here (no_tf32), as the Triton kernels do
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() <= 1e-5
