"""The operations frkern's wrappers call, each with two backends.

"torch": the plain-PyTorch reference from kernels/ (bit-identical to diffusers' op sequence).
"triton": the fused Triton kernels, registered as torch custom ops so torch.compile and CUDA
graphs see one op each. "auto" picks triton for CUDA tensors and torch elsewhere.

Kernel failures (issue 22): under "auto", an exception from an op's Triton path (compile errors,
OutOfResources, driver launch errors; not torch.OutOfMemoryError) makes that call run the reference
instead, and the op stays on the reference for that fallback key (see the notes above
kernel_report) for the rest of the process: one KernelFallbackWarning per key, no retries. Under
"triton" the failure raises KernelError with the original error chained. Argument errors (a
failure the kernels' own checks explain) propagate unchanged under both. kernel_report() counts
where each op ran.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

import torch

from .kernels import geglu as _gg
from .kernels import quant_cache as _qc
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
    return _auto_picks_triton(t)


def _auto_picks_triton(t: torch.Tensor) -> bool:
    """What backend="auto" runs: Triton for CUDA tensors. Private test hook: tests/test_kernel_fallback.py
    monkeypatches it to `lambda t: True` so that "auto" takes the Triton path (the interpreter) on a CPU."""
    return t.device.type == "cuda" and triton_available()


def _wrap_triton(kernel):
    """torch.library.wrap_triton (dynamo traces into the launch). Kernels of Triton's interpreter
    (TRITON_INTERPRET=1) launch unwrapped, as torch >= 2.13's wrap_triton leaves them itself: older
    torch (2.11 on the GPU image) raises for them, which would fail the CPU dry run there."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter
        InterpretedFunction = ()
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


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
        x_scale: Optional[torch.Tensor] = None,
        x_group_size: int = 64,
        x_dtype: Optional[torch.dtype] = None,
        q_format: str = "",
        q_scales: str = "channel",
        q_group_size: int = 64,
    ) -> list[torch.Tensor]:
        # Same body as kernels.group_norm.group_norm_act_triton, with launches wrapped for tracing.
        # Returns [y, (pre-norm sum), (q, scales of x when q_format)].
        out = _gn.group_norm_act_triton(
            x, weight, bias, num_groups, eps, add, add_channel, silu, write_sum, launch=_wrap_triton,
            x_scale=x_scale, x_group_size=x_group_size, x_dtype=x_dtype,
            quantize=(q_format, q_scales, q_group_size) if q_format else None,
        )
        return [out[0], *([out[1]] if write_sum else []), *(list(out[2]) if q_format else [])]

    @torch.library.triton_op("frkern::dequantize_add", mutates_args=())
    def _dequantize_add_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
        return _qc.dequantize_add_triton(x, q, scale, group_size, launch=_wrap_triton)

    @torch.library.triton_op("frkern::score_mix", mutates_args=())
    def _score_mix_op(eps_fr: torch.Tensor, eps_key: torch.Tensor, mix: float) -> torch.Tensor:
        return _sm.score_mix_triton(eps_fr, eps_key, mix, launch=_wrap_triton)


    @torch.library.triton_op("frkern::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor) -> torch.Tensor:
        return _gg.geglu_triton(x, launch=_wrap_triton)

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
            x, x_ref, z, weight, bias, tile, threshold, tuple(padding), launch=_wrap_triton
        )
        return active, affected


