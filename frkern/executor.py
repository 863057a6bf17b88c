"""How the network of a patched model runs: eagerly, through torch.compile, or through CUDA graphs
(frkern.graphs). The per-call driver (frkern.dispatch.Handle) decides what a call does; the
executor only runs it."""
from __future__ import annotations

import copy
from functools import partial

import torch

from .adaptive import run_probe
from .graphs import GraphRunner


class Executor:
    def __init__(self, network, runtime, cuda_graphs: bool):
        self.original = network  # the model's own forward
        self.network = network  # what runs it (compile replaces it)
        self.compile_kwargs: dict | None = None
        self.runtime = runtime
        self.graphs = GraphRunner(self._run_network, runtime) if cuda_graphs else None

    def __deepcopy__(self, memo):
        new = Executor(copy.deepcopy(self.original, memo), copy.deepcopy(self.runtime, memo), self.graphs is not None)
        memo[id(self)] = new
        if self.compile_kwargs is not None:
            new.compile(**self.compile_kwargs)
        if self.graphs is not None:
            new.graphs.capture = self.graphs.capture
        return new

    def _run_network(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    def compile(self, **compile_kwargs) -> None:
        self.compile_kwargs = dict(compile_kwargs)
        self.network = torch.compile(self.original, **compile_kwargs)

    def replay(self, family, call_sig, call) -> torch.Tensor:
        """The network's output for `call` through the CUDA graph of `call_sig` (captured on first use).
        Eager and compiled calls run `family.run(executor.network, call)` in the caller's frame,
        so that a user's torch.compile of the patched model traces the network."""
        return self.graphs.run(call_sig, call, family)

    def probe(self, family, call_sig, call) -> torch.Tensor:
        """Run the network up to the adaptive gate; the indicator value (on the device)."""
        if self.graphs is not None:
            return self.graphs.run(call_sig, call, family, runner=partial(run_probe, self.runtime, family))
        return run_probe(self.runtime, family, self.network, call)

    def clear(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
