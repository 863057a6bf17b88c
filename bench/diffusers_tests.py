"""Run diffusers' own test files twice, plainly and with every diffusers UNet patched by frkern NoReuse.

    python bench/diffusers_tests.py --tests /tmp/difftests/tests/models/unets/test_models_unet_motion.py \\
        [more test files ...] --out bench/results

frkern.NoReuse with backend="torch" must change no result (README: bit-identical to the unpatched
UNet). This script checks that claim against diffusers' own test suites of the models and pipelines
frkern supports: each given test file is run by pytest in a subprocess twice,

- plain: as diffusers runs it;
- patched: with this module loaded as a pytest plugin (`-p diffusers_tests`), which wraps `__init__`
  of UNet2DConditionModel, UNetMotionModel, UNet3DConditionModel and UNetSpatioTemporalConditionModel
  so that every instance is `frkern.patch(model, frkern.NoReuse(), backend="torch")`-ed right after
  its own constructor returns (exact class match, `type(self) is cls`: a subclass's instance is
  patched once, by its own class's wrapper, after its whole constructor ran). Models built by
  `from_pretrained`, `from_config`, `from_unet2d` and deep copies of patched models are covered
  (the first three construct through `__init__`; frkern's Handle deep-copies itself). With
  --track-pipelines (default on) a diffusers pipeline whose `.unet` is a patched model is also
  `frkern.patch(pipe, NoReuse(), backend="torch")`-ed when it registers its modules, as a user would
  (its scheduler is then tracked; NoReuse itself caches nothing).

  If frkern.patch raises for a model (an unsupported configuration in a diffusers test), the plugin
  records "refused: <message>" for that test and leaves the model unpatched; the test goes on.
  Every patch / refusal / pipeline tracking is attributed to the test that triggered it
  (FRKERN_DT_LOG, a JSON file written at the end of the session), so the report proves the patched
  run patched something, and says which tests built no UNet at all.

Per-test outcomes come from pytest's --junitxml (passed / failed / error / skipped); the report
(<out>/diffusers_tests.json and .md) gives per file and run: the totals, the wall time, the models
patched and refused, and every test whose outcome differs between the runs, with the patched run's
failure message. --resume skips files whose both runs are already in the JSON (same arguments).
`python bench/diffusers_tests.py --render <out>/diffusers_tests.json` rewrites the .md from the JSON
(e.g. after writing the investigation's conclusions into its "findings" list).

The test tree must be a diffusers checkout's (or `git archive`'s) tests/ folder: the runs start in
its parent, so that tests/conftest.py and the tests' relative imports work. diffusers' test extras
that the project's venv lacks (parameterized, requests-mock) can be put in a folder given by
--pythonpath (e.g. `pip install --target /tmp/difftests_deps parameterized requests-mock`).
Both runs are offline (HF_HUB_OFFLINE=1) with HF_HOME=--hf-home: the pipelines' dummy components load
the tokenizer "hf-internal-testing/tiny-random-clip" from the Hub; where there is no network, put a
stand-in in that cache (any CLIPTokenizer with fewer than 1000 tokens: the tests' tiny text encoders
have vocab_size 1000) and say so in --note (tests comparing against hard-coded slices computed with
the real tokenizer then fail in both runs alike).
Each pytest runs with OMP_NUM_THREADS=1 and one file at a time (never two pytest processes at once).
--deselect / -k are passed to both runs; state why in --note (it goes into the report).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RUNS = ("plain", "patched")
LOG_ENV = "FRKERN_DT_LOG"
TRACK_ENV = "FRKERN_DT_TRACK_PIPELINES"
PATCH_ENV = "FRKERN_DT_PATCH"
DEPRECATED_ENV = "FRKERN_DT_RUN_DEPRECATED"
UNET_CLASSES = ("UNet2DConditionModel", "UNetMotionModel", "UNet3DConditionModel",
                "UNetSpatioTemporalConditionModel")


# ============================================================================ the pytest plugin
# Loaded in the patched run only (`-p diffusers_tests`, bench/ on PYTHONPATH). Module-level state
# lives in the pytest process.
_current = {"test": "<collection>"}
_events: dict[str, dict] = {}


def _event(kind: str, value=1) -> None:
    rec = _events.setdefault(_current["test"], {"patched": 0, "refused": [], "pipelines": 0, "pipeline_refused": [],
                                                "classes": {}})
    if kind == "refused" or kind == "pipeline_refused":
        rec[kind].append(value)
    elif kind == "class":
        rec["classes"][value] = rec["classes"].get(value, 0) + 1
    else:
        rec[kind] += value


def _wrap_init(cls):
    import frkern

    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is not cls:
            return  # a subclass: its own wrapper (if any) patches it after its whole constructor
        try:
            frkern.patch(self, frkern.NoReuse(), backend="torch")
        except Exception as e:  # recorded as an outcome; the model stays unpatched
            _event("refused", f"{cls.__name__}: {type(e).__name__}: {e}")
        else:
            _event("patched")
            _event("class", cls.__name__)

    __init__.__wrapped__ = original
    __init__.__qualname__ = original.__qualname__
    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__


def _wrap_register_modules(pipeline_cls):
    import frkern

    original = pipeline_cls.register_modules

    def register_modules(self, **kwargs):
        original(self, **kwargs)
        unet = self.__dict__.get("unet") if "unet" in kwargs or "scheduler" in kwargs else None
        if unet is None or getattr(self, "scheduler", None) is None or frkern.handle_of(unet) is None:
            return
        try:
            frkern.patch(self, frkern.NoReuse(), backend="torch")  # the model's handle: tracks this scheduler
        except Exception as e:
            _event("pipeline_refused", f"{type(self).__name__}: {type(e).__name__}: {e}")
        else:
            _event("pipelines")

    register_modules.__wrapped__ = original
    pipeline_cls.register_modules = register_modules


class _NotDeprecated:
    """Stands for DeprecatedPipelineMixin in the lookup of diffusers' PipelineTesterMixin.setUp, which
    skips every test of a deprecated pipeline (TextToVideoSDPipeline, VideoToVideoSDPipeline)."""


def pytest_configure(config):
    import diffusers

    if os.environ.get(DEPRECATED_ENV) == "1":  # both runs, with --run-deprecated-pipelines
        import diffusers.pipelines.pipeline_utils as pipeline_utils

        # Import the deprecated video pipelines first: diffusers imports lazily, and a pipeline module
        # imported after the swap would take the stand-in as its base class.
        _ = (diffusers.TextToVideoSDPipeline, diffusers.VideoToVideoSDPipeline)
        pipeline_utils.DeprecatedPipelineMixin = _NotDeprecated
    if os.environ.get(PATCH_ENV, "1") != "1":
        return
    for name in UNET_CLASSES:
        _wrap_init(getattr(diffusers, name))
    if os.environ.get(TRACK_ENV, "1") == "1":
        from diffusers import DiffusionPipeline

        _wrap_register_modules(DiffusionPipeline)


def pytest_runtest_setup(item):
    _current["test"] = item.nodeid


def pytest_runtest_teardown(item):
    _current["test"] = item.nodeid


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        _current["test"] = "<between tests>"


def pytest_unconfigure(config):
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "w") as f:
            json.dump(_events, f, indent=1, sort_keys=True)


# ============================================================================ the driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests", nargs="+", required=True, help="diffusers test files (paths inside a tests/ tree)")
    p.add_argument("--out", default=os.path.join(BENCH, "results"), help="report folder (default bench/results)")
    p.add_argument("--name", default="diffusers_tests", help="report file stem (default diffusers_tests)")
    p.add_argument("--pythonpath", default="/tmp/difftests_deps",
                   help="extra folder for diffusers' test extras (parameterized, requests-mock); ignored if absent")
    p.add_argument("--hf-home", default="/tmp/difftests_hf",
                   help="HF_HOME for both runs, which also run with HF_HUB_OFFLINE=1 (no network here: a test "
                        "that needs a Hub file fails fast instead of retrying); ignored if absent")
    p.add_argument("--runs", default="plain,patched", help="which runs (default plain,patched)")
    p.add_argument("--no-track-pipelines", action="store_true",
                   help="patched run: patch the UNets only, not the pipelines holding them")
    p.add_argument("--run-deprecated-pipelines", action="store_true",
                   help="both runs: do not skip the tests of deprecated pipelines (diffusers' PipelineTesterMixin "
                        "skips them all in setUp; TextToVideoSDPipeline is one): the plugin module is loaded in "
                        "the plain run too, patching nothing there")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression for both runs")
    p.add_argument("--deselect", action="append", default=[], help="pytest --deselect for both runs (repeatable)")
    p.add_argument("--note", action="append", default=[], help="a line for the report (why -k / --deselect)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (default 1800)")
    p.add_argument("--resume", action="store_true", help="keep the files already in the JSON report")
    p.add_argument("--source", default="", help="where the test files come from (diffusers commit), for the report")
    return p.parse_args(argv)


def _tests_root(path: str) -> str:
    """The folder that holds the `tests` package the file lives in (pytest's start folder)."""
    parts = os.path.abspath(path).split(os.sep)
    if "tests" not in parts:
        raise SystemExit(f"diffusers_tests: {path} is not inside a tests/ folder")
    i = len(parts) - 1 - parts[::-1].index("tests")
    return os.sep.join(parts[:i]) or os.sep


def parse_junit(path: str) -> dict[str, dict]:
    """{test id: {"outcome": passed|failed|error|skipped, "message": str}} from a junit XML file."""
    out = {}
    if not os.path.exists(path):
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        key = f"{cls}::{name}" if cls else name
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or "") if tag == "skipped" else \
                    ((el.get("message") or "") + "\n" + (el.text or "")).strip()
                break
        if key in out and out[key]["outcome"] != "passed":  # a teardown error after a failure: keep the first
            continue
        out[key] = {"outcome": outcome, "message": message[:4000]}
    return out


