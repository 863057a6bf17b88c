"""Where a step's time would go: every op of a full and of a reuse call, from shapes alone.

    python bench/step_anatomy.py --config sd15 --policy FRDiff:interval=3 --out bench/results

An analytical estimate, not a measurement. The patched UNet (backend "torch", i.e. unfused ops)
runs on PyTorch's meta device; each aten op is recorded with its FLOPs (torch.utils.flop_counter's
formulas) and the bytes it must read and write (its tensor inputs and outputs; views are free).
Per op the time floor is max(FLOPs / peak FLOP rate, bytes / bandwidth), with rates measured on
an H100 in an earlier GPU round (757 TFLOP/s fp16 matmul, 3.0 TB/s copy) unless given. Summed by kind of
op (convolution, attention and matmul, normalisation, elementwise, copies), it shows which fusions
could matter (bytes of norm + elementwise) and what a step cannot beat (the floor), next to the
number of ops (eager kernel launches). Attention is counted as the op the meta device dispatches
to, which may be the unfused math path: its bytes are then an upper bound. Writes JSON and
markdown to bench/results/local/ unless --out says otherwise.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configs import CONFIGS, TEXT  # noqa: E402
from options import add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402
from specs import GRAMMAR, check_before_imports, spec_or_exit  # noqa: E402


def parser():
    ap = new_parser(__doc__, epilog=GRAMMAR)
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS), help="UNet layout (bench/configs.py)")
    ap.add_argument("--policy", default="FRDiff:interval=3",
                    help="frkern policy spec whose reuse call is analysed (grammar below; a 50-step schedule)")
    ap.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x: CFG)")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights and activations in channels_last")
    ap.add_argument("--tflops", type=float, default=757.0, help="peak matmul rate, TFLOP/s")
    ap.add_argument("--tbps", type=float, default=3.0, help="memory bandwidth, TB/s")
    add_out(ap, "the JSON and markdown results")
    return ap


def check_spec(ap, args):
    return spec_or_exit(ap, args.policy, 50, option="--policy")  # anatomy() looks at a 50-step schedule


if __name__ == "__main__":
    help_before_imports(parser)
    check_before_imports(parser, check_spec)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import frkern  # noqa: E402
from record import save_json  # noqa: E402

# ops that move no data (allocation, aliasing)
FREE_OPS = (torch.ops.aten.detach, torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
            torch.ops.aten._unsafe_view, torch.ops.aten.alias, torch.ops.aten.lift_fresh)
KINDS = ("conv", "attention/matmul", "norm", "elementwise", "copy/cat/resample")


def op_kind(name: str) -> str:
    if "convolution" in name:
        return "conv"
    if any(k in name for k in ("mm", "attention", "linear", "matmul", "bmm")):
        return "attention/matmul"
    if "norm" in name:
        return "norm"
    if any(k in name for k in ("cat", "copy", "clone", "contiguous", "upsample", "_to_copy", "index")):
        return "copy/cat/resample"
    return "elementwise"


class OpRecorder(TorchDispatchMode):
    """Records (kind, FLOPs, bytes) of every non-view aten op."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self._flops = FlopCounterMode(display=False).flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._overloadpacket in FREE_OPS:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        count = self._flops.get(func._overloadpacket)
        flops = count(*args, **kwargs, out_val=out) if count is not None else 0
        self.ops.append((op_kind(str(func._overloadpacket)), str(func._overloadpacket), flops, nbytes))
        return out


