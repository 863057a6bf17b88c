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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None


def group_norm_act_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    add: Optional[torch.Tensor] = None,
    add_channel: Optional[torch.Tensor] = None,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, in the op order diffusers uses (so it is bit-identical to diffusers).

    Returns (y, pre-norm sum)."""
    if add is not None:
        x = x + add
    if add_channel is not None:
        x = x + add_channel[:, :, None, None]
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if silu:
        y = F.silu(y)
    return y, x


if triton is not None:

    @triton.jit
    def _load_prologue(
        x_ptr, add_ptr, chan_ptr, b, c, hw, mask, C,
        sxb, sxc, sxhw, sab, sac, sahw, scb, scc,
        HAS_ADD: tl.constexpr, HAS_CHAN: tl.constexpr,
    ):
        x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask, other=0.0)
        io = x.dtype
        v = x.to(tl.float32)
        # Each add is rounded to the I/O dtype, as the unfused PyTorch sequence does; the adds run
        # in fp32 (exact for two values of a narrower dtype, and the interpreter lacks bf16 math).
        if HAS_ADD:
            a = tl.load(add_ptr + b * sab + c[:, None] * sac + hw[None, :] * sahw, mask=mask, other=0.0)
            v = (v + a.to(tl.float32)).to(io).to(tl.float32)
        if HAS_CHAN:
            ch = tl.load(chan_ptr + b * scb + c * scc, mask=c < C, other=0.0)
            v = (v + ch.to(tl.float32)[:, None]).to(io).to(tl.float32)
        return v

    @triton.jit
    def _group_norm_stats_kernel(
        x_ptr, add_ptr, chan_ptr, part_ptr,
        C, HW, G, NCHUNK,
        sxb, sxc, sxhw, sab, sac, sahw, scb, scc,
        HAS_ADD: tl.constexpr, HAS_CHAN: tl.constexpr,
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
        v = _load_prologue(x_ptr, add_ptr, chan_ptr, b, c, hw, mask, C,
                           sxb, sxc, sxhw, sab, sac, sahw, scb, scc, HAS_ADD, HAS_CHAN)
        n = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean = tl.sum(tl.sum(tl.where(mask, v, 0.0), axis=1), axis=0) / n
        d = tl.where(mask, v - mean, 0.0)
        m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        base = part_ptr + (bg * NCHUNK + chunk) * 3
        tl.store(base, n)
        tl.store(base + 1, mean)
        tl.store(base + 2, m2)

    @triton.jit
    def _group_norm_apply_kernel(
        x_ptr, add_ptr, chan_ptr, part_ptr, w_ptr, b_ptr, y_ptr, s_ptr,
        C, HW, G, NCHUNK, eps,
        sxb, sxc, sxhw, sab, sac, sahw, scb, scc, syb, syc, syhw, ssb, ssc, sshw,
        HAS_ADD: tl.constexpr, HAS_CHAN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        SILU: tl.constexpr, WRITE_SUM: tl.constexpr,
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
        v = _load_prologue(x_ptr, add_ptr, chan_ptr, b, c, hw, mask, C,
                           sxb, sxc, sxhw, sab, sac, sahw, scb, scc, HAS_ADD, HAS_CHAN)
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
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Triton launch (`launch` wraps each kernel, e.g. torch.library.wrap_triton). Returns (y, pre-norm sum or None). y and the sum keep x's memory format."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the PyTorch reference")
    check_group_norm_args(x, weight, bias, num_groups, add, add_channel)
    B, C, H, W = x.shape
    HW = H * W
    G = num_groups
    CPG = C // G
    BLOCK_C, BLOCK_HW = _block_sizes(CPG, HW)
    nchunk = triton.cdiv(HW, BLOCK_HW)
    part = torch.empty((B * G, nchunk, 3), device=x.device, dtype=torch.float32)
    for name, buf in (("out", out), ("sum_out", sum_out)):
        if buf is not None and (buf.shape != x.shape or buf.dtype != x.dtype or buf.device != x.device):
            raise ValueError(f"group_norm_act: {name} must match x ({tuple(x.shape)}, {x.dtype}, {x.device})")
    y = torch.empty_like(x) if out is None else out
    s = (torch.empty_like(x) if sum_out is None else sum_out) if write_sum else y
    a = add if add is not None else x
    ch = add_channel if add_channel is not None else x
    scb, scc = (add_channel.stride(0), add_channel.stride(1)) if add_channel is not None else (0, 0)
    sx, sa, sy, ss = _hw_strides(x, "x"), _hw_strides(a, "add"), _hw_strides(y, "out"), _hw_strides(s, "sum")
    grid = (B * G, nchunk)
    launch = launch or (lambda k: k)
    launch(_group_norm_stats_kernel)[grid](
        x, a, ch, part, C, HW, G, nchunk, *sx, *sa, scb, scc,
        HAS_ADD=add is not None, HAS_CHAN=add_channel is not None,
        CPG=CPG, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
    )
    w = weight if weight is not None else x
    bb = bias if bias is not None else x
    # 8 warps: 16 elements per thread of a 4096-element block (with 4, ptxas 13 spills at 640
    # channels for sm_90; bench/aot_compile.py). The only reduction here, the merge of the chunks'
    # statistics, has at most 128 values at SD/SDXL sizes (one per lane of at most 4 warps, the
    # other warps hold copies), so it sums in the same order with 4 or 8 warps.
    launch(_group_norm_apply_kernel)[grid](
        x, a, ch, part, w, bb, y, s, C, HW, G, nchunk, float(eps),
        *sx, *sa, scb, scc, *sy, *ss,
        HAS_ADD=add is not None, HAS_CHAN=add_channel is not None,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, WRITE_SUM=write_sum,
        CPG=CPG, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW, BLOCK_CHUNK=max(2, triton.next_power_of_2(nchunk)), num_warps=8,
    )
    return y, (s if write_sum else None)


def check_group_norm_args(x, weight, bias, num_groups, add, add_channel) -> None:
    if x.dim() != 4:
        raise ValueError(f"group_norm_act: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm_act: dtype {x.dtype} not supported; accepted: float32, float16, bfloat16")
    B, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_act: {C} channels do not split into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"group_norm_act: {name} must have shape ({C},), got {tuple(t.shape)}")
    if add is not None and (add.shape != x.shape or add.dtype != x.dtype or add.device != x.device):
        raise ValueError(
            f"group_norm_act: add must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got {tuple(add.shape)}, {add.dtype}, {add.device}"
        )
    if add_channel is not None and (
        tuple(add_channel.shape) != (B, C) or add_channel.dtype != x.dtype or add_channel.device != x.device
    ):
        raise ValueError(
            f"group_norm_act: add_channel must be ({B}, {C}) {x.dtype} on {x.device}, "
            f"got {tuple(add_channel.shape)} {add_channel.dtype} on {add_channel.device}"
        )
