"""Image quality of each cache format on the trained tiny model (bench/assets/tiny_model).

    python bench/cache_quality.py --out bench/results   # CPU, ~10 min

From the same noise and labels (16 images, 2 per class, CFG 3.0, DDIM-50), for FRDiff with score
mixing M=2 and M=3, DeepCache N=3, Clockwork c=3 and Adaptive (first-block rule on FR units,
threshold 0.04), each in every cache format (model = as computed, fp16, bf16, int8 and fp8_e4m3
with per-channel scales): PSNR and SSIM (scikit-image, images
in [0, 1]) against full-compute DDIM-50 and against the same policy with the uncompressed cache
(cache bytes: bench/cache_bytes.py). The model runs in float32 on the CPU, so fp16 and
bf16 are compressions here too. Writes cache_quality.json and .md to --out.
"""
from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import DEVICE_HELP, TINY_MODEL_DIR, add_out, default_device  # noqa: E402
from options import help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402

FORMATS = ("model", "fp16", "bf16", "int8", "fp8_e4m3")


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--model", default=TINY_MODEL_DIR, help="folder of the trained tiny model")
    ap.add_argument("--per-class", type=int, default=2, help="images sampled per class (8 classes)")
    ap.add_argument("--device", default=None, help=DEVICE_HELP)
    add_out(ap, "cache_quality.json and .md")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import frkern  # noqa: E402
from cache_bytes import cache_format  # noqa: E402
from quality import to01  # noqa: E402
from record import markdown_table, save_json  # noqa: E402
from tiny_model import load, sample  # noqa: E402

STEPS, GUIDANCE = 50, 3.0


def policies():
    return [("FR+SM M=2", frkern.FRDiff(2, score_mix=True)), ("FR+SM M=3", frkern.FRDiff(3, score_mix=True)),
            ("DeepCache N=3", frkern.DeepCache(3, 0)), ("Clockwork c=3", frkern.Clockwork(3)),
            ("Adaptive FBC units t=0.04", frkern.Adaptive(0.04, reuse="units", rule="first_block", warmup=2,
                                                          max_reuse=4))]


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    quiet_known_warnings()
    device = default_device(args.device)
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    unet, tokens = load(args.model, device=device)
    labels = torch.arange(tokens.num_classes).repeat_interleave(args.per_class)
    noise = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(1234))

    def metrics(a, b):
        psnr = [peak_signal_noise_ratio(r, g, data_range=1.0) for r, g in zip(a, b)]
        finite = [p for p in psnr if np.isfinite(p)]
        return (float(np.mean(finite)) if finite else float("inf"),
                float(np.mean([structural_similarity(r, g, data_range=1.0, channel_axis=2, win_size=7)
                               for r, g in zip(a, b)])))

    ref = to01(sample(unet, tokens, labels, steps=STEPS, guidance=GUIDANCE, noise=noise))
    rows = []
    for label, policy in policies():
        uncompressed = None
        for fmt in FORMATS:
            handle = frkern.patch(unet, policy, cache=cache_format(fmt))
            try:
                t0 = time.perf_counter()
                x = sample(unet, tokens, labels, steps=STEPS, guidance=GUIDANCE, noise=noise, handle=handle)
                secs = time.perf_counter() - t0
                stats = dict(handle.stats)
            finally:
                frkern.unpatch(unet)
            img = to01(x)
            if fmt == "model":
                uncompressed = img
            psnr_ref, ssim_ref = metrics(ref, img)
            psnr_same, ssim_same = metrics(uncompressed, img)
            row = dict(policy=label, format=fmt, calls={k: v for k, v in stats.items() if k in ("full", "reuse", "skip")},
                       psnr_vs_ddim50=round(psnr_ref, 2), ssim_vs_ddim50=round(ssim_ref, 4),
                       psnr_vs_uncompressed=round(psnr_same, 2), ssim_vs_uncompressed=round(ssim_same, 4),
                       s_per_run=round(secs, 1))
            rows.append(row)
            print(row, flush=True)
            write(rows, args, device, labels)  # after every row: a long run stopped early keeps what it measured
    return rows


def write(rows, args, device, labels):
    md = markdown_table(rows)
    meta = dict(command="python bench/cache_quality.py " + " ".join(sys.argv[1:]), device=device,
                cpu=platform.processor() or platform.machine(), torch=torch.__version__, images=len(labels),
                reference=f"DDIM-{STEPS}, guidance {GUIDANCE}", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    save_json(args.out, "cache_quality", {"meta": meta, "rows": rows}, device=device)
    with open(os.path.join(args.out, "cache_quality.md"), "w", encoding="utf-8") as f:
        f.write(f"`{meta['command']}` ({len(labels)} images, {meta['reference']}, device {device}, torch "
                f"{torch.__version__}; inf = identical images)\n\n" + "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
