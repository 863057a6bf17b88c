"""Skip-Convolution with an exact reference input (REFERENCE §8; issue: residual skipping).

State per gated convolution: x_ref (the input the output stands for) and z = conv(x_ref).
One step with a new input x:
- per (image, B x B tile) change = mean over the tile of sum_c |x - x_ref|, divided by the mean over
  the whole map of sum_c |x_ref| (scale-free across layers); a tile is active when change > threshold;
- x_ref takes x on active tiles;
- every output tile whose receptive field touches an active input pixel is recomputed from x_ref,
  the others keep z. So z == conv(x_ref) after every step: no drift.

skip_conv_reference is the plain-PyTorch statement of the values (dense conv + torch.where,
out-of-place); skip_conv_temporal_reference is the same for video UNets' (3, 1, 1) convolutions over
frames (each frame gated as an image, the recomputed tiles dilated over frames; PyTorch only). skip_conv_triton computes the same step in place (x_ref and z are updated) with
three launches whose grids depend on shapes only (CUDA-graph capturable, no host sync):
1. gate sums: per (image, tile, channel chunk) fp32 sums of sum_c |x - x_ref| and of sum_c |x_ref|;
2. gate decide: each (image, tile, channel chunk) program reduces its image's ref sums (same
   order in every program, so they all agree), decides the tile, writes the active mask (chunk 0)
   and copies x -> x_ref on its channels of an active tile;
3. tile-predicated convolution: an implicit GEMM (tl.dot, fp32 accumulation) per (image, output
   tile, pixel block, output-channel block); it reads the active bits of its tile's 3x3 tile
   neighbourhood (the tile itself for 1x1), writes the affected bit (first channel block) and
   returns at once when unaffected, so z keeps its values there untouched; otherwise it computes
   conv(x_ref) + bias over its tile (halo from neighbouring tiles, zeros outside the map) into z.
Masks equal the reference's except where a tile's change sits within fp32 rounding of the
threshold (the sums run in a different order): tests keep their inputs off such knife edges.
Knows nothing of diffusers.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None


def _check_tile_threshold(op: str, tile: int, threshold: float) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{op}: tile must be an int >= 1, got {tile!r}")
    if not threshold >= 0:
        raise ValueError(f"{op}: threshold must be >= 0, got {threshold!r}")


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
    _check_tile_threshold("skip_conv", tile, threshold)


def _tiles_to_pixels(mask: torch.Tensor, tile: int, h: int, w: int) -> torch.Tensor:
    return mask.repeat_interleave(tile, 2).repeat_interleave(tile, 3)[:, :, :h, :w]


def skip_conv_reference(x, x_ref, z, weight, bias, tile: int, threshold: float, padding=1, conv=None):
    """One step: returns (output, new x_ref, active input tiles, affected (recomputed) output
    tiles); the masks are (N, 1, ceil(H/B), ceil(W/B)) bool. conv: the convolution as a callable
    (default F.conv2d with weight and bias), for one whose weights are not a plain tensor pair (an
    adapted convolution); weight then only gives the kernel's shape."""
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
    dense = F.conv2d(x_ref, weight, bias, padding=k // 2) if conv is None else conv(x_ref)
    out = torch.where(_tiles_to_pixels(affected, tile, h, w), dense, z)
    return out, x_ref, active, affected


def check_skip_conv_temporal_args(x, x_ref, z, weight, tile: int, threshold: float) -> None:
    if x.dim() != 5 or x.shape != x_ref.shape:
        raise ValueError(f"skip_conv_temporal: x and x_ref must be (N, C, frames, H, W) of one shape, got "
                         f"{tuple(x.shape)} and {tuple(x_ref.shape)}")
    if weight.dim() != 5 or tuple(weight.shape[-2:]) != (1, 1) or weight.shape[2] not in (1, 3):
        raise ValueError(f"skip_conv_temporal: supports (3, 1, 1) and (1, 1, 1) kernels, got {tuple(weight.shape[2:])}")
    if z.shape[:1] + z.shape[2:] != x.shape[:1] + x.shape[2:] or z.shape[1] != weight.shape[0]:
        raise ValueError(f"skip_conv_temporal: z has shape {tuple(z.shape)}, expected "
                         f"({x.shape[0]}, {weight.shape[0]}, {', '.join(map(str, x.shape[2:]))})")
    _check_tile_threshold("skip_conv_temporal", tile, threshold)


def skip_conv_temporal_reference(x, x_ref, z, weight, bias, tile: int, threshold: float, conv=None):
    """One step of a temporal convolution over frames ((kt, 1, 1) kernel, padding (kt // 2, 0, 0),
    stride 1: video UNets' temporal ResNets and temporal conv layers) on (N, C, F, H, W).

    Each frame is gated as skip_conv_reference gates an image (its own tiles and scale); x_ref takes
    x on active tiles; an output tile is recomputed when an active tile at the same place lies
    within kt // 2 frames (the receptive field: one pixel, kt frames). Returns (output, new x_ref,
    active, affected), masks (N, 1, F, ceil(H/B), ceil(W/B)) bool; out of place. No Triton
    kernel: the 2-D kernel's tiles do not span frames."""
    check_skip_conv_temporal_args(x, x_ref, z, weight, tile, threshold)
    n, _, f, h, w = x.shape
    kt = weight.shape[2]
    frames = lambda t: t.transpose(1, 2).flatten(0, 1)  # (N, C, F, H, W) -> (N * F, C, H, W)
    change = (frames(x) - frames(x_ref)).abs().sum(1, keepdim=True, dtype=torch.float32)
    scale = frames(x_ref).abs().sum(1, keepdim=True, dtype=torch.float32).mean((2, 3), keepdim=True)
    active = F.avg_pool2d(change, tile, ceil_mode=True) > threshold * scale  # (N * F, 1, TH, TW)
    active = active.reshape(n, f, 1, *active.shape[2:]).transpose(1, 2)  # (N, 1, F, TH, TW)
    px = lambda m: m.repeat_interleave(tile, 3).repeat_interleave(tile, 4)[..., :h, :w]
    x_ref = torch.where(px(active), x, x_ref)
    affected = F.max_pool3d(active.to(torch.float32), (kt, 1, 1), stride=1, padding=(kt // 2, 0, 0)) > 0
    dense = F.conv3d(x_ref, weight, bias, padding=(kt // 2, 0, 0)) if conv is None else conv(x_ref)
    return torch.where(px(affected), dense, z), x_ref, active, affected


def affected_pixel_fraction(affected: torch.Tensor, tile: int, h: int, w: int) -> torch.Tensor:
    """Fraction of output pixels recomputed (border tiles count by their real size); a temporal
    mask (N, 1, F, TH, TW) counts every frame."""
    if affected.dim() == 5:
        affected = affected.transpose(1, 2).flatten(0, 1)
    return _tiles_to_pixels(affected, tile, h, w).float().mean()


def check_skip_conv_tensors(x, x_ref, z, weight, bias) -> None:
    """What the Triton path needs beyond check_skip_conv_args: one device, one dtype, groups 1."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype not in dtypes:
        raise ValueError(f"skip_conv: dtype {x.dtype} not supported; accepted: float32, float16, bfloat16")
    named = (("x_ref", x_ref), ("z", z), ("weight", weight)) + ((("bias", bias),) if bias is not None else ())
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"skip_conv: x, x_ref, z, weight and bias must be on one device; x is on {x.device}, "
                             f"{name} on {t.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"skip_conv: x, x_ref, z, weight and bias must have one dtype (float32, float16 or "
                             f"bfloat16); x is {x.dtype}, {name} is {t.dtype}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"skip_conv: weight must be (Cout, {x.shape[1]}, k, k) (groups 1), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"skip_conv: bias must be None or of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


if triton is not None:

    @triton.jit
    def _tile_coords(pid, TH, TW):
        t_img = TH * TW
        n = pid // t_img
        t = pid % t_img
        return n, t // TW, t % TW

    @triton.jit
    def _skip_gate_sums_kernel(
        x_ptr, r_ptr, part_ptr, C, H, W, TH, TW, CHUNK_C,
        sxn, sxc, sxh, sxw, srn, src, srh, srw,
        TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, IS_F32: tl.constexpr,
    ):
        pid = tl.program_id(0)  # image * tiles + tile
        split = tl.program_id(1)  # channel chunk
        n, th, tw = _tile_coords(pid, TH, TW)
        n = n.to(tl.int64)
        cl = tl.arange(0, BLOCK_C)
        acc_d = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        acc_r = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for p0 in range(0, TILE * TILE, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            h = th * TILE + p // TILE
            w = tw * TILE + p % TILE
            pm = (p < TILE * TILE) & (h < H) & (w < W)
            for c0 in range(split * CHUNK_C, tl.minimum(C, (split + 1) * CHUNK_C), BLOCK_C):
                c = c0 + cl
                m = (c < C)[:, None] & pm[None, :]
                xv = tl.load(x_ptr + n * sxn + c[:, None] * sxc + h[None, :] * sxh + w[None, :] * sxw, mask=m, other=0.0)
                rv = tl.load(r_ptr + n * srn + c[:, None] * src + h[None, :] * srh + w[None, :] * srw, mask=m, other=0.0)
                d = xv.to(tl.float32) - rv.to(tl.float32)
                if not IS_F32:  # torch computes x - x_ref in the I/O dtype (fp32 math, rounded)
                    d = d.to(rv.dtype, fp_downcast_rounding="rtne").to(tl.float32)
                acc_d += tl.abs(d)
                acc_r += tl.abs(rv.to(tl.float32))
        base = part_ptr + (pid * tl.num_programs(1) + split) * 2
        tl.store(base, tl.sum(tl.sum(acc_d, axis=0), axis=0))
        tl.store(base + 1, tl.sum(tl.sum(acc_r, axis=0), axis=0))

    @triton.jit
    def _skip_gate_apply_kernel(
        x_ptr, r_ptr, part_ptr, act_ptr, C, H, W, TH, TW, CHUNK_C, threshold,
        sxn, sxc, sxh, sxw, srn, src, srh, srw,
        TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        S = tl.num_programs(1)
        n, th, tw = _tile_coords(pid, TH, TW)
        # The image's scale: every program of the image reduces the same values in the same order.
        n_part = TH * TW * S
        img = part_ptr + n * n_part * 2
        tot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for r0 in range(0, n_part, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            tot += tl.load(img + r * 2 + 1, mask=r < n_part, other=0.0)
        scale = tl.sum(tot, axis=0) / (H * W)
        s = tl.arange(0, BLOCK_R)
        change = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_R):
            change += tl.load(part_ptr + (pid * S + s0 + s) * 2, mask=s0 + s < S, other=0.0)
        rows = tl.minimum(TILE, H - th * TILE)
        cols = tl.minimum(TILE, W - tw * TILE)
        npix = (rows * cols).to(tl.float32)
        active = tl.sum(change, axis=0) / npix > threshold * scale
        if split == 0:
            tl.store(act_ptr + pid, active)
        n64 = n.to(tl.int64)
        if active:  # x_ref takes x on this tile (this program's channel chunk)
            cl = tl.arange(0, BLOCK_C)
            for p0 in range(0, TILE * TILE, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                h = th * TILE + p // TILE
                w = tw * TILE + p % TILE
                pm = (p < TILE * TILE) & (h < H) & (w < W)
                for c0 in range(split * CHUNK_C, tl.minimum(C, (split + 1) * CHUNK_C), BLOCK_C):
                    c = c0 + cl
                    m = (c < C)[:, None] & pm[None, :]
                    xv = tl.load(x_ptr + n64 * sxn + c[:, None] * sxc + h[None, :] * sxh + w[None, :] * sxw, mask=m)
                    tl.store(r_ptr + n64 * srn + c[:, None] * src + h[None, :] * srh + w[None, :] * srw, xv, mask=m)

    @triton.jit
    def _skip_conv_kernel(
        r_ptr, w_ptr, b_ptr, z_ptr, act_ptr, aff_ptr,
        C, H, W, CO, TH, TW, MCHUNKS,
        srn, src, srh, srw, swo, swi, swh, sww, szn, szc, szh, szw,
        TILE: tl.constexpr, KS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)  # (image * tiles + tile) * pixel chunks + pixel chunk
        pid_n = tl.program_id(1)  # output-channel block
        tile_id = pid // MCHUNKS
        mchunk = pid % MCHUNKS
        n, th, tw = _tile_coords(tile_id, TH, TW)
        t_img = TH * TW
        # affected: any active tile within reach of this tile's receptive field
        if KS == 1:
            aff = tl.load(act_ptr + tile_id).to(tl.int32)
        else:
            i = tl.arange(0, 16)
            nr = th + i // 4 - 1
            nc = tw + i % 4 - 1
            ok = (i // 4 < 3) & (i % 4 < 3) & (nr >= 0) & (nr < TH) & (nc >= 0) & (nc < TW)
            aff = tl.max(tl.load(act_ptr + n * t_img + nr * TW + nc, mask=ok, other=0).to(tl.int32), axis=0)
        if (pid_n == 0) & (mchunk == 0):
            tl.store(aff_ptr + tile_id, aff != 0)
        if aff == 0:
            return  # z keeps its values: nothing is read or written here
        n = n.to(tl.int64)
        p = mchunk * BLOCK_M + tl.arange(0, BLOCK_M)
        oh = th * TILE + p // TILE
        ow = tw * TILE + p % TILE
        pm = (p < TILE * TILE) & (oh < H) & (ow < W)
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        com = co < CO
        kk = tl.arange(0, BLOCK_K)
        r_pix = r_ptr + n * srn + oh[:, None] * srh + ow[:, None] * srw + kk[None, :] * src
        w_co = w_ptr + co[None, :] * swo + kk[:, None] * swi
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # implicit GEMM, one pipelined loop over (tap, input-channel block): (pixels x Cin block) of
        # x_ref shifted by the tap, times (Cin block x Cout block) of the tap's weight
        nk = tl.cdiv(C, BLOCK_K)
        for it in range(0, KS * KS * nk):
            tap = it // nk
            k0 = (it - tap * nk) * BLOCK_K
            dh = tap // KS - KS // 2
            dw = tap % KS - KS // 2
            am = (pm & (oh + dh >= 0) & (oh + dh < H) & (ow + dw >= 0) & (ow + dw < W))[:, None]
            cim = k0 + kk < C
            a = tl.load(r_pix + (dh * srh + dw * srw + k0 * src), mask=am & cim[None, :], other=0.0)
            b = tl.load(w_co + ((tap // KS) * swh + (tap % KS) * sww + k0 * swi),
                        mask=cim[:, None] & com[None, :], other=0.0)
            if UPCAST:  # bf16 in Triton's interpreter (no bf16 matmul there): exact products in fp32
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + co, mask=com, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + n * szn + co[None, :] * szc + oh[:, None] * szh + ow[:, None] * szw,
                 acc.to(z_ptr.dtype.element_ty), mask=pm[:, None] & com[None, :])


def _conv_blocks(tile: int, cin: int, cout: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K). SD1.5 at tile 8 in fp16: 64 pixels x 64 output channels, 64
    input channels per step of the (tap, channel block) loop: 16 KiB of operands per pipeline
    stage (compiled for sm_90: wgmma, both operands loaded by cp.async with channels_last
    tensors). fp32 (exact, no tensor-core TF32): 32 KiB per stage, two stages."""
    block_m = max(16, min(128, triton.next_power_of_2(tile * tile)))
    block_n = max(16, min(64, triton.next_power_of_2(cout)))
    block_k = max(16, min(64, triton.next_power_of_2(cin)))
    return block_m, block_n, block_k


def _launch_gate(x, x_ref, tile: int, threshold: float, launch) -> torch.Tensor:
    """Gate sums, then decide + copy (x_ref updated in place); returns the active mask."""
    n, c, h, w = x.shape
    th, tw = triton.cdiv(h, tile), triton.cdiv(w, tile)
    tiles = n * th * tw
    active = torch.empty((n, 1, th, tw), dtype=torch.bool, device=x.device)
    # [BLOCK_C, BLOCK_P] blocks of about 2048 elements; channel chunks of 128 so that maps with few
    # tiles (16x16 at tile 8) still spread over many programs
    block_p = min(1024, triton.next_power_of_2(tile * tile))
    block_c = max(1, min(triton.next_power_of_2(c), 2048 // block_p))
    chunk_c = max(block_c, 128)
    splits = triton.cdiv(c, chunk_c)
    part = torch.empty((tiles, splits, 2), dtype=torch.float32, device=x.device)
    sx, sr = x.stride(), x_ref.stride()
    launch(_skip_gate_sums_kernel)[(tiles, splits)](
        x, x_ref, part, c, h, w, th, tw, chunk_c, *sx, *sr,
        TILE=tile, BLOCK_C=block_c, BLOCK_P=block_p, IS_F32=x.dtype == torch.float32,
    )
    block_r = max(16, min(1024, triton.next_power_of_2(th * tw * splits)))
    launch(_skip_gate_apply_kernel)[(tiles, splits)](
        x, x_ref, part, active, c, h, w, th, tw, chunk_c, float(threshold), *sx, *sr,
        TILE=tile, BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_R=block_r,
    )
    return active


def skip_conv_gate_triton(x, x_ref, tile: int, threshold: float, launch=None) -> torch.Tensor:
    """The gate alone (two launches): x_ref takes x on active tiles, in place; returns the active
    (N, 1, ceil(H/B), ceil(W/B)) bool mask. For measuring the gate's cost (bench/kernel_bench.py)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the PyTorch reference")
    if x.dim() != 4 or x.shape != x_ref.shape or x.dtype != x_ref.dtype or x.device != x_ref.device:
        raise ValueError(f"skip_conv gate: x and x_ref must be NCHW of one shape, dtype and device, got "
                         f"{tuple(x.shape)} {x.dtype} {x.device} and {tuple(x_ref.shape)} {x_ref.dtype} {x_ref.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"skip_conv gate: dtype {x.dtype} not supported; accepted: float32, float16, bfloat16")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"skip_conv gate: tile must be an int >= 1, got {tile!r}")
    if not threshold >= 0:
        raise ValueError(f"skip_conv gate: threshold must be >= 0, got {threshold!r}")
    return _launch_gate(x, x_ref, tile, threshold, launch or (lambda k: k))


def skip_conv_triton(x, x_ref, z, weight, bias, tile: int, threshold: float, padding=1, launch=None):
    """One step in place: x_ref and z are updated; returns (z, x_ref, active, affected), values as
    skip_conv_reference's (the masks are new (N, 1, ceil(H/B), ceil(W/B)) bool tensors). Three
    launches with shape-only grids, no host read of device values (CUDA-graph capturable).
    `launch` wraps each kernel, e.g. torch.library.wrap_triton."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the PyTorch reference")
    check_skip_conv_args(x, x_ref, z, weight, tile, threshold, padding)
    check_skip_conv_tensors(x, x_ref, z, weight, bias)
    n, c, h, w = x.shape
    co, ks = weight.shape[0], weight.shape[-1]
    th, tw = triton.cdiv(h, tile), triton.cdiv(w, tile)
    launch = launch or (lambda k: k)
    active = _launch_gate(x, x_ref, tile, threshold, launch)
    affected = torch.empty((n, 1, th, tw), dtype=torch.bool, device=x.device)
    # The kernel reads (Cin x Cout) weight blocks per tap: input channels must be contiguous for
    # vector loads, as in a channels_last weight (Cout, kh, kw, Cin). A contiguous 3x3 weight is
    # rearranged here, one copy per call (1x1 weights are both already).
    if not weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    block_m, block_n, block_k = _conv_blocks(tile, c, co)
    mchunks = triton.cdiv(tile * tile, block_m)
    launch(_skip_conv_kernel)[(n * th * tw * mchunks, triton.cdiv(co, block_n))](
        x_ref, weight, bias if bias is not None else weight, z, active, affected,
        c, h, w, co, th, tw, mchunks, *x_ref.stride(), *weight.stride(), *z.stride(),
        TILE=tile, KS=ks, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        num_stages=2 if x.dtype == torch.float32 else 3,
    )
    return z, x_ref, active, affected
