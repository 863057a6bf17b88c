"""frkern's main benchmark: latency, FLOPs and deviation of each policy, with a parity gate.

    python bench/latency.py                       # CPU default: the trained tiny model, 50 steps
    python bench/latency.py --config sd15 --device cuda --dtype float16 --steps 50 --out bench/results

For every method it measures, side by side in one run: the time of one UNet call of each kind
(full / reuse) and of a whole N-step CFG DDIM loop, the UNet FLOPs per generation (counted by
torch.utils.flop_counter on the real loop), and the relative deviation of the final latents from
full compute (diffusers eager) from the same noise. Before timing, NoReuse through frkern must
match the unpatched UNet (max relative error under the dtype's tolerance); a configuration that
fails is not timed. Every graphed or compiled variant is checked against its eager run ("vs eager":
frkern rows against the eager frkern run of the same policy and backend, which is run untimed when
it is not a row itself, and are not timed when they differ; the plain-UNet baselines against
diffusers eager, flagged in the note when they differ).

Rows: diffusers eager (always); --cuda-graph: the plain UNet captured in one CUDA graph, replayed
once per step; --compile: torch.compile of the plain UNet (default, and on CUDA + CUDA graphs) and
every frkern row compiled; --compile-graph: only the torch.compile + CUDA graph baseline
(mode="reduce-overhead"); the `deepcache` package for every DeepCache policy given (if installed);
frkern NoReuse and every --policies spec, per --backends and --graphs (--no-frkern: none). Without
--policies, one or two rows per policy kind (DEFAULT_POLICIES): FRDiff, the shipped Auto-FR
schedule (Keyframes), Clockwork with the identity and the learned adaptor, DeepCache, Adaptive
(calibrated accumulated rule, first-block rule), SkipConv (whose PyTorch reference computes
densely: its row has the FLOPs of a tile-predicated convolution and the time of dense compute) and
EncoderPropagation (the authors' key steps: 50 steps only) and TGate (the package's defaults).
Every spec is parsed and its policy built before any work (grammar: --help).

Threads: --threads (default 1 on a CPU: on a busy shared 2-core machine torch's default of 2 threads
ran several times slower), stated in the header and the record. On a CPU each figure is the median
of 3 repeats by default (--repeats), which keeps the default run within minutes on 2 cores.

What is synchronized where (CUDA). Inside a timed generation the harness never makes the host wait
for the device: the scheduler, its timesteps and the CFG inputs are made before the timing starts,
the UNet gets each step's timestep as a device tensor (made once, in advance) and DDIM's step gets
the same timestep as a Python int (its alphas live on the host; a device timestep would make every
step read it back), nothing is read from the device (no .item(), no float(), no printing) and
nothing is synchronized between steps. A sample is timed with two CUDA events recorded on the
current stream around its runs (one generation, or `number` back-to-back calls of a short call),
after one torch.cuda.synchronize() that drains earlier work, and one event synchronize after the
end event; parity, deviation, FLOP counting and graph capture all happen in each row's untimed set-up.
What is left inside a generation is the method's own: Adaptive's probe reads one scalar per
deciding call (its documented host wait) and the `deepcache` package looks the timestep up with
.item() on every call. The "host syncs/gen" column counts them, on one untimed generation per row
run under torch.cuda.set_sync_debug_mode("warn") (CUDA only; "-" elsewhere).

Timings are medians of interleaved repeats: every row is set up first (each on its own copy of the
UNet sharing the weights), then repeat r times every row before repeat r+1 starts, so a slow spell
of the machine hits all rows alike rather than one row's repeats. Each timing's spread, (max - min)
/ median of its repeats, is recorded; a row whose spread exceeds --max-spread is flagged ("!") in
the table and ("noisy": true) in the JSON: its ms and speed-up are not to be trusted.
Results go to bench/results/local/ (git-ignored) unless --out says otherwise; they are rewritten
after every row set up and every round of repeats, so a run cut off keeps what it had.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# stdlib only, like options and specs: --help needs no torch
from configs import CONFIGS, VIDEO_CONFIGS  # noqa: E402
from options import add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402
from specs import (GRAMMAR, SpecError, check_before_imports, check_steps, error_line, parse_specs,  # noqa: E402,F401
                   policy_from_spec, specs_or_exit)

# A row whose repeats spread wider than this, relative to their median, is flagged as noisy.
MAX_SPREAD = 0.2
# --config dry: SD1.5's block types at a size where a CPU call takes milliseconds (random weights),
# for dry runs of every code path (bench/gpu/round.sh --cpu); its timings mean nothing.
DRY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
DRY_TEXT = (4, None)  # text length, pooled width
# One row per policy kind frkern has (NoReuse is always timed): fixed schedules at two settings, the
# shipped Auto-FR schedule (Keyframes: the search with jumps the README's quality table leads with),
# Clockwork with its learned adaptor next to the identity one at the same clock, Adaptive with the
# calibrated accumulated rule (the bench/quality.py setting warmup 2, max_reuse 4) and with the
# first-block rule, and SkipConv (tile 4, as in bench/quality.py). The Auto-FR schedule and the
# adaptor were made for 50 DDIM steps: at other --steps the default list leaves them out (and says so).
DEFAULT_POLICIES = ["FRDiff:interval=2", "FRDiff:interval=3", "FRDiff:interval=3,score_mix=false",
                    "@bench/results/autofr_tiny_50steps_frsm3bias1_w4e-4_30it.policy.json",
                    "Clockwork:clock=2", "Clockwork:clock=4",
                    "Clockwork:clock=4,adaptor=bench/results/adaptors/clockwork_tiny_ddim50_c4",
                    "DeepCache:interval=3", "DeepCache:interval=5",
                    "@bench/results/adaptive_tiny_ddim50_clockwork.policy.json:threshold=0.06,warmup=2,max_reuse=4",
                    "Adaptive:threshold=0.04,reuse=clockwork,warmup=2,max_reuse=4",
                    "SkipConv:threshold=0.05,tile=4", "EncoderPropagation", "TGate"]
# Default --repeats: 10 on CUDA; on a CPU 3 (was 5 before the Auto-FR, adaptor, Adaptive and
# SkipConv rows came: the default run stays within minutes on 2 cores).
REPEATS = {"cuda": 10, "cpu": 3}
SKIPCONV_CPU_NOTE = ("SkipConv's PyTorch reference computes densely and saves no time on a CPU: GFLOP/gen is "
                     "that of a tile-predicated convolution (affected output tiles only), ms the dense compute")


def parser():
    """The command line; needs no torch, so that --help answers before torch and diffusers load."""
    ap = new_parser(__doc__, epilog=GRAMMAR)
    ap.add_argument("--config", default="tiny", choices=["tiny", "dry"] + sorted(CONFIGS) + sorted(VIDEO_CONFIGS),
                    help="tiny: the trained model in bench/assets (real weights); dry: a minimal SD layout for dry "
                         "runs (timings mean nothing); animatediff, t2v, svd: small video UNets (UNetMotionModel, "
                         "UNet3DConditionModel, UNetSpatioTemporalConditionModel; random weights, 8 frames; svd "
                         "with image latents and added_time_ids as its pipeline passes them, through the same "
                         "CFG DDIM loop); others: real layouts, random weights")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per generation")
    ap.add_argument("--batch", type=int, default=1, help="images per generation (the UNet sees 2x: CFG)")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="dtype of the UNet and its inputs (default: float16 on CUDA, float32 on CPU)")
    ap.add_argument("--device", default=None,
                    help="torch device to run on (default: cuda if available, else cpu)")
    ap.add_argument("--policies", nargs="*", default=DEFAULT_POLICIES,
                    help="policy specs (grammar and examples below), e.g. FRDiff:interval=3 "
                         "Adaptive:threshold=0.05,reuse=clockwork @FILE.policy.json; all parsed and checked before "
                         "any work. frkern NoReuse is always timed too, unless --no-frkern. Without --policies: one "
                         "or two rows per policy kind (the list that ends this entry), whose Auto-FR schedule and "
                         "adaptor rows are left out at --steps other than 50")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (torch.set_num_threads) for the whole run (default: 1 on CPU, "
                         "torch's own on CUDA). One thread because a busy shared 2-core machine ran this job "
                         "several times slower with torch's default of 2 (threads that wait for a core); on "
                         "idle cores more threads can be faster. Stated in the header and the JSON")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="frkern backends to time (default: torch, plus triton on CUDA)")
    ap.add_argument("--no-frkern", action="store_true",
                    help="time only the plain-UNet rows (diffusers eager, --cuda-graph, --compile/--compile-graph, "
                         "the deepcache package), no frkern row")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the plain UNet (and, on CUDA, compile + CUDA graph), "
                         "and each frkern policy with its network compiled (handle.compile())")
    ap.add_argument("--compile-graph", action="store_true",
                    help="also time torch.compile(mode='reduce-overhead') of the plain UNet (compile + CUDA "
                         "graphs), without the other compiled rows")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    ap.add_argument("--cuda-graph", action="store_true", help="also time the plain UNet captured in a CUDA graph")
    ap.add_argument("--graphs", default=None, choices=["off", "on", "both"],
                    help="frkern with cuda_graphs off/on (default: both on CUDA, off elsewhere)")
    ap.add_argument("--emulate-graphs", action="store_true",
                    help="CPU dry runs: every CUDA graph (frkern's and --cuda-graph's) through "
                         "frkern.graphs.EmulatedCapture, which re-runs the captured function on replay")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights and activations in channels_last")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved repeats per timing, after warm-up (default: 10 on CUDA, 3 on CPU)")
    ap.add_argument("--max-spread", type=float, default=MAX_SPREAD,
                    help="flag a row whose (max - min) / median of repeats exceeds this")
    add_out(ap, "the JSON and markdown results")
    ap.add_argument("--tag", default="", help="suffix of the result files (several runs, one folder)")
    return ap


def frkern_specs(ap, args):
    """(the --policies specs parsed and checked, [(spec, why) left out]). A bad spec exits with one
    line; so does one that does not fit --steps, except in the default list, which leaves it out."""
    specs = specs_or_exit(ap, args.policies, option="--policies")
    usable, left_out = [], []
    for spec in specs:
        try:
            check_steps(spec.policy, args.steps)
            usable.append(spec)
        except SpecError as e:
            if args.policies != DEFAULT_POLICIES:
                ap.exit(2, f"{ap.prog}: error: {error_line('--policies', spec.text, e)}\n")
            left_out.append((spec, str(e)))
    return usable, left_out


if __name__ == "__main__":
    help_before_imports(parser)  # prints the help and exits before torch, diffusers and frkern load
    check_before_imports(parser, frkern_specs)  # a bad spec exits here, before they load

import torch  # noqa: E402

import frkern  # noqa: E402
import frkern.graphs  # noqa: E402
from configs import TEXT  # noqa: E402
from flops import count_gflop_and_result, skipped_conv_flops  # noqa: E402
from record import device_name, provenance  # noqa: E402

# Tests set this to frkern.graphs.EmulatedCapture() to run the graph variants' code on a CPU.
GRAPH_CAPTURE = None
PARITY_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Compiled variants reorder arithmetic; after N steps their latents drift further from eager's.
COMPILED_RTOL = 1e-2
# One sample runs a short call back to back until it lasts this long, so that timer resolution
# and launch jitter do not dominate a 2 ms UNet call.
MIN_SAMPLE_MS = 20.0
GUIDANCE = 7.5


@dataclass
class Row:
    method: str
    backend: str = "-"
    score_mix: str = "-"  # "on" / "off" for policies that have score mixing, "-" for the others
    calls: dict = field(default_factory=dict)
    gflop_per_gen: float = float("nan")
    ms_full_call: float = float("nan")
    ms_reuse_call: float = float("nan")
    ms_per_gen: float = float("nan")
    deviation: float = float("nan")
    vs_eager: float | None = None  # rel. difference of the final latents (one call: output) from its eager run
    syncs: int | None = None  # host-device synchronizations in one generation (CUDA only)
    spread: dict = field(default_factory=dict)  # timed field -> (max - min) / median of its repeats
    samples: dict = field(default_factory=dict)  # timed field -> ms of each repeat, in order
    noisy: bool = False  # some timed field's spread is over --max-spread
    note: str = ""


@dataclass(eq=False)
class Timing:
    """One timed field of a row: `run` is timed; `setup` (untimed) first puts back the state `run`
    needs, since other rows' and this row's other timings run in between."""

    row: Row
    field: str
    run: Callable[[], object]
    setup: Callable[[], object] = lambda: None
    number: int = 1  # back-to-back runs per sample (set by warm_up)
    setup_ms: float = 0.0  # an untimed run of `run` made in the row's set-up (FLOPs counted), if any
    samples: list = field(default_factory=list)  # ms per run, one per repeat
    failed: bool = False  # raised once: not run again, the row's note says why


def failure(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"failed: {type(e).__name__}: {text[:200]}"


def note_failure(row: Row, e: BaseException) -> None:
    """One row's failure goes into its note; the other rows go on (a GPU round has one try)."""
    row.note = "; ".join(filter(None, [row.note, failure(e)]))
    print(f"{row.method} [{row.backend}]: {failure(e)}", file=sys.stderr)


