"""backend="auto" survives a Triton kernel that cannot run (issue 22, item 3).

Failures are injected on the CPU: `ops._auto_picks_triton` (a private hook, see frkern/ops.py) is
monkeypatched so that "auto" takes the Triton path here as it does on CUDA tensors, and a function on
that path is monkeypatched to raise (inside the registered custom op where the test says so, to
show the error survives torch.library's dispatch). Checked per op: the fallback IS the reference
(bit for bit), one KernelFallbackWarning naming op / dtype / error, no second attempt for the key,
kernel_report, backend="triton" raising KernelError with the error chained; for skip_conv, which
updates x_ref and z in place, that a failure after partial writes leaves them as they were.
"""
import threading
import warnings

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import frkern
from frkern import ops
from tiny import sd_inputs, sd_unet

INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.bool: torch.uint8}


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(INT[a.dtype]),
                                                                     b.contiguous().view(INT[b.dtype]))


@pytest.fixture(autouse=True)
def auto_takes_triton(monkeypatch):
    monkeypatch.setattr(ops, "_auto_picks_triton", lambda t: True)
    ops._forget_fallbacks()
    yield
    ops._forget_fallbacks()


class Inject:
    """A replacement that raises `error` (after calling `then`, if given) and counts its calls."""

    def __init__(self, error, then=None):
        self.error, self.then, self.calls = error, then, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.then is not None:
            self.then(*args, **kwargs)
        raise self.error


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, ops.KernelFallbackWarning)]


def group_norm_case(monkeypatch, dtype):
    # inside the custom op, after its argument checks: the kernel's block sizes
    inject = Inject(OutOfResources(300000, 232448, "shared memory"))
    monkeypatch.setattr(ops._gn, "_block_sizes", inject)
    norm = torch.nn.GroupNorm(4, 8).to(dtype)
    g = torch.Generator().manual_seed(0)
    x, chan = torch.randn(2, 8, 4, 4, generator=g).to(dtype), torch.randn(2, 8, generator=g).to(dtype)
    return inject, lambda backend, x=x: ops.group_norm_act(x, norm, silu=True, add_channel=chan[: x.shape[0]],
                                                           backend=backend)


def geglu_case(monkeypatch, dtype):
    inject = Inject(RuntimeError("Triton Error [CUDA]: device kernel image is invalid"))
    monkeypatch.setattr(ops, "_geglu_op", inject)  # the registered op the wrapper calls
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    return inject, lambda backend, x=x: ops.geglu(x, backend=backend)


def score_mix_case(monkeypatch, dtype):
    inject = Inject(CompilationError("def _score_mix_kernel(...)", None, "injected: unsupported conversion"))
    monkeypatch.setattr(ops._sm, "score_mix_triton", inject)  # inside the custom op
    g = torch.Generator().manual_seed(2)
    fr, key = torch.randn(2, 4, 4, 4, generator=g).to(dtype), torch.randn(2, 4, 4, 4, generator=g).to(dtype)
    return inject, lambda backend, x=fr: ops.score_mix(x, key[: x.shape[0]], 0.3, backend=backend)


CASES = {"group_norm_act": group_norm_case, "geglu": geglu_case, "score_mix": score_mix_case}
ERRORS = {"group_norm_act": "OutOfResources: out of resource: shared memory", "geglu": "device kernel image is invalid",
          "score_mix": "injected: unsupported conversion"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(CASES))
