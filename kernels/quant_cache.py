"""Compressed feature cache: int8 / fp8 (e4m3) storage with float32 scales (issue: compressed cache).

A cached tensor x (N, C, *rest) is viewed as (N, C, L), L = prod(rest), in row-major order.
Scales: one per (n, c) ("channel") or per (n, c, group of `group_size` consecutive elements
along L) ("group"); amax = max |x| over the group in float32; scale = amax / QMAX (int8: 127,
fp8_e4m3: 448), 1 where amax == 0.
- int8: q = clamp(round_half_even(x / scale), -127, 127);
- fp8_e4m3: q = float8_e4m3fn(clamp(x / scale, -448, 448)) (round to nearest even);
- decode: y = float32(q) * scale, in the requested dtype.
Division and multiplication are float32 IEEE operations, so the reference and the kernels agree
bit for bit where the hardware rounds as IEEE says (Triton: div_rn; rounding to an integer by
adding and subtracting 1.5 * 2**23, exact for |y| <= 127).

quantize_reference / dequantize_reference: plain PyTorch. quantize_triton: one program per
scale group (a max pass, then a quantize pass over the same elements); dequantize_triton: one
elementwise pass. dequantize_add_reference / dequantize_add_triton: x + decode(q) in x's dtype, one
elementwise pass (a reused branch's output added to the hidden state without decoding it first).
The per-element jit helpers (_scale_from_amax, _encode_value, _decode_value, _to_output) are also
what kernels/group_norm.py's prologue decodes and its apply kernel encodes with. Knows nothing of
diffusers.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
STORAGE = {"int8": torch.int8, "fp8_e4m3": getattr(torch, "float8_e4m3fn", None)}
GRANULARITIES = ("channel", "group")


def check_quantize_args(x, fmt: str, scales: str, group_size: int) -> None:
    if fmt not in QMAX:
        raise ValueError(f"quant_cache: format {fmt!r} not supported; accepted: {', '.join(QMAX)}")
    if STORAGE[fmt] is None:
        raise ValueError(f"quant_cache: this torch build ({torch.__version__}) has no {fmt} dtype")
    if scales not in GRANULARITIES:
        raise ValueError(f"quant_cache: scales {scales!r} not supported; accepted: {', '.join(GRANULARITIES)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"quant_cache: group_size must be an int >= 1, got {group_size!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quant_cache: x must be a floating tensor (N, C, ...) of 2 or more dims, got {desc}")


def check_quantized(q, scale, group_size: int, who: str = "quant_cache") -> None:
    """q as quantize_* returns it (int8 / float8_e4m3fn, (N, C, ...), row-major contiguous) and its
    float32 scales (N, C, G), G = 1 (one per row) or ceil(L / group_size)."""
    storage = [t for t in STORAGE.values() if t is not None]
    if not isinstance(q, torch.Tensor) or q.dtype not in storage or q.dim() < 2:
        desc = f"{tuple(q.shape)} {q.dtype}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{who}: the quantized tensor must be (N, C, ...) in "
                         f"{' or '.join(str(t) for t in storage)}, got {desc}")
    if not q.is_contiguous():
        raise ValueError(f"{who}: the quantized tensor must be row-major contiguous (as quantize_* writes it), "
                         f"got strides {q.stride()} for shape {tuple(q.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{who}: group_size must be an int >= 1, got {group_size!r}")
    n, c = q.shape[:2]
    length = q[0, 0].numel() if n * c else 0
    groups = -(-length // group_size)
    if (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() != 3
            or tuple(scale.shape[:2]) != (n, c) or scale.shape[2] not in (1, groups)):
        desc = f"{tuple(scale.shape)} {scale.dtype}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{who}: scale must be float32 ({n}, {c}, 1) (channel scales) or ({n}, {c}, {groups}) "
                         f"(groups of {group_size} of {length} elements), got {desc}")
    if scale.device != q.device:
        raise ValueError(f"{who}: scale is on {scale.device}, the quantized tensor on {q.device}")


def _groups(length: int, scales: str, group_size: int) -> tuple[int, int]:
    """(elements per group, groups per (n, c) row)."""
    if scales == "channel":
        return max(length, 1), 1
    return group_size, -(-length // group_size)


def quantize_reference(x, fmt: str, scales: str = "channel", group_size: int = 64):
    """(q of x's shape in int8 / float8_e4m3fn, float32 scales (N, C, G))."""
    check_quantize_args(x, fmt, scales, group_size)
    n, c = x.shape[:2]
    rows = x.reshape(n, c, -1).float()
    length = rows.shape[-1]
    gs, g = _groups(length, scales, group_size)
    padded = torch.nn.functional.pad(rows, (0, gs * g - length))  # zeros do not change a max of |x|
    amax = padded.reshape(n, c, g, gs).abs().amax(-1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / QMAX[fmt])
    y = rows / scale.repeat_interleave(gs, -1)[..., :length]
    if fmt == "int8":
        q = torch.round(y).clamp_(-127, 127).to(torch.int8)
    else:
        q = y.clamp(-448.0, 448.0).to(STORAGE[fmt])
    # row-major codes whatever x's layout (as the kernels write them: the decoders index rows)
    return q.reshape(x.shape).contiguous(), scale


def dequantize_reference(q, scale, dtype, group_size: int = 64):
    """float32(q) * scale, in `dtype`, of q's shape."""
    n, c = q.shape[:2]
    rows = q.reshape(n, c, -1).float()
    length = rows.shape[-1]
    gs = max(length, 1) if scale.shape[-1] == 1 else group_size
    return (rows * scale.repeat_interleave(gs, -1)[..., :length]).to(dtype).reshape(q.shape)


def dequantize_add_reference(x, q, scale, group_size: int = 64):
    """x + dequantize_reference(q, scale, x.dtype, group_size): the decode rounded to x's dtype, then
    PyTorch's add (in float32 for fp16 / bf16, rounded once)."""
    return x + dequantize_reference(q, scale, x.dtype, group_size)


if triton is not None:

    @triton.jit
    def _scale_from_amax(amax, QMAX_: tl.constexpr):
        """amax / QMAX (IEEE division), 1 where the group is all zero."""
        return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, QMAX_))

    @triton.jit
    def _encode_value(v, scale, QMAX_: tl.constexpr, IS_INT8: tl.constexpr):
        """The stored code of float32 v under `scale`: int8, or float8_e4m3fn's bits as uint8."""
        y = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -QMAX_), QMAX_)
        if IS_INT8:
            y = (y + 12582912.0) - 12582912.0  # round half to even (1.5 * 2**23; |y| <= 127)
            code = y.to(tl.int8)
        else:
            code = _e4m3_bits(y)
        return code

    @triton.jit
    def _decode_value(code, IS_FP8: tl.constexpr):
        """float32 value of a loaded code: int8, or the bits of a float8_e4m3fn (stored as uint8),
        decoded by hand as they are encoded (the interpreter cannot cast fp8)."""
        if IS_FP8:
            b = code.to(tl.int32)
            e = (b >> 3) & 0xF
            mant = (b & 7).to(tl.float32)
            mag = tl.where(e == 0, mant * 0.001953125,  # subnormal: m * 2**-9
                           (8.0 + mant) * ((e + 117) << 23).to(tl.float32, bitcast=True))  # (8 + m) * 2**(e - 10)
            v = tl.where((b & 0x80) != 0, -mag, mag)
        else:
            v = code.to(tl.float32)
        return v

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, L, GS, G, QMAX_: tl.constexpr, IS_INT8: tl.constexpr,
                         BLOCK: tl.constexpr):
        pid = tl.program_id(0)  # (row, group) of the (N * C, G) scale grid
        row = pid // G
        start = (pid % G) * GS
        end = tl.minimum(start + GS, L)
        base = row.to(tl.int64) * L
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + base + idx, mask=idx < end, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(v))
        scale = _scale_from_amax(tl.max(acc, axis=0), QMAX_)
        tl.store(s_ptr + pid, scale)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            m = idx < end
            v = tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
            tl.store(q_ptr + base + idx, _encode_value(v, scale, QMAX_, IS_INT8), mask=m)

    @triton.jit
    def _e4m3_bits(y):
        """float8_e4m3fn's bits of y (|y| <= 448), round to nearest even, subnormals kept: built
        from the bits, not by a cast (Triton's interpreter casts neither to nearest even nor to
        subnormals; the hardware's cvt.rn.satfinite does)."""
        bits = y.to(tl.int32, bitcast=True)
        sign = ((bits >> 24) & 0x80).to(tl.int32)
        a = tl.abs(y)
        e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: 2**-6 steps
        quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3): 3 mantissa bits
        r = (a / quantum + 12582912.0) - 12582912.0  # exact division by a power of two, then round half even
        return (sign | (((e + 7) << 3) + r.to(tl.int32) - 8)).to(tl.uint8)

    @triton.jit
    def _to_output(v, out_ty: tl.constexpr):
        if out_ty == tl.bfloat16:  # round to nearest even by hand (the interpreter truncates)
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return v.to(out_ty)

    @triton.jit
    def _dequantize_kernel(q_ptr, s_ptr, y_ptr, total, L, GS, G, IS_FP8: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = idx < total
        row = idx // L
        g = (idx % L) // GS
        s = tl.load(s_ptr + row * G + g, mask=m, other=1.0)
        q = tl.load(q_ptr + idx, mask=m, other=0)
        tl.store(y_ptr + idx, _to_output(_decode_value(q, IS_FP8) * s, y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dequantize_add_kernel(
        x_ptr, q_ptr, s_ptr, y_ptr, total, L, GS, G,
        D1, D2, D3, sx0, sx1, sx2, sx3, sq0, sq1, sq2, sq3, sy0, sy1, sy2, sy3,
        IS_FP8: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # idx runs over the elements in x's memory order (dims sorted by x's strides and merged where
        # x, q and y all allow it: one dim for a dense x of q's layout, three for channels_last);
        # (i0, i1, i2, i3) are its coordinates in those dims, of sizes (total / (D1 D2 D3), D1, D2,
        # D3), missing dims padded at the end with size 1: Triton makes integer arguments equal to 1
        # compile-time constants, so their index arithmetic folds away.
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = idx < total
        i3 = idx % D3
        t = idx // D3
        i2 = t % D2
        t = t // D2
        i1 = t % D1
        i0 = t // D1
        lin = i0 * sq0 + i1 * sq1 + i2 * sq2 + i3 * sq3  # q is row-major: its offset is the element's logical index
        s = tl.load(s_ptr + (lin // L) * G + (lin % L) // GS, mask=m, other=1.0)
        q = tl.load(q_ptr + lin, mask=m, other=0)
        io = y_ptr.dtype.element_ty
        d = _to_output(_decode_value(q, IS_FP8) * s, io).to(tl.float32)  # the decode, rounded to x's dtype
        xv = tl.load(x_ptr + i0 * sx0 + i1 * sx1 + i2 * sx2 + i3 * sx3, mask=m, other=0.0)
        # one rounding of the exact float32 sum of two narrower values, as PyTorch's fp16 / bf16 add
        tl.store(y_ptr + i0 * sy0 + i1 * sy1 + i2 * sy2 + i3 * sy3, _to_output(xv.to(tl.float32) + d, io), mask=m)


def quantize_triton(x, fmt: str, scales: str = "channel", group_size: int = 64, launch=None):
    """quantize_reference's values, one Triton program per scale group. launch: wraps the kernel
    before its launch (bench/aot_compile.py records launches with it)."""
    check_quantize_args(x, fmt, scales, group_size)
    n, c = x.shape[:2]
    xc = x.contiguous()
    length = xc[0, 0].numel() if n * c else 0
    gs, g = _groups(length, scales, group_size)
    q = torch.empty(x.shape, dtype=torch.int8 if fmt == "int8" else torch.uint8, device=x.device)
    scale = torch.empty(n, c, g, dtype=torch.float32, device=x.device)
    if q.numel():
        block = min(1024, triton.next_power_of_2(min(gs, length)))
        (launch or (lambda k: k))(_quantize_kernel)[(n * c * g,)](
            xc, q, scale, length, gs, g, QMAX_=QMAX[fmt], IS_INT8=fmt == "int8", BLOCK=block)
    return q.view(STORAGE[fmt]), scale


def dequantize_triton(q, scale, dtype, group_size: int = 64, launch=None):
    """dequantize_reference's values, one elementwise Triton pass."""
    n, c = q.shape[:2]
    qc = q.contiguous()
    length = qc[0, 0].numel() if n * c else 0
    g = scale.shape[-1]
    gs = max(length, 1) if g == 1 else group_size
    y = torch.empty(q.shape, dtype=dtype, device=q.device)
    total = q.numel()
    fp8 = q.dtype != torch.int8
    if total:
        block = 1024
        (launch or (lambda k: k))(_dequantize_kernel)[(triton.cdiv(total, block),)](
            qc.view(torch.uint8) if fp8 else qc, scale.contiguous(), y, total, length, gs, g, IS_FP8=fp8, BLOCK=block)
    return y


def _merged_dims(shape, *strides):
    """(sizes, [strides of each tensor]) of the dims of `shape` in the first tensor's memory order
    (strides descending), size-1 dims dropped and neighbours merged where every tensor's strides let
    them (outer stride == inner stride * inner size)."""
    order = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: -strides[0][d])
    sizes, out = [], [[] for _ in strides]
    for d in order:
        if sizes and all(st[-1] == s[d] * shape[d] for st, s in zip(out, strides)):
            sizes[-1] *= shape[d]
            for st, s in zip(out, strides):
                st[-1] = s[d]
        else:
            sizes.append(shape[d])
            for st, s in zip(out, strides):
                st.append(s[d])
    return sizes, out


def dequantize_add_triton(x, q, scale, group_size: int = 64, launch=None, out=None):
    """dequantize_add_reference's values in one elementwise Triton pass (no decoded temporary). x:
    float32 / float16 / bfloat16 of q's shape, any strides (read in x's memory order); q: as
    quantize_* returns it (row-major contiguous); the result has x's memory format
    (torch.empty_like(x)), or is written into `out` (x's shape and dtype, any strides). A layout
    that does not merge into at most 4 strided dims (only possible past 4-D) is refused."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        desc = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"dequantize_add: x must be float32, float16 or bfloat16, got {desc}")
    check_quantized(q, scale, group_size, "dequantize_add")
    if x.shape != q.shape or x.device != q.device:
        raise ValueError(f"dequantize_add: x {tuple(x.shape)} on {x.device} must have the quantized tensor's shape "
                         f"and device, {tuple(q.shape)} on {q.device}")
    y = torch.empty_like(x) if out is None else out
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        desc = f"{tuple(y.shape)} {y.dtype} on {y.device}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"dequantize_add: out must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got {desc}")
    total = x.numel()
    if not total:
        return y
    sizes, (sx, sq, sy) = _merged_dims(tuple(x.shape), x.stride(), q.stride(), y.stride())
    if len(sizes) > 4:
        raise ValueError(f"dequantize_add: x's strides {x.stride()} for shape {tuple(x.shape)} do not merge into "
                         f"4 or fewer strided dims; pass x.contiguous()")
    pad = 4 - len(sizes)  # trailing dims of size 1: a dense x of q's layout is one dim, no index arithmetic
    sizes, sx, sq, sy = sizes + [1] * pad, sx + [0] * pad, sq + [0] * pad, sy + [0] * pad
    n, c = q.shape[:2]
    length = total // (n * c)
    g = scale.shape[-1]
    fp8 = q.dtype != torch.int8
    block = 1024
    (launch or (lambda k: k))(_dequantize_add_kernel)[(triton.cdiv(total, block),)](
        x, q.view(torch.uint8) if fp8 else q, scale.contiguous(), y, total, length, length if g == 1 else group_size, g,
        *sizes[1:], *sx, *sq, *sy, IS_FP8=fp8, BLOCK=block)
    return y
