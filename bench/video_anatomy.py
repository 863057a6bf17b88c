"""FLOPs of a full and of a reuse call, and cache bytes, per policy on the real video UNet layouts.

    python bench/video_anatomy.py --out bench/results

Counted from shapes alone on PyTorch's meta device (no weights, no compute; torch.utils.flop_counter's
formulas: convolutions, matmuls, attention), with frkern's torch backend, CFG batch 2:
- SVD-XT (UNetSpatioTemporalConditionModel, diffusers' default config = SVD's), 1024x576, 14 and 25
  frames;
- AnimateDiff (UNetMotionModel's default config, SD1.5's layout with motion modules, text width 768),
  16 frames, 512x512;
- ModelScope text-to-video (UNet3DConditionModel's default config), 16 frames, 256x256.
The reuse call is a policy's non-keyframe call (FRDiff without score mixing, Clockwork's clocked
call, DeepCache's cached call); cache bytes are what the keyframe stores (fp16). SkipConv's FLOPs
depend on the content (the tiles that change) and are not counted here. Writes
video_anatomy.json and .md to --out.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402

POLICIES = ("FRDiff:interval=3,score_mix=false", "Clockwork:clock=2", "DeepCache:interval=3,branch=0",
            "DeepCache:interval=3,branch=2")
CASES = (("svd-xt", 14), ("svd-xt", 25), ("animatediff", 16), ("t2v", 16))


def parser():
    ap = new_parser(__doc__)
    add_out(ap, "the JSON and markdown results")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import frkern  # noqa: E402
from record import markdown_table, save_json  # noqa: E402
from specs import policy_from_spec  # noqa: E402


def build(kind: str, frames: int):
    """(model on the meta device in fp16, one call's kwargs) for a case."""
    from diffusers import UNet3DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel

    dt = torch.float16
    with torch.device("meta"):
        if kind == "svd-xt":
            model = UNetSpatioTemporalConditionModel().to(dt)
            kw = dict(sample=torch.empty(2, frames, 8, 72, 128, dtype=dt),
                      encoder_hidden_states=torch.empty(2, 1, 1024, dtype=dt),
                      added_time_ids=torch.empty(2, 3, dtype=dt))
        elif kind == "animatediff":
            model = UNetMotionModel(cross_attention_dim=768).to(dt)  # SD1.5's text width
            kw = dict(sample=torch.empty(2, 4, frames, 64, 64, dtype=dt),
                      encoder_hidden_states=torch.empty(2 * frames, 77, 768, dtype=dt))
        else:
            model = UNet3DConditionModel().to(dt)
            kw = dict(sample=torch.empty(2, 4, frames, 32, 32, dtype=dt),
                      encoder_hidden_states=torch.empty(2, 77, 1024, dtype=dt))
    # a few diffusers buffers are built with the legacy torch.Tensor([...]), which ignores the
    # default device (SVD's AlphaBlender mix factors): move everything to meta
    return model.to("meta").eval(), kw


def gflop(model, kw, t) -> float:
    # tensors the forward makes without a device (SVD's AlphaBlender) must be meta too
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.device("meta"):
        model(**kw, timestep=t, return_dict=False)
    return counter.get_total_flops() / 1e9


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    quiet_known_warnings()
    rows = []
    for kind, frames in CASES:
        for spec in POLICIES:
            policy = policy_from_spec(spec, 50)
            model, kw = build(kind, frames)
            handle = frkern.patch(model, policy, backend="torch")
            handle.begin(50)
            handle.set_step(0)
            full = gflop(model, kw, torch.tensor(999.0, device="meta"))
            cache = handle.cache_bytes
            handle.set_step(1)
            reuse = gflop(model, kw, torch.tensor(979.0, device="meta"))
            assert handle.stats == {"full": 1, "reuse": 1}, handle.stats
            rows.append(dict(model=kind, frames=frames, policy=spec, full_gflop=round(full, 1),
                             reuse_gflop=round(reuse, 1), reuse_over_full=round(reuse / full, 3),
                             cache_mib=round(cache / 2**20, 1)))
            print(rows[-1], flush=True)
    header = ["model", "frames", "policy", "full_gflop", "reuse_gflop", "reuse_over_full", "cache_mib"]
    md = markdown_table(rows, header)
    save_json(args.out, "video_anatomy", {"result": rows}, device="meta")
    with open(os.path.join(args.out, "video_anatomy.md"), "w", encoding="utf-8") as f:
        f.write(f"`python bench/video_anatomy.py --out {args.out}` (meta device, fp16, CFG batch 2; "
                f"torch {torch.__version__})\n\n" + "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