class Summary(NamedTuple):
    median: float
    spread: float  # (max - min) / median
    noisy: bool  # spread > max_spread


def summarize(samples: list[float], max_spread: float = MAX_SPREAD) -> Summary:
    """Median of a timing's repeats, their spread relative to it, and whether that is too wide."""
    med = statistics.median(samples)
    spread = (max(samples) - min(samples)) / med if med > 0 else float("inf")
    return Summary(med, spread, spread > max_spread)


def interleaved(items: list, repeats: int) -> list[tuple[int, object]]:
    """Round-robin schedule, (repeat, item): every item once per repeat, repeats in order."""
    return [(r, item) for r in range(repeats) for item in items]


def progress(items, desc: str):
    """A tqdm bar on stderr over `items` (tqdm comes with the bench extra); without tqdm, the items."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, mininterval=1.0, file=sys.stderr)


def build_unet(config: str, dtype, device):
    from diffusers import UNet2DConditionModel

    if config == "tiny":  # the model frkern trained and committed (bench/assets/tiny_model)
        from tiny_model import load

        return load(device=device, dtype=dtype)[0]
    torch.manual_seed(0)
    if config in VIDEO_CONFIGS:
        import diffusers

        video = VIDEO_CONFIGS[config]
        if video["model"] == "UNetMotionModel":
            unet = diffusers.UNetMotionModel.from_unet2d(UNet2DConditionModel(**video["unet"]),
                                                         diffusers.MotionAdapter(**video["adapter"]))
        else:
            unet = getattr(diffusers, video["model"])(**video["unet"])
        return unet.eval().to(device=device, dtype=dtype)
    # initialised where it runs: SD1.5's 860M parameters take seconds to initialise on a CPU
    with torch.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext():
        unet = UNet2DConditionModel(**(DRY if config == "dry" else CONFIGS[config]))
    return unet.eval().to(device=device, dtype=dtype)


def make_inputs(config, unet, batch, dtype, device, seed=0):
    """(latents, text states for the CFG-doubled batch, extra UNet kwargs, condition): condition is
    None, or what is concatenated to every call's sample along its channels (SVD's image latents)."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    if config == "tiny":  # real conditioning: class tokens of random classes, null tokens for CFG
        from tiny_model import load

        tokens = load(device=device, dtype=dtype)[1]
        labels = torch.randint(0, tokens.num_classes, (batch,), generator=g).to(device)
        ehs = torch.cat([tokens(torch.full_like(labels, tokens.num_classes)), tokens(labels)])
        return torch.randn(batch, 3, size, size, generator=g).to(device, dtype), ehs, {}, None
    text_len, pooled = DRY_TEXT if config == "dry" else TEXT[config]
    video = VIDEO_CONFIGS.get(config)
    if video and video["model"] == "UNetSpatioTemporalConditionModel":
        return svd_inputs(video, unet, batch, dtype, device, g)
    frames = (video["frames"],) if video else ()  # video latents: (batch, C, frames, H, W)
    latents = torch.randn(batch, unet.config.in_channels, *frames, size, size, generator=g).to(device, dtype)
    ehs = torch.randn(2 * batch, text_len, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    if video and video["text_per_frame"]:  # as AnimateDiffPipeline passes them
        ehs = ehs.repeat_interleave(video["frames"], dim=0)
    kw = {}
    if pooled:
        px = size * 8
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2 * batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * (2 * batch), device=device, dtype=dtype),
        }
    return latents, ehs, kw, None


