"""Where a patched model's forward goes: directly above the model's own forward, beneath the hooks
that accelerate and diffusers wrap around it, whether they were added before or after patching.

A model's forward may be a chain: accelerate's hooks (`enable_model_cpu_offload`,
`enable_sequential_cpu_offload`, `dispatch_model`) replace `module.forward` by a wrapper that calls
`module._old_forward`; diffusers' `HookRegistry` (group offloading, layerwise casting, its caching
hooks) replaces it by a wrapper that calls its `HookFunctionReference.forward` (or
`.original_forward`). frkern's forward takes the place of the model's own forward at the bottom of
that chain, so that
- a hook's pre_forward (onloading the weights to the execution device, ...) runs before frkern's
  step logic, exactly as it would when the hook is added after patching;
- removing a hook (diffusers' pipelines remove and re-add the offload hooks around every call)
  leaves frkern in place, and unpatching leaves the hooks in place.
A wrapper this module does not know (the DeepCache package's replaced forward, say) ends the chain:
patch refuses it rather than guess what it calls.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

from torch import nn

_ACCELERATE_WRAPPER = "add_hook_to_module.<locals>.new_forward"
_DIFFUSERS_WRAPPER = "HookRegistry.register_hook.<locals>.create_new_forward.<locals>.new_forward"


class Slot:
    """A place that holds one link of the chain: an entry of the model's __dict__ (`forward`,
    accelerate's `_old_forward`) or an attribute of a diffusers HookFunctionReference."""

    def __init__(self, owner: Any, name: str, in_dict: bool):
        self.owner, self.name, self.in_dict = owner, name, in_dict

    def get(self):
        return self.owner.get(self.name) if self.in_dict else getattr(self.owner, self.name)

    def set(self, value) -> None:
        if self.in_dict:
            self.owner[self.name] = value
        else:
            setattr(self.owner, self.name, value)


def own_forward(model: nn.Module) -> Callable:
    """The model's class forward, bound to it."""
    return type(model).forward.__get__(model)


def is_own_forward(model: nn.Module, f) -> bool:
    """The model's own forward, or one that has become it again: an unpatched frkern handle's forward
    that a wrapper kept (its owner's `passes_through(model)` says so)."""
    owner = getattr(f, "__self__", None)
    if getattr(f, "__func__", None) is type(model).forward and owner is model:
        return True
    passes_through = getattr(owner, "passes_through", None)
    return callable(passes_through) and passes_through(model) is True


def _closure_value(func, name: str):
    try:
        return func.__closure__[func.__code__.co_freevars.index(name)].cell_contents
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _next(model: nn.Module, f) -> Slot | None:
    """The slot holding what the hook wrapper `f` calls next, or None if `f` is no known wrapper."""
    if not (isinstance(f, functools.partial) and f.args[:1] == (model,)):
        return None
    qualname = getattr(f.func, "__qualname__", "")
    if qualname == _ACCELERATE_WRAPPER and "_old_forward" in model.__dict__:
        return Slot(model.__dict__, "_old_forward", True)
    if qualname == _DIFFUSERS_WRAPPER:
        ref = _closure_value(f.func, "function_reference")
        if ref is not None and hasattr(ref, "forward"):
            # a hook with a new_forward of its own calls original_forward; remove_hook restores it too
            return Slot(ref, "original_forward" if getattr(ref, "original_forward", None) is not None else "forward",
                        False)
    return None


def links(model: nn.Module) -> Iterator[tuple[Slot, Any]]:
    """(slot, what it holds) from the outermost (the model's __dict__['forward'], None when the class
    forward shows through) down to the model's own forward or the first unknown wrapper."""
    slot = Slot(model.__dict__, "forward", True)
    for _ in range(256):  # a cycle would be a bug elsewhere: stop rather than hang
        f = slot.get()
        yield slot, f
        if f is None or is_own_forward(model, f):
            return
        slot = _next(model, f)
        if slot is None:
            return


def describe(f) -> str:
    func = getattr(f, "func", f)
    return getattr(func, "__qualname__", None) or type(f).__name__


def bottom(model: nn.Module) -> Slot:
    """The slot of the model's own forward (where frkern's forward goes), or a RuntimeError naming the
    wrapper that hides it."""
    for slot, f in links(model):
        pass
    if f is None or is_own_forward(model, f):
        return slot
    raise RuntimeError(
        f"frkern.patch: the model's forward is replaced by {describe(f)}, not a hook frkern can place itself "
        "beneath (frkern knows accelerate's and diffusers' hooks); another caching helper such as the DeepCache "
        "package enabled? Disable it first"
    )


def slot_of(model: nn.Module, fn) -> Slot | None:
    """The slot in the model's chain that holds `fn`, else None (it was removed or replaced)."""
    for slot, f in links(model):
        if f is not None and (f is fn or f == fn):
            return slot
    return None


def put_back(model: nn.Module, slot: Slot, replaced) -> None:
    """Undo what frkern put in `slot`: `replaced` is what was at the bottom when it went in (the
    model's own forward, or None where the class forward showed through). A hook added since holds
    frkern beneath it: the hook gets the model's own forward."""
    if replaced is None and slot.in_dict and slot.owner is model.__dict__ and slot.name == "forward":
        model.__dict__.pop("forward", None)
    else:
        slot.set(replaced if replaced is not None else own_forward(model))
