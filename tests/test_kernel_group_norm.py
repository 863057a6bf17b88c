"""kernels/group_norm.py: the Triton kernel against the plain-PyTorch definition (fp64 on CPU).

On machines without a GPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET).
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

from frkern import ops
from frkern.kernels.group_norm import group_norm_act_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol) against an fp64 evaluation on the same inputs (inputs of magnitude ~10, outputs
# of order 1-8). bf16: the pre-norm sum is rounded to bf16 (one ulp at 10 is 0.06, i.e. ~0.03 std
# here, times |weight| up to ~3), and Triton's interpreter converts to bf16 by truncation where a
# GPU rounds to nearest; seen worst over 60 seeds: 0.136 absolute.
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-2, 4e-3), torch.bfloat16: (0.2, 2e-2)}


def definition(x, w, b, groups, eps, add, chan, silu):
    """GroupNorm(x + add + chan), each add rounded to the I/O dtype, then evaluated in fp64."""
    v = x
    if add is not None:
        v = v + add
    if chan is not None:
        v = v + chan[:, :, None, None]
    s = v
    v = v.double()
    B, C, H, W = v.shape
    g = v.reshape(B, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = g.var(-1, unbiased=False, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(B, C, H, W)
    if w is not None:
        y = y * w.double()[:, None, None]
    if b is not None:
        y = y + b.double()[:, None, None]
    if silu:
        y = F.silu(y)
    return y, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape, groups, use_add, use_chan, silu, affine",
    [
        ((2, 12, 5, 7), 4, True, True, True, True),  # odd spatial size, 3 channels per group
        ((1, 40, 3, 3), 8, False, True, True, True),
        ((3, 16, 9, 11), 16, True, False, False, True),  # one channel per group
        ((2, 64, 6, 6), 32, False, False, True, False),
        ((1, 8, 20, 33), 2, True, True, False, True),  # several chunks per group
    ],
)
def test_group_norm_act_matches_definition(dtype, channels_last, shape, groups, use_add, use_chan, silu, affine):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, groups, dtype, channels_last)).encode()))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # An offset mean makes naive sum/sum-of-squares variance fail.
    x = (torch.randn(shape, generator=g) * 2 + 7).to(DEVICE, dtype).contiguous(memory_format=fmt)
    add = torch.randn(shape, generator=g).to(DEVICE, dtype) if use_add else None
    chan = torch.randn(shape[:2], generator=g).to(DEVICE, dtype) if use_chan else None
    w = torch.randn(shape[1], generator=g).to(DEVICE, dtype) if affine else None
    b = torch.randn(shape[1], generator=g).to(DEVICE, dtype) if affine else None

    y, s = group_norm_act_triton(x, w, b, groups, 1e-5, add, chan, silu, write_sum=True)
    ref, ref_sum = definition(x, w, b, groups, 1e-5, add, chan, silu)

    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=fmt)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    # The pre-norm sum must equal the unfused sequence's to within one rounding of the I/O dtype.
    torch.testing.assert_close(s.float(), ref_sum.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize(
    "shape, groups, dtype, offset",
    [
        ((2, 30, 5, 3), 3, torch.float16, 0),  # 10 channels per group, as SD's 320 in 32 groups: runs aligned to 2
        ((2, 30, 5, 3), 3, torch.bfloat16, 1),
        ((1, 27, 4, 5), 3, torch.bfloat16, 0),  # 9 per group: odd, no alignment (scalar loads on a GPU)
        ((2, 21, 3, 7), 7, torch.float16, 1),  # 3 per group; a pixel stride of 21 elements
    ],
)
def test_channels_last_at_odd_channel_counts(shape, groups, dtype, offset):
    """Channels per group is a compile-time constant (kernels/group_norm.py): channel counts whose
    group runs are not 16-byte aligned, and a base pointer one element past an allocation (a GPU
    launch then compiles its unaligned specialisation), give the same values."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, groups, dtype, offset)).encode()))
    B, C, H, W = shape

    def cl(t):  # channels_last strides, data starting `offset` elements into its storage
        buf = torch.empty(B * C * H * W + offset, dtype=dtype, device=DEVICE)[offset:]
        out = buf.view(B, H, W, C).permute(0, 3, 1, 2)
        out.copy_(t)
        return out

    x = cl((torch.randn(shape, generator=g) * 2 + 7).to(DEVICE, dtype))
    chan = torch.randn(shape[:2], generator=g).to(DEVICE, dtype)
    w = torch.randn(C, generator=g).to(DEVICE, dtype)
    b = torch.randn(C, generator=g).to(DEVICE, dtype)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.storage_offset() == offset
    y, s = group_norm_act_triton(x, w, b, groups, 1e-5, None, chan, True, write_sum=True)
    ref, ref_sum = definition(x, w, b, groups, 1e-5, None, chan, True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    torch.testing.assert_close(s.float(), ref_sum.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_output_element_is_written(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 7, 5, device=DEVICE).contiguous(memory_format=fmt)
    out = torch.full_like(x, float("nan"))
    sum_out = torch.full_like(x, float("nan"))
    y, s = group_norm_act_triton(x, None, None, 4, 1e-5, None, None, True, write_sum=True, out=out, sum_out=sum_out)
    assert y is out and s is sum_out
    assert torch.isfinite(out).all() and torch.isfinite(sum_out).all()
    assert torch.equal(sum_out, x)


def test_nan_propagates_to_its_group_only():
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    x[1, 5, 2, 3] = float("nan")
    y, _ = group_norm_act_triton(x, None, None, 4, 1e-5, None, None, False)
    assert torch.isnan(y[1, 4:6]).all()  # group 2 of sample 1
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :4]).all() and torch.isfinite(y[1, 6:]).all()


def test_custom_op_and_dispatch_match_reference():
    norm = torch.nn.GroupNorm(4, 12).to(DEVICE)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 12, 6, 5, device=DEVICE)
    chan = torch.randn(2, 12, device=DEVICE)
    got = ops.group_norm_act(x, norm, silu=True, add_channel=chan, backend="triton")
    want = ops.group_norm_act(x, norm, silu=True, add_channel=chan, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    want_nn = F.silu(norm(x + chan[:, :, None, None]))
    assert torch.equal(want, want_nn)  # the torch backend is the diffusers op sequence, bit for bit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(2, 12, 4)), "4-D"),
        (dict(x=torch.randn(2, 12, 4, 4).double()), "dtype"),
        (dict(groups=5), "do not split"),
        (dict(add=torch.randn(2, 12, 4, 5)), "add must match"),
        (dict(chan=torch.randn(2, 11)), "add_channel must be"),
        (dict(w=torch.randn(11)), "weight must have shape"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = dict(x=torch.randn(2, 12, 4, 4), w=None, b=None, groups=4, add=None, chan=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        group_norm_act_triton(args["x"], args["w"], args["b"], args["groups"], 1e-5, args["add"], args["chan"])