def svd_inputs(video, unet, batch, dtype, device, g):
    """As StableVideoDiffusionPipeline passes them: latents (batch, frames, 4, H, W); the image's
    latents repeated over frames as the condition and its embedding as the one text token, both
    zero in the unconditional half; added_time_ids (fps - 1 = 6, motion bucket 127, noise aug 0.02)."""
    f, size, c = video["frames"], unet.config.sample_size, video["image_channels"]
    latents = torch.randn(batch, f, unet.config.out_channels, size, size, generator=g).to(device, dtype)
    image = torch.randn(batch, 1, c, size, size, generator=g).expand(batch, f, c, size, size)
    embedding = torch.randn(batch, 1, unet.config.cross_attention_dim, generator=g)
    condition = torch.cat([torch.zeros_like(image), image]).to(device, dtype)
    ehs = torch.cat([torch.zeros_like(embedding), embedding]).to(device, dtype)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * (2 * batch), device=device, dtype=dtype)
    return latents, ehs, {"added_time_ids": time_ids}, condition


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class Sampler(NamedTuple):
    """A DDIM scheduler with its timesteps set, made once, outside any timed region: `t_device`
    (one 0-dim device tensor per step, for the UNet) and `t_host` (the same steps as Python ints,
    for DDIM's step, whose alphas live on the host)."""

    scheduler: object
    t_device: list
    t_host: list


