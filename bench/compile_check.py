"""How torch.compile sees a patched UNet: graphs, graph breaks and recompiles over generations.

    python bench/compile_check.py [--backend eager|inductor] [--policy FRDiff:interval=2] [--out DIR]

Compiles the patched trained tiny model with fullgraph=True and samples several generations from
the same noise. Per generation it reports the graphs compiled so far, graph breaks, wall time, and
the largest difference from the eager patched UNet. Steady state means: the graph count stops
growing after the first generation (one graph per step kind) and there are no breaks. Dynamo-level
facts do not depend on the backend; "eager" skips code generation and takes seconds on a CPU,
"inductor" shows the compiled speed (CPU timings here are single runs, indicative only).
Writes a JSON record to bench/results/local/ unless --out says otherwise.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frkern  # noqa: E402
from latency import policy_from_spec  # noqa: E402
from options import add_out  # noqa: E402
from options import parser as new_parser  # noqa: E402
from record import save_json  # noqa: E402
from tiny_model import load, sample  # noqa: E402


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--backend", default="eager", help="torch.compile backend (eager, aot_eager, inductor)")
    ap.add_argument("--policy", default="FRDiff:interval=2", help="frkern policy spec, as in bench/latency.py")
    ap.add_argument("--generations", type=int, default=3, help="generations sampled through the compiled UNet")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per generation")
    add_out(ap, "the JSON record")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    unet, tokens = load()
    labels = torch.arange(2)
    ref = sample(unet, tokens, labels, steps=args.steps, seed=0)
    handle = frkern.patch(unet, policy_from_spec(args.policy), backend="torch")
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
    dev = (eager - ref).abs().max().item()
    print(f"deviation of the patched output from full compute: {dev:.3e}")
    path = save_json(args.out, f"compile_check_tiny_{args.backend}_{args.policy.split(':')[0]}", {
        "policy": args.policy, "backend": args.backend, "steps": args.steps,
        "eager_patched_seconds": round(eager_s, 3), "calls_per_generation": handle.stats,
        "generations": per_gen})
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
