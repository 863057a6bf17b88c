"""Each fused kernel against the unfused PyTorch sequence it replaces (GPU).

    python bench/kernel_bench.py --out bench/results        # needs CUDA; writes kernels_<device>_<dtype>.csv
                                                            # (to bench/results/local/ without --out)

Shapes are the SD1.5 UNet's at 512x512 (latent 64x64, CFG batch 2) and SDXL's at 1024x1024
(--shapes sd15 or sdxl: one model's only).
Reports medians of triton.testing.do_bench (CUDA events, warm-up), the ratio unfused / fused,
and the achieved bandwidth against the bytes the fused kernel must move. Correctness is checked
before timing (max abs error vs the reference); a failing case is not timed.

Skip-Convolution rows (SD1.5 ResNet 3x3 convs, tile 8, threshold 0.1): exactly the stated
fraction of input tiles changes (tiles drawn with a fixed seed; the others are left bit-identical),
and successive timed calls alternate between two inputs that differ on those tiles only, so every
call finds the same active tiles. ms_gated: gate + tile-predicated conv (skip_conv_triton);
ms_gate: the gate alone; ms_dense: cuDNN F.conv2d on the whole map; dense_over_gated: the ratio.
affected_frac: the output tiles recomputed (active tiles dilated by the 3x3 receptive field: with
scattered tiles, as drawn here, up to 9x the active fraction; 16x16 maps at tile 8 have 2x2 tiles,
so any change recomputes them all).

Cache codec rows (frkern.cache_format, kernels/quant_cache.py; the ResNet feature shapes above):
ms_encode: quantize_triton (int8 / fp8_e4m3, per-channel scales: a max pass and a quantize pass
over the tensor); ms_decode: dequantize_triton back to the model dtype; ms_copy: a plain copy of
the fp16 tensor (what reading and writing it once costs: the floor a decode is compared with);
bytes_ratio: encoded bytes (scales included) / the tensor's bytes; max_abs_err: the Triton decode vs
the reference's (0: bit for bit); quant_err: the format's own rounding, max |decode - x|.

Compressed-cache consumer rows (--cases cache_consumers; the SD1.5 maps of CACHE_SHAPES, B=2,
channels_last model tensors as the latency benchmark runs them; a quantized tensor is always NCHW
contiguous, as the encoders write it and the decoders require; per-channel scales). Each row:
ms_fused, the fused kernel; ms_unfused, the same work without that fusion (Triton kernels both);
ms_baseline, what an fp16 cache ("model" format) runs there; baseline_over_fused > 1: the
compressed cache's step is faster; gbps_fused: the bytes the fused kernel must move (each input
read once, each output written once, scales included) / ms_fused. Timed with a third of the other
rows' repetitions (do_bench warm-up 25 ms, 100 ms), to fit the GPU round's kernels stage.
- "reuse norm2 from <fmt> cache (decode in prologue)": the reuse step's cached conv1 output + temb
  + GroupNorm + SiLU reading the int8 / fp8_e4m3 codes (group_norm_act_triton(q, x_scale=...));
  unfused: dequantize_triton, then the kernel on the decoded tensor; baseline: the kernel reading
  the fp16 (channels_last) cached tensor. Output NCHW (the decoded path's layout).
- "x + branch from int8 cache (dequantize_add)": a cached residual branch added to the hidden
  state x (channels_last) in one pass; unfused: dequantize_triton, then PyTorch's add; baseline:
  PyTorch's x + branch with the fp16 branch (channels_last).
- "keyframe norm2 + int8 encode (quantize= fused)": the keyframe's conv1 output + temb + GroupNorm
  + SiLU that also writes the int8 encoding of the conv1 output (quantize=("int8", "channel", 64));
  unfused: the kernel without quantize=, then quantize_triton (a pass of its own, which first makes
  the channels_last tensor contiguous); baseline: the kernel without quantize= (an fp16 cache
  stores the tensor itself: ms_fused - ms_baseline is what the encode adds).
Correctness before timing: the decoded and dequantize_add outputs against the references (within
the dtype's tolerance), the fused encode's codes and scales bit for bit against quantize_triton's.

--time-budget SECONDS: once that many seconds have passed since the start, nothing more is timed;
the CSV (rewritten after every row) keeps what was measured and a last row "stopped". The GPU
round passes it so that a slow stage keeps its rows instead of being killed at its timeout; the
groups run in this order: GroupNorm, score mix, GEGLU, cache codec, cache consumers, Skip-Convolution.
"""
from __future__ import annotations

