"""Independent plain-PyTorch statement of the compressed feature cache's quantization
(quantize on store, dequantize on read), written from the definition alone with explicit loops
over (n, c, group), everything in float32:

- x (N, C, *rest), float32/float16/bfloat16, is viewed as (N, C, L), L = prod(rest) (1 if none), in
  its logical row-major element order.
- scales="channel": one group per (n, c), all L elements; scales="group": groups of `group_size`
  consecutive elements along L, the last one possibly shorter. scale: float32 (N, C, G).
- int8: scale = amax / 127 (float32), 1 where amax == 0; q = clamp(round_half_even(x32 / scale),
  -127, 127) as int8.
- fp8_e4m3: scale = amax / 448 (float32), 1 where amax == 0; q = clamp(x32 / scale, -448, 448)
  cast to torch.float8_e4m3fn (PyTorch's round-to-nearest-even cast).
- dequantize: y = float32(q) * scale (float32 multiply), cast to the requested dtype.

The int8 rounding is written out here (floor and compare with 0.5, ties to the even neighbour)
rather than calling torch.round, so that the statement's half-to-even does not lean on the same
primitive an implementation would use.
"""
import math

import torch

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
QDTYPE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def group_bounds(L: int, scales: str, group_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of each group along L: one group for "channel", ceil(L / group_size) for
    "group" (the last one shorter when group_size does not divide L)."""
    if scales == "channel":
        return [(0, L)]
    if scales == "group":
        return [(s, min(s + group_size, L)) for s in range(0, L, group_size)]
    raise ValueError(f"scales={scales!r}")


def round_half_even(v: torch.Tensor) -> torch.Tensor:
    """Nearest integer of float32 v, ties to even, written out: f = floor(v), d = v - f (exact for
    |v| < 2**23, the case here: |v| <= ~127); up when d > 0.5 or (d == 0.5 and f is odd)."""
    assert v.dtype == torch.float32
    f = torch.floor(v)
    d = v - f
    f_odd = torch.remainder(f, 2) == 1
    up = (d > 0.5) | ((d == 0.5) & f_odd)
    return torch.where(up, f + 1, f)


def quantize_statement(x: torch.Tensor, fmt: str, scales: str = "channel", group_size: int = 64):
    """(q, scale) per the definition; q has x's shape, scale is float32 (N, C, G)."""
    assert x.dim() >= 2 and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    qmax = QMAX[fmt]
    N, C = x.shape[0], x.shape[1]
    L = math.prod(x.shape[2:])
    x3 = x.detach().cpu().contiguous().reshape(N, C, L).to(torch.float32)
    bounds = group_bounds(L, scales, group_size)
    G = len(bounds)
    scale = torch.empty(N, C, G, dtype=torch.float32)
    q = torch.empty(N, C, L, dtype=QDTYPE[fmt])
    one, qmax32, lo, hi = _f32(1.0), _f32(qmax), _f32(-qmax), _f32(qmax)
    for n in range(N):
        for c in range(C):
            for g, (s, e) in enumerate(bounds):
                xs = x3[n, c, s:e]  # float32
                amax = xs.abs().max()  # float32, exact
                if amax.item() == 0:
                    sc = one
                else:
                    sc = amax / qmax32  # float32 / float32: IEEE float32 division
                assert sc.dtype == torch.float32
                scale[n, c, g] = sc
                v = xs / sc  # float32 division, element by its group's scale
                assert v.dtype == torch.float32
                if fmt == "int8":
                    r = round_half_even(v)
                    r = torch.minimum(torch.maximum(r, lo), hi)  # [-127, 127]
                    q[n, c, s:e] = r.to(torch.int8)  # integral values in [-127, 127]: exact
                else:
                    v = torch.minimum(torch.maximum(v, lo), hi)  # [-448, 448]
                    q[n, c, s:e] = v.to(torch.float8_e4m3fn)
    return q.reshape(x.shape).to(x.device), scale.to(x.device)


def dequantize_statement(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, group_size: int = 64):
    """y = float32(q) * scale per group, cast to dtype, q's shape. G = scale.shape[-1]: one group
    over all L when G == 1, else groups of group_size."""
    N, C = q.shape[0], q.shape[1]
    L = math.prod(q.shape[2:])
    G = scale.shape[-1]
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (N, C, G)
    bounds = group_bounds(L, "channel" if G == 1 else "group", group_size)
    assert len(bounds) == G, (L, G, group_size)
    q3 = q.detach().cpu().contiguous().reshape(N, C, L)
    sc3 = scale.detach().cpu()
    y = torch.empty(N, C, L, dtype=dtype)
    for n in range(N):
        for c in range(C):
            for g, (s, e) in enumerate(bounds):
                qf = q3[n, c, s:e].to(torch.float32)  # int8 and e4m3 values are exact in float32
                y32 = qf * sc3[n, c, g]  # float32 * float32 scalar tensor: float32 multiply
                assert y32.dtype == torch.float32
                y[n, c, s:e] = y32.to(dtype)
    return y.reshape(q.shape).to(q.device)


def qdq_statement(x: torch.Tensor, fmt: str, scales: str = "channel", group_size: int = 64):
    """dequantize(quantize(x)) in x's dtype."""
    q, scale = quantize_statement(x, fmt, scales, group_size)
    return dequantize_statement(q, scale, x.dtype, group_size)


# -- test inputs ---------------------------------------------------------------------------------

# Midpoints (in units of the scale) whose rounding the definition fixes, with the result it gives.
# int8: half to even. fp8 e4m3: PyTorch's cast, nearest even mantissa (normal and subnormal).
MIDPOINTS = {
    "int8": [(0.5, 0.0), (1.5, 2.0), (2.5, 2.0), (-3.5, -4.0), (-126.5, -126.0), (125.5, 126.0),
             (-0.5, 0.0), (64.5, 64.0)],
    "fp8_e4m3": [(1.0625, 1.0), (1.1875, 1.25), (2.125, 2.0), (-2.375, -2.5), (400.0, 384.0),
                 (432.0, 448.0), (2.0 ** -10, 0.0), (3 * 2.0 ** -10, 2.0 ** -8)],
}


def make_input(shape, dtype, fmt, scales="channel", group_size=64, seed=0):
    """randn with per-channel factors spanning 1e-3..1e3 (log-spaced over C), one channel all zero
    (channel 0 of sample 0), and, when L >= 2, one channel (the last of the last sample) whose
    every group starts with qmax * 2**k (so the group's scale is exactly 2**k) followed by values
    that land exactly on rounding midpoints in scale units (MIDPOINTS). Returns (x, mid) with mid =
    (n, c, k) of the midpoint channel or None."""
    g = torch.Generator().manual_seed(seed + 1000 * len(shape) + sum(shape))
    N, C = shape[0], shape[1]
    L = math.prod(shape[2:])
    factors = torch.logspace(-3, 3, C) if C > 1 else torch.ones(1)
    x = torch.randn(N, C, L, generator=g) * factors.view(1, C, 1)
    x[0, 0] = 0.0
    mid = None
    if L >= 2 and not (N == 1 and C == 1):
        k = [0, -3, 5][seed % 3]
        n, c = N - 1, C - 1
        vals = [v for v, _ in MIDPOINTS[fmt]]
        for s, e in group_bounds(L, scales, group_size):
            for i, l in enumerate(range(s, e)):
                x[n, c, l] = QMAX[fmt] * 2.0 ** k if i == 0 else vals[(l + i) % len(vals)] * 2.0 ** k
        mid = (n, c, k)
    xd = x.to(dtype)
    if mid is not None:  # the midpoints and qmax * 2**k are exact in every dtype used here
        n, c, k = mid
        assert torch.equal(xd[n, c].float(), x[n, c])
    return xd.reshape(shape), mid