def test_out_of_place_op_falls_back_once_and_stays(monkeypatch, op, dtype):
    inject, call = CASES[op](monkeypatch, dtype)
    want = call("torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = call("auto")
        assert same_bits(got, want)  # the fallback is the reference call
        assert inject.calls == 1
        (w,) = fallback_warnings(record)
        assert op in str(w.message) and str(dtype) in str(w.message) and ERRORS[op] in str(w.message)
        again = call("auto")  # the key stays on the reference: no second attempt, no second warning
        assert same_bits(again, want) and inject.calls == 1 and len(fallback_warnings(record)) == 1
    report = frkern.kernel_report()[op]
    assert report["triton"] == 0 and report["torch"] == 3
    ((key, error),) = report["fallbacks"]
    assert key[:2] == (dtype, "cpu") and ERRORS[op] in error

    with pytest.raises(ops.KernelError, match=op) as raised:  # "triton" forces the kernel: it raises
        call("triton")
    assert raised.value.__cause__ is inject.error and inject.calls == 2
    assert frkern.kernel_report()[op]["fallbacks"] == report["fallbacks"]


def test_fallback_key_leaves_out_batch_and_spatial_size_but_not_channels(monkeypatch):
    inject, call = group_norm_case(monkeypatch, torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call("auto")
        smaller = torch.randn(1, 8, 6, 2)  # other batch and map size, same key: no attempt
        assert same_bits(call("auto", smaller), call("torch", smaller)) and inject.calls == 1
        norm16 = torch.nn.GroupNorm(4, 16)  # other channels: another key, tried (and failing) once
        x16 = torch.randn(2, 16, 4, 4)
        for _ in range(2):
            ops.group_norm_act(x16, norm16, silu=False, backend="auto")
        assert inject.calls == 2 and len(fallback_warnings(record)) == 2
    assert len(frkern.kernel_report()["group_norm_act"]["fallbacks"]) == 2


def test_argument_errors_raise_and_register_nothing(monkeypatch):
    inject, _ = group_norm_case(monkeypatch, torch.float32)
    norm = torch.nn.GroupNorm(4, 8)
    with pytest.raises(ValueError, match="add must match"):
        ops.group_norm_act(torch.randn(2, 8, 4, 4), norm, silu=True, add=torch.randn(2, 8, 4, 5), backend="auto")
    with pytest.raises(ValueError, match="must match"):
        ops.score_mix(torch.randn(2, 3), torch.randn(3, 2), 0.5, backend="auto")
    assert inject.calls == 0
    x, x_ref, z, weight, bias = skip_state()
    with pytest.raises(ValueError, match="weight is torch.float16"):  # raised inside the op
        step(x, x_ref, z, weight.half(), bias, "auto")
    assert all(not r["fallbacks"] for r in frkern.kernel_report().values())


def test_kernel_report_reset_zeroes_counts_and_keeps_fallbacks(monkeypatch):
    _, call = geglu_case(monkeypatch, torch.float32)
    with pytest.warns(ops.KernelFallbackWarning):
        call("auto")
    call("torch")
    assert frkern.kernel_report(reset=True)["geglu"]["torch"] == 2
    report = frkern.kernel_report()["geglu"]
    assert report["torch"] == report["triton"] == 0 and len(report["fallbacks"]) == 1


def test_concurrent_failures_warn_and_register_once(monkeypatch):
    _, call = geglu_case(monkeypatch, torch.float32)
    both_in = threading.Barrier(2)
    inject = Inject(RuntimeError("launch failed"), then=lambda *a: both_in.wait(timeout=30))
    monkeypatch.setattr(ops, "_geglu_op", inject)  # both threads fail before either registers
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=lambda: results.append(call("auto"))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert inject.calls == 2 and len(results) == 2 and all(same_bits(r, call("torch")) for r in results)
    assert len(fallback_warnings(record)) == 1 and len(frkern.kernel_report()["geglu"]["fallbacks"]) == 1


# --- skip_conv: in-place state -------------------------------------------------------------------

def skip_state(seed=0, cin=4, cout=6, size=8):
    g = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(1, cin, size, size, generator=g)
    weight, bias = torch.randn(cout, cin, 3, 3, generator=g) * 0.2, torch.randn(cout, generator=g)
    z = torch.nn.functional.conv2d(x_ref, weight, bias, padding=1)
    change = torch.zeros(1, 1, size, size)
    change[:, :, :4, :4] = 1.0  # one tile of four (tile 4) changes by a lot, the others not at all
    x = x_ref + change * torch.randn(x_ref.shape, generator=g)
    return x, x_ref, z, weight, bias


def step(x, x_ref, z, weight, bias, backend):
    return ops.skip_conv(x, x_ref, z, weight, bias, tile=4, threshold=0.1, padding=(1, 1), backend=backend)


def inject_skip_conv(monkeypatch, where):
    """where: "before" (the op fails before any write), "after_gate" (the convolution's compile fails
    after the gate launches wrote x_ref), "after_all" (both x_ref and z written, then an error)."""
    error = OutOfResources(200000, 101376, "shared memory")
    if where == "before":
        inject = Inject(error)
        monkeypatch.setattr(ops, "_skip_conv_op", inject)
    elif where == "after_gate":
        inject = Inject(error)
        monkeypatch.setattr(ops._sc, "_conv_blocks", inject)  # runs between the gate and the conv launch
    else:
        inject = Inject(error, then=ops._sc.skip_conv_triton)
        monkeypatch.setattr(ops._sc, "skip_conv_triton", inject)
    return inject


@pytest.mark.parametrize("where", ["before", "after_gate", "after_all"])
def test_skip_conv_failure_leaves_state_as_the_reference_does(monkeypatch, where):
    x, x_ref, z, weight, bias = skip_state()
    x_ref0, z0 = x_ref.clone(), z.clone()
    want = step(x, x_ref0.clone(), z0.clone(), weight, bias, "torch")
    assert want[2].any() and not want[2].all()  # some tiles active: the gate writes x_ref
    inject = inject_skip_conv(monkeypatch, where)
    written = []
    if where != "before":  # record what the failed Triton path had written when it raised
        then = inject.then
        inject.then = lambda *a, **k: (then and then(*a, **k), written.append(
            (not torch.equal(x_ref, x_ref0), not torch.equal(z, z0))))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = step(x, x_ref, z, weight, bias, "auto")
        (w,) = fallback_warnings(record)
        assert "skip_conv" in str(w.message) and "torch.float32" in str(w.message) and "shared memory" in str(w.message)
        assert written == {"before": [], "after_gate": [(True, False)], "after_all": [(True, True)]}[where]
        # the caller's state is untouched, as the (out-of-place) reference leaves it
        assert same_bits(x_ref, x_ref0) and same_bits(z, z0)
        assert got[0] is not z and all(same_bits(a, b) for a, b in zip(got, want))
        again = step(x, x_ref, z, weight, bias, "auto")  # stays on the reference
        assert inject.calls == 1 and len(fallback_warnings(record)) == 1
        assert all(same_bits(a, b) for a, b in zip(again, want)) and same_bits(x_ref, x_ref0)
    report = frkern.kernel_report()["skip_conv"]
    assert report["triton"] == 0 and report["torch"] == 3 and len(report["fallbacks"]) == 1

    with pytest.raises(ops.KernelError, match="skip_conv") as raised:
        step(x, x_ref, z, weight, bias, "triton")
    assert raised.value.__cause__ is inject.error
    assert same_bits(x_ref, x_ref0) and same_bits(z, z0)  # restored before raising too


def test_skip_conv_failure_on_a_signature_that_ran_before_raises(monkeypatch):
    # a signature that ran once has its kernels compiled and loaded and takes no snapshot; a later
    # failure there is a device fault: raised (the state may be partial), not hidden
    x, x_ref, z, weight, bias = skip_state(cin=2, cout=2)
    out = step(x, x_ref, z, weight, bias, "auto")  # the real kernels, in Triton's interpreter
    assert out[0] is z and frkern.kernel_report()["skip_conv"]["triton"] == 1
    inject = Inject(RuntimeError("unspecified launch failure"))
    monkeypatch.setattr(ops, "_skip_conv_op", inject)
    with pytest.raises(ops.KernelError, match="had run before") as raised:
        step(x, x_ref, z, weight, bias, "auto")
    assert raised.value.__cause__ is inject.error
    assert not frkern.kernel_report()["skip_conv"]["fallbacks"]


# --- a patched UNet ------------------------------------------------------------------------------

# FRDiff(2) with bias 0.25 so that step 1 of 4 mixes scores (lambda 0.5) and score_mix runs too
@pytest.mark.parametrize("policy", [frkern.FRDiff(2, bias=0.25), frkern.SkipConv(0.1, tile=4)],
                         ids=["frdiff", "skipconv"])
def test_patched_unet_with_failing_kernels_equals_torch_backend(monkeypatch, policy):
    injected = {op: Inject(RuntimeError(f"{op}: no kernel image for this device"))
                for op in ("_group_norm_act_op", "_geglu_op", "_score_mix_op", "_skip_conv_op")}
    for name, inject in injected.items():
        monkeypatch.setattr(ops, name, inject)
    outs = {}
    for backend in ("torch", "auto"):
        unet = sd_unet()
        sample, ehs, _ = sd_inputs(unet, size=8)
        handle = frkern.patch(unet, policy, backend=backend)
        handle.begin(4)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ops.KernelFallbackWarning)
            outs[backend] = []
            for i in range(4):  # FRDiff: full, reuse (score mixing), full, reuse
                handle.set_step(i)
                outs[backend].append(unet(sample * (1 - 0.1 * i), 900 - 200 * i, ehs).sample)
    for a, b in zip(outs["auto"], outs["torch"]):
        assert same_bits(a, b)
    report = frkern.kernel_report()
    used = ("group_norm_act", "geglu", "score_mix") if isinstance(policy, frkern.FRDiff) else ("skip_conv",)
    for op in used:
        # every key tried once (no retry storm), all on the reference
        assert report[op]["triton"] == 0 and report[op]["fallbacks"]
        assert injected["_" + op + "_op"].calls == len(report[op]["fallbacks"])