import csv
import os
import sys
import time

STARTED = time.monotonic()  # --time-budget counts from here (before torch and Triton load)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import add_out, help_before_imports  # noqa: E402
from options import parser as new_parser  # noqa: E402

CASES = ("group_norm", "score_mix", "geglu", "skip_conv", "quant_cache", "cache_consumers")


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="dtype of every tensor")
    add_out(ap, "the CSV")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device, one untimed-quality run each")
    ap.add_argument("--shapes", default="all", choices=["all", "sd15", "sdxl"], help="whose layer shapes to time")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="which kernels to run")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="time nothing more once this many seconds have passed since the start: the rows measured "
                         "are written, with a last row saying where it stopped (a timed-out run would lose them)")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# frkern is imported as installed (pip install -e . or the GPU round's install), never from the
# repository root: on sys.path that root would also expose kernels/ as a top-level `kernels` module.
from frkern.kernels.geglu import geglu_reference, geglu_triton  # noqa: E402
from frkern.kernels.group_norm import group_norm_act_reference, group_norm_act_triton  # noqa: E402
from frkern.kernels.quant_cache import (dequantize_add_reference, dequantize_add_triton,  # noqa: E402
                                        dequantize_reference, dequantize_triton, quantize_reference, quantize_triton)
from frkern.kernels.score_mix import score_mix_reference, score_mix_triton  # noqa: E402
from frkern.kernels.skip_conv import skip_conv_gate_triton, skip_conv_reference, skip_conv_triton  # noqa: E402

# (name, B, C, H, W): ResNet norm shapes of SD1.5 (512^2) and SDXL (1024^2)
GN_SHAPES = [("sd15 64x64x320", 2, 320, 64, 64), ("sd15 32x32x640", 2, 640, 32, 32),
             ("sd15 16x16x1280", 2, 1280, 16, 16), ("sd15 8x8x1280", 2, 1280, 8, 8),
             ("sdxl 128x128x320", 2, 320, 128, 128), ("sdxl 32x32x1280", 2, 1280, 32, 32)]
# (name, tokens, 2 x inner): GEGLU projections of the feed-forward layers, batch 2
GEGLU_SHAPES = [("sd15 64x64 ff", 2 * 4096, 2560), ("sd15 32x32 ff", 2 * 1024, 5120), ("sd15 16x16 ff", 2 * 256, 10240),
                ("sdxl 64x64 ff", 2 * 4096, 5120), ("sdxl 32x32 ff", 2 * 1024, 10240)]
# --smoke: the same code path on tiny shapes, for the tests (CPU, Triton interpreter); not timings
SMOKE_SHAPES = [("smoke 5x7x32", 2, 32, 5, 7)]
SMOKE_GEGLU = [("smoke ff", 6, 40)]
# (name, B, C, H, W, tile): ResNet 3x3 convs of SD1.5 (C in = C out)
SKIP_SHAPES = [("sd15 64x64x320", 2, 320, 64, 64, 8), ("sd15 32x32x640", 2, 640, 32, 32, 8),
               ("sd15 16x16x1280", 2, 1280, 16, 16, 8)]
SMOKE_SKIP = [("smoke 9x7x20", 1, 20, 9, 7, 4)]
SMOKE_CACHE = [("smoke 5x7x32", 1, 32, 5, 7)]
SKIP_FRACTIONS = (1.0, 0.5, 0.25, 0.1)
# (name, B, C, H, W): the compressed cache's consumers, at SD1.5's ResNet and transformer maps
CACHE_SHAPES = [("sd15 64x64x320", 2, 320, 64, 64), ("sd15 32x32x640", 2, 640, 32, 32),
                ("sd15 16x16x1280", 2, 1280, 16, 16)]
SKIP_THRESHOLD = 0.1
TOL = {torch.float16: 1e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4}


def of_model(shapes: list, which: str) -> list:
    """The shapes (name first) of one model, or all."""
    return [s for s in shapes if which == "all" or s[0].startswith(which + " ")]


