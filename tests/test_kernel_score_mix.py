"""kernels/score_mix.py against mix * fr + (1 - mix) * key evaluated in fp64."""
import pytest
import torch

from frkern import ops
from frkern.kernels.score_mix import score_mix_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative, outputs of order 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (1, 4, 64, 64), (3, 5)])
@pytest.mark.parametrize("mix", [0.0, 0.125, 0.5, 0.9, 1.0])
def test_score_mix_matches_definition(dtype, shape, mix):
    g = torch.Generator().manual_seed(len(shape) * 100 + int(mix * 8))
    fr = torch.randn(shape, generator=g).to(DEVICE, dtype)
    key = torch.randn(shape, generator=g).to(DEVICE, dtype)
    out = score_mix_triton(fr, key, mix)
    ref = mix * fr.double() + (1 - mix) * key.double()
    assert out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ops.score_mix(fr, key, mix, backend="torch").double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ops.score_mix(fr, key, mix, backend="triton"), out, atol=0, rtol=0)


def test_every_output_element_is_written():
    fr = torch.randn(3, 1000, device=DEVICE)
    key = torch.randn(3, 1000, device=DEVICE)
    out = torch.full_like(fr, float("nan"))
    assert score_mix_triton(fr, key, 0.25, out=out) is out
    assert torch.isfinite(out).all()


def test_nan_propagates():
    fr = torch.randn(4, 4, device=DEVICE)
    key = torch.randn(4, 4, device=DEVICE)
    fr[1, 2] = float("nan")
    out = score_mix_triton(fr, key, 0.5)
    assert torch.isnan(out[1, 2]) and torch.isfinite(out).sum() == 15


def test_non_contiguous_inputs():
    fr = torch.randn(4, 6, device=DEVICE).t()
    key = torch.randn(6, 4, device=DEVICE)
    torch.testing.assert_close(score_mix_triton(fr, key, 0.3), 0.3 * fr + 0.7 * key)


@pytest.mark.parametrize(
    "fr, key, mix, match",
    [
        (torch.randn(2, 3), torch.randn(3, 2), 0.5, "must match"),
        (torch.randn(2, 3), torch.randn(2, 3).half(), 0.5, "must match"),
        (torch.randn(2, 3), torch.randn(2, 3), 1.5, r"\[0, 1\]"),
    ],
)
def test_bad_arguments(fr, key, mix, match):
    with pytest.raises(ValueError, match=match):
        score_mix_triton(fr, key, mix)
