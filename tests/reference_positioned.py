"""FRDiff planned by position in the whole schedule, as an independent statement for pipelines
that run only the last steps (img2img, inpaint with strength < 1).

The position of a call is read from its timestep's value (its index in scheduler.timesteps);
the first call of a generation is a keyframe (nothing is cached yet); other calls follow
FRDiff(M, score mixing) at that position of num_inference_steps. Shares no code with frkern.
"""
from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from reference import FRDiffHooks, lam


class FRDiffByPosition:
    def __init__(self, unet, scheduler, interval: int, score_mix: bool = True):
        self.hooks = FRDiffHooks(unet)
        self.unet, self.scheduler, self.interval, self.score_mix = unet, scheduler, interval, score_mix
        self.orig = unet.forward
        unet.forward = self.forward
        self.eps_key = None
        self.positions: list[int] = []

    def position(self, timestep) -> int:
        t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        return int((self.scheduler.timesteps == t).nonzero()[0, 0])

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
        pos = self.position(timestep)
        n = self.scheduler.num_inference_steps
        first = not self.positions
        self.positions.append(pos)
        keyframe = first or pos % self.interval == 0
        mix = 1.0 if keyframe or not self.score_mix else lam(pos, n)
        if keyframe:
            self.hooks.keyframe = True
            out = self.orig(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
            self.eps_key = out.clone()
        elif mix == 0.0:
            out = self.eps_key.clone()
        else:
            self.hooks.keyframe = False
            out = self.orig(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
            if mix < 1.0:
                out = (mix * out.float() + (1.0 - mix) * self.eps_key.float()).to(out.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