def run_file(test_file: str, run: str, args, work: str) -> dict:
    root = _tests_root(test_file)
    rel = os.path.relpath(os.path.abspath(test_file), root)
    stem = rel.replace(os.sep, "__").removesuffix(".py") + (".deprecated" if args.run_deprecated_pipelines else "")
    junit = os.path.join(work, f"{stem}.{run}.xml")
    log = os.path.join(work, f"{stem}.{run}.patches.json")
    for f in (junit, log):
        if os.path.exists(f):
            os.remove(f)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if args.hf_home and os.path.isdir(args.hf_home):
        env.update(HF_HOME=args.hf_home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    paths = [p for p in [args.pythonpath] if p and os.path.isdir(p)]
    plugin = run == "patched" or args.run_deprecated_pipelines
    if plugin:
        paths.insert(0, BENCH)
        env[PATCH_ENV] = "1" if run == "patched" else "0"
        env[DEPRECATED_ENV] = "1" if args.run_deprecated_pipelines else "0"
    if run == "patched":
        env[LOG_ENV] = log
        env[TRACK_ENV] = "0" if args.no_track_pipelines else "1"
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    cmd = [sys.executable, "-m", "pytest", rel, "-q", "-rN", "-p", "no:cacheprovider", "--junitxml", junit,
           "-o", "junit_family=xunit1"]
    if plugin:
        cmd += ["-p", "diffusers_tests"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    for d in args.deselect:
        cmd += ["--deselect", d]
    frkern_state = _frkern_state()  # another session may be changing frkern between runs: say which one ran
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                                else (e.stdout or ""))[-3000:]
    wall = time.time() - t0
    tests = parse_junit(junit)
    patches = json.load(open(log)) if run == "patched" and os.path.exists(log) else {}
    totals = {k: sum(1 for t in tests.values() if t["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    return {"file": rel, "run": run, "run_deprecated_pipelines": args.run_deprecated_pipelines,
            "frkern": frkern_state, "started": started,
            "command": " ".join(cmd), "cwd": root, "rc": rc, "wall_s": round(wall, 1),
            "totals": totals, "tests": tests, "patches": patches, "output_tail": tail}


def _frkern_state() -> str:
    """frkern's commit, with "+dirty" when frkern/ or kernels/ have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "frkern", "kernels"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return "?"
    return head + ("+dirty" if dirty else "")


def _patch_summary(patches: dict) -> dict:
    return {
        "models_patched": sum(r["patched"] for r in patches.values()),
        "by_class": {c: sum(r["classes"].get(c, 0) for r in patches.values())
                     for c in sorted({c for r in patches.values() for c in r["classes"]})},
        "models_refused": sum(len(r["refused"]) for r in patches.values()),
        "pipelines_tracked": sum(r["pipelines"] for r in patches.values()),
        "pipelines_refused": sum(len(r["pipeline_refused"]) for r in patches.values()),
        "tests_patching": sum(1 for k, r in patches.items() if r["patched"] and not k.startswith("<")),
        "refusals": sorted({m for r in patches.values() for m in r["refused"] + r["pipeline_refused"]}),
    }


def _junit_key(nodeid: str) -> str:
    # junit (xunit1) ids: "tests.models.unets.test_x.Class::name"; pytest node ids: "tests/.../test_x.py::Class::name"
    path, _, rest = nodeid.partition("::")
    mod = path.removesuffix(".py").replace("/", ".")
    cls, _, name = rest.rpartition("::")
    return f"{mod}.{cls}::{name}" if cls else f"{mod}::{name}"


def compare(plain: dict, patched: dict) -> list[dict]:
    diffs = []
    by_test = {_junit_key(k): v for k, v in patched["patches"].items()}
    for key in sorted(set(plain["tests"]) | set(patched["tests"])):
        a = plain["tests"].get(key, {"outcome": "absent", "message": ""})
        b = patched["tests"].get(key, {"outcome": "absent", "message": ""})
        if a["outcome"] != b["outcome"]:
            rec = by_test.get(key, {})
            diffs.append({"test": key, "plain": a["outcome"], "patched": b["outcome"],
                          "plain_message": a["message"][:1500], "patched_message": b["message"][:4000],
                          "models_patched_in_test": rec.get("patched", 0), "refusals": rec.get("refused", [])})
    return diffs


def _versions() -> dict:
    out = {}
    for mod in ("torch", "diffusers", "transformers", "pytest"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # pragma: no cover
            out[mod] = f"unavailable ({e})"
    try:
        out["frkern_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True).stdout.strip()
    except OSError:  # pragma: no cover
        pass
    return out


def write_md(report: dict, path: str) -> None:
    v = report["versions"]
    lines = [
        "# diffusers' own tests with every UNet patched by frkern NoReuse",
        "",
        f"- date: {report['date']}",
        f"- diffusers installed: {v.get('diffusers')}; tests from: {report['source'] or '(not stated)'}",
        f"- torch {v.get('torch')}, transformers {v.get('transformers')}, pytest {v.get('pytest')}, "
        f"frkern commit at the last invocation {v.get('frkern_commit', '?')[:12]} (per run: the frkern column)",
        "- commands (in order; --resume keeps earlier files):",
        *[f"  - `{c}`" for c in report.get("commands") or [report["command"]]],
        f"- patched run: every UNet2DConditionModel / UNetMotionModel / UNet3DConditionModel / "
        f"UNetSpatioTemporalConditionModel `frkern.patch(model, NoReuse(), backend=\"torch\")`-ed right after "
        f"construction; pipelines holding one {'also patched (scheduler tracked)' if report['track_pipelines'] else 'not patched'}",
        "- both runs: OMP_NUM_THREADS=1, one pytest process at a time; outcomes from --junitxml",
    ]
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "## Per file", "",
              "| file | run | frkern | passed | failed | error | skipped | wall s | models patched (by class) | refused | "
              "pipelines patched | differing |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    all_diffs = []
    for entry in report["files"]:
        runs = entry["runs"]
        for run in RUNS:
            r = runs.get(run)
            if r is None:
                continue
            t = r["totals"]
            ps = r.get("patch_summary")
            pcol = (str(ps["models_patched"]) + (f" ({', '.join(f'{c} {n}' for c, n in ps['by_class'].items())})"
                                                  if ps["by_class"] else "") if ps else "")
            rc = "" if r["rc"] in (0, 1) else f" (rc {r['rc']})"
            lines.append(f"| {entry['file']}{rc} | {run} | {r.get('frkern', '?')} | {t['passed']} | {t['failed']} | {t['error']} | "
                         f"{t['skipped']} | {r['wall_s']} | {pcol} | {ps['models_refused'] if ps else ''} | "
                         f"{ps['pipelines_tracked'] if ps else ''} | {len(entry['diffs']) if run == 'patched' else ''} |")
        all_diffs += [(entry["file"], d) for d in entry["diffs"]]
    tot = {run: {k: sum(e["runs"][run]["totals"][k] for e in report["files"] if run in e["runs"])
                 for k in ("passed", "failed", "error", "skipped")} for run in RUNS}
    lines += ["", "Totals: " + "; ".join(f"{run}: {t['passed']} passed, {t['failed']} failed, {t['error']} error, "
                                          f"{t['skipped']} skipped" for run, t in tot.items()),
              f"Models patched in the patched run: {report['models_patched']}; refused: {report['models_refused']}; "
              f"pipelines patched: {report['pipelines_tracked']}.", ""]
    refusals = sorted({m for e in report["files"] for m in e["runs"].get("patched", {}).get("patch_summary", {})
                       .get("refusals", [])})
    if refusals:
        lines += ["## frkern refusals (model left unpatched, test went on)", ""] + [f"- {m}" for m in refusals] + [""]
    lines += ["## Tests whose outcome differs", ""]
    if not all_diffs:
        lines.append("None.")
    for file, d in all_diffs:
        msg = d["patched_message"].strip().splitlines()
        head = msg[0][:300] if msg else ""
        lines += [f"- `{d['test']}`: plain {d['plain']}, patched {d['patched']} "
                  f"(UNets patched in this test: {d['models_patched_in_test']}): {head}"]
    lines += ["", "## Findings", ""] + (report.get("findings") or ["(none written)"])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--render"]:  # rewrite the .md of an existing JSON report (after editing its findings)
        json_path = argv[1]
        write_md(json.load(open(json_path)), json_path[:-5] + ".md")
        return 0
    args = parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if not set(runs) <= set(RUNS):
        raise SystemExit(f"diffusers_tests: --runs takes {','.join(RUNS)}")
    args.out = os.path.abspath(args.out)  # the runs start in the test tree's folder
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "local", args.name)  # junit XML and patch logs (bench/results/local is ignored)
    os.makedirs(work, exist_ok=True)
    json_path = os.path.join(args.out, args.name + ".json")
    report = None
    if args.resume and os.path.exists(json_path):
        report = json.load(open(json_path))
    if report is None:
        report = {"files": [], "notes": [], "findings": []}
    report.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  versions=_versions(), source=args.source or report.get("source", ""),
                  command="python bench/diffusers_tests.py " + " ".join(argv),
                  commands=report.get("commands", []),
                  track_pipelines=not args.no_track_pipelines)
    report["commands"] = list(dict.fromkeys(report["commands"] + [report["command"]]))
    report["notes"] = list(dict.fromkeys(report.get("notes", []) + args.note))
    done = {e["file"]: e for e in report["files"]}
    for test_file in args.tests:
        rel = os.path.relpath(os.path.abspath(test_file), _tests_root(test_file))
        if args.run_deprecated_pipelines:  # its own entry beside the file's plain-setting one
            rel += " [--run-deprecated-pipelines]"
        entry = done.get(rel)
        if entry is not None and all(r in entry["runs"] for r in runs):
            print(f"[diffusers_tests] {rel}: kept from the earlier report", flush=True)
            continue
        entry = {"file": rel, "runs": {}, "diffs": []}
        for run in runs:
            print(f"[diffusers_tests] {rel}: {run} run ...", flush=True)
            r = run_file(test_file, run, args, work)
            if run == "patched":
                r["patch_summary"] = _patch_summary(r["patches"])
            entry["runs"][run] = r
            print(f"[diffusers_tests] {rel}: {run}: {r['totals']} in {r['wall_s']} s (rc {r['rc']})"
                  + (f", {r['patch_summary']['models_patched']} UNets patched" if run == "patched" else ""), flush=True)
        if "plain" in entry["runs"] and "patched" in entry["runs"]:
            entry["diffs"] = compare(entry["runs"]["plain"], entry["runs"]["patched"])
            print(f"[diffusers_tests] {rel}: {len(entry['diffs'])} differing test(s)", flush=True)
        report["files"] = [e for e in report["files"] if e["file"] != rel] + [entry]
        _finish(report, json_path, args)
    _finish(report, json_path, args)
    return 0


def _finish(report: dict, json_path: str, args) -> None:
    summaries = [e["runs"]["patched"]["patch_summary"] for e in report["files"] if "patched" in e["runs"]]
    report["models_patched"] = sum(s["models_patched"] for s in summaries)
    report["models_refused"] = sum(s["models_refused"] for s in summaries)
    report["pipelines_tracked"] = sum(s["pipelines_tracked"] for s in summaries)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    write_md(report, json_path[:-5] + ".md")


if __name__ == "__main__":
    sys.exit(main())
