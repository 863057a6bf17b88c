"""CUDA graphs for a patched UNet: one graph per (call slot, step kind, inputs' structure), replayed.

What a graph touches outside itself, and how each is kept at a fixed address:
- inputs (sample, timestep, encoder states, every tensor in the other arguments): copied into the
  graph's static buffers before each replay. Inputs already on the device are copied device to
  device. Host inputs (a Python-number timestep, which becomes a 1-element int64/float64 tensor as
  UNet2DConditionModel makes it; any CPU tensor) go through the graph's `HostStaging`: copied on the
  host into page-locked buffers, then to the device with non_blocking copies, so no replay makes
  the host wait for the device;
- cached features a reuse step reads (`runtime.reads`): the graph keeps the tensors it was captured
  with; if the cache now holds other tensors (a keyframe computed outside this graph), their values
  are copied in. In steady state the cache holds exactly the full graph's own output buffers, so a
  reuse replay copies nothing;
- features a full step writes (`runtime.writes`): they live in the full graph's memory pool and are
  rewritten in place by each replay; the runtime commits them to the cache after the call, so the
  next reuse graph reads them where they are;
- the UNet output: a static buffer, cloned on return (schedulers such as PLMS keep past outputs).

A graph is keyed by what changes the work it records: the call slot, the runtime's mode, the
attention modes of the step (T-GATE), the call's signature and inputs' structure (a call that runs
one CFG half has a batch of its own), and which cached states it reads. T-GATE's stored attention
outputs are reads and writes like any cached feature: a call that stores one writes it in its
graph's pool, a later graph reads it there (or gets it copied in when the cache holds another).
Unlike a keyframe's features they move on from call to call (a step that stores self-attention
writes it in its own graph's pool), so after the gate most replays copy them in: a device copy per
state, also for states the step then computes afresh.

Weights are read where the graph was captured: a weights token change (frkern.watch) or any
parameter's storage moving (model CPU offload brings the UNet back at new addresses each generation)
drops every graph. Hooks that re-store weights inside the forward (layerwise casting, group
offloading, sequential offload) would be captured themselves, reading storage they then replace: refused.

Each graph has a private memory pool: sharing one would let a later capture place its live outputs
in an earlier graph's scratch memory. Host-side decisions (step, policy, cache validation) stay in
Python around the replay, as in eager mode.

`capture` is pluggable: `cuda_capture` uses torch.cuda.CUDAGraph; tests on machines without a GPU
use `EmulatedCapture`, which re-runs the function and copies its results into the captured
outputs, with the same static-buffer contract (so buffer bugs show up on a CPU too).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .cache import unit_of
from .runtime import FULL_MODE, PROBE_MODE, REUSE_MODE, Runtime


def cuda_capture(fn: Callable[[], Any], warmup: int = 2):
    """Warm `fn` up on a side stream (Triton/cuDNN/compile work happens here), capture it into a
    CUDA graph with a private pool, and return (replay, outputs of the capture)."""
    stream = torch.cuda.Stream()  # raises on a machine without CUDA
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


class EmulatedCapture:
    """Stand-in for cuda_capture where there is no GPU: `replay` re-runs `fn` and copies every
    output tensor into the buffers the capture returned, as a CUDA graph rewrites them in place.
    Counts captures and replays so tests can check what was (re)captured."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def __call__(self, fn: Callable[[], Any], warmup: int = 2):
        self.captures += 1
        outputs = fn()
        static, _ = tree_flatten(outputs)

        def replay():
            self.replays += 1
            fresh, _ = tree_flatten(fn())
            for s, f in zip(static, fresh):
                if isinstance(s, torch.Tensor):
                    s.copy_(f)

        return replay, outputs


