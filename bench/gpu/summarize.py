"""summary.md of a GPU round, from the files the round left in its output folder (stdlib only).

    python3 bench/gpu/summarize.py OUT       # rewrites OUT/summary.md

Reads env.txt (environment and the `stage: {json}` line of each stage), preflight.log, tests.log,
bench.log, kernels.csv, latency.json and compile.json, whichever exist, and writes: the stages
with their status, time and budget; each issue-3 target marked met / missed / not measured from
the measured numbers; then the preflight checks, the test summary, and the kernel and latency tables.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys

STAGES = ["setup", "preflight", "tests", "kernels", "latency", "compile"]
# Issue 3's targets: H100-class GPU, SD1.5 fp16, batch 2 (one image with CFG), 512x512, DDIM.
# (target, frkern row, its field, limit in ms); every row: kernels + CUDA graphs.
TARGETS = [
    ("full step <= 6.5 ms", "frkern NoReuse", "ms_full_call", 6.5),
    ("FR step <= 2 ms", "frkern FRDiff:interval=3", "ms_reuse_call", 2.0),
    ("Clockwork step <= 3 ms", "frkern Clockwork:clock=2", "ms_reuse_call", 3.0),
    ("50-step FRDiff M=3 + score mixing <= 150 ms", "frkern FRDiff:interval=3", "ms_per_gen", 150.0),
]
TARGET_BACKEND = "triton+graphs"
FIELD_NAMES = {"ms_full_call": "ms full call", "ms_reuse_call": "ms reuse call", "ms_per_gen": "ms/gen"}


def _read(out: str, name: str) -> str | None:
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


def _json(out: str, name: str) -> dict | None:
    text = _read(out, name)
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _ms(v, digits=2) -> str:
    v = _num(v)
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def stage_entries(env: str | None) -> dict:
    """name -> the last `stage:` record of that stage in env.txt."""
    entries = {}
    for line in (env or "").splitlines():
        if line.startswith("stage: "):
            try:
                e = json.loads(line[len("stage: "):])
            except ValueError:
                continue
            entries[e.get("name")] = e
    return entries


def stage_log(out: str, stage: str) -> str:
    """The part of a stage's log after its `==== stage:` header (bench.log holds three stages)."""
    name = {"preflight": "preflight.log", "tests": "tests.log"}.get(stage, "bench.log")
    text = _read(out, name) or ""
    parts = re.split(r"^==== (\w+): ", text, flags=re.M)
    chunks = [parts[i + 1] for i in range(1, len(parts) - 1, 2) if parts[i] == stage]
    return "".join(chunks)


def pytest_line(text: str) -> str:
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped|deselected|xfailed|warnings?)\b.*?)=*\s*$",
                       text, flags=re.M)
    return found[-1].strip() if found else ""


def pytest_progress(text: str) -> tuple[str, list[str]]:
    """From `pytest -v` lines (xdist: `[gw0] [ 12%] PASSED tests/...`), what ended before pytest was
    cut off: counts per outcome and the tests that failed or errored."""
    found = re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+)", text)
    counts: dict[str, int] = {}
    for outcome, _ in found:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    bad = sorted({f"{o} {node}" for o, node in found if o in ("FAILED", "ERROR")})
    return ", ".join(f"{n} {o}" for o, n in counts.items()), bad


def failure_hint(out: str, stage: str) -> str:
    """A few words on why a stage failed, for its line in the stage table."""
    text = stage_log(out, stage)
    if stage == "tests":
        line = pytest_line(text) or (f"cut off; before that {pytest_progress(text)[0]}" if pytest_progress(text)[0]
                                     else "")
        return f": {line}" if line else ""
    if stage == "preflight":
        lines = [l for l in text.splitlines() if l.startswith("PREFLIGHT")]
        if lines:
            return f": {lines[-1]}"
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("====")]
    errors = [l for l in lines if re.match(r"^\w*(Error|Exception)\b", l)]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    return f": {last[:200]}" if last else ""


def target_lines(lat: dict | None) -> list[str]:
    """One line per target: [met] / [missed] / [not measured], with the number and where it is from."""
    meta = (lat or {}).get("meta", {})
    rows = (lat or {}).get("rows", [])
    why_not = []
    if not lat:
        why_not.append("no latency.json")
    else:
        want = {"device_type": "cuda", "config": "sd15", "dtype": "torch.float16", "batch": 1, "graphs": "cuda"}
        why_not += [f"{k} is {meta.get(k)!r}, not {v!r}" for k, v in want.items() if meta.get(k) != v]
    lines = []
    for text, method, field, limit in TARGETS:
        reason = list(why_not)
        if field == "ms_per_gen" and lat and meta.get("steps") != 50:
            reason.append(f"{meta.get('steps')} steps, not 50")
        row = next((r for r in rows if r.get("method") == method and r.get("backend") == TARGET_BACKEND), None)
        value = _num(row.get(field)) if row else math.nan
        if not reason and row is None:
            reason.append(f"no {method} [{TARGET_BACKEND}] row")
        if not reason and row.get("method", "").startswith("frkern FRDiff") and row.get("score_mix") != "on":
            reason.append("score mixing off")
        if not reason and math.isnan(value):
            reason.append(f"{method} [{TARGET_BACKEND}] has no {FIELD_NAMES[field]}"
                          + (f" ({row.get('note')})" if row.get("note") else ""))
        if reason:
            lines.append(f"- [not measured] {text}: " + "; ".join(reason))
            continue
        spread = (row.get("spread") or {}).get(field)
        noisy = " - NOISY timing, re-run before trusting it" if spread is not None and spread > meta.get(
            "timing", {}).get("max_spread", 0.2) else ""
        status = "met" if value <= limit else "missed"
        lines.append(f"- [{status}] {text}: {value:.2f} ms ({method} [{TARGET_BACKEND}], {FIELD_NAMES[field]}"
                     + (f", spread {spread:.0%}" if spread is not None else "") + f"){noisy}")
    return lines


