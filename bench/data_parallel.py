"""frkern on several processes: the main benchmark's workload split across ranks, with throughput.

    torchrun --nproc-per-node 2 bench/data_parallel.py --policy FRDiff:interval=3
    torchrun --nproc-per-node 2 bench/data_parallel.py --policy Adaptive:threshold=0.04,reuse=clockwork --cfg-parallel
    python bench/data_parallel.py --policy FRDiff:interval=3          # one process: the baseline

Workload: bench/latency.py's (its helpers, imported): by default the trained tiny model
(bench/assets/tiny_model, --config tiny), a CFG DDIM loop of --steps steps at guidance 7.5 run as a
hand-written loop (handle.begin / set_step), --batch images per generation. --images images in all
make --images / --batch generations; generation g draws its noise and classes from seed g
(latency.make_inputs), so its images are the same whichever rank runs it.

Replicas (default; what `torchrun`, `accelerate launch` and Ray Serve replicas do): every rank
loads and patches its own UNet (a patched model cannot be pickled: patch inside each process)
and runs its share of the generations (frkern.distributed.shard: contiguous, as Accelerate's
split_between_processes). Reuse decisions, Adaptive's included, are each rank's own: no
collective runs during a generation. Each rank's images equal a single-process run of the same
generations bit for bit (backend torch; tests/test_distributed.py checks it).

--cfg-parallel: ranks in pairs (0, 1), (2, 3), ... split each generation's CFG batch
([uncond; cond]) over the pair (frkern.distributed.cfg_parallel, one process group per pair;
Adaptive's indicator is all-reduced over the pair only); pairs are replicas of each other. It
also reports the collectives' median host milliseconds per call (on NCCL the time to enqueue).

Timing: each rank patches, runs one untimed warm-up generation, waits at a barrier, then times its
share (on CUDA synchronized at the end). Per rank: its images / its wall time. Total: all images /
the slowest rank's wall time (one pair's when CFG-parallel: both ranks of a pair make the same
images). Process groups: gloo on a CPU, NCCL on CUDA (each rank on cuda:LOCAL_RANK). On a CPU each
rank uses --threads torch threads (default 1): two ranks on a 2-core machine get one core each.
Results: printed, and a JSON record from rank 0 in bench/results/local/ unless --out says otherwise.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# stdlib only, like options and specs: --help needs no torch
from configs import CONFIGS  # noqa: E402
from options import add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402
from specs import GRAMMAR, check_before_imports, spec_or_exit  # noqa: E402


def parser():
    """The command line; needs no torch, so that --help answers before torch and diffusers load."""
    ap = new_parser(__doc__, epilog=GRAMMAR)
    ap.add_argument("--policy", default="FRDiff:interval=3", help="frkern policy spec (grammar below)")
    ap.add_argument("--config", default="tiny", choices=["tiny", "dry"] + sorted(CONFIGS),
                    help="UNet as bench/latency.py builds it: tiny (the trained model in bench/assets), dry (a "
                         "minimal SD layout, random weights), or a real layout with random weights")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per generation")
    ap.add_argument("--images", type=int, default=8, help="images in all, over every rank (a multiple of --batch)")
    ap.add_argument("--batch", type=int, default=1, help="images per generation (the UNet sees 2x: CFG)")
    ap.add_argument("--cfg-parallel", action="store_true",
                    help="ranks in pairs split each generation's CFG batch (frkern.distributed.cfg_parallel); "
                         "needs an even number of ranks")
    ap.add_argument("--backend", default=None, choices=["auto", "torch", "triton"],
                    help="frkern backend (default: torch on a CPU, auto on CUDA)")
    ap.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda if available, else cpu; CUDA ranks use cuda:LOCAL_RANK)")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="dtype of the UNet and its inputs (default: float16 on CUDA, float32 on CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads per rank (default: 1 on a CPU, torch's own on CUDA)")
    add_out(ap, "the JSON record (written by rank 0)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    return ap


def check_args(ap, args):
    """The policy spec parsed and checked against --steps, and the sizes; exits with one line."""
    spec = spec_or_exit(ap, args.policy, args.steps, option="--policy")
    if args.steps < 1 or args.batch < 1 or args.images < 1 or args.images % args.batch:
        ap.error(f"--steps, --batch and --images must be >= 1 and --images a multiple of --batch "
                 f"(got {args.steps}, {args.batch}, {args.images})")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    return spec


if __name__ == "__main__":
    help_before_imports(parser)  # prints the help and exits before torch, diffusers and frkern load
    check_before_imports(parser, check_args)  # a bad spec exits here, before they load

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import frkern  # noqa: E402
import frkern.distributed as fd  # noqa: E402
from latency import Workload, build_unet, make_inputs  # noqa: E402
from record import device_name, save_json  # noqa: E402

WARMUP_SEED = 10**6  # the untimed warm-up generation's inputs


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@torch.no_grad()
def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    spec = check_args(ap, args)
    quiet_known_warnings()
    world, rank, local_rank = env_int("WORLD_SIZE", 1), env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    if args.cfg_parallel and world % 2:
        ap.error(f"--cfg-parallel needs an even number of ranks (pairs), got WORLD_SIZE={world}; "
                 "run it under torchrun --nproc-per-node 2 (or 4, ...)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():  # NCCL refuses two ranks on one GPU
            ap.error(f"LOCAL_RANK={local_rank} but {torch.cuda.device_count()} CUDA device(s): one rank per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    backend = args.backend or ("torch" if device.type == "cpu" else "auto")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else threads_before))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return run(args, spec, world, rank, device, dtype, backend)
    finally:
        if world > 1:
            dist.destroy_process_group()
        torch.set_num_threads(threads_before)


def run(args, spec, world, rank, device, dtype, backend) -> dict:
    generations = list(range(args.images // args.batch))
    # who makes which generations: every rank its share, or every pair of ranks (CFG-parallel) its share
    units, unit = (world // 2, rank // 2) if args.cfg_parallel else (world, rank)
    mine = fd.shard(generations, unit, units)
    unet = build_unet(args.config, dtype, device)
    handle = frkern.patch(unet, spec.policy, backend=backend)
    split = None
    if args.cfg_parallel:
        groups = [dist.new_group([2 * p, 2 * p + 1]) for p in range(world // 2)]  # every rank makes every group
        split = fd.cfg_parallel(handle, group=groups[unit])

    def work(seed):
        return Workload(*make_inputs(args.config, unet, args.batch, dtype, device, seed=seed), steps=args.steps)

    work(WARMUP_SEED).generate(unet, handle)  # untimed: lazy initialisation, allocator, first kernels
    if split is not None:
        for seconds in split.timings.values():
            seconds.clear()
    decisions = {}
    workloads = [work(g) for g in mine]  # inputs made before the timing
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for w in workloads:
        w.generate(unet, handle)
        decisions = {k: v for k, v in handle.stats.items() if k != "indicator"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    mine_record = {"rank": rank, "unit": unit, "generations": len(mine), "images": len(mine) * args.batch,
                   "wall_s": wall, "images_per_s": len(mine) * args.batch / wall if mine else 0.0,
                   "last_generation_calls": decisions, "device": device_name(device)}
    if split is not None:
        mine_record["collective_ms"] = split.collective_ms()
        mine_record["collective_calls"] = {k: len(v) for k, v in split.timings.items()}
    records = [mine_record]
    if world > 1:
        records = [None] * world
        dist.all_gather_object(records, mine_record)
    slowest = max(r["wall_s"] for r in records)
    total = {"images": len(generations) * args.batch, "wall_s": slowest,
             "images_per_s": len(generations) * args.batch / slowest}
    result = {"policy": spec.label, "config": args.config, "steps": args.steps, "batch": args.batch,
              "mode": "cfg-parallel pairs" if args.cfg_parallel else "replicas", "world_size": world,
              "backend": backend, "dtype": str(dtype), "threads_per_rank": torch.get_num_threads(),
              "ranks": records, "total": total}
    if rank == 0:
        report(result)
        name = f"data_parallel_{args.config}_{spec.policy.name}_{'cfg' if args.cfg_parallel else 'dp'}{world}"
        path = save_json(args.out, name + (f"_{args.tag}" if args.tag else ""), result, device)
        print(f"# written: {path}")
    if split is not None:
        split.undo()
    frkern.unpatch(unet)
    return result


def report(result: dict) -> None:
    print(f"# frkern {result['mode']}: {result['world_size']} rank(s), policy {result['policy']}, config "
          f"{result['config']}, {result['steps']} DDIM steps, batch {result['batch']} (UNet batch "
          f"{2 * result['batch']}), backend {result['backend']}, {result['dtype']}, "
          f"{result['threads_per_rank']} torch thread(s) per rank")
    print("| rank | pair | images | wall s | images/s | calls of its last generation "
          "| collective ms (median, per call) |")
    print("|---|---|---|---|---|---|---|")
    for r in result["ranks"]:
        coll = ", ".join(f"{k} {v:.3f}" for k, v in r.get("collective_ms", {}).items()) or "-"
        pair = r["unit"] if result["mode"] != "replicas" else "-"
        print(f"| {r['rank']} | {pair} | {r['images']} | {r['wall_s']:.2f} | {r['images_per_s']:.2f} | "
              f"{r['last_generation_calls']} | {coll} |")
    t = result["total"]
    print(f"| total | | {t['images']} | {t['wall_s']:.2f} (slowest rank) | {t['images_per_s']:.2f} | | |")


if __name__ == "__main__":
    main()
