"""Batched reuse calls: EncoderPropagation's parallel decoding (Faster Diffusion).

A non-key call of encoder propagation reads nothing of its sample: the decoder's inputs are the
cached encoder outputs, the call's text conditioning and its own timestep. So the decoders of the
next n - 1 non-key steps can run now, batched with this one: every cached segment output is tiled
n times along the batch, the timesteps of the n steps (from the tracked scheduler) are laid out
one per copy, the other batch-leading inputs are tiled too, and the output's n chunks are this
call's and the next calls' outputs. A later call returns its chunk only if it passes what the
batched call assumed: the same step, the same conditioning tensors (identity, not edited in place
since) and the same call signature (the sample's and conditioning's shapes, dtypes and devices,
the weights, the call options); otherwise everything precomputed is dropped and the call runs as usual. A keyframe drops it too:
it was decoded from the features the keyframe replaces.

Runs sequentially (no batching) when a call carries inputs only that step can know (ControlNet /
T2I-Adapter residuals, cross-attention kwargs), under CUDA graphs, without exactly one tracked
scheduler of order 1 (a hand-written loop: frkern does not know the next timesteps), or when the
next step is a key step. Knows the runtime's `reads` and `ahead`, nothing of policies.
"""
from __future__ import annotations

import torch

from .family import Call
from .tracking import _position
from .trees import iter_tensors, map_tensors

# per-call inputs whose future values a batched call cannot know
STEP_ONLY = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
             "cross_attention_kwargs", "attention_mask", "encoder_attention_mask")


def _tile(value, n: int):
    """n copies of every batch-leading tensor along the batch."""
    return map_tensors(lambda t: t.repeat(n, *([1] * (t.dim() - 1))) if t.dim() else t, value)


def _same_tensor(t) -> tuple:
    # identity and version counter: an in-place edit (a callback scaling prompt_embeds) moves the
    # counter. Inference-mode tensors have none; diffusers' pipelines run under no_grad.
    return (id(t), None if not isinstance(t, torch.Tensor) or t.is_inference() else t._version)


def _inputs_key(call: Call) -> tuple:
    """What a precomputed output assumed of its call: the conditioning tensors, by identity and
    version (not changed in place since)."""
    return (_same_tensor(call.context),
            tuple(sorted((k, tuple(map(_same_tensor, iter_tensors(v)))) for k, v in call.kwargs.items())))


def scheduler_of(handle):
    """The one tracked scheduler driving the handle (order-1 samplers only), or None."""
    trackers = list(handle._trackers.values())
    if len(trackers) != 1:
        return None
    scheduler = trackers[0].scheduler
    if int(getattr(scheduler, "order", 1) or 1) != 1 or not isinstance(getattr(scheduler, "timesteps", None), torch.Tensor):
        return None
    return scheduler


def steps_ahead(handle, width: int) -> int:
    """How many calls (this one included) the current non-key call may decode at once."""
    rt = handle.runtime
    schedule = [rt.policy.plan(s, rt.num_steps) for s in range(rt.step + 1, min(rt.step + width, rt.num_steps))]
    n = 1
    for p in schedule:
        if p.keyframe or not p.runs_network:
            break
        n += 1
    return n


def run_batched(handle, call: Call, call_sig, n: int, scheduler) -> torch.Tensor:
    """This call's output; the next n - 1 steps' outputs are stored in runtime.ahead."""
    rt, batch = handle.runtime, call.sample.shape[0]
    timesteps = scheduler.timesteps[rt.step: rt.step + n].to(call.sample.device)
    for unit, (value, sig) in list(rt.reads.items()):  # every cached segment output, n copies
        shape = (sig[0][0] * n,) + tuple(sig[0][1:])
        rt.reads[unit] = (_tile(value, n), (shape,) + tuple(sig[1:]))
    tiled = Call(_tile(call.sample, n), timesteps.repeat_interleave(batch), _tile(call.context, n),
                 call.args, _tile(call.kwargs, n))
    out = handle.family.run(handle.executor.network, tiled)
    chunks = out.chunk(n)
    key = _inputs_key(call)
    for j in range(1, n):
        rt.ahead[(rt.slot, rt.step + j)] = (chunks[j].clone(), key, call_sig)
    rt.stats["decoded_ahead"] += n - 1
    return chunks[0]


def can_batch(handle, call: Call) -> bool:
    return (handle.graphs is None and not any(k in call.kwargs and call.kwargs[k] is not None for k in STEP_ONLY)
            and not call.args)


def take(handle, call: Call, call_sig):
    """The output computed ahead for this call, or None (what was computed ahead is then dropped
    if it cannot apply to this call)."""
    rt = handle.runtime
    entry = rt.ahead.pop((rt.slot, rt.step), None)
    if entry is None:
        return None
    out, key, sig = entry
    scheduler = scheduler_of(handle)
    step_ok = scheduler is not None and _position(call.timestep, scheduler.timesteps) == rt.step
    # the call signature holds the sample's and conditioning's signatures, the weights and options
    if not (step_ok and sig == call_sig and key == _inputs_key(call)):
        rt.ahead.clear()  # this call is not the one it was computed for: nothing ahead applies
        rt.stats["ahead_dropped"] += 1
        return None
    return out

