"""Where segment cuts lie on a model's ladder of levels (frkern.family.Parts).

A segment cut is a list of module paths; on a reuse step each of them returns its output from
the last keyframe and the rest of the model runs on fresh inputs. Clockwork and DeepCache are two
ways of choosing that list; both read only the ladder, so every family with one gets them.
"""
from __future__ import annotations

from .family import Parts


def clockwork_cut(parts: Parts, levels: int) -> list[str]:
    """Keep the entry, the outer `levels` levels (down and up) and whatever follows; cache the rest.

    The last kept down block's downsampler feeds only cached blocks, so it is cached too (skipped).
    """
    n = len(parts.levels)
    if not 1 <= levels < n:
        raise ValueError(f"Clockwork: levels must lie in 1..{n - 1} for a UNet with {n} levels, got {levels}")
    paths = list(parts.levels[levels - 1].downsamplers)
    paths += [level.down_block for level in parts.levels[levels:]]
    if parts.mid is not None:
        paths.append(parts.mid)
    paths += [level.up_block for level in reversed(parts.levels[levels:])]  # up blocks in forward order
    return paths


def deepcache_cut(parts: Parts, branch: int) -> list[str]:
    """The modules the `deepcache` package (0.1.1, DeepCacheSDHelper) returns from its cache on
    a non-full step with cache_branch_id=branch: block = branch // 3, layer = branch % 3; down
    layers at or after (block, layer), everything in the middle, and up layers before the
    mirrored position. Up layers are counted from the output end; a layer is every module at
    one position (a ResNet with its transformers)."""
    block_id, layer_id = divmod(branch, 3)
    n = len(parts.levels)
    if block_id >= n:
        raise ValueError(f"DeepCache: branch {branch} is past the UNet's {n} levels (max {3 * n - 1})")

    def down_skip(bi, li):
        return bi > block_id or (bi == block_id and li >= layer_id)

    def up_skip(bi, li):
        return bi > block_id or (bi == block_id and li > layer_id)

    paths = []
    for bi, level in enumerate(parts.levels):
        if down_skip(bi, 0):
            paths.append(level.down_block)
            continue
        for li, layer in enumerate(level.down_layers):
            if down_skip(bi, li):
                paths += layer
        if down_skip(bi, len(level.down_layers)):
            paths += level.downsamplers
    if parts.mid is not None:
        paths.append(parts.mid)
    for bi in reversed(range(n)):  # up blocks in forward order: the innermost level first
        level = parts.levels[bi]
        if up_skip(bi, 0):
            paths.append(level.up_block)
            continue
        nres = len(level.up_layers)
        for j, layer in enumerate(level.up_layers):
            if up_skip(bi, nres - 1 - j):
                paths += layer
        # upsamplers sit at layer 0 of their block: never skipped unless the block is
    return paths


def _under(path: str, cut: list[str]) -> bool:
    return any(path == c or path.startswith(c + ".") for c in cut)


def adaptive_gate(parts: Parts, cut: list[str] | None) -> tuple[list[str], str]:
    """(the modules computed before the indicator, the gate whose input is the indicator).

    Segment reuse (a cut): the gate is the first cached module of the cut. Unit reuse (None): the
    entry and the outermost level's down layers compute on every call (First-Block-Cache's first
    block); the gate is the module after them."""
    order = parts.down_order()
    if cut is not None:
        first = next(i for i, p in enumerate(order) if _under(p, cut))
    else:
        first = len(parts.entry) + sum(len(layer) for layer in parts.levels[0].down_layers)
    return order[:first], order[first]


def encoder_cut(parts: Parts) -> list[str]:
    """Faster Diffusion's encoder: the entry modules (conv_in; UNet3D's transformer_in), every down
    block and the mid block, cached whole. Their outputs (the mid block's and every skip
    connection) are all the decoder reads of the sample; the time embedding is outside them."""
    paths = list(parts.entry) + [level.down_block for level in parts.levels]
    if parts.mid is not None:
        paths.append(parts.mid)
    return paths
