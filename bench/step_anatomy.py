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

The reuse call by cache format (--cache-formats; `frkern.patch(..., cache=fmt)`, frkern.cache_format):
the same keyframe and reuse call with the cache stored as computed ("model": fp16 here), int8
with per-channel scales, int8 with per-group scales (64) and fp8_e4m3 (per-channel scales).
cache_read_mb: what the reuse call reads from the cache, each stored tensor once at its stored
bytes (scales included): the stored tensors the call's ops read (or a decode of them does);
used_mb: those whose values the call uses (frkern decodes every cached segment output of a call
slot before a reuse call, also those whose consumers do not run); stored_mb: the whole cache
after the keyframe (handle.cache_bytes, as bench/cache_bytes.py).
The call's ops are recorded as above, with the decode as the Triton backend runs it: a ResNet's
cached conv1 output (decoded in norm2's prologue) and a residual branch (decoded inside
`input + branch`) are read by their consumer at their stored bytes instead of a decoded tensor;
any other cached tensor (segment outputs, the keyframe's output) is decoded by a pass of its own
(read stored, write the model dtype; decode_passes), which its consumers then read. "model" is
the reuse call above, op for op.
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

# cache formats of the reuse call's table: frkern.CacheFormat(dtype, scales, group_size)
CACHE_FORMATS = {"model": ("model", "channel", 64), "int8": ("int8", "channel", 64),
                 "int8/group64": ("int8", "group", 64), "fp8_e4m3": ("fp8_e4m3", "channel", 64)}


def parser():
    ap = new_parser(__doc__, epilog=GRAMMAR)
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS), help="UNet layout (bench/configs.py)")
    ap.add_argument("--policy", default="FRDiff:interval=3",
                    help="frkern policy spec whose reuse call is analysed (grammar below; a 50-step schedule)")
    ap.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x: CFG)")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights and activations in channels_last")
    ap.add_argument("--tflops", type=float, default=757.0, help="peak matmul rate, TFLOP/s")
    ap.add_argument("--tbps", type=float, default=3.0, help="memory bandwidth, TB/s")
    ap.add_argument("--generation", action="store_true",
                    help="also record every call of a whole 50-step generation, in order (policies whose calls "
                         "differ from step to step: T-GATE's phases and halved calls, encoder propagation's key "
                         "steps): GFLOP and floor per step, and the generation's GFLOP over 50 full calls")
    ap.add_argument("--cache-formats", nargs="*", default=list(CACHE_FORMATS), choices=list(CACHE_FORMATS),
                    metavar="FORMAT", help="cache formats whose reuse call is analysed (the option alone: no such "
                    f"table); choices: {', '.join(CACHE_FORMATS)}")
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
        nbytes = sum(self.read_bytes(t) for t in ins) + sum(t.numel() * t.element_size() for t in outs)
        count = self._flops.get(func._overloadpacket)
        flops = count(*args, **kwargs, out_val=out) if count is not None else 0
        self.ops.append((op_kind(str(func._overloadpacket)), str(func._overloadpacket), flops, nbytes))
        return out

    def read_bytes(self, t: torch.Tensor) -> int:
        """Bytes an op reads of input t."""
        return t.numel() * t.element_size()


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


