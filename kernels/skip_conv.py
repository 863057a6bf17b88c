"""Skip-Convolution with an exact reference input (REFERENCE §8; issue: residual skipping).

State per gated convolution: x_ref (the input the output stands for) and z = conv(x_ref).
One step with a new input x:
- per (image, B x B tile) change = mean over the tile of sum_c |x - x_ref|, divided by the mean over
  the whole map of sum_c |x_ref| (scale-free across layers); a tile is active when change > threshold;
- x_ref takes x on active tiles;
- every output tile whose receptive field touches an active input pixel is recomputed from x_ref,
  the others keep z. So z == conv(x_ref) after every step: no drift.

Only the plain-PyTorch reference exists so far (dense conv + torch.where: the exact statement of
the values); the tile-predicated Triton convolution that computes affected tiles only is still to
be written. Knows nothing of diffusers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_skip_conv_args(x, x_ref, z, weight, tile: int, threshold: float, padding) -> None:
    if x.dim() != 4 or x.shape != x_ref.shape:
        raise ValueError(f"skip_conv: x and x_ref must be NCHW of one shape, got {tuple(x.shape)} and {tuple(x_ref.shape)}")
    k = weight.shape[-1]
    if weight.shape[-2] != k or k not in (1, 3) or padding not in ((k // 2, k // 2), k // 2):
        raise ValueError(f"skip_conv: supports 3x3 padding 1 and 1x1 padding 0, stride 1; got kernel "
                         f"{tuple(weight.shape[-2:])}, padding {padding}")
    if z.shape[:1] + z.shape[2:] != x.shape[:1] + x.shape[2:] or z.shape[1] != weight.shape[0]:
        raise ValueError(f"skip_conv: z has shape {tuple(z.shape)}, expected ({x.shape[0]}, {weight.shape[0]}, "
                         f"{x.shape[2]}, {x.shape[3]})")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"skip_conv: tile must be an int >= 1, got {tile!r}")
    if not threshold >= 0:
        raise ValueError(f"skip_conv: threshold must be >= 0, got {threshold!r}")


def _tiles_to_pixels(mask: torch.Tensor, tile: int, h: int, w: int) -> torch.Tensor:
    return mask.repeat_interleave(tile, 2).repeat_interleave(tile, 3)[:, :, :h, :w]


def skip_conv_reference(x, x_ref, z, weight, bias, tile: int, threshold: float, padding=1):
    """One step: returns (output, new x_ref, active input tiles, affected (recomputed) output
    tiles); the masks are (N, 1, ceil(H/B), ceil(W/B)) bool."""
    check_skip_conv_args(x, x_ref, z, weight, tile, threshold, padding)
    n, _, h, w = x.shape
    k = weight.shape[-1]
    change = (x - x_ref).abs().sum(1, keepdim=True, dtype=torch.float32)
    scale = x_ref.abs().sum(1, keepdim=True, dtype=torch.float32).mean((2, 3), keepdim=True)
    # mean over each tile's pixels inside the map (ceil_mode windows divide by the pixels they cover)
    tile_change = F.avg_pool2d(change, tile, ceil_mode=True)
    active = tile_change > threshold * scale
    active_px = _tiles_to_pixels(active, tile, h, w)
    x_ref = torch.where(active_px, x, x_ref)
    touched = F.max_pool2d(active_px.to(x.dtype), k, stride=1, padding=k // 2) > 0 if k > 1 else active_px
    affected = F.max_pool2d(touched.to(x.dtype), tile, ceil_mode=True) > 0
    out = torch.where(_tiles_to_pixels(affected, tile, h, w), F.conv2d(x_ref, weight, bias, padding=k // 2), z)
    return out, x_ref, active, affected


def affected_pixel_fraction(affected: torch.Tensor, tile: int, h: int, w: int) -> torch.Tensor:
    """Fraction of output pixels recomputed (border tiles count by their real size)."""
    return _tiles_to_pixels(affected, tile, h, w).float().mean()