# ---------------------------------------------------------------------------------------------
# Fallback of backend="auto" when a Triton kernel cannot run, and the per-op report.
#
# Fallback key: (dtype, device type, layout signature) per op, the signature being everything that
# selects the kernels' compiled configuration except the batch and spatial extents: channel counts,
# groups, kernel size, tile, which optional operands are present, flags, and each tensor's memory
# layout class. What makes a kernel unable to run (no Triton support for the architecture or the
# dtype, OutOfResources from block sizes set by channels / tile / dtype, a layout a kernel refuses)
# is a function of these; batch (doubled by CFG) and resolution change from call to call, so leaving
# them out bounds the failed attempts and warnings by the model's layer types, not by the workload.
# The price: a failure tied to one spatial size (GroupNorm's HW block for small maps) keeps that
# key on the reference at every size (exact values, slower).
#
# skip_conv updates x_ref and z in place in three launches (gate sums, gate apply writes x_ref,
# convolution writes z), so a failure of a later launch (its compile, load or launch) would find
# x_ref already written. The first Triton run of each exact launch signature (shapes, strides,
# 16-byte alignment, device: what Triton specializes and loads kernels on) in this process is made
# on a snapshot: copies of x_ref and z are taken before the launch and written back on any failure,
# so the reference then runs on the caller's state as it was. After a signature has run once its
# kernels are compiled and loaded, and no copies are taken; a later failure of that signature is a
# device fault, not a kernel that cannot run here: it raises KernelError (state may be partial).
# ---------------------------------------------------------------------------------------------

OPS = ("group_norm_act", "geglu", "score_mix", "skip_conv", "skip_conv_temporal", "quantize_cache",
       "dequantize_cache", "dequantize_add")
TORCH_ONLY = ("skip_conv_temporal",)  # ops with no Triton kernel (counted on the torch side only)


class KernelFallbackWarning(RuntimeWarning):
    """backend="auto": an op's Triton kernel failed; the op runs the PyTorch reference for that key."""


class KernelError(RuntimeError):
    """backend="triton" (or a skip_conv signature that ran before): a Triton kernel failed; the
    original error is chained (__cause__)."""


_lock = threading.Lock()  # guards _counts, _fallbacks and _proven
_counts = {op: {"triton": 0, "torch": 0} for op in OPS}
_fallbacks: dict = {op: {} for op in OPS}  # op -> {key: error string}: keys that stay on the reference
_proven: set = set()  # skip_conv launch signatures that ran on Triton in this process
_PROVEN_MAX = 4096  # forgetting only costs one snapshot more


def kernel_report(reset: bool = False) -> dict:
    """Where each op ran: {op: {"triton": n, "torch": n, "fallbacks": [(key, error), ...]}}.

    Counts are calls since process start or since the last kernel_report(reset=True) (which
    returns the counts it zeroes). "torch" counts reference runs (backend="torch", non-CUDA tensors
    under "auto", fallbacks). "fallbacks" lists the keys ((dtype, device type, layout signature))
    whose Triton kernel failed under "auto" and that stay on the reference for the process's life
    (reset does not clear them). Counted on the host when the Python op runs: calls inside
    torch.compile'd code and CUDA graph replays are not counted."""
    with _lock:
        report = {op: {"triton": c["triton"], "torch": c["torch"], "fallbacks": list(_fallbacks[op].items())}
                  for op, c in _counts.items()}
        if reset:
            for c in _counts.values():
                c["triton"] = c["torch"] = 0
    return report


def _forget_fallbacks() -> None:
    """Private, for tests: clear the fallback registry, the proven signatures and the counts."""
    with _lock:
        for op in OPS:
            _fallbacks[op].clear()
            _counts[op]["triton"] = _counts[op]["torch"] = 0
        _proven.clear()


def _count(op: str, where: str) -> None:
    with _lock:
        _counts[op][where] += 1


def _layout(t: Optional[torch.Tensor]) -> Optional[str]:
    if t is None:
        return None
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    if len(text) > 500:
        text = text[:500] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _on_reference(op: str, key_fn) -> bool:
    """backend="auto": has this op's key fallen back before? Cheap while the op has no fallbacks
    (the key is not even built); a racing registration at worst costs one more failed attempt."""
    if not _fallbacks[op]:
        return False
    key = key_fn()
    with _lock:
        return key in _fallbacks[op]