def make_sampler(steps: int, device) -> Sampler:
    sch = scheduler()
    sch.set_timesteps(steps, device=device)
    return Sampler(sch, list(sch.timesteps), [int(t) for t in sch.timesteps.cpu()])


def sample_loop(unet_fn, latents, ehs, kw, sampler: Sampler, handle=None, guidance=7.5):
    """CFG DDIM loop; unet_fn(x, t, ehs, **kw) -> eps for the doubled batch. Never waits for the
    device: no read of a device value, no synchronization (see the module docstring)."""
    if handle is not None:
        handle.begin(len(sampler.t_host))
    x = latents
    for i, (t, t_host) in enumerate(zip(sampler.t_device, sampler.t_host)):
        if handle is not None:
            handle.set_step(i)
        eps = unet_fn(torch.cat([x, x]), t, ehs, **kw)
        u, c = eps.chunk(2)
        x = sampler.scheduler.step(u + guidance * (c - u), t_host, x).prev_sample
    return x


def clock(device) -> Callable[[Callable, int], float]:
    """measure(fn, number): ms per call of `number` back-to-back calls of fn (CUDA events on a GPU:
    one synchronize before the start event drains earlier work, nothing in between, one event
    synchronize after the end event)."""
    if device.type == "cuda":
        def cuda_ms(fn, number):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / number

        return cuda_ms

    def wall_ms(fn, number):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) * 1e3 / number

    return wall_ms


# A timing whose row's set-up already ran it untimed for at least this long needs no warm-up run on
# a CPU (nothing is left to initialise, and one run per sample is enough).
SETUP_WARMS_MS = 10 * MIN_SAMPLE_MS


def warm_up(timings: list[Timing], measure, runs: int, setup_warms: bool = False) -> None:
    """Run each timing `runs` times untimed (lazy init, graph capture, compilation) and size its
    samples from the last run. setup_warms (CPU): a generation the row's set-up already ran (its
    FLOP-counted run, SETUP_WARMS_MS or longer) is warm: no warm-up run, one run per sample."""
    for t in progress(timings, "warm-up"):
        if setup_warms and t.setup_ms >= SETUP_WARMS_MS:
            continue
        try:
            for _ in range(runs):
                t.setup()
                ms = measure(t.run, 1)
        except Exception as e:
            t.failed = True
            note_failure(t.row, e)
            continue
        t.number = max(1, math.ceil(MIN_SAMPLE_MS / max(ms, 1e-6)))


def time_interleaved(timings: list[Timing], measure, repeats: int, max_spread: float, after_round=None) -> None:
    """Sample every timing once per round, rounds in order; rows get medians after each round."""
    for i, (_, t) in enumerate(progress(interleaved(timings, repeats), "timing")):
        if not t.failed:
            try:
                t.setup()
                t.samples.append(measure(t.run, t.number))
            except Exception as e:
                t.failed = True
                note_failure(t.row, e)
        if (i + 1) % len(timings) == 0:
            record_timings(timings, max_spread)
            if after_round is not None:
                after_round()


def record_timings(timings: list[Timing], max_spread: float) -> None:
    """Each timed field of a row = the median of its samples so far; spreads and flag with it."""
    for t in timings:
        if t.samples:
            s = summarize(t.samples, max_spread)
            setattr(t.row, t.field, s.median)
            t.row.spread[t.field] = s.spread
            t.row.samples[t.field] = list(t.samples)
    for row in {id(t.row): t.row for t in timings}.values():
        row.noisy = any(v > max_spread for v in row.spread.values())


def shared_weights_copy(unet):
    """A copy of the module tree that shares the parameters and buffers: every row keeps its own
    patched (wrapped, compiled) UNet through the interleaved repeats, without a copy of the weights."""
    memo = {id(t): t for t in itertools.chain(unet.parameters(), unet.buffers())}
    return copy.deepcopy(unet, memo)


