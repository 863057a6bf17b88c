"""Auto-FR: learn which steps are keyframes (FRDiff, REFERENCE §1.3).

One logit per step after the first (step 0 is always a keyframe), shared by all reuse units. The
sampler runs with every unit computed fresh and blended with its value from the previous step,
    value_t = a_t * fresh_t + (1 - a_t) * value_{t-1},    a_t = round(sigmoid(g_t)) forward,
with the straight-through gradient of sigmoid backward, so a_t = 0 is exactly feature reuse from
the last keyframe and a_t = 1 a keyframe. With jumps=True a second logit per step chooses, on
non-keyframes, between feature reuse (b_t = 1) and a reduced-NFE jump (b_t = 0: the last keyframe's
output, as score mixing's lambda = 0 steps do):
    eps_t = (a_t + (1 - a_t) b_t) * net_t + (1 - a_t)(1 - b_t) * eps_key,
    eps_key <- a_t * net_t + (1 - a_t) * eps_key.
Loss (scale-free): MSE(final sample, full-compute sample from the same noise and conditioning) /
mean(full-compute sample^2) + w * (sum_t relu(2 sigmoid(g_t) - 1) + fr_cost * sum_t (1 - a_t)
relu(2 sigmoid(f_t) - 1)), fr_cost = the cost of a reuse step relative to a full one. The kept
result is the best iterate, not the last: the lowest loss of its hard gates on a fixed held-out batch
(validate=True; each distinct schedule is sampled once there), or on its own training batch. A search
may start from a fixed schedule (init_policy, e.g. FRDiff with score mixing, its lambda rounded to a
jump or feature reuse), which is then iterate 0 and so a candidate itself. During the search the model
is patched, frozen and in eval mode; afterwards, and after any failure, it is as it was. Calibration
is data-free (the caller draws conditioning and noise); every step's network call is checkpointed, so
memory holds one step's activations plus the cached features of each step.

The samplers (reference, gated, held-out check) are the diffusers pipeline loop, so a searched policy
scores in frkern.patch(pipe, policy) what the search measured: latents = noise * init_noise_sigma; per
step the CFG batch [x; x] through scheduler.scale_model_input, the network, u + g (c - u) over
[uncond; cond], and scheduler.step(guided, t, x, **extra), where extra holds `eta` and `generator` when
step accepts them (as pipelines' prepare_extra_step_kwargs does). Step noise (Euler-ancestral, SDE
solvers, DDIM eta > 0) comes from step_generator(batch seed), made afresh for each run, so the
reference and every gated run of one batch see the same noise. Only the network call and the blend
are recomputed in backward; scheduler.step runs once per step, so stateful multistep schedulers work.
Supported: any scheduler that evaluates the network once per step (order 1, `steps` timesteps), e.g.
DDIM, DDPM, Euler, Euler-ancestral, LMS, DEIS, DPM-Solver++ (multistep, singlestep, SDE), UniPC; the
tests replay searched policies through StableDiffusionPipeline with DDIM (eta 0 and 0.5), DPM-Solver++
2M, Euler, Euler-ancestral and UniPC. Two-evaluation samplers (Heun, KDPM2) and PNDM (one timestep more
than steps) are refused before the model changes.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .dispatch import handle_of, patch, unpatch
from .policies import FRDiff, Keyframes, Policy
from .runtime import OFF, UnitMode

# conditions(generator) -> (noise, encoder_hidden_states for the CFG batch [uncond; cond], unet kwargs)
Conditions = Callable[[torch.Generator], tuple]


@dataclasses.dataclass
class SearchResult:
    policy: Keyframes  # the best iterate's
    gate_probs: list[float]  # sigmoid(g_t) for steps 1..N-1, at the end
    history: list[dict]
    reuse_probs: list[float] = dataclasses.field(default_factory=list)  # sigmoid(f_t) with jumps
    best_iter: int = -1

    def to_json(self) -> str:
        return json.dumps({"policy": json.loads(self.policy.to_json()), "gate_probs": self.gate_probs,
                           "reuse_probs": self.reuse_probs, "best_iter": self.best_iter,
                           "history": self.history}, indent=1)


def hard_schedule(policy: Policy, steps: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(keyframes, jumps) of a feature-reuse policy over `steps` steps, as the gated sampler can run it:
    plan.keyframe -> keyframe; a score-mixing weight below 1/2 -> jump (its lambda rounded to 0),
    otherwise feature reuse (rounded to 1)."""
    if not isinstance(policy, (FRDiff, Keyframes)):
        raise ValueError(f"Auto-FR can start only from a feature-reuse policy (FRDiff, Keyframes), got {policy!r}")
    keys, jumps = [], []
    for step, plan in enumerate(policy.schedule(steps)):
        if plan.keyframe:
            keys.append(step)
        elif plan.mix < 0.5:
            jumps.append(step)
    return tuple(keys), tuple(jumps)