def _register(op: str, key: tuple, e: BaseException, stacklevel: int = 4) -> None:
    error = _describe(e)
    with _lock:
        if key in _fallbacks[op]:  # another thread got there first: it warned
            return
        _fallbacks[op][key] = error
    dtype, device_type, _ = key
    warnings.warn(f"frkern: {op}'s Triton kernel failed on {dtype} {device_type} tensors (key {key[2]}); "
                  f"backend='auto' runs the PyTorch reference for this op and key from now on. Error: {error}",
                  KernelFallbackWarning, stacklevel=stacklevel)


def _failed(op: str, key: tuple, e: BaseException, detail: str = "") -> KernelError:
    return KernelError(f"frkern: the Triton kernel for {op} ({key[0]}, {key[1]}, {key[2]}) failed{detail}: "
                       f"{_describe(e)}")


def _arguments_ok(check_fn) -> bool:
    """After a failure: do the kernel's own argument checks pass? (Not run on the hot path.)"""
    try:
        check_fn()
    except Exception:
        return False
    return True


def _guarded(op: str, backend: str, key_fn, check_fn, triton_fn, reference_fn):
    """The Triton path of an out-of-place op (nothing it writes is visible unless it returns)."""
    if backend == "auto" and _on_reference(op, key_fn):
        out = reference_fn()
        _count(op, "torch")
        return out
    try:
        out = triton_fn()
    except torch.OutOfMemoryError:
        raise  # not a kernel that cannot run here (the reference needs more memory): nothing registered
    except Exception as e:
        if not _arguments_ok(check_fn):
            raise  # the call is at fault (ValueError from the kernel's checks), under every backend
        key = key_fn()
        if backend != "auto":
            raise _failed(op, key, e) from e
        # If the reference refuses the call too, the call is at fault, not the kernel: its error
        # propagates (the Triton error as context) and nothing is registered.
        out = reference_fn()
        _register(op, key, e)
        _count(op, "torch")
        return out
    _count(op, "triton")
    return out


def group_norm_act(
    x: torch.Tensor,
    norm: torch.nn.GroupNorm,
    *,
    silu: bool,
    add: Optional[torch.Tensor] = None,
    add_channel: Optional[torch.Tensor] = None,
    backend: str = "auto",
    x_scale: Optional[torch.Tensor] = None,
    x_group_size: int = 64,
    x_dtype: Optional[torch.dtype] = None,
    quantize: Optional[tuple[str, str, int]] = None,
):
    """act(norm(x + add + add_channel[:, :, None, None])).

    x_scale: x is a compressed cache's quantized tensor (kernels/quant_cache.py) with its scales,
    decoded to x_dtype first (in the kernel's prologue on Triton). quantize=(format, scales,
    group_size): also returns x's encoding, (y, (q, scale)) (written by the kernel on Triton)."""
    codec = dict(x_scale=x_scale, x_group_size=x_group_size, x_dtype=x_dtype, quantize=quantize)

    def reference():
        out = _gn.group_norm_act_reference(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add, add_channel,
                                           silu, **codec)
        return out[0] if quantize is None else (out[0], out[2])

    if not use_triton(backend, x):
        out = reference()
        if not torch.compiler.is_compiling():
            _count("group_norm_act", "torch")
        return out

    def triton_path():  # traced as one op under torch.compile
        out = _group_norm_act_op(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add, add_channel, silu,
                                 False, x_scale, x_group_size, x_dtype, *(quantize or ("", "channel", 64)))
        return out[0] if quantize is None else (out[0], (out[1], out[2]))

    if torch.compiler.is_compiling():  # no host-side bookkeeping in the graph
        return triton_path()

    def key():
        return (x.dtype, x.device.type, (x.shape[1], norm.num_groups, norm.weight is not None, norm.bias is not None,
                                         silu, _layout(x), _layout(add), _layout(add_channel),
                                         None if x_scale is None else (x_scale.shape[-1] > 1, x_group_size, x_dtype),
                                         quantize))

    def check():
        _gn.check_group_norm_args(x, norm.weight, norm.bias, norm.num_groups, add, add_channel, **codec)

    return _guarded("group_norm_act", backend, key, check, triton_path, reference)