class _CudaFence:
    """A CUDA event recorded on `device`'s current stream: pending() asks without blocking,
    wait() blocks the host until the work before record() has run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.event = torch.cuda.Event()
        self.recorded = False

    def record(self) -> None:
        self.event.record(torch.cuda.current_stream(self.device))
        self.recorded = True

    def pending(self) -> bool:
        return self.recorded and not self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class HostStaging:
    """A graph's host inputs into its static device buffers without a host sync.

    A copy from pageable host memory to the device makes the host wait: without non_blocking
    PyTorch synchronizes the stream after it (`torch.tensor(..., device="cuda")` and `.to("cuda")`
    are such copies), and with non_blocking the CUDA driver still waits for the stream's queued work
    before it stages pageable memory. So each host input is first copied on the host into a
    page-locked buffer of the graph (a memcpy, no device involved: the caller may change or free
    its tensor right after), then to the static buffer with a non_blocking copy queued on the
    stream the replay runs on.

    One page-locked buffer per host input per graph, one fence after the copies: the copy queued
    for replay k reads the buffer when the device gets to it, so the host must not refill it for
    the next replay of this graph until then. load() checks the fence and waits only if that copy
    is still pending; it normally ran long before (between two replays of one graph lie at least
    that graph's whole replay, and in reuse schedules other graphs' replays). When it is pending
    the host is a whole replay of this graph ahead of the device, so waiting there costs no device
    time (the queue still holds that replay's work). A ring of buffers would let the host run
    further ahead, which gains nothing once the queue holds a replay; one buffer keeps the pinned
    memory at one copy of the inputs. `waits` counts the loads that had to wait.

    Staging applies where the static buffers are on a device of `device_types`; elsewhere (CPU,
    meta: the emulated capture) host inputs are copied directly, which involves no device.
    """

    device_types = ("cuda",)

    def __init__(self, device: torch.device, slots: list):
        """slots: (index of the input in flatten order, its static buffer on `device`)."""
        self.slots = [(i, static, self.pin(static)) for i, static in slots]
        self.fence = self.new_fence(device)
        self.waits = 0

    @staticmethod
    def pin(like: torch.Tensor) -> torch.Tensor:
        """A page-locked host tensor of `like`'s shape and dtype."""
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    @staticmethod
    def new_fence(device: torch.device):
        return _CudaFence(device)

    def load(self, leaves: list) -> bool:
        """Queue the copies of `leaves`' host inputs; True if the host had to wait first."""
        waited = self.fence.pending()  # the last replay's copies still read the buffers
        if waited:
            self.fence.wait()
            self.waits += 1
        for i, static, pinned in self.slots:
            pinned.copy_(leaves[i])  # host to host
            static.copy_(pinned, non_blocking=True)
        self.fence.record()
        return waited


def host_timestep(timestep) -> torch.Tensor:
    """A Python-number timestep as UNet2DConditionModel.forward makes it on CUDA (1 element, float64
    for a float, int64 otherwise: exact values), but on the host: no device copy here."""
    dtype = torch.float64 if isinstance(timestep, float) else torch.int64
    return torch.tensor([timestep], dtype=dtype)


@dataclass
class _Graph:
    replay: Callable[[], None]
    static_leaves: list  # the input tensors' static buffers, in flatten order (None for non-tensors)
    out: torch.Tensor
    writes: dict = field(default_factory=dict)  # unit -> (tensor in the graph's pool, sig)
    reads: dict = field(default_factory=dict)  # unit -> (tensor the graph reads, sig)
    staging: HostStaging | None = None  # the host inputs' path (None: every input copied directly)
    direct: list = field(default_factory=list)  # (index, static buffer) of the inputs copied directly

    def load(self, leaves: list) -> bool:
        """Copy this call's inputs into the static buffers (queued on the device, no host sync
        unless the staging buffers are still being read; then True)."""
        for i, static in self.direct:
            static.copy_(leaves[i])
        return self.staging is not None and self.staging.load(leaves)


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    return ("value", x)


class GraphRunner:
    """Owns the captured graphs of one patched UNet."""

    def __init__(self, network: Callable, runtime: Runtime, capture=cuda_capture, max_graphs: int = 16,
                 staging: type = HostStaging):
        self.network = network
        self.runtime = runtime
        self.capture = capture
        self.staging = staging
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self.stats: collections.Counter = collections.Counter()
        self._weights = None

    def clear(self) -> None:
        self.graphs.clear()

    def run(self, call_sig, call, family, runner=None):
        """The network's output for `call` (a frkern.family.Call), by replaying (capturing first
        if needed) its graph. runner(network, call) runs it (default family.run; an adaptive
        probe passes frkern.adaptive.run_probe, whose output is the indicator)."""
        rt = self.runtime
        sample, timestep = call.sample, call.timestep
        if rt.mode not in (FULL_MODE, REUSE_MODE, PROBE_MODE):
            raise RuntimeError(f"frkern: CUDA graphs run full, reuse and probe calls only, not mode {rt.mode!r}")
        if torch.is_grad_enabled():
            raise RuntimeError(
                "frkern: cuda_graphs=True replays inference graphs only; run sampling under "
                "torch.no_grad() or torch.inference_mode() (diffusers pipelines do)"
            )
        if not isinstance(timestep, torch.Tensor):
            # A host tensor, keyed by dtype (not value) and staged into the graph like any host input
            # (a host-to-device copy cannot be captured, and one from pageable memory would block).
            timestep = host_timestep(timestep)
        leaves, spec = tree_flatten(tuple(call._replace(timestep=timestep)))
        try:
            key = (rt.slot, rt.mode, rt.attention_now, call_sig, spec, tuple(_leaf_key(x) for x in leaves),
                   tuple(sorted(((u, e[1]) for u, e in rt.reads.items()), key=lambda ue: ue[0])))
            hash(key)
        except TypeError as e:  # an unhashable non-tensor argument: its value cannot key a graph
            raise TypeError(f"frkern: cuda_graphs=True needs hashable non-tensor UNet arguments: {e}") from e

        watch = rt.watch
        if watch.inner_storage_hooks:
            names = watch.inner_storage_hooks
            raise RuntimeError(
                f"frkern: cuda_graphs=True cannot capture a model whose weights hooks re-store inside its forward "
                f"({len(names)} modules, e.g. {names[0]!r}: diffusers' layerwise casting or group offloading, "
                "accelerate's sequential CPU offload): a replay would read storage the hooks have since replaced. "
                "Patch with cuda_graphs=False, or remove those hooks (model CPU offload, a hook on the whole "
                "model, works: its graphs are recaptured when the weights come back at new addresses)")
        storage = watch.storage()
        if (call_sig.weights, storage) != self._weights:
            # weights replaced or moved (model CPU offload brings them back at new addresses): every
            # graph points at old memory
            if self._weights is not None and call_sig.weights == self._weights[0]:
                self.stats["storage_moves"] += 1
            self.clear()
            self._weights = (call_sig.weights, storage)
        graph = self.graphs.get(key)
        if graph is None:
            if sample.device.type != "cuda" and self.capture is cuda_capture:
                raise RuntimeError(f"frkern: cuda_graphs=True needs the UNet and its inputs on CUDA, got {sample.device}")
            graph = self._capture(leaves, spec, sample.device, type(call), runner or family.run)
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
                self.stats["evicted"] += 1
        else:
            self.graphs.move_to_end(key)
            if graph.load(leaves):
                self.stats["staging_waits"] += 1
        self._sync_reads(graph)
        graph.replay()
        self.stats["replays"] += 1
        rt.writes.clear()
        rt.writes.update(graph.writes)
        return graph.out.clone()

    def _sync_reads(self, graph: _Graph) -> None:
        rt = self.runtime
        for unit, (captured, sig) in graph.reads.items():
            current = rt.reads[unit][0]  # the key holds the same units and signatures
            if current is not captured:
                # a segment's value may be a tuple of tensors (DeepCache's skip branches)
                for cur, cap in zip(tree_flatten(current)[0], tree_flatten(captured)[0]):
                    if isinstance(cap, torch.Tensor) and cur.data_ptr() != cap.data_ptr():
                        cap.copy_(cur)
                        self.stats["read_copies"] += 1
            rt.reads[unit] = (captured, sig)

    def _capture(self, leaves, spec, device, call_type, runner) -> _Graph:
        rt = self.runtime
        static_leaves = [
            x.detach().to(device, copy=True) if isinstance(x, torch.Tensor) else None for x in leaves
        ]
        static_call = call_type(*tree_unflatten([s if s is not None else x for s, x in zip(static_leaves, leaves)], spec))
        reads = dict(rt.reads)  # the graph keeps these tensors alive: it reads their memory

        def fn():
            rt.writes.clear()
            rt.runs.clear()
            rt.reads.clear()
            rt.reads.update(reads)
            out = runner(self.network, static_call)
            return out, dict(rt.writes)

        # Warm-up and capture run `fn`, but only the replay that follows is the real call: a
        # stateful unit that moves its state on in place (Skip-Convolution) gets it back as it was.
        stateful = [v for u, (v, _) in reads.items() if unit_of(u) in rt.stateful_units]
        saved = [(t, t.clone()) for t in tree_flatten(stateful)[0] if isinstance(t, torch.Tensor)]
        replay, (out, writes) = self.capture(fn)
        for t, copy in saved:
            t.copy_(copy)
        self.stats["captures"] += 1
        # How later calls' inputs reach the static buffers (this call's are there already).
        staged = device.type in self.staging.device_types
        host, direct = [], []
        for i, s in enumerate(static_leaves):
            if s is not None:
                (host if staged and leaves[i].device.type == "cpu" else direct).append((i, s))
        staging = self.staging(device, host) if host else None
        # The capture recorded work without running it (CUDA); run() replays it next.
        return _Graph(replay, static_leaves, out, writes, reads, staging, direct)
