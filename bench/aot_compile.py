"""Ahead-of-time compile check: every Triton kernel of kernels/ built by Triton's own compiler for
Hopper (sm_90) and Ampere (sm_80), on any machine, without a GPU.

    python bench/aot_compile.py [--set full|test] [--families ...] [--targets 90 80] [--out DIR]

What is compiled is what would launch: each launcher of kernels/ (group_norm_act_triton, also
decoding or encoding the cache, geglu_triton, score_mix_triton, skip_conv_triton, quantize_triton /
dequantize_triton / dequantize_add_triton) is called on meta tensors (shapes and strides,
no data) with a `launch` wrapper that records every kernel launch instead of running it; each
recorded launch is specialised by Triton's own binder (the code JITFunction.run runs: integer
arguments equal to 1 become constants, arguments and pointers divisible by 16 get the
tt.divisibility hint; pointers are taken 16-byte aligned, as fresh CUDA allocations are) and built
with triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc,
32)) for each target, through ptxas to a cubin. Launches that specialise identically are built once.
Configurations (--set full, about 400 builds, 7 minutes on one core): SD1.5 at 512x512 (latents
64x64 to 8x8) and SDXL at 1024x1024 (128x128 to 32x32):
- GroupNorm + SiLU (plain, as norm1; + per-channel time embedding, as on FR reuse steps), 32
  groups: every ResNet channel count (320, 640, 960, 1280, 1920, 2560) in fp16 and bf16, NCHW and
  channels_last, at its largest SD1.5 map; every (channels, map) pair of SD1.5 and SDXL (they
  change the chunking) in fp16, both formats, + time embedding;
- GEGLU at the feed-forward inner widths (1280, 2560, 5120), fp16 and bf16;
- score mixing of the UNet's output, fp16, bf16 and fp32;
- Skip-Convolution (gate sums, gate decide/copy, tile-predicated conv), tile 8, NCHW and
  channels_last: every 3x3 ResNet convolution and 1x1 shortcut of SD1.5 in fp16, three of each in
  bf16 and fp32.
`--set test` is the subset tests/test_aot_compile.py compiles (every kernel, both targets, every
GroupNorm channel count in both formats; under a minute on one core). Only the test set has the
cache codec's fused variants: GroupNorm decoding an int8 and an fp8 cache and encoding int8 (sm_90),
and the decode-and-add of a transformer branch (fp16, both targets).

Per specialisation it records registers per thread, spill stores/loads and stack (ptxas -v, as
Triton runs it; registers also read back from the cubin's ELF, where the driver finds them), shared memory (Triton's metadata), and the global loads in the PTX: all of them and
the hot ones (the big-tensor loads, found by their source line through the PTX's .loc directives),
by width: scalar, ld.global.b32 of two 16-bit elements, ld.global.v2 / .v4 (and cp.async copies
on pipelined loops, by bytes). A hot load is vectorised when one instruction moves at least two
elements (an ld.global.b32 of two fp16 counts: channels_last GroupNorm at 320 and 960 channels can
do no better, as a group's channels start at a multiple of 10 or 30 elements). It fails (exit
status 1, the reasons listed under "problems" in the JSON) on a compile error, more than 255
registers per thread, shared memory over the target's per-block limit (sm_90: 227 KiB, sm_80:
163 KiB), or spills over --spill-budget bytes (KNOWN_SPILLS below states the known exceptions).
Writes aot_<triton version>.json to --out. Nothing is cached across runs: Triton's cache goes to
a temporary folder removed at the end. TRITON_INTERPRET is ignored (removed before Triton loads):
the interpreter would replace the kernels by interpreted functions.

Under another Triton (the H200 image has Triton 3.6), from the repository root, in a second venv
that reuses this checkout's .venv for torch (no second torch download):
    .venv/bin/python -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > "$(/tmp/t36/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz_frkern.pth"
    /tmp/t36/bin/python bench/aot_compile.py --out bench/results      # writes aot_3.6.0.json
(the .pth file appends .venv's site-packages after the new venv's own, so Triton 3.6 wins and
torch comes from .venv). Or, self-contained: pip install triton==3.6.0 torch --index-url
https://download.pytorch.org/whl/cpu into the new venv (a CPU torch is enough).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import REPO_ROOT, add_out  # noqa: E402
from options import parser as new_parser  # noqa: E402

TARGET_LIMITS = {  # per-thread registers, per-block shared memory (bytes)
    90: {"regs": 255, "shared": 227 * 1024},
    80: {"regs": 255, "shared": 163 * 1024},
}
FAMILIES = ("group_norm", "geglu", "score_mix", "skip_conv", "quant_cache")
SPILL_BUDGET = 0  # bytes of spill stores + loads per kernel (default of --spill-budget)
# Known spills, stated with their budget (bytes of stores + loads) until the kernel is fixed:
# (kernel, target, I/O dtype) -> budget.
KNOWN_SPILLS = {
    # fp32 SkipConv tile convolution for sm_80 (exact fp32 tl.dot, a 64x64 fp32 accumulator) under
    # Triton 3.9 (ptxas 12.9): 0.2-0.6 KB of spills with channels_last tensors, ~20 KB with NCHW
    # ones (it then keeps 32 registers). Triton 3.6 (ptxas 12.8) and sm_90 build it without spills.
    # Found by this check; kernels/skip_conv.py to fix.
    ("_skip_conv_kernel", "sm_80", "float32"): 20 * 1024,
}

# Source lines whose tl.load moves the big tensors (the rest load per-channel vectors, partial
# statistics or masks): (kernel module, text that starts the line after indentation).
HOT_LOADS = {
    "group_norm": ("x = tl.load(x_ptr", "a = tl.load(add_ptr"),
    "geglu": ("h = tl.load(x_ptr", "g = tl.load(x_ptr"),
    "score_mix": ("fr = tl.load(fr_ptr", "key = tl.load(key_ptr"),
    "skip_conv": ("xv = tl.load(x_ptr", "rv = tl.load(r_ptr", "a = tl.load(r_pix", "b = tl.load(w_co"),
    "quant_cache": ("v = tl.load(x_ptr", "q = tl.load(q_ptr", "xv = tl.load(x_ptr"),
}


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--set", default="full", choices=["full", "test"],
                    help="configurations: every SD1.5/SDXL one (full) or the test suite's subset (test)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                    help="kernel families to compile")
    ap.add_argument("--targets", type=int, nargs="+", default=[90, 80], choices=sorted(TARGET_LIMITS),
                    help="CUDA compute capabilities to compile for")
    ap.add_argument("--spill-budget", type=int, default=SPILL_BUDGET,
                    help="largest spill stores + loads (bytes) a kernel may have")
    add_out(ap, "aot_<triton version>.json")
    return ap


# ----------------------------------------------------------------------------- configurations
# SD1.5 at 512x512: (channels, latent side) of every ResNet norm (norm1 on the block input, norm2
# on its output; up blocks concatenate the skip connection: 2560, 1920, 960).
SD15_GN = sorted({(320, 64), (320, 32), (640, 32), (640, 16), (1280, 16), (1280, 8), (2560, 8),
                  (2560, 16), (1920, 16), (1920, 32), (1280, 32), (960, 32), (960, 64), (640, 64)})
# SDXL at 1024x1024 (latents 128x128; three levels)
SDXL_GN = sorted({(320, 128), (320, 64), (640, 64), (640, 32), (1280, 32), (2560, 32), (1920, 32),
                  (1920, 64), (1280, 64), (960, 64), (960, 128), (640, 128)})
GN_CHANNELS = (320, 640, 960, 1280, 1920, 2560)
# (name, tokens, inner width): GEGLU of the transformer feed-forwards (batch 2)
GEGLU = [("sd15 64x64", 2 * 4096, 1280), ("sd15 32x32", 2 * 1024, 2560), ("sd15 16x16", 2 * 256, 5120),
         ("sdxl 64x64", 2 * 4096, 2560), ("sdxl 32x32", 2 * 1024, 5120)]
# SkipConv at SD1.5's ResNet convolutions: (cin, cout, side, kernel size)
SD15_CONV3 = [(320, 320, 64), (320, 640, 32), (640, 640, 32), (640, 1280, 16), (1280, 1280, 16), (1280, 1280, 8),
              (2560, 1280, 8), (2560, 1280, 16), (1920, 1280, 16), (1920, 640, 32), (1280, 640, 32),
              (960, 640, 32), (960, 320, 64), (640, 320, 64)]
SD15_CONV1 = [(320, 640, 32), (640, 1280, 16), (2560, 1280, 8), (2560, 1280, 16), (1920, 1280, 16),
              (1920, 640, 32), (1280, 640, 32), (960, 640, 32), (960, 320, 64), (640, 320, 64)]
SKIP_TILE = 8


def configurations(which: str):
    """[(family, config dict, thunk(torch, kernels, launch) that calls the launcher)]. A config's
    "targets" (test set only) limits the compute capabilities it is built for."""
    out = []
    test = which == "test"

    def add(family, cfg, call, targets=None):
        if targets is not None:
            cfg["targets"] = list(targets)
        out.append((family, cfg, call))

    def gn(model, C, side, dtype, fmt, chan, targets=None, decode=None, encode=None):
        """decode: x is the cache's q in this format (NCHW, channel scales), decoded to dtype in the
        prologue; encode: the raw x also encoded to this format (channel scales)."""
        def call(torch, k, launch):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            dt = getattr(torch, dtype)
            w = torch.empty(C, device="meta", dtype=dt)
            t = torch.empty(2, C, device="meta", dtype=dt) if chan else None
            codec = {"quantize": (encode, "channel", 64)} if encode else {}
            if decode:
                x = torch.empty(2, C, side, side, device="meta", dtype=k.quant_cache.STORAGE[decode])
                codec = {"x_scale": torch.empty(2, C, 1, device="meta", dtype=torch.float32), "x_dtype": dt}
            else:
                x = torch.empty(2, C, side, side, device="meta", dtype=dt).contiguous(memory_format=mf)
            k.group_norm.group_norm_act_triton(x, w, w, 32, 1e-5, None, t, True, launch=launch, **codec)
        op = ("GN+SiLU" + (" + temb" if chan else "") + (f" of {decode} x (decoded)" if decode else "")
              + (f", {encode} encode" if encode else ""))
        add("group_norm", {"model": model, "shape": [2, C, side, side], "groups": 32, "dtype": dtype, "format": fmt,
                           "op": op}, call, targets)

    def geglu(name, tokens, inner, dtype, targets=None):
        def call(torch, k, launch):
            x = torch.empty(tokens, 2 * inner, device="meta", dtype=getattr(torch, dtype))
            k.geglu.geglu_triton(x, launch=launch)
        add("geglu", {"model": name.split()[0], "shape": [tokens, 2 * inner], "dtype": dtype,
                      "op": f"GEGLU {name}"}, call, targets)

    def mix(model, shape, dtype, targets=None):
        def call(torch, k, launch):
            a = torch.empty(shape, device="meta", dtype=getattr(torch, dtype))
            k.score_mix.score_mix_triton(a, torch.empty_like(a), 0.3, launch=launch)
        add("score_mix", {"model": model, "shape": shape, "dtype": dtype, "op": "score mix"}, call, targets)

    def conv(ci, co, side, ks, dtype, fmt, targets=None):
        def call(torch, k, launch):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            dt = getattr(torch, dtype)
            x = torch.empty(2, ci, side, side, device="meta", dtype=dt).contiguous(memory_format=mf)
            z = torch.empty(2, co, side, side, device="meta", dtype=dt).contiguous(memory_format=mf)
            w = torch.empty(co, ci, ks, ks, device="meta", dtype=dt)
            b = torch.empty(co, device="meta", dtype=dt)
            k.skip_conv.skip_conv_triton(x, torch.empty_like(x), z, w, b, SKIP_TILE, 0.1, ks // 2, launch=launch)
        add("skip_conv", {"model": "sd15", "shape": [2, ci, side, side], "cout": co, "kernel": ks,
                          "tile": SKIP_TILE, "dtype": dtype, "format": fmt, "op": f"SkipConv {ks}x{ks}"}, call, targets)

    def quant(model, C, side, dtype, fmt, targets=None):
        def call(torch, k, launch):
            dt = getattr(torch, dtype)
            x = torch.empty(2, C, side, side, device="meta", dtype=dt)
            q, scale = k.quant_cache.quantize_triton(x, fmt, launch=launch)
            k.quant_cache.dequantize_triton(q, scale, dt, launch=launch)
        add("quant_cache", {"model": model, "shape": [2, C, side, side], "dtype": dtype, "format": fmt,
                            "op": f"cache {fmt} encode + decode"}, call, targets)

    def quant_add(model, shape, dtype, fmt, targets=None):
        def call(torch, k, launch):
            x = torch.empty(shape, device="meta", dtype=getattr(torch, dtype))
            q = torch.empty(shape, device="meta", dtype=k.quant_cache.STORAGE[fmt])
            scale = torch.empty(*shape[:2], 1, device="meta", dtype=torch.float32)
            k.quant_cache.dequantize_add_triton(x, q, scale, launch=launch)
        add("quant_cache", {"model": model, "shape": list(shape), "dtype": dtype, "format": fmt,
                            "op": f"hidden + cached branch ({fmt} decode + add)"}, call, targets)

    if test:
        quant("sd15", 320, 64, "float16", "int8")
        quant("sd15", 1280, 16, "bfloat16", "fp8_e4m3", targets=(90,))
        # GroupNorm: every channel count in channels_last (sm_90; sm_80 too at 320 and 1920), at an
        # SD1.5 size where it occurs, fp16 and bf16, plain and +temb (the first two: where it
        # spilled before, 320 under Triton 3.6, 640 at 64x64 under 3.9); NCHW at two counts
        for C, side, dtype, chan in ((320, 64, "float16", True), (640, 64, "float16", False),
                                     (960, 32, "bfloat16", True), (1280, 16, "bfloat16", False),
                                     (1920, 16, "float16", True), (2560, 8, "bfloat16", True)):
            gn("sd15", C, side, dtype, "channels_last", chan, targets=(90, 80) if C in (320, 1920) else (90,))
        gn("sd15", 320, 64, "float16", "nchw", chan=False)
        gn("sd15", 1280, 16, "bfloat16", "nchw", chan=True, targets=(90,))
        # the cache codec fused into GroupNorm: a reuse step's decode of the cached conv1 output
        # (+ temb, int8 and fp8), a keyframe's encode; and the transformer branch's decode-and-add
        gn("sd15", 320, 64, "float16", "nchw", chan=True, targets=(90,), decode="int8")
        gn("sd15", 640, 32, "bfloat16", "nchw", chan=True, targets=(90,), decode="fp8_e4m3")
        gn("sd15", 320, 64, "float16", "channels_last", chan=True, targets=(90,), encode="int8")
        quant_add("sd15", (2, 4096, 320), "float16", "int8")
        geglu(*GEGLU[0], "float16")
        mix("sd15", [2, 4, 64, 64], "bfloat16")
        conv(320, 320, 64, 3, "float16", "channels_last")
        conv(1280, 640, 32, 1, "float32", "nchw", targets=(80,))  # sm_80's known fp32 spills
        return out
    # GroupNorm: every channel count in fp16/bf16 x NCHW/channels_last x plain/+temb at its largest
    # SD1.5 map; then every (channels, map) pair of SD1.5 and SDXL (they change the chunking:
    # chunks per group, the merge width) in fp16, both formats, +temb (the FR reuse step)
    largest = {C: max(side for c, side in SD15_GN if c == C) for C in GN_CHANNELS}
    for C in GN_CHANNELS:
        for dtype in ("float16", "bfloat16"):
            for fmt in ("nchw", "channels_last"):
                for chan in (False, True):
                    gn("sd15", C, largest[C], dtype, fmt, chan)
    for model, pairs in (("sd15", SD15_GN), ("sdxl", SDXL_GN)):
        for C, side in pairs:
            for fmt in ("nchw", "channels_last"):
                gn(model, C, side, "float16", fmt, True)
    for name, tokens, inner in GEGLU:
        for dtype in ("float16", "bfloat16"):
            geglu(name, tokens, inner, dtype)
    for model, shape in (("sd15", [2, 4, 64, 64]), ("sdxl", [2, 4, 128, 128])):
        for dtype in ("float16", "bfloat16", "float32"):
            mix(model, shape, dtype)
    # SkipConv: every 3x3 ResNet convolution and 1x1 shortcut of SD1.5 in fp16, both formats; bf16
    # and fp32 at three of each (the kernel's blocks are the same at every SD shape; the gate's
    # reduction width and the divisibility of sizes change)
    # the cache codec at every (channels, map) pair of SD1.5's ResNets, int8 and fp8, fp16 and bf16
    for C, side in SD15_GN:
        for dtype in ("float16", "bfloat16"):
            for fmt in ("int8", "fp8_e4m3"):
                quant("sd15", C, side, dtype, fmt)
    for shapes, ks, few in ((SD15_CONV3, 3, SD15_CONV3[:1] + SD15_CONV3[2:3] + SD15_CONV3[4:5]),
                            (SD15_CONV1, 1, SD15_CONV1[:2] + SD15_CONV1[6:7])):
        for dtype in ("float16", "bfloat16", "float32"):
            for ci, co, side in shapes if dtype == "float16" else few:
                for fmt in ("nchw", "channels_last"):
                    conv(ci, co, side, ks, dtype, fmt)
    return out


# ----------------------------------------------------------------------------- PTX / cubin reading
def _hot_lines(module) -> set:
    """(file, line) of the hot tl.load calls of a kernel module."""
    path = os.path.realpath(module.__file__)
    with open(path) as f:
        lines = f.read().splitlines()
    family = module.__name__.rsplit(".", 1)[-1]
    found = set()
    for marker in HOT_LOADS[family]:
        hits = [i + 1 for i, line in enumerate(lines) if line.strip().startswith(marker)]
        if not hits:
            raise RuntimeError(f"bench/aot_compile.py: no line of {path} starts with {marker!r} (update HOT_LOADS)")
        found.update((path, n) for n in hits)
    return found


def read_loads(ptx: str, hot: set, elem_bytes: int) -> dict:
    """Global loads of the PTX by width; those at a hot source line separately."""
    import re

    files = {m.group(1): os.path.realpath(m.group(2)) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    loc, in_asm = None, False
    rows = []
    for line in ptx.splitlines():
        s = line.strip()
        # A load is Triton's inline asm; the .loc directives inside the block are artefacts (one
        # per asm line, counting up), the one before "begin inline asm" is the load's source line.
        if s.startswith("// begin inline asm"):
            in_asm = True
            continue
        if s.startswith("// end inline asm"):
            in_asm = False
            continue
        m = re.match(r"\.loc\s+(\d+)\s+(\d+)", s)
        if m:
            if not in_asm:
                loc = (m.group(1), int(m.group(2)))
            continue
        m = re.search(r"\bld\.global((?:\.[a-z0-9:_]+)*?)(?:\.v(\d))?\.b(\d+)\s", s)
        if m:
            nbytes = int(m.group(2) or 1) * int(m.group(3)) // 8
            rows.append(("v" + m.group(2) if m.group(2) else "scalar", nbytes, loc))
            continue
        m = re.search(r"\bcp\.async\.\w+\.shared\.global\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", s)
        if m:
            rows.append(("cp.async", int(m.group(1), 0), loc))

    def summary(sel):
        kinds, widths = {}, {}
        for kind, nbytes, _ in sel:
            kinds[kind] = kinds.get(kind, 0) + 1
            widths[str(nbytes)] = widths.get(str(nbytes), 0) + 1
        return {"count": len(sel), "by_kind": kinds, "by_bytes": dict(sorted(widths.items(), key=lambda kv: int(kv[0])))}

    hot_rows = [r for r in rows if r[2] is not None and (files.get(r[2][0]), r[2][1]) in hot]
    hot = summary(hot_rows)
    if hot_rows:
        hot["min_bytes"] = min(r[1] for r in hot_rows)
        hot["min_elements"] = hot["min_bytes"] // elem_bytes
        hot["vectorised"] = hot["min_elements"] >= 2
    return {"all": summary(rows), "hot": hot}


def cubin_registers(cubin: bytes, name: str):
    """Registers per thread from the cubin, the value the driver reports as
    CU_FUNC_ATTRIBUTE_NUM_REGS: the EIATTR_REGCOUNT record of .nv.info for the kernel's symbol, or
    (older cubins) bits 24-31 of the sh_info of section .text.<name>."""
    import struct

    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        return None
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstr(table, off):
        return table[off:table.index(b"\0", off)].decode()

    shstr = cubin[sections[shstrndx][4]:sections[shstrndx][4] + sections[shstrndx][5]]
    by_name = {cstr(shstr, sec[0]): sec for sec in sections}
    symtab, sym_index = by_name.get(".symtab"), None
    if symtab is not None:
        strtab = sections[symtab[6]]
        strs = cubin[strtab[4]:strtab[4] + strtab[5]]
        for i in range(symtab[5] // 24):
            if cstr(strs, struct.unpack_from("<I", cubin, symtab[4] + 24 * i)[0]) == name:
                sym_index = i
    info = by_name.get(".nv.info")
    if info is not None and sym_index is not None:
        data, i = cubin[info[4]:info[4] + info[5]], 0
        while i + 2 <= len(data):
            fmt, attr = data[i], data[i + 1]
            if fmt == 4:  # EIFMT_SVAL: u16 size, payload
                size, = struct.unpack_from("<H", data, i + 2)
                if attr == 0x2F and size == 8 and struct.unpack_from("<I", data, i + 4)[0] == sym_index:
                    return struct.unpack_from("<I", data, i + 8)[0]  # EIATTR_REGCOUNT
                i += 4 + size
            else:  # EIFMT_NVAL (no payload), EIFMT_HVAL (u16)
                i += 4 if fmt == 3 else 2
    text = by_name.get(".text." + name)
    return (text[7] >> 24) or None if text is not None else None


def read_ptxas_log(log: str) -> dict:
    import re

    out = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack_bytes"], out["spill_store_bytes"], out["spill_load_bytes"] = map(int, m.groups())
    return out


# ----------------------------------------------------------------------------- compiling
class Recorder:
    """launch= wrapper that records (kernel, args, kwargs) instead of launching."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    rec.calls.append((kernel, grid, args, kwargs))
                return run
        return _Grid()


