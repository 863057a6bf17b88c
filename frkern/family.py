"""The model-family interface: everything the dispatcher needs to know about one kind of model.

The dispatcher (frkern.dispatch) is generic: it finds a family for the target, asks it for the
model, validates support, swaps in the wrappers of the family's table and calls the network
through the family's call convention. A family for diffusers transformer models (DiT, PixArt,
SD3, Flux) implements this same interface; frkern.unet2d is the UNet2DConditionModel family.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .policies import Policy


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


def _fresh(value):
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_fresh(v) for v in value)
    return value


class ModelFamily:
    """Interface; see frkern.unet2d.UNet2DFamily for the reference implementation."""

    name: str = ""
    # class of a module -> (wrapper class, the policy reuse kind that makes it cache, or None)
    unit_wrappers: dict[type, tuple[type, str | None]] = {}

    def find(self, target) -> tuple[nn.Module, Any] | None:
        """(model, pipeline or None) if `target` is, or holds, a model of this family."""
        raise NotImplementedError

    def check_supported(self, model: nn.Module) -> None:
        """Raise ValueError naming every part of `model` frkern cannot run exactly."""
        raise NotImplementedError

    def segment_paths(self, model: nn.Module, policy: Policy) -> list[str]:
        """Module paths a segment policy caches whole."""
        raise NotImplementedError

    def adaptive_gate(self, model: nn.Module, policy: Policy) -> tuple[list[str], str]:
        """(modules computed before the adaptive indicator, the module whose input it is)."""
        raise NotImplementedError

    def gated_conv_paths(self, model: nn.Module) -> list[str]:
        """Module paths of the convolutions a residual-skipping policy (SkipConv) gates."""
        raise NotImplementedError

    def bind_call(self, args: tuple, kwargs: dict) -> tuple[Call, bool]:
        """(the call by role, return_dict) from the model forward's arguments."""
        raise NotImplementedError

    def call_options(self, call: Call) -> tuple:
        """Hashable options of a call that change its result but not its shapes."""
        return ()

    def mutates_outputs(self, call: Call) -> bool:
        """Does the model's forward change its blocks' outputs in place on this call? (Then a
        cached segment hands out copies.)"""
        return False

    def run(self, network, call: Call) -> torch.Tensor:
        """The output tensor of `network` (the model's original forward) for `call.fresh()` (every
        run its own argument containers)."""
        raise NotImplementedError

    def wrap_output(self, out: torch.Tensor, return_dict: bool):
        raise NotImplementedError
