"""torch.compile of a patched UNet: no graph breaks, no recompiles from one generation to the next,
and the same numbers as the eager patched UNet.

The "eager" dynamo backend is used: graph capture, guards and recompiles are decided by dynamo
before any backend runs, so they are the same under inductor (bench/compile_check.py measures
inductor too), and it keeps this file fast on a CPU.

The assertions are what must hold in any torch version, not one version's graph counts (how many
graphs dynamo counts for a step kind has changed between releases): the first generation compiles
whatever it compiles; later generations compile nothing (no new graph in
counters["stats"]["unique_graphs"], and torch._dynamo.config.error_on_recompile raises on a
recompile); fullgraph=True and zero graph breaks where the README promises none.
"""
import contextlib

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import frkern
from devices import no_tf32, rel  # noqa: F401
from test_pipelines import generate
from tiny import make_sd_pipeline, make_sdxl_pipeline, sd_prompt_kwargs, sd_unet, sdxl_prompt_kwargs

def small_sd_pipeline():
    # one layer per block: dynamo's tracing time grows with the module count; every wrapper kind is there
    return make_sd_pipeline(unet=sd_unet(layers_per_block=1))


KINDS = {"sd": (small_sd_pipeline, sd_prompt_kwargs), "sdxl": (make_sdxl_pipeline, sdxl_prompt_kwargs)}


def graphs():
    return counters["stats"]["unique_graphs"]


def breaks():
    return sum(counters["graph_break"].values())


def steady():
    """Around calls that must reuse compiled graphs: a recompile raises."""
    return torch._dynamo.config.patch(error_on_recompile=True)


# Through a whole pipeline (its loop, a new resolution, another patched model). Every policy on every
# family is also compiled at the model level in tests/test_contract.py (FRDiff with score mixing for
# units, DeepCache for segment cuts); here the two mechanisms the contract does not compile.
@pytest.mark.parametrize(
    "kind, policy",
    [
        # full, reuse, and the jump steps' copy (mixing runs outside); extended tier: the contract suite
        # compiles units (svd, with an int8 cache) and a segment cut (sd) in the default run
        pytest.param("sd", frkern.FRDiff(interval=2), marks=pytest.mark.slow),
        pytest.param("sd", frkern.SkipConv(0.2, tile=4), marks=pytest.mark.slow),  # stateful units: the reuse
        # graph moves the state on
    ],
)
def test_compiled_patched_unet_has_no_graph_breaks_and_no_recompiles(kind, policy):
    make, prompt_kwargs = KINDS[kind]
    pipe = make()
    prompt = prompt_kwargs()
    handle = frkern.patch(pipe, policy, backend="torch")
    eager = generate(pipe, prompt, steps=7)
    eager_stats = handle.stats

    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)  # a graph break would raise
    for generation in range(2):
        with steady() if generation > 0 else contextlib.nullcontext():
            got = generate(pipe, prompt, steps=7)
        assert torch.equal(got, eager), f"generation {generation} differs from the eager patched UNet"
        assert handle.stats == eager_stats  # the same steps reused, mixed and skipped
        if generation == 0:
            first = graphs()
            assert first > 0
    assert graphs() == first, "compiled again in steady state"
    assert breaks() == 0
    # patching (and starting) another model leaves this one's graphs alone
    frkern.patch(make().unet, frkern.FRDiff(interval=2)).begin(2)
    with steady():
        assert torch.equal(generate(pipe, prompt, steps=7), eager)
    assert graphs() == first, "patching another model recompiled this one"

    # a new resolution compiles new graphs (guards see the shapes) and stays correct; once, on the
    # FRDiff case (recompiling every step kind costs as much as the first compile)
    if not isinstance(policy, frkern.FRDiff):
        return
    other = generate(pipe, prompt, steps=7, size=40)
    assert graphs() > first and breaks() == 0
    pipe.unet = pipe.unet._orig_mod
    assert torch.equal(other, generate(pipe, prompt, steps=7, size=40))


@pytest.mark.slow
def test_patch_after_compile_and_unpatch_again():
    pipe = small_sd_pipeline()
    prompt = sd_prompt_kwargs()
    ref = generate(pipe, prompt, steps=6)
    fresh = small_sd_pipeline()
    frkern.patch(fresh, frkern.FRDiff(interval=2))
    want = generate(fresh, prompt, steps=6)

    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    assert torch.equal(generate(pipe, prompt, steps=6), ref)
    handle = frkern.patch(pipe, frkern.FRDiff(interval=2))  # finds the UNet inside the compiled wrapper
    assert handle.unet is pipe.unet._orig_mod
    assert torch.equal(generate(pipe, prompt, steps=6), want)
    assert handle.stats["reuse"] > 0
    frkern.unpatch(pipe)
    assert torch.equal(generate(pipe, prompt, steps=6), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "needs CUDA: under TRITON_INTERPRET=1 torch's wrap_triton hands back the interpreted kernel, "
    "which cannot be traced with fake tensors; bench/gpu/round.sh runs this on the GPU"))
def test_compiled_triton_backend_matches_eager_triton_backend(no_tf32):
    pipe = make_sd_pipeline().to("cuda")
    prompt = {k: v.cuda() for k, v in sd_prompt_kwargs().items()}
    frkern.patch(pipe, frkern.FRDiff(interval=2), backend="triton")
    eager = generate(pipe, prompt, steps=5)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True)  # inductor, which traces into the kernels
    got = generate(pipe, prompt, steps=5)
    assert breaks() == 0
    # inductor may reorder fp32 arithmetic around the custom ops; TF32 is off (no_tf32), else cuDNN's
    # and cuBLAS's algorithm choices under inductor alone would differ by ~1e-3
    assert rel(got, eager) < 1e-4
