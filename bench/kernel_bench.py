"""Each fused kernel against the unfused PyTorch sequence it replaces (GPU).

    python bench/kernel_bench.py --out bench/results        # needs CUDA; writes kernels_<device>_<dtype>.csv
                                                            # (to bench/results/local/ without --out)

Shapes are the SD1.5 UNet's at 512x512 (latent 64x64, CFG batch 2) and SDXL's at 1024x1024.
Reports medians of triton.testing.do_bench (CUDA events, warm-up), the ratio unfused / fused,
and the achieved bandwidth against the bytes the fused kernel must move. Correctness is checked
before timing (max abs error vs the reference); a failing case is not timed.
"""
from __future__ import annotations

import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from options import add_out  # noqa: E402
from options import parser as new_parser  # noqa: E402
from frkern.kernels.geglu import geglu_reference, geglu_triton  # noqa: E402
from frkern.kernels.group_norm import group_norm_act_reference, group_norm_act_triton  # noqa: E402
from frkern.kernels.score_mix import score_mix_reference, score_mix_triton  # noqa: E402

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
TOL = {torch.float16: 1e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4}


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="dtype of every tensor")
    add_out(ap, "the CSV")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device, one untimed-quality run each")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        device, shapes, n_mix = ("cuda" if torch.cuda.is_available() else "cpu"), SMOKE_SHAPES, (100,)
        geglu_shapes = SMOKE_GEGLU

        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/kernel_bench.py times GPU kernels: no CUDA device here (--smoke runs tiny shapes anywhere)")
        import triton.testing

        device, shapes, n_mix = "cuda", GN_SHAPES, (2 * 4 * 64 * 64, 2 * 4 * 128 * 128)
        geglu_shapes = GEGLU_SHAPES
        bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
    rows = []
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
                rows.append(row)
                print(row)
    for n in n_mix:
        fr = torch.randn(n, device=device, dtype=dtype)
        key = torch.randn(n, device=device, dtype=dtype)
        err = (score_mix_triton(fr, key, 0.3).float() - score_mix_reference(fr, key, 0.3).float()).abs().max().item()
        tf = bench(lambda: score_mix_triton(fr, key, 0.3))
        tu = bench(lambda: score_mix_reference(fr, key, 0.3))
        rows.append(dict(shape=f"{n} elems", format="-", case="score mix", dtype=args.dtype, max_abs_err=err,
                         ms_fused=tf, ms_unfused=tu, speedup=tu / tf, gbps_fused=3 * n * fr.element_size() / tf / 1e6))
        print(rows[-1])
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
        rows.append(row)
        print(row)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu"
    stem = os.path.join(args.out, f"kernels_{dev}_{args.dtype}")
    keys = ["shape", "format", "case", "dtype", "max_abs_err", "ms_fused", "ms_unfused", "speedup", "gbps_fused", "note"]
    with open(stem + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {stem}.csv (device {dev}, torch {torch.__version__})")
    return rows


if __name__ == "__main__":
    main()
