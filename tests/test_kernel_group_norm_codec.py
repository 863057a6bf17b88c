"""kernels/group_norm.py with the compressed cache fused in (kernels/quant_cache.py's codec): x decoded
in the prologue (x_scale=) and the raw x encoded by the kernels (quantize=), against an independent
plain-PyTorch statement:

- the codec: tests/reference_quant.py's loop statement (written from the definition alone);
- the norm: torch.nn.functional.group_norm / silu on the summed input, in the I/O dtype (diffusers'
  op order: the PyTorch reference must equal it bit for bit) or in float32 (the Triton kernels
  must be within tests/test_kernel_group_norm.py's tolerances of it).

Triton (its interpreter on a CPU): decoded values exact (the pre-norm sum of a lone x is the
statement's decode bit for bit), q's bits and the scales exact, every output element written
(out= / sum_out= filled with NaN before). Group scales of 16 (a power of two: fused, inside a
block or spanning blocks), of 12 and 7 (not: quantize_triton runs for the encode), channel scales
within one block and across blocks (per-block maxima from the stats kernel).
"""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

from frkern.kernels.group_norm import group_norm_act_reference, group_norm_act_triton
from reference_quant import QDTYPE, dequantize_statement, make_input, quantize_statement
from test_kernel_group_norm import TOL  # (atol, rtol) per dtype of the GroupNorm kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def qbits(q):
    return q.contiguous().view(torch.uint8).cpu()


def pre_norm_sum(x, add, chan):
    """x + add + add_channel, each add a PyTorch op in x's dtype."""
    v = x
    if add is not None:
        v = v + add
    if chan is not None:
        v = v + chan[:, :, None, None]
    return v


def norm_in_dtype(v, w, b, groups, eps, silu):
    y = F.group_norm(v, groups, w, b, eps)
    return F.silu(y) if silu else y


def norm_in_float32(v, w, b, groups, eps, silu):
    y = F.group_norm(v.float(), groups, None if w is None else w.float(), None if b is None else b.float(), eps)
    return F.silu(y) if silu else y


def inputs(shape, dtype, use_add, use_chan, affine, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]

    def r(*s):
        return torch.randn(*s, generator=g).to(DEVICE, dtype)
    return (r(*shape) if use_add else None, r(shape[0], C) if use_chan else None,
            r(C) if affine else None, r(C) if affine else None)


