"""kernels/quant_cache.py (compressed feature cache: quantize on store, dequantize on read) against
the independent loop statement in tests/reference_quant.py, written from the definition alone.

- quantize_reference / dequantize_reference equal the statement bit for bit (q compared as raw
  bytes, scale and y with torch.equal) over fmt x granularity x dtype x shape, with inputs that mix
  scales 1e-3..1e3, an all-zero channel and values exactly on rounding midpoints.
- quantize_triton / dequantize_triton (Triton interpreter on a CPU) equal the statement within
  TRITON_Q_STEPS (see test_triton_matches_statement), leave x untouched and give finite y.
- the quantization error bound that follows from the definition (int8: half a step; fp8 e4m3:
  2**-4 relative, or 2**-4 * scale * 2**-6 absolute among subnormals), plus y's own dtype rounding.
- bad arguments raise ValueError; the cache holds < 0.55 of an fp16 tensor's bytes.
"""
import math

import pytest
import torch

from frkern.kernels.quant_cache import dequantize_reference, dequantize_triton, quantize_reference, quantize_triton
from reference_quant import (MIDPOINTS, QDTYPE, QMAX, dequantize_statement, make_input, quantize_statement,
                             qdq_statement, round_half_even)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FMTS = ["int8", "fp8_e4m3"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (scales, group_size)
GRANULARITY = [("channel", 64), ("group", 1), ("group", 7), ("group", 64)]
SHAPES = [(2, 3, 5, 7), (1, 5, 13), (3, 4), (2, 6, 3, 4, 5)]
SMALL_SHAPES = [(2, 3, 5, 7), (1, 5, 13)]
# Triton against the statement, in quantization steps of q (int8 integers; fp8 adjacent codes).
# Decided by running: 0, i.e. bit for bit (see test_triton_matches_statement).
TRITON_Q_STEPS = 0
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# half the smallest subnormal spacing of y's dtype (fp16 subnormals are 2**-24 apart)
HALF_SUBNORMAL = {torch.float32: 2.0 ** -150, torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}


def qbytes(q: torch.Tensor) -> torch.Tensor:
    return q.contiguous().view(torch.uint8)


def fp8_code_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Steps between e4m3fn values along the number line (sign-magnitude codes mapped to a
    monotone integer line; +0 and -0 both at 0)."""
    def line(t):
        u = t.contiguous().view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u >= 0x80, -mag, mag)
    return (line(a) - line(b)).abs()


def q_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype == torch.int8:
        return (a.to(torch.int32) - b.to(torch.int32)).abs()
    return fp8_code_distance(a, b)


def assert_same_bits(q, scale, y, q_st, scale_st, y_st):
    assert q.dtype == q_st.dtype and q.shape == q_st.shape, (q.dtype, q.shape, q_st.dtype, q_st.shape)
    assert scale.dtype == torch.float32 and scale.shape == scale_st.shape, (scale.dtype, scale.shape, scale_st.shape)
    assert y.dtype == y_st.dtype and y.shape == y_st.shape, (y.dtype, y.shape, y_st.dtype, y_st.shape)
    bad = (qbytes(q).cpu() != qbytes(q_st).cpu()).nonzero()
    assert bad.numel() == 0, f"q differs at {bad[:5].tolist()}: {q.cpu()[tuple(bad[0])]} vs {q_st.cpu()[tuple(bad[0])]}"
    assert torch.equal(scale.cpu(), scale_st.cpu()), (scale - scale_st.to(scale.device)).abs().max()
    assert torch.equal(y.cpu(), y_st.cpu()), (y.float().cpu() - y_st.float().cpu()).abs().max()


# -- the statement itself, on values computed by hand ---------------------------------------------

def test_statement_hand_examples():
    # int8, one channel, amax 127: scale exactly 1, x / scale exact, ties to even
    x = torch.tensor([127.0, 0.5, 1.5, -2.5, -127.0, 3.49, -0.5, 126.5]).reshape(1, 1, 8)
    q, s = quantize_statement(x, "int8")
    assert s.shape == (1, 1, 1) and s.item() == 1.0
    assert q.dtype == torch.int8 and q.flatten().tolist() == [127, 0, 2, -2, -127, 3, 0, 126]
    assert torch.equal(dequantize_statement(q, s, torch.float32), q.float())
    assert torch.equal(qdq_statement(x.half(), "int8"), q.half())
    # groups of 2 over L = 5: scales amax/127 per group, the last (all-zero, shorter) group gets 1
    x = torch.tensor([63.5 / 128, -127 / 128, 2.0, 0.25, 0.0]).reshape(1, 1, 5)
    q, s = quantize_statement(x, "int8", "group", 2)
    want_s = torch.tensor([127 / 128, 2.0, 1.0], dtype=torch.float32) / torch.tensor([127.0, 127.0, 1.0])
    assert torch.equal(s.flatten(), want_s) and s[0, 0, 0].item() == 2.0 ** -7
    assert q.flatten().tolist() == [64, -127, 127, 16, 0]  # 63.5 -> 64 (even); 15.875 -> 16
    y = dequantize_statement(q, s, torch.float32, 2)
    assert torch.equal(y.flatten(), torch.stack([64 * s[0, 0, 0], -127 * s[0, 0, 0], 127 * s[0, 0, 1],
                                                 16 * s[0, 0, 1], 0 * s[0, 0, 2]]))
    # no spatial dims: (N, C) -> L = 1, every element its own channel; zeros keep scale 1
    q, s = quantize_statement(torch.tensor([[2.0, 0.0], [-3.0, 1e-3]]), "int8")
    assert s.shape == (2, 2, 1) and s.flatten().tolist() == pytest.approx([2 / 127, 1.0, 3 / 127, 1e-3 / 127])
    assert q.tolist() == [[127, 0], [-127, 127]]
    # fp8 e4m3, amax 448: scale 1, the cast's ties to the even mantissa (normal and subnormal)
    vals = [448.0] + [v for v, _ in MIDPOINTS["fp8_e4m3"]]
    q, s = quantize_statement(torch.tensor(vals).reshape(1, 1, -1), "fp8_e4m3")
    assert s.item() == 1.0 and q.dtype == torch.float8_e4m3fn
    assert q.float().flatten().tolist() == [448.0] + [w for _, w in MIDPOINTS["fp8_e4m3"]]
    # fp8 clamps before the cast (e4m3fn has no inf: an unclamped 449 would not stay 448)
    x = torch.tensor([448.0, -448.0]).reshape(1, 1, 2) * (1 + 2.0 ** -20)
    q, s = quantize_statement(x, "fp8_e4m3")
    assert q.float().flatten().tolist() == [448.0, -448.0]


def test_statement_roundings():
    v = torch.cat([torch.randn(20000) * 100, torch.arange(-300, 301) / 2.0])
    assert torch.equal(round_half_even(v), torch.round(v))
    # PyTorch's e4m3fn cast on every midpoint of the positive finite grid: the even code wins
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # codes 0..126, increasing
    assert torch.all(grid[1:] > grid[:-1])
    mids = (grid[:-1] + grid[1:]) / 2
    even_below = torch.arange(126) % 2 == 0
    assert torch.equal(mids.to(torch.float8_e4m3fn).float(), torch.where(even_below, grid[:-1], grid[1:]))
    assert torch.equal((-mids).to(torch.float8_e4m3fn).float(), -torch.where(even_below, grid[:-1], grid[1:]))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scales, group_size", GRANULARITY)
def test_statement_inputs_hit_midpoints(fmt, scales, group_size):
    shape = (2, 6, 3, 4, 5)
    x, (n, c, k) = make_input(shape, torch.bfloat16, fmt, scales, group_size)
    q, s = quantize_statement(x, fmt, scales, group_size)
    assert (s[n, c] == 2.0 ** k).all() and (s[0, 0] == 1).all()
    table = dict(MIDPOINTS[fmt])
    table[QMAX[fmt]] = QMAX[fmt]
    xs = (x.reshape(2, 6, -1)[n, c].float() / 2.0 ** k).tolist()
    qs = q.reshape(2, 6, -1)[n, c].float().tolist()
    assert [table[a] for a in xs] == qs
    if group_size > 1:
        assert sum(a != QMAX[fmt] for a in xs) >= 30  # midpoints present, not just qmax


# -- the implementation against the statement -----------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales, group_size", GRANULARITY)
@pytest.mark.parametrize("fmt", FMTS)
def test_reference_matches_statement(fmt, scales, group_size, dtype, shape):
    x, _ = make_input(shape, dtype, fmt, scales, group_size)
    x = x.to(DEVICE)
    x0 = x.clone()
    q, scale = quantize_reference(x, fmt, scales=scales, group_size=group_size)
    assert torch.equal(x, x0)
    q_st, scale_st = quantize_statement(x, fmt, scales, group_size)
    G = 1 if scales == "channel" else math.ceil(math.prod(shape[2:]) / group_size)
    assert tuple(scale_st.shape) == (shape[0], shape[1], G) and q_st.dtype == QDTYPE[fmt]
    y = dequantize_reference(q, scale, dtype, group_size=group_size)
    y_st = dequantize_statement(q_st, scale_st, dtype, group_size)
    assert_same_bits(q, scale, y, q_st, scale_st, y_st)


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales, group_size", GRANULARITY)
@pytest.mark.parametrize("fmt", FMTS)
def test_triton_matches_statement(fmt, scales, group_size, dtype, shape):
    if group_size == 1 and shape != (1, 5, 13):
        pytest.skip("group_size 1 (one program per element group) on the smaller shape only: time")
    """Tolerance: TRITON_Q_STEPS steps of q (0: bit for bit), scale exactly; y exactly when q is,
    else within TRITON_Q_STEPS quantization steps (scale per int8 step, the local e4m3 spacing
    times scale for fp8) plus y's dtype rounding. Running on the Triton interpreter (CPU), q, scale
    and y came out bit for bit equal to the statement for both formats, so the tolerance is 0."""
    x, _ = make_input(shape, dtype, fmt, scales, group_size, seed=1)
    x = x.to(DEVICE)
    x0 = x.clone()
    q, scale = quantize_triton(x, fmt, scales=scales, group_size=group_size)
    assert torch.equal(x, x0), "quantize_triton modified x"
    q_st, scale_st = quantize_statement(x, fmt, scales, group_size)
    assert q.dtype == q_st.dtype and q.shape == q_st.shape and scale.dtype == torch.float32
    assert torch.equal(scale.cpu(), scale_st.cpu())
    assert int(q_distance(q.cpu(), q_st.cpu()).max()) <= TRITON_Q_STEPS
    q1 = q.clone()
    y = dequantize_triton(q, scale, dtype, group_size=group_size)
    assert torch.equal(qbytes(q), qbytes(q1)), "dequantize_triton modified q"
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    # y from the implementation's own q, and y of the statement's q through dequantize_triton
    assert torch.equal(y.cpu(), dequantize_statement(q, scale, dtype, group_size).cpu())
    y_st = dequantize_statement(q_st, scale_st, dtype, group_size)
    if TRITON_Q_STEPS == 0:
        assert_same_bits(q, scale, y, q_st, scale_st, y_st)
        assert torch.equal(dequantize_triton(q_st.to(DEVICE), scale_st.to(DEVICE), dtype, group_size=group_size).cpu(),
                           y_st.cpu())
    else:
        step = scale_st.cpu().double().repeat_interleave(1 if scales == "channel" else group_size, dim=-1)
        step = step[..., :math.prod(shape[2:])].reshape(shape)
        if fmt == "fp8_e4m3":  # local e4m3 spacing: 2**(floor(log2|q|) - 3), 2**-9 among subnormals
            mag = q_st.cpu().float().abs().clamp_min(2.0 ** -6).double()
            step = step * torch.exp2(torch.floor(torch.log2(mag)) - 3)
        err = (y.cpu().double() - y_st.cpu().double()).abs()
        tol = TRITON_Q_STEPS * step * (1 + 2.0 ** -10) + 2 * UNIT_ROUNDOFF[dtype] * y_st.cpu().double().abs()
        assert (err <= tol).all(), (err - tol).max()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_contiguous_input(backend):
    """The (N, C, L) view is x's logical row-major order, whatever its strides."""
    quant, dequant = ((quantize_reference, dequantize_reference) if backend == "reference"
                      else (quantize_triton, dequantize_triton))
    base, _ = make_input((2, 5, 3, 6), torch.float16, "int8", "group", 7)
    x = base.to(DEVICE).permute(0, 1, 3, 2)  # (2, 5, 6, 3), not contiguous
    assert not x.is_contiguous()
    for fmt, scales in [("int8", "group"), ("fp8_e4m3", "channel")]:
        q, scale = quant(x, fmt, scales=scales, group_size=7)
        q_st, scale_st = quantize_statement(x.contiguous(), fmt, scales, 7)
        y = dequant(q, scale, torch.float16, group_size=7)
        assert_same_bits(q, scale, y, q_st, scale_st, dequantize_statement(q_st, scale_st, torch.float16, 7))


# -- the error bound that follows from the definition ----------------------------------------------

def error_bound(x, y, scale, fmt, scales, group_size):
    """Elementwise bound on |y - x| (float64), from the definition:
    int8: v = fl(x / s), |round(v) - x/s| <= 1/2 (clamping moves by < 127 * 2**-22 only: |x| <= amax),
          fl(q * s) adds <= 127 s 2**-24: |y32 - x| <= s (1/2 + 2**-15).
    fp8:  |e4m3(c) - c| <= 2**-4 max(|c|, 2**-6) (3 mantissa bits; subnormal spacing 2**-9), with
          c = clamp(fl(x / s)) within |x/s| 2**-22, and fl(q * s): |y32 - x| <= 2**-4 max(|x|, s 2**-6)
          (1 + 2**-16) + 2**-20 |x| + 2**-28 s.
    Then y = dtype(y32): + u |y| (unit roundoff of the dtype) + half its subnormal spacing."""
    N, C = x.shape[0], x.shape[1]
    L = math.prod(x.shape[2:])
    x64 = x.cpu().double().reshape(N, C, L)
    y64 = y.cpu().double().reshape(N, C, L)
    reps = L if scales == "channel" else group_size
    s = scale.cpu().double().repeat_interleave(reps, dim=-1)[..., :L]
    if fmt == "int8":
        b = s * (0.5 + 2.0 ** -15)
    else:
        b = (2.0 ** -4 * torch.maximum(x64.abs(), s * 2.0 ** -6) * (1 + 2.0 ** -16)
             + 2.0 ** -20 * x64.abs() + 2.0 ** -28 * s)
    b = b + 1.01 * UNIT_ROUNDOFF[y.dtype] * y64.abs() + HALF_SUBNORMAL[y.dtype]
    return (y64 - x64).abs(), b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales, group_size", GRANULARITY)
@pytest.mark.parametrize("fmt", FMTS)
def test_error_bound(fmt, scales, group_size, dtype):
    shape = (2, 6, 3, 4, 5)
    x, _ = make_input(shape, dtype, fmt, scales, group_size, seed=2)
    x = x.to(DEVICE)
    q, scale = quantize_reference(x, fmt, scales=scales, group_size=group_size)
    y = dequantize_reference(q, scale, dtype, group_size=group_size)
    err, bound = error_bound(x, y, scale, fmt, scales, group_size)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()} at {(err - bound).argmax().item()}"
    # the statement obeys the same bound (a check of the bound's derivation)
    q_st, s_st = quantize_statement(x, fmt, scales, group_size)
    err, bound = error_bound(x, dequantize_statement(q_st, s_st, dtype, group_size), s_st, fmt, scales, group_size)
    assert (err <= bound).all()


