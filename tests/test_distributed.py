"""frkern in more than one process and thread (issue 21): data parallel replicas, CFG-parallel
(frkern.distributed), the errors of a CFG split that cannot work, and two threads.

Two processes (gloo on the CPU, torch.multiprocessing spawn, a file store) run every multi-process
scenario once (the `ranks` fixture: one process group, one import of torch and diffusers per
rank) and save what they saw; the test process computes the single-process references meanwhile
and the tests compare. Tiny models (tests/tiny.py), backend="torch", one intra-op thread everywhere
(bit-for-bit comparisons across processes need the same thread count).

Tolerances: data parallel is compared bit for bit (torch.equal), decisions exactly. CFG-parallel
runs half the batch per rank, so some CPU kernels block their reductions differently than for the
whole batch (one UNet call of the tiny model differs from the batched call by ~1e-6 relative L2):
final latents within relative L2 1e-5 of the batched run, Adaptive's indicator within 1e-4
relative, decisions (full / reuse per step) exactly equal to the batched run's, and the two ranks'
handle.stats (counters and indicator floats) identical.
"""
from __future__ import annotations

import collections
import copy
import math
import os
import statistics
import threading
import time

import pytest
import torch
import torch.distributed as dist

import frkern
import frkern.distributed as fd
from tiny import make_sd_pipeline, sd_prompt_kwargs

STEPS = 8
GUIDANCE = 7.5
SIZE = 16  # pixels: 8x8 latents, the tiny UNet's three levels at 8, 4 and 2
# (prompt seed, noise seed) of each image; data parallel splits them over the ranks
ITEMS = [(10, 0), (11, 1), (12, 2), (13, 3)]
CFG_ITEMS = ITEMS[:2]
DP_POLICIES = {"deepcache": frkern.DeepCache(interval=2, branch=1),
               "adaptive": frkern.Adaptive(0.35, reuse="clockwork")}
CFG_POLICIES = {**DP_POLICIES,
                "accumulated": frkern.Adaptive(0.45, rule="accumulated", reuse="units", max_reuse=3)}
# (the thresholds lie >= 0.02 from every indicator value of these runs: decisions are not decided
# by rounding)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
               "broadcast", "broadcast_object_list", "barrier", "reduce", "reduce_scatter_tensor", "all_to_all_single",
               "send", "recv", "isend", "irecv")
WORKER_TIMEOUT_S = 240
PIPELINE_MODULE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"
DECISIONS = ("full", "reuse", "skip", "promoted", "forced", "untracked")


# ----------------------------------------------------------------------------- one generation
def generate(pipe, items, steps=STEPS, guidance=GUIDANCE, after_step=None):
    """Final latents, handle.stats and the decision counters after each step."""
    embeds = [sd_prompt_kwargs(batch=1, seed=p) for p, _ in items]
    per_step = []

    def on_step_end(_pipe, i, t, kwargs):
        stats = frkern.handle_of(pipe).stats
        per_step.append({k: stats.get(k, 0) for k in DECISIONS})
        if after_step is not None:
            after_step(i)
        return kwargs

    latents = pipe(prompt_embeds=torch.cat([e["prompt_embeds"] for e in embeds]),
                   negative_prompt_embeds=torch.cat([e["negative_prompt_embeds"] for e in embeds]),
                   num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE, output_type="latent",
                   generator=[torch.Generator().manual_seed(s) for _, s in items],
                   callback_on_step_end=on_step_end).images
    return {"latents": latents, "stats": frkern.handle_of(pipe).stats, "per_step": per_step}


