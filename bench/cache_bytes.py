"""Cache bytes per policy and cache format on the real UNet layouts.

    python bench/cache_bytes.py --out bench/results

What frkern keeps after one keyframe call (handle.cache_bytes: every stored tensor, scales
included), counted from shapes alone on PyTorch's meta device (no weights, no compute), fp16
models, CFG batch 2, frkern's torch backend:
- SD1.5 (512x512: 64x64 latents), SDXL (1024x1024: 128x128 latents);
- SVD-XT (1024x576, 14 and 25 frames), AnimateDiff (SD1.5 + motion modules, 16 frames, 512x512),
  ModelScope text-to-video (16 frames, 256x256): bench/video_anatomy.py's builders.
Formats: model (fp16, what frkern stores without the option), int8 and fp8_e4m3 with per-channel
scales, int8 with per-group scales (64). Writes cache_bytes.json and .md to --out.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402

POLICIES = ("FRDiff:interval=3", "DeepCache:interval=3,branch=0", "Clockwork:clock=3",
            "Adaptive:threshold=0.05,reuse=\"units\"")
FORMATS = ("model", "int8", "int8/group64", "fp8_e4m3")
CASES = (("sd15", 0), ("sdxl", 0), ("svd-xt", 14), ("svd-xt", 25), ("animatediff", 16), ("t2v", 16))


def parser():
    ap = new_parser(__doc__)
    add_out(ap, "the JSON and markdown results")
    ap.add_argument("--cases", nargs="*", default=[f"{k}:{f}" if f else k for k, f in CASES],
                    help="model[:frames] cases (default: all)")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import torch  # noqa: E402

import frkern  # noqa: E402
from record import markdown_table, save_json  # noqa: E402
from specs import policy_from_spec  # noqa: E402


def cache_format(name: str) -> frkern.CacheFormat:
    if name == "int8/group64":
        return frkern.CacheFormat("int8", scales="group", group_size=64)
    return frkern.CacheFormat(name)


def build(kind: str, frames: int):
    """(fp16 model on the meta device, one CFG call's kwargs)."""
    if kind not in ("sd15", "sdxl"):
        from video_anatomy import build as build_video

        return build_video(kind, frames)
    from configs import CONFIGS
    from diffusers import UNet2DConditionModel

    dt = torch.float16
    with torch.device("meta"):
        model = UNet2DConditionModel(**CONFIGS[kind]).to(dt)
        size, text = (64, 768) if kind == "sd15" else (128, 2048)
        kw = dict(sample=torch.empty(2, 4, size, size, dtype=dt), encoder_hidden_states=torch.empty(2, 77, text, dtype=dt))
        if kind == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(2, 1280, dtype=dt),
                                       "time_ids": torch.empty(2, 6, dtype=dt)}
    return model.to("meta").eval(), kw


def keyframe_bytes(kind, frames, spec, fmt) -> int:
    model, kw = build(kind, frames)
    handle = frkern.patch(model, policy_from_spec(spec, 50), backend="torch", cache=cache_format(fmt))
    handle.begin(50)
    handle.set_step(0)
    with torch.no_grad(), torch.device("meta"):
        model(**kw, timestep=torch.tensor(999.0, device="meta"), return_dict=False)
    assert handle.stats.get("full") == 1, handle.stats
    return handle.cache_bytes


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    quiet_known_warnings()
    rows = []
    for case in args.cases:
        kind, _, frames = case.partition(":")
        for spec in POLICIES:
            sizes = {fmt: keyframe_bytes(kind, int(frames or 0), spec, fmt) for fmt in FORMATS}
            row = dict(model=kind, frames=int(frames or 0) or "-", policy=spec,
                       **{f"{fmt}_mib": round(b / 2**20, 1) for fmt, b in sizes.items()},
                       **{f"{fmt}_over_model": round(b / sizes["model"], 3) for fmt, b in sizes.items() if fmt != "model"})
            rows.append(row)
            print(row, flush=True)
    md = markdown_table(rows)
    save_json(args.out, "cache_bytes", {"result": rows}, device="meta")
    with open(os.path.join(args.out, "cache_bytes.md"), "w", encoding="utf-8") as f:
        f.write(f"`python bench/cache_bytes.py --out {args.out}` (meta device, fp16 models, CFG batch 2, the cache "
                f"after one keyframe call, scales included; torch {torch.__version__})\n\n" + "\n".join(md) + "\n")
    return rows


if __name__ == "__main__":
    main()
