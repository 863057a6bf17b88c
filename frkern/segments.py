"""Which modules of a UNet2DConditionModel a segment policy caches.

A segment cut is a list of module paths; on a reuse step each of them returns its output from
the last keyframe and the rest of the UNet runs on fresh inputs. Clockwork and DeepCache are two
ways of choosing that list.
"""
from __future__ import annotations

from torch import nn

from .policies import Adaptive, Clockwork, DeepCache, Policy


def clockwork_cut(unet: nn.Module, levels: int) -> list[str]:
    """Keep conv_in, down_blocks[:levels], up_blocks[-levels:], conv_out; cache the rest.

    The last kept down block's downsampler feeds only cached blocks, so it is cached too (skipped).
    """
    n = len(unet.down_blocks)
    if len(unet.up_blocks) != n:
        raise ValueError(f"Clockwork: {n} down blocks but {len(unet.up_blocks)} up blocks")
    if not 1 <= levels < n:
        raise ValueError(f"Clockwork: levels must lie in 1..{n - 1} for a UNet with {n} levels, got {levels}")
    paths = []
    if getattr(unet.down_blocks[levels - 1], "downsamplers", None):
        paths += [f"down_blocks.{levels - 1}.downsamplers.{j}" for j in range(len(unet.down_blocks[levels - 1].downsamplers))]
    paths += [f"down_blocks.{i}" for i in range(levels, n)]
    if unet.mid_block is not None:
        paths.append("mid_block")
    paths += [f"up_blocks.{i}" for i in range(n - levels)]
    return paths


def deepcache_cut(unet: nn.Module, branch: int) -> list[str]:
    """The modules the `deepcache` package (0.1.1, DeepCacheSDHelper) returns from its cache on
    a non-full step with cache_branch_id=branch: block = branch // 3, layer = branch % 3; down
    layers at or after (block, layer), everything in the middle, and up layers before the
    mirrored position. Up blocks and their layers are counted from the output end."""
    block_id, layer_id = divmod(branch, 3)
    n = len(unet.down_blocks)
    if block_id >= n:
        raise ValueError(f"DeepCache: branch {branch} is past the UNet's {n} levels (max {3 * n - 1})")

    def down_skip(bi, li):
        return bi > block_id or (bi == block_id and li >= layer_id)

    def up_skip(bi, li):
        return bi > block_id or (bi == block_id and li > layer_id)

    paths = []
    for bi, block in enumerate(unet.down_blocks):
        if down_skip(bi, 0):
            paths.append(f"down_blocks.{bi}")
            continue
        nres = len(getattr(block, "resnets", []))
        for kind in ("attentions", "resnets"):
            for li in range(len(getattr(block, kind, None) or [])):
                if down_skip(bi, li):
                    paths.append(f"down_blocks.{bi}.{kind}.{li}")
        for j in range(len(getattr(block, "downsamplers", None) or [])):
            if down_skip(bi, nres):
                paths.append(f"down_blocks.{bi}.downsamplers.{j}")
    if unet.mid_block is not None:
        paths.append("mid_block")
    for i, block in enumerate(unet.up_blocks):
        bi = n - 1 - i
        if up_skip(bi, 0):
            paths.append(f"up_blocks.{i}")
            continue
        nres = len(getattr(block, "resnets", []))
        for kind in ("attentions", "resnets"):
            for j in range(len(getattr(block, kind, None) or [])):
                if up_skip(bi, nres - 1 - j):
                    paths.append(f"up_blocks.{i}.{kind}.{j}")
        # upsamplers sit at layer 0 of their block: never skipped unless the block is
    return paths


def segment_cut(unet: nn.Module, policy: Policy) -> list[str]:
    if isinstance(policy, Clockwork) or (isinstance(policy, Adaptive) and policy.reuse == "clockwork"):
        return clockwork_cut(unet, policy.levels)
    if isinstance(policy, DeepCache) or (isinstance(policy, Adaptive) and policy.reuse == "deepcache"):
        return deepcache_cut(unet, policy.branch)
    raise TypeError(f"{type(policy).__name__} is not a segment policy")


def down_path(unet: nn.Module) -> list[str]:
    """The modules of the UNet's way down, in the order its forward runs them."""
    paths = ["conv_in"]
    for bi, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for li in range(len(block.resnets)):
            paths.append(f"down_blocks.{bi}.resnets.{li}")
            if li < len(attentions):
                paths.append(f"down_blocks.{bi}.attentions.{li}")
        paths += [f"down_blocks.{bi}.downsamplers.{j}" for j in range(len(getattr(block, "downsamplers", None) or []))]
    if unet.mid_block is not None:
        paths.append("mid_block")
    return paths


def adaptive_gate(unet: nn.Module, policy: Adaptive) -> tuple[list[str], str]:
    """(the modules computed before the indicator, the gate whose input is the indicator).

    Segment reuse: the gate is the first cached module of the cut. Unit reuse: down_blocks[0]'s
    resnets and attentions compute on every call (First-Block-Cache's first block); the gate is
    the module after them."""
    order = down_path(unet)
    if policy.cached_parts == "segment":
        cut = segment_cut(unet, policy)
        first = next(i for i, p in enumerate(order) if any(p == c or p.startswith(c + ".") for c in cut))
    else:
        first = next(i for i, p in enumerate(order) if p != "conv_in" and not (
            p.startswith("down_blocks.0.resnets.") or p.startswith("down_blocks.0.attentions.")))
    return order[:first], order[first]