class OutOfTime(Exception):
    """--time-budget reached: the rows not yet timed are left out."""


class Table:
    """The rows so far, printed as they come and the CSV rewritten after each one (a run cut off keeps
    what it measured)."""

    KEYS = ["shape", "format", "case", "dtype", "max_abs_err", "ms_fused", "ms_unfused", "speedup", "gbps_fused",
            "ms_baseline", "baseline_over_fused",
            "active_frac", "affected_frac", "ms_gated", "ms_gate", "ms_dense", "dense_over_gated",
            "ms_encode", "ms_decode", "ms_copy", "bytes_ratio", "quant_err", "note"]

    def __init__(self, path: str):
        self.path, self.rows = path, []
        self.write()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(row, flush=True)
        self.write()

    def write(self) -> None:
        with open(self.path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=self.KEYS)
            wr.writeheader()
            wr.writerows(self.rows)


def main(argv=None):
    args = parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        device, shapes, n_mix = ("cuda" if torch.cuda.is_available() else "cpu"), SMOKE_SHAPES, (100,)
        geglu_shapes, skip_shapes, skip_formats = SMOKE_GEGLU, SMOKE_SKIP, ("nchw",)
        cache_shapes = SMOKE_CACHE

        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        bench_short = bench
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/kernel_bench.py times GPU kernels: no CUDA device here (--smoke runs tiny shapes anywhere)")
        import triton.testing

        device, shapes = "cuda", of_model(GN_SHAPES, args.shapes)
        n_mix = [n for model, n in (("sd15", 2 * 4 * 64 * 64), ("sdxl", 2 * 4 * 128 * 128))
                 if args.shapes in ("all", model)]
        geglu_shapes, skip_shapes = of_model(GEGLU_SHAPES, args.shapes), of_model(SKIP_SHAPES, args.shapes)
        cache_shapes = of_model(CACHE_SHAPES, args.shapes)
        skip_formats = ("nchw", "channels_last")
        bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
        # the compressed-cache consumer rows: a third of the timed repetitions (a median of hundreds of runs still)
        bench_short = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    if args.time_budget is not None:
        bench, bench_short = within(bench, args.time_budget), within(bench_short, args.time_budget)
    if "group_norm" not in args.cases:
        shapes = []
    if "score_mix" not in args.cases:
        n_mix = []
    if "geglu" not in args.cases:
        geglu_shapes = []
    if "skip_conv" not in args.cases:
        skip_shapes = []
    if "cache_consumers" not in args.cases:
        cache_shapes = []
    quant_shapes = shapes if "quant_cache" in args.cases else []
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu"
    stem = os.path.join(args.out, f"kernels_{dev}_{args.dtype}")
    table = Table(stem + ".csv")

    def group_norm_rows():
        for name, B, C, H, W in shapes:
            for fmt in ("nchw", "channels_last"):
                mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                x = torch.randn(B, C, H, W, device=device, dtype=dtype).contiguous(memory_format=mf)
                cached = torch.randn_like(x)
                temb = torch.randn(B, C, device=device, dtype=dtype)
                w = torch.randn(C, device=device, dtype=dtype)
                b = torch.randn(C, device=device, dtype=dtype)
                cases = {
                    "norm1: GN+SiLU": (dict(add=None, add_channel=None), 2),
                    "FR step: cached+temb+GN+SiLU": (dict(add=None, add_channel=temb), 2),
                    "x+cached+GN+SiLU": (dict(add=cached, add_channel=None), 3),
                }
                for case, (kw, passes) in cases.items():
                    src = x
                    fused = lambda: group_norm_act_triton(src, w, b, 32, 1e-5, silu=True, **kw)  # noqa: E731
                    unfused = lambda: group_norm_act_reference(src, w, b, 32, 1e-5, silu=True, **kw)  # noqa: E731
                    err = (fused()[0].float() - unfused()[0].float()).abs().max().item()
                    row = dict(shape=name, format=fmt, case=case, dtype=args.dtype, max_abs_err=err)
                    if not err <= TOL[dtype]:
                        row.update(note="not timed: error over tolerance")
                    else:
                        tf, tu = bench(fused), bench(unfused)
                        nbytes = x.numel() * x.element_size() * passes  # inputs read once + output written once
                        row.update(ms_fused=tf, ms_unfused=tu, speedup=tu / tf, gbps_fused=nbytes / tf / 1e6)
                    table.add(row)

    def score_mix_rows():
        for n in n_mix:
            fr = torch.randn(n, device=device, dtype=dtype)
            key = torch.randn(n, device=device, dtype=dtype)
            err = (score_mix_triton(fr, key, 0.3).float()
                   - score_mix_reference(fr, key, 0.3).float()).abs().max().item()
            tf = bench(lambda: score_mix_triton(fr, key, 0.3))
            tu = bench(lambda: score_mix_reference(fr, key, 0.3))
            table.add(dict(shape=f"{n} elems", format="-", case="score mix", dtype=args.dtype, max_abs_err=err,
                           ms_fused=tf, ms_unfused=tu, speedup=tu / tf,
                           gbps_fused=3 * n * fr.element_size() / tf / 1e6))

    def geglu_rows():
        for name, tokens, width in geglu_shapes:
            x = torch.randn(tokens, width, device=device, dtype=dtype)
            err = (geglu_triton(x).float() - geglu_reference(x).float()).abs().max().item()
            row = dict(shape=name, format="-", case="GEGLU gate", dtype=args.dtype, max_abs_err=err)
            if not err <= TOL[dtype]:
                row.update(note="not timed: error over tolerance")
            else:
                tf, tu = bench(lambda: geglu_triton(x)), bench(lambda: geglu_reference(x))
                nbytes = x.numel() * x.element_size() * 3 // 2  # read x, write half
                row.update(ms_fused=tf, ms_unfused=tu, speedup=tu / tf, gbps_fused=nbytes / tf / 1e6)
            table.add(row)

    def quant_cache_rows():
        for name, B, C, H, W in quant_shapes:
            for fmt in ("int8", "fp8_e4m3"):
                table.add(quant_cache_case(name, B, C, H, W, fmt, dtype, args.dtype, device, bench))

    def cache_consumer_rows():
        for name, B, C, H, W in cache_shapes:
            for row in cache_consumer_cases(name, B, C, H, W, dtype, args.dtype, device, bench_short):
                table.add(row)

    def skip_conv_rows():
        for name, B, C, H, W, tile in skip_shapes:
            for fmt in skip_formats:
                for frac in SKIP_FRACTIONS:
                    table.add(skip_conv_case(name, B, C, H, W, tile, fmt, frac, dtype, args.dtype, device, bench))

    # in this order: under --time-budget the Skip-Convolution rows (the most timings) are cut first
    for group in (group_norm_rows, score_mix_rows, geglu_rows, quant_cache_rows, cache_consumer_rows, skip_conv_rows):
        try:
            group()
        except OutOfTime:
            table.add(dict(shape="-", format="-", case="stopped", dtype=args.dtype,
                           note=f"--time-budget {args.time_budget:g} s reached: the rows after this one were not "
                                "timed"))
            break
    print(f"wrote {stem}.csv (device {dev}, torch {torch.__version__})")
    return table.rows


