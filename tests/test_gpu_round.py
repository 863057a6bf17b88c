"""bench/gpu/round.sh, the one-command GPU round, dry-run here (`--cpu`: every stage on tiny
workloads, Triton's interpreter, emulated graphs), so that a mistake in it costs no GPU minutes;
its stage runner, budgets and summary on stand-in stages; latency.py's --help without torch."""
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DIR = os.path.join(ROOT, "bench", "gpu")
sys.path.insert(0, GPU_DIR)
summarize = importlib.import_module("summarize")

FILES = ["bench.log", "compile.json", "env.txt", "kernels.csv", "latency.json", "preflight.log", "summary.md",
         "tests.log"]


def run_round(tmp_path, **env):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", os.path.join(GPU_DIR, "round.sh"), "--cpu"], capture_output=True, text=True, timeout=900,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
             "OMP_NUM_THREADS": "1", **env})
    return result, out


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_summarises_them(tmp_path):
    result, out = run_round(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == FILES  # the device tool brings back at most 8 files
    summary = (out / "summary.md").read_text()
    assert "Result: complete: every stage ok" in summary and "CPU DRY RUN" in summary
    for stage in summarize.STAGES:
        assert f"| {stage} | ok |" in summary, stage
    for target, *_ in summarize.TARGETS:  # a CPU run measures none of them, and says why
        assert f"- [not measured] {target}: device_type is 'cpu'" in summary, target
    env = (out / "env.txt").read_text()
    # frkern ran as installed into the round's temp dir, with no top-level `kernels` module around
    assert f"frkern from: {tmp_path}" in env and "top-level `kernels` module: none" in env
    assert "PREFLIGHT OK" in (out / "preflight.log").read_text()
    assert "1 passed" in (out / "tests.log").read_text()
    assert "score mix" in (out / "kernels.csv").read_text()
    rows = {(r["method"], r["backend"]): r for r in json.loads((out / "latency.json").read_text())["rows"]}
    assert ("diffusers eager in one CUDA graph", "-") in rows and ("DeepCache package DeepCache:interval=3",
                                                                  "deepcache 0.1.1") in rows
    for policy in ["NoReuse", "FRDiff:interval=3", "Clockwork:clock=2", "DeepCache:interval=3",
                   'Adaptive:threshold=1e9,reuse="clockwork",max_reuse=1', "SkipConv:threshold=0.05"]:
        row = rows[(f"frkern {policy}", "torch+graphs")]
        assert row["vs_eager"] == 0.0 and row["ms_per_gen"] > 0 and row["note"].startswith("graphs: captures")
    compiled = json.loads((out / "compile.json").read_text())["rows"]
    assert [r["method"] for r in compiled] == ["diffusers eager", "torch.compile + CUDA graph (mode reduce-overhead)"]


def test_stages_without_their_budget_left_are_skipped_and_recorded(tmp_path):
    result, out = run_round(tmp_path, ROUND_DEADLINE_S="0")
    assert result.returncode == 3, result.stdout + result.stderr
    summary = (out / "summary.md").read_text()
    assert "| setup | ok |" in summary
    for stage in summarize.STAGES[1:]:
        assert f"| {stage} | skipped |" in summary and "s left before the deadline" in summary
    assert "Result: STOPPED EARLY: preflight skipped" in summary
    for target, *_ in summarize.TARGETS:
        assert f"- [not measured] {target}: no latency.json" in summary


@pytest.fixture
def driver(monkeypatch, tmp_path):
    """bench/gpu/round.py with stand-in stages: tiny scripts, forked as in the dry run."""
    mod = importlib.import_module("round")
    monkeypatch.setattr(mod, "preload", lambda: 0.0)
    monkeypatch.chdir(os.getcwd())  # main() moves to the repository root and sets these: put back after
    for name in ("TQDM_DISABLE", "PYTHONUNBUFFERED", "TRITON_INTERPRET", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    scripts = {"ok": "print('fine')", "fail": "import sys; print('ValueError: broken'); sys.exit(2)",
               "hang": "import time; time.sleep(60)"}
    for name, code in scripts.items():
        (tmp_path / f"{name}.py").write_text(code)

    def run(plan):
        stages = [mod.Stage(name, {"cpu": budget}, [str(tmp_path / f"{script}.py")], [],
                            {"preflight": "preflight.log", "tests": "tests.log"}.get(name, "bench.log"),
                            required=(name == "preflight")) for name, script, budget in plan]
        monkeypatch.setattr(mod, "stages", lambda mode, work: stages)
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        code = mod.main(["--mode", "cpu", "--out", str(out), "--work", str(tmp_path), "--start",
                         str(__import__("time").time()), "--setup", "ok:1:90"])
        return code, (out / "summary.md").read_text()

    return run


def test_a_failed_preflight_stops_the_round(driver):
    code, summary = driver([("preflight", "fail", 30), ("tests", "ok", 30), ("kernels", "ok", 30),
                            ("latency", "ok", 30), ("compile", "ok", 30)])
    assert code == 1
    assert "Result: STOPPED EARLY: preflight failed: exit 2: ValueError: broken" in summary
    for stage in ("tests", "kernels", "latency", "compile"):
        assert f"| {stage} | skipped | 0 | 30 | preflight failed |" in summary


def test_a_stage_past_its_budget_is_killed_and_the_round_goes_on(driver):
    code, summary = driver([("preflight", "ok", 30), ("tests", "hang", 1), ("kernels", "fail", 30),
                            ("latency", "ok", 30), ("compile", "ok", 30)])
    assert code == 3
    assert "| tests | timed out |" in summary and "killed after its 1 s budget" in summary
    assert "| kernels | failed |" in summary and "| latency | ok |" in summary and "| compile | ok |" in summary
    assert "Result: incomplete: tests timed out, kernels failed" in summary


def latency_record(**meta):
    base = {"device_type": "cuda", "config": "sd15", "dtype": "torch.float16", "batch": 1, "graphs": "cuda",
            "steps": 50, "device": "NVIDIA H200", "timing": {"max_spread": 0.2, "repeats": 5}}

    def row(method, full, reuse, gen, spread=0.05, score_mix="-", note=""):
        return {"method": method, "backend": "triton+graphs", "score_mix": score_mix, "ms_full_call": full,
                "ms_reuse_call": reuse, "ms_per_gen": gen, "note": note,
                "spread": {"ms_full_call": spread, "ms_reuse_call": spread, "ms_per_gen": spread}}

    return {"meta": {**base, **meta}, "rows": [
        {"method": "diffusers eager", "backend": "-", "ms_per_gen": 900.0},
        row("frkern NoReuse", 6.1, float("nan"), 320.0),
        row("frkern FRDiff:interval=3", 6.3, 2.4, 140.0, spread=0.5, score_mix="on"),
        row("frkern Clockwork:clock=2", 6.2, float("nan"), float("nan"), note="not timed: differs from eager"),
    ]}


def test_targets_are_marked_from_the_measured_numbers():
    lines = summarize.target_lines(latency_record())
    assert lines[0] == ("- [met] full step <= 6.5 ms: 6.10 ms (frkern NoReuse [triton+graphs], ms full call, "
                        "spread 5%)")
    assert lines[1].startswith("- [missed] FR step <= 2 ms: 2.40 ms") and "NOISY" in lines[1]
    assert lines[2] == ("- [not measured] Clockwork step <= 3 ms: frkern Clockwork:clock=2 [triton+graphs] has no "
                        "ms reuse call (not timed: differs from eager)")
    assert lines[3].startswith("- [met] 50-step FRDiff M=3 + score mixing <= 150 ms: 140.00 ms")
    other = summarize.target_lines(latency_record(steps=20, dtype="torch.bfloat16"))
    assert all(line.startswith("- [not measured]") and "dtype is 'torch.bfloat16'" in line for line in other)
    assert other[3].endswith("20 steps, not 50")


def test_latency_help_answers_without_loading_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "bench", "latency.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--compile-graph" in result.stdout and "--emulate-graphs" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "json" in imported and not {"torch", "frkern", "diffusers"} & imported


def test_a_tests_stage_cut_off_says_what_ended_before(tmp_path):
    # pytest -v under xdist, killed at the stage's budget: no summary line, only per-test lines
    (tmp_path / "tests.log").write_text(
        "==== tests: python3 -P -m pytest -v ...\n"
        "[gw0] [  1%] PASSED tests/test_kernel_geglu.py::test_geglu[float16]\n"
        "[gw1] [  2%] FAILED tests/test_graphs.py::test_tgate_graphs[cuda]\n"
        "[gw0] [  3%] PASSED tests/test_kernel_geglu.py::test_geglu[bfloat16]\n"
        "[gw2] [  4%] SKIPPED tests/test_compile.py::test_x \n"
        "==== end of tests: exit None (timed out) after 150.0 s\n")
    text = open(summarize.write(str(tmp_path))).read()
    assert "cut off; tests that ended before: 2 passed, 1 failed, 1 skipped" in text
    assert "- FAILED tests/test_graphs.py::test_tgate_graphs[cuda]" in text
    # a finished run keeps pytest's own summary line and its FAILED lines
    (tmp_path / "tests.log").write_text("[gw0] [100%] FAILED tests/a.py::t\nFAILED tests/a.py::t - boom\n"
                                        "==== 1 failed, 3 passed in 9.00s ====\n")
    text = open(summarize.write(str(tmp_path))).read()
    assert "1 failed, 3 passed in 9.00s" in text and "- FAILED tests/a.py::t - boom" in text
    assert "tests that ended before" not in text
