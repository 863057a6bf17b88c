"""kernels/quant_cache.py's decode-and-add (a reused transformer branch: hidden + cached branch)
against an independent statement: y = dtype(float32(x) + float32(decode)), the decode being
tests/reference_quant.py's dequantize_statement (rounded to x's dtype); one rounding of the sum,
which is what PyTorch's fp16 / bf16 add does.

- dequantize_add_reference equals the statement bit for bit;
- dequantize_add_triton (Triton's interpreter on a CPU) equals it bit for bit too, for x in NCHW,
  channels_last, (batch, tokens, dim) and a non-dense slice, the result in x's memory format,
  into a NaN-filled out= of another layout as well;
- bad arguments raise ValueError naming the value.
"""
import pytest
import torch

from frkern.kernels.quant_cache import dequantize_add_reference, dequantize_add_triton
from reference_quant import dequantize_statement, make_input, quantize_statement

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def statement(x, q, scale, group_size):
    d = dequantize_statement(q, scale, x.dtype, group_size)
    return (x.cpu().float() + d.cpu().float()).to(x.dtype)


def encoded(shape, fmt, scales, group_size, seed):
    """(q, scale) of a make_input tensor (midpoints, an all-zero channel, scales 1e-3..1e3)."""
    base, _ = make_input(shape, torch.float32, fmt, scales, group_size, seed=seed)
    q, scale = quantize_statement(base, fmt, scales, group_size)
    return q.to(DEVICE), scale.to(DEVICE)


def layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "slice":  # every other column of a wider tensor: not dense, empty_like is then contiguous
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


CASES = [  # (fmt, scales, group_size, dtype, shape, layout of x)
    ("int8", "channel", 64, torch.float16, (2, 6, 5, 7), "nchw"),
    ("int8", "group", 16, torch.bfloat16, (2, 6, 5, 7), "channels_last"),  # 16 does not divide 35
    ("int8", "group", 12, torch.float32, (3, 5, 4, 6), "channels_last"),
    ("fp8_e4m3", "channel", 64, torch.bfloat16, (3, 5, 4, 6), "nchw"),
    ("fp8_e4m3", "group", 16, torch.float16, (2, 6, 5, 7), "channels_last"),
    ("fp8_e4m3", "group", 7, torch.float32, (2, 6, 5, 7), "slice"),
    ("int8", "group", 16, torch.float16, (2, 40, 48), "nchw"),  # (batch, tokens, dim)
    ("fp8_e4m3", "channel", 64, torch.bfloat16, (2, 40, 48), "slice"),
]


@pytest.mark.parametrize("fmt, scales, group_size, dtype, shape, kind", CASES)
def test_matches_statement(fmt, scales, group_size, dtype, shape, kind):
    q, scale = encoded(shape, fmt, scales, group_size, seed=len(shape) + shape[1])
    g = torch.Generator().manual_seed(shape[1] * 31 + shape[-1])
    # x of the decoded values' magnitudes (per-channel factors 1e-3..1e3), so that the sum rounds
    factors = torch.logspace(-3, 3, shape[1]).view(1, shape[1], *[1] * (len(shape) - 2))
    x = layout((torch.randn(shape, generator=g) * factors).to(DEVICE, dtype), kind)
    x0 = x.clone()
    want = statement(x, q, scale, group_size)

    ref = dequantize_add_reference(x, q, scale, group_size)
    assert ref.dtype == dtype and torch.equal(ref.cpu(), want)

    y = dequantize_add_triton(x, q, scale, group_size)
    assert torch.equal(x, x0)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == torch.empty_like(x).stride()
    assert not torch.isnan(y).any()
    bad = (y.cpu() != want).nonzero()
    assert bad.numel() == 0, f"differs at {bad[:4].tolist()}: {y.cpu()[tuple(bad[0])]} vs {want[tuple(bad[0])]}"

    # into a NaN-filled out= of the other layout (its own strides)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    if kind != "channels_last" and len(shape) == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    got = dequantize_add_triton(x, q, scale, group_size, out=out)
    assert got is out and torch.equal(out.cpu(), want)


def test_midpoints_of_the_sum_round_to_even():
    """x and the decode chosen so that their float32 sum lies exactly between two fp16 values:
    one rounding of the sum (ties to even), not a rounding of each part."""
    q = torch.tensor([[[1, 3, -1, 7]]], dtype=torch.int8, device=DEVICE)
    scale = torch.full((1, 1, 1), 2.0 ** -11, device=DEVICE)  # decode: q * 2**-11, exact in fp16
    x = torch.full((1, 1, 4), 1.0, dtype=torch.float16, device=DEVICE)  # fp16 spacing above 1: 2**-10
    # 1 + 0.5, 1.5 and 3.5 spacings (ties: to 1, 1 + 2 and 1 + 4 spacings); 1 - 2**-11 is exact
    want = statement(x, q, scale, 64)
    assert want.float().flatten().tolist() == [1.0, 1 + 2.0 ** -9, 1 - 2.0 ** -11, 1 + 2.0 ** -8]
    assert torch.equal(dequantize_add_triton(x, q, scale, 64).cpu(), want)
    assert torch.equal(dequantize_add_reference(x, q, scale, 64).cpu(), want)


def _args(**kw):
    q, scale = encoded((2, 3, 4, 4), "int8", "group", 8, seed=0)
    args = dict(x=torch.randn(2, 3, 4, 4, device=DEVICE).half(), q=q, scale=scale, group_size=8)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(x=torch.randn(2, 3, 4, 4).double()), "float64"),
        (dict(x=torch.randn(2, 3, 4, 5).half()), r"shape"),
        (dict(q=torch.zeros(2, 3, 4, 4, dtype=torch.float16)), "float16"),
        (dict(q=torch.zeros(2, 3, 4, 4, dtype=torch.int8).contiguous(memory_format=torch.channels_last)),
         "row-major contiguous"),
        (dict(scale=torch.ones(2, 3, 3)), r"\(2, 3, 1\).*\(2, 3, 2\).*got \(2, 3, 3\)"),
        (dict(scale=torch.ones(2, 3, 2, dtype=torch.float16)), "float16"),
        (dict(group_size=0), "group_size"),
        (dict(out=torch.empty(2, 3, 4, 4)), "out must match"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    args = _args(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    with pytest.raises(ValueError, match=match):
        dequantize_add_triton(args["x"], args["q"], args["scale"], args["group_size"], out=args.get("out"))
