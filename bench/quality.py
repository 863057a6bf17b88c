"""Latency-quality Pareto curve of frkern's policies on the trained tiny model.

    python bench/quality.py                      # CPU, ~10 min; writes bench/results/local/quality_tiny.*
    python bench/quality.py --out bench/results  # the committed figures

From the same noise and labels, reference = full-compute 50-step DDIM. Per method: PSNR and SSIM
of each image against the reference (scikit-image, images in [0, 1]); SWD, a distribution metric
against the training data: the sliced Wasserstein distance between 7x7 RGB patches of the samples
and of random training crops (128 random unit directions, patches standardised by the training
patches' mean and std; lower is closer; the reference's own SWD is the floor); UNet FLOPs per image
counted by torch.utils.flop_counter on the actual sampling run (CFG included; bench/flops.py adds the
CPU attention formula torch lacks); wall time per image.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import COMMITTED_RESULTS, DEVICE_HELP, TINY_MODEL_DIR, add_out, default_device  # noqa: E402
from options import help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--model", default=TINY_MODEL_DIR, help="folder of the trained tiny model")
    ap.add_argument("--per-class", type=int, default=2, help="images sampled per class (8 classes)")
    ap.add_argument("--steps", type=int, default=50, help="steps of the reference sampler")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    ap.add_argument("--device", default=None, help=DEVICE_HELP)
    ap.add_argument("--autofr", nargs="*", default=[COMMITTED_RESULTS],
                    help="folders whose autofr_*.policy.json (bench/autofr_search.py) are evaluated as Auto-FR rows")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only the methods whose family or label contains one of these strings and merge them "
                         "into the existing quality_tiny.json in --out (the other rows are kept as they were)")
    add_out(ap, "quality_tiny.json, .md and .png")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import frkern  # noqa: E402
from calibrate_adaptive import scheduler  # noqa: E402
from flops import count_gflop, skipped_conv_flops  # noqa: E402
from frkern.policies import FASTER_DIFFUSION_KEY_STEPS_50  # noqa: E402
from tiny_model import load, load_photos, sample  # noqa: E402
from train_tiny import random_crops  # noqa: E402


def methods(ref_steps: int, autofr_dirs=(COMMITTED_RESULTS,)):
    """(family, label, policy or None, steps[, sampler]); Auto-FR: every autofr_*.policy.json in
    autofr_dirs; the accumulated Adaptive rule: the calibrated adaptive_tiny_*.policy.json of
    bench/calibrate_adaptive.py in bench/results."""
    out = [("DDIM (reduced NFE)", f"DDIM-{n}", None, n) for n in (10, 13, 17, 20, 25, 30, 40, ref_steps)]
    out += [("FRDiff FR only", f"FR M={m}", frkern.FRDiff(m, score_mix=False), ref_steps) for m in (2, 3, 4, 5)]
    out += [("FRDiff + score mixing", f"FR+SM M={m}", frkern.FRDiff(m, score_mix=True), ref_steps) for m in (2, 3, 4, 5)]
    # bias 1 puts score mixing's lambda at 0 on nearly every non-keyframe: reduced-NFE jumps, the kind of
    # schedule the Auto-FR search with jumps converges to here, as a fixed baseline for it
    out += [("FRDiff + score mixing, bias 1", f"FR+SM M={m} bias 1", frkern.FRDiff(m, score_mix=True, bias=1.0), ref_steps)
            for m in (2, 3, 4)]
    out += [("Clockwork", f"Clockwork c={c}", frkern.Clockwork(c), ref_steps) for c in (2, 3, 4)]
    out += [("DeepCache", f"DeepCache N={n}", frkern.DeepCache(n, 0), ref_steps) for n in (2, 3, 5)]
    # T-GATE at the tgate package's SD settings (self-attention cached every 5th step before the gate,
    # every step after it; warm-up 2); its SD default gates at step 10 of 25, 40% of the schedule: gate 20
    # is that fraction of 50 steps, gate 10 gates twice as early. Composed with DeepCache N=3 (branch 0)
    # as the package's SD DeepCache loader does.
    out += [("T-GATE", f"T-GATE gate {g}", frkern.TGate(gate_step=g, sp_interval=5, fi_interval=1, warm_up=2), ref_steps)
            for g in (10, 20)]
    out += [("T-GATE + DeepCache N=3", f"T-GATE gate {g} + DeepCache N=3",
             frkern.TGate(gate_step=g, sp_interval=5, fi_interval=1, warm_up=2, reuse=frkern.DeepCache(3, 0)), ref_steps)
            for g in (10, 20)]
    # Encoder propagation: the authors' key steps for 50-step SD, and uniform key steps (parallel decoding
    # changes latency, not the result: parallel=1 throughout)
    out += [("Encoder propagation, authors' key steps", "EncProp key steps 0,1,2,3,5,10,15,25,35",
             frkern.EncoderPropagation(key_steps=FASTER_DIFFUSION_KEY_STEPS_50), ref_steps)]
    out += [("Encoder propagation, uniform", f"EncProp interval {k}", frkern.EncoderPropagation(interval=k), ref_steps)
            for k in (3, 5)]
    out += [("Clockwork, learned adaptor", f"Clockwork c={c} learned", frkern.Clockwork(c, adaptor=path), ref_steps)
            for c, path in adaptors("ddim", ref_steps)]
    out += [("SkipConv", f"SkipConv t={t}", frkern.SkipConv(t, tile=4), ref_steps) for t in SKIPCONV_THRESHOLDS]
    out += [("SkipConv + keyframes", f"SkipConv t={t} K=5", frkern.SkipConv(t, tile=4, interval=5), ref_steps)
            for t in SKIPCONV_THRESHOLDS[1:]]
    for path in sorted(p for d in autofr_dirs for p in glob.glob(os.path.join(d, "autofr_*.policy.json"))):
        pol = frkern.load_policy(path)
        jumps = f", {len(pol.jumps)} jump" if pol.jumps else ""
        out.append(("Auto-FR", f"Auto-FR {os.path.basename(path)[7:-12]} ({len(pol.keyframes)} key{jumps})", pol,
                    pol.num_steps))
    out += adaptive_methods(ref_steps)
    return out


def adaptors(sampler: str, steps: int):
    """(clock, path) of the committed Clockwork adaptors (bench/train_clockwork_adaptor.py)."""
    out = []
    for c in (2, 3, 4):
        path = os.path.join(COMMITTED_RESULTS, "adaptors", f"clockwork_tiny_{sampler}{steps}_c{c}")
        if os.path.exists(path + ".safetensors"):
            out.append((c, path))
    return out


def calibrated(sampler: str, steps: int) -> frkern.Adaptive:
    return frkern.load_policy(os.path.join(COMMITTED_RESULTS, f"adaptive_tiny_{sampler}{steps}_clockwork.policy.json"))


def adaptive_methods(ref_steps: int):
    """Adaptive rules against the fixed schedules of the same reuse kind, at the reference's DDIM
    steps and in a low-step DPM-Solver++ setting (20 and 25 steps)."""
    replace = dataclasses.replace
    fb = dict(rule="first_block", warmup=2, max_reuse=4)
    out = [("Adaptive FBC, Clockwork cut", f"Adaptive FBC clockwork t={t}", frkern.Adaptive(t, reuse="clockwork", **fb), ref_steps)
           for t in (0.02, 0.04, 0.08)]
    out += [("Adaptive FBC, DeepCache cut", f"Adaptive FBC deepcache t={t}", frkern.Adaptive(t, reuse="deepcache", **fb), ref_steps)
            for t in (0.03, 0.06, 0.12)]
    out += [("Adaptive FBC, FR units", f"Adaptive FBC units t={t}", frkern.Adaptive(t, reuse="units", **fb), ref_steps)
            for t in (0.02, 0.04, 0.08)]
    acc = replace(calibrated("ddim", ref_steps), warmup=2, max_reuse=4)
    out += [("Adaptive accumulated (calibrated), Clockwork cut", f"Adaptive acc clockwork t={t}", replace(acc, threshold=t), ref_steps)
            for t in (0.03, 0.06, 0.12)]
    for n in (20, 25):
        low = [("DPM++ (low step) full", f"DPM++-{n}", None, n),
               ("DPM++ (low step) Clockwork", f"DPM++-{n} Clockwork c=2", frkern.Clockwork(2), n),
               ("DPM++ (low step) Clockwork", f"DPM++-{n} Clockwork c=3", frkern.Clockwork(3), n),
               ("DPM++ (low step) Clockwork", f"DPM++-{n} Clockwork c=4", frkern.Clockwork(4), n),
               ("DPM++ (low step) DeepCache", f"DPM++-{n} DeepCache N=2", frkern.DeepCache(2, 0), n),
               ("DPM++ (low step) DeepCache", f"DPM++-{n} DeepCache N=3", frkern.DeepCache(3, 0), n)]
        low += [("DPM++ (low step) Adaptive FBC clockwork", f"DPM++-{n} Adaptive FBC clockwork t={t}",
                 frkern.Adaptive(t, reuse="clockwork", rule="first_block", warmup=2, max_reuse=2), n) for t in (0.03, 0.06)]
        low += [("DPM++ (low step) Clockwork, learned adaptor", f"DPM++-{n} Clockwork c={c} learned",
                 frkern.Clockwork(c, adaptor=path), n) for c, path in adaptors("dpmpp", n)]
        acc = replace(calibrated("dpmpp", n), warmup=2, max_reuse=2)
        low += [("DPM++ (low step) Adaptive acc clockwork", f"DPM++-{n} Adaptive acc clockwork t={t}",
                 replace(acc, threshold=t), n) for t in (0.05, 0.1)]
        out += [row + ("dpmpp",) for row in low]
    return out


SKIPCONV_THRESHOLDS = (0.01, 0.02, 0.05, 0.1)
# Families drawn with their own markers and colours (the others take the colour cycle in turn).
FAMILY_STYLE = {
    "T-GATE": ("s-", dict(color="black", markersize=7)),
    "T-GATE + DeepCache N=3": ("^--", dict(color="black", markersize=8)),
    "Encoder propagation, authors' key steps": ("D", dict(color="darkgoldenrod", markersize=7)),
    "Encoder propagation, uniform": ("D--", dict(color="darkgoldenrod", markersize=7, markerfacecolor="white")),
}


def skipped_conv_gflop(handle, fn) -> float:
    """GFLOPs of the gated convolutions' output tiles that SkipConv does not need to recompute while
    fn runs (flops.skipped_conv_flops). frkern's torch reference still runs them densely, so FLOP
    counts subtract them: the figure is the cost of a tile-predicated convolution that computes
    affected tiles only."""
    with skipped_conv_flops(handle) as skipped:
        fn()
    return skipped[0] / 1e9


def patches(images: np.ndarray, k: int = 7, per_image: int = 64, rng=None) -> np.ndarray:
    """Random k x k patches, flattened; images N x H x W x 3 in [0, 1]."""
    n, h, w, _ = images.shape
    ys = rng.integers(0, h - k + 1, (n, per_image))
    xs = rng.integers(0, w - k + 1, (n, per_image))
    out = [images[i, y:y + k, x:x + k].reshape(-1) for i in range(n) for y, x in zip(ys[i], xs[i])]
    return np.stack(out)


def swd(a: np.ndarray, b: np.ndarray, projections: int = 128, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((a.shape[1], projections))
    d /= np.linalg.norm(d, axis=0, keepdims=True)
    pa, pb = np.sort(a @ d, axis=0), np.sort(b @ d, axis=0)
    q = np.linspace(0, 1, min(len(pa), len(pb)))
    qa = np.quantile(pa, q, axis=0)
    qb = np.quantile(pb, q, axis=0)
    return float(np.abs(qa - qb).mean())


def to01(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()  # not torch.set_grad_enabled(False): callers (tests) keep their grad mode
def main(argv=None):
    args = parser().parse_args(argv)
    quiet_known_warnings()
    args.device = default_device(args.device)

    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    unet, tokens = load(args.model, device=args.device)
    labels = torch.arange(tokens.num_classes).repeat_interleave(args.per_class)
    noise = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(1234))

    rng = np.random.default_rng(0)
    crops, _ = random_crops(load_photos(), 512, rng)
    train_p = patches(to01(crops), rng=rng)
    mu, sd = train_p.mean(0), train_p.std(0) + 1e-6
    train_p = (train_p - mu) / sd

    def generate(policy, steps, sampler="ddim"):
        handle = frkern.patch(unet, policy) if policy is not None else None
        try:
            t0 = time.perf_counter()
            x = sample(unet, tokens, labels, steps=steps, guidance=args.guidance, noise=noise, handle=handle,
                       scheduler=scheduler(sampler))
            if x.is_cuda:
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            stats = dict(handle.stats) if handle else {"full": steps}
            # FLOPs are linear in the batch: count one image's run (same schedule) and scale.
            one = lambda: sample(unet, tokens, labels[:1], steps=steps, guidance=args.guidance,  # noqa: E731
                                 noise=noise[:1], handle=handle, scheduler=scheduler(sampler))
            gflop = count_gflop(one) - skipped_conv_gflop(handle, one)
        finally:
            if handle is not None:
                frkern.unpatch(unet)
        return x, secs, gflop * 1e9 * len(labels), stats

    ref, _, _, _ = generate(None, args.steps)
    ref01 = to01(ref)
    rows, kept = [], {}
    if args.only is not None:
        with open(os.path.join(args.out, "quality_tiny.json")) as f:
            previous = json.load(f)
        kept = {r["method"]: r for r in previous["rows"]}
        args.kept_from = previous["meta"]
    for family, label, policy, steps, *sampler in methods(args.steps, args.autofr):
        if args.only is not None and not any(s in family or s in label for s in args.only):
            if label in kept:
                rows.append(kept[label])
            continue
        x, secs, flops, stats = generate(policy, steps, *sampler)
        img = to01(x)
        psnr = [peak_signal_noise_ratio(r, g, data_range=1.0) for r, g in zip(ref01, img)]
        ssim = [structural_similarity(r, g, data_range=1.0, channel_axis=2, win_size=7) for r, g in zip(ref01, img)]
        gen_p = (patches(img, rng=np.random.default_rng(1)) - mu) / sd
        row = dict(family=family, method=label, policy=policy.to_dict() if policy is not None else None, steps=steps,
                   sampler=(sampler or ["ddim"])[0],
                   calls=stats, gflop_per_image=flops / 1e9 / len(labels), ms_per_image=1e3 * secs / len(labels),
                   psnr=float(np.mean([p for p in psnr if np.isfinite(p)] or [float("inf")])),
                   psnr_identical=int(sum(not np.isfinite(p) for p in psnr)),
                   ssim=float(np.mean(ssim)), swd=swd(gen_p, train_p))
        rows.append(row)
        print(f"{label:32s} GFLOP/img {row['gflop_per_image']:7.3f}  PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.4f}  "
              f"SWD {row['swd']:.4f}  {row['ms_per_image']:.0f} ms/img  {stats}")
    write(rows, args)


def write(rows, args):
    import diffusers
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    meta = {"command": "python bench/quality.py " + " ".join(sys.argv[1:]), "model": os.path.relpath(args.model),
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "reference": f"DDIM-{args.steps}, guidance {args.guidance}",
            "images": len(rows) and args.per_class * 8, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if getattr(args, "kept_from", None):  # --only: the other rows are those of an earlier run
        meta["other_rows_from"] = {k: args.kept_from.get(k) for k in ("command", "date", "torch", "diffusers")}
    stem = os.path.join(args.out, "quality_tiny")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["| family | method | UNet calls full/reuse/skip | GFLOP/image | ms/image (CPU, 1 run) | PSNR dB | SSIM | SWD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["calls"]
        calls = f"{c.get('full', 0)}/{c.get('reuse', 0)}/{c.get('skip', 0)}"
        psnr = "identical" if r["psnr_identical"] == args.per_class * 8 else f"{r['psnr']:.2f}"
        lines.append(f"| {r['family']} | {r['method']} | {calls} | {r['gflop_per_image']:.3f} | {r['ms_per_image']:.0f} | "
                     f"{psnr} | {r['ssim']:.4f} | {r['swd']:.4f} |")
    with open(stem + ".md", "w") as f:
        f.write("# Quality vs cost on the tiny model\n\n```\n" + json.dumps(meta, indent=1) + "\n```\n\n"
                + "PSNR/SSIM: against the reference images from the same noise (higher is closer). "
                "SWD: sliced Wasserstein distance of 7x7 patches to the training data (lower is closer).\n\n"
                + "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8))
    for family in dict.fromkeys(r["family"] for r in rows):
        rs = sorted([r for r in rows if r["family"] == family and r["psnr_identical"] == 0], key=lambda r: r["gflop_per_image"])
        if not rs:
            continue
        style, kw = FAMILY_STYLE.get(family, ("o" if family == "Auto-FR" else "o-", {}))
        for ax, key in zip(axes, ("psnr", "ssim")):
            ax.plot([r["gflop_per_image"] for r in rs], [r[key] for r in rs], style, label=family, **kw)
    for ax, key in zip(axes, ("PSNR to full-compute DDIM-50 (dB)", "SSIM to full-compute DDIM-50")):
        ax.set_xlabel("UNet GFLOP per image (CFG included)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7.5)
    fig.suptitle("frkern tiny model: quality vs cost (same noise and labels)")
    fig.tight_layout(rect=(0, 0, 0.77, 1))
    fig.savefig(stem + ".png", dpi=110)
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
