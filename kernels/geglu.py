"""GEGLU's gate: out = h * gelu(g), where (h, g) are the two halves of the last dim of x.

diffusers' GEGLU (the feed-forward activation of SD and SDXL transformer blocks) runs gelu(g) and
the product as two passes over inner-size tensors; on a full step these are among the largest
memory-bound ops (bench/step_anatomy.py). One pass reads h and g and writes out. Arithmetic in
fp32 with gelu's result rounded to the I/O dtype before the product, as the unfused sequence does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    """diffusers' op sequence."""
    h, g = x.chunk(2, dim=-1)
    return h * F.gelu(g)


if triton is not None:

    @triton.jit
    def _geglu_kernel(x_ptr, out_ptr, n_out, half, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_out
        row = offs // half
        col = offs - row * half
        src = row * (2 * half) + col
        h = tl.load(x_ptr + src, mask=m).to(tl.float32)
        g = tl.load(x_ptr + src + half, mask=m).to(tl.float32)
        gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        gelu = gelu.to(out_ptr.dtype.element_ty).to(tl.float32)  # F.gelu's output dtype
        tl.store(out_ptr + offs, (h * gelu).to(out_ptr.dtype.element_ty), mask=m)


def check_geglu_args(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"geglu: the last dimension must be even (h and gate halves), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"geglu: dtype must be float32, float16 or bfloat16, got {x.dtype}")


def geglu_triton(x: torch.Tensor, launch=None, out=None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed; use the PyTorch reference")
    check_geglu_args(x)
    x = x.contiguous()
    half = x.shape[-1] // 2
    shape = x.shape[:-1] + (half,)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"geglu: out must be a contiguous {tuple(shape)} {x.dtype} tensor on {x.device}")
    n_out = out.numel()
    BLOCK = 1024
    launch = launch or (lambda k: k)
    launch(_geglu_kernel)[(triton.cdiv(n_out, BLOCK),)](x, out, n_out, half, BLOCK=BLOCK)
    return out
