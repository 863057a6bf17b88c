"""Tensors inside a call's arguments or a cached state: lists, tuples and dicts of them, walked once
here rather than by each module that tiles, splits or counts them."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """`value` with every tensor t (through lists, plain tuples and dicts) replaced by fn(t)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [map_tensors(fn, v) for v in value]
    if type(value) is tuple:
        return tuple(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in `value` (through lists, tuples, named tuples and dicts), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_tensors(v)


def samples(t: Any, n: int, lo: int, count: int, rows_per_sample: bool = False) -> Any:
    """Samples [lo, lo + count) of a batch-leading tensor of a batch of n; a tensor of another first
    dimension is returned as it is. rows_per_sample: a first dimension k * n holds k rows per sample,
    each sample's rows together (AnimateDiff's text states repeated per frame). Not a tensor (a
    Python-number timestep): as it is."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    k, rest = divmod(t.shape[0], n)
    if rest or (k != 1 and not rows_per_sample):
        return t
    return t.narrow(0, lo * k, count * k)
