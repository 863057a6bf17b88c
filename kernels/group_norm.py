"""GroupNorm with fused prologue (+ tensor, + per-channel vector) and optional SiLU epilogue.

y = act(group_norm(x + add + add_channel[:, :, None, None]))

Serves the ResNet's norm1 + SiLU, and on reuse steps "cached conv1 output + time-embedding
projection + norm2 + SiLU" in one pass. Statistics in fp32 (per-chunk mean and M2, merged with
Chan's formula, so large means do not cancel); fp32 / fp16 / bf16 I/O; any strides whose H and W
dims flatten (NCHW contiguous and channels_last both do).

Channels per group (CPG) is a compile-time constant: in channels_last a group's channels are the
contiguous run g * CPG .. g * CPG + CPG - 1 of each pixel, and only a known CPG lets Triton prove
that run's alignment (its power-of-two factor) and that the channel mask is constant over it, so
the loads move 2 to 8 16-bit elements per instruction (SD/SDXL: CPG 10, 20, 30, 40, 60, 80) instead
of one. Any CPG is exact (an odd one compiles to scalar loads); one compile per CPG value, a handful
per model. bench/aot_compile.py checks what this compiles to for sm_90 and sm_80.

The compressed feature cache (kernels/quant_cache.py) is fused at both ends:
- decode (x_scale=...): x is a quantized tensor (int8 / float8_e4m3fn, NCHW contiguous) with its
  float32 scales, decoded in the prologue's registers to x_dtype (exactly dequantize_reference)
  before the adds: a reuse step reads the cached conv1 output without a separate decode pass.
- encode (quantize=(fmt, scales, group_size)): the functions also return quantize_reference(x) of
  the raw x (before the adds), written by the apply kernel, which reads every element anyway:
  a keyframe writes its cache without a separate quantize pass. A scale group that lies inside
  one program's block of positions (group scales of a power-of-two size up to the block, or a
  whole row that fits one block) takes its max in that program; one that spans several blocks
  (channel scales of a larger map, power-of-two groups larger than the block) takes it from
  per-(sample, channel, block) maxima the stats kernel writes. Group scales of another size
  smaller than H*W do not align with the blocks: group_norm_act_triton then runs
  quant_cache.quantize_triton (a second pass) for the encode.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .quant_cache import (QMAX, STORAGE, check_quantize_args, check_quantized, dequantize_reference,
                          quantize_reference, quantize_triton)

try:
    import triton
    import triton.language as tl

    from .quant_cache import _decode_value, _encode_value, _scale_from_amax, _to_output
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

Encoded = tuple[torch.Tensor, torch.Tensor]  # (q, float32 scales) as quant_cache.quantize_* returns them


def group_norm_act_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    add: Optional[torch.Tensor] = None,
    add_channel: Optional[torch.Tensor] = None,
    silu: bool = False,
    *,
    x_scale: Optional[torch.Tensor] = None,
    x_group_size: int = 64,
    x_dtype: Optional[torch.dtype] = None,
    quantize: Optional[tuple[str, str, int]] = None,
) -> Union[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, Encoded]]:
    """Plain PyTorch, in the op order diffusers uses (so it is bit-identical to diffusers).

    x_scale: x is quantized (quant_cache.quantize_*'s q) and is first replaced by
    dequantize_reference(x, x_scale, x_dtype, x_group_size). quantize=(fmt, scales, group_size):
    also returns quantize_reference(x, fmt, scales, group_size) of the raw x.

    Returns (y, pre-norm sum), or (y, pre-norm sum, (q, scale)) with quantize."""
    encoded = None
    if x_scale is not None or x_dtype is not None or quantize is not None or x.dtype in STORAGE.values():
        check_group_norm_args(x, weight, bias, num_groups, add, add_channel, x_scale=x_scale,
                              x_group_size=x_group_size, x_dtype=x_dtype, quantize=quantize)
        if quantize is not None:
            encoded = quantize_reference(x, *quantize)
        if x_scale is not None:
            x = dequantize_reference(x, x_scale, x_dtype, x_group_size)
    if add is not None:
        x = x + add
    if add_channel is not None:
        x = x + add_channel[:, :, None, None]
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if silu:
        y = F.silu(y)
    return (y, x) if quantize is None else (y, x, encoded)


if triton is not None:

    @triton.jit
    def _load_prologue(
        x_ptr, add_ptr, chan_ptr, xs_ptr, b, c, hw, mask, C, XG,
        sxb, sxc, sxhw, sab, sac, sahw, scb, scc,
        HAS_ADD: tl.constexpr, HAS_CHAN: tl.constexpr, X_QUANT: tl.constexpr, X_GS: tl.constexpr,
    ):
        """(x + add + add_channel, x) in float32; x decoded first when X_QUANT (1: int8, 2: the bits
        of float8_e4m3fn) with one float32 scale per (b, c) (X_GS 0) or per X_GS positions of a row
        (XG per row)."""
        x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask, other=0.0)
        io = add_ptr.dtype.element_ty  # the I/O dtype: add's, or a stand-in of that dtype without one
        if X_QUANT == 0:
            v = x.to(tl.float32)
        else:
            if X_GS == 0:
                s = tl.load(xs_ptr + b * C + c, mask=c < C, other=1.0)[:, None]
            else:  # x is NCHW contiguous: hw is the position along the row
                s = tl.load(xs_ptr + (b * C + c[:, None]) * XG + hw[None, :] // X_GS, mask=mask, other=1.0)
            # rounded to the I/O dtype, as dequantize_reference's result is
            v = _to_output(_decode_value(x, X_QUANT == 2) * s, io).to(tl.float32)
        raw = v
        # Each add is rounded to the I/O dtype, as the unfused PyTorch sequence does; the adds run
        # in fp32 (exact for two values of a narrower dtype, and the interpreter lacks bf16 math).
        if HAS_ADD:
            a = tl.load(add_ptr + b * sab + c[:, None] * sac + hw[None, :] * sahw, mask=mask, other=0.0)
            v = (v + a.to(tl.float32)).to(io).to(tl.float32)
        if HAS_CHAN:
            ch = tl.load(chan_ptr + b * scb + c * scc, mask=c < C, other=0.0)
            v = (v + ch.to(tl.float32)[:, None]).to(io).to(tl.float32)
        return v, raw

    @triton.jit
    def _group_norm_stats_kernel(
        x_ptr, add_ptr, chan_ptr, xs_ptr, part_ptr, amax_ptr,
        C, HW, G, NCHUNK, XG,
        sxb, sxc, sxhw, sab, sac, sahw, scb, scc,
        HAS_ADD: tl.constexpr, HAS_CHAN: tl.constexpr, X_QUANT: tl.constexpr, X_GS: tl.constexpr,
        AMAX: tl.constexpr,
        CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    ):
        bg = tl.program_id(0)
        chunk = tl.program_id(1)
        b = bg // G
        g = bg % G
        cl = tl.arange(0, BLOCK_C)
        c = g * CPG + cl
        hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = (cl[:, None] < CPG) & (hw[None, :] < HW)
        v, raw = _load_prologue(x_ptr, add_ptr, chan_ptr, xs_ptr, b, c, hw, mask, C, XG,
                                sxb, sxc, sxhw, sab, sac, sahw, scb, scc, HAS_ADD, HAS_CHAN, X_QUANT, X_GS)
        n = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean = tl.sum(tl.sum(tl.where(mask, v, 0.0), axis=1), axis=0) / n
        d = tl.where(mask, v - mean, 0.0)
        m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        base = part_ptr + (bg * NCHUNK + chunk) * 3
        tl.store(base, n)
        tl.store(base + 1, mean)
        tl.store(base + 2, m2)
        if AMAX:  # max |x| of each channel over this chunk, for scale groups wider than a chunk
            tl.store(amax_ptr + (b * C + c) * NCHUNK + chunk, tl.max(tl.abs(raw), axis=1), mask=cl < CPG)

    @triton.jit
    def _group_norm_apply_kernel(
        x_ptr, add_ptr, chan_ptr, xs_ptr, part_ptr, w_ptr, b_ptr, y_ptr, s_ptr, amax_ptr, q_ptr, qs_ptr,
        C, HW, G, NCHUNK, XG, Q_CHUNKS, QG, eps,
        sxb, sxc, sxhw, sab, sac, sahw, scb, scc, syb, syc, syhw, ssb, ssc, sshw,
        HAS_ADD: tl.constexpr, HAS_CHAN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        SILU: tl.constexpr, WRITE_SUM: tl.constexpr, X_QUANT: tl.constexpr, X_GS: tl.constexpr,
        QUANT: tl.constexpr, Q_MAX: tl.constexpr, Q_GS: tl.constexpr, Q_BLOCK_CHUNK: tl.constexpr,
        CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CHUNK: tl.constexpr,
    ):
        bg = tl.program_id(0)
        chunk = tl.program_id(1)
        b = bg // G
        g = bg % G
        # Merge the per-chunk (count, mean, M2) of this group.
        k = tl.arange(0, BLOCK_CHUNK)
        km = k < NCHUNK
        pbase = part_ptr + bg * NCHUNK * 3 + k * 3
        n_i = tl.load(pbase, mask=km, other=0.0)
        mean_i = tl.load(pbase + 1, mask=km, other=0.0)
        m2_i = tl.load(pbase + 2, mask=km, other=0.0)
        n = tl.sum(n_i, axis=0)
        mean = tl.sum(n_i * mean_i, axis=0) / n
        dm = mean_i - mean
        m2 = tl.sum(m2_i, axis=0) + tl.sum(tl.where(km, n_i * dm * dm, 0.0), axis=0)
        rstd = 1.0 / tl.sqrt(m2 / n + eps)

        cl = tl.arange(0, BLOCK_C)
        c = g * CPG + cl
        hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cmask = cl < CPG
        mask = cmask[:, None] & (hw[None, :] < HW)
        v, raw = _load_prologue(x_ptr, add_ptr, chan_ptr, xs_ptr, b, c, hw, mask, C, XG,
                                sxb, sxc, sxhw, sab, sac, sahw, scb, scc, HAS_ADD, HAS_CHAN, X_QUANT, X_GS)
        y = (v - mean) * rstd
        if HAS_W:
            w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
            y = y * w[:, None]
        if HAS_B:
            bb = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            y = y + bb[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + b * syb + c[:, None] * syc + hw[None, :] * syhw,
                 y.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_SUM:
            tl.store(s_ptr + b * ssb + c[:, None] * ssc + hw[None, :] * sshw,
                     v.to(s_ptr.dtype.element_ty), mask=mask)
        if QUANT != 0:  # encode the raw x (1: int8, 2: float8_e4m3fn bits) into NCHW q and scales (B, C, QG)
            if Q_GS == 0:
                # A scale group spans Q_CHUNKS chunks (from its first): the max of the stats
                # kernel's per-chunk maxima; the group's first chunk writes the scale.
                first = (chunk // Q_CHUNKS) * Q_CHUNKS
                kq = tl.arange(0, Q_BLOCK_CHUNK)
                kmask = cmask[:, None] & (kq[None, :] < Q_CHUNKS) & (first + kq[None, :] < NCHUNK)
                part_max = tl.load(amax_ptr + (b * C + c[:, None]) * NCHUNK + first + kq[None, :], mask=kmask, other=0.0)
                scale = _scale_from_amax(tl.max(part_max, axis=1), Q_MAX)
                if chunk == first:
                    tl.store(qs_ptr + (b * C + c) * QG + chunk // Q_CHUNKS, scale, mask=cmask)
                scale = scale[:, None]
            else:
                # Groups of Q_GS positions (a power of two dividing BLOCK_HW) lie inside this block:
                # their max is taken here (masked positions hold 0).
                NG: tl.constexpr = BLOCK_HW // Q_GS
                amax = tl.max(tl.reshape(tl.abs(raw), [BLOCK_C, NG, Q_GS]), axis=2)
                gscale = _scale_from_amax(amax, Q_MAX)
                gi = chunk * NG + tl.arange(0, NG)
                tl.store(qs_ptr + (b * C + c[:, None]) * QG + gi[None, :], gscale,
                         mask=cmask[:, None] & (gi[None, :] < QG))
                scale = tl.reshape(tl.broadcast_to(gscale[:, :, None], [BLOCK_C, NG, Q_GS]), [BLOCK_C, BLOCK_HW])
            tl.store(q_ptr + (b * C + c[:, None]) * HW + hw[None, :], _encode_value(raw, scale, Q_MAX, QUANT == 1),
                     mask=mask)


def _hw_strides(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(batch, channel, flattened-HW) strides; H and W must flatten into one dimension."""
    B, C, H, W = t.shape
    if H > 1 and W > 1 and t.stride(2) != W * t.stride(3):
        raise ValueError(f"{name}: strides {t.stride()} do not flatten H and W (use NCHW or channels_last)")
    hw_stride = t.stride(3) if W > 1 else t.stride(2)
    return t.stride(0), t.stride(1), hw_stride


def _block_sizes(cpg: int, hw: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(cpg)
    block_hw = max(16, min(triton.next_power_of_2(hw), 4096 // block_c))
    return block_c, block_hw


def _encode_plan(quantize, HW: int, BLOCK_HW: int, nchunk: int):
    """How the apply kernel finds a scale group's max: (Q_GS, Q_CHUNKS, scale groups per row), or
    None where the groups do not align with the chunks (the encode then runs quantize_triton).
    Q_GS > 0: groups of Q_GS positions inside one chunk, max taken in the apply kernel; Q_GS == 0:
    a group spans Q_CHUNKS chunks, max of the stats kernel's per-chunk maxima."""
    _, scales, group_size = quantize
    span = HW if scales == "channel" or group_size >= HW else group_size  # positions per scale group
    groups = 1 if span == HW else triton.cdiv(HW, span)
    pow2 = span & (span - 1) == 0
    if nchunk == 1 and span == HW:
        return BLOCK_HW, 1, 1  # the whole row in one chunk
    if pow2 and span <= BLOCK_HW:
        return span, 1, groups  # BLOCK_HW (a power of two) is a multiple of span
    if span == HW:
        return 0, nchunk, 1
    if pow2:
        return 0, span // BLOCK_HW, groups  # span a multiple of BLOCK_HW
    return None


def group_norm_act_triton(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    add: Optional[torch.Tensor] = None,
    add_channel: Optional[torch.Tensor] = None,
    silu: bool = False,
    write_sum: bool = False,
    launch=None,
    out: Optional[torch.Tensor] = None,
    sum_out: Optional[torch.Tensor] = None,
    *,
    x_scale: Optional[torch.Tensor] = None,
    x_group_size: int = 64,
    x_dtype: Optional[torch.dtype] = None,
    quantize: Optional[tuple[str, str, int]] = None,
) -> Union[tuple[torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, Optional[torch.Tensor], Encoded]]:
    """Triton launch (`launch` wraps each kernel, e.g. torch.library.wrap_triton). Returns (y, pre-norm
    sum or None), or (y, sum or None, (q, scale)) with quantize. y and the sum keep x's memory format
    (NCHW when x is quantized); they and out / sum_out have x_dtype when x is quantized.

    x_scale: x is quantized (NCHW contiguous int8 / float8_e4m3fn with float32 scales (B, C, 1) or
    (B, C, ceil(H*W / x_group_size))), decoded in the prologue. quantize=(fmt, scales, group_size):
    the raw x's encoding (q NCHW contiguous, whatever x's layout), fused into the two kernels except
    for group scales whose size is not a power of two and is smaller than H*W: those run
    quant_cache.quantize_triton, a separate pass over x. Not with x_scale."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the PyTorch reference")
    io = check_group_norm_args(x, weight, bias, num_groups, add, add_channel, x_scale=x_scale,
                               x_group_size=x_group_size, x_dtype=x_dtype, quantize=quantize)
    B, C, H, W = x.shape
    HW = H * W
    G = num_groups
    CPG = C // G
    BLOCK_C, BLOCK_HW = _block_sizes(CPG, HW)
    nchunk = triton.cdiv(HW, BLOCK_HW)
    part = torch.empty((B * G, nchunk, 3), device=x.device, dtype=torch.float32)
    for name, buf in (("out", out), ("sum_out", sum_out)):
        if buf is not None and (buf.shape != x.shape or buf.dtype != io or buf.device != x.device):
            raise ValueError(f"group_norm_act: {name} must match x ({tuple(x.shape)}, {io}, {x.device}), "
                             f"got {tuple(buf.shape)}, {buf.dtype}, {buf.device}")
    decode = x_scale is not None
    new = (lambda: torch.empty(x.shape, device=x.device, dtype=io)) if decode else (lambda: torch.empty_like(x))
    y = new() if out is None else out
    s = (new() if sum_out is None else sum_out) if write_sum else y
    # add_ptr's element type is the kernels' I/O dtype: without an add, x stands in, or y when x is
    # quantized.
    a = add if add is not None else (y if decode else x)
    ch = add_channel if add_channel is not None else x
    scb, scc = (add_channel.stride(0), add_channel.stride(1)) if add_channel is not None else (0, 0)
    sx, sa, sy, ss = _hw_strides(x, "x"), _hw_strides(a, "add"), _hw_strides(y, "out"), _hw_strides(s, "sum")
    xq = x.view(torch.uint8) if decode and x.dtype != torch.int8 else x  # fp8 decoded from its bits
    X_QUANT = 0 if not decode else (1 if x.dtype == torch.int8 else 2)
    xs = x_scale.contiguous() if decode else part
    XG = xs.shape[-1] if decode else 1
    X_GS = x_group_size if decode and XG > 1 else 0

    plan = _encode_plan(quantize, HW, BLOCK_HW, nchunk) if quantize is not None else None
    encoded = None
    QUANT, Q_GS, Q_CHUNKS, QG, amax, q, qs = 0, 0, 1, 1, part, y, part
    if plan is not None:
        fmt = quantize[0]
        Q_GS, Q_CHUNKS, QG = plan
        QUANT = 1 if fmt == "int8" else 2
        q = torch.empty(x.shape, device=x.device, dtype=torch.int8 if fmt == "int8" else torch.uint8)
        qs = torch.empty((B, C, QG), device=x.device, dtype=torch.float32)
        if Q_GS == 0:
            amax = torch.empty((B * C, nchunk), device=x.device, dtype=torch.float32)
        encoded = (q.view(STORAGE[fmt]), qs)
    grid = (B * G, nchunk)
    launch = launch or (lambda k: k)
    launch(_group_norm_stats_kernel)[grid](
        xq, a, ch, xs, part, amax, C, HW, G, nchunk, XG, *sx, *sa, scb, scc,
        HAS_ADD=add is not None, HAS_CHAN=add_channel is not None, X_QUANT=X_QUANT, X_GS=X_GS,
        AMAX=QUANT != 0 and Q_GS == 0, CPG=CPG, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    w = weight if weight is not None else x
    bb = bias if bias is not None else x
    # 8 warps: 16 elements per thread of a 4096-element block (with 4, ptxas 13 spills at 640
    # channels for sm_90; bench/aot_compile.py). The only reduction here, the merge of the chunks'
    # statistics, has at most 128 values at SD/SDXL sizes (one per lane of at most 4 warps, the
    # other warps hold copies), so it sums in the same order with 4 or 8 warps.
    launch(_group_norm_apply_kernel)[grid](
        xq, a, ch, xs, part, w, bb, y, s, amax, q, qs, C, HW, G, nchunk, XG, Q_CHUNKS, QG, float(eps),
        *sx, *sa, scb, scc, *sy, *ss,
        HAS_ADD=add is not None, HAS_CHAN=add_channel is not None,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, WRITE_SUM=write_sum,
        X_QUANT=X_QUANT, X_GS=X_GS, QUANT=QUANT, Q_MAX=QMAX[quantize[0]] if QUANT else 0.0, Q_GS=Q_GS,
        Q_BLOCK_CHUNK=max(2, triton.next_power_of_2(Q_CHUNKS)) if QUANT else 2,
        CPG=CPG, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW, BLOCK_CHUNK=max(2, triton.next_power_of_2(nchunk)), num_warps=8,
    )
    if quantize is not None and plan is None:  # group sizes that do not align with the chunks
        encoded = quantize_triton(x, *quantize, launch=launch)
    if quantize is None:
        return y, (s if write_sum else None)
    return y, (s if write_sum else None), encoded


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_group_norm_args(x, weight, bias, num_groups, add, add_channel, *, x_scale=None, x_group_size=64,
                          x_dtype=None, quantize=None) -> torch.dtype:
    """ValueError naming the offending value; returns the I/O dtype (x's, or x_dtype when x is quantized)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        desc = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"group_norm_act: x must be 4-D (B, C, H, W), got shape {desc}")
    if x_scale is not None:
        check_quantized(x, x_scale, x_group_size, "group_norm_act: quantized x (x_scale given)")
        if x_dtype not in FLOAT_DTYPES:
            raise ValueError(f"group_norm_act: x_dtype (what a quantized x decodes to) must be float32, float16 or "
                             f"bfloat16, got {x_dtype}")
        if quantize is not None:
            raise ValueError("group_norm_act: quantize= (encode x) and x_scale= (x is already encoded) together "
                             "are not supported")
        io = x_dtype
    else:
        if x.dtype not in FLOAT_DTYPES:
            hint = " (a quantized x needs x_scale= and x_dtype=)" if x.dtype in STORAGE.values() else ""
            raise ValueError(f"group_norm_act: dtype {x.dtype} not supported; accepted: float32, float16, bfloat16"
                             + hint)
        if x_dtype is not None and x_dtype != x.dtype:
            raise ValueError(f"group_norm_act: x_dtype={x_dtype} is for a quantized x (with x_scale=); "
                             f"x is {x.dtype}")
        io = x.dtype
    if quantize is not None:
        if not isinstance(quantize, (tuple, list)) or len(quantize) != 3:
            raise ValueError(f"group_norm_act: quantize must be (fmt, scales, group_size), got {quantize!r}")
        check_quantize_args(x, *quantize)
    B, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_act: {C} channels do not split into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"group_norm_act: {name} must have shape ({C},), got {tuple(t.shape)}")
    if add is not None and (add.shape != x.shape or add.dtype != io or add.device != x.device):
        raise ValueError(
            f"group_norm_act: add must match x (shape {tuple(x.shape)}, {io}, {x.device}), "
            f"got {tuple(add.shape)}, {add.dtype}, {add.device}"
        )
    if add_channel is not None and (
        tuple(add_channel.shape) != (B, C) or add_channel.dtype != io or add_channel.device != x.device
    ):
        raise ValueError(
            f"group_norm_act: add_channel must be ({B}, {C}) {io} on {x.device}, "
            f"got {tuple(add_channel.shape)} {add_channel.dtype} on {add_channel.device}"
        )
    return io
