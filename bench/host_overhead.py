"""Host time frkern adds to each UNet call, without any device work.

    python bench/host_overhead.py [--config sd15] [--policy FRDiff:interval=3] [--calls 200]

With CUDA graphs a reuse step is one replay, so the Python around it (step logic, cache
validation, weights check, graph lookup, read hand-off, score mixing) must stay well under the
GPU time of a step or the host becomes the bottleneck. This runs the real UNet configuration on
PyTorch's "meta" device (shapes only, no arithmetic) through frkern's graph runner with a capture
whose replay does nothing, and reports the median host time of a call of each kind. The figures
are for this machine's CPU; a GPU host's CPU will differ. Writes a JSON record to
bench/results/local/ unless --out says otherwise.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configs import CONFIGS, TEXT  # noqa: E402
from options import add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402
from specs import GRAMMAR, check_before_imports, spec_or_exit  # noqa: E402


def parser():
    ap = new_parser(__doc__, epilog=GRAMMAR)
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS), help="UNet layout (bench/configs.py)")
    ap.add_argument("--policy", default="FRDiff:interval=3", help="frkern policy spec (grammar below)")
    ap.add_argument("--calls", type=int, default=200,
                    help="UNet calls, one per step of a schedule this long (the first 10 are not counted)")
    add_out(ap, "the JSON record")
    return ap


def check_spec(ap, args):
    return spec_or_exit(ap, args.policy, args.calls, option="--policy")  # its schedule has --calls steps


if __name__ == "__main__":
    help_before_imports(parser)
    check_before_imports(parser, check_spec)

import torch  # noqa: E402

import frkern  # noqa: E402
from record import save_json  # noqa: E402


def no_device_capture(fn, warmup=0):
    """Runs fn once (on meta: shapes only) to get its outputs; replay does nothing."""
    return (lambda: None), fn()


@torch.no_grad()  # not torch.set_grad_enabled(False): callers (tests) keep their grad mode
def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    quiet_known_warnings()
    policy = check_spec(ap, args).policy
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[args.config]).eval().half()
        size = unet.config.sample_size
        text_len, pooled = TEXT[args.config]
        x = torch.empty(2, 4, size, size, dtype=torch.half)
        ehs = torch.empty(2, text_len, unet.config.cross_attention_dim, dtype=torch.half)
        kw = {}
        if pooled:
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(2, pooled, dtype=torch.half),
                                       "time_ids": torch.empty(2, 6, dtype=torch.half)}
        t = torch.empty((), dtype=torch.long)
    handle = frkern.patch(unet, policy, backend="torch", cuda_graphs=True)
    handle.graphs.capture = no_device_capture
    n = args.calls  # the whole schedule: keyframes, jumps and reuse steps in their real proportions
    plans = policy.schedule(n)
    by_kind = {"full": [], "reuse": [], "skip": []}
    handle.begin(n)
    for i in range(n):
        handle.set_step(i)
        kind = "full" if plans[i].keyframe else ("reuse" if plans[i].runs_network else "skip")
        t0 = time.perf_counter()
        unet(x, t, ehs, **kw)
        dt = (time.perf_counter() - t0) * 1e6
        if i >= 10:  # the first calls capture the graphs
            by_kind[kind].append(dt)
    t0 = time.perf_counter()
    for _ in range(100):
        handle.runtime.weights_token()
    token_us = (time.perf_counter() - t0) * 1e4
    result = {k: round(statistics.median(v), 1) for k, v in by_kind.items() if v}
    print(f"{args.config} {args.policy}: median host microseconds per call (no device work): {result}; "
          f"of which the weights check: {token_us:.1f} us ({len(handle.runtime._params)} parameters); "
          f"graphs {handle.graph_stats}")
    path = save_json(args.out, f"host_overhead_{args.config}_{policy.name}", {
        "median_host_us_per_call": result, "weights_check_us": round(token_us, 1),
        "graph_stats": handle.graph_stats})
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