def specialise(kernel, args, kwargs, target):
    """What JITFunction.run hands to compile(): (options, signature, constexprs, attrs)."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # newer Tritons pass these too
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def compile_kernel(kernel, options, signature, constexprs, attrs, target, hot, elem_bytes):
    import contextlib
    import io
    import time

    import triton
    from triton.compiler import ASTSource

    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v printed by Triton
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    md = ck.metadata
    rec = {"kernel": kernel.fn.__name__, "target": f"sm_{target.arch}", "num_warps": md.num_warps,
           "num_stages": md.num_stages, "shared_bytes": md.shared, **read_ptxas_log(log.getvalue())}
    cubin_regs = cubin_registers(ck.asm["cubin"], md.name)
    if cubin_regs is not None and rec.get("regs") is not None and cubin_regs != rec["regs"]:
        raise RuntimeError(f"{md.name}: ptxas says {rec['regs']} registers, the cubin {cubin_regs}")
    rec.setdefault("regs", cubin_regs)
    rec["loads"] = read_loads(ck.asm["ptx"], hot, elem_bytes)
    rec["compile_s"] = round(seconds, 2)
    const = {}
    for key, value in constexprs.items():
        idx = key[0] if isinstance(key, tuple) else key
        const[kernel.arg_names[idx] if isinstance(idx, int) else idx] = value
    rec["constexprs"] = const
    rec["divisible_by_16"] = sorted(kernel.arg_names[k[0]] for k, v in attrs.items()
                                    if any(a[0] == "tt.divisibility" for a in v))
    return rec


def spill_budget(rec: dict, default: int) -> int:
    """Spill bytes a compiled kernel may have: --spill-budget, or its KNOWN_SPILLS entry."""
    return max(default, KNOWN_SPILLS.get((rec["kernel"], rec["target"], rec.get("dtype")), 0))


def check(rec: dict, default_budget: int) -> list:
    lim = TARGET_LIMITS[int(rec["target"][3:])]
    bad = []
    if rec.get("regs") is None or rec["regs"] > lim["regs"]:
        bad.append(f"registers {rec.get('regs')} > {lim['regs']}")
    if rec["shared_bytes"] > lim["shared"]:
        bad.append(f"shared memory {rec['shared_bytes']} B > {lim['shared']} B")
    spills = rec.get("spill_store_bytes", 0) + rec.get("spill_load_bytes", 0)
    budget = spill_budget(rec, default_budget)
    if "spill_store_bytes" not in rec or spills > budget:
        bad.append(f"spills {spills if 'spill_store_bytes' in rec else 'unknown'} B > budget {budget} B")
    return bad


def main(argv=None):
    args = parser().parse_args(argv)
    import shutil
    import signal
    import tempfile
    import warnings

    # Before Triton loads: real compiler (no interpreter), a throw-away cache, ptxas -v printed.
    os.environ.pop("TRITON_INTERPRET", None)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # cache removed on kill
    cache = tempfile.mkdtemp(prefix="frkern_aot_")
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_DISABLE_LINE_INFO", None)  # .loc directives find the hot loads
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    sys.path.insert(0, REPO_ROOT)
    try:
        return _run(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run(args):
    import time

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    import kernels.geglu
    import kernels.group_norm
    import kernels.quant_cache
    import kernels.score_mix
    import kernels.skip_conv
    from record import provenance

    mods = {m.__name__.rsplit(".", 1)[-1]: m for m in (kernels.group_norm, kernels.geglu, kernels.score_mix,
                                                        kernels.skip_conv, kernels.quant_cache)}
    for m in mods.values():
        if m.triton is None:
            sys.exit("bench/aot_compile.py: triton is not installed")
    hot = {name: _hot_lines(m) for name, m in mods.items()}
    elem = {"float16": 2, "bfloat16": 2, "float32": 4}
    t_start = time.perf_counter()
    specs, index, variants, problems = [], {}, [], []
    for family, cfg, call in configurations(args.set):
        if family not in args.families:
            continue
        rec = Recorder()
        cfg = dict(cfg)
        dtype = cfg["dtype"]
        call(torch, kernels, rec)  # the real launcher, launches recorded
        launched = []
        for kernel, grid, kargs, kwargs in rec.calls:
            for cc in [cc for cc in args.targets if cc in cfg.get("targets", args.targets)]:
                target = GPUTarget("cuda", cc, 32)
                try:
                    options, signature, constexprs, attrs = specialise(kernel, kargs, kwargs, target)
                    key = repr((kernel.fn.__name__, cc, sorted(signature.items()), sorted(constexprs.items()),
                                sorted((k, repr(v)) for k, v in attrs.items()), sorted(options.__dict__.items())))
                    if key not in index:
                        r = compile_kernel(kernel, options, signature, constexprs, attrs, target, hot[family],
                                           elem[dtype])
                        r["id"] = len(specs)
                        r["dtype"] = dtype  # the I/O dtype (the signature's pointer types)
                        r["problems"] = check(r, args.spill_budget)
                        index[key] = r["id"]
                        specs.append(r)
                        for p in r["problems"]:
                            problems.append(f"{r['kernel']} {r['target']} (spec {r['id']}, {cfg['op']} "
                                            f"{cfg['shape']} {dtype} {cfg.get('format', '')}): {p}")
                        print(f"[{r['id']:3d}] {r['kernel']:<26} {r['target']} regs {r['regs']:3d} "
                              f"spill {r.get('spill_store_bytes', '?')}/{r.get('spill_load_bytes', '?')} B "
                              f"smem {r['shared_bytes']:6d} B  hot loads {r['loads']['hot'].get('by_bytes')} "
                              f"{r['compile_s']:.1f}s  {cfg['op']} {cfg['shape']} {dtype} {cfg.get('format', '')}",
                              flush=True)
                    launched.append({"kernel": kernel.fn.__name__, "target": f"sm_{cc}", "spec": index[key],
                                     "grid": list(grid)})
                except Exception as e:  # a compile error: recorded, the run goes on
                    msg = f"{kernel.fn.__name__} sm_{cc} ({cfg['op']} {cfg['shape']} {dtype}): " \
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    problems.append(msg)
                    launched.append({"kernel": kernel.fn.__name__, "target": f"sm_{cc}", "error": msg})
                    print("FAILED", msg, flush=True)
        variants.append({"family": family, "config": cfg, "launches": launched})
    seconds = time.perf_counter() - t_start
    summary = summarise(specs, variants)
    version = triton.__version__
    path = os.path.join(args.out, f"aot_{version}.json")
    write_record(path, {**provenance(), "set": args.set, "families": list(args.families), "targets": [f"sm_{cc}" for cc in args.targets],
        "limits": {f"sm_{cc}": TARGET_LIMITS[cc] for cc in args.targets}, "spill_budget_bytes": args.spill_budget,
        "known_spills": [{"kernel": k, "target": t, "dtype": d, "budget_bytes": b} for (k, t, d), b in KNOWN_SPILLS.items()],
        "ptxas": {f"sm_{cc}": _ptxas_version(cc) for cc in args.targets},
        "seconds": round(seconds, 1), "compiles": len(specs), "launches": sum(len(v["launches"]) for v in variants),
        "problems": problems, "summary": summary, "specializations": specs, "variants": variants})
    print(f"{len(specs)} specialisations compiled for {len(variants)} configurations in {seconds:.1f} s "
          f"(Triton {version}); {len(problems)} problems")
    for p in problems:
        print("PROBLEM", p)
    print(f"wrote {path}")
    if problems:
        sys.exit(1)
    return path


def write_record(path: str, record: dict) -> None:
    """JSON with one line per summary row, specialisation and variant (diffable, a third of the
    size of an indented dump)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines, items = ["{"], list(record.items())
    for i, (key, value) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            lines.append(f" {json.dumps(key)}: [")
            lines += ["  " + json.dumps(x, separators=(",", ":"), default=str) + ("," if j < len(value) - 1 else "")
                      for j, x in enumerate(value)]
            lines.append(" ]" + end)
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, default=str)}{end}")
    with open(path, "w") as f:
        f.write("\n".join(lines + ["}"]) + "\n")


