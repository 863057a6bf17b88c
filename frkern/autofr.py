"""Auto-FR: learn which steps are keyframes (FRDiff, REFERENCE §1.3).

One logit per step after the first (step 0 is always a keyframe), shared by all reuse units. The
sampler runs with every unit computed fresh and blended with its value from the previous step,
    value_t = a_t * fresh_t + (1 - a_t) * value_{t-1},    a_t = round(sigmoid(g_t)) forward,
with the straight-through gradient of sigmoid backward, so a_t = 0 is exactly feature reuse from
the last keyframe and a_t = 1 a keyframe. Loss: MSE(final sample, full-compute sample from the same
noise and conditioning) + w * sum_t relu(2 sigmoid(g_t) - 1). The model is frozen and in eval mode;
calibration is data-free (the caller draws conditioning and noise); every step is checkpointed, so
memory holds one step's activations plus the cached features of each step.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .dispatch import patch, unpatch
from .policies import FRDiff, Keyframes
from .runtime import OFF, UnitMode

# conditions(generator) -> (noise, encoder_hidden_states for the CFG batch [uncond; cond], unet kwargs)
Conditions = Callable[[torch.Generator], tuple]


@dataclasses.dataclass
class SearchResult:
    policy: Keyframes
    gate_probs: list[float]  # sigmoid(g_t) for steps 1..N-1
    history: list[dict]

    def to_json(self) -> str:
        return json.dumps({"policy": json.loads(self.policy.to_json()), "gate_probs": self.gate_probs,
                           "history": self.history}, indent=1)


def straight_through(logits: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(logits)
    return s + (s.round() - s).detach()


def gate_penalty(logits: torch.Tensor) -> torch.Tensor:
    return torch.relu(2 * torch.sigmoid(logits) - 1).sum()


class GatedBlend(UnitMode):
    """The runtime mode of the gated sampler: every unit's fresh state is blended with its value
    from the previous step, value = gate * fresh + (1 - gate) * previous (differentiably)."""

    def __init__(self, gate: torch.Tensor, previous: dict):
        self.gate = gate
        self.previous = previous
        self.new: dict = {}

    def state(self, unit, fresh):
        prev = self.previous.get(unit)
        value = fresh if prev is None else self.gate * fresh + (1 - self.gate) * prev
        self.new[unit] = value
        return value


def _ddim(scheduler_factory, steps, device):
    sch = scheduler_factory()
    sch.set_timesteps(steps, device=device)
    return sch


def sample_full(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance):
    """The reference: full compute, no reuse."""
    sch = _ddim(scheduler_factory, steps, noise.device)
    x = noise
    with torch.no_grad():
        for t in sch.timesteps:
            eps = handle.run_network(torch.cat([x, x]), t, ehs, **kwargs)
            u, c = eps.chunk(2)
            x = sch.step(u + guidance * (c - u), t, x).prev_sample
    return x


def sample_gated(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance, gates, use_checkpoint=True):
    """The gated sampler; gates[i - 1] is a_i (0-dim tensors); step 0 is computed in full."""
    rt = handle.runtime
    sch = _ddim(scheduler_factory, steps, noise.device)
    keys: list[str] = []

    def step_fn(i, t, x, gate, *prev_values):
        blend = GatedBlend(gate, dict(zip(keys, prev_values)))
        rt.mode = blend
        try:
            eps = handle.run_network(torch.cat([x, x]), t, ehs, **kwargs)
        finally:
            rt.mode = OFF
        new = blend.new
        if not keys:
            keys.extend(new)
        u, c = eps.chunk(2)
        x_next = sch.step(u + guidance * (c - u), t, x).prev_sample
        return (x_next, *[new[k] for k in keys])

    x, prev = noise, ()
    one = torch.ones((), device=noise.device)
    for i, t in enumerate(sch.timesteps):
        gate = one if i == 0 else gates[i - 1]
        if use_checkpoint and i > 0:
            out = checkpoint(step_fn, i, t, x, gate, *prev, use_reentrant=False)
        else:
            out = step_fn(i, t, x, gate, *prev)
        x, prev = out[0], out[1:]
    return x


def search(
    unet,
    conditions: Conditions,
    scheduler_factory: Callable,
    *,
    steps: int = 50,
    iters: int = 100,
    lr: float = 5e-3,
    penalty: float = 1e-3,
    init: float = 0.1,
    guidance: float = 3.0,
    seed: int = 0,
    use_checkpoint: bool = True,
    progress: bool = True,
) -> SearchResult:
    """Search a keyframe set for `unet` (a UNet2DConditionModel, not patched).

    conditions(generator) draws one calibration batch: (noise, ehs = [uncond; cond], unet kwargs).
    scheduler_factory() returns a fresh deterministic scheduler (e.g. DDIM, eta 0).
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if iters < 1 or lr <= 0 or penalty < 0:
        raise ValueError(f"need iters >= 1, lr > 0, penalty >= 0 (got {iters}, {lr}, {penalty})")
    was_training = unet.training
    requires = [p.requires_grad for p in unet.parameters()]
    unet.eval().requires_grad_(False)
    handle = patch(unet, FRDiff(interval=1, score_mix=False), backend="torch")
    device = next(unet.parameters()).device
    logits = torch.full((steps - 1,), float(init), device=device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    history = []
    it = range(iters)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="Auto-FR", mininterval=5)
    try:
        for k in it:
            g = torch.Generator().manual_seed(seed * 100003 + k)
            noise, ehs, kwargs = conditions(g)
            x_ref = sample_full(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance)
            gates = straight_through(logits)
            x = sample_gated(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance, gates, use_checkpoint)
            mse = torch.nn.functional.mse_loss(x.float(), x_ref.float())
            pen = gate_penalty(logits)
            loss = mse + penalty * pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_key = 1 + int((torch.sigmoid(logits.detach()) >= 0.5).sum())
            history.append({"iter": k, "mse": mse.item(), "penalty": pen.item(), "keyframes": n_key})
            if progress:
                it.set_postfix(mse=f"{mse.item():.2e}", keyframes=n_key)
    finally:
        unpatch(unet)
        for p, r in zip(unet.parameters(), requires):
            p.requires_grad_(r)
        unet.train(was_training)
    probs = torch.sigmoid(logits.detach()).tolist()
    keyframes = (0,) + tuple(i + 1 for i, p in enumerate(probs) if p >= 0.5)
    return SearchResult(Keyframes(keyframes=keyframes, num_steps=steps), probs, history)
