"""The GPU round's preflight (bench/gpu/round.sh): a short check that stops the round early, before
any long stage, when frkern cannot run on this machine.

    python bench/gpu/preflight.py            # CUDA: real kernels, real CUDA graphs
    python bench/gpu/preflight.py --cpu      # dry run: Triton's interpreter, emulated graphs

Checks, each reported on its own line (`ok` / `FAILED: why`), then one last line
`PREFLIGHT OK` or `PREFLIGHT FAILED: <checks>` (exit 1):
- imports: frkern is the installed copy (not the source tree) and no top-level `kernels` module is
  importable (diffusers probes for Hugging Face's `kernels` package by that name);
- ops: each custom op (group_norm_act, score_mix, geglu, skip_conv, the cache codec: quantize,
  dequantize, dequantize_add, group_norm_act decoding an int8 x in its prologue and encoding one)
  on backend="triton" against its PyTorch reference, and kernel_report() shows every op with a
  Triton kernel on Triton with no fallback;
- graph: the ops captured in one torch.cuda.CUDAGraph and replayed on new inputs (CUDA only);
- patched graphs: a small SD-layout UNet patched with FRDiff (score mixing) on the Triton backend
  with cuda_graphs=True, two 6-step generations, equal to the eager patched UNet, graphs replayed
  (dry run: the torch backend, as a whole UNet in Triton's interpreter takes seconds per call).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (Triton interpreter, emulated graphs)")
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads
    t0 = time.perf_counter()
    import torch

    import frkern
    import frkern.graphs
    import frkern.ops

    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.float16
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"PREFLIGHT FAILED: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
        return 1
    print(f"preflight: device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'dry run'}), "
          f"imports {time.perf_counter() - t0:.1f} s")
    failures = []

    def check(name, fn):
        t = time.perf_counter()
        try:
            detail = fn() or ""
            print(f"  {name}: ok {detail} ({time.perf_counter() - t:.1f} s)", flush=True)
        except Exception as e:  # every check runs; the round stops on any failure
            failures.append(name)
            print(f"  {name}: FAILED: {type(e).__name__}: {str(e).strip()[:400]}", flush=True)
            traceback.print_exc(file=sys.stdout)

    def imports():
        where = os.path.dirname(os.path.abspath(frkern.__file__))
        if where == os.path.join(ROOT, "frkern"):
            raise RuntimeError(f"frkern imported from the source tree ({where}), not the installed copy")
        if importlib.util.find_spec("kernels") is not None:
            origin = importlib.util.find_spec("kernels").origin
            raise RuntimeError(f"a top-level `kernels` module is importable: {origin}")
        return f"frkern from {where}"

    def close(got, want, what, tol=2e-2):
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()
        if not err <= tol:  # NaN fails too
            raise AssertionError(f"{what}: max rel err {err:.2e} > {tol:.0e}")
        return err

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    norm = torch.nn.GroupNorm(8, 32).to(device, dtype)
    x = rand(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    temb, a, b = rand(2, 32), rand(3, 40), rand(3, 40)
    proj = rand(2, 16, 64)
    conv_x, conv_w, conv_b = rand(1, 16, 8, 8), rand(16, 16, 3, 3) / 12, rand(16)

    def ops():
        frkern.ops.kernel_report(reset=True)
        close(frkern.ops.group_norm_act(x, norm, silu=True, add_channel=temb, backend="triton"),
              frkern.ops.group_norm_act(x, norm, silu=True, add_channel=temb, backend="torch"), "group_norm_act")
        close(frkern.ops.score_mix(a, b, 0.3, backend="triton"), frkern.ops.score_mix(a, b, 0.3, backend="torch"),
              "score_mix")
        close(frkern.ops.geglu(proj, backend="triton"), frkern.ops.geglu(proj, backend="torch"), "geglu")
        z0 = torch.nn.functional.conv2d(conv_x, conv_w, conv_b, padding=1)
        x_new = conv_x + (torch.arange(64, device=device).view(1, 1, 8, 8) < 16).to(dtype)  # top rows change
        outs = {}
        for backend in ("triton", "torch"):
            x_ref, z = conv_x.clone(), z0.clone()
            outs[backend] = frkern.ops.skip_conv(x_new, x_ref, z, conv_w, conv_b, tile=4, threshold=0.05,
                                                 backend=backend)[0]
        close(outs["triton"], outs["torch"], "skip_conv")
        for fmt in ("int8", "fp8_e4m3"):  # the compressed cache's codec (frkern.cache_format)
            q, s = frkern.ops.quantize_cache(x, fmt, "group", 16, backend="triton")
            q_ref, s_ref = frkern.ops.quantize_cache(x, fmt, "group", 16, backend="torch")
            if not (torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)):
                raise AssertionError(f"quantize_cache {fmt}: Triton differs from the reference")
            close(frkern.ops.dequantize_cache(q, s, dtype, 16, backend="triton"), x, f"dequantize_cache {fmt}",
                  tol=0.07 if fmt == "fp8_e4m3" else 0.01)
        # the codec inside its consumers: x + a cached branch, norm2 decoding a cached conv1 output in
        # its prologue, the keyframe's norm2 encoding what it reads
        q, s = frkern.ops.quantize_cache(x, "int8", "channel", 64, backend="triton")  # NCHW, as the decoders need
        close(frkern.ops.dequantize_add(x, q, s, 64, backend="triton"),
              frkern.ops.dequantize_add(x, q, s, 64, backend="torch"), "dequantize_add")
        decode = dict(silu=True, add_channel=temb, x_scale=s, x_group_size=64, x_dtype=dtype)
        close(frkern.ops.group_norm_act(q, norm, backend="triton", **decode),
              frkern.ops.group_norm_act(q, norm, backend="torch", **decode), "group_norm_act decoding int8")
        encode = dict(silu=True, add_channel=temb, quantize=("int8", "channel", 64))
        (y, (q_gn, s_gn)), (y_ref, _) = (frkern.ops.group_norm_act(x, norm, backend=b, **encode)
                                         for b in ("triton", "torch"))
        close(y, y_ref, "group_norm_act encoding int8")
        if not (torch.equal(q_gn, q) and torch.equal(s_gn, s)):
            raise AssertionError("group_norm_act encoding int8: its codes differ from quantize_cache's")
        report = frkern.ops.kernel_report()
        fallbacks = {op: r["fallbacks"] for op, r in report.items() if r["fallbacks"]}
        missing = [op for op, r in report.items() if r["triton"] == 0 and op not in frkern.ops.TORCH_ONLY]
        if fallbacks or missing:
            raise RuntimeError(f"not on Triton: {missing}, fallbacks: {fallbacks}")
        return "(" + ", ".join(f"{op} {r['triton']}x" for op, r in report.items()) + " on Triton)"

    def raw_graph():
        if device.type != "cuda":
            return "(skipped: emulated run)"
        sx, st = x.clone(), temb.clone()

        def step():
            h = frkern.ops.group_norm_act(sx, norm, silu=True, add_channel=st, backend="triton")
            return frkern.ops.geglu(h.flatten(2), backend="triton")

        replay, out = frkern.graphs.cuda_capture(step)
        sx.copy_(rand(*x.shape))
        st.copy_(rand(*temb.shape))
        replay()
        torch.cuda.synchronize()
        close(out, step(), "replay vs eager on new inputs")

    def patched_graphs():
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        cfg = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
        eager_unet = UNet2DConditionModel(**cfg).eval().to(device, dtype)
        graphed_unet = UNet2DConditionModel(**cfg).eval().to(device, dtype)
        graphed_unet.load_state_dict(eager_unet.state_dict())
        policy, backend = frkern.FRDiff(interval=2), ("torch" if args.cpu else "triton")
        eager = frkern.patch(eager_unet, policy, backend=backend)
        graphed = frkern.patch(graphed_unet, policy, backend=backend, cuda_graphs=True)
        if device.type != "cuda":
            graphed.graphs.capture = frkern.graphs.EmulatedCapture()
        sample, ehs = rand(2, 4, 16, 16), rand(2, 7, 32)
        steps = [900, 750, 600, 450, 300, 150]

        def generate(unet, handle):
            handle.begin(len(steps))
            outs = []
            for i, t in enumerate(steps):
                handle.set_step(i)
                outs.append(unet(sample + 0.01 * i, torch.tensor(t, device=device), ehs).sample)
            return torch.stack(outs)

        with torch.no_grad():
            want = generate(eager_unet, eager)
            for _ in range(2):
                err = close(generate(graphed_unet, graphed), want, "graphed vs eager patched UNet", tol=1e-2)
        stats = graphed.graph_stats
        if not (stats.get("captures", 0) >= 2 and stats.get("replays", 0) >= 2):
            raise RuntimeError(f"graphs not captured and replayed: {stats}")
        return f"({backend} backend, max rel err {err:.1e}; graphs: {dict(stats)})"

    check("imports", imports)
    check("custom ops on Triton", ops)
    check("ops in one CUDA graph", raw_graph)
    check("patched UNet, FRDiff + score mixing, cuda_graphs=True", patched_graphs)
    total = time.perf_counter() - t0
    if failures:
        print(f"PREFLIGHT FAILED: {'; '.join(failures)} ({total:.0f} s)")
        return 1
    print(f"PREFLIGHT OK ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
