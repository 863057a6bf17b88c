"""The stages of the GPU round after setup: run by bench/gpu/round.sh, which installs frkern (and
the carried wheels) into a temp dir, puts only that dir on PYTHONPATH and then runs

    python3 -P bench/gpu/round.py --mode gpu|cpu --out OUT --work WORK --start EPOCH --setup STATUS:SECONDS

Each stage is one command with a time budget (its timeout). The round has one deadline, counted
from round.sh's start; a stage that would start with less than its budget left is skipped and
recorded as skipped. A failed preflight stops the round (the later stages are recorded as skipped).
What a stage did is appended to OUT/env.txt as a `stage: {json}` line as soon as it ends, and
summary.md is rewritten by bench/gpu/summarize.py after every stage, so a round cut off keeps both.

--mode gpu runs every stage as its own process (`python3 -P ...`, a new session, killed with its
children at the timeout). --mode cpu (the dry run, `bash bench/gpu/round.sh --cpu`) runs the same
command lines with CPU substitutions appended (later options win in argparse: tiny config, few
steps, emulated graphs, Triton's interpreter) and, to keep it to seconds, forks each stage from
this process after importing torch, diffusers and frkern once instead of starting a new
interpreter (no GPU there, so no CUDA state to lose in a fork).

Files in OUT (8, the device tool's limit): env.txt, preflight.log, tests.log, bench.log (kernels,
latency and compile output), kernels.csv, latency.json, compile.json, summary.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import summarize  # noqa: E402  (stdlib only)

# Seconds from round.sh's start: the device command's limit is 600 s; the rest is margin for the
# summary and for a stage killed at its timeout.
DEADLINE = {"gpu": 560, "cpu": 400}
# The frkern policies of the latency rows (NoReuse is always there). Adaptive with a threshold
# above every change and max_reuse 1 runs Clockwork clock 2's schedule plus one probe (and one
# host read) per reuse call: its row against Clockwork's is the cost of deciding.
POLICIES = ["FRDiff:interval=3", "Clockwork:clock=2", "DeepCache:interval=3",
            'Adaptive:threshold=1e9,reuse="clockwork",max_reuse=1', "SkipConv:threshold=0.05",
            "EncoderPropagation:interval=5", "TGate"]
SD15 = ["--config", "sd15", "--device", "cuda", "--dtype", "float16", "--steps", "50", "--batch", "1",
        "--channels-last", "--repeats", "5"]
# Appended in the dry run: later options override earlier ones, and the GPU ones are still parsed.
DRY = ["--config", "dry", "--device", "cpu", "--dtype", "float32", "--steps", "3", "--repeats", "1"]
# The kernels stage: its budget (timeout) and, inside it, the seconds kernel_bench keeps for its
# last row (a compile and a timing started just before its --time-budget), its CSV and its exit.
KERNELS_BUDGET = {"gpu": 120, "cpu": 90}
KERNEL_MARGIN_S = 20
# The kernel, CUDA-graph and compile tests (the other files run the same on a CPU).
TEST_NODES = ["tests/test_triton_backend.py", "tests/test_units.py", "tests/test_graphs.py", "tests/test_compile.py",
              "tests/test_skip_conv.py::test_cuda_graphs_equal_eager_skip_conv",
              "tests/test_adaptive.py::test_cuda_graphs_equal_eager_with_probe_and_resume_graphs",
              "tests/test_offload.py::test_real_cuda_graphs_under_model_cpu_offload"]


@dataclasses.dataclass
class Stage:
    name: str
    budget: dict  # mode -> seconds: the stage's timeout, and what must be left to start it
    argv: list  # after `python3 -P`
    dry: list  # appended to argv in the dry run
    log: str  # file in OUT its output goes to
    results: tuple = ()  # (glob in WORK, file in OUT) copied after it ends, also after a timeout
    required: bool = False  # a failure stops the round
    what: str = ""
    dry_env: dict = dataclasses.field(default_factory=dict)  # environment of the stage in the dry run


def stages(mode: str, work: str) -> list[Stage]:
    # --run-slow: the round picks its tests itself; the extended tier's (compile, Triton in a patched
    # UNet) are the ones a GPU is for
    # -v: a line per test as it ends, so a stage cut off at its budget still says what passed and failed
    pytest_args = ["-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "--run-slow"]
    if mode == "gpu" and importlib.util.find_spec("xdist") is not None:  # the GPU image has pytest-xdist
        pytest_args += ["-n", "4", "--dist", "load"]  # Triton's and inductor's compiles side by side
    if mode == "gpu" and importlib.util.find_spec("pytest_timeout") is not None:
        pytest_args += ["--timeout", "90"]  # one hung test fails alone, not the stage
    tests = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_kernel_*.py")))
    return [
        Stage("preflight", {"gpu": 90, "cpu": 90}, ["bench/gpu/preflight.py"], ["--cpu"], "preflight.log",
              required=True, what="custom ops on Triton, ops in a CUDA graph, a patched UNet under cuda_graphs=True"),
        Stage("tests", {"gpu": 150, "cpu": 120}, pytest_args + tests + TEST_NODES,
              # dry run: every listed test collected (a renamed one fails here), one run
              ["-k", "score_mix and every_output"], "tests.log",
              what="pytest on the GPU: kernels, CUDA graphs (real capture), torch.compile with the Triton backend"),
        # --time-budget: the bench stops timing KERNEL_MARGIN_S before the stage's timeout and writes
        # what it measured (the compressed cache's rows before Skip-Convolution's, which are cut first)
        Stage("kernels", KERNELS_BUDGET,
              ["bench/kernel_bench.py", "--shapes", "sd15", "--dtype", "float16", "--out", f"{work}/kernels",
               "--time-budget", str(KERNELS_BUDGET["gpu"] - KERNEL_MARGIN_S)],
              # dry run: two of the six case groups (each GroupNorm, cache-consumer or Skip-Convolution
              # case takes seconds in Triton's interpreter; tests/test_bench.py runs them all)
              ["--smoke", "--dtype", "float32", "--cases", "score_mix", "geglu",
               "--time-budget", str(KERNELS_BUDGET["cpu"] - KERNEL_MARGIN_S)], "bench.log",
              (f"{work}/kernels/kernels_*.csv", "kernels.csv"),
              what="each fused kernel against its unfused sequence, SD1.5 shapes"),
        Stage("latency", {"gpu": 210, "cpu": 120},
              ["bench/latency.py", *SD15, "--backends", "triton", "--graphs", "on", "--cuda-graph",
               "--policies", *POLICIES, "--out", f"{work}/latency"],
              # dry run: the torch backend (a whole UNet call takes seconds in Triton's interpreter;
              # preflight and kernels ran the Triton kernels there)
              [*DRY, "--emulate-graphs", "--backends", "torch"], "bench.log",
              (f"{work}/latency/latency_*.json", "latency.json"),
              what="SD1.5 fp16 batch 2 (CFG), 50 steps: eager, eager in one CUDA graph, the deepcache package, "
                   "frkern with kernels + CUDA graphs (each checked against its eager run)"),
        Stage("compile", {"gpu": 150, "cpu": 120},
              ["bench/latency.py", *SD15, "--no-frkern", "--compile-graph", "--policies", "--out", f"{work}/compile"],
              [*DRY, "--compile-backend", "eager"], "bench.log", (f"{work}/compile/latency_*.json", "compile.json"),
              what="SD1.5: torch.compile + CUDA graph (mode reduce-overhead) against eager",
              # dry run: the rows' code without dynamo's trace (~10 s here; tests/test_bench.py traces it)
              dry_env={"TORCHDYNAMO_DISABLE": "1"}),
    ]


def preload() -> float:
    """Dry run: import once what every stage imports, so that each forked stage starts warm."""
    t0 = time.perf_counter()
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401
    import triton  # noqa: F401
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401

    import frkern  # noqa: F401
    import frkern.graphs  # noqa: F401
    import frkern.ops  # noqa: F401
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        pass
    return time.perf_counter() - t0


def forked(argv: list, log, env: dict) -> int:
    """Dry run: the stage in a child of this process, as `python3 -P argv` would run it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # whatever sys.stdout was (a capture, under pytest), the stage writes to the log
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        os.environ.update(env)
        if env.get("TORCHDYNAMO_DISABLE") == "1":  # dynamo's config read it when preload() imported it
            import torch._dynamo.config

            torch._dynamo.config.disable = True
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, timeout: float) -> tuple[int | None, bool]:
    """(exit code, timed out): a stage past its timeout is killed with its whole session."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() >= end:
            break
        time.sleep(0.05)
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        end = time.monotonic() + grace
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), True
            time.sleep(0.05)
    return None, True


def record(out: str, entry: dict) -> None:
    with open(os.path.join(out, "env.txt"), "a") as f:
        f.write("stage: " + json.dumps(entry) + "\n")
    print(f"[round] {entry['name']}: {entry['status']} ({entry['seconds']:.0f} s of {entry['budget']} s)"
          + (f" - {entry['note']}" if entry.get("note") else ""), flush=True)


def environment(mode: str, out: str, work: str, deadline: float, setup: str) -> None:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    frkern_spec = importlib.util.find_spec("frkern")
    kernels_spec = importlib.util.find_spec("kernels")
    lines = [f"mode: {mode}" + (" (CPU dry run: timings mean nothing)" if mode == "cpu" else ""),
             f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
             f"python: {platform.python_version()} ({sys.executable})",
             "packages: " + ", ".join(f"{n} {version(n)}" for n in
                                      ("torch", "triton", "diffusers", "DeepCache", "frkern", "transformers", "pytest",
                                       "pytest-xdist", "pytest-timeout")),
             f"frkern from: {frkern_spec.origin if frkern_spec else 'not importable'}",
             f"top-level `kernels` module: {kernels_spec.origin if kernels_spec else 'none (as it must be)'}",
             f"PYTHONPATH: {os.environ.get('PYTHONPATH', '')}",
             f"deadline: {deadline:.0f} s after round.sh started; budgets: " +
             ", ".join(f"{s.name} {s.budget[mode]} s" for s in stages(mode, work))]
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:
        commit = ""
    lines.append(f"commit: {commit or os.environ.get('ROUND_COMMIT', 'unknown (no .git here)')}")
    if mode == "gpu":
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                                  "clocks.max.sm,power.limit,temperature.gpu", "--format=csv"],
                                 capture_output=True, text=True, timeout=30)
            lines.append("nvidia-smi:\n" + (smi.stdout + smi.stderr).strip())
        except Exception as e:
            lines.append(f"nvidia-smi: {e}")
    with open(os.path.join(out, "env.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
        setup_log = os.path.join(work, "setup.log")
        if os.path.exists(setup_log):
            f.write("setup log:\n" + open(setup_log).read().rstrip() + "\n")
    print("\n".join(lines[:3]), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["gpu", "cpu"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--start", type=float, required=True, help="epoch seconds when round.sh started")
    ap.add_argument("--setup", required=True, help="STATUS:SECONDS:BUDGET of round.sh's setup")
    args = ap.parse_args(argv)
    mode, out, work = args.mode, os.path.abspath(args.out), os.path.abspath(args.work)
    deadline = float(os.environ.get("ROUND_DEADLINE_S", DEADLINE[mode]))
    os.chdir(ROOT)
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["PYTHONUNBUFFERED"] = "1"
    if mode == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton loads, here and in every stage
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    environment(mode, out, work, deadline, args.setup)
    status, seconds, budget = args.setup.split(":")
    record(out, {"name": "setup", "status": status, "seconds": float(seconds), "budget": int(budget),
                 "note": "" if status == "ok" else "see the setup log in env.txt",
                 "what": "carried wheels and frkern installed into a temp dir (pip --target), only it on PYTHONPATH"})
    summarize.write(out)
    stopped = "" if status == "ok" else "setup failed"
    preloaded = False
    worst = 1 if stopped else 0
    for stage in stages(mode, work):
        argv = stage.argv + (stage.dry if mode == "cpu" else [])
        entry = {"name": stage.name, "budget": stage.budget[mode], "seconds": 0.0, "what": stage.what,
                 "command": " ".join([*(f"{k}={v}" for k, v in stage.dry_env.items() if mode == "cpu"), "python3 -P",
                                      *argv])}
        if stopped:
            record(out, {**entry, "status": "skipped", "note": stopped})
            summarize.write(out)
            continue
        if mode == "cpu" and not preloaded and args.start + deadline - time.time() >= stage.budget[mode]:
            preloaded = True
            print(f"[round] dry run: torch, diffusers and frkern imported once in {preload():.1f} s "
                  "(stages are forked from here)", flush=True)
        left = args.start + deadline - time.time()
        if left < stage.budget[mode]:
            record(out, {**entry, "status": "skipped",
                         "note": f"{left:.0f} s left before the deadline, budget {stage.budget[mode]} s"})
            worst = max(worst, 3)
            summarize.write(out)
            continue
        t0 = time.time()
        with open(os.path.join(out, stage.log), "a") as log:
            log.write(f"==== {stage.name}: {entry['command']}\n")
            log.flush()
            proc = None  # kept referenced while wait() reaps it, so that subprocess does not reap it first
            if mode == "cpu":
                pid = forked(argv, log, stage.dry_env)
            else:
                proc = subprocess.Popen([sys.executable, "-P", *argv], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                pid = proc.pid
            code, timed_out = wait(pid, stage.budget[mode])
            if proc is not None:
                proc.returncode = -9 if code is None else code  # reaped by wait()
            log.write(f"==== end of {stage.name}: exit {code}{' (timed out)' if timed_out else ''} "
                      f"after {time.time() - t0:.1f} s\n")
        if stage.results:
            found = sorted(glob.glob(stage.results[0]), key=os.path.getmtime)
            if found:
                shutil.copyfile(found[-1], os.path.join(out, stage.results[1]))
        entry["seconds"] = time.time() - t0
        if timed_out:
            entry.update(status="timed out", note=f"killed after its {stage.budget[mode]} s budget")
        elif code == 0:
            entry.update(status="ok")
        else:
            entry.update(status="failed", note=f"exit {code}" + summarize.failure_hint(out, stage.name))
        record(out, entry)
        if entry["status"] != "ok":
            worst = max(worst, 1 if stage.required else 3)
            if stage.required:
                stopped = f"{stage.name} failed"
        summarize.write(out)
    summarize.write(out)
    print(f"[round] summary: {os.path.join(out, 'summary.md')}", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main())