def within(bench, seconds: float):
    """bench, refused (OutOfTime) once `seconds` have passed since this script started."""
    def timed(fn):
        if time.monotonic() - STARTED > seconds:
            raise OutOfTime
        return bench(fn)

    return timed


def skip_conv_case(name, B, C, H, W, tile, fmt, frac, dtype, dtype_name, device, bench):
    """One Skip-Convolution row: `frac` of the input tiles change (see the module docstring)."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    th, tw = -(-H // tile), -(-W // tile)
    # exactly round(frac * tiles) tiles per image change, drawn with a fixed seed
    n_active = max(1, round(frac * th * tw))
    chosen = torch.zeros(B, th * tw, dtype=torch.bool)
    for b in range(B):
        chosen[b, torch.randperm(th * tw, generator=g)[:n_active]] = True
    px = chosen.view(B, 1, th, tw).repeat_interleave(tile, 2).repeat_interleave(tile, 3)[:, :, :H, :W].to(device)
    x_ref0 = torch.randn(B, C, H, W, generator=g).to(device, dtype).contiguous(memory_format=mf)
    # two inputs that differ from x_ref0 and from each other on the chosen tiles only, by O(1)
    xs = [torch.where(px, x_ref0 + torch.randn(B, C, H, W, generator=g).to(device, dtype), x_ref0)
          .contiguous(memory_format=mf) for _ in range(2)]
    weight = (torch.randn(C, C, 3, 3, generator=g) / (9 * C) ** 0.5).to(device, dtype).contiguous(memory_format=mf)
    bias = torch.randn(C, generator=g).to(device, dtype)
    z0 = F.conv2d(x_ref0, weight, bias, padding=1)
    row = dict(shape=name, format=fmt, case=f"skip conv 3x3 tile {tile}, {100 * frac:g}% tiles change", dtype=dtype_name)
    with torch.no_grad():
        want, want_ref, want_active, want_affected = skip_conv_reference(xs[0], x_ref0, z0, weight, bias, tile,
                                                                         SKIP_THRESHOLD, 1)
        x_ref, z = x_ref0.clone(), z0.clone()
        got, got_ref, active, affected = skip_conv_triton(xs[0], x_ref, z, weight, bias, tile, SKIP_THRESHOLD, 1)
    err = (got.float() - want.float()).abs().max().item()
    row.update(max_abs_err=err, active_frac=active.float().mean().item(),
               affected_frac=affected.float().mean().item())
    ok = (err <= TOL[dtype] * max(1.0, want.float().abs().max().item()) and torch.equal(active, want_active)
          and torch.equal(affected, want_affected) and torch.equal(got_ref, want_ref)
          and active.view(B, -1).sum(1).eq(n_active).all().item())
    if not ok:
        row.update(note="not timed: differs from the reference (or the active tiles are not those drawn)")
        return row
    state = {"i": 0}

    def gated():  # alternate the inputs: each call finds the same tiles changed
        state["i"] ^= 1
        skip_conv_triton(xs[state["i"]], x_ref, z, weight, bias, tile, SKIP_THRESHOLD, 1)

    def gate():
        state["i"] ^= 1
        skip_conv_gate_triton(xs[state["i"]], x_ref, tile, SKIP_THRESHOLD)

    with torch.no_grad():
        t_gated, t_gate = bench(gated), bench(gate)
        t_dense = bench(lambda: F.conv2d(xs[0], weight, bias, padding=1))
    row.update(ms_gated=t_gated, ms_gate=t_gate, ms_dense=t_dense, dense_over_gated=t_dense / t_gated)
    return row


def quant_cache_case(name, B, C, H, W, fmt, dtype, dtype_name, device, bench):
    """One cache codec row: the Triton encode and decode equal the reference bit for bit, then timed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g).to(device, dtype)
    row = dict(shape=name, format="nchw", case=f"cache {fmt} per-channel", dtype=dtype_name)
    q, scale = quantize_triton(x, fmt)
    q_ref, scale_ref = quantize_reference(x, fmt)
    y = dequantize_triton(q, scale, dtype)
    same = (torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
            and torch.equal(y, dequantize_reference(q_ref, scale_ref, dtype)))
    row.update(max_abs_err=(y.float() - dequantize_reference(q_ref, scale_ref, dtype).float()).abs().max().item(),
               quant_err=(y.float() - x.float()).abs().max().item(),  # the format's rounding, not the kernel's
               bytes_ratio=(q.numel() * q.element_size() + scale.numel() * 4) / (x.numel() * x.element_size()))
    if not same:
        row.update(note="not timed: the Triton codec differs from the reference")
        return row
    out = torch.empty_like(x)
    row.update(ms_encode=bench(lambda: quantize_triton(x, fmt)), ms_decode=bench(lambda: dequantize_triton(q, scale, dtype)),
               ms_copy=bench(lambda: out.copy_(x)))
    return row