@dataclass
class Workload:
    """What every row runs: the same noise, conditioning and number of steps."""

    latents: torch.Tensor
    ehs: torch.Tensor
    kw: dict
    condition: torch.Tensor | None  # concatenated to every call's sample along channels (SVD), or None
    steps: int
    x_ref: torch.Tensor | None = None  # final latents of full compute (diffusers eager)

    def __post_init__(self):  # the single-call timings: the CFG-doubled batch at t = 500
        self.call_args = ((self.model_input(torch.cat([self.latents, self.latents])),
                           torch.tensor(500, device=self.latents.device), self.ehs), self.kw)
        self.sampler = make_sampler(self.steps, self.latents.device)

    def model_input(self, x):
        return x if self.condition is None else torch.cat([x, self.condition], dim=2)

    def generate(self, model, handle=None):
        """Final latents of the CFG DDIM loop through `model` (a UNet, or called like one)."""
        return sample_loop(lambda x, t, e, **k: model(self.model_input(x), t, e, **k).sample, self.latents,
                           self.ehs, self.kw, self.sampler, handle, GUIDANCE)

    def call(self, model):
        return model(*self.call_args[0], **self.call_args[1])


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SYNC_WARNING = "synchroniz"  # in the text of the warning torch.cuda.set_sync_debug_mode("warn") raises


def count_syncs(fn, device) -> int | None:
    """How many times the host waits for the device while fn runs: every synchronizing CUDA call
    (.item(), float(), copies to the host or from pageable host memory, torch.cuda.synchronize)
    warns under torch.cuda.set_sync_debug_mode("warn"). None off CUDA, or where the warning does not
    come through (checked on a known sync first)."""
    if device.type != "cuda":
        return None

    def counted(f):
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                f()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return sum(SYNC_WARNING in str(w.message) for w in caught)

    probe = torch.ones(1, device=device)
    if counted(lambda: probe.sum().item()) < 1:
        return None
    return counted(fn)


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


