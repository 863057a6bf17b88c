"""How torch.compile sees a patched UNet: graph breaks and recompiles over several generations.

    python bench/compile_check.py [--backend eager|inductor] [--policy FRDiff:interval=2]
Dynamo-level facts (graph count, breaks, recompiles) do not depend on the backend; "eager" skips
code generation so the check takes seconds on a CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frkern  # noqa: E402
from latency import policy_from_spec  # noqa: E402
from tiny_model import load, sample  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--policy", default="FRDiff:interval=2")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    unet, tokens = load()
    labels = torch.arange(2)
    ref = sample(unet, tokens, labels, steps=args.steps, seed=0)
    handle = frkern.patch(unet, policy_from_spec(args.policy), backend="torch")
    eager = sample(unet, tokens, labels, steps=args.steps, seed=0, handle=handle)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend=args.backend)
    per_gen = []
    for g in range(args.generations):
        before = sum(counters["stats"].values()), dict(counters["graph_break"])
        out = sample(compiled, tokens, labels, steps=args.steps, seed=0, handle=handle)
        per_gen.append({"generation": g, "frames_compiled": counters["stats"]["unique_graphs"],
                        "graph_breaks_total": sum(counters["graph_break"].values()),
                        "max_abs_diff_vs_eager_patched": (out - eager).abs().max().item()})
    print(f"policy {args.policy}, backend {args.backend}, torch {torch.__version__}")
    for row in per_gen:
        print(row)
    print("graph break reasons:")
    for reason, n in counters["graph_break"].items():
        print(f"  {n} x {reason[:160]}")
    print(f"deviation of the patched output from full compute: {(eager - ref).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