def table(head: list, rows: list) -> list[str]:
    cell = lambda v: str(v).replace("|", "/")  # noqa: E731
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def latency_table(lat: dict) -> list[str]:
    rows = lat.get("rows", [])
    base = _num(rows[0].get("ms_per_gen")) if rows else math.nan
    cells = []
    for r in rows:
        calls = r.get("calls") or {}
        gen = _num(r.get("ms_per_gen"))
        speed = "-" if math.isnan(gen) or math.isnan(base) else f"{base / gen:.2f}x"
        spread = max((r.get("spread") or {}).values(), default=None)
        cells.append([r.get("method", ""), r.get("backend", ""),
                      "/".join(str(calls.get(k, 0)) for k in ("full", "reuse", "skip")) if calls else "-",
                      _ms(r.get("ms_full_call")), _ms(r.get("ms_reuse_call")), _ms(r.get("ms_per_gen"), 1),
                      speed + (" !" if r.get("noisy") else ""), "-" if spread is None else f"{spread:.0%}",
                      _ms(r.get("deviation"), 4), "-" if r.get("vs_eager") is None else f"{_num(r['vs_eager']):.1e}",
                      "-" if r.get("syncs") is None else r.get("syncs"), r.get("note", "")])
    meta = lat.get("meta", {})
    timing = meta.get("timing", {})
    return table(["method", "backend", "calls full/reuse/skip", "ms full call", "ms reuse call", "ms/gen", "speed-up",
                  "spread", "rel. dev.", "vs eager", "host syncs/gen", "note"], cells) + [
        "", f"({meta.get('config')}, {meta.get('steps')} steps, batch {meta.get('batch')} (UNet batch "
            f"{2 * (meta.get('batch') or 0)}), {meta.get('dtype')}, {meta.get('device')}, graphs {meta.get('graphs')}; "
            f"median of {timing.get('repeats')} interleaved repeats, `!` = spread over {timing.get('max_spread')}; "
            f"parity NoReuse vs unpatched {meta.get('parity_max_rel_err')})"]


def kernel_table(text: str) -> list[str]:
    rows = list(csv.DictReader(text.splitlines()))
    skip = [r for r in rows if r.get("case", "").startswith("skip conv")]
    # the compressed cache: the codec's rows (ms_encode) and its consumers' (ms_baseline: an fp16 cache)
    cache = [r for r in rows if r not in skip and (r.get("ms_encode") or r.get("ms_baseline") or r.get("bytes_ratio"))]
    plain = [r for r in rows if r not in skip and r not in cache]
    lines = []
    if plain:
        lines += table(["case", "shape", "format", "ms fused", "ms unfused", "unfused/fused", "GB/s fused", "note"],
                       [[r["case"], r["shape"], r["format"], _ms(r.get("ms_fused"), 4), _ms(r.get("ms_unfused"), 4),
                         _ms(r.get("speedup")), _ms(r.get("gbps_fused"), 0), r.get("note", "")] for r in plain])
    if cache:
        lines += [""] + table(
            ["compressed cache", "shape", "format", "bytes ratio", "ms fused", "ms unfused", "unfused/fused",
             "ms fp16 cache", "fp16/fused", "GB/s fused", "ms encode", "ms decode", "ms copy", "note"],
            [[r["case"], r["shape"], r["format"], _ms(r.get("bytes_ratio")), _ms(r.get("ms_fused"), 4),
              _ms(r.get("ms_unfused"), 4), _ms(r.get("speedup")), _ms(r.get("ms_baseline"), 4),
              _ms(r.get("baseline_over_fused")), _ms(r.get("gbps_fused"), 0), _ms(r.get("ms_encode"), 4),
              _ms(r.get("ms_decode"), 4), _ms(r.get("ms_copy"), 4), r.get("note", "")] for r in cache])
    if skip:
        lines += [""] + table(
            ["skip conv", "shape", "format", "active", "affected", "ms gated", "ms gate", "ms dense (cuDNN)",
             "dense/gated", "note"],
            [[r["case"], r["shape"], r["format"], _ms(r.get("active_frac")), _ms(r.get("affected_frac")),
              _ms(r.get("ms_gated"), 4), _ms(r.get("ms_gate"), 4), _ms(r.get("ms_dense"), 4),
              _ms(r.get("dense_over_gated")), r.get("note", "")] for r in skip])
    return lines


