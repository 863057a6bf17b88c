"""T-GATE's attention unit: a diffusers Attention (a transformer block's attn1 / attn2) whose output
is stored and returned per the step's AttentionModes (frkern.policies.TGate), through the unit
protocol as a stateful unit: its state is its stored output (or None), moved on at every call.

The stored value is the module's output (the attention after to_out: T-GATE's cache), so the
wrapper accepts attentions that add nothing after it (no residual connection, rescale 1: every SD /
SDXL transformer attention); install refuses others. Its signature leaves out the batch (after the
gate the call runs one CFG half and reads what the gate step averaged over both).
"""
from __future__ import annotations

import copy

from .runtime import _PICKLE_MESSAGE
from .units import _Wrapper


class TGateAttention(_Wrapper):
    reusable = True
    swap_when_not_cached = False

    def __init__(self, original, runtime, unit, cache_unit, backend):
        super().__init__(original, runtime, unit, cache_unit, backend)
        runtime.declare(unit, persistent=True)  # its stored output outlives keyframes

    # It stands where a diffusers Attention stood, and diffusers finds attentions by isinstance:
    # PAG's pipelines (which self-attentions get its processor), fuse_qkv_projections (which ones
    # fuse). isinstance falls back on __class__ when type() does not match, so the wrapper passes as
    # its original's class there; type() (frkern's own checks, copies, pickling) still says what it is.
    @property
    def __class__(self):
        return type(self.__dict__["original"])

    def _get_name(self):  # repr(model) still names the wrapper (nn.Module's repr reads __class__)
        return type(self).__name__

    # The pickler checks the class it reconstructs against __class__ and would fail on that check
    # before reaching frkern's own refusal: refuse here, with the same message. deepcopy (a copy
    # patched in its own right) reconstructs from type() as the default reduction would.
    def __reduce_ex__(self, protocol):
        raise TypeError(_PICKLE_MESSAGE)

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rt = self.runtime
        cross = encoder_hidden_states is not None
        modes = rt.attention_now
        if modes is None:  # a call outside a tracked generation: plain attention, nothing stored
            return self.run_original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        store, reuse, average = modes.cross if cross else modes.self_

        def step(state):
            if reuse and state is not None:
                return state, state
            out = self.run_original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            if not store:
                return out, state
            if average:
                if out.shape[0] % 2:
                    raise ValueError(f"frkern: T-GATE averages the two CFG halves of {self.unit}'s output at its gate "
                                     f"step, but the batch of {out.shape[0]} holds no [uncond, cond] halves (a "
                                     "pipeline without classifier-free guidance, or PAG's [uncond, cond, perturbed]?); "
                                     "patch with TGate(cfg=False)")
                uncond, cond = out.chunk(2)
                return out, (uncond + cond) / 2
            return out, out

        sig = (tuple(hidden_states.shape[1:]), hidden_states.dtype, hidden_states.device, cross)
        return rt.unit(self.unit, sig, lambda: step(None), update=step)


def tgate_supported(attention) -> str | None:
    """Why T-GATE cannot store this attention's output as T-GATE defines it, or None."""
    if getattr(attention, "residual_connection", False):
        return "it adds a residual connection after the attention"
    if getattr(attention, "rescale_output_factor", 1.0) != 1.0:
        return f"it rescales its output by {attention.rescale_output_factor}"
    return None
