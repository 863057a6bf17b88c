"""What the cache is validated against besides the inputs: the model's weights.

A cached feature is valid only while every parameter that produced it is the same. The token that
`WeightsWatch.token()` returns changes when
- a parameter is updated in place through autograd-visible ops (its version counter moves),
- a parameter's storage is replaced or two are swapped (`p.data = ...`, `.to(...)`, `swap_tensors`):
  the data pointers are hashed in order, so a swap changes the hash even though their sum does not,
- a Parameter object or a submodule is replaced (`conv.weight = nn.Parameter(...)`,
  `load_state_dict(assign=True)`, a LoRA layer injected or unloaded): torch's global registration
  hooks bump `structure_epoch()`, and the next token re-lists the parameters;
- a peft adapter is switched, scaled, disabled, merged or unmerged (its layers' state is part of
  the token: merging edits weights through `.data`, which no version counter sees).
The one change it cannot see: in-place edits through `.data` (or `torch.no_grad()` edits of
inference-mode tensors, which have no version counter) that keep the same storage. Nothing does
that in diffusers or peft except merging, which is covered; a user who does must call
`handle.reset()`.
"""
from __future__ import annotations

import operator
import sys
import weakref
from typing import Any

import torch
from torch import nn

_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_epoch = [0]
# Modules of watched models. Registrations elsewhere (diffusers slices ModuleLists inside its
# forwards, which registers into a new container on every call) do not count.
_watched: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _bump(module, _name, _value) -> None:
    # Inside a traced forward (diffusers slicing a ModuleList) this must leave no guard on
    # _watched: patching another model would recompile every compiled one.
    if torch.compiler.is_compiling():
        return
    if module in _watched:
        _epoch[0] += 1  # returns None: the hook changes nothing it is shown


def structure_epoch() -> int:
    """Bumped whenever a module of a watched model registers a parameter, buffer or submodule."""
    return _epoch[0]


nn.modules.module.register_module_parameter_registration_hook(_bump)
nn.modules.module.register_module_buffer_registration_hook(_bump)
nn.modules.module.register_module_module_registration_hook(_bump)


def _tuner_layer_class():
    # Only if the user imported peft: frkern never imports it itself.
    mod = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(mod, "BaseTunerLayer", None) if mod is not None else None


def _adapter_state(layer) -> tuple:
    scaling = getattr(layer, "scaling", None)
    return (
        tuple(layer.active_adapters),
        bool(layer.disable_adapters),
        tuple(layer.merged_adapters),
        tuple(scaling.items()) if isinstance(scaling, dict) else (),
    )


class WeightsWatch:
    """Fingerprint of a model's weights, cheap enough to take on every call."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._epoch: int | None = None  # parameters are listed lazily (the model may still be in construction)
        self.params: list[torch.Tensor] = []
        self._versioned: list[torch.Tensor] = []
        self._tuners: list[Any] = []
        self._ids = 0

    def refresh(self) -> None:
        """Re-list the parameters and adapter layers; let modules that bind to their children rebind."""
        self._epoch = structure_epoch()
        self.params = list(self.model.parameters())
        # Inference tensors have no version counter (reading it raises).
        self._versioned = [p for p in self.params if not p.is_inference()]
        self._ids = hash(tuple(map(id, self.params)))
        tuner = _tuner_layer_class()
        modules = list(self.model.modules())
        _watched.update(modules)
        self._tuners = [m for m in modules if isinstance(m, tuner)] if tuner is not None else []
        for m in modules:
            rebind = getattr(type(m), "rebind", None)
            if rebind is not None:
                rebind(m)

    def token(self) -> tuple:
        if self._epoch != _epoch[0]:
            self.refresh()
        ps = self.params
        return (
            self._ids,
            sum(map(_VERSION, self._versioned)),
            hash(tuple(map(_DATA_PTR, ps))),
            tuple(map(_adapter_state, self._tuners)) if self._tuners else (),
        )
