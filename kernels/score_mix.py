"""Score mixing: out = mix * eps_fr + (1 - mix) * eps_key, computed in fp32, one pass."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def score_mix_reference(eps_fr: torch.Tensor, eps_key: torch.Tensor, mix: float) -> torch.Tensor:
    return (mix * eps_fr.float() + (1.0 - mix) * eps_key.float()).to(eps_fr.dtype)


if triton is not None:

    @triton.jit
    def _score_mix_kernel(fr_ptr, key_ptr, out_ptr, n, mix, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        fr = tl.load(fr_ptr + offs, mask=m).to(tl.float32)
        key = tl.load(key_ptr + offs, mask=m).to(tl.float32)
        out = mix * fr + (1.0 - mix) * key
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


def check_score_mix_args(eps_fr: torch.Tensor, eps_key: torch.Tensor, mix: float) -> None:
    if eps_fr.shape != eps_key.shape or eps_fr.dtype != eps_key.dtype or eps_fr.device != eps_key.device:
        raise ValueError(
            f"score_mix: eps_fr {tuple(eps_fr.shape)} {eps_fr.dtype} {eps_fr.device} and eps_key "
            f"{tuple(eps_key.shape)} {eps_key.dtype} {eps_key.device} must match"
        )
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"score_mix: mix must lie in [0, 1], got {mix}")


def score_mix_triton(eps_fr: torch.Tensor, eps_key: torch.Tensor, mix: float, launch=None, out=None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed; use the PyTorch reference")
    check_score_mix_args(eps_fr, eps_key, mix)
    fr, key = eps_fr.contiguous(), eps_key.contiguous()
    if out is None:
        out = torch.empty_like(fr)
    elif out.shape != fr.shape or out.dtype != fr.dtype or out.device != fr.device or not out.is_contiguous():
        raise ValueError("score_mix: out must be a contiguous tensor matching eps_fr")
    n = fr.numel()
    BLOCK = 1024
    launch = launch or (lambda k: k)
    launch(_score_mix_kernel)[(triton.cdiv(n, BLOCK),)](fr, key, out, n, float(mix), BLOCK=BLOCK)
    return out