def cache_consumer_cases(name, B, C, H, W, dtype, dtype_name, device, bench):
    """The compressed cache's consumer rows at one map (see the module docstring), int8 and fp8_e4m3,
    each yielded as soon as it is measured."""
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    h, x = rand(B, C, H, W).contiguous(memory_format=cl), rand(B, C, H, W).contiguous(memory_format=cl)
    temb, w, b = rand(B, C), rand(C), rand(C)
    n, e = h.numel(), h.element_size()
    scale_bytes = B * C * 4

    def norm(src, **kw):
        return group_norm_act_triton(src, w, b, 32, 1e-5, add_channel=temb, silu=True, **kw)

    base = dict(shape=name, format="channels_last", dtype=dtype_name)
    # the reuse step's norm2 reading the cached conv1 output
    t_fp16 = None
    for fmt in ("int8", "fp8_e4m3"):
        q, s = quantize_triton(h, fmt)
        row = dict(base, case=f"reuse norm2 from {fmt} cache (decode in prologue)")
        got = norm(q, x_scale=s, x_dtype=dtype)[0]
        want = group_norm_act_reference(q, w, b, 32, 1e-5, add_channel=temb, silu=True, x_scale=s, x_dtype=dtype)[0]
        row.update(max_abs_err=(got.float() - want.float()).abs().max().item(),
                   bytes_ratio=(n * q.element_size() + scale_bytes) / (n * e))
        if not row["max_abs_err"] <= TOL[dtype]:
            yield dict(row, note="not timed: error over tolerance")
            continue
        if t_fp16 is None:
            t_fp16 = bench(lambda: norm(h))
        tf = bench(lambda: norm(q, x_scale=s, x_dtype=dtype))
        tu = bench(lambda: norm(dequantize_triton(q, s, dtype)))
        nbytes = n * q.element_size() + scale_bytes + n * e  # codes and scales read, y written
        yield dict(row, ms_fused=tf, ms_unfused=tu, speedup=tu / tf, gbps_fused=nbytes / tf / 1e6,
                   ms_baseline=t_fp16, baseline_over_fused=t_fp16 / tf)
    # x + a cached residual branch
    branch = rand(B, C, H, W).contiguous(memory_format=cl)
    q, s = quantize_triton(branch, "int8")
    row = dict(base, case="x + branch from int8 cache (dequantize_add)", bytes_ratio=(n + scale_bytes) / (n * e))
    got = dequantize_add_triton(x, q, s)
    row.update(max_abs_err=(got.float() - dequantize_add_reference(x, q, s).float()).abs().max().item())
    if not row["max_abs_err"] <= TOL[dtype] or got.stride() != x.stride():
        yield dict(row, note="not timed: differs from the reference (or not in x's layout)")
    else:
        tf = bench(lambda: dequantize_add_triton(x, q, s))
        tu = bench(lambda: x + dequantize_triton(q, s, dtype))
        tb = bench(lambda: x + branch)
        nbytes = n * e + n + scale_bytes + n * e  # x, codes and scales read, the sum written
        yield dict(row, ms_fused=tf, ms_unfused=tu, speedup=tu / tf, gbps_fused=nbytes / tf / 1e6,
                   ms_baseline=tb, baseline_over_fused=tb / tf)
    # the keyframe's norm2 writing the int8 encoding of what it reads
    quantize = ("int8", "channel", 64)
    y, _, (q, s) = norm(h, quantize=quantize)
    q_ref, s_ref = quantize_triton(h, "int8")
    y_ref = group_norm_act_reference(h, w, b, 32, 1e-5, add_channel=temb, silu=True)[0]
    row = dict(base, case="keyframe norm2 + int8 encode (quantize= fused)", bytes_ratio=(n + scale_bytes) / (n * e),
               max_abs_err=(y.float() - y_ref.float()).abs().max().item())
    if not (row["max_abs_err"] <= TOL[dtype] and torch.equal(q, q_ref) and torch.equal(s, s_ref)):
        yield dict(row, note="not timed: differs from the reference (or its encoding from quantize_triton's)")
    else:
        def unfused():
            norm(h)
            quantize_triton(h, "int8")

        tf, tu, tb = bench(lambda: norm(h, quantize=quantize)), bench(unfused), bench(lambda: norm(h))
        nbytes = n * e + n * e + n + scale_bytes  # x read, y, codes and scales written
        yield dict(row, ms_fused=tf, ms_unfused=tu, speedup=tu / tf, gbps_fused=nbytes / tf / 1e6,
                   ms_baseline=tb, baseline_over_fused=tb / tf)


if __name__ == "__main__":
    main()