# -- arguments and sizes ---------------------------------------------------------------------------

BAD = [
    (lambda: torch.randn(2, 3, 4), dict(fmt="int4"), "int4"),
    (lambda: torch.randn(2, 3, 4), dict(fmt="fp8_e5m2"), "fp8_e5m2"),
    (lambda: torch.randn(2, 3, 4), dict(fmt="int8", scales="block"), "block"),
    (lambda: torch.randn(2, 3, 4), dict(fmt="int8", scales="tensor"), "tensor"),
    (lambda: torch.randn(2, 3, 4), dict(fmt="int8", scales="group", group_size=0), "0"),
    (lambda: torch.randn(2, 3, 4), dict(fmt="fp8_e4m3", scales="group", group_size=-3), "-3"),
    (lambda: torch.randn(5), dict(fmt="int8"), None),
    (lambda: torch.tensor(1.0), dict(fmt="int8"), None),
    (lambda: torch.ones(2, 3, dtype=torch.int32), dict(fmt="int8"), "int32"),
    (lambda: torch.ones(2, 3, dtype=torch.int8), dict(fmt="fp8_e4m3"), "int8"),
    (lambda: torch.ones(2, 3, dtype=torch.bool), dict(fmt="int8"), "bool"),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("make_x, kw, match", BAD)
def test_bad_arguments(backend, make_x, kw, match):
    quant = quantize_reference if backend == "reference" else quantize_triton
    with pytest.raises(ValueError, match=None if match is None else match.replace("-", r"\-")):
        quant(make_x().to(DEVICE), **kw)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scales, group_size", [("channel", 64), ("group", 64)])
def test_cache_bytes(fmt, scales, group_size):
    """q (one byte an element) plus float32 scales hold < 0.55 of the fp16 tensor's bytes."""
    x = torch.randn(2, 320, 64, 64, dtype=torch.float16, device=DEVICE)
    q, scale = quantize_reference(x, fmt, scales=scales, group_size=group_size)
    G = 1 if scales == "channel" else 64 * 64 // group_size
    assert q.shape == x.shape and q.element_size() == 1 and scale.shape == (2, 320, G) and scale.dtype == torch.float32
    assert q.numel() * q.element_size() + scale.numel() * 4 < 0.55 * x.numel() * 2
    # the Triton kernels on a smaller real tensor, same layout
    xs = torch.randn(2, 8, 16, 16, dtype=torch.float16, device=DEVICE)
    q, scale = quantize_triton(xs, fmt, scales=scales, group_size=group_size)
    assert q.shape == xs.shape and q.element_size() == 1 and scale.shape == (2, 8, 1 if scales == "channel" else 4)
    assert q.numel() + scale.numel() * 4 < 0.55 * xs.numel() * 2
