"""Independent plain-PyTorch statement of Faster Diffusion's "encoder propagation" (Li et al.,
"Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models", arXiv 2312.09608),
on an *unpatched* diffusers UNet2DConditionModel. It shares no code with frkern (nor with the
paper's repository: it is written from the definition below).

The definition. The UNet's "encoder" is conv_in, every down block and the mid block. On a key
step the whole UNet runs and the encoder's outputs are kept: conv_in's output, each down block's
full output (its hidden states and its tuple of res samples, i.e. every skip connection the
decoder will read) and the mid block's output. On a non-key step the encoder does not run: those
recorded outputs stand in for it, while everything else runs at the current call's inputs: the
time embedding (time_proj + time_embedding, with the *current* timestep, plus class / added
embeddings where the model has them), every up block (with the current encoder_hidden_states for
cross-attention and the current time embedding), conv_norm_out, conv_act and conv_out. The noisy
sample only enters the UNet through conv_in, so a non-key output depends on the current call only
through its timestep, its text conditioning and the other decoder-side arguments.

What the paper's code caches (hutaiHang/Faster-Diffusion, utils_sd.py at 1b25d83,
register_faster_forward, lines 778-781 and 804-806) is exactly this: the tuple of skip
connections (conv_in output + every res sample) and the mid block output. Its non-key steps
recompute the time embedding at the current t (lines 647-679 run before the key/non-key branch).

Where this statement and that code can differ (neither matters for a plain SD UNet):
  * ControlNet residuals. diffusers adds ``down_block_additional_residuals`` /
    ``mid_block_additional_residual`` to the down/mid outputs *after* those modules return. Here
    the recorded values are the module outputs, so residuals passed at a non-key call are added
    on top of them again; the paper's code caches the sums and ignores residuals on non-key steps.
  * T2I-Adapter intra-block residuals are added in place by diffusers after a down block returns;
    this statement stores and replays clones, so the replay is the module output plus the
    current call's adapter residual (never an accumulation).

Key steps of the paper's code for 50-step SD (``mod='50ls'``): step indices (positions in
``scheduler.timesteps``, 0-based) ``FASTER_DIFFUSION_SD50_KEYS``; its uniform option
``mod=N`` makes every index with ``i % N == 0`` a key step (:func:`uniform_keys`).

Correctness of the values is the point, not speed; still, on a non-key call the encoder modules
genuinely do not run (their ``forward`` is swapped for a replay while the call is a non-key one),
which the tests check with hooks on inner modules.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

# Step indices (0-based positions in scheduler.timesteps) of the paper's '50ls' key steps; for
# DDIM-50 with SD's scheduler config (steps_offset=1, leading spacing) these are the timesteps
# 981, 961, 941, 921, 881, 781, 681, 481, 281.
FASTER_DIFFUSION_SD50_KEYS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def uniform_keys(num_steps: int, every: int) -> tuple[int, ...]:
    """Key step indices of the uniform option: i is a key step iff i % every == 0."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return tuple(i for i in range(num_steps) if i % every == 0)


def _clone_tree(x: Any) -> Any:
    """Clone every tensor of a (nested tuple / list of) tensors; other leaves pass through."""
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    return x


class EncoderPropagationHooks:
    """Encoder propagation on an unpatched UNet2DConditionModel.

    Set ``hooks.keyframe`` (bool) before each UNet call. On a keyframe call the encoder units
    (conv_in, each down block, the mid block) run and their outputs are recorded; on a
    non-keyframe call they do not run and the recorded outputs are returned in their place.
    Everything else in the UNet's forward runs as usual.

    Attributes:
      keyframe: bool, set by the caller (default True).
      unit_names: module paths of the encoder units, in the order a forward reaches them.
      store: module path -> output recorded on the last keyframe (a clone).
      ran: module path -> how many times the unit's real forward ran (for checks).
    """

    def __init__(self, unet):
        self.unet = unet
        self.keyframe = True
        self.store: dict[str, Any] = {}
        self.ran: dict[str, int] = {}
        self._key_input_shape: torch.Size | None = None
        self._saved: list[tuple[torch.nn.Module, bool, Any]] = []

        units = [("conv_in", unet.conv_in)]
        units += [(f"down_blocks.{i}", blk) for i, blk in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            units.append(("mid_block", unet.mid_block))
        self.unit_names = [name for name, _ in units]
        for name, module in units:
            self._install(name, module)

    def _install(self, name: str, module: torch.nn.Module) -> None:
        had_own = "forward" in module.__dict__
        self._saved.append((module, had_own, module.__dict__.get("forward")))
        real_forward = module.forward  # bound method (or a previous instance override)
        self.ran[name] = 0

        def forward(*args, **kwargs):
            if name == "conv_in":
                self._check_input(args[0] if args else kwargs["input"])
            if self.keyframe:
                out = real_forward(*args, **kwargs)
                self.ran[name] += 1
                # A clone: diffusers may add T2I-Adapter residuals in place to what a down block
                # or the mid block returns, which must not reach the record.
                self.store[name] = _clone_tree(out)
                return out
            if name not in self.store:
                raise RuntimeError(
                    f"EncoderPropagationHooks: non-keyframe call before any keyframe ({name})")
            return _clone_tree(self.store[name])

        # An instance attribute shadows the class's forward: nn.Module.__call__ calls self.forward.
        module.forward = forward

    def _check_input(self, sample: torch.Tensor) -> None:
        if self.keyframe:
            self._key_input_shape = sample.shape
        elif self._key_input_shape is not None and sample.shape != self._key_input_shape:
            raise ValueError(
                "EncoderPropagationHooks: a non-keyframe call's sample has shape "
                f"{tuple(sample.shape)}, the last keyframe's had {tuple(self._key_input_shape)}")

    def remove(self) -> None:
        """Restore every unit's forward and drop the records."""
        for module, had_own, own in reversed(self._saved):
            if had_own:
                module.forward = own
            else:
                del module.forward
        self._saved = []
        self.store = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _sample_of(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


@torch.no_grad()
def encoder_propagation_reference(unet, calls: Sequence[dict], keys: Iterable[int]) -> list[torch.Tensor]:
    """Run ``unet(**calls[i])`` for each i with keyframe = (i in keys); return the outputs.

    ``calls`` are UNet keyword arguments (sample, timestep, encoder_hidden_states, ...). Call 0
    must be a key step (there is nothing to propagate before it). The hooks are removed before
    returning, so the UNet is left unpatched.
    """
    keys = set(keys)
    if calls and 0 not in keys:
        raise ValueError("the first call must be a key step")
    outs = []
    with EncoderPropagationHooks(unet) as hooks:
        for i, kwargs in enumerate(calls):
            hooks.keyframe = i in keys
            outs.append(_sample_of(unet(**kwargs)))
    return outs
