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
    assert all("noisy" in r and "spread" in r for r in data["rows"])
    assert data["meta"]["timing"]["repeats"] == 2
    # the table says what its figures are
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| score mix |" in md and "timing spread" in md
    assert "rel. dev. of latents: ||x - x_ref||_2 / ||x_ref||_2 over the final latents" in md


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


def test_kernel_bench_smoke(tmp_path):
    import kernel_bench

    rows = kernel_bench.main(["--smoke", "--dtype", "float32", "--out", str(tmp_path)])
    assert len(rows) == 2 * 3 + 1 + 1 + 4  # GroupNorm: 2 formats x 3 cases; score mix; GEGLU; skip conv x 4
    skip = [r for r in rows if r["case"].startswith("skip conv")]
    assert [round(r["active_frac"] * 6) for r in skip] == [6, 3, 2, 1]  # of 6 tiles per image: as drawn
    assert all(r["affected_frac"] >= r["active_frac"] and r["dense_over_gated"] > 0 for r in skip)
    assert all(r["max_abs_err"] <= kernel_bench.TOL[torch.float32] and "note" not in r for r in rows)
    assert (tmp_path / "kernels_cpu_float32.csv").exists()


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


# Every bench script with a command line (configs, flops, options, record and tiny_model have none).
SCRIPTS = ["latency", "quality", "autofr_search", "compile_check", "host_overhead", "kernel_bench",
           "step_anatomy", "train_tiny", "calibrate_adaptive"]


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