def score_mix(eps_fr: torch.Tensor, eps_key: torch.Tensor, mix: float, *, backend: str = "auto") -> torch.Tensor:
    """mix * eps_fr + (1 - mix) * eps_key."""

    def reference():
        _sm.check_score_mix_args(eps_fr, eps_key, mix)
        return _sm.score_mix_reference(eps_fr, eps_key, mix)

    if not use_triton(backend, eps_fr):
        out = reference()
        if not torch.compiler.is_compiling():
            _count("score_mix", "torch")
        return out
    if torch.compiler.is_compiling():
        return _score_mix_op(eps_fr, eps_key, float(mix))
    return _guarded(
        "score_mix", backend,
        lambda: (eps_fr.dtype, eps_fr.device.type, (_layout(eps_fr), _layout(eps_key))),
        lambda: _sm.check_score_mix_args(eps_fr, eps_key, mix),
        lambda: _score_mix_op(eps_fr, eps_key, float(mix)),
        reference,
    )


def geglu(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """h * gelu(gate) for (h, gate) = x.chunk(2, -1)."""
    if not use_triton(backend, x):
        out = _gg.geglu_reference(x)
        if not torch.compiler.is_compiling():
            _count("geglu", "torch")
        return out
    if torch.compiler.is_compiling():
        return _geglu_op(x)
    return _guarded(
        "geglu", backend,
        lambda: (x.dtype, x.device.type, (x.shape[-1], _layout(x))),
        lambda: _gg.check_geglu_args(x),
        lambda: _geglu_op(x),
        lambda: _gg.geglu_reference(x),
    )


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
    (the Triton kernel reads one weight tensor); said once with a warning when Triton was asked for.
    A Triton failure under "auto" runs the reference with x_ref and z as they were before the call
    (see the fallback notes above)."""
    counting = not torch.compiler.is_compiling()

    def reference():
        out = _sc.skip_conv_reference(x, x_ref, z, weight, bias, tile, threshold, padding, conv=conv)
        if counting:
            _count("skip_conv", "torch")
        return out

    if conv is not None:
        if use_triton(backend, x):
            _warn_once("skip_conv_callable", "frkern: SkipConv on an adapted convolution (LoRA layer or casting "
                       "hooks) runs the PyTorch reference (dense convolution, same values), not the Triton kernel")
        return reference()
    if not use_triton(backend, x):
        return reference()
    _sc.check_skip_conv_args(x, x_ref, z, weight, tile, threshold, padding)
    pad = list(padding) if isinstance(padding, (tuple, list)) else [padding, padding]
    if not counting:
        active, affected = _skip_conv_op(x, x_ref, z, weight, bias, tile, float(threshold), pad)
        return z, x_ref, active, affected
    op = "skip_conv"

    def key():
        return (x.dtype, x.device.type, (x.shape[1], weight.shape[0], weight.shape[-1], tile, bias is not None,
                                         _layout(x), _layout(x_ref), _layout(z), _layout(weight)))

    if backend == "auto" and _on_reference(op, key):
        return reference()
    # What Triton specializes and loads the three kernels on (z's and bias's shapes follow from x's
    # and weight's, checked). Addresses are read on the host, no device read; an operand off 16-byte
    # alignment (a view) is never counted as proven: such calls always run on a snapshot.
    aligned = not ((x.data_ptr() | x_ref.data_ptr() | z.data_ptr() | weight.data_ptr()
                    | (0 if bias is None else bias.data_ptr())) & 15)
    signature = (x.device, x.dtype, x.shape, weight.shape, bias is None, tile, x.stride(), x_ref.stride(),
                 z.stride(), weight.stride())
    with _lock:
        proven = aligned and signature in _proven
    saved = None
    if not proven:
        with torch.no_grad():
            saved = (x_ref.clone(), z.clone())
    try:
        active, affected = _skip_conv_op(x, x_ref, z, weight, bias, tile, float(threshold), pad)
    except Exception as e:
        if saved is not None:  # the caller's state back as it was before the launch
            with torch.no_grad():
                x_ref.copy_(saved[0])
                z.copy_(saved[1])
        if isinstance(e, torch.OutOfMemoryError) or not _arguments_ok(
                lambda: _sc.check_skip_conv_tensors(x, x_ref, z, weight, bias)):
            raise  # not a kernel that cannot run here: nothing registered, the state as it was
        if saved is None:
            raise _failed(op, key(), e, " on a launch signature that had run before (x_ref and z may be partly "
                          "updated, so the reference does not stand in)") from e
        if backend != "auto":
            raise _failed(op, key(), e) from e
        out = reference()  # raises if the call itself is at fault: nothing registered then
        _register(op, key(), e, stacklevel=3)
        return out
    if saved is not None and aligned:
        with _lock:
            if len(_proven) >= _PROVEN_MAX:
                _proven.clear()
            _proven.add(signature)
    _count(op, "triton")
    return z, x_ref, active, affected


def skip_conv_temporal(x, x_ref, z, weight, bias, *, tile: int, threshold: float, backend: str = "auto", conv=None):
    """One Skip-Convolution step of a (kt, 1, 1) convolution over frames on (N, C, F, H, W)
    (kernels/skip_conv.py: skip_conv_temporal_reference): (output, new x_ref, active, affected), out of
    place. PyTorch on every backend (there is no Triton kernel for it); said once when Triton was asked."""
    if use_triton(backend, x):
        _warn_once("skip_conv_temporal", "frkern: SkipConv's temporal (3, 1, 1) convolutions run the PyTorch "
                   "reference (gated, same values): there is no Triton kernel for them")
    out = _sc.skip_conv_temporal_reference(x, x_ref, z, weight, bias, tile, threshold, conv=conv)
    if not torch.compiler.is_compiling():
        _count("skip_conv_temporal", "torch")
    return out


def _cache_codec_op(op: str, triton_fn, reference_fn, t, args, backend: str):
    """A cache codec kernel (kernels/quant_cache.py): Triton where the backend picks it; under "auto"
    a Triton failure is said once and the reference (same values) runs."""
    counting = not torch.compiler.is_compiling()
    if use_triton(backend, t):
        try:
            out = triton_fn(*args)
            if counting:
                _count(op, "triton")
            return out
        except ValueError:
            raise  # bad arguments: the reference would refuse them too
        except Exception as e:  # noqa: BLE001
            if backend != "auto":
                raise
            _warn_once(op + "_failed", f"frkern: the Triton {op} kernel failed ({type(e).__name__}: {e}); "
                       "the PyTorch reference runs instead")
    out = reference_fn(*args)
    if counting:
        _count(op, "torch")
    return out


def quantize_cache(x, fmt: str, scales: str, group_size: int, *, backend: str = "auto"):
    """(q, float32 scales) of a cached tensor (kernels/quant_cache.py)."""
    return _cache_codec_op("quantize_cache", _qc.quantize_triton, _qc.quantize_reference, x,
                           (x, fmt, scales, group_size), backend)


def dequantize_add(x, q, scale, group_size: int, *, backend: str = "auto"):
    """x + the cached tensor (q, scale) decoded to x's dtype, in one pass on Triton (kernels/quant_cache.py)."""
    if use_triton(backend, x) and torch.compiler.is_compiling():
        return _dequantize_add_op(x, q, scale, group_size)
    return _cache_codec_op("dequantize_add", _qc.dequantize_add_triton, _qc.dequantize_add_reference, x,
                           (x, q, scale, group_size), backend)


def dequantize_cache(q, scale, dtype, group_size: int, *, backend: str = "auto"):
    """The cached tensor back in `dtype` (kernels/quant_cache.py)."""
    return _cache_codec_op("dequantize_cache", _qc.dequantize_triton, _qc.dequantize_reference, q,
                           (q, scale, dtype, group_size), backend)
