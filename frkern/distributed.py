"""frkern on more than one process: data parallel needs nothing; CFG-parallel splits one generation.

Data parallel (replicas: `torchrun`, `accelerate launch`, Ray Serve, one process per GPU). Each
process patches its own pipeline (`frkern.patch(pipe, policy)`) and generates its share of the
prompts (`shard(prompts)` below, or Accelerate's `PartialState().split_between_processes`). Nothing
of frkern is shared between processes and no collective is ever made: every reuse decision,
Adaptive's included, is taken by each process on its own batch, so a rank's images equal a
single-process run of the same prompts, seeds and batch composition bit for bit (torch backend).
A patched model cannot be pickled, so patch inside each process, after it has loaded the pipeline.

CFG-parallel (one generation over two processes: xDiT's CFG split). `cfg_parallel(pipe, group)`
wraps the patched model's forward: every rank runs the whole pipeline (same prompts, seeds,
steps), and on each UNet call rank 0 of the group computes the first half of the batch (diffusers
concatenates it as [uncond; cond]: the unconditional half) and rank 1 the second, each through its
own patched UNet and cache; the halves are all-gathered, so the pipeline on every rank sees the
whole output. The step clock is the same on both ranks (each tracks its own scheduler, which runs
the same schedule), so fixed schedules (FRDiff, Keyframes, DeepCache, Clockwork, SkipConv's
keyframes) agree by construction. Adaptive decides per call from an indicator that is the largest
over the batch: `handle.indicator_reduction` (applied by `Handle._probe` before the host reads the
value) all-reduces it with MAX over the CFG group only, in place, so every rank reads, decides on
and accumulates (the "accumulated" rule's state) the largest value over the whole batch, as one
batched call would. Only the CFG group is reduced over: data-parallel replicas of it are never
involved. Checks that the ranks agree, made before a call so that both raise alike and no rank
is left waiting in a collective the other never makes: the ranks all-gather a small header of the
call (policy, num_steps, step, slot, sample shape, the decision counters so far; on a generation's
first call also checksums of the sample and the conditioning, one host read per generation) and
refuse ranks that run different generations or whose decisions have diverged (a handle.reset()
or a weights change on one rank only). The header is gathered on every call where the outputs
are gathered on the CPU (gloo), and only on each generation's first call on GPUs (NCCL), where
comparing it costs a host wait (`verify_calls=True` forces it on every call there too); without
it, a reset or weights change on one rank in the middle of a generation is not seen, and the
ranks then wait for each other in different collectives until the process group's timeout.

Numerics: each rank runs half the batch, so its kernels see other batch sizes than one batched
call, and on a CPU (and cuDNN/cuBLAS) that changes the blocking of some reductions: outputs match
the batched run to fp rounding (relative L2 ~1e-7 per call on the tests' tiny model), not bit for
bit. Adaptive's decisions match the batched run exactly unless an indicator lies within that
rounding of its threshold; on both ranks they are identical by construction (one reduced value).
The accumulated rule's value is max over ranks of acc + max(poly(d_rank), 0), which is the batched
acc + max(poly(max d), 0) whenever poly is nondecreasing where d lies (the default poly (1, 0) is).

Costs: one all-gather of the output per call, one all-reduce of one fp32 scalar per Adaptive call
that probes, one all-gather of a 23-value fp64 header per call (gloo) or per generation (NCCL).
`CfgParallel.timings` records each collective's host time (on NCCL the time to enqueue: the
device time overlaps). A rank that raises inside its UNet call (out of memory) leaves the other
waiting in the output's all-gather until the process group's timeout.
Inference only: no gradient flows through the gather to the other rank's half.

Errors: torch.distributed not initialised, a group that is not of size 2 or does not contain this
rank, an unpatched pipeline or model, a second cfg_parallel on the same model, a batch that does
not split in two equal halves, ranks running different generations, and ranks whose decisions or
weights diverged within a generation (checked on every call with verify_calls: gloo's default).

Module-level state in frkern, per process and per thread (audit for issue 21):
- frkern.family.FAMILIES and frkern.install.INSTALLERS (registries): filled at import (under the
  import lock) and by users' register_* calls; read by patch. Per process. register_family's
  check and append hold a lock; find_model and prepare's error path iterate copies, so a family or
  installer registered while another thread patches is seen or not, never an error. Register
  before starting threads to be sure every thread sees it.
- Scheduler tracking (frkern.tracking): no module-level registry; a SchedulerTracker lives on its
  scheduler instance (`scheduler._frkern_tracker`) and holds weak references to the runtimes it
  drives. Per pipeline. `SchedulerTracker.of` looks up and creates under a module lock, so two
  threads patching two pipelines that share one scheduler get one tracker. Separate pipelines
  (separate schedulers) share nothing.
- frkern.ops: _counts, _fallbacks, _proven (kernel report, fallback keys, proven skip_conv launch
  signatures) are guarded by one lock; _warned (warn-once keys) by its own; the unlocked read in
  _on_reference only tests emptiness (a racing registration costs one more failed Triton attempt).
  Per process: a fallback learned in one process is learned again in each. Triton's own compiled
  kernel cache is Triton's (on disk, keyed by source; its in-process cache may compile a kernel
  twice when two threads launch it first at once).
- frkern.watch: _epoch (a counter bumped by torch's global module-registration hooks for modules
  of watched models) and _watched (a WeakSet of those modules) are shared by every patched model
  of the process. A bump from one thread's model makes other models re-list their parameters on
  their next call (the token they compute is unchanged: no promotion, a little host time).
  `_epoch[0] += 1` is not atomic, but a lost increment can only hide a structural change from a
  model being changed and called from two threads at once, which is unsupported anyway.
- Per patched model (Handle, Runtime, FeatureCache, WeightsWatch, Executor, graph runner): no
  locks. One patched model (or one pipeline) must be driven by one thread at a time; two threads
  calling the same patched model at once get "nested call" errors or mixed step state. Different
  patched models in different threads share nothing of frkern but the items above (tested:
  tests/test_distributed.py runs two pipelines in two threads and gets one-after-the-other's
  latents and decisions).
- frkern.graphs: cuda_capture uses torch.cuda.graph's default capture_error_mode "global": while
  one thread captures, a CUDA call from another thread (another pipeline's UNet) breaks the
  capture. With cuda_graphs=True, make each pipeline's first calls (the captures) before other
  threads run CUDA work; `torch.cuda.graph(graph, capture_error_mode="thread_local")` in
  cuda_capture would lift this (not changed here; untested without a GPU). torch.compile
  (dynamo) compiling in two threads at once is torch's own limitation.
- Constants only elsewhere (policy names, unit names, the JSON version). No frkern state lives in
  files, environment variables (TRITON_INTERPRET is read, never written) or shared memory, and
  nothing uses Python's per-process randomised str hash across processes (this module's
  fingerprint uses crc32).
"""
from __future__ import annotations

