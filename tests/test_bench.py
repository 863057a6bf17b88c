"""The harnesses run (smoke) and their metrics behave; the committed model loads offline."""
import importlib
import json
import os
import statistics
import sys

import numpy as np
import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)


def test_trained_model_loads_offline_with_from_pretrained():
    from diffusers import UNet2DConditionModel

    from tiny_model import ASSET_DIR, load

    unet = UNet2DConditionModel.from_pretrained(ASSET_DIR)
    assert unet.config.down_block_types[1] == "CrossAttnDownBlock2D"
    unet, tokens = load()
    assert tokens.num_classes == 8
    size = sum(os.path.getsize(os.path.join(ASSET_DIR, f)) for f in os.listdir(ASSET_DIR))
    assert size <= 25e6


def test_latency_harness_smoke(tmp_path, capsys):
    import latency

    rows = latency.main(["--steps", "4", "--policies", "FRDiff:interval=2", "Clockwork:clock=2",
                         "--repeats", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "parity NoReuse[torch] vs unpatched: max rel err 0.00e+00" in out
    by = {r.method: r for r in rows}
    assert by["frkern NoReuse"].deviation == 0.0
    assert by["frkern FRDiff:interval=2"].calls == {"full": 2, "skip": 1, "reuse": 1}
    assert by["frkern FRDiff:interval=2"].gflop_per_gen < by["diffusers eager"].gflop_per_gen
    assert [by[m].score_mix for m in ("diffusers eager", "frkern FRDiff:interval=2", "frkern Clockwork:clock=2")] \
        == ["-", "on", "-"]
    fr = by["frkern FRDiff:interval=2"]
    assert {k: len(v) for k, v in fr.samples.items()} == {"ms_per_gen": 2, "ms_full_call": 2, "ms_reuse_call": 2}
    assert fr.ms_per_gen == statistics.median(fr.samples["ms_per_gen"]) and set(fr.spread) == set(fr.samples)
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["meta"]["device"].startswith("cpu") and len(data["rows"]) == len(rows)
    assert data["meta"]["threads"] == 1 and "torch threads=1" in out  # --threads: 1 by default on a CPU
    assert [p["row"] for p in data["meta"]["policies"]] == ["frkern FRDiff:interval=2", "frkern Clockwork:clock=2"]
    assert all("noisy" in r and "spread" in r for r in data["rows"])
    assert data["meta"]["timing"]["repeats"] == 2
    # the table says what its figures are
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| score mix |" in md and "timing spread" in md
    assert "rel. dev. of latents: ||x - x_ref||_2 / ||x_ref||_2 over the final latents" in md


@pytest.mark.slow
def test_latency_harness_graph_and_compile_variants(tmp_path, monkeypatch):
    # The GPU-only rows' code (frkern + graphs, + compile) run on a CPU: graphs emulated, compile
    # through dynamo's eager backend. Timings here mean nothing; the rows' logic is what is tested.
    import latency

    from frkern.graphs import EmulatedCapture

    monkeypatch.setattr(latency, "GRAPH_CAPTURE", EmulatedCapture())
    rows = latency.main(["--steps", "4", "--policies", "FRDiff:interval=2", "--graphs", "both", "--compile",
                         "--compile-backend", "eager", "--repeats", "1", "--out", str(tmp_path), "--tag", "t"])
    by = {(r.method, r.backend): r for r in rows}
    assert by[("torch.compile (default)", "eager")].deviation == 0.0
    eager = by[("frkern FRDiff:interval=2", "torch")]
    for label in ("torch+graphs", "torch+compile", "torch+graphs+compile"):
        r = by[("frkern FRDiff:interval=2", label)]
        assert r.deviation == eager.deviation and r.calls == eager.calls and r.ms_per_gen > 0
        assert "not timed" not in r.note
    assert by[("frkern FRDiff:interval=2", "torch+graphs")].note.startswith("graphs: captures 2")
    assert (tmp_path / "latency_tiny_cpu_float32_4steps_t.json").exists()


@pytest.mark.slow
def test_kernel_bench_smoke(tmp_path):
    import csv

    import kernel_bench

    rows = kernel_bench.main(["--smoke", "--dtype", "float32", "--out", str(tmp_path)])
    assert len(rows) == 2 * 3 + 1 + 1 + 2 + 4 + 4  # GroupNorm: 2 formats x 3 cases; score mix; GEGLU;
    # the cache codec: int8 and fp8 (bit-identical to the reference, else "not timed"); the cache's
    # consumers: norm2 decoding int8 / fp8, x + int8 branch, the keyframe's norm2 encoding int8; skip conv x 4
    codec = [r for r in rows if r["case"].startswith("cache ")]
    assert [r["case"] for r in codec] == ["cache int8 per-channel", "cache fp8_e4m3 per-channel"]
    assert all(r["bytes_ratio"] < 0.3 and r["ms_decode"] > 0 for r in codec)  # float32 in the smoke run
    consumers = [r for r in rows if "ms_baseline" in r]
    assert [r["case"] for r in consumers] == ["reuse norm2 from int8 cache (decode in prologue)",
                                              "reuse norm2 from fp8_e4m3 cache (decode in prologue)",
                                              "x + branch from int8 cache (dequantize_add)",
                                              "keyframe norm2 + int8 encode (quantize= fused)"]
    assert all(r["ms_fused"] > 0 and r["ms_unfused"] > 0 and r["baseline_over_fused"] > 0 and r["gbps_fused"] > 0
               for r in consumers)
    skip = [r for r in rows if r["case"].startswith("skip conv")]
    assert [round(r["active_frac"] * 6) for r in skip] == [6, 3, 2, 1]  # of 6 tiles per image: as drawn
    assert all(r["affected_frac"] >= r["active_frac"] and r["dense_over_gated"] > 0 for r in skip)
    assert all(r["max_abs_err"] <= kernel_bench.TOL[torch.float32] and "note" not in r for r in rows)
    with open(tmp_path / "kernels_cpu_float32.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == [r["case"] for r in rows]


def test_kernel_bench_time_budget_keeps_the_rows_measured(tmp_path):
    # Past --time-budget nothing more is timed: the rows so far are written, and a last row says so.
    import csv

    import kernel_bench

    rows = kernel_bench.main(["--smoke", "--dtype", "float32", "--cases", "score_mix", "geglu",
                              "--time-budget", "0", "--out", str(tmp_path)])
    assert [r["case"] for r in rows] == ["stopped"] and "--time-budget 0 s reached" in rows[0]["note"]
    with open(tmp_path / "kernels_cpu_float32.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == ["stopped"]


def test_policy_spec_parsing():
    import latency

    import frkern

    assert latency.policy_from_spec("FRDiff:interval=3,score_mix=false") == frkern.FRDiff(3, score_mix=False)
    assert latency.policy_from_spec("DeepCache:interval=5,branch=1") == frkern.DeepCache(5, 1)
    with pytest.raises(ValueError, match="unknown fields"):
        latency.policy_from_spec("FRDiff:m=3")


def test_swd_metric():
    from quality import swd

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 12))
    b = rng.standard_normal((2000, 12))
    assert swd(a, a) == 0.0
    assert swd(a, b) < 0.1
    assert swd(a, b + 0.5) > swd(a, b + 0.1) > swd(a, b)


def test_step_anatomy_counts_the_flops_of_real_calls():
    # The analytical per-op anatomy (meta device, flash-attention model) against the FLOP counter
    # on real CPU calls of the same layout, full and reuse (attention included: bench/flops.py).
    from flops import count_gflop
    from step_anatomy import anatomy

    from configs import CONFIGS, TEXT
    from diffusers import UNet2DConditionModel

    import frkern

    policy = frkern.FRDiff(interval=3)
    res = anatomy("small", policy, dtype=torch.float32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS["small"]).eval()
    x = torch.randn(2, 4, 32, 32)
    ehs = torch.randn(2, TEXT["small"][0], unet.config.cross_attention_dim)
    handle = frkern.patch(unet, policy, backend="torch")
    plans = policy.schedule(50)
    reuse = next(i for i, p in enumerate(plans) if not p.keyframe and p.runs_network)
    real = {}
    handle.begin(50)
    with torch.no_grad():
        for kind, step in [("full", 0), ("key", max(i for i in range(reuse) if plans[i].keyframe)), ("reuse", reuse)]:
            handle.set_step(step)
            real[kind] = count_gflop(lambda: unet(x, 500, ehs))
    for kind in ("full", "reuse"):
        assert res[kind]["total"]["gflop"] == pytest.approx(real[kind], rel=1e-3)
        assert res[kind]["total"]["mb"] > 0 and res[kind]["total"]["floor_us"] > 0
    assert res["reuse"]["total"]["floor_us"] < 0.5 * res["full"]["total"]["floor_us"]


@pytest.mark.slow  # extended tier (16 s): the generation's sums are the per-call records tested here
def test_step_anatomy_generation_counts_each_call_as_run():
    # --generation: every call of a generation recorded in order on the meta device, against the FLOP
    # counter on the same calls made for real (CPU): T-GATE's phases (self-attention reused, the
    # gate, the halved calls after it without cross-attention).
    from flops import count_gflop
    from step_anatomy import generation

    from configs import CONFIGS, TEXT
    from diffusers import UNet2DConditionModel

    import frkern

    n = 5
    for policy in (frkern.TGate(gate_step=3, sp_interval=2, warm_up=0),):
        gen = generation("small", policy, dtype=torch.float32, n=n)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**CONFIGS["small"]).eval()
        x = torch.randn(2, 4, 32, 32)
        ehs = torch.randn(2, TEXT["small"][0], unet.config.cross_attention_dim)
        handle = frkern.patch(unet, policy, backend="torch")
        handle.begin(n)
        real = {}
        with torch.no_grad():
            for i in range(n):  # every call in order; counted at one step of each phase
                handle.set_step(i)
                if i in (0, 1, 3):  # full; self-attention reused; after the gate (one half)
                    real[i] = count_gflop(lambda: unet(x, 500, ehs))
                else:
                    unet(x, 500, ehs)
        assert {i: gen["steps"][i]["gflop"] for i in real} == pytest.approx(real, rel=1e-3), policy
        assert real[0] > real[1] > real[3]
        assert gen["ratio"] == pytest.approx(sum(s["gflop"] for s in gen["steps"]) / (n * real[0]), rel=1e-3)


def test_step_anatomy_reuse_call_by_cache_format():
    # What a reuse call reads from an int8 cache, on the real patched model (meta device, fp32
    # here): FRDiff reads every stored tensor once, its ResNet and transformer states in their
    # consumers; DeepCache stores the output of its cut's last module only (the other cached
    # modules' outputs feed cached modules alone: zero stand-ins), decoded by a pass of its own.
    from step_anatomy import anatomy, reuse_by_cache_format

    import frkern

    for policy in (frkern.FRDiff(interval=3), frkern.DeepCache(interval=3)):
        model, int8 = reuse_by_cache_format("small", policy, ("model", "int8"), dtype=torch.float32)
        if isinstance(policy, frkern.FRDiff):  # "model" is anatomy()'s reuse call, op for op
            reuse = anatomy("small", policy, dtype=torch.float32)["reuse"]["total"]
            assert (model["ops"], model["mb"], model["floor_us"]) == (reuse["ops"], reuse["mb"], reuse["floor_us"])
        assert model["used_mb"] == model["cache_read_mb"] and model["decode_passes"] == 0
        assert int8["cache_read_mb"] == int8["stored_mb"] > 0  # every stored tensor read, scales included
        assert 0.24 < int8["used_mb"] / model["used_mb"] < 0.3  # 1 byte of 4, and the scales (MB to 0.01)
        if isinstance(policy, frkern.FRDiff):
            assert model["cache_read_mb"] == model["stored_mb"] and int8["used_mb"] == int8["cache_read_mb"]
            assert int8["decode_passes"] == 1  # the keyframe's output (score mixing); the units in their consumers
            assert int8["ops"] == model["ops"] + 1
            # the consumers read the stored bytes in place of the model's: the rest of the call is the same
            moved = model["mb"] - model["cache_read_mb"] + int8["cache_read_mb"]
            assert moved < int8["mb"] < moved + 0.1
        else:
            assert model["cache_read_mb"] == model["stored_mb"]  # what is stored, the call reads
            assert int8["decode_passes"] == 1 and int8["ops"] == model["ops"] + 1
            assert int8["used_mb"] == int8["cache_read_mb"]


# Every bench script with a command line (configs, flops, options, record and tiny_model have none).
SCRIPTS = ["latency", "quality", "autofr_search", "compile_check", "host_overhead", "kernel_bench",
           "step_anatomy", "train_tiny", "calibrate_adaptive", "data_parallel", "video_anatomy"]


def help_chunks(text: str) -> dict[str, str]:
    """--help text -> {first option string: its whole entry, whitespace removed}."""
    chunks, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            chunks[current] = ""
        if current:
            chunks[current] += "".join(line.split())
    return chunks


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_states_every_option_with_its_default(script, capsys):
    from options import shown_default

    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--help"])
    assert exit_.value.code == 0
    chunks = help_chunks(capsys.readouterr().out)
    for action in mod.parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        entry = chunks[action.option_strings[0]]
        assert len(action.help) > 5, (script, action.dest)  # documented
        if "default" in action.help:  # a default the help spells out (it depends on the device)
            assert "default" in entry
        else:
            assert "(default:" + "".join(shown_default(action.default).split()) + ")" in entry, (script, entry)


@pytest.mark.parametrize("script", SCRIPTS)
def test_results_go_to_bench_results_local_unless_out_says_otherwise(script):
    local = os.path.realpath(os.path.join(BENCH, "results", "local"))
    out = importlib.import_module(script).parser().get_default("out")
    assert os.path.realpath(out) == local or os.path.dirname(os.path.realpath(out)) == local  # train_tiny: a subfolder
    # quality.py still evaluates the committed Auto-FR policies by default
    if script == "quality":
        assert importlib.import_module(script).parser().get_default("autofr") == [os.path.join(BENCH, "results")]


def test_timing_summary_flags_a_wide_spread_and_not_a_tight_one():
    from latency import MAX_SPREAD, summarize

    tight = summarize([100.0, 101.0, 99.0, 100.5, 99.5])
    assert tight.median == 100.0 and tight.spread == pytest.approx(0.02) and not tight.noisy
    wide = summarize([100.0, 1650.0, 98.0, 101.0, 99.0])  # one repeat hit by a busy machine
    assert wide.median == 100.0 and wide.spread == pytest.approx(15.52) and wide.noisy
    assert summarize([10.0, 11.5, 10.0], max_spread=0.1).noisy and not summarize([10.0, 11.5, 10.0]).noisy
    assert MAX_SPREAD == 0.2 and summarize([5.0]) == (5.0, 0.0, False)


def test_noisy_rows_are_flagged_in_the_table_and_the_record():
    from latency import Row, Timing, fmt_cells, record_timings

    base, tight, wide = Row("diffusers eager"), Row("frkern A"), Row("frkern B")
    timings = [Timing(base, "ms_per_gen", None, samples=[100.0, 102.0, 101.0]),
               Timing(tight, "ms_per_gen", None, samples=[50.0, 51.0, 50.5]),
               Timing(wide, "ms_per_gen", None, samples=[50.0, 900.0, 52.0]),
               Timing(wide, "ms_full_call", None, samples=[5.0, 5.1, 5.0])]
    record_timings(timings, max_spread=0.2)
    assert (base.noisy, tight.noisy, wide.noisy) == (False, False, True)
    assert wide.ms_per_gen == 52.0 and wide.samples["ms_per_gen"] == [50.0, 900.0, 52.0]
    assert wide.spread["ms_per_gen"] == pytest.approx(850 / 52) and wide.spread["ms_full_call"] == pytest.approx(0.02)
    head = ["speed-up", "timing spread"]
    cells = {r.method: dict(zip(head, fmt_cells(r, base)[8:10])) for r in (base, tight, wide)}
    assert cells["frkern A"] == {"speed-up": "2.00x", "timing spread": "2%"}
    assert cells["frkern B"] == {"speed-up": "1.94x !", "timing spread": "1635% !"}
    assert json.loads(json.dumps(wide.__dict__))["noisy"] is True


def test_timings_are_interleaved_round_robin():
    from latency import Row, Timing, interleaved, time_interleaved

    assert interleaved(["A", "B", "C"], 2) == [(0, "A"), (0, "B"), (0, "C"), (1, "A"), (1, "B"), (1, "C")]
    ran, rounds = [], []
    row = Row("r")
    timings = [Timing(row, f, lambda f=f: ran.append(f), setup=lambda f=f: ran.append("setup " + f))
               for f in ("ms_per_gen", "ms_full_call")]
    time_interleaved(timings, lambda fn, number: fn() or 7.0, repeats=3, max_spread=0.2,
                     after_round=lambda: rounds.append(len(ran)))
    assert ran == ["setup ms_per_gen", "ms_per_gen", "setup ms_full_call", "ms_full_call"] * 3
    assert rounds == [4, 8, 12]  # the record is rewritten after every round
    assert row.samples == {"ms_per_gen": [7.0] * 3, "ms_full_call": [7.0] * 3} and row.ms_per_gen == 7.0


def test_progress_bars_need_tqdm_only_when_installed(monkeypatch):
    from latency import progress

    assert list(progress([1, 2], "x")) == [1, 2]
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed: import raises ImportError
    items = [1, 2]
    assert progress(items, "x") is items


def test_autofr_search_init_spec():
    import autofr_search

    import frkern

    assert autofr_search.init_policy("full") is None
    assert autofr_search.init_policy("FRDiff:interval=3,bias=1") == frkern.FRDiff(3, score_mix=True, bias=1.0)
    for bad, match in (("FRDiff:interval=0", "interval"), ("Nope:x=1", "Nope"), ("frsm", "expected full")):
        with pytest.raises(SystemExit, match=match):
            autofr_search.init_policy(bad)


# ----------------------------------------------------------------------------- policy specs
def test_spec_grammar_accepts_bare_strings_numbers_booleans_tuples_and_files(tmp_path, monkeypatch):
    from specs import parse_spec, parse_value

    import frkern

    assert [parse_value(v) for v in ("3", "-2", "0.05", "1e-3", "true", "False", "none", "clockwork", '"a,b"',
                                     "'x'", "(0,3,7)", "[0, 3, 7]", "()", "(1.5,)")] == \
        [3, -2, 0.05, 1e-3, True, False, None, "clockwork", "a,b", "x", (0, 3, 7), (0, 3, 7), (), (1.5,)]
    policy = lambda text, steps=None: parse_spec(text, steps).policy  # noqa: E731
    assert policy("Adaptive:threshold=0.05,reuse=clockwork") == frkern.Adaptive(0.05, reuse="clockwork")
    assert policy('Adaptive:threshold=1e9,reuse="clockwork",max_reuse=1') == \
        frkern.Adaptive(1e9, reuse="clockwork", max_reuse=1)
    assert policy("frdiff:interval=3,score_mix=FALSE") == frkern.FRDiff(3, score_mix=False)  # names: any case
    assert policy("Keyframes:keyframes=(0,3,7),num_steps=10", 10) == policy("Keyframes:keyframes=[0,3,7],num_steps=10")
    assert policy("SkipConv:threshold=0.05,interval=none") == frkern.SkipConv(0.05)
    assert policy("Adaptive:poly=(1,0.5,0)").poly == (1.0, 0.5, 0.0)
    assert policy('{"policy": "DeepCache", "interval": 4}') == frkern.DeepCache(4)
    # a saved policy: @FILE or a bare .json path, relative to the current folder or the repository
    # root, with fields overriding the saved ones; Clockwork's adaptor= is looked up the same way
    monkeypatch.chdir(tmp_path)
    saved = parse_spec("@bench/results/adaptive_tiny_ddim50_clockwork.policy.json:threshold=0.06,warmup=2", 50)
    assert saved.policy.rule == "accumulated" and (saved.policy.threshold, saved.policy.warmup) == (0.06, 2)
    assert saved.label == "Adaptive @adaptive_tiny_ddim50_clockwork.policy.json:threshold=0.06,warmup=2"
    frkern.save_policy(frkern.Keyframes((0, 2), num_steps=4), tmp_path / "mine.json")
    assert policy("mine.json", 4) == policy("@mine.json") == frkern.Keyframes((0, 2), num_steps=4)
    adapted = policy("Clockwork:clock=4,adaptor=bench/results/adaptors/clockwork_tiny_ddim50_c4", 50)
    assert os.path.exists(adapted.adaptor + ".safetensors")


@pytest.mark.parametrize("spec, says", [
    ("Adaptive:threshold=0.05,reuse=clokwork", "reuse must be one of"),
    ("FRDiff:m=3", "unknown fields"),
    ("Nope:x=1", "unknown policy 'Nope'"),
    ("FRDiff:interval", "is not FIELD=VALUE"),
    ("FRDiff:interval=(1,2", "unclosed bracket"),
    ("FRDiff:interval=2,interval=3", "given twice"),
    ("@no_such_policy.json", "not found"),
    ("Keyframes:keyframes=(0,3),num_steps=50", "made for 50 steps"),  # --steps 4 below
    ("Clockwork:clock=4,adaptor=bench/results/adaptors/clockwork_tiny_ddim50_c4", "trained for 50 steps"),
    ("Clockwork:clock=2,adaptor=no/such/adaptor", "adaptor 'no/such/adaptor' not found"),
])
def test_a_bad_spec_is_one_line_naming_it_and_the_grammar(spec, says):
    from specs import GRAMMAR_LINE, SpecError, parse_specs

    with pytest.raises(SpecError) as e:
        parse_specs(["FRDiff:interval=2", spec], steps=4)
    text = str(e.value)
    assert says in text and f"--policies {spec!r}" in text and GRAMMAR_LINE in text and "\n" not in text


def test_latency_refuses_a_bad_spec_before_any_work(monkeypatch, capsys):
    import latency

    def no_work(*a, **k):
        raise AssertionError("a model was built for a run with a bad spec")

    monkeypatch.setattr(latency, "build_unet", no_work)
    monkeypatch.setattr(latency, "run", no_work)
    for argv in (["--policies", "FRDiff:interval=2", "Adaptive:threshold=0.05,reuse=clokwork"],
                 ["--steps", "4", "--policies", "@bench/results/autofr_tiny_50steps_w0.005.policy.json"]):
        with pytest.raises(SystemExit) as exit_:
            latency.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and repr(argv[-1]) in err and "Spec grammar:" in err


def test_the_default_rows_cover_every_policy_kind():
    import latency
    from specs import parse_specs

    import frkern

    specs = parse_specs(latency.DEFAULT_POLICIES, steps=50)
    assert {s.policy.name for s in specs} | {"NoReuse"} == set(frkern.policies.POLICIES)  # NoReuse: always a row
    by_kind = {}
    for s in specs:
        by_kind.setdefault(s.policy.name, []).append(s.policy)
    assert any(p.adaptor for p in by_kind["Clockwork"]) and any(not p.adaptor for p in by_kind["Clockwork"])
    assert {p.rule for p in by_kind["Adaptive"]} == {"accumulated", "first_block"}
    assert by_kind["Keyframes"][0].jumps  # the shipped Auto-FR schedule with jumps
    assert "densely" in latency.SKIPCONV_CPU_NOTE and "saves no time" in latency.SKIPCONV_CPU_NOTE
    # at other step counts the default list leaves out what was made for 50 steps, and says so
    ap = latency.parser()
    usable, left_out = latency.frkern_specs(ap, ap.parse_args(["--steps", "4"]))
    assert sorted(s.policy.name for s, _ in left_out) == ["Clockwork", "EncoderPropagation", "Keyframes"]
    assert len(usable) == len(latency.DEFAULT_POLICIES) - 3 and all("50 steps" in why for _, why in left_out)


def test_threads_are_set_for_the_run_and_restored(monkeypatch):
    import latency

    seen = []
    monkeypatch.setattr(latency, "run", lambda args, *a: seen.append((args.threads, torch.get_num_threads())))
    before = torch.get_num_threads()
    latency.main(["--threads", "3", "--policies", "FRDiff:interval=2"])
    latency.main(["--policies", "FRDiff:interval=2"])  # CPU default: 1
    assert seen == [(3, 3), (1, 1)] and torch.get_num_threads() == before


# ----------------------------------------------------------------------------- scripts and helpers
ALL_SCRIPTS = SCRIPTS + ["aot_compile", "train_clockwork_adaptor"]
HELPERS = ["configs", "flops", "options", "record", "specs", "tiny_model"]
HEAVY = ("torch", "diffusers", "frkern", "numpy")


def test_every_bench_module_is_a_script_or_a_helper_that_does_not_look_like_one():
    found = {f[:-3] for f in os.listdir(BENCH) if f.endswith(".py")}
    assert set(ALL_SCRIPTS) | set(HELPERS) <= found
    for name in HELPERS:
        source = open(os.path.join(BENCH, name + ".py")).read()
        doc = " ".join(importlib.import_module(name).__doc__.split())
        assert "helper module, not a script" in doc and "if __name__" not in source, name
    for name in found - set(HELPERS):  # the rest are scripts (a new helper joins HELPERS)
        assert 'if __name__ == "__main__":' in open(os.path.join(BENCH, name + ".py")).read(), name


CHECK_BEFORE_IMPORTS = r"""
import io, json, runpy, sys, time, contextlib
out = {}
for name, argv in json.loads(sys.argv[1]):
    sys.argv = [name + ".py"] + argv
    t0, err = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = None
        except SystemExit as e:
            code = e.code
    out[name + " " + " ".join(argv)] = [code, time.perf_counter() - t0, err.getvalue()]
out["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps(out))
""" % (HEAVY,)


def test_help_and_bad_specs_answer_before_torch_loads():
    import subprocess

    runs = [(s, ["--help"]) for s in ALL_SCRIPTS]
    runs += [("latency", ["--policies", "Adaptive:threshold=0.05,reuse=clokwork"]),
             ("compile_check", ["--policy", "FRDiff:intervl=2"]), ("step_anatomy", ["--policy", "Nope"]),
             ("host_overhead", ["--policy", "DeepCache:interval=0"]), ("autofr_search", ["--init", "frsm"])]
    result = subprocess.run([sys.executable, "-c", CHECK_BEFORE_IMPORTS, json.dumps(runs)], cwd=BENCH,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out.pop("heavy") == []  # neither --help nor a bad spec imported torch, diffusers, frkern or numpy
    for run, (code, seconds, err) in out.items():
        assert seconds < 3, run
        if run.endswith("--help"):
            assert code in (0, None), run
        else:
            message = (err or (code if isinstance(code, str) else "")).strip()  # SystemExit("...") prints at exit
            assert code not in (0, None) and message and "\n" not in message, (run, err)


def test_known_harmless_library_warnings_are_dropped_and_others_kept(caplog):
    import logging

    from options import quiet_known_warnings
    from tiny_model import load

    quiet_known_warnings()
    log = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.WARNING):
        load()
        log.warning("There are modules in UNet2DConditionModel that should be kept in float32: []. Casting ...")
        log.warning("There are modules in UNet2DConditionModel that should be kept in float32: ['norm']. Casting ...")
    assert [r.getMessage()[-20:] for r in caplog.records] == ["float32: ['norm']. Casting ..."[-20:]]


def test_compile_check_defaults_to_the_readme_backend_and_explains_its_deviation():
    import compile_check

    assert compile_check.parser().get_default("backend") == "inductor"  # torch.compile's default, the README's
    assert "max_abs = max |x - x_full|" in compile_check.DEVIATION and "rel_l2" in compile_check.DEVIATION


def test_a_generation_its_set_up_already_ran_needs_no_warm_up_on_a_cpu():
    from latency import SETUP_WARMS_MS, Row, Timing, warm_up

    ran = []
    warm = Timing(Row("a"), "ms_per_gen", lambda: ran.append("a"), setup_ms=SETUP_WARMS_MS)
    cold = Timing(Row("b"), "ms_per_gen", lambda: ran.append("b"), setup_ms=SETUP_WARMS_MS / 2)
    short = Timing(Row("c"), "ms_full_call", lambda: ran.append("c"))
    warm_up([warm, cold, short], lambda fn, number: fn() or 5.0, runs=1, setup_warms=True)
    assert ran == ["b", "c"] and (warm.number, short.number) == (1, 4)  # 4 x 5 ms >= MIN_SAMPLE_MS
    warm_up([warm], lambda fn, number: fn() or 5.0, runs=3)  # CUDA: every timing warms up
    assert ran == ["b", "c", "a", "a", "a"]


# Extended tier, all three (svd: 5-D latents plus its image conditioning; the other two share its
# loop); the image rows above run the same harness by default
@pytest.mark.parametrize("config", [pytest.param("animatediff", marks=pytest.mark.slow),
                                    pytest.param("t2v", marks=pytest.mark.slow),
                                    pytest.param("svd", marks=pytest.mark.slow)])
def test_latency_harness_runs_the_video_families(config, tmp_path):
    """--config animatediff / t2v / svd: 5-D latents (SVD's with its image latents concatenated) through
    the same CFG DDIM loop; the deepcache package's SD helper has no row there (it patches 2-D UNets
    only)."""
    import latency

    rows = latency.main(["--config", config, "--steps", "3", "--policies", "DeepCache:interval=2",
                         "--repeats", "1", "--out", str(tmp_path)])
    by = {r.method: r for r in rows}
    assert set(by) == {"diffusers eager", "frkern NoReuse", "frkern DeepCache:interval=2"}
    assert by["frkern NoReuse"].deviation == 0.0
    dc = by["frkern DeepCache:interval=2"]
    assert dc.calls == {"full": 2, "reuse": 1} and dc.gflop_per_gen < by["diffusers eager"].gflop_per_gen
    assert 0 < dc.deviation < 1