@torch.no_grad()  # not torch.set_grad_enabled(False): callers (tests) keep their grad mode
def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    quiet_known_warnings()
    # Every spec parsed and its policy built before anything runs: a bad one stops here, in a second.
    args.specs, args.left_out = frkern_specs(ap, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    backends = args.backends or (["torch", "triton"] if device.type == "cuda" else ["torch"])
    if args.no_frkern:
        backends = []
    graph_modes = {"off": [False], "on": [True], "both": [False, True]}[
        args.graphs or ("both" if device.type == "cuda" else "off")]
    # None: real CUDA graphs (frkern.graphs.cuda_capture)
    args.graph_capture = GRAPH_CAPTURE or (frkern.graphs.EmulatedCapture() if args.emulate_graphs else None)
    if (True in graph_modes or args.cuda_graph) and device.type != "cuda" and args.graph_capture is None:
        ap.error("--graphs on/both and --cuda-graph need --device cuda (or --emulate-graphs)")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    args.repeats = args.repeats or REPEATS.get(device.type, REPEATS["cpu"])
    compiling = args.compile or args.compile_graph
    threads_before = torch.get_num_threads()
    args.threads = args.threads or (1 if device.type == "cpu" else threads_before)
    torch.set_num_threads(args.threads)
    try:
        with recompiles_allowed() if compiling else contextlib.nullcontext():
            return run(args, device, dtype, backends, graph_modes)
    finally:
        torch.set_num_threads(threads_before)  # callers (tests) keep theirs


def run(args, device, dtype, backends, graph_modes) -> list[Row]:
    unet = build_unet(args.config, dtype, device)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    work = Workload(*make_inputs(args.config, unet, args.batch, dtype, device), steps=args.steps)

    print(f"# frkern latency: config={args.config} steps={args.steps} batch={args.batch} (UNet batch "
          f"{2 * args.batch}) dtype={dtype} device={device} {device_name(device)}; torch threads={args.threads}"
          + (" (--threads; 1 by default on CPU)" if device.type == "cpu" else ""))
    warm_runs = 3 if device.type == "cuda" else 1
    print(f"# timing: median of {args.repeats} interleaved repeats per figure, after {warm_runs} untimed warm-up "
          f"run(s)" + (" (a generation: its row's set-up run; CPU default 3 repeats, --repeats N for more)"
                       if device.type == "cpu" else ""))
    for spec, why in args.left_out:
        print(f"# left out of the default rows: {spec.label}: {why}")
    parity_errors = {b: parity(unet, work.call_args, b, dtype) for b in backends}
    for b, e in parity_errors.items():
        ok = e <= PARITY_RTOL[dtype]
        print(f"parity NoReuse[{b}] vs unpatched: max rel err {e:.2e} (tol {PARITY_RTOL[dtype]:.0e}) {'ok' if ok else 'FAILED'}")

    # Set up every row (untimed: calls, FLOPs, deviation, its check against eager, host syncs),
    # then time them all interleaved.
    rows, timings = eager_row(unet, work, device)  # sets work.x_ref
    if args.cuda_graph:
        add(rows, timings, attempt(lambda: cuda_graph_row(unet, work, device, dtype, args.graph_capture),
                                   "diffusers eager in one CUDA graph"))
    if args.compile:
        add(rows, timings, attempt(lambda: compiled_row(unet, work, device, args.compile_backend),
                                   "torch.compile (default)"))
    if (args.compile and device.type == "cuda") or args.compile_graph:
        add(rows, timings, attempt(lambda: compiled_row(unet, work, device, args.compile_backend,
                                                        mode="reduce-overhead"),
                                   "torch.compile + CUDA graph (mode reduce-overhead)"))
    add(rows, timings, attempt(lambda: deepcache_package_rows(args.specs, unet, work, device), "DeepCache package"))
    handles = add_frkern_rows(rows, timings, unet, work, args, backends, graph_modes, parity_errors, dtype, device,
                              on_row=lambda: report(rows, args, device, dtype, parity_errors, quiet=True))

    measure = clock(device)
    warm_up(timings, measure, runs=warm_runs, setup_warms=device.type == "cpu")
    # results so far on disk after every round: a GPU call cut off at its time limit keeps them
    time_interleaved(timings, measure, args.repeats, args.max_spread,
                     after_round=lambda: report(rows, args, device, dtype, parity_errors, quiet=True))
    for row, handle in handles:
        if "+graphs" in row.backend:
            graphs = "graphs: " + ", ".join(f"{k} {v}" for k, v in sorted(handle.graph_stats.items()))
            row.note = "; ".join(filter(None, [graphs, row.note]))
        handle.unpatch()
    report(rows, args, device, dtype, parity_errors)
    return rows


def recompiles_allowed(limit: int = 64):
    """Every compiled row (its own UNet copy, each step kind) is one more cache entry of the same
    UNet forward code object; past dynamo's recompile limit (8) later rows would silently run eager."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, limit))


def add(rows: list, timings: list, made: tuple) -> None:
    rows += made[0]
    timings += made[1]


def attempt(make: Callable[[], tuple], method: str) -> tuple:
    """make() -> (rows, timings), or one row saying why it failed (the other rows go on)."""
    try:
        return make()
    except Exception as e:
        row = Row(method)
        note_failure(row, e)
        return [row], []


def eager_row(unet, work, device):
    """The reference: full compute, eager diffusers."""
    row = Row("diffusers eager", calls={"full": work.steps}, deviation=0.0)
    t0 = time.perf_counter()
    row.gflop_per_gen, work.x_ref = count_gflop_and_result(lambda: work.generate(unet))
    setup_ms = (time.perf_counter() - t0) * 1e3
    row.syncs = count_syncs(lambda: work.generate(unet), device)
    return [row], [Timing(row, "ms_per_gen", lambda: work.generate(unet), setup_ms=setup_ms),
                   Timing(row, "ms_full_call", lambda: work.call(unet))]


def score_mix_label(policy) -> str:
    on = getattr(policy, "score_mix", None)
    return "-" if on is None else ("on" if on else "off")


def frkern_variants(args, backends, graph_modes) -> list[tuple]:
    """(backend, policy Spec, graphs, compiled) of every frkern row, in table order."""
    variants = [(g, False) for g in graph_modes] + ([(g, True) for g in graph_modes] if args.compile else [])
    specs = parse_specs(["NoReuse"]) + list(args.specs)
    return [(b, spec, g, c) for b in backends for spec in specs for g, c in variants]


def add_frkern_rows(rows, timings, unet, work, args, backends, graph_modes, parity_errors, dtype, device, on_row):
    """One row per frkern variant, each on its own patched copy of the UNet; returns (row, handle)
    of the timed ones (unpatched after the timings). Every variant is checked against the eager
    run of its (backend, policy) (no graphs, not compiled): the eager variant itself when it is a
    row, else an untimed eager run made for the check (its FLOPs are the row's)."""
    handles = []
    eager = {}  # (backend, spec text) -> (final latents, GFLOP) of its eager run
    failed = set()
    for backend, spec, graphs, compiled in progress(frkern_variants(args, backends, graph_modes), "frkern rows"):
        if parity_errors[backend] > PARITY_RTOL[dtype]:
            if backend not in failed:
                failed.add(backend)
                rows.append(Row("frkern (all policies)", backend,
                                note=f"not timed: parity failed ({parity_errors[backend]:.1e})"))
            continue
        label = backend + ("+graphs" if graphs else "") + ("+compile" if compiled else "")
        row = Row(f"frkern {spec.label}", label)
        try:
            made = frkern_row(row, unet, work, args, backend, spec, graphs, compiled, eager, dtype, device)
        except Exception as e:
            note_failure(row, e)
            made = None
        rows.append(row)
        if made is not None:
            timings += made[0]
            handles.append((row, made[1]))
        on_row()
    return handles


def frkern_row(row, unet, work, args, backend, spec, graphs, compiled, eager, dtype, device):
    """Set up one frkern row (untimed); returns (its timings, its handle), or None when it is not
    timed (its note says why)."""
    policy, key = spec.policy, (backend, spec.text)
    row.score_mix = score_mix_label(policy)
    if isinstance(policy, frkern.SkipConv) and backend == "torch":
        row.note = SKIPCONV_CPU_NOTE
    if key not in eager and (graphs or compiled):  # the eager run, for the check only
        ref_model = shared_weights_copy(unet)
        ref_handle = frkern.patch(ref_model, policy, backend=backend)
        eager[key] = gflop_run(lambda: work.generate(ref_model, ref_handle), row, ref_handle, backend)[::-1]
        ref_handle.unpatch()
        del ref_model, ref_handle
    model = shared_weights_copy(unet)
    handle = frkern.patch(model, policy, backend=backend, cuda_graphs=graphs)
    try:
        if graphs and args.graph_capture is not None:
            handle.graphs.capture = args.graph_capture
        if compiled:
            handle.compile(backend=args.compile_backend)
        setup_ms = 0.0
        if key not in eager:  # one run gives the latents and the FLOPs (which graphs and compilation keep)
            t0 = time.perf_counter()
            eager[key] = gflop_run(lambda: work.generate(model, handle), row, handle, backend)[::-1]
            setup_ms = (time.perf_counter() - t0) * 1e3
            x = eager[key][0]
        else:
            x = work.generate(model, handle)
        row.calls = dict(handle.stats)
        active = row.calls.get("active_fraction")
        if active:  # SkipConv: every gated call counts as "reuse", whatever its active fraction
            row.note = "; ".join(filter(None, [row.note, f"mean active input-tile fraction of its gated calls "
                                               f"{sum(active.values()) / len(active):.2f}"]))
        row.deviation = rel(x, work.x_ref)
        x_eager, row.gflop_per_gen = eager[key]
        row.vs_eager = rel(x, x_eager)
        tol = COMPILED_RTOL if compiled else PARITY_RTOL[dtype]
        if not row.vs_eager <= tol or torch.isnan(x).any():
            row.note = f"not timed: differs from eager {spec.label} by {row.vs_eager:.1e} (tol {tol:.0e})"
            handle.unpatch()
            return None
        row.syncs = count_syncs(lambda: work.generate(model, handle), device)
    except BaseException:
        handle.unpatch()
        raise
    timings = [Timing(row, "ms_per_gen", lambda: work.generate(model, handle), setup_ms=setup_ms)]
    return timings + step_kind_timings(row, model, handle, policy, work), handle


def gflop_run(fn, row, handle=None, backend="torch") -> tuple[float, object]:
    """(GFLOPs, result) of one run of fn: FLOPs counted on the run itself, minus those SkipConv's
    tile-predicated convolution would not compute (none for other policies; backend torch only:
    the counter does not see Triton's custom ops at all). When the counter cannot run fn: NaN, a
    note, and an uncounted run."""
    try:
        with skipped_conv_flops(handle if backend == "torch" else None) as skipped:
            total, out = count_gflop_and_result(fn)
        return total - skipped[0] / 1e9, out
    except Exception as e:
        row.note = "; ".join(filter(None, [row.note, "FLOPs not counted: " + failure(e)[len("failed: "):]]))
        return float("nan"), fn()


def step_kind_timings(row, model, handle, policy, work) -> list[Timing]:
    """One full call and one reuse call of this policy. set_step before every call: a second call
    in the same step would be the step's next slot."""
    n = work.steps  # the generation's step count: Keyframes and adaptors are made for one

    def full_setup():
        handle.begin(n)

    def full_call():
        handle.set_step(0)
        work.call(model)

    timings = [Timing(row, "ms_full_call", full_call, full_setup)]
    plans = policy.schedule(n)
    reuse_step = next((i for i, p in enumerate(plans) if not p.keyframe and p.runs_network), None)
    if reuse_step is None:
        return timings
    key = max(i for i in range(reuse_step) if plans[i].keyframe)

    def reuse_setup():  # the cache filled by this policy's last keyframe before reuse_step
        handle.begin(n)
        handle.set_step(key)
        work.call(model)

    def reuse_call():
        handle.set_step(reuse_step)
        work.call(model)

    return timings + [Timing(row, "ms_reuse_call", reuse_call, reuse_setup)]


def cuda_graph_row(unet, work, device, dtype, capture=None):
    """The plain UNet's call captured in one CUDA graph (frkern.graphs.cuda_capture: warm-up on a
    side stream, private pool), replayed once per step; `capture` replaces it (emulated graphs)."""
    row = Row("diffusers eager in one CUDA graph", calls={"full": work.steps},
              note="per generation = steps x replay (UNet time only)")
    replay, out = (capture or frkern.graphs.cuda_capture)(lambda: work.call(unet).sample)
    replay()
    row.vs_eager = rel(out, work.call(unet).sample)
    if not row.vs_eager <= PARITY_RTOL[dtype]:
        row.note = f"not timed: the replay differs from the eager call by {row.vs_eager:.1e}"
        return [row], []

    def replay_steps():
        for _ in range(work.steps):
            replay()

    row.syncs = count_syncs(replay_steps, device)
    return [row], [Timing(row, "ms_per_gen", replay_steps), Timing(row, "ms_full_call", replay)]


def compiled_row(unet, work, device, backend, mode=None):
    name = "torch.compile" + (" + CUDA graph (mode reduce-overhead)" if mode == "reduce-overhead" else " (default)")
    row = Row(name, backend, calls={"full": work.steps})
    cu = torch.compile(shared_weights_copy(unet), backend=backend, mode=mode)
    t0 = time.perf_counter()
    work.call(cu)
    row.note = f"compile {time.perf_counter() - t0:.0f} s"
    row.deviation = row.vs_eager = rel(work.generate(cu), work.x_ref)  # its eager run: diffusers eager
    if not row.vs_eager <= COMPILED_RTOL:
        row.note += f"; differs from eager by {row.vs_eager:.1e} (over {COMPILED_RTOL:.0e})"
    row.syncs = count_syncs(lambda: work.generate(cu), device)
    return [row], [Timing(row, "ms_per_gen", lambda: work.generate(cu)), Timing(row, "ms_full_call", lambda: work.call(cu))]


def deepcache_package_rows(specs, unet, work, device):
    """The `deepcache` package's own helper, each interval on its own copy of the UNet, if installed.
    Used as in a diffusers pipeline: its scheduler's timesteps on the device, where the helper's
    per-call lookup (t.item(), then an index search among them) makes the host wait (counted)."""
    if not isinstance(unet, __import__("diffusers").UNet2DConditionModel):
        return [], []  # its SD helper patches UNet2DConditionModel's blocks only
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return [Row("DeepCache package", note="not installed")], []
    rows, timings = [], []
    for spec in [s for s in specs if isinstance(s.policy, frkern.DeepCache)]:
        pol = spec.policy
        model = shared_weights_copy(unet)
        pipe = SimpleNamespace(unet=model, scheduler=scheduler())  # the helper reads these two
        pipe.scheduler.set_timesteps(work.steps, device=work.latents.device)  # it looks up t in them
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=pol.interval, cache_branch_id=pol.branch)
        helper.enable()

        def run(model=model, helper=helper):
            helper.start_timestep = None
            return work.generate(model)

        row = Row(f"DeepCache package {spec.label}", "deepcache 0.1.1")
        t0 = time.perf_counter()
        row.gflop_per_gen, x = gflop_run(run, row)
        setup_ms = (time.perf_counter() - t0) * 1e3
        row.deviation = rel(x, work.x_ref)
        row.syncs = count_syncs(run, device)
        rows.append(row)
        timings.append(Timing(row, "ms_per_gen", run, setup_ms=setup_ms))
    return rows, timings


def table_notes(args) -> list[str]:
    """What the table's figures are; printed under it and written with it."""
    return [
        f"- ms: median of {args.repeats} interleaved repeats after warm-up (on a CPU a generation's warm-up is its "
        "row's untimed set-up run; repeat r times every row "
        "before repeat r+1 starts); CUDA events on a GPU, wall clock on a CPU. ms full/reuse call: one "
        f"UNet call of that kind (CFG batch); ms/gen: the whole {args.steps}-step loop, scheduler included.",
        "- timing spread: (max - min) / median of those repeats, the largest over the row's timings. "
        f"`!` marks a spread over {args.max_spread:.0%}: the machine was busy or its clocks moved, and that "
        "row's ms and speed-up are unreliable (re-run on an idle machine).",
        "- speed-up: ms/gen of diffusers eager / ms/gen of the row (`!` when either is flagged).",
        "- rel. dev. of latents: ||x - x_ref||_2 / ||x_ref||_2 over the final latents (float64), x_ref from "
        f"diffusers eager with full compute, same noise and conditioning, same {args.steps} DDIM steps, "
        f"CFG guidance {GUIDANCE}; 0 = identical.",
        "- score mix: FRDiff's score mixing, on or off (on: a non-keyframe step's output is lambda * reuse "
        "+ (1 - lambda) * the last keyframe's, and lambda = 0 skips the network, the 'skip' calls); "
        "- = the method has none.",
        "- GFLOP/gen: UNet FLOPs of one generation, counted by torch.utils.flop_counter on the real loop "
        "(Triton custom ops are not counted).",
        "- vs eager: rel. difference of the final latents from the row's eager run (frkern: the same policy and "
        "backend, no graphs, not compiled; baselines: diffusers eager; the one-graph row: one call's output); "
        "- = the row is an eager run.",
        "- host syncs/gen: times the host waited for the device in one untimed generation "
        "(torch.cuda.set_sync_debug_mode; CUDA only). The harness adds none; Adaptive's probe and the deepcache "
        "package's timestep lookup do.",
        f"- torch threads: {args.threads} (torch.set_num_threads, --threads) for every row.",
    ] + ([f"- SkipConv rows, backend torch: {SKIPCONV_CPU_NOTE}."]
         if any(isinstance(sp.policy, frkern.SkipConv) for sp in args.specs) else [])


def fmt_cells(r: Row, base: Row) -> list[str]:
    calls = "/".join(str(r.calls.get(k, 0)) for k in ("full", "reuse", "skip")) if r.calls else "-"
    if r.calls.get("promoted"):
        calls += f" ({r.calls['promoted']} promoted)"
    speed = base.ms_per_gen / r.ms_per_gen if r.ms_per_gen == r.ms_per_gen else float("nan")
    flag = " !" if r.noisy or base.noisy else ""
    spread = f"{max(r.spread.values()):.0%}" + (" !" if r.noisy else "") if r.spread else "-"
    vs_eager = "-" if r.vs_eager is None else f"{r.vs_eager:.1e}"
    syncs = "-" if r.syncs is None else str(r.syncs)
    return [r.method, r.backend, r.score_mix, calls, f"{r.gflop_per_gen:.1f}", f"{r.ms_full_call:.2f}",
            f"{r.ms_reuse_call:.2f}", f"{r.ms_per_gen:.1f}", f"{speed:.2f}x{flag}", spread, f"{r.deviation:.4f}",
            vs_eager, syncs, r.note]


def report(rows, args, device, dtype, parity_errors, quiet=False):
    head = ["method", "backend", "score mix", "UNet calls (full/reuse/skip)", "GFLOP/gen", "ms full call",
            "ms reuse call", "ms/gen", "speed-up", "timing spread", "rel. dev. of latents", "vs eager",
            "host syncs/gen", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt_cells(r, rows[0])) + " |" for r in rows]
    notes = table_notes(args)
    table = "\n".join(lines + [""] + notes)
    if not quiet:
        print(table)
        noisy = [f"{r.method} [{r.backend}]" for r in rows if r.noisy]
        if noisy:
            print(f"WARNING: timing spread over {args.max_spread:.0%} (busy machine?): " + "; ".join(noisy))
    meta = {**provenance(device), "device_type": device.type, "config": args.config, "steps": args.steps,
            "batch": args.batch, "dtype": str(dtype), "channels_last": args.channels_last,
            "graphs": "emulated" if args.graph_capture is not None else ("cuda" if device.type == "cuda" else "none"),
            "threads": args.threads,
            "policies": [{"spec": sp.text, "row": f"frkern {sp.label}", "policy": sp.policy.to_dict()} for sp in args.specs],
            "left_out": [{"spec": sp.text, "why": why} for sp, why in args.left_out],
            "parity_max_rel_err": parity_errors,
            "timing": {"repeats": args.repeats, "order": "interleaved: round-robin over all rows' timings",
                       "statistic": "median", "spread": "(max - min) / median", "max_spread": args.max_spread},
            "deviation": "||x - x_ref||_2 / ||x_ref||_2 of the final latents, x_ref = diffusers eager, full compute, "
                         "same noise", "notes": notes}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"latency_{args.config}_{device.type}_{str(dtype).split('.')[-1]}_{args.steps}steps"
                        + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": [r.__dict__ for r in rows]}, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(f"# latency: {args.config}, {args.steps} steps, batch {args.batch}, {dtype}, {meta['device']}, "
                f"torch threads {args.threads}\n\n")
        f.write("```\n" + json.dumps(meta, indent=1, default=str) + "\n```\n\n" + table + "\n")
    if not quiet:
        print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
