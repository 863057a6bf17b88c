"""Independent statement of T-GATE composed with FRDiff feature reuse, for the tests.

Built from the `tgate` package (1.0.0) as the T-GATE part, plus instance-level forward
replacements on a deep copy of the pipeline for FRDiff, and a wrapper around the UNet call for
the keyframe flag and score mixing. Shares no code with frkern.

For a generation of N steps, step i is the i-th call of the pipeline's UNet (0-based; one call per
step; DDIM, scheduler order 1). The package's own pipeline (``pipe.tgate(...)``) drives the
denoising loop: before the gate it runs the CFG batch [uncond, cond] and applies guidance; from
step g on it runs only the B-batch of the negative (uncond) inputs and skips guidance.

Rules
-----
1. T-GATE: exactly the package's attention schedule ``tgate.tgate_utils.tgate_scheduler`` (cross
   attention cached at step g-1 as the mean of the two CFG halves and read from step g on; self
   attention cached/reused per warm_up, sp_interval, fi_interval). Each Attention keeps its own
   cache (the package's ``attn.cache``); a "reuse" flag with no cache yet computes normally and
   stores nothing (the package's behaviour).

2. FRDiff units: every ``ResnetBlock2D``'s ``conv1`` output and every ``Transformer2DModel``'s
   residual branch (its ``proj_out`` output, laid out as (B, C, H, W) as diffusers does before
   ``output = branch + residual``).
   - keyframe step: every unit runs and its value is recorded (overwriting the previous record).
   - reuse step: ``conv1`` returns the recorded tensor without running (the rest of the ResNet -
     norms, time embedding, conv2, shortcut - is recomputed); a ``Transformer2DModel`` does not
     run at all and returns ``recorded_branch + hidden_states``. Hence the T-GATE attentions in a
     reused transformer neither store nor read on that step; their caches stay as they were.

3. Keyframes (g = gate_step, M = interval):
     i <  g-1 : keyframe iff i % M == 0
     i == g-1 or i == g : keyframe
     i >  g   : keyframe iff (i - g) % M == 0
   (The grid restarts at the gate, so pre-gate (2B-batch) records are never used at or after g.)

4. Score mixing. lam(i) = clip((30 * (i / N - bias) + 2) / 4, 0, 1) in Python float (bias = 0.5;
   lam = 1 always when score_mix is False). On a keyframe the UNet output is returned as computed
   and kept as eps_key. On a reuse step:
     lam == 0 : the UNet is NOT run at all (no unit, no attention runs, stores or reads); the
                output is eps_key (the same tensor).
     lam == 1 : the output is the reuse step's UNet output eps_reuse, unchanged.
     otherwise: the output is ``lam * eps_reuse + (1 - lam) * eps_key`` computed by PyTorch in the
                noise prediction's dtype, with lam and (1 - lam) Python floats (so the fp32 ops
                are mul(eps_reuse, lam), mul(eps_key, 1 - lam), add).
   The mix is applied to the UNet's return value; the pipeline's guidance (before the gate) then
   acts on it. After the gate the B-batch output here equals frkern's duplicated uncond half.

``variant`` switches on deliberately wrong rules, used only to show the statement discriminates:
  "no_restart"        after the gate: keyframe iff i % M == 0 (grid not restarted at g)
  "shift"             after the gate: keyframe iff (i - g - 1) % M == 0 (off by one)
  "attn_store"        reused transformers still run their blocks (T-GATE attentions store/read),
                      but their output is still recorded_branch + hidden_states
  "lam_next"          lam evaluated at (i + 1) / N
"""
from __future__ import annotations

import copy

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

VARIANTS = (None, "no_restart", "shift", "attn_store", "lam_next")


def is_keyframe(i: int, gate_step: int, interval: int, variant: str | None = None) -> bool:
    g, m = gate_step, interval
    if i < g - 1:
        return i % m == 0
    if i in (g - 1, g):
        return True
    if variant == "no_restart":
        return i % m == 0
    if variant == "shift":
        return (i - g - 1) % m == 0
    return (i - g) % m == 0


def mix_weight(i: int, n: int, score_mix: bool, bias: float = 0.5) -> float:
    if not score_mix:
        return 1.0
    return min(max((30 * (i / n - bias) + 2) / 4, 0.0), 1.0)