def assert_close_y(y, want32, dtype):
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.cpu().float(), want32.cpu(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


# -- decode in the prologue ------------------------------------------------------------------------

# fmt x granularity x dtype; the rest of the case (shape, groups, add, add_channel, silu, affine)
# cycles so that each appears with each format: C=12 in 3 groups (B=3), C=10 in 5 groups (B=2), and
# a map whose H*W 16 divides; H*W never a power of two.
GRANULARITIES = [("channel", 64), ("group", 16), ("group", 12)]
LAYOUTS = [((3, 12, 5, 7), 3), ((2, 10, 3, 5), 5), ((2, 12, 4, 12), 3)]
DECODE_CASES = [
    (fmt, scales, gs, dtype, *LAYOUTS[i % 3], i % 3 == 0, i % 2 == 0, i % 4 < 2, i % 5 != 4)
    for i, (fmt, (scales, gs), dtype) in enumerate(itertools.product(["int8", "fp8_e4m3"], GRANULARITIES, DTYPES))
]


@pytest.mark.parametrize("fmt, scales, gs, dtype, shape, groups, use_add, use_chan, silu, affine", DECODE_CASES)
def test_decode_in_prologue_matches_statement(fmt, scales, gs, dtype, shape, groups, use_add, use_chan, silu, affine):
    seed = zlib.crc32(repr((fmt, scales, gs, dtype, shape)).encode())
    raw, _ = make_input(shape, torch.float32, fmt, scales, gs, seed=seed % 97)
    raw = raw * 0.01 + 7  # GroupNorm's test inputs: magnitude ~10, an offset mean
    q, scale = quantize_statement(raw, fmt, scales, gs)
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    add, chan, w, b = inputs(shape, dtype, use_add, use_chan, affine, seed)
    decoded = dequantize_statement(q, scale, dtype, gs).to(DEVICE)
    v = pre_norm_sum(decoded, add, chan)
    codec = dict(x_scale=scale, x_group_size=gs, x_dtype=dtype)

    # the PyTorch reference: the statement's decode, then the diffusers op sequence, bit for bit
    y_ref, s_ref = group_norm_act_reference(q, w, b, groups, 1e-5, add, chan, silu, **codec)
    assert torch.equal(s_ref, v) and torch.equal(y_ref, norm_in_dtype(v, w, b, groups, 1e-5, silu))

    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    sum_out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    q0 = qbits(q)
    y, s = group_norm_act_triton(q, w, b, groups, 1e-5, add, chan, silu, write_sum=True, out=out,
                                 sum_out=sum_out, **codec)
    assert y is out and s is sum_out and y.dtype == dtype and torch.equal(qbits(q), q0)
    assert_close_y(y, norm_in_float32(v, w, b, groups, 1e-5, silu), dtype)
    assert not torch.isnan(s).any()
    if dtype != torch.bfloat16 or (add is None and chan is None):
        assert torch.equal(s.cpu(), v.cpu())  # the decode (and the adds, rounded as PyTorch's) exact
    else:  # the interpreter rounds the bf16 adds by truncation (a GPU to nearest even)
        torch.testing.assert_close(s.cpu().float(), v.cpu().float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_decode_alone_is_exact_on_every_element():
    """No add: the pre-norm sum is the decode itself, for both formats and both scale kinds,
    including the statement's rounding midpoints and an all-zero channel."""
    for fmt, (scales, gs), dtype in [("int8", ("group", 16), torch.bfloat16), ("fp8_e4m3", ("channel", 64), torch.bfloat16),
                                     ("fp8_e4m3", ("group", 7), torch.float16)]:
        raw, _ = make_input((2, 6, 5, 7), torch.float32, fmt, scales, gs, seed=3)
        q, scale = quantize_statement(raw, fmt, scales, gs)
        _, s = group_norm_act_triton(q.to(DEVICE), None, None, 3, 1e-5, write_sum=True, x_scale=scale.to(DEVICE),
                                     x_group_size=gs, x_dtype=dtype)
        assert torch.equal(s.cpu(), dequantize_statement(q, scale, dtype, gs)), (fmt, scales, dtype)


# -- encode by the keyframe's kernels ----------------------------------------------------------------

# (fmt, scales, group_size, dtype, shape, groups, channels_last, add, add_channel, silu)
ENCODE_CASES = [
    ("int8", "channel", 64, torch.float16, (3, 12, 5, 7), 3, False, False, True, True),
    ("int8", "group", 16, torch.bfloat16, (2, 10, 3, 5), 5, True, True, False, False),  # 16 > H*W: one group
    ("int8", "group", 16, torch.float32, (2, 12, 5, 7), 3, True, False, True, True),  # 16 does not divide 35
    ("int8", "group", 12, torch.float16, (2, 10, 5, 7), 5, False, True, True, False),  # not a power of two
    ("fp8_e4m3", "channel", 64, torch.bfloat16, (2, 10, 5, 7), 5, True, False, False, True),
    ("fp8_e4m3", "group", 16, torch.float16, (3, 12, 4, 12), 3, False, True, True, False),
    ("fp8_e4m3", "group", 16, torch.float32, (2, 10, 6, 9), 5, True, False, True, True),
    ("fp8_e4m3", "group", 7, torch.bfloat16, (2, 6, 5, 7), 3, True, False, False, True),  # not a power of two
    # 128 channels per group: blocks of 32 positions, so a row spans several blocks
    ("int8", "channel", 64, torch.float32, (1, 128, 9, 11), 1, True, False, True, True),  # max over 4 blocks
    ("fp8_e4m3", "group", 64, torch.float16, (1, 128, 9, 11), 1, False, True, False, True),  # 64: 2 blocks
    ("int8", "group", 16, torch.bfloat16, (1, 128, 9, 11), 1, False, False, True, False),  # 2 groups a block
]


@pytest.mark.parametrize("fmt, scales, gs, dtype, shape, groups, channels_last, use_add, use_chan, silu", ENCODE_CASES)
def test_encode_matches_statement(fmt, scales, gs, dtype, shape, groups, channels_last, use_add, use_chan, silu):
    seed = zlib.crc32(repr((fmt, scales, gs, dtype, shape)).encode())
    x, _ = make_input(shape, dtype, fmt, scales, gs, seed=seed % 97)  # midpoints, a zero channel, 1e-3..1e3
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(DEVICE).contiguous(memory_format=mf)
    x0 = x.clone()
    add, chan, w, b = inputs(shape, dtype, use_add, use_chan, True, seed)
    q_st, scale_st = quantize_statement(x, fmt, scales, gs)
    v = pre_norm_sum(x, add, chan)
    quantize = (fmt, scales, gs)

    y_ref, s_ref, (q_ref, scale_ref) = group_norm_act_reference(x, w, b, groups, 1e-5, add, chan, silu,
                                                                quantize=quantize)
    assert q_ref.dtype == QDTYPE[fmt] and torch.equal(qbits(q_ref), qbits(q_st))
    assert torch.equal(scale_ref.cpu(), scale_st.cpu())
    assert torch.equal(s_ref, v) and torch.equal(y_ref, norm_in_dtype(v, w, b, groups, 1e-5, silu))

    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=mf)
    y, s, (q, scale) = group_norm_act_triton(x, w, b, groups, 1e-5, add, chan, silu, out=out, quantize=quantize)
    assert y is out and s is None and torch.equal(x, x0)
    assert_close_y(y, norm_in_float32(v, w, b, groups, 1e-5, silu), dtype)
    assert q.dtype == QDTYPE[fmt] and q.shape == x.shape and q.is_contiguous()  # NCHW whatever x's layout
    bad = (qbits(q) != qbits(q_st)).nonzero()
    assert bad.numel() == 0, f"q differs at {bad[:4].tolist()}: {q.cpu()[tuple(bad[0])]} vs {q_st[tuple(bad[0])]}"
    assert scale.dtype == torch.float32 and scale.shape == scale_st.shape
    assert torch.equal(scale.cpu(), scale_st.cpu()), (scale.cpu() - scale_st).abs().max()


def test_without_codec_arguments_the_results_are_a_pair():
    x = torch.randn(2, 8, 3, 5, device=DEVICE)
    for fn in (group_norm_act_reference, group_norm_act_triton):
        assert len(fn(x, None, None, 4, 1e-5)) == 2
        assert len(fn(x, None, None, 4, 1e-5, quantize=("int8", "channel", 64))) == 3


# -- arguments -----------------------------------------------------------------------------------------

def _q(shape=(2, 12, 4, 4), fmt="int8", scales="group", gs=8):
    q, scale = quantize_statement(torch.randn(shape), fmt, scales, gs)
    return q, scale


Q, SCALE = _q()
BAD = [
    # (what changes in the decode call, message)
    (dict(x=Q.float(), x_scale=SCALE), "torch.float32"),  # x_scale with an unquantized x
    (dict(x=Q.contiguous(memory_format=torch.channels_last)), "row-major contiguous"),
    (dict(x_scale=SCALE[..., :1].repeat(1, 1, 3)), r"\(2, 12, 1\).*\(2, 12, 2\).*got \(2, 12, 3\)"),
    (dict(x_scale=SCALE.double()), "float64"),
    (dict(x_group_size=0), "group_size"),
    (dict(x_dtype=None), "x_dtype"),
    (dict(x_dtype=torch.float64), "x_dtype"),
    (dict(add=torch.randn(2, 12, 4, 4)), "add must match"),  # float32 add, x_dtype float16
    (dict(chan=torch.randn(2, 12)), "add_channel must be"),
    (dict(out=torch.empty(2, 12, 4, 4)), "out must match"),
    (dict(x=Q, x_scale=None, x_dtype=None), "x_scale"),  # int8 x without its scales
    (dict(x=torch.randn(2, 12, 4, 4), x_scale=None, x_dtype=torch.float16), "x_dtype"),
    (dict(quantize=("int8", "channel", 64)), "together"),
    (dict(x=torch.randn(2, 12, 4, 4).half(), x_scale=None, quantize=("int4", "channel", 64)), "int4"),
    (dict(x=torch.randn(2, 12, 4, 4).half(), x_scale=None, quantize=("int8", "block", 64)), "block"),
    (dict(x=torch.randn(2, 12, 4, 4).half(), x_scale=None, quantize=("int8", "group", 0)), "group_size"),
    (dict(x=torch.randn(2, 12, 4, 4).half(), x_scale=None, quantize=("int8", "channel")), "quantize must be"),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kw, match", BAD)
def test_bad_codec_arguments_are_refused(backend, kw, match):
    args = dict(x=Q, x_scale=SCALE, x_group_size=8, x_dtype=torch.float16, add=None, chan=None, out=None, quantize=None)
    args.update(kw)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if backend == "reference":
        if args["out"] is not None:
            pytest.skip("the reference has no out=")
        call = lambda: group_norm_act_reference(  # noqa: E731
            args["x"], None, None, 4, 1e-5, args["add"], args["chan"], x_scale=args["x_scale"],
            x_group_size=args["x_group_size"], x_dtype=args["x_dtype"], quantize=args["quantize"])
    else:
        call = lambda: group_norm_act_triton(  # noqa: E731
            args["x"], None, None, 4, 1e-5, args["add"], args["chan"], out=args["out"], x_scale=args["x_scale"],
            x_group_size=args["x_group_size"], x_dtype=args["x_dtype"], quantize=args["quantize"])
    with pytest.raises(ValueError, match=match):
        call()
