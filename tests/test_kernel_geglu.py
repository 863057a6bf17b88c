"""kernels/geglu.py against h * gelu(g) evaluated in fp64 (gelu with erf, as F.gelu)."""
import math

import pytest
import torch

from frkern import ops
from frkern.kernels.geglu import geglu_reference, geglu_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative to outputs of order 1; bf16 also absorbs the interpreter's truncating conversion
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}


def definition(x: torch.Tensor) -> torch.Tensor:
    h, g = x.double().chunk(2, dim=-1)
    return h * 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 10), (1, 64, 2 * 320), (3, 2)])
def test_geglu_matches_definition(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (2 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    out = torch.full(shape[:-1] + (shape[-1] // 2,), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    assert geglu_triton(x, out=out) is out
    assert out.dtype == dtype and not torch.isnan(out).any()
    want = definition(x)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(geglu_reference(x).double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ops.geglu(x, backend="triton"), out, atol=0, rtol=0)
    assert torch.equal(ops.geglu(x, backend="torch"), geglu_reference(x))


def test_non_contiguous_input_and_nan_propagation():
    x = torch.randn(8, 5, device=DEVICE).t()  # (5, 8), not contiguous
    torch.testing.assert_close(geglu_triton(x), definition(x).float(), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 6, device=DEVICE)
    x[1, 4] = float("nan")  # the gate of output [1, 1]
    out = geglu_triton(x)
    assert torch.isnan(out[1, 1]) and torch.isfinite(out).sum() == 8


@pytest.mark.parametrize("x, kw, match", [
    (torch.randn(2, 3), {}, "must be even"),
    (torch.randn(2, 4).double(), {}, "dtype must be"),
    (torch.randn(2, 4), {"out": torch.empty(2, 4)}, "out must be"),
])
def test_bad_arguments(x, kw, match):
    with pytest.raises(ValueError, match=match):
        geglu_triton(x, **kw)