@contextlib.contextmanager
def _flash_attention_model():
    """Count scaled_dot_product_attention as one fused kernel (as flash attention runs on a GPU):
    FLOPs 4*B*H*Lq*Lk*D, bytes q + k + v + out. On the meta device it would otherwise decompose
    into the math path and count an attention matrix that a GPU never writes."""
    sdpa = F.scaled_dot_product_attention

    def model(q, k, v, *args, **kwargs):
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        mode = torch.utils._python_dispatch._get_current_dispatch_mode()
        if isinstance(mode, OpRecorder):
            flops = 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
            nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, out))
            mode.ops.append(("attention/matmul", "flash attention (model)", flops, nbytes))
        return out

    F.scaled_dot_product_attention = model
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def summarise(ops, tflops: float, tbps: float) -> dict:
    rows = {k: dict(ops=0, gflop=0.0, mb=0.0, floor_us=0.0) for k in KINDS}
    for kind, _, flops, nbytes in ops:
        r = rows[kind]
        r["ops"] += 1
        r["gflop"] += flops / 1e9
        r["mb"] += nbytes / 1e6
        r["floor_us"] += max(flops / (tflops * 1e12), nbytes / (tbps * 1e12)) * 1e6
    total = dict(ops=sum(r["ops"] for r in rows.values()), gflop=sum(r["gflop"] for r in rows.values()),
                 mb=sum(r["mb"] for r in rows.values()), floor_us=sum(r["floor_us"] for r in rows.values()))
    by_op = collections.defaultdict(lambda: [0, 0.0])  # op -> [count, floor us]
    for kind, name, flops, nbytes in ops:
        by_op[name][0] += 1
        by_op[name][1] += max(flops / (tflops * 1e12), nbytes / (tbps * 1e12)) * 1e6
    top = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:8]
    return {**{k: {n: round(v, 2) for n, v in r.items()} for k, r in rows.items()},
            "total": {n: round(v, 2) for n, v in total.items()},
            "top_ops": [{"op": name, "count": c, "floor_us": round(us, 1)} for name, (c, us) in top]}


def anatomy(config: str, policy, batch: int = 1, dtype=torch.float16, channels_last: bool = False,
            tflops: float = 757.0, tbps: float = 3.0) -> dict:
    """{step kind: {op kind: ops, gflop, mb, floor_us}} for a full call and the first reuse call
    of a 50-step schedule."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[config]).eval().to(dtype)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        size, (text_len, pooled) = unet.config.sample_size, TEXT[config]
        x = torch.empty(2 * batch, unet.config.in_channels, size, size, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ehs = torch.empty(2 * batch, text_len, unet.config.cross_attention_dim, dtype=dtype)
        kw = {}
        if pooled:
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(2 * batch, pooled, dtype=dtype),
                                       "time_ids": torch.empty(2 * batch, 6, dtype=dtype)}
        t = torch.empty((), dtype=torch.long)
    handle = frkern.patch(unet, policy, backend="torch")
    n = 50
    plans = policy.schedule(n)
    reuse = next((i for i, p in enumerate(plans) if not p.keyframe and p.runs_network), None)
    result = {}
    with torch.no_grad(), _flash_attention_model():
        handle.begin(n)
        for kind, step in [("full", 0)] + ([("reuse", reuse)] if reuse is not None else []):
            if kind == "reuse":  # the keyframe this reuse step reads, unrecorded
                handle.set_step(max(i for i in range(reuse) if plans[i].keyframe))
                unet(x, t, ehs, **kw)
            handle.set_step(step)
            rec = OpRecorder()
            with rec:
                unet(x, t, ehs, **kw)
            result[kind] = summarise(rec.ops, tflops, tbps)
    frkern.unpatch(unet)
    return result


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    quiet_known_warnings()
    policy = check_spec(ap, args).policy
    res = anatomy(args.config, policy, args.batch, channels_last=args.channels_last,
                  tflops=args.tflops, tbps=args.tbps)
    lines = [f"# step anatomy (estimate from op shapes, not a measurement): {args.config}, {args.policy}, "
             f"fp16, UNet batch {2 * args.batch}, floors at {args.tflops} TFLOP/s and {args.tbps} TB/s", ""]
    for step, rows in res.items():
        lines += [f"## {step} call", "", "| op kind | ops (eager launches) | GFLOP | MB read+written | floor us |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {r['ops']} | {r['gflop']:.1f} | {r['mb']:.0f} | {r['floor_us']:.0f} |"
                  for k, r in rows.items() if k != "top_ops"]
        lines += ["", "largest floors by op: " + ", ".join(
            f"{o['op']} x{o['count']} {o['floor_us']:.0f} us" for o in rows["top_ops"]), ""]
    text = "\n".join(lines)
    print(text)
    name = f"anatomy_{args.config}_{policy.name}"
    save_json(args.out, name, {"kind": "analytical estimate from op shapes (meta device), not a measurement",
                               "tflops": args.tflops, "tbps": args.tbps, "result": res})
    stem = os.path.join(args.out, name)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return res


if __name__ == "__main__":
    main()