class CacheReadRecorder(OpRecorder):
    """OpRecorder that also notes which stored cache tensors the call reads (an op reads one or a
    view of it, or a modelled decode reads it) and which it uses (an op reads it or its decoded
    copy); an op reading a stand-in for a decode in its consumer reads the stored bytes."""

    def __init__(self, stored: list):
        super().__init__()
        self.stored = {}  # id of a stored tensor's root -> the stored tensors of that root
        for t in stored:
            self.stored.setdefault(id(_root(t)), []).append(t)
        self.read, self.used = {}, {}  # id -> stored tensor
        # id of a decoded stand-in -> (it, kept alive so that its id stays its own; the stored
        # tensors it stands for; the bytes an op reading it reads: None, its own, for a decode
        # pass's output; the stored ones for a decode in the consumer)
        self.decoded = {}
        self.decode_passes = 0

    def _mark(self, into: dict, tensors) -> None:
        for t in tensors:
            for s in self.stored.get(id(_root(t)), ()):
                into[id(s)] = s

    def note_read(self, *tensors) -> None:
        self._mark(self.read, tensors)

    def stand_in(self, q, scale, dtype, in_consumer: bool) -> torch.Tensor:
        """A decoded tensor (no op recorded): read in its consumer, or written by a decode pass."""
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        self.note_read(q, scale)
        nbytes = q.numel() * q.element_size() + scale.numel() * scale.element_size() if in_consumer else None
        self.decoded[id(out)] = (out, (q, scale), nbytes)
        return out

    def read_bytes(self, t: torch.Tensor) -> int:
        self.note_read(t)
        self._mark(self.used, [t])
        for key in (id(t), id(_root(t))):
            if key in self.decoded:
                _, sources, nbytes = self.decoded[key]
                self._mark(self.used, sources)
                if nbytes is not None:
                    return nbytes
                break
        return super().read_bytes(t)

    @staticmethod
    def nbytes(tensors: dict) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())


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


def _build(config: str, batch: int, dtype, channels_last: bool):
    """(UNet on the meta device, its call's arguments, its keyword arguments)."""
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
    return unet, (x, t, ehs), kw


def anatomy(config: str, policy, batch: int = 1, dtype=torch.float16, channels_last: bool = False,
            tflops: float = 757.0, tbps: float = 3.0) -> dict:
    """{step kind: {op kind: ops, gflop, mb, floor_us}} for a full call and the first reuse call
    of a 50-step schedule."""
    unet, call, kw = _build(config, batch, dtype, channels_last)
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
                unet(*call, **kw)
            handle.set_step(step)
            rec = OpRecorder()
            with rec:
                unet(*call, **kw)
            result[kind] = summarise(rec.ops, tflops, tbps)
    frkern.unpatch(unet)
    return result


def generation(config: str, policy, batch: int = 1, dtype=torch.float16, channels_last: bool = False,
               tflops: float = 757.0, tbps: float = 3.0, n: int = 50) -> dict:
    """Every call of an n-step generation, in order, recorded: {"steps": [{step, kind, gflop, mb,
    floor_us}], "gflop": sum, "full_gflop": n x the first call's, "ratio": their quotient}. The
    first call is a keyframe and runs in full (every policy's plan(0))."""
    unet, call, kw = _build(config, batch, dtype, channels_last)
    handle = frkern.patch(unet, policy, backend="torch")
    steps = []
    with torch.no_grad(), _flash_attention_model():
        handle.begin(n)
        for i in range(n):
            handle.set_step(i)
            before = dict(handle.stats)
            rec = OpRecorder()
            with rec:
                unet(*call, **kw)
            kind = next(k for k, v in handle.stats.items() if isinstance(v, int) and v != before.get(k, 0))
            total = summarise(rec.ops, tflops, tbps)["total"]
            steps.append({"step": i, "kind": kind, "gflop": total["gflop"], "mb": total["mb"],
                          "floor_us": total["floor_us"]})
    frkern.unpatch(unet)
    gflop = sum(s["gflop"] for s in steps)
    full = n * steps[0]["gflop"]
    return {"steps": steps, "gflop": round(gflop, 1), "full_gflop": round(full, 1), "ratio": round(gflop / full, 3),
            "floor_ms": round(sum(s["floor_us"] for s in steps) / 1e3, 2)}


def _stored_tensors(handle) -> list:
    """Every tensor the cache holds, as stored (an int8 / fp8 entry: its codes and its scales)."""
    from frkern.trees import iter_tensors

    cache = handle.runtime.cache
    seen, out = set(), []
    for slot in sorted({key[0] for key in cache.keys()}):
        units = {key[1] for key in cache.keys() if key[0] == slot}
        for value, _ in cache.slot_view(slot, encoded=units).values():  # as stored, not decoded
            for t in iter_tensors(value):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