import math
import time
import zlib
from typing import Sequence

import torch
import torch.distributed as dist

from . import forward_chain
from .dispatch import Handle, handle_of

__all__ = ["cfg_parallel", "CfgParallel", "cfg_parallel_of", "shard"]

_ATTR = "_frkern_cfg_parallel"
# Counters of Runtime.stats that are decisions (which kind each call of the generation was).
_DECISIONS = ("full", "reuse", "skip", "promoted", "forced", "untracked")
# The header the ranks all-gather before a call (every call when verifying, else the first call of
# each generation), fp64: [0] policy crc32, [1] num_steps, [2] step, [3] slot, [4] open, [5] batch,
# [6] sample ndim, [7:11] sample dims 1-4 (0-padded), [11] starts a generation, then the decision
# counters so far (_DECISIONS) and how often the weights token changed since the generation's first
# call, all compared exactly; then, on a generation's first call only, checksums of the sample and
# the conditioning (sum, abs sum of each), compared to 1e-9.
_GENERATION = 12  # entries [0, 12) say which generation and call this is
_EXACT = _GENERATION + len(_DECISIONS) + 1
_HEADER_LEN = _EXACT + 4


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard(items: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's contiguous share of `items` (as Accelerate's split_between_processes: the first
    len % world_size ranks get one more). Default rank and world size: torch.distributed's when it
    is initialised, else (0, 1)."""
    if rank is None or world_size is None:
        init = _initialised()
        rank = (dist.get_rank() if init else 0) if rank is None else rank
        world_size = (dist.get_world_size() if init else 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"frkern.distributed.shard: rank {rank} is not in a world of size {world_size}")
    items = list(items)
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (rank < extra)]


def cfg_parallel_of(target) -> "CfgParallel | None":
    """The active CfgParallel of a model (or of a pipeline's model), else None."""
    handle = target if isinstance(target, Handle) else handle_of(target)
    if handle is None:
        return None
    cp = handle.__dict__.get(_ATTR)
    return cp if cp is not None and cp.installed else None


def cfg_parallel(target, group=None, *, verify_calls: bool | None = None) -> "CfgParallel":
    """Split every call of a patched model's batch over the two ranks of `group` (default: the
    whole world, which must then be 2 processes) and all-gather the outputs.

    target: a patched pipeline, a patched model, or a frkern Handle. Every rank of the group must
    call this on its own patched pipeline and then run the same generation (same prompts, seeds,
    steps). Returns a CfgParallel; `.undo()` (or leaving it as a context manager) restores the
    patched forward and the handle's indicator_reduction. frkern.unpatch also ends it.
    verify_calls: all-gather and compare every call's header (generation, step, decisions so far)
    before the call, not only each generation's first (default: where outputs are gathered on the
    CPU, i.e. gloo; on NCCL it costs one host wait per call)."""
    where = "frkern.distributed.cfg_parallel"
    if not _initialised():
        raise RuntimeError(
            f"{where}: torch.distributed is not initialised (torch.distributed.is_initialized() is False): "
            "call torch.distributed.init_process_group first (torchrun and accelerate launch set its "
            "environment: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)")
    if isinstance(target, Handle):
        handle = target
    else:
        handle = handle_of(target)
        if handle is None:
            raise ValueError(f"{where}: the {type(target).__name__} given is not patched: call "
                             "frkern.patch(pipe, policy) on every rank first, then cfg_parallel(pipe)")
    if not handle.active:
        raise ValueError(f"{where}: this handle's model was unpatched: frkern.patch it again first")
    size = dist.get_world_size(group)
    if size != 2:
        raise ValueError(f"{where}: the group has {size} rank(s); CFG-parallel splits the batch in two, "
                         "so it needs a group of exactly 2 (torch.distributed.new_group([a, b]); with "
                         "data parallel on top, one such group per pair of ranks)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{where}: this process (global rank {dist.get_rank()}) is not in the group given")
    if cfg_parallel_of(handle) is not None:
        raise RuntimeError(f"{where}: this model is already CFG-parallel; call .undo() on it first")
    if handle.indicator_reduction is not None:
        raise RuntimeError(f"{where}: the handle already has an indicator_reduction "
                           f"({handle.indicator_reduction!r}); reset it to None first")
    return CfgParallel(handle, group, rank, verify_calls)


class CfgParallel:
    """One model's CFG split over a group of two ranks (made by cfg_parallel)."""

    def __init__(self, handle: Handle, group, rank: int, verify_calls: bool | None):
        self.handle = handle
        self.group = group
        self.rank = rank  # in the group: 0 computes the first half of the batch, 1 the second
        self.backend = str(dist.get_backend(group))
        self.verify_calls = verify_calls
        # host seconds of each collective: "all_gather" (outputs, per call), "all_reduce" (Adaptive's
        # indicator, per probing call), "check" (the call's header: per generation, or per call when
        # verifying)
        self.timings: dict[str, list[float]] = {"all_gather": [], "all_reduce": [], "check": []}
        self.calls = 0
        # (num_steps, step, slot) of the last call: a call that is not later than it in the same
        # schedule starts a new generation (see _starts_generation)
        self._last: tuple | None = None
        self._token = None  # the weights token at the last header, and its changes in this generation
        self._token_changes = 0
        model = handle.unet
        slot = forward_chain.slot_of(model, handle._chain_forward)
        if slot is None:
            raise RuntimeError("frkern.distributed: the patched forward is no longer in the model's forward chain "
                               "(replaced by another wrapper since patching?); frkern.unpatch and patch again")
        self._inner = handle._chain_forward  # the patched forward (handle.forward)
        self._forward = self.forward  # one bound method object, to recognise it later
        slot.set(self._forward)  # where the patched forward was: beneath any offload hooks
        handle._chain_forward = self._forward  # what unpatch looks for
        handle.__dict__[_ATTR] = self  # on the handle, not the model: unpatch drops it with the handle
        self._reduction = self._reduce  # likewise (each attribute access makes a new bound method)
        handle.indicator_reduction = self._reduction
        self.active = True

    def __repr__(self):
        return f"CfgParallel(rank={self.rank} of 2, backend={self.backend!r}, active={self.active})"

    def __deepcopy__(self, memo):
        raise TypeError("frkern.distributed: a CFG-parallel model cannot be copied (its copy would share the "
                        "process group): call .undo() first, copy, and cfg_parallel each copy on its own ranks")

    def __reduce__(self):
        raise TypeError("frkern.distributed: a CFG-parallel model cannot be pickled; .undo() and frkern.unpatch "
                        "it first")

    @property
    def installed(self) -> bool:
        """Is the split in force? (False after undo(), and after frkern.unpatch of the model.)"""
        return (self.active and self.handle.active
                and forward_chain.slot_of(self.handle.unet, self._forward) is not None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def undo(self) -> None:
        """Give the model its patched forward back and clear the handle's indicator_reduction."""
        if not self.active:
            return
        self.active = False
        model = self.handle.unet
        slot = forward_chain.slot_of(model, self._forward)
        if slot is not None and self.handle.active:  # else unpatch (and maybe a new patch) replaced it
            slot.set(self._inner)
        if self.handle._chain_forward is self._forward:
            self.handle._chain_forward = self._inner
        if self.handle.indicator_reduction is self._reduction:
            self.handle.indicator_reduction = None
        if self.handle.__dict__.get(_ATTR) is self:
            del self.handle.__dict__[_ATTR]

    def collective_ms(self) -> dict[str, float]:
        """Median host milliseconds of each collective so far (nan where none ran)."""
        out = {}
        for name, seconds in self.timings.items():
            s = sorted(seconds)
            out[name] = 1e3 * (s[len(s) // 2] if s else math.nan)
        return out

    # --- the wrapped forward ---------------------------------------------------------------------
    def _comm_device(self, t: torch.Tensor) -> torch.device:
        return t.device if self.backend != "gloo" else torch.device("cpu")

    @torch.compiler.disable(recursive=False)
    def forward(self, *args, **kwargs):
        handle = self.handle
        if not self.installed:
            raise RuntimeError("frkern.distributed: CFG-parallel forward of an unpatched model (undo() it)")
        call, return_dict = handle.family.bind_call(args, kwargs)
        sample = call.sample
        rt = handle.runtime
        starts = self._starts_generation(rt)
        if starts or self._verifying(sample):
            self._check(call, starts)
        self._last = (rt.num_steps, rt.step, rt.slot) if rt.open else None
        n = sample.shape[0]
        if n % 2:
            raise ValueError(f"frkern.distributed.cfg_parallel: a batch of {n} does not split in two equal halves "
                             "(CFG-parallel needs an even batch: guidance_scale > 1 doubles it)")
        half = n // 2
        lo = self.rank * half
        # the conditioning may hold several rows per sample (AnimateDiff's per-frame text states): Call.samples
        local = call.samples(n, lo, half)
        out = self._inner(local.sample, local.timestep, local.context, *local.args, return_dict=False,
                          **local.kwargs)[0]
        full = self._gather(out, n)
        self.calls += 1
        return handle.family.wrap_output(full, return_dict)

    def _starts_generation(self, rt) -> bool:
        """Is this call the first of a generation (or outside any)? Read from the step clock, which
        both ranks' schedulers drive alike: the schedule length changed, or (step, slot) did not move
        forward. Not from the cache's generation counter, which a handle.reset() on one rank would
        move on that rank only (and then the ranks' collectives would no longer pair up)."""
        if not rt.open or self._last is None:
            return True
        num_steps, step, slot = self._last
        return rt.num_steps != num_steps or (rt.step, rt.slot) <= (step, slot)

    def _verifying(self, sample: torch.Tensor) -> bool:
        if self.verify_calls is not None:
            return self.verify_calls
        return self._comm_device(sample).type == "cpu"

    @torch.compiler.disable
    def _gather(self, out: torch.Tensor, n: int) -> torch.Tensor:
        comm = self._comm_device(out)
        local = out.detach().to(comm).contiguous().reshape(-1)
        gathered = torch.empty((2 * local.numel(),), dtype=local.dtype, device=comm)
        t0 = time.perf_counter()
        _all_gather_single(gathered, local, self.group)
        self.timings["all_gather"].append(time.perf_counter() - t0)
        return gathered.view((n,) + tuple(out.shape[1:])).to(out.device)

    @torch.compiler.disable
    def _reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Handle.indicator_reduction: max of the indicator over the CFG group, in place (the value
        the gate's state commits is then the reduced one too)."""
        comm = self._comm_device(v)
        w = v if v.device == comm else v.to(comm)
        t0 = time.perf_counter()
        dist.all_reduce(w, op=dist.ReduceOp.MAX, group=self.group)
        self.timings["all_reduce"].append(time.perf_counter() - t0)
        if w is not v:
            v.copy_(w)
        return v

    @torch.compiler.disable
    def _check(self, call, starts: bool) -> None:
        """All-gather this call's header (fixed size, so the ranks' collectives always pair up) and
        raise on both ranks alike if they differ: before the call, so that no rank is left waiting
        in a collective the other never makes (an Adaptive probe's all-reduce on one rank only)."""
        header = self._header(call, starts)
        both = torch.empty(2 * _HEADER_LEN, dtype=torch.float64, device=header.device)
        t0 = time.perf_counter()
        _all_gather_single(both, header, self.group)
        self.timings["check"].append(time.perf_counter() - t0)
        a, b = both.view(2, -1).cpu().unbind(0)
        if torch.equal(a[:_GENERATION], b[:_GENERATION]) and torch.allclose(a[_EXACT:], b[_EXACT:], rtol=1e-9,
                                                                            atol=0.0):
            if torch.equal(a[_GENERATION:_EXACT], b[_GENERATION:_EXACT]):
                return
            raise RuntimeError(
                "frkern.distributed.cfg_parallel: the ranks' reuse decisions or weights have diverged in this "
                f"generation ({', '.join(_DECISIONS)} calls so far and weights changes: rank 0 "
                f"{_ints(a[_GENERATION:_EXACT])}, rank 1 {_ints(b[_GENERATION:_EXACT])}): a handle.reset() or a "
                "weights change (adapter, load_state_dict, in-place update) on one rank only? Do it on both ranks, "
                "between generations")
        raise RuntimeError(
            "frkern.distributed.cfg_parallel: the ranks of the CFG group run different generations "
            f"(rank 0: {_describe(a)}; rank 1: {_describe(b)}): every rank of a CFG-parallel group must make "
            "the same pipeline call (same prompts, seeds, steps, size and policy)")

    def _header(self, call, starts: bool) -> torch.Tensor:
        rt = self.handle.runtime
        sample = call.sample
        comm = self._comm_device(sample)
        dims = list(sample.shape[1:5]) + [0] * (4 - len(sample.shape[1:5]))
        # a weights change on one rank only would make that rank's next call a full one (promoted)
        # while the other probes: counted here, so that the check refuses it before the call
        token = rt.weights_token()
        if starts:
            self._token_changes = 0
        elif token != self._token:
            self._token_changes += 1
        self._token = token
        head = [zlib.crc32(repr(self.handle.policy).encode()), rt.num_steps if rt.num_steps is not None else -1,
                rt.step, rt.slot, float(rt.open), sample.shape[0], sample.dim(), *dims, float(starts),
                *(rt.stats.get(k, 0) for k in _DECISIONS), self._token_changes]
        head_t = torch.tensor(head, dtype=torch.float64, device=comm)
        if not starts:
            return torch.cat([head_t, torch.zeros(4, dtype=torch.float64, device=comm)])
        ctx = call.context if isinstance(call.context, torch.Tensor) else None
        with torch.no_grad():
            s = sample.detach().double()
            sums = [s.sum(), s.abs().sum()]
            if ctx is not None:
                c = ctx.detach().double()
                sums += [c.sum(), c.abs().sum()]
            else:
                sums += [torch.zeros((), dtype=torch.float64, device=sample.device)] * 2
            sums = torch.stack(sums).to(comm)
        return torch.cat([head_t, sums])


def _ints(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t.tolist()]


def _describe(header: torch.Tensor) -> str:
    v = header.tolist()
    ndim = int(v[6])
    shape = (int(v[5]),) + tuple(int(d) for d in v[7:7 + max(0, min(ndim - 1, 4))])
    text = (f"policy crc {int(v[0]):#x}, num_steps={int(v[1])}, step={int(v[2])}, slot={int(v[3])}, "
            f"sample shape {shape}")
    if v[11]:  # a generation's first call: its checksums
        text += f", sample sum {v[_EXACT]:.9g}, conditioning sum {v[_EXACT + 2]:.9g}"
    return text


def _all_gather_single(output: torch.Tensor, local: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, local, group=group)
