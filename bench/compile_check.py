"""How torch.compile sees a patched UNet: graphs, graph breaks and recompiles over generations.

    python bench/compile_check.py [--backend inductor|eager] [--policy FRDiff:interval=2] [--out DIR]

Compiles the patched trained tiny model with fullgraph=True and samples several generations from
the same noise (2 images, one per class 0 and 1, guidance 3). Per generation it reports the graphs
compiled so far, graph breaks, wall time, and the largest difference from the eager patched UNet
(max |x_compiled - x_eager| over the final images' values; compiled code reorders arithmetic, so a
few 1e-5 is expected in float32). Steady state means: the graph count stops growing after the
first generation (one graph per step kind) and there are no breaks.

It also states how far the policy itself is from full compute (nothing to do with compilation):
the eager patched run against the unpatched UNet from the same noise, as the max absolute
difference over the final images' values (pixel space, values in about [-1, 1]) and as the
relative L2 deviation ||x - x_full||_2 / ||x_full||_2 (the figure bench/latency.py reports). With
10 steps, FRDiff M=2 + score mixing gives a max abs difference of 0.70 (a few pixel values move a
lot) and a relative L2 deviation of 0.10; both are in the JSON (deviation_vs_full_compute).

The default backend is torch.compile's own, inductor, as in the README's torch.compile section
(pipe.unet = torch.compile(pipe.unet, fullgraph=True)): it generates code (a C++ compiler on a
CPU; the first generation takes about 20 s there) and shows the compiled speed. --backend eager
checks the dynamo-level facts only (graphs, breaks, recompiles do not depend on the backend)
without generating code. CPU timings here are single runs, indicative only. Writes a JSON record to
bench/results/local/ unless --out says otherwise.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402
from specs import GRAMMAR, check_before_imports, spec_or_exit  # noqa: E402

DEVIATION = ("deviation of the eager patched run from full compute (the unpatched UNet, same noise), over the "
             "final images' values (pixel space, about [-1, 1]): max_abs = max |x - x_full|, rel_l2 = "
             "||x - x_full||_2 / ||x_full||_2; the policy's own error, not compilation's")


def parser():
    ap = new_parser(__doc__, epilog=GRAMMAR)
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend: inductor (torch.compile's default, as in the README), aot_eager, "
                         "or eager (dynamo only: graphs and breaks without code generation)")
    ap.add_argument("--policy", default="FRDiff:interval=2", help="frkern policy spec (grammar below)")
    ap.add_argument("--generations", type=int, default=3, help="generations sampled through the compiled UNet")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per generation")
    add_out(ap, "the JSON record")
    return ap


def check_spec(ap, args):
    return spec_or_exit(ap, args.policy, args.steps, option="--policy")


if __name__ == "__main__":
    help_before_imports(parser)
    check_before_imports(parser, check_spec)

import torch  # noqa: E402

import frkern  # noqa: E402
from record import save_json  # noqa: E402
from tiny_model import load, sample  # noqa: E402


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    quiet_known_warnings()
    policy = check_spec(ap, args).policy
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    unet, tokens = load()
    labels = torch.arange(2)
    ref = sample(unet, tokens, labels, steps=args.steps, seed=0)
    handle = frkern.patch(unet, policy, backend="torch")
    t0 = time.perf_counter()
    eager = sample(unet, tokens, labels, steps=args.steps, seed=0, handle=handle)
    eager_s = time.perf_counter() - t0
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend=args.backend, fullgraph=True)
    per_gen = []
    for g in range(args.generations):
        t0 = time.perf_counter()
        out = sample(compiled, tokens, labels, steps=args.steps, seed=0, handle=handle)
        per_gen.append({"generation": g, "seconds": round(time.perf_counter() - t0, 3),
                        "graphs_compiled": counters["stats"]["unique_graphs"],
                        "graph_breaks": sum(counters["graph_break"].values()),
                        "max_abs_diff_vs_eager_patched": (out - eager).abs().max().item()})
    print(f"policy {args.policy}, backend {args.backend}, torch {torch.__version__}, {args.steps} steps per generation")
    print(f"eager patched generation: {eager_s:.3f} s; calls per generation {handle.stats}")
    for row in per_gen:
        print(row)
    for reason, n in counters["graph_break"].items():
        print(f"  graph break {n} x {reason[:160]}")
    deviation = {"max_abs": (eager - ref).abs().max().item(),
                 "rel_l2": ((eager.double() - ref.double()).norm() / ref.double().norm()).item(),
                 "what": DEVIATION}
    print(f"the policy vs full compute (eager, no compilation; final images, pixel values in about [-1, 1]): "
          f"max abs difference {deviation['max_abs']:.3e}, relative L2 deviation {deviation['rel_l2']:.3e}")
    path = save_json(args.out, f"compile_check_tiny_{args.backend}_{policy.name}", {
        "policy": args.policy, "backend": args.backend, "steps": args.steps,
        "eager_patched_seconds": round(eager_s, 3), "calls_per_generation": handle.stats,
        "deviation_vs_full_compute": deviation, "generations": per_gen})
    print(f"wrote {path}")
    return deviation, per_gen


if __name__ == "__main__":
    main()
