"""FLOP counting for the benchmarks: torch.utils.flop_counter, plus the one formula it lacks.

torch's counter has formulas for the CUDA attention kernels but not for the CPU flash-attention
op that scaled_dot_product_attention dispatches to on a CPU, so CPU counts silently left attention
out. Importing this module registers the same formula (4 * B * H * Lq * Lk * D, as for CUDA).
"""
from __future__ import annotations

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
