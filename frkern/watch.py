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
- `changed()` is called: a patched model's `load_lora_adapter` (diffusers' LoRA loading) calls it,
  since a hotswap (`load_lora_weights(..., hotswap=True)`) copies the new adapter's weights in
  through `.data` into the same storage, under the same adapter name and scaling.
The one change it cannot see: other in-place edits through `.data` (or `torch.no_grad()` edits of
inference-mode tensors, which have no version counter) that keep the same storage. In diffusers
and peft only merging and hotswapping do that, and both are covered (peft's
`hotswap_adapter_from_state_dict` called directly, not through diffusers, is not); a user who does
must call `handle.reset()`.

Storage hooks: diffusers' layerwise casting (`enable_layerwise_casting`: weights stored in a small
dtype, upcast for each call and stored back) and group offloading, and accelerate's offloading
hooks, give the parameters of the modules they manage a new storage on every call with the same
values. Those parameters are watched by identity and version counter only (in-place updates,
replacement and adapters are still seen; a user's `p.data = ...` on them is not). Whether a module
has such a hook is looked up when the parameters are listed and again whenever the hashed storage
moved, so hooks installed after patching are found on the first call they run in (that call, whose
weights were just re-stored in another dtype, computes in full).
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


_STORAGE_HOOKS = ("layerwise_casting", "group_offloading")  # diffusers' HookRegistry names


def _restores_storage(module: nn.Module) -> bool:
    """Does a hook give this module's parameters new storage on each call (same values)?"""
    while "original" in module.__dict__:  # a frkern wrapper stands in the tree for the hooked module
        module = module.__dict__["original"]
    d = module.__dict__
    registry = d.get("_diffusers_hook")
    hooks = getattr(registry, "hooks", None)
    if isinstance(hooks, dict) and any(name in hooks for name in _STORAGE_HOOKS):
        return True
    hf_hook = d.get("_hf_hook")  # accelerate: AlignDevicesHook(offload=True), CpuOffload, ...
    # (a SequentialHook, from add_hook_to_module(..., append=True), holds several)
    hooks = [hf_hook, *getattr(hf_hook, "hooks", ())] if hf_hook is not None else []
    return any(getattr(h, "offload", False) is True or type(h).__name__ == "CpuOffload" for h in hooks)


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
        self._pointed: list[torch.Tensor] = []  # parameters whose storage pointers are hashed
        self._hooked_ids = 0  # which parameters storage hooks manage (watched by version only)
        self._pointers = None
        self._changes = 0  # changed() calls: edits no counter above sees (a LoRA hotswap)
        # submodules (not the model itself) under storage hooks: their hooks run inside the forward
        self.inner_storage_hooks: list[str] = []

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
        self._find_storage_hooks()

    def _find_storage_hooks(self) -> None:
        named = list(self.model.named_modules(remove_duplicate=False))
        hooked_modules = [(name, m) for name, m in named if _restores_storage(m)]
        hooked = {id(p) for _, m in hooked_modules for p in m.parameters()}
        self.inner_storage_hooks = [name for name, _ in hooked_modules if name]
        self._pointed = [p for p in self.params if id(p) not in hooked]
        self._hooked_ids = hash(tuple(sorted(hooked)))
        self._pointers = hash(tuple(map(_DATA_PTR, self._pointed)))

    def storage(self) -> int:
        """Where every parameter's storage is, those under storage hooks included (a CUDA graph reads
        them at the addresses it was captured with). Valid after token()."""
        if len(self._pointed) == len(self.params):
            return self._pointers
        return hash(tuple(map(_DATA_PTR, self.params)))

    def token(self) -> tuple:
        if self._epoch != _epoch[0]:
            self.refresh()
        pointers = hash(tuple(map(_DATA_PTR, self._pointed)))
        if pointers != self._pointers:  # storage moved: a storage hook installed since the listing?
            self._find_storage_hooks()
            pointers = self._pointers
        return (
            self._ids,
            self._hooked_ids,
            sum(map(_VERSION, self._versioned)),
            pointers,
            tuple(map(_adapter_state, self._tuners)) if self._tuners else (),
            self._changes,
        )

    def changed(self) -> None:
        """The weights changed in a way the token cannot see: every later token differs."""
        self._changes += 1
