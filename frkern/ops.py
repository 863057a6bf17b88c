"""The operations frkern's wrappers call, each with two backends.

"torch": the plain-PyTorch reference from kernels/ (bit-identical to diffusers' op sequence).
"triton": the fused Triton kernels, registered as torch custom ops so torch.compile and CUDA
graphs see one op each. "auto" picks triton for CUDA tensors and torch elsewhere.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

import torch

from .kernels import geglu as _gg
from .kernels import group_norm as _gn
from .kernels import score_mix as _sm
from .kernels import skip_conv as _sc

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return _gn.triton is not None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' asked for, but triton is not installed")


def use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {t.device}); on a CPU set TRITON_INTERPRET=1 "
                "to run the kernels in Triton's interpreter"
            )
        return True
    return t.device.type == "cuda" and triton_available()


if triton_available():

    @torch.library.triton_op("frkern::group_norm_act", mutates_args=())
    def _group_norm_act_op(
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        num_groups: int,
        eps: float,
        add: Optional[torch.Tensor],
        add_channel: Optional[torch.Tensor],
        silu: bool,
        write_sum: bool,
    ) -> list[torch.Tensor]:
        # Same body as kernels.group_norm.group_norm_act_triton, with launches wrapped for tracing.
        y, s = _gn.group_norm_act_triton(
            x, weight, bias, num_groups, eps, add, add_channel, silu, write_sum, launch=torch.library.wrap_triton
        )
        return [y, s] if write_sum else [y]

    @torch.library.triton_op("frkern::score_mix", mutates_args=())
    def _score_mix_op(eps_fr: torch.Tensor, eps_key: torch.Tensor, mix: float) -> torch.Tensor:
        return _sm.score_mix_triton(eps_fr, eps_key, mix, launch=torch.library.wrap_triton)


    @torch.library.triton_op("frkern::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor) -> torch.Tensor:
        return _gg.geglu_triton(x, launch=torch.library.wrap_triton)

    @torch.library.triton_op("frkern::skip_conv", mutates_args=("x_ref", "z"))
    def _skip_conv_op(
        x: torch.Tensor,
        x_ref: torch.Tensor,
        z: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        tile: int,
        threshold: float,
        padding: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Updates x_ref and z in place; returns the (active, affected) tile masks.
        _, _, active, affected = _sc.skip_conv_triton(
            x, x_ref, z, weight, bias, tile, threshold, tuple(padding), launch=torch.library.wrap_triton
        )
        return active, affected


def group_norm_act(
    x: torch.Tensor,
    norm: torch.nn.GroupNorm,
    *,
    silu: bool,
    add: Optional[torch.Tensor] = None,
    add_channel: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """act(norm(x + add + add_channel[:, :, None, None]))."""
    if use_triton(backend, x):
        return _group_norm_act_op(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add, add_channel, silu, False)[0]
    return _gn.group_norm_act_reference(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add, add_channel, silu)[0]


def score_mix(eps_fr: torch.Tensor, eps_key: torch.Tensor, mix: float, *, backend: str = "auto") -> torch.Tensor:
    """mix * eps_fr + (1 - mix) * eps_key."""
    if use_triton(backend, eps_fr):
        return _score_mix_op(eps_fr, eps_key, float(mix))
    _sm.check_score_mix_args(eps_fr, eps_key, mix)
    return _sm.score_mix_reference(eps_fr, eps_key, mix)


def geglu(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """h * gelu(gate) for (h, gate) = x.chunk(2, -1)."""
    if use_triton(backend, x):
        return _geglu_op(x)
    return _gg.geglu_reference(x)


_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, stacklevel=3)


def skip_conv(x, x_ref, z, weight, bias, *, tile: int, threshold: float, padding=1, backend: str = "auto",
              conv=None):
    """One Skip-Convolution step (kernels/skip_conv.py): (output, new x_ref, active, affected).

    triton: the tile-predicated Triton convolution, in place: x_ref and z are updated and returned
    (the output is z itself). torch: the PyTorch reference, out of place (x_ref and z untouched).
    conv (a callable, e.g. a LoRA-adapted convolution): always the reference, which calls it densely
    (the Triton kernel reads one weight tensor); said once with a warning when Triton was asked for."""
    if conv is not None:
        if use_triton(backend, x):
            _warn_once("skip_conv_callable", "frkern: SkipConv on an adapted convolution (LoRA layer or casting "
                       "hooks) runs the PyTorch reference (dense convolution, same values), not the Triton kernel")
        return _sc.skip_conv_reference(x, x_ref, z, weight, bias, tile, threshold, padding, conv=conv)
    if use_triton(backend, x):
        _sc.check_skip_conv_args(x, x_ref, z, weight, tile, threshold, padding)
        pad = list(padding) if isinstance(padding, (tuple, list)) else [padding, padding]
        active, affected = _skip_conv_op(x, x_ref, z, weight, bias, tile, float(threshold), pad)
        return z, x_ref, active, affected
    return _sc.skip_conv_reference(x, x_ref, z, weight, bias, tile, threshold, padding)