def _ptxas_version(cc: int):
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        try:
            text = get_ptxas_version(cc)
        except TypeError:  # older Tritons: one ptxas for every target
            text = get_ptxas_version()
        return text.strip().splitlines()[-1]
    except Exception:
        return None


def summarise(specs, variants) -> list:
    """One row per (family, kernel, target, format, dtype): ranges of registers, spills, shared
    memory, and how many of its specialisations have vectorised hot loads (and their widths)."""
    rows = {}
    by_id = {s["id"]: s for s in specs}
    for v in variants:
        for launch in v["launches"]:
            if "spec" not in launch:
                continue
            s = by_id[launch["spec"]]
            key = (v["family"], s["kernel"], s["target"], v["config"].get("format", "-"), v["config"]["dtype"])
            rows.setdefault(key, {})[s["id"]] = s
    out = []
    for (family, kernel, target, fmt, dtype), ss in sorted(rows.items()):
        ss = list(ss.values())
        hot = [s["loads"]["hot"] for s in ss]
        out.append({
            "family": family, "kernel": kernel, "target": target, "format": fmt, "dtype": dtype,
            "specializations": len(ss),
            "regs": [min(s["regs"] for s in ss), max(s["regs"] for s in ss)],
            "spill_bytes_max": max(s.get("spill_store_bytes", 0) + s.get("spill_load_bytes", 0) for s in ss),
            "shared_bytes_max": max(s["shared_bytes"] for s in ss),
            "hot_vectorised": f"{sum(bool(h.get('vectorised')) for h in hot)}/{len(hot)}",
            "hot_min_bytes": sorted({h["min_bytes"] for h in hot if "min_bytes" in h}),
        })
    return out


if __name__ == "__main__":
    main()