class _State:
    def __init__(self):
        self.step = -1          # index of the current UNet call
        self.keyframe = True
        self.eps_key = None
        self.records = {}       # unit module -> recorded tensor
        self.proj_out = {}      # transformer -> its proj_out output in the current call
        self.log = []           # (step, keyframe, lam, ran)


def _install_frdiff(unet, state: _State, variant):
    for m in list(unet.modules()):
        if isinstance(m, ResnetBlock2D):
            _patch_conv1(m.conv1, state)
        elif isinstance(m, Transformer2DModel):
            _patch_transformer(m, state, variant)


def _patch_conv1(conv, state: _State):
    run = conv.forward

    def forward(x):
        if state.keyframe:
            y = run(x)
            state.records[conv] = y
            return y
        y = state.records[conv]
        assert y.shape[0] == x.shape[0], "a record of another batch (pre-gate record after the gate)"
        return y

    conv.forward = forward


def _patch_transformer(tr, state: _State, variant):
    assert tr.is_input_continuous
    run = tr.forward
    tr.proj_out.register_forward_hook(lambda mod, args, out: state.proj_out.__setitem__(tr, out))

    def forward(hidden_states, *args, return_dict=True, **kwargs):
        if state.keyframe:
            out = run(hidden_states, *args, return_dict=return_dict, **kwargs)
            sample = out[0] if not return_dict else out.sample
            b, _, h, w = hidden_states.shape
            branch = state.proj_out.pop(tr)
            if branch.ndim == 3:  # linear projection: (B, HW, C) -> (B, C, H, W) as diffusers lays it
                branch = branch.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            # the recorded branch is exactly what diffusers added to the residual
            assert torch.equal(branch + hidden_states, sample)
            state.records[tr] = branch
            return out
        if variant == "attn_store":
            run(hidden_states, *args, return_dict=return_dict, **kwargs)
            state.proj_out.pop(tr, None)
        branch = state.records[tr]
        assert branch.shape == hidden_states.shape
        sample = branch + hidden_states
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    tr.forward = forward


def _install_unet_wrapper(unet, state: _State, *, gate_step, interval, score_mix, bias, num_steps, variant):
    run = unet.forward

    def forward(*args, return_dict=True, **kwargs):
        state.step += 1
        i = state.step
        key = is_keyframe(i, gate_step, interval, variant)
        lam = 1.0 if key else mix_weight(i + 1 if variant == "lam_next" else i, num_steps, score_mix, bias)
        if not key and lam == 0.0:
            state.log.append((i, key, lam, False))
            eps = state.eps_key
            return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)
        state.keyframe = key
        out = run(*args, return_dict=return_dict, **kwargs)
        state.log.append((i, key, lam, True))
        eps = out[0] if not return_dict else out.sample
        if key:
            state.eps_key = eps
            return out
        if lam == 1.0:
            return out
        assert eps.shape == state.eps_key.shape
        mixed = lam * eps + (1 - lam) * state.eps_key
        return UNet2DConditionOutput(sample=mixed) if return_dict else (mixed,)

    unet.forward = forward


def tgate_frdiff(pipe, loader, *, gate_step, sp_interval, fi_interval, warm_up, interval, score_mix,
                 bias=0.5, num_inference_steps, variant=None, return_log=False, **call_kwargs):
    """Run one generation of T-GATE (package `loader`) + FRDiff on a deep copy of `pipe`.

    Returns the pipeline's `.images` (latents when output_type="latent"), and the per-step log
    [(step, keyframe, lam, unet_ran)] when return_log."""
    assert variant in VARIANTS
    ref = loader(copy.deepcopy(pipe))  # the package rewrites every Attention's forward for good
    state = _State()
    _install_frdiff(ref.unet, state, variant)
    _install_unet_wrapper(ref.unet, state, gate_step=gate_step, interval=interval, score_mix=score_mix,
                          bias=bias, num_steps=num_inference_steps, variant=variant)
    images = ref.tgate(num_inference_steps=num_inference_steps, gate_step=gate_step, sp_interval=sp_interval,
                       fi_interval=fi_interval, warm_up=warm_up, **call_kwargs).images
    assert state.step == num_inference_steps - 1
    return (images, state.log) if return_log else images