@contextlib.contextmanager
def _decode_model():
    """frkern's cache decodes as the Triton backend runs them, recorded by the current
    CacheReadRecorder: in the consumer (norm2's prologue, `input + branch`), which reads the stored
    bytes in place of a decoded tensor (a stand-in of the decoded shape, no op of its own); or a
    pass of its own (read stored, write decoded: "cache decode (model)", one op)."""
    from frkern import ops

    originals = {name: getattr(ops, name) for name in ("group_norm_act", "dequantize_add", "dequantize_cache")}

    def recorder():
        mode = torch.utils._python_dispatch._get_current_dispatch_mode()
        return mode if isinstance(mode, CacheReadRecorder) else None

    def stand_in(q, scale, dtype):
        rec = recorder()
        if rec is None:
            return torch.empty(q.shape, dtype=dtype, device=q.device)
        return rec.stand_in(q, scale, dtype, in_consumer=True)

    def group_norm_act(x, norm, *, x_scale=None, x_group_size=64, x_dtype=None, **kwargs):
        if x_scale is not None:
            x = stand_in(x, x_scale, x_dtype)
        return originals["group_norm_act"](x, norm, **kwargs)

    def dequantize_add(x, q, scale, group_size, *, backend="auto"):
        return x + stand_in(q, scale, x.dtype)

    def dequantize_cache(q, scale, dtype, group_size, *, backend="auto"):
        rec = recorder()
        if rec is None:
            return torch.empty(q.shape, dtype=dtype, device=q.device)
        out = rec.stand_in(q, scale, dtype, in_consumer=False)
        rec.decode_passes += 1
        nbytes = sum(t.numel() * t.element_size() for t in (q, scale, out))
        rec.ops.append(("elementwise", "cache decode (model)", 0, nbytes))
        return out

    try:
        ops.group_norm_act, ops.dequantize_add, ops.dequantize_cache = (group_norm_act, dequantize_add,
                                                                        dequantize_cache)
        yield
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)