def schedule_gates(keyframes, jumps, steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The hard gates (a, b) of steps 1..steps-1 for a (keyframes, jumps) schedule: a = 1 on
    keyframes, b = 0 on jumps (1 elsewhere)."""
    idx = range(1, steps)
    a = torch.tensor([float(i in keyframes) for i in idx], device=device)
    b = torch.tensor([float(i not in jumps) for i in idx], device=device)
    return a, b


def hard_loss(rel_mse: float, keyframes, jumps, steps: int, penalty: float, fr_cost: float, with_jumps: bool) -> float:
    """The search's loss for hard gates: rel. MSE + w * (keyframes after step 0 + fr_cost * reuse steps
    when jumps are searched) - what the soft penalty is at saturated gates."""
    reuse = steps - len(keyframes) - len(jumps)
    return rel_mse + penalty * ((len(keyframes) - 1) + (fr_cost * reuse if with_jumps else 0.0))


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


# Step-noise seeds lie apart from the batch seeds (search: seed * 100003 + k, held-out 2**31 - 1 - seed).
STEP_NOISE_OFFSET = 2**40


def step_generator(batch_seed: int, device=None) -> torch.Generator:
    """The generator of the scheduler's step noise for the batch drawn from `batch_seed` (search makes it
    on the model's device); a sampler run consumes it, so each run gets a fresh one (a pipeline replay
    passes it as `generator`)."""
    return torch.Generator(device=device or "cpu").manual_seed(batch_seed + STEP_NOISE_OFFSET)


def new_scheduler(scheduler_factory: Callable, steps: int, device=None):
    """A fresh scheduler with its timesteps set, as a pipeline does; refuses one the samplers cannot
    follow one network evaluation per step."""
    sch = scheduler_factory()
    order = getattr(sch, "order", 1)
    sch.set_timesteps(steps, device=device)
    if order != 1 or len(sch.timesteps) != steps:
        raise ValueError(
            f"Auto-FR needs a scheduler that evaluates the network once per step (order 1, {steps} timesteps "
            f"for steps={steps}), such as DDIM, DDPM, Euler, Euler-ancestral, LMS, DPM-Solver++ or UniPC; "
            f"{type(sch).__name__} has order {order} and {len(sch.timesteps)} timesteps"
        )
    return sch


def step_kwargs(scheduler, generator=None, eta: float = 0.0) -> dict:
    """What a diffusers pipeline passes to scheduler.step besides (output, t, x): eta and generator,
    each only where step accepts it (prepare_extra_step_kwargs)."""
    accepted = inspect.signature(scheduler.step).parameters
    extra = {}
    if "eta" in accepted:
        extra["eta"] = eta
    if "generator" in accepted:
        extra["generator"] = generator
    return extra


def _model_input(sch, x, t):
    x_in = torch.cat([x, x])
    return sch.scale_model_input(x_in, t) if hasattr(sch, "scale_model_input") else x_in


def sample_full(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance, generator=None, eta=0.0):
    """The reference: full compute, no reuse (the pipeline loop). generator: the step noise's."""
    sch = new_scheduler(scheduler_factory, steps, noise.device)
    extra = step_kwargs(sch, generator, eta)
    x = noise * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            eps = handle.run_network(_model_input(sch, x, t), t, ehs, **kwargs)
            u, c = eps.chunk(2)
            x = sch.step(u + guidance * (c - u), t, x, **extra, return_dict=False)[0]
    return x


