"""FLOP counting for the benchmarks (helper module, not a script): torch.utils.flop_counter, plus
the one formula it lacks, and the FLOPs SkipConv's tile-predicated convolution would not compute.

torch's counter has formulas for the CUDA attention kernels but not for the CPU flash-attention
op that scaled_dot_product_attention dispatches to on a CPU, so CPU counts silently left attention
out. Importing this module registers the same formula (4 * B * H * Lq * Lk * D, as for CUDA).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_FLASH not in flop_registry:

    @register_flop_formula(_CPU_FLASH)
    def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_gflop(fn) -> float:
    """GFLOPs of everything `fn` runs (convolutions, matmuls, attention)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def count_gflop_and_result(fn) -> tuple[float, object]:
    """(GFLOPs of everything `fn` runs, what fn returns): one run both counts and gives the result
    (the counter observes the ops, the values are those of an uncounted run)."""
    with FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops() / 1e9, out


@contextlib.contextmanager
def skipped_conv_flops(handle):
    """Counts, while the block runs, the FLOPs of SkipConv's gated convolutions that a
    tile-predicated convolution would not compute (output tiles no active input tile touches);
    yields a one-element list holding them. frkern's PyTorch reference still computes these densely
    (it saves no time), so a FLOP count minus this is the cost of the tile-predicated kernel
    (frkern's Triton one on CUDA). 0 when `handle` (a frkern handle, or None) has no gates."""
    from frkern.kernels.skip_conv import affected_pixel_fraction

    skipped = [0.0]
    gates = handle.installation.gates if handle is not None else []
    # A gate is not a module: account after each call of the ResNet wrapper that calls it.
    parents = {id(g.owner): g.owner for g in gates}

    def hook(parent, args, out):
        for gate in parent.gates.values():
            if gate.last_affected is not None:
                n, cin, cout, taps, h, w = gate.last_shape
                dense = 2 * n * cout * cin * taps * h * w
                skipped[0] += dense * (1 - float(affected_pixel_fraction(gate.last_affected, gate.tile, h, w)))

    hooks = [p.register_forward_hook(hook) for p in parents.values()]
    try:
        yield skipped
    finally:
        for h in hooks:
            h.remove()