def verdict(entries: dict) -> str:
    done = [entries[s] for s in STAGES if s in entries]
    if len(done) < len(STAGES):
        return "in progress, or cut off: " + ", ".join(s for s in STAGES if s not in entries) + " not recorded"
    early = [e for e in done if e["name"] in ("setup", "preflight") and e.get("status") != "ok"]
    if early:
        e = early[0]
        return f"STOPPED EARLY: {e['name']} {e.get('status')}" + (f": {e['note']}" if e.get("note") else "")
    bad = [e for e in done if e.get("status") in ("failed", "timed out")] + [
        e for e in done if e.get("status") == "skipped"]
    return "incomplete: " + ", ".join(f"{e['name']} {e['status']}" for e in bad) if bad else "complete: every stage ok"


def render(out: str) -> str:
    env = _read(out, "env.txt")
    entries = stage_entries(env)
    mode = "cpu" if env and env.startswith("mode: cpu") else "gpu"
    lat, comp = _json(out, "latency.json"), _json(out, "compile.json")
    lines = [f"# GPU round summary{' (CPU DRY RUN: timings mean nothing)' if mode == 'cpu' else ''}", "",
             f"Result: {verdict(entries)}", ""]
    if env:
        head = [l for l in env.splitlines() if re.match(r"^(mode|date|python|packages|commit|frkern from): ", l)]
        gpu = re.search(r"^nvidia-smi:\n(.*?)(?=^\w[\w ]*:|\Z)", env, flags=re.M | re.S)
        lines += [f"- {l}" for l in head]
        if gpu:
            lines += ["- nvidia-smi: " + " / ".join(l.strip() for l in gpu.group(1).strip().splitlines())]
        lines.append("")
    stage_rows = []
    for s in STAGES:
        e = entries.get(s)
        stage_rows.append([s, "not recorded", "-", "-", "the round ended before it", ""] if e is None else
                          [s, e.get("status"), f"{_num(e.get('seconds')):.0f}", e.get("budget"), e.get("note", ""),
                           e.get("what", "")])
    lines += ["## Stages", ""] + table(["stage", "status", "seconds", "budget", "note", "what"], stage_rows)
    lines += ["", "## Issue-3 targets (H100-class GPU, SD1.5 fp16, batch 2 = one image with CFG, 512x512)", ""]
    lines += target_lines(lat)
    if lat:
        lines.append(f"(measured on {lat.get('meta', {}).get('device')}, each from the frkern row with kernels + "
                     "CUDA graphs; the targets are for an H100-class card)")
    pre = _read(out, "preflight.log")
    if pre is not None:
        checks = [l.rstrip() for l in pre.splitlines()
                  if re.match(r"^  [^ ].*: (ok|FAILED)", l) or l.startswith("PREFLIGHT")]
        lines += ["", "## Preflight", "", "```", *(checks or ["(no check ran: see preflight.log)"]), "```"]
    tests = _read(out, "tests.log")
    if tests is not None:
        bad = [l for l in tests.splitlines() if re.match(r"^(FAILED|ERROR) ", l)]
        summary = pytest_line(tests)
        if not summary:  # cut off at its budget: what the -v lines say had ended
            progress, bad = pytest_progress(tests)
            summary = (f"(no pytest summary line: cut off; tests that ended before: {progress})" if progress
                       else "(no pytest summary line: see tests.log)")
        lines += ["", "## Tests", "", summary]
        lines += [f"- {l}" for l in bad[:30]] + ([f"- ... {len(bad) - 30} more in tests.log"] if len(bad) > 30 else [])
    kernels = _read(out, "kernels.csv")
    if kernels:
        lines += ["", "## Kernels (bench/kernel_bench.py)", ""] + kernel_table(kernels)
    if lat:
        lines += ["", "## Latency (bench/latency.py)", ""] + latency_table(lat)
    if comp:
        lines += ["", "## torch.compile + CUDA graph baseline (bench/latency.py --compile-graph)", ""]
        lines += latency_table(comp)
    files = [n for n in ("env.txt", "preflight.log", "tests.log", "bench.log", "kernels.csv", "latency.json",
                         "compile.json") if os.path.exists(os.path.join(out, n))]
    lines += ["", "Files: " + ", ".join(files + ["summary.md"])]
    return "\n".join(lines) + "\n"


def write(out: str) -> str:
    """Rewrite OUT/summary.md; never raises (a round must always end with a summary)."""
    path = os.path.join(out, "summary.md")
    try:
        text = render(out)
    except Exception as e:  # a malformed file must not cost the summary
        text = f"# GPU round summary\n\nThe summariser failed: {type(e).__name__}: {e}\n"
    with open(path, "w") as f:
        f.write(text)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write(sys.argv[1]))
