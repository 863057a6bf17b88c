"""The feature cache: every tensor frkern keeps between UNet calls lives here.

Entries are keyed by (call slot, unit name). A unit run more than once in one call (diffusers'
split inference runs a block once per chunk of the batch) keys its later runs "unit#2", "unit#3",
...: each run reads back what the same run stored (`run_key`), and shares its unit's flags
(`unit_of`). Each entry remembers the generation it was written
in and a signature of the inputs that produced it (shape, dtype, device); a read with any of those
different returns None, and the caller recomputes. A stale feature is never returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch

from .trees import iter_tensors


_RUN = "#"


def run_key(unit: str, run: int) -> str:
    """The cache key of the run-th run (0-based) of `unit` within one call."""
    return unit if run == 0 else f"{unit}{_RUN}{run + 1}"


def unit_of(key: Hashable) -> Hashable:
    """The unit a key made by run_key belongs to."""
    return key.partition(_RUN)[0] if isinstance(key, str) else key


def signature(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device)


@dataclass
class _Entry:
    value: Any
    sig: tuple
    generation: int


class FeatureCache:
    """codec (frkern.cache_format.Codec, or None: stored as given): what is put is encoded, what is
    read is decoded; the entries hold the encoded form."""

    def __init__(self, codec=None):
        self._entries: dict[Hashable, _Entry] = {}
        self.generation = 0
        self.codec = codec

    def new_generation(self) -> int:
        """Drop everything; reads from earlier generations are impossible from here on."""
        self._entries.clear()
        self.generation += 1
        return self.generation

    def put(self, key: Hashable, value: Any, sig: tuple, memo: dict | None = None) -> None:
        """memo: shared by the puts of one commit (see Codec.encode)."""
        value = value if self.codec is None else self.codec.encode(value, memo)
        self._entries[key] = _Entry(value, sig, self.generation)

    def _value(self, e: _Entry) -> Any:
        return e.value if self.codec is None else self.codec.decode(e.value)

    def get(self, key: Hashable, sig: tuple) -> Any | None:
        e = self._entries.get(key)
        if e is None or e.generation != self.generation or e.sig != sig:
            return None
        return self._value(e)

    def has(self, key: Hashable, sig: tuple) -> bool:
        e = self._entries.get(key)
        return e is not None and e.generation == self.generation and e.sig == sig

    def slot_view(self, slot, skip=(), only=None, encoded=()) -> dict:
        """unit -> (value, signature) of every current-generation entry of call slot `slot`, but
        the units in `skip` (and, given `only`, those not in it); the units in `encoded` get their
        value as stored (their consumers decode it)."""
        return {
            key[1]: (e.value if unit_of(key[1]) in encoded else self._value(e), e.sig)
            for key, e in self._entries.items()
            if key[0] == slot and e.generation == self.generation and unit_of(key[1]) not in skip
            and (only is None or unit_of(key[1]) in only)
        }

    def drop_slot(self, slot, keep=()) -> None:
        for key in [k for k in self._entries if k[0] == slot and unit_of(k[1]) not in keep]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for e in self._entries.values():
            for t in iter_tensors(e.value):
                # one tensor stored under two keys (or a view of it) is counted once; meta tensors
                # (cost estimates) have no addresses, only identities
                key = id(t) if t.device.type == "meta" else (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
        return total