def sample_gated(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance, gates, use_checkpoint=True,
                 reuse_gates=None, generator=None, eta=0.0):
    """The gated sampler (the pipeline loop); gates[i - 1] is a_i (0-dim tensors); step 0 is computed in
    full. reuse_gates[i - 1] (optional) is b_i: on a non-keyframe, 1 = feature reuse, 0 = jump.
    generator: the step noise's (give the reference run of the batch one seeded the same)."""
    rt = handle.runtime
    sch = new_scheduler(scheduler_factory, steps, noise.device)
    extra = step_kwargs(sch, generator, eta)
    keys: list[str] = []

    # Checkpointed, so backward runs it again: it must touch nothing but its arguments (no scheduler).
    def guided_fn(t, x_in, gate, reuse, eps_key, *prev_values):
        blend = GatedBlend(gate, dict(zip(keys, prev_values)))
        rt.mode = blend
        rt.runs.clear()  # a call of its own: units count their runs from here
        try:
            eps = handle.run_network(x_in, t, ehs, **kwargs)
        finally:
            rt.mode = OFF
        new = blend.new
        if not keys:
            keys.extend(new)
        if eps_key is None:
            eps_key = eps
        elif reuse is not None:
            eps, eps_key = (gate + (1 - gate) * reuse) * eps + (1 - gate) * (1 - reuse) * eps_key, \
                gate * eps + (1 - gate) * eps_key
        u, c = eps.chunk(2)
        return (u + guidance * (c - u), eps_key, *[new[k] for k in keys])

    x, eps_key, prev = noise * sch.init_noise_sigma, None, ()
    one = torch.ones((), device=noise.device)
    for i, t in enumerate(sch.timesteps):
        gate = one if i == 0 else gates[i - 1]
        reuse = None if reuse_gates is None or i == 0 else reuse_gates[i - 1]
        x_in = _model_input(sch, x, t)
        if use_checkpoint and i > 0:
            out = checkpoint(guided_fn, t, x_in, gate, reuse, eps_key, *prev, use_reentrant=False)
        else:
            out = guided_fn(t, x_in, gate, reuse, eps_key, *prev)
        guided, eps_key, prev = out[0], out[1], out[2:]
        x = sch.step(guided, t, x, **extra, return_dict=False)[0]  # stateful: once per step, never recomputed
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
    jumps: bool = False,
    fr_cost: float = 0.33,
    init_policy: Policy | None = None,
    init_logit: float = 1.0,
    validate: bool = True,
    val_conditions: Conditions | None = None,
    eta: float = 0.0,
) -> SearchResult:
    """Search a keyframe set for `unet` (a UNet2DConditionModel, not patched).

    conditions(generator) draws one calibration batch: (noise, ehs = [uncond; cond], unet kwargs).
    scheduler_factory() returns a fresh scheduler that evaluates the network once per step (see the
    module docstring), configured as the pipeline will run it, e.g.
    `lambda: type(pipe.scheduler).from_config(pipe.scheduler.config)` (StableDiffusionPipeline rewrites
    an old config: steps_offset 1, clip_sample False). eta: what the pipeline passes to step (DDIM).
    Step noise comes from step_generator(the batch's seed): training batch k is drawn from
    seed * 100003 + k, the held-out batch from 2**31 - 1 - seed.
    jumps: also choose, per non-keyframe step, feature reuse or a reduced-NFE jump; fr_cost: a
    feature-reuse step's cost relative to a full one (the tiny model: 0.72 / 2.15 GFLOP).
    init_policy: start from this schedule (hard_schedule), logits +-init_logit; default: every gate
    at `init` (all keyframes). validate: pick the best iterate on a fixed held-out batch drawn once
    from seed (not the training batches' stream) by val_conditions (default: conditions; a larger
    batch makes the choice less noisy), else on each iteration's own batch.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if iters < 1 or lr <= 0 or penalty < 0:
        raise ValueError(f"need iters >= 1, lr > 0, penalty >= 0 (got {iters}, {lr}, {penalty})")
    if not 0 <= fr_cost <= 1:
        raise ValueError(f"fr_cost must lie in [0, 1] (a reuse step's cost relative to a full step), got {fr_cost}")
    start = None
    if init_policy is not None:
        start = hard_schedule(init_policy, steps)
        if start[1] and not jumps:
            raise ValueError(f"init_policy {init_policy!r} has jump steps {start[1]}: search with jumps=True")
        if init_logit <= 0:
            raise ValueError(f"init_logit must be > 0 (the starting gates' distance from 1/2), got {init_logit}")
    existing = handle_of(unet)
    if existing is not None:
        raise RuntimeError(f"autofr.search: this UNet is already patched (with {existing.policy}); the search "
                           f"patches it itself: call frkern.unpatch first")
    device = next(unet.parameters()).device
    new_scheduler(scheduler_factory, steps, device)  # refuses a scheduler the samplers cannot follow
    # From here on the model changes: the finally below gives it back exactly as it was.
    training = [(m, m.training) for m in unet.modules()]
    requires = [(p, p.requires_grad) for p in unet.parameters()]
    handle = None
    try:
        unet.eval().requires_grad_(False)
        handle = patch(unet, FRDiff(interval=1, score_mix=False), backend="torch")
        return _optimise(handle, conditions, scheduler_factory, device, steps=steps, iters=iters, lr=lr,
                         penalty=penalty, init=init, guidance=guidance, seed=seed, use_checkpoint=use_checkpoint,
                         progress=progress, jumps=jumps, fr_cost=fr_cost, start=start, init_logit=init_logit,
                         validate=validate, val_conditions=val_conditions, eta=eta)
    finally:
        if handle is not None and handle_of(unet) is handle:
            unpatch(unet)
        for p, r in requires:
            p.requires_grad_(r)
        for m, flag in training:
            m.training = flag


def _optimise(handle, conditions, scheduler_factory, device, *, steps, iters, lr, penalty, init, guidance, seed,
              use_checkpoint, progress, jumps, fr_cost, start, init_logit, validate, val_conditions, eta):
    """search's loop, on the patched, frozen model."""
    if start is None:
        logits = torch.full((steps - 1,), float(init), device=device)
        reuse_logits = torch.full((steps - 1,), 1.0, device=device)
    else:
        a, b = schedule_gates(*start, steps, device)
        logits, reuse_logits = init_logit * (2 * a - 1), init_logit * (2 * b - 1)
    logits.requires_grad_(True)
    reuse_logits = reuse_logits.requires_grad_(True) if jumps else None
    opt = torch.optim.Adam([logits] + ([reuse_logits] if jumps else []), lr=lr)
    history = []
    best = (float("inf"), -1, None)  # (loss of the hard gates, iteration, policy)
    if validate:  # drawn from its own stream, so no training batch repeats it
        val_seed = 2**31 - 1 - seed
        val = (val_conditions or conditions)(torch.Generator().manual_seed(val_seed))
        val_ref = sample_full(handle, scheduler_factory, *val, steps, guidance, step_generator(val_seed, device), eta)
        val_scale = val_ref.float().pow(2).mean()
        val_seen: dict = {}  # (keyframes, jumps) -> rel. MSE on the held-out batch
    it = range(iters)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="Auto-FR", mininterval=5)
    for k in it:
        batch_seed = seed * 100003 + k
        noise, ehs, kwargs = conditions(torch.Generator().manual_seed(batch_seed))
        x_ref = sample_full(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance,
                            step_generator(batch_seed, device), eta)
        gates = straight_through(logits)
        reuse = straight_through(reuse_logits) if jumps else None
        x = sample_gated(handle, scheduler_factory, noise, ehs, kwargs, steps, guidance, gates, use_checkpoint,
                         reuse_gates=reuse, generator=step_generator(batch_seed, device), eta=eta)
        # scale-free: relative to the reference sample's mean square
        mse = torch.nn.functional.mse_loss(x.float(), x_ref.float()) / x_ref.float().pow(2).mean()
        pen = gate_penalty(logits)
        if jumps:
            pen = pen + fr_cost * ((1 - gates) * torch.relu(2 * torch.sigmoid(reuse_logits) - 1)).sum()
        loss = mse + penalty * pen
        # the hard gates this iteration ran with, and their loss (what the policy would score)
        key_steps = [0] + [i + 1 for i, a in enumerate(gates.detach().tolist()) if a >= 0.5]
        jump_steps = [i + 1 for i, b in enumerate(reuse.detach().tolist())
                      if b < 0.5 and i + 1 not in key_steps] if jumps else []
        hard = hard_loss(mse.item(), key_steps, jump_steps, steps, penalty, fr_cost, jumps)
        record = {}
        if validate:
            sched = (tuple(key_steps), tuple(jump_steps))
            if sched not in val_seen:
                a, b = schedule_gates(*sched, steps, device)
                with torch.no_grad():
                    xv = sample_gated(handle, scheduler_factory, *val, steps, guidance, a, False,
                                      reuse_gates=b if jumps else None, generator=step_generator(val_seed, device),
                                      eta=eta)
                val_seen[sched] = (torch.nn.functional.mse_loss(xv.float(), val_ref.float()) / val_scale).item()
            val_loss = hard_loss(val_seen[sched], key_steps, jump_steps, steps, penalty, fr_cost, jumps)
            record = {"val_rel_mse": val_seen[sched], "val_loss": val_loss}
        score = record["val_loss"] if validate else hard
        if score < best[0]:
            best = (score, k, Keyframes(keyframes=tuple(key_steps), num_steps=steps, jumps=tuple(jump_steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"iter": k, "rel_mse": mse.item(), "penalty": pen.item(), "keyframes": len(key_steps),
                        "jumps": len(jump_steps), "hard_loss": hard, **record})
        if progress:
            it.set_postfix(rel_mse=f"{mse.item():.2e}", keyframes=len(key_steps), jumps=len(jump_steps))
    probs = torch.sigmoid(logits.detach()).tolist()
    reuse_probs = torch.sigmoid(reuse_logits.detach()).tolist() if jumps else []
    return SearchResult(best[2], probs, history, reuse_probs, best[1])