def reuse_by_cache_format(config: str, policy, formats=tuple(CACHE_FORMATS), batch: int = 1, dtype=torch.float16,
                          channels_last: bool = False, tflops: float = 757.0, tbps: float = 3.0) -> list[dict]:
    """Per cache format, the first reuse call of a 50-step schedule (anatomy()'s): what it reads
    from the cache (stored bytes, scales included, each stored tensor once), the whole cache after
    the keyframe, and the call's ops, bytes and floor with the decodes modelled as the Triton
    backend runs them (the module docstring). [] when the policy has no reuse call."""
    n = 50
    plans = policy.schedule(n)
    reuse = next((i for i, p in enumerate(plans) if not p.keyframe and p.runs_network), None)
    if reuse is None:
        return []
    unet, call, kw = _build(config, batch, dtype, channels_last)
    rows = []
    for name in formats:
        handle = frkern.patch(unet, policy, backend="torch", cache=frkern.CacheFormat(*CACHE_FORMATS[name]))
        try:
            with torch.no_grad(), _flash_attention_model(), _decode_model():
                handle.begin(n)
                handle.set_step(max(i for i in range(reuse) if plans[i].keyframe))
                unet(*call, **kw)
                stored = handle.cache_bytes
                rec = CacheReadRecorder(_stored_tensors(handle))
                handle.set_step(reuse)
                with rec:
                    unet(*call, **kw)
                if handle.stats.get("reuse") != 1:
                    raise RuntimeError(f"step_anatomy: cache {name}: the reuse step was not a reuse call "
                                       f"({dict(handle.stats)})")
        finally:
            frkern.unpatch(unet)
        total = summarise(rec.ops, tflops, tbps)["total"]
        rows.append({"format": name, "cache_read_mb": round(rec.nbytes(rec.read) / 1e6, 2),
                     "used_mb": round(rec.nbytes(rec.used) / 1e6, 2), "stored_mb": round(stored / 1e6, 2),
                     "decode_passes": rec.decode_passes,
                     "ops": total["ops"], "mb": total["mb"], "floor_us": total["floor_us"]})
    base = rows[0]["cache_read_mb"] if rows and rows[0]["format"] == "model" else None
    for r in rows:
        r["read_over_model"] = round(r["cache_read_mb"] / base, 3) if base else None
    return rows


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    quiet_known_warnings()
    policy = check_spec(ap, args).policy
    res = anatomy(args.config, policy, args.batch, channels_last=args.channels_last,
                  tflops=args.tflops, tbps=args.tbps)
    by_format = reuse_by_cache_format(args.config, policy, args.cache_formats, args.batch,
                                      channels_last=args.channels_last, tflops=args.tflops, tbps=args.tbps)
    lines = [f"# step anatomy (estimate from op shapes, not a measurement): {args.config}, {args.policy}, "
             f"fp16, UNet batch {2 * args.batch}, floors at {args.tflops} TFLOP/s and {args.tbps} TB/s", ""]
    for step, rows in res.items():
        lines += [f"## {step} call", "", "| op kind | ops (eager launches) | GFLOP | MB read+written | floor us |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {r['ops']} | {r['gflop']:.1f} | {r['mb']:.0f} | {r['floor_us']:.0f} |"
                  for k, r in rows.items() if k != "top_ops"]
        lines += ["", "largest floors by op: " + ", ".join(
            f"{o['op']} x{o['count']} {o['floor_us']:.0f} us" for o in rows["top_ops"]), ""]
    if by_format:
        lines += ["## reuse call by cache format", "",
                  "cache read: the stored bytes (scales included) the reuse call reads from the cache, each stored "
                  "tensor once; used: those of the stored tensors whose values an op of the call uses (a decoded "
                  "copy no op reads is read, not used); stored: the whole cache after the keyframe "
                  "(handle.cache_bytes). Totals with the decodes as the Triton backend runs them: a ResNet's "
                  "conv1 output and a residual branch read at their stored bytes by their consumer (norm2's "
                  "prologue, input + branch), any other cached tensor decoded by a pass of its own (decode "
                  "passes). model: the reuse call above. MB: 1e6 bytes.", "",
                  "| cache format | cache read MB | vs model | used MB | stored MB | decode passes | ops "
                  "| MB read+written | floor us |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['format']} | {r['cache_read_mb']:.1f} | "
                  + (f"{r['read_over_model']:.3f}" if r["read_over_model"] is not None else "-")
                  + f" | {r['used_mb']:.1f} | {r['stored_mb']:.1f} | {r['decode_passes']} | {r['ops']} | "
                  f"{r['mb']:.0f} | {r['floor_us']:.0f} |" for r in by_format]
        lines += [""]
    gen = None
    if args.generation:
        gen = generation(args.config, policy, args.batch, channels_last=args.channels_last, tflops=args.tflops,
                         tbps=args.tbps)
        runs, prev = [], None
        for s in gen["steps"]:  # consecutive steps of one cost, as one line
            key = (s["kind"], s["gflop"], s["floor_us"])
            if prev is not None and key == prev[0]:
                prev[2] = s["step"]
            else:
                prev = [key, s["step"], s["step"]]
                runs.append(prev)
        lines += ["## a whole 50-step generation", "",
                  f"GFLOP {gen['gflop']} against {gen['full_gflop']} for 50 full calls: ratio {gen['ratio']}; "
                  f"sum of floors {gen['floor_ms']} ms.", "",
                  "| steps | kind | GFLOP per call | floor us per call |", "|---|---|---|---|"]
        lines += [f"| {a}{'' if a == b else f'-{b}'} | {k} | {g:.1f} | {f:.0f} |" for (k, g, f), a, b in runs]
        lines += [""]
    text = "\n".join(lines)
    print(text)
    name = f"anatomy_{args.config}_{policy.name}"
    record = {"kind": "analytical estimate from op shapes (meta device), not a measurement",
              "tflops": args.tflops, "tbps": args.tbps, "result": res}
    if by_format:
        record["reuse_by_cache_format"] = by_format
    if gen is not None:
        record["generation"] = gen
    save_json(args.out, name, record)
    stem = os.path.join(args.out, name)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return res


if __name__ == "__main__":
    main()
