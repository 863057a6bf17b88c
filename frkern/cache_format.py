"""How the feature cache stores tensors: `frkern.patch(pipe, policy, cache="int8")`.

A format is a storage choice of the runtime, not part of a policy: the same policy (a searched
Auto-FR schedule, an Adaptive threshold) runs with any format, and a policy's JSON stays what it
was. `CacheFormat` is frozen and has a JSON form of its own.

- "model" (default): tensors kept as computed (bit-identical to frkern without this option);
- "fp16" / "bf16": cast on store, cast back to the computed dtype on read;
- "int8" / "fp8_e4m3": quantized with float32 scales per (sample, channel) or per group of
  `group_size` consecutive elements of a (sample, channel) row (kernels/quant_cache.py), decoded
  on read.
Only floating tensors of 2 or more dimensions are encoded (features, the keyframe's output);
scalars and masks are stored as they are.

Where (int8 / fp8_e4m3), on the handle's backend (Triton kernels on CUDA; the torch backend runs
the same arithmetic as separate PyTorch ops):
- a ResNet's cached conv1 output (FRDiff's largest part) is encoded by the keyframe's fused
  GroupNorm (norm2, which reads it anyway) and decoded in the reuse step's GroupNorm prologue:
  no pass of its own at either end (kernels/group_norm.py);
- a cached residual branch (transformers, motion modules) is decoded inside the reuse step's
  `input + branch` (kernels/quant_cache.py dequantize_add); its encode is a pass of its own
  (its producer is a GEMM, its first consumer diffusers' add);
- everything else (segment outputs, the keyframe's output, adaptive references, T-GATE's
  attention states) is encoded when a call's states are committed (after the call) and decoded
  when a call's reads are prepared (before it): their consumers are cuDNN / cuBLAS or diffusers'
  own code. One decoded copy of those lives for the reuse call.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import ops

FORMATS = ("model", "fp16", "bf16", "int8", "fp8_e4m3")
CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZED = ("int8", "fp8_e4m3")
SCALES = ("channel", "group")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheFormat:
    """dtype: one of FORMATS; scales ("channel" or "group") and group_size apply to int8 / fp8_e4m3."""

    dtype: str = "model"
    scales: str = "channel"
    group_size: int = 64

    def __post_init__(self):
        if self.dtype not in FORMATS:
            raise ValueError(f"frkern: cache format {self.dtype!r} not supported; accepted: {', '.join(FORMATS)}")
        if self.scales not in SCALES:
            raise ValueError(f"frkern: cache scales {self.scales!r} not supported; accepted: {', '.join(SCALES)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"frkern: cache group_size must be an int >= 1, got {self.group_size!r}")

    @property
    def exact(self) -> bool:
        """Does the cache hold exactly what was computed?"""
        return self.dtype == "model"

    @property
    def name(self) -> str:
        if self.dtype in QUANTIZED:
            return f"{self.dtype}/{self.scales}" + (f"{self.group_size}" if self.scales == "group" else "")
        return self.dtype

    def to_json(self) -> str:
        return json.dumps({"cache_format": FORMAT_VERSION, **dataclasses.asdict(self)})

    @staticmethod
    def from_json(text: str) -> "CacheFormat":
        d = json.loads(text)
        version = d.pop("cache_format", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"frkern: not a cache format of version {FORMAT_VERSION}: {text[:80]!r}")
        unknown = set(d) - {f.name for f in dataclasses.fields(CacheFormat)}
        if unknown:
            raise ValueError(f"frkern: unknown cache format fields {sorted(unknown)}")
        return CacheFormat(**d)


def as_cache_format(value: Any) -> CacheFormat:
    """None -> the default; a format name -> CacheFormat(name); a CacheFormat -> itself."""
    if value is None:
        return CacheFormat()
    if isinstance(value, CacheFormat):
        return value
    if isinstance(value, str):
        return CacheFormat(value)
    raise TypeError(f"frkern.patch: cache must be a format name ({', '.join(FORMATS)}) or a frkern.CacheFormat, "
                    f"got {type(value).__name__}")


def check_device_support(fmt: CacheFormat, device: torch.device) -> None:
    """Refuse a format the torch build or the device cannot store (before anything is patched)."""
    if fmt.dtype == "fp8_e4m3":
        if not hasattr(torch, "float8_e4m3fn"):
            raise ValueError(f"frkern: cache format fp8_e4m3 needs torch.float8_e4m3fn; torch {torch.__version__} "
                             "has none")
        try:
            torch.zeros(1, device=device).to(torch.float8_e4m3fn).float()
        except Exception as e:  # noqa: BLE001 - what the device says is the reason
            raise ValueError(f"frkern: cache format fp8_e4m3 cannot be stored on {device}: {e}") from None


class Encoded(NamedTuple):
    """A tensor in a compressed format: data (cast or quantized), scales (or None), the dtype it
    decodes to, the scale group size (group scales). A tuple, so the cache's byte count sees its
    tensors."""

    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype
    group_size: int = 0


def decoded(value: Any, backend: str) -> Any:
    """A tensor as computed from an Encoded (anything else as it is)."""
    if not isinstance(value, Encoded):
        return value
    if value.scale is None:
        return value.data.to(value.dtype)
    return ops.dequantize_cache(value.data, value.scale, value.dtype, value.group_size, backend=backend)


class Codec:
    """Encodes and decodes the tensors of a cached state (any pytree of tuples, lists, dicts)."""

    def __init__(self, fmt: CacheFormat, backend: str):
        self.fmt, self.backend = fmt, backend

    @property
    def quantize(self) -> tuple[str, str, int] | None:
        """(format, scales, group size) for kernels that encode what they read (int8 / fp8), or None."""
        f = self.fmt
        return (f.dtype, f.scales, f.group_size) if f.dtype in QUANTIZED else None

    def _encodes(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.dim() >= 2 and t.dtype not in (torch.float64,)

    def encode(self, value: Any, memo: dict | None = None) -> Any:
        """memo (id of a tensor -> its encoding): one tensor stored under several keys of one commit
        (a block's output that is also its last skip connection) is encoded and stored once."""
        memo = {} if memo is None else memo
        if isinstance(value, torch.Tensor):
            if not self._encodes(value):
                return value
            key = (id(value), value.data_ptr() if value.device.type != "meta" else None, tuple(value.shape))
            if key in memo:
                return memo[key][1]
            fmt = self.fmt
            if fmt.dtype in CAST:
                enc = Encoded(value.to(CAST[fmt.dtype]), None, value.dtype, 0)
            else:
                q, scale = ops.quantize_cache(value, fmt.dtype, fmt.scales, fmt.group_size, backend=self.backend)
                enc = Encoded(q, scale, value.dtype, fmt.group_size)
            memo[key] = (value, enc)  # the tensor held too: its id stays its own while the memo lives
            return enc
        if isinstance(value, Encoded):
            return value
        if isinstance(value, tuple):
            return tuple(self.encode(v, memo) for v in value)
        if isinstance(value, list):
            return [self.encode(v, memo) for v in value]
        if isinstance(value, dict):
            return {k: self.encode(v, memo) for k, v in value.items()}
        return value

    def decode(self, value: Any) -> Any:
        if isinstance(value, Encoded):
            return decoded(value, self.backend)
        if isinstance(value, tuple):
            return tuple(self.decode(v) for v in value)
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if isinstance(value, dict):
            return {k: self.decode(v) for k, v in value.items()}
        return value


def codec_for(fmt: CacheFormat, backend: str) -> Codec | None:
    """None for the exact format: the cache then stores what it is given, untouched."""
    return None if fmt.exact else Codec(fmt, backend)
