"""Independent plain-PyTorch statements of each method, on an *unpatched* UNet, with hooks.

They share no code with frkern: the tests compare frkern against these step by step.
"""
from __future__ import annotations

from functools import partial

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel


def lam(i: int, n: int, bias: float = 0.5) -> float:
    """FRDiff score-mixing weight, REFERENCE §1.2."""
    return float(min(1.0, max(0.0, (30.0 * (i / n - bias) + 2.0) / 4.0)))


class FRDiffHooks:
    """On keyframes record every ResNet's conv1 output and every transformer's proj_out output
    (its residual branch before the skip add); on other steps substitute the recorded ones."""

    def __init__(self, unet):
        self.keyframe = True
        self.store = {}
        self.handles = []
        for name, m in unet.named_modules():
            if isinstance(m, ResnetBlock2D):
                self.handles.append(m.conv1.register_forward_hook(partial(self._hook, name)))
            elif isinstance(m, Transformer2DModel):
                self.handles.append(m.proj_out.register_forward_hook(partial(self._hook, name)))

    def _hook(self, name, module, args, out):
        if self.keyframe:
            self.store[name] = out
            return None
        return self.store[name]


class SegmentHooks:
    """Clockwork: on keyframes record the input of up_blocks[-levels]; on other steps replace it."""

    def __init__(self, unet, levels: int = 1):
        self.keyframe = True
        self.stored = None
        unet.up_blocks[-levels].register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if self.keyframe:
            self.stored = kwargs["hidden_states"]
            return None
        kwargs = dict(kwargs, hidden_states=self.stored)
        return args, kwargs


def ddim_loop(unet_call, scheduler, latents, num_steps, guidance=5.0):
    """Plain CFG DDIM loop; unet_call(i, latent_batch, t) -> eps for the CFG batch."""
    scheduler.set_timesteps(num_steps)
    x = latents
    eps_all = []
    for i, t in enumerate(scheduler.timesteps):
        eps = unet_call(i, torch.cat([x, x]), t)
        eps_all.append(eps)
        u, c = eps.chunk(2)
        x = scheduler.step(u + guidance * (c - u), t, x).prev_sample
    return x, eps_all
