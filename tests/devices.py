"""Device helpers for tests that run on a CPU and, unchanged, on a GPU.

- `no_tf32`: a fixture for fp32 comparisons. On Ampere/Hopper cuDNN runs fp32 convolutions in TF32
  by default (torch.backends.cudnn.allow_tf32 = True), and cuBLAS matmuls too where
  torch.backends.cuda.matmul.allow_tf32 is set: a reference computed that way is off by ~1e-3
  relative, far above the 1e-4/1e-5 tolerances that compare it with frkern's exact-fp32 Triton
  kernels (tl.dot(..., input_precision="ieee")). With CUDA present the fixture turns both off for
  the test and restores them after; without CUDA it does nothing (CPU kernels have no TF32).
- `graphed` / `to_device` / `assert_matches_eager`: cuda_graphs=True tests. Without CUDA the model
  stays on the CPU and the capture is frkern.graphs.EmulatedCapture; with CUDA, model and inputs
  move to the GPU and the real capture (frkern.graphs.cuda_capture) runs.
"""
import contextlib

import pytest
import torch

import frkern
from frkern.graphs import EmulatedCapture

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA: real CUDA-graph capture (bench/gpu/round.sh tests)")

# Graph replay against the eager patched model, relative L2 of the output, on a GPU (fp32, TF32 off):
# a replay runs the kernels eager runs, but cuDNN/cuBLAS may pick other algorithms under capture
# (another workspace), so fp32 sums may round in another order. On a CPU the emulated capture runs
# the same kernels in the same order: bit for bit.
GPU_GRAPH_RTOL = 1e-4


@contextlib.contextmanager
def exact_fp32():
    """cuDNN convolutions and cuBLAS matmuls in full fp32 inside the block (restored after); a
    no-op without CUDA."""
    if not CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def no_tf32():
    with exact_fp32():
        yield


def to_device(pipe, prompt):
    """The pipeline and its prompt kwargs on the GPU where there is one (else as they are)."""
    if CUDA:
        pipe.to("cuda")
        prompt = {k: v.cuda() for k, v in prompt.items()}
    return pipe, prompt


def graphed(target, policy, **kw):
    """frkern.patch(target, policy, cuda_graphs=True): the real capture on a GPU, emulated elsewhere."""
    handle = frkern.patch(target, policy, cuda_graphs=True, **kw)
    if not CUDA:
        handle.graphs.capture = EmulatedCapture()
    return handle


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_matches_eager(got, want, msg=""):
    """A graphed result against the eager one: equal on a CPU, within GPU_GRAPH_RTOL on a GPU."""
    if CUDA:
        assert rel(got, want) <= GPU_GRAPH_RTOL, (msg, rel(got, want))
    else:
        assert torch.equal(got, want), msg


def assert_same_stats(got: dict, want: dict):
    """handle.stats of a graphed run against the eager run's: the same calls of each kind (so the
    same decisions); the per-step measures (Adaptive's indicator, SkipConv's active fraction) equal
    on a CPU, within 1e-3 relative on a GPU (see GPU_GRAPH_RTOL)."""
    if not CUDA:
        assert got == want
        return
    measures = ("indicator", "active_fraction")
    assert {k: v for k, v in got.items() if k not in measures} == {k: v for k, v in want.items() if k not in measures}
    for name in measures:
        assert sorted(got.get(name, {})) == sorted(want.get(name, {})), name
        for step, v in want.get(name, {}).items():
            assert abs(got[name][step] - v) <= 1e-3 * abs(v) + 1e-6, (name, step, got[name][step], v)
