"""frkern's main benchmark: latency, FLOPs and deviation of each policy, with a parity gate.

    python bench/latency.py                       # CPU default: the trained tiny model, 50 steps
    python bench/latency.py --config sd15 --device cuda --dtype float16 --steps 50 --out bench/results

For every method it measures, side by side in one run: the time of one UNet call of each kind
(full / reuse) and of a whole N-step CFG DDIM loop (medians after warm-up; CUDA events through
triton.testing.do_bench on a GPU), the UNet FLOPs per generation (counted by
torch.utils.flop_counter on the real loop), and the deviation of the final latents from full
compute from the same noise. Before timing, NoReuse through frkern must match the unpatched UNet
(max relative error under the dtype's tolerance); a configuration that fails is not timed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frkern  # noqa: E402
from configs import CONFIGS, TEXT  # noqa: E402
from flops import count_gflop  # noqa: E402
from record import device_name, provenance  # noqa: E402

# Tests set this to frkern.graphs.EmulatedCapture() to run the graph variants' code on a CPU.
GRAPH_CAPTURE = None
PARITY_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Compiled variants reorder arithmetic; after N steps their latents drift further from eager's.
COMPILED_RTOL = 1e-2


@dataclass
class Row:
    method: str
    backend: str = "-"
    calls: dict = field(default_factory=dict)
    gflop_per_gen: float = float("nan")
    ms_full_call: float = float("nan")
    ms_reuse_call: float = float("nan")
    ms_per_gen: float = float("nan")
    deviation: float = float("nan")
    note: str = ""


def build_unet(config: str, dtype, device):
    from diffusers import UNet2DConditionModel

    if config == "tiny":  # the model frkern trained and committed (bench/assets/tiny_model)
        from tiny_model import load

        return load(device=device, dtype=dtype)[0]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[config]).eval().to(device=device, dtype=dtype)
    return unet


def make_inputs(config, unet, batch, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    if config == "tiny":  # real conditioning: class tokens of random classes, null tokens for CFG
        from tiny_model import load

        tokens = load(device=device, dtype=dtype)[1]
        labels = torch.randint(0, tokens.num_classes, (batch,), generator=g).to(device)
        ehs = torch.cat([tokens(torch.full_like(labels, tokens.num_classes)), tokens(labels)])
        return torch.randn(batch, 3, size, size, generator=g).to(device, dtype), ehs, {}
    text_len, pooled = TEXT[config]
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(device, dtype)
    ehs = torch.randn(2 * batch, text_len, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    kw = {}
    if pooled:
        px = size * 8
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2 * batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * (2 * batch), device=device, dtype=dtype),
        }
    return latents, ehs, kw


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sample_loop(unet_fn, latents, ehs, kw, steps, handle=None, guidance=7.5):
    """CFG DDIM loop; unet_fn(x, t, ehs, **kw) -> eps for the doubled batch."""
    sch = scheduler()
    sch.set_timesteps(steps, device=latents.device)
    if handle is not None:
        handle.begin(steps)
    x = latents
    for i, t in enumerate(sch.timesteps):
        if handle is not None:
            handle.set_step(i)
        eps = unet_fn(torch.cat([x, x]), t, ehs, **kw)
        u, c = eps.chunk(2)
        x = sch.step(u + guidance * (c - u), t, x).prev_sample
    return x


def timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")

    def cpu_median(fn, reps=3):  # medians of 3 after one warm-up: CPU timings are for the demo, not claims
        fn()  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu_median


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def parity(unet, args_call, backend, dtype) -> float:
    """Max relative error (over elements, scaled by the output's max) of NoReuse vs unpatched."""
    with torch.no_grad():
        ref = unet(*args_call[0], **args_call[1]).sample
        h = frkern.patch(unet, frkern.NoReuse(), backend=backend)
        h.begin(1)
        out = unet(*args_call[0], **args_call[1]).sample
        frkern.unpatch(unet)
    if torch.isnan(out).any():
        return float("inf")
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def policy_from_spec(spec: str) -> frkern.Policy:
    """'FRDiff:interval=3,score_mix=False' -> FRDiff(interval=3, score_mix=False)."""
    name, _, argstr = spec.partition(":")
    data = {"policy": name}
    for part in filter(None, argstr.split(",")):
        k, _, v = part.partition("=")
        data[k] = json.loads(v.lower()) if v.lower() in ("true", "false") else json.loads(v)
    return frkern.policies.policy_from_dict(data)


DEFAULT_POLICIES = ["FRDiff:interval=2", "FRDiff:interval=3", "FRDiff:interval=3,score_mix=false",
                    "Clockwork:clock=2", "Clockwork:clock=4", "DeepCache:interval=3", "DeepCache:interval=5"]


@torch.no_grad()  # not torch.set_grad_enabled(False): callers (tests) keep their grad mode
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny"] + sorted(CONFIGS),
                    help="tiny: the trained model in bench/assets (real weights); others: real layouts, random weights")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1, help="images per generation (the UNet sees 2x: CFG)")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--policies", nargs="*", default=DEFAULT_POLICIES,
                    help="policy specs, e.g. FRDiff:interval=3 Clockwork:clock=2 DeepCache:interval=5")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="frkern backends to time (default: torch, plus triton on CUDA)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the plain UNet (and, on CUDA, compile + CUDA graph), "
                         "and each frkern policy with its network compiled (handle.compile())")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    ap.add_argument("--cuda-graph", action="store_true", help="also time the plain UNet captured in a CUDA graph")
    ap.add_argument("--graphs", default=None, choices=["off", "on", "both"],
                    help="frkern with cuda_graphs off/on (default: both on CUDA, off elsewhere)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", default="bench/results/local", help="folder for the JSON and markdown results")
    ap.add_argument("--tag", default="", help="suffix of the result files (several runs, one folder)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    backends = args.backends or (["torch", "triton"] if device.type == "cuda" else ["torch"])
    graph_modes = {"off": [False], "on": [True], "both": [False, True]}[
        args.graphs or ("both" if device.type == "cuda" else "off")]
    if True in graph_modes and device.type != "cuda" and GRAPH_CAPTURE is None:
        ap.error("--graphs on/both needs --device cuda")
    unet = build_unet(args.config, dtype, device)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    latents, ehs, kw = make_inputs(args.config, unet, args.batch, dtype, device)
    x2 = torch.cat([latents, latents])
    call_args = ((x2, torch.tensor(500, device=device), ehs), kw)
    bench = timer(device)
    unet_fn = lambda x, t, e, **k: unet(x, t, e, **k).sample  # noqa: E731

    print(f"# frkern latency: config={args.config} steps={args.steps} batch={args.batch} (UNet batch "
          f"{2 * args.batch}) dtype={dtype} device={device} "
          f"{device_name(device)}")
    rows: list[Row] = []
    parity_errors = {b: parity(unet, call_args, b, dtype) for b in backends}
    for b, e in parity_errors.items():
        ok = e <= PARITY_RTOL[dtype]
        print(f"parity NoReuse[{b}] vs unpatched: max rel err {e:.2e} (tol {PARITY_RTOL[dtype]:.0e}) {'ok' if ok else 'FAILED'}")

    # Reference: full compute, eager diffusers.
    x_ref = sample_loop(unet_fn, latents, ehs, kw, args.steps)
    base = Row("diffusers eager", calls={"full": args.steps})
    base.gflop_per_gen = count_gflop(lambda: sample_loop(unet_fn, latents, ehs, kw, args.steps))
    base.ms_full_call = bench(lambda: unet(*call_args[0], **call_args[1]))
    base.ms_per_gen = bench(lambda: sample_loop(unet_fn, latents, ehs, kw, args.steps))
    base.deviation = 0.0
    rows.append(base)

    if args.cuda_graph and device.type == "cuda":
        rows.append(time_cuda_graph(unet, call_args, bench, args.steps))
    if args.compile:
        rows.append(time_compiled(unet, call_args, latents, ehs, kw, args.steps, bench, x_ref, args.compile_backend))
        if device.type == "cuda":
            rows.append(time_compiled(unet, call_args, latents, ehs, kw, args.steps, bench, x_ref, args.compile_backend,
                                      mode="reduce-overhead"))
    rows += time_deepcache_package(args, unet, latents, ehs, kw, bench, x_ref)

    for backend in backends:
        if parity_errors[backend] > PARITY_RTOL[dtype]:
            rows.append(Row("frkern (all policies)", backend, note=f"not timed: parity failed ({parity_errors[backend]:.1e})"))
            continue
        variants = [(g, False) for g in graph_modes] + ([(g, True) for g in graph_modes] if args.compile else [])
        for spec in ["NoReuse"] + list(args.policies):
            policy = policy_from_spec(spec)
            x_eager = None  # this policy's eager latents: graphed and compiled runs must agree with them
            gflop = float("nan")
            for graphs, compiled in variants:
                label = backend + ("+graphs" if graphs else "") + ("+compile" if compiled else "")
                handle = frkern.patch(unet, policy, backend=backend, cuda_graphs=graphs)
                if graphs and GRAPH_CAPTURE is not None:
                    handle.graphs.capture = GRAPH_CAPTURE
                if compiled:
                    handle.compile(backend=args.compile_backend)
                row = Row(f"frkern {spec}", label)
                run_gen = lambda: sample_loop(unet_fn, latents, ehs, kw, args.steps, handle)  # noqa: E731
                x = run_gen()
                row.calls = {k: v for k, v in handle.stats.items()}
                row.deviation = rel(x, x_ref)
                if x_eager is None:
                    x_eager = x
                elif rel(x, x_eager) > (COMPILED_RTOL if compiled else PARITY_RTOL[dtype]) or torch.isnan(x).any():
                    row.note = f"not timed: differs from eager {spec} by {rel(x, x_eager):.1e}"
                    frkern.unpatch(unet)
                    rows.append(row)
                    continue
                if not (graphs or compiled):  # FLOPs do not depend on graphs or compilation
                    gflop = count_gflop(run_gen)
                row.gflop_per_gen = gflop
                row.ms_per_gen = bench(run_gen)
                row.ms_full_call, row.ms_reuse_call = time_step_kinds(unet, handle, policy, call_args, bench)
                if graphs:
                    row.note = "graphs: " + ", ".join(f"{k} {v}" for k, v in sorted(handle.graph_stats.items()))
                frkern.unpatch(unet)
                rows.append(row)
                # results so far on disk after every row: a GPU call cut off at its time limit keeps them
                report(rows, args, device, dtype, parity_errors, quiet=True)

    report(rows, args, device, dtype, parity_errors)
    return rows


def time_step_kinds(unet, handle, policy, call_args, bench):
    """Time one full call and one reuse call of this policy (cache filled by a keyframe first)."""
    handle.begin(1000)
    full = bench(lambda: (handle.set_step(0), unet(*call_args[0], **call_args[1])))
    plans = policy.schedule(1000)
    reuse_step = next((i for i, p in enumerate(plans) if not p.keyframe and p.runs_network), None)
    if reuse_step is None:
        return full, float("nan")
    key = max(i for i in range(reuse_step) if plans[i].keyframe)

    def reuse_call():
        handle.set_step(reuse_step)
        unet(*call_args[0], **call_args[1])

    handle.set_step(key)
    unet(*call_args[0], **call_args[1])
    return full, bench(reuse_call)


def time_cuda_graph(unet, call_args, bench, steps):
    row = Row("diffusers eager in one CUDA graph", calls={"full": steps})
    static_out = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            unet(*call_args[0], **call_args[1])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = unet(*call_args[0], **call_args[1]).sample  # noqa: F841
    row.ms_full_call = bench(g.replay)
    row.ms_per_gen = row.ms_full_call * steps
    row.note = "per generation = steps x call (UNet time only)"
    return row


def time_compiled(unet, call_args, latents, ehs, kw, steps, bench, x_ref, backend, mode=None):
    name = "torch.compile" + (" + CUDA graph (mode reduce-overhead)" if mode == "reduce-overhead" else " (default)")
    row = Row(name, backend, calls={"full": steps})
    cu = torch.compile(copy.deepcopy(unet), backend=backend, mode=mode)
    t0 = time.perf_counter()
    cu(*call_args[0], **call_args[1])
    row.note = f"compile {time.perf_counter() - t0:.0f} s"
    fn = lambda x, t, e, **k: cu(x, t, e, **k).sample  # noqa: E731
    row.ms_full_call = bench(lambda: cu(*call_args[0], **call_args[1]))
    row.ms_per_gen = bench(lambda: sample_loop(fn, latents, ehs, kw, steps))
    row.deviation = rel(sample_loop(fn, latents, ehs, kw, steps), x_ref)
    return row


def time_deepcache_package(args, unet, latents, ehs, kw, bench, x_ref):
    """The `deepcache` package's own helper on the same UNet, if it is installed."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return [Row("DeepCache package", note="not installed")]
    rows = []
    for spec in [p for p in args.policies if p.startswith("DeepCache")]:
        pol = policy_from_spec(spec)

        class _Pipe:  # the helper reads pipe.unet and pipe.scheduler.timesteps
            pass

        pipe = _Pipe()
        pipe.unet = unet
        pipe.scheduler = scheduler()
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=pol.interval, cache_branch_id=pol.branch)
        helper.enable()

        def run():
            sch = pipe.scheduler
            sch.set_timesteps(args.steps, device=latents.device)
            helper.start_timestep = None
            x = latents
            for t in sch.timesteps:
                eps = unet(torch.cat([x, x]), t, ehs, **kw).sample
                u, c = eps.chunk(2)
                x = sch.step(u + 7.5 * (c - u), t, x).prev_sample
            return x

        row = Row(f"DeepCache package {spec}", "deepcache 0.1.1")
        row.deviation = rel(run(), x_ref)
        row.gflop_per_gen = count_gflop(run)
        row.ms_per_gen = bench(run)
        helper.disable()
        unet.__dict__.pop("forward", None)
        rows.append(row)
    return rows


def report(rows, args, device, dtype, parity_errors, quiet=False):
    base = rows[0]
    head = ["method", "backend", "UNet calls (full/reuse/skip)", "GFLOP/gen", "ms full call", "ms reuse call",
            "ms/gen", "speed-up", "rel. dev. of latents", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        calls = "/".join(str(r.calls.get(k, 0)) for k in ("full", "reuse", "skip")) if r.calls else "-"
        if r.calls.get("promoted"):
            calls += f" ({r.calls['promoted']} promoted)"
        speed = base.ms_per_gen / r.ms_per_gen if r.ms_per_gen == r.ms_per_gen else float("nan")
        cells = [r.method, r.backend, calls, f"{r.gflop_per_gen:.1f}", f"{r.ms_full_call:.2f}", f"{r.ms_reuse_call:.2f}",
                 f"{r.ms_per_gen:.1f}", f"{speed:.2f}x", f"{r.deviation:.4f}", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if not quiet:
        print(table)
    meta = {**provenance(device), "config": args.config, "steps": args.steps, "batch": args.batch,
            "dtype": str(dtype), "parity_max_rel_err": parity_errors}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"latency_{args.config}_{device.type}_{str(dtype).split('.')[-1]}_{args.steps}steps"
                        + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": [r.__dict__ for r in rows]}, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(f"# latency: {args.config}, {args.steps} steps, batch {args.batch}, {dtype}, {meta['device']}\n\n")
        f.write("```\n" + json.dumps(meta, indent=1, default=str) + "\n```\n\n" + table + "\n")
    if not quiet:
        print(f"wrote {stem}.json and {stem}.md")



if __name__ == "__main__":
    main()
