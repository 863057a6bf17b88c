"""The model-family interface: what frkern knows about one kind of model, and the family registry.

A family describes the model only: how to find it in a pipeline, what it cannot run exactly, how a
call is bound / run / wrapped, and a map of its parts (`Parts`): the reuse units with their kind,
the ladder of levels where segment cuts lie, the modules computed before the ladder, the gated
convolutions and where the time and text conditioning come from. It knows nothing of policies:
the installers (frkern.install) turn a policy into wrappers over these parts.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .trees import map_tensors, samples


class Call(NamedTuple):
    """One call of the network, by role rather than by position."""

    sample: torch.Tensor  # the noisy latent: its signature keys the cache
    timestep: Any
    context: Any  # the conditioning (encoder hidden states), or None
    args: tuple  # every other positional argument, as given
    kwargs: dict  # every other keyword argument, as given (return_dict removed)

    def fresh(self) -> "Call":
        """The same call with new lists and dicts around its arguments (tensors shared). A forward
        may consume a container it is given (diffusers pops T2I-Adapter residuals from their
        list); frkern may run the network more than once per call (an adaptive probe and its
        resumed pass, CUDA-graph warm-up and capture), so each run gets its own containers and the
        caller's are left as they were."""
        return self._replace(args=_fresh(self.args), kwargs=_fresh(self.kwargs))

    def samples(self, n: int, lo: int, count: int) -> "Call":
        """Samples [lo, lo + count) of a call of batch n: every batch-leading tensor narrowed (the
        conditioning also when it holds several rows per sample: per-frame text states)."""
        def cut(t, rows=False):
            return samples(t, n, lo, count, rows_per_sample=rows)

        return Call(cut(self.sample), cut(self.timestep), map_tensors(lambda t: cut(t, True), self.context),
                    map_tensors(cut, self.args), map_tensors(cut, self.kwargs))


def _fresh(value):
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_fresh(v) for v in value)
    return value


@dataclass(frozen=True)
class Level:
    """One resolution level of a UNet: its down block and the up block that mirrors it.

    A layer is every module at one position of a block, in the order the forward runs them (a
    ResNet, then its spatial transformer, then its temporal module); a down block's downsampler is
    the layer after its last one. Up layers are listed in forward order too."""

    down_block: str
    down_layers: tuple[tuple[str, ...], ...]
    downsamplers: tuple[str, ...]
    up_block: str
    up_layers: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Parts:
    """A map of a model's parts, by module path (what the installers read)."""

    units: dict[str, str]  # path -> unit kind, a key of the family's `wrappers`
    entry: tuple[str, ...]  # modules computed before the first level (conv_in, a temporal input transformer)
    levels: tuple[Level, ...]  # outermost (full resolution) first
    mid: str | None  # the mid block
    gated_convs: tuple[str, ...]  # convolutions a residual-skipping policy may gate
    time_embedding: str  # the module whose output is the time embedding the blocks receive
    text_dim: int | None  # width of the text conditioning (encoder hidden states)
    notes: dict = field(default_factory=dict)  # family-specific facts the README table states

    def down_order(self) -> list[str]:
        """The modules of the way down, in the order the forward runs them."""
        order = list(self.entry)
        for level in self.levels:
            for layer in level.down_layers:
                order += layer
            order += level.downsamplers
        if self.mid is not None:
            order.append(self.mid)
        return order


class ModelFamily:
    """Interface; frkern.unet2d.UNet2DFamily is the reference implementation."""

    name: str = ""
    # unit kind -> the wrapper class that takes the place of a module of that kind (frkern.units)
    wrappers: dict[str, type] = {}

    def find(self, target) -> tuple[nn.Module, Any] | None:
        """(model, pipeline or None) if `target` is, or holds, a model of this family."""
        raise NotImplementedError

    def check_supported(self, model: nn.Module) -> None:
        """Raise ValueError naming every part of `model` frkern cannot run exactly."""
        raise NotImplementedError

    def parts(self, model: nn.Module) -> Parts:
        raise NotImplementedError

    def bind_call(self, args: tuple, kwargs: dict) -> tuple[Call, bool]:
        """(the call by role, return_dict) from the model forward's arguments."""
        raise NotImplementedError

    def call_options(self, model, call: Call) -> tuple:
        """Hashable options of a call (or settings of the model outside its weights) that change its
        result but not its shapes."""
        return ()

    def mutates_outputs(self, model, call: Call) -> bool:
        """Does the model's forward change its blocks' outputs in place on this call? (Then a
        cached segment hands out copies.)"""
        return False

    def run(self, network, call: Call) -> torch.Tensor:
        """The output tensor of `network` (the model's original forward) for `call.fresh()` (every
        run its own argument containers)."""
        raise NotImplementedError

    def wrap_output(self, out: torch.Tensor, return_dict: bool):
        raise NotImplementedError


FAMILIES: list[ModelFamily] = []
_REGISTRY_LOCK = threading.Lock()


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family to those `patch` tries (in registration order)."""
    with _REGISTRY_LOCK:
        if any(type(f) is type(family) for f in FAMILIES):
            raise ValueError(f"frkern: a {type(family).__name__} is already registered")
        FAMILIES.append(family)
    return family


def uncompiled(module):
    # torch.compile(model) returns an OptimizedModule around the model; patch the model inside (the
    # compiled wrapper calls its forward, so it picks the patch up on its next call).
    return module._orig_mod if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) else module


def find_model(target) -> tuple[ModelFamily, nn.Module, Any]:
    """(family, model, pipeline or None) for a patch target, or a TypeError saying what is accepted."""
    for family in list(FAMILIES):
        found = family.find(target)
        if found is not None:
            return (family, *found)
    inner = getattr(uncompiled(target), "unet", None)
    names = ", ".join(f.name for f in FAMILIES)
    raise TypeError(
        f"frkern.patch: expected a diffusers {names}, or a pipeline with one in .unet, "
        f"got {type(target).__name__}" + (f" (its .unet is {type(inner).__name__})" if inner is not None else "")
    )