def patched(policy):
    pipe = make_sd_pipeline()
    frkern.patch(pipe, policy, backend="torch")
    return pipe


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def failure(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test process to check
        return type(e).__name__, str(e)
    return None


# ----------------------------------------------------------------------------- the ranks
class CountCollectives:
    """Counts every torch.distributed collective called through the module (frkern.distributed
    calls them as dist.<name>)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.counts[_name] += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _worker(rank: int, store: str, out_dir: str, started: float) -> None:
    import datetime

    torch.set_num_threads(1)
    phases = {"start": time.time() - started}
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    phases["init"] = time.time() - started
    res = {"phases": phases}
    try:
        # data parallel: each rank its own pipeline and its share of the prompts; no collective
        for name, policy in DP_POLICIES.items():
            pipe = patched(policy)
            with CountCollectives() as c:
                res[f"dp/{name}"] = generate(pipe, fd.shard(ITEMS))
                res[f"dp/{name}"]["collectives"] = dict(c.counts)
                res[f"dp/{name}"]["indicator_reduction"] = frkern.handle_of(pipe).indicator_reduction
        phases["data parallel"] = time.time() - started
        # CFG-parallel: one generation, its CFG batch split over the two ranks
        for name, policy in CFG_POLICIES.items():
            pipe = patched(policy)
            with fd.cfg_parallel(pipe) as cp, CountCollectives() as c:
                res[f"cfg/{name}"] = generate(pipe, CFG_ITEMS)
                res[f"cfg/{name}"].update(collectives=dict(c.counts), timings=dict(cp.timings), calls=cp.calls)
        # the same split under model CPU offload (accelerate's hook on the UNet, removed and re-added by
        # the pipeline around each call): the split's forward goes where the patched forward is, beneath it
        pipe = patched(CFG_POLICIES["adaptive"])
        pipe.enable_model_cpu_offload(device="cpu")
        with fd.cfg_parallel(pipe) as cp:
            res["cfg/offloaded"] = generate(pipe, CFG_ITEMS)
            res["cfg/offloaded"].update(calls=cp.calls, installed=cp.installed,
                                        hooked=type(getattr(pipe.unet, "_hf_hook", None)).__name__)
        res["cfg/offloaded"]["after undo"] = (
            pipe.unet.__dict__["_old_forward"] == frkern.handle_of(pipe)._chain_forward)
        phases["cfg parallel"] = time.time() - started
        res["cost"] = collective_cost()
        res["errors"] = errors(rank)
        phases["errors"] = time.time() - started
        res["lifecycle"] = lifecycle()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()


def collective_cost(repeats: int = 50) -> dict:
    """Median ms of the two collectives a CFG-parallel call makes, after a barrier, at the sizes of
    this test (one rank's output of the CFG_ITEMS generation; one fp32 scalar)."""
    out = torch.randn(len(CFG_ITEMS), 4, SIZE // 2, SIZE // 2)
    gathered = torch.empty(2 * out.numel())
    scalar = torch.rand(())
    times = {"all_gather (2x4x8x8 fp32)": [], "all_reduce max (1 fp32)": []}
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fd._all_gather_single(gathered, out.reshape(-1), None)
        times["all_gather (2x4x8x8 fp32)"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(scalar, op=dist.ReduceOp.MAX)
        times["all_reduce max (1 fp32)"].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def errors(rank: int) -> dict:
    policy = DP_POLICIES["adaptive"]
    out = {}
    # a group that is not of size 2 (every rank makes both groups, each uses its own)
    singles = [dist.new_group([0]), dist.new_group([1])]
    pipe = patched(policy)
    out["group of 1"] = failure(lambda: fd.cfg_parallel(pipe, group=singles[rank]))
    out["unpatched"] = failure(lambda: fd.cfg_parallel(make_sd_pipeline()))
    with fd.cfg_parallel(pipe):
        out["twice"] = failure(lambda: fd.cfg_parallel(pipe))
        # no CFG (guidance 1) and one prompt: a batch of 1
        out["odd batch"] = failure(lambda: generate(pipe, CFG_ITEMS[:1], guidance=1.0))
        # the ranks run different generations: other noise seeds, other step counts
        out["other seed"] = failure(lambda: generate(pipe, [(10, rank)]))
        out["other steps"] = failure(lambda: generate(pipe, CFG_ITEMS, steps=STEPS - 2 * rank))

        # a reset on one rank only: its next call is a keyframe where the other rank reuses
        def reset_on_rank_1(i):
            if rank == 1 and i == 2:
                frkern.handle_of(pipe).reset()

        out["reset on one rank"] = failure(lambda: generate(pipe, CFG_ITEMS, after_step=reset_on_rank_1))

        # a weights change on one rank only (an in-place update: same values, a new version): its next
        # call would be promoted to a full one while the other rank probes
        def touch_weights_on_rank_1(i):
            if rank == 1 and i == 2:
                with torch.no_grad():
                    pipe.unet.conv_in.weight.mul_(1.0)

        out["weights on one rank"] = failure(lambda: generate(pipe, CFG_ITEMS, after_step=touch_weights_on_rank_1))
        # and after all that a good generation still runs
        out["good after errors"] = generate(pipe, CFG_ITEMS)["stats"]
    return out


def lifecycle() -> dict:
    pipe = patched(DP_POLICIES["adaptive"])
    handle = frkern.handle_of(pipe)
    patched_forward = pipe.unet.__dict__["forward"]
    cp = fd.cfg_parallel(pipe)
    during = (fd.cfg_parallel_of(pipe) is cp, handle.indicator_reduction is not None,
              pipe.unet.__dict__["forward"] != patched_forward,
              "cannot be copied" in (failure(lambda: copy.deepcopy(pipe.unet)) or ("", ""))[1])
    cp.undo()
    after_undo = (fd.cfg_parallel_of(pipe) is None, handle.indicator_reduction is None,
                  pipe.unet.__dict__["forward"] == patched_forward)
    cp2 = fd.cfg_parallel(handle)  # a handle works too
    frkern.unpatch(pipe)  # ends the split
    after_unpatch = (fd.cfg_parallel_of(pipe.unet) is None, "forward" not in pipe.unet.__dict__)
    cp2.undo()  # harmless now
    handle = frkern.patch(pipe, DP_POLICIES["adaptive"], backend="torch")
    again = fd.cfg_parallel(pipe).installed  # a new patch can be split again
    return {"during": during, "after undo": after_undo, "after unpatch": after_unpatch, "again": again}


# ----------------------------------------------------------------------------- the fixture
def references() -> dict:
    """What the ranks' results must equal, computed in this process (one thread)."""
    ref = {}
    for name, policy in DP_POLICIES.items():
        pipe = patched(policy)  # one pipeline runs rank 0's share, then rank 1's
        ref[f"dp/{name}"] = [generate(pipe, fd.shard(ITEMS, r, 2)) for r in range(2)]
    for name, policy in CFG_POLICIES.items():
        ref[f"cfg/{name}"] = generate(patched(policy), CFG_ITEMS)  # one batched CFG generation
    return ref


def stop_forkserver() -> None:
    """The fork server (torch and diffusers loaded) is not kept for the rest of the suite."""
    import multiprocessing.forkserver as fs

    fs.set_forkserver_preload([])
    stop = getattr(fs._forkserver, "_stop", None)  # CPython's own (used by its tests); absent: it stays
    if stop is not None:
        stop()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    # forkserver: one fresh process imports torch, diffusers' pipeline and this module once (the
    # import is most of a rank's start-up on 2 cores), the two ranks are forked from it
    mp.get_context("forkserver").set_forkserver_preload([__name__, PIPELINE_MODULE])
    ctx = mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp), time.time()), nprocs=2, join=False,
                             start_method="forkserver")
    try:
        torch.set_num_threads(1)
        ref = references()  # while the ranks start up
        ref_s = time.perf_counter() - t0
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the two ranks did not finish within {WORKER_TIMEOUT_S} s")
    finally:
        torch.set_num_threads(threads)
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        stop_forkserver()
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    print(f"\n[test_distributed] two ranks and the references: {time.perf_counter() - t0:.1f} s (references "
          f"{ref_s:.1f} s; rank 0 at s: " + ", ".join(f"{k} {v:.1f}" for k, v in results[0]["phases"].items()) + ")")
    return results, ref


# ----------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("name", sorted(DP_POLICIES))
def test_data_parallel_ranks_equal_a_single_process_bit_for_bit(ranks, name):
    results, ref = ranks
    for r in range(2):
        got, want = results[r][f"dp/{name}"], ref[f"dp/{name}"][r]
        assert got["latents"].shape[0] == 2 and torch.equal(got["latents"], want["latents"]), (name, r)
        assert got["stats"] == want["stats"] and got["per_step"] == want["per_step"], (name, r)
        # each rank decided on its own: no collective at all, no indicator reduction
        assert got["collectives"] == {} and got["indicator_reduction"] is None
    # the ranks ran different prompts, so Adaptive's decisions are their own (not agreed)
    if name == "adaptive":
        assert results[0]["dp/adaptive"]["stats"]["indicator"] != results[1]["dp/adaptive"]["stats"]["indicator"]


# ----------------------------------------------------------------------------- CFG-parallel
@pytest.mark.parametrize("name", sorted(CFG_POLICIES))
def test_cfg_parallel_equals_the_batched_run_and_both_ranks_decide_alike(ranks, name):
    results, ref = ranks
    want = ref[f"cfg/{name}"]
    a, b = results[0][f"cfg/{name}"], results[1][f"cfg/{name}"]
    assert torch.equal(a["latents"], b["latents"])  # both ranks hold the gathered batch
    err = rel(a["latents"], want["latents"])
    print(f"\n[test_distributed] CFG-parallel {name}: rel. L2 of the final latents vs the batched run {err:.2e}")
    assert err < 1e-5, (name, err)
    assert a["stats"] == b["stats"] and a["per_step"] == b["per_step"]  # identical, indicator floats included
    assert a["per_step"] == want["per_step"]  # the batched run's decisions, step by step
    assert {k: v for k, v in a["stats"].items() if k != "indicator"} == \
        {k: v for k, v in want["stats"].items() if k != "indicator"}
    calls = STEPS  # one UNet call per step, batched [uncond; cond]
    assert a["calls"] == calls and sum(a["stats"].get(k, 0) for k in ("full", "reuse", "skip")) == calls
    assert a["stats"]["full"] < calls and a["stats"].get("reuse", 0) > 0  # it reused
    probes = 0
    if name != "deepcache":
        ind, ind_ref = a["stats"]["indicator"], want["stats"]["indicator"]
        assert ind.keys() == ind_ref.keys()
        for step in ind:
            assert math.isclose(ind[step], ind_ref[step], rel_tol=1e-4), (step, ind[step], ind_ref[step])
        worst = max(abs(ind[k] - ind_ref[k]) / abs(ind_ref[k]) for k in ind if math.isfinite(ind_ref[k]))
        print(f"[test_distributed] CFG-parallel {name}: largest rel. difference of the indicator {worst:.1e}")
        probes = len(ind)
    # per call (gloo: verified) one all-gather of the call's header and one of the output; per probe
    # one all-reduce. The one-tensor all-gather is all_gather_single where torch has it (2.13) and
    # all_gather_into_tensor before (2.11, the GPU image): one name or the other, never both.
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    assert a["collectives"] == {gather: 2 * calls, **({"all_reduce": probes} if probes else {})}
    assert len(a["timings"]["check"]) == len(a["timings"]["all_gather"]) == calls
    assert len(a["timings"]["all_reduce"]) == probes


def test_collective_cost_is_measured(ranks):
    results, _ = ranks
    for r in range(2):
        cost = results[r]["cost"]
        timings = results[r]["cfg/adaptive"]["timings"]
        in_run = {k: 1e3 * statistics.median(v) for k, v in timings.items() if v}
        print(f"\n[test_distributed] rank {r} gloo collective ms (median, after a barrier): "
              + ", ".join(f"{k} {v:.3f}" for k, v in cost.items())
              + "; inside the CFG-parallel Adaptive run (includes waiting for the other rank): "
              + ", ".join(f"{k} {v:.3f}" for k, v in in_run.items()))
        assert all(0 < v < 1e3 for v in cost.values())


# ----------------------------------------------------------------------------- errors
def test_cfg_parallel_refuses_without_torch_distributed():
    assert not dist.is_initialized()
    pipe = patched(DP_POLICIES["adaptive"])
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fd.cfg_parallel(pipe)
    assert frkern.handle_of(pipe).indicator_reduction is None and fd.cfg_parallel_of(pipe) is None


def test_cfg_parallel_errors_name_what_is_wrong(ranks):
    results, ref = ranks
    for r in range(2):
        e = results[r]["errors"]
        kind, message = e["group of 1"]
        assert kind == "ValueError" and "1 rank(s)" in message and "exactly 2" in message
        assert e["unpatched"][0] == "ValueError" and "not patched" in e["unpatched"][1]
        assert e["twice"][0] == "RuntimeError" and "already CFG-parallel" in e["twice"][1]
        assert e["odd batch"][0] == "ValueError" and "batch of 1 does not split" in e["odd batch"][1]
        for case, what in (("other seed", "sample sum"), ("other steps", "num_steps=8")):
            kind, message = e[case]
            assert kind == "RuntimeError" and "different generations" in message and what in message, (case, message)
        assert "num_steps=6" in e["other steps"][1]
        for case in ("reset on one rank", "weights on one rank"):
            kind, message = e[case]
            assert kind == "RuntimeError" and "decisions or weights have diverged" in message, (case, message)
        assert "rank 0 [3, 0, 0, 0, 0, 0, 0], rank 1 [3, 0, 0, 0, 0, 0, 1]" in e["weights on one rank"][1]
        # the failed calls left nothing behind: the next generation is the good one
        assert e["good after errors"] == results[r]["cfg/adaptive"]["stats"]


def test_cfg_parallel_undo_and_unpatch(ranks):
    results, _ = ranks
    for r in range(2):
        lc = results[r]["lifecycle"]
        assert lc == {"during": (True, True, True, True), "after undo": (True, True, True),
                      "after unpatch": (True, True), "again": True}


def test_cfg_parallel_under_model_cpu_offload(ranks):
    results, ref = ranks
    want = ref["cfg/adaptive"]
    for r in range(2):
        got = results[r]["cfg/offloaded"]
        assert got["hooked"] == "CpuOffload" and got["installed"] and got["calls"] == STEPS
        assert rel(got["latents"], want["latents"]) < 1e-5 and got["per_step"] == want["per_step"]
        assert got["after undo"]  # undo put the patched forward back beneath the hook


def test_shard_splits_like_accelerate():
    assert [fd.shard(range(5), r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [fd.shard(range(2), r, 3) for r in range(3)] == [[0], [1], []]
    assert fd.shard([1, 2, 3]) == [1, 2, 3]  # not distributed: everything
    with pytest.raises(ValueError, match="rank 2"):
        fd.shard([1], 2, 2)


# ----------------------------------------------------------------------------- threads
def test_two_threads_each_with_its_own_patched_pipeline_match_one_after_the_other():
    """Each thread patches its pipeline, runs generations and unpatches it while the other runs
    (patching registers modules: torch's global registration hooks bump frkern.watch's shared
    epoch, which the other thread's model sees on its next call)."""
    jobs = {"adaptive": (CFG_POLICIES["accumulated"], ITEMS[:2]), "deepcache": (DP_POLICIES["deepcache"], ITEMS[2:])}
    rounds = 2

    def run(pipe, policy, items, out):
        frkern.patch(pipe, policy, backend="torch")
        for _ in range(rounds):
            out.append(generate(pipe, items))
        frkern.unpatch(pipe)
        out.append(generate_unpatched(pipe, items))

    def generate_unpatched(pipe, items):  # the pipeline as it was: unpatch restored everything
        embeds = [sd_prompt_kwargs(batch=1, seed=p) for p, _ in items]
        return pipe(prompt_embeds=torch.cat([e["prompt_embeds"] for e in embeds]),
                    negative_prompt_embeds=torch.cat([e["negative_prompt_embeds"] for e in embeds]),
                    num_inference_steps=2, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="latent",
                    generator=[torch.Generator().manual_seed(s) for _, s in items]).images

    sequential = {name: [] for name in jobs}
    for name, (policy, items) in jobs.items():
        run(make_sd_pipeline(), policy, items, sequential[name])
    # pipelines built before the threads start (their weights come from torch's global RNG)
    pipes = {name: make_sd_pipeline() for name in jobs}
    threaded = {name: [] for name in jobs}
    errors = []

    def guarded(*args):
        try:
            run(*args)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(pipes[name], policy, items, threaded[name]))
               for name, (policy, items) in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for name in jobs:
        assert len(threaded[name]) == rounds + 1
        for seq, thr in zip(sequential[name][:rounds], threaded[name][:rounds], strict=True):
            assert torch.equal(seq["latents"], thr["latents"]), name
            assert seq["stats"] == thr["stats"] and seq["per_step"] == thr["per_step"], name
        assert torch.equal(sequential[name][-1], threaded[name][-1]), name


# ----------------------------------------------------------------------------- the example script
def test_data_parallel_example_runs_in_one_process(tmp_path, monkeypatch, capsys):
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    monkeypatch.syspath_prepend(bench)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    import data_parallel

    threads = torch.get_num_threads()
    result = data_parallel.main(["--config", "dry", "--steps", "3", "--images", "4", "--batch", "2",
                                 "--policy", "FRDiff:interval=2,score_mix=false", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads and not dist.is_initialized()
    assert result["world_size"] == 1 and result["total"]["images"] == 4 and result["ranks"][0]["generations"] == 2
    assert result["ranks"][0]["last_generation_calls"] == {"full": 2, "reuse": 1}
    assert "| total |" in capsys.readouterr().out and len(list(tmp_path.glob("data_parallel_dry_FRDiff_dp1.json"))) == 1
    with pytest.raises(SystemExit):  # CFG-parallel needs pairs of ranks
        data_parallel.main(["--config", "dry", "--cfg-parallel", "--out", str(tmp_path)])
    assert "even number of ranks" in capsys.readouterr().err
    sys.modules.pop("data_parallel", None)


def test_cfg_split_keeps_each_samples_rows_of_per_frame_text_states():
    """AnimateDiff passes text states repeated per frame ((batch * frames, L, D), each sample's rows
    together): CFG-parallel gives each rank its samples' blocks of rows, so the two half-batch calls
    are the batched call's halves (the all-gather itself: the two-process tests above)."""
    from tiny_video import motion_inputs, motion_unet

    unet = motion_unet()
    kw = motion_inputs(unet, batch=2, frames=4)
    kw.pop("return_dict", None)
    n = kw["sample"].shape[0]
    assert kw["encoder_hidden_states"].shape[0] == n * 4  # per frame
    from frkern.family import Call

    call = Call(kw.pop("sample"), kw.pop("timestep"), kw.pop("encoder_hidden_states"), (), kw)
    with torch.no_grad():
        full = unet(call.sample, call.timestep, call.context, return_dict=False, **call.kwargs)[0]
        halves = []
        for lo in (0, n // 2):
            local = call.samples(n, lo, n // 2)  # what CfgParallel.forward runs on rank lo // (n // 2)
            assert local.context.shape[0] == call.context.shape[0] // 2
            halves.append(unet(local.sample, local.timestep, local.context, return_dict=False, **local.kwargs)[0])
    assert torch.allclose(torch.cat(halves), full, rtol=1e-5, atol=1e-6)
    # a context of one row per sample is split as any batch tensor
    ctx = torch.arange(6.0).view(6, 1)
    assert torch.equal(Call(ctx, 0, ctx, (), {}).samples(6, 3, 3).context, ctx[3:])
