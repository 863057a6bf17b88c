"""Independent plain-PyTorch statement of Faster Diffusion's "prior noise injection" (Li et al.,
arXiv 2312.09608; hutaiHang/Faster-Diffusion), alone and together with encoder propagation
(tests/reference_encoder_propagation.py). It shares no code with frkern.

The definition (the authors' parallel SD and ControlNet pipelines, utils_sd.py, the demo's default):
before each ``scheduler.step(eps, t, x)`` at a timestep with ``t/1000 < 0.5`` (t < 500), the latent
given to the step is ``x + 0.003 * z_T``, where ``z_T`` is a clone of the generation's initial
latents (``prepare_latents``' output, init_noise_sigma included). Only the scheduler step's input
changes, never the UNet's. The addition accumulates: every qualifying step adds it again, and the
step's output carries it on into the following steps.

Stated here on a scheduler *instance*, with the scale and the threshold as parameters: at every call
``step(model_output, timestep, sample, ...)`` within a generation, if ``timestep < below`` the step
receives ``sample + scale * z`` in place of ``sample``, where ``z`` is (a clone of) the ``sample``
argument of the generation's first ``step`` call, taken before any injection. In text-to-image that
first ``sample`` is the pipeline's initial latents. A generation begins at ``set_timesteps`` (every
diffusers pipeline calls it once per generation, before the first step), which re-arms ``z``.

The arithmetic is literally the authors' ``x + scale * z`` (a product, then a sum, in the sample's
dtype). Where the timestep is a tensor, the choice is made with ``torch.where`` on a 0-d boolean
tensor, so it needs no device-to-host sync; both branches are exact copies of what a Python ``if``
would give (``sample`` itself, or ``sample + scale * z``), so the result is bit-identical.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch

from reference_encoder_propagation import EncoderPropagationHooks

# The authors' constants (utils_sd.py: ``if t/1000 < 0.5: x = x + 0.003*init_latents``).
AUTHORS_SCALE = 0.003
AUTHORS_BELOW = 500


def _wrap(obj: Any, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Set ``obj.<name>`` (an instance attribute) to ``make(current)``; return the undo."""
    had_own = name in obj.__dict__
    own = obj.__dict__.get(name)
    setattr(obj, name, make(getattr(obj, name)))

    def undo():
        if had_own:
            setattr(obj, name, own)
        else:
            delattr(obj, name)
    return undo


def _below(timestep: Any, below: float):
    """``timestep < below``: a 0-d bool tensor on the timestep's device for a tensor timestep (no
    sync), a Python bool for a number."""
    if torch.is_tensor(timestep):
        if timestep.numel() != 1:
            raise ValueError(f"prior noise statement: one timestep per step call, got shape {tuple(timestep.shape)}")
        return timestep.reshape(()) < below
    return bool(timestep < below)


class PriorNoiseInjection:
    """Prior noise injection on one scheduler instance (see the module docstring).

    Attributes:
      scale, below: as given.
      z: the current generation's z (None before its first step call).
      generations: one list per generation (``set_timesteps`` call), one entry per ``step`` call:
        whether that call injected (a Python bool, or a 0-d bool tensor until read; ``injected``
        reads them).
    """

    def __init__(self, scheduler, scale: float, below: float = AUTHORS_BELOW):
        self.scheduler = scheduler
        self.scale = float(scale)
        self.below = below
        self.z: torch.Tensor | None = None
        self.generations: list[list[Any]] = []
        self._undo = [_wrap(scheduler, "set_timesteps", self._wrap_set_timesteps),
                      _wrap(scheduler, "step", self._wrap_step)]

    def _wrap_set_timesteps(self, real):
        def set_timesteps(*args, **kwargs):
            self.z = None  # re-armed: the next step call's sample is the new generation's z
            self.generations.append([])
            return real(*args, **kwargs)
        return set_timesteps

    def _wrap_step(self, real):
        def step(*args, **kwargs):
            args = list(args)
            if len(args) > 2:
                sample = args[2]
            else:
                sample = kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            if not self.generations:
                raise RuntimeError("prior noise statement: scheduler.step before set_timesteps")
            if self.z is None:
                self.z = sample.detach().clone()  # before any injection
            cond = _below(timestep, self.below)
            injected = sample + self.scale * self.z
            if torch.is_tensor(cond):
                new = torch.where(cond.to(sample.device), injected, sample)
            else:
                new = injected if cond else sample
            self.generations[-1].append(cond.detach() if torch.is_tensor(cond) else cond)
            if len(args) > 2:
                args[2] = new
            else:
                kwargs["sample"] = new
            return real(*args, **kwargs)
        return step

    def injected(self, generation: int = -1) -> list[bool]:
        """Per step call of that generation: whether it injected."""
        return [bool(c) for c in self.generations[generation]]

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def inject_prior_noise(scheduler, scale: float, below: float = AUTHORS_BELOW) -> PriorNoiseInjection:
    """Wrap ``scheduler``'s ``step`` and ``set_timesteps`` (instance attributes) with the injection."""
    return PriorNoiseInjection(scheduler, scale, below)


class FasterDiffusionStatement:
    """Encoder propagation on ``pipe.unet`` (EncoderPropagationHooks: keyframe iff
    ``is_key(i)`` for the generation's i-th UNet call, 0-based) plus, unless ``scale`` is None,
    prior noise injection on ``pipe.scheduler``. ``scale=None`` is the plain encoder-propagation
    statement (no scheduler wrapper at all); ``scale=0.0`` installs the wrapper with a zero scale.

    Attributes: hooks, injection (None when scale is None), keys (one list per generation: the
    keyframe flag of each UNet call).
    """

    def __init__(self, pipe, is_key: Callable[[int], bool] | Iterable[int], scale: float | None,
                 below: float = AUTHORS_BELOW):
        if not callable(is_key):
            key_set = set(is_key)
            is_key = key_set.__contains__
        self.pipe = pipe
        self.is_key = is_key
        self.injection = None if scale is None else inject_prior_noise(pipe.scheduler, scale, below)
        self.hooks = EncoderPropagationHooks(pipe.unet)
        self.keys: list[list[bool]] = []

        def make_set_timesteps(real):
            def set_timesteps(*args, **kwargs):
                self.keys.append([])
                return real(*args, **kwargs)
            return set_timesteps

        self._undo_set_timesteps = _wrap(pipe.scheduler, "set_timesteps", make_set_timesteps)

        def pre(module, args, kwargs):
            if not self.keys:
                raise RuntimeError("statement: UNet call before set_timesteps")
            key = bool(self.is_key(len(self.keys[-1])))
            self.keys[-1].append(key)
            self.hooks.keyframe = key

        self._pre = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)

    def remove(self) -> None:
        self._pre.remove()
        self.hooks.remove()
        self._undo_set_timesteps()
        if self.injection is not None:
            self.injection.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def statement_on_a_copy(pipe, is_key, scale, below=AUTHORS_BELOW) -> FasterDiffusionStatement:
    """The statement installed on a deep copy of ``pipe`` (``.pipe`` is the copy)."""
    return FasterDiffusionStatement(copy.deepcopy(pipe), is_key, scale, below)
