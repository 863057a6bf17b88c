"""Independent plain-PyTorch statement of DeepCache's cache branch (Ma et al., "DeepCache:
Accelerating Diffusion Models for Free", CVPR 2024), on an *unpatched* diffusers
UNet2DConditionModel, with forward hooks.

It shares no code with frkern; tests/test_reference_deepcache.py checks it bit for bit against the
`deepcache` package's DeepCacheSDHelper.

The definition (as the package parametrises it): a branch id m names a place in the UNet's
down path, block B = m // 3, layer L = m % 3 inside down_blocks[B]. The layers of a down block are
numbered in forward order: resnet/attention pair i is layer i, its downsampler is layer
len(resnets). On a non-keyframe step everything deeper than that place is replaced by what it
produced on the last keyframe:

* down: every layer of a deeper block (b > B), and in block B every layer with index >= L;
* the whole mid block;
* up: every layer of a block whose mirror index (counted from the output end, so up block f
  mirrors down block f) is deeper (f > B), and in the mirror block B every layer whose index,
  counted from the output end, is > L. That strict ">" (against ">=" going down) is what keeps the
  branch symmetric: up layer j of mirror block B concatenates the skip connection of down layer
  j - 1 of block B (layer 0 takes the previous block's downsampler output, or conv_in's), so an
  up layer is recomputed exactly when the down layer that feeds it is. The upsampler of the
  mirror block counts as layer 0 and so is always recomputed.

Skipped layers are replaced as whole units (a resnet, a transformer, a downsampler, a whole
block when all its layers are skipped, the mid block), so the skip connections a skipped down
layer hands to the up path are its recorded outputs, as are the outputs it hands downward.
"""
from __future__ import annotations

from functools import partial

import torch


class DeepCacheCutHooks:
    """DeepCache with a fixed cache branch, stated with forward hooks.

    Set ``hooks.keyframe`` before each UNet call. On a keyframe call every module of the skipped
    part runs and its output is recorded (per module path); on a non-keyframe call a forward hook
    replaces each skipped unit's output by the recorded one.

    Forward hooks cannot stop a module from running, so on non-keyframes the skipped units still
    compute (on whatever input reaches them) before their output is discarded: this statement is
    about the values DeepCache produces, not its cost.

    Attributes:
      keyframe: bool, set by the caller.
      skipped_names: sorted module paths of the skipped units (outermost only: a unit inside a
        skipped block is not listed, since the block's replaced output already covers it).
      first_skipped_module: the skipped unit a UNet forward reaches first; its input is the
        deepest feature still recomputed on a non-keyframe, what an adaptive rule would compare.
      store: module path -> output recorded on the last keyframe.
    """

    def __init__(self, unet, branch: int):
        if branch < 0:
            raise ValueError(f"branch must be >= 0, got {branch}")
        self.branch = branch
        self.block, self.layer = divmod(branch, 3)
        self.keyframe = True
        self.store: dict[str, object] = {}
        self.handles = []

        units = self._skipped_units(unet)  # (path, module) in the order a forward reaches them
        self.first_skipped_module = units[0][1]
        self.first_skipped_name = units[0][0]
        self.skipped_names = sorted(name for name, _ in units)
        for name, module in units:
            self.handles.append(module.register_forward_hook(partial(self._hook, name)))

    # -- which units are skipped ----------------------------------------------------------------

    def _down_skipped(self, b: int, layer: int) -> bool:
        return b > self.block or (b == self.block and layer >= self.layer)

    def _up_skipped(self, f: int, layer_from_end: int) -> bool:
        return f > self.block or (f == self.block and layer_from_end > self.layer)

    def _skipped_units(self, unet):
        units = []
        for b, blk in enumerate(unet.down_blocks):
            n = len(blk.resnets)
            attns = getattr(blk, "attentions", None)
            downs = list(blk.downsamplers) if getattr(blk, "downsamplers", None) is not None else []
            # A block all of whose layers are skipped is replaced as one unit (its layer 0 is
            # skipped iff all are: the skipped layers of a block are a suffix).
            if self._down_skipped(b, 0):
                units.append((f"down_blocks.{b}", blk))
                continue
            for i in range(n):  # forward order inside a down block: resnet i, then attention i
                if self._down_skipped(b, i):
                    units.append((f"down_blocks.{b}.resnets.{i}", blk.resnets[i]))
                    if attns is not None:
                        units.append((f"down_blocks.{b}.attentions.{i}", attns[i]))
            for k, ds in enumerate(downs):  # the downsampler is layer n of its block
                if self._down_skipped(b, n):
                    units.append((f"down_blocks.{b}.downsamplers.{k}", ds))

        # The mid block lies below every branch: always skipped.
        units.append(("mid_block", unet.mid_block))

        n_up = len(unet.up_blocks)
        for k, blk in enumerate(unet.up_blocks):
            f = n_up - 1 - k  # mirror index: up_blocks[k] mirrors down_blocks[n_up - 1 - k]
            if f > self.block:
                units.append((f"up_blocks.{k}", blk))
                continue
            n = len(blk.resnets)
            attns = getattr(blk, "attentions", None)
            for i in range(n):  # resnet i of an up block is layer n - 1 - i from the output end
                if self._up_skipped(f, n - 1 - i):
                    units.append((f"up_blocks.{k}.resnets.{i}", blk.resnets[i]))
                    if attns is not None:
                        units.append((f"up_blocks.{k}.attentions.{i}", attns[i]))
            # upsamplers: layer 0 from the output end, never > L, so never skipped here.
        return units

    # -- the hook ---------------------------------------------------------------------------------

    def _hook(self, name, module, args, out):
        if self.keyframe:
            self.store[name] = out
            return None
        if name not in self.store:
            raise RuntimeError(f"DeepCacheCutHooks: non-keyframe call before any keyframe ({name})")
        return self.store[name]

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
