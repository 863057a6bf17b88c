"""Calibrate the Adaptive policy's accumulated rule on the trained tiny model and save the policy.

    python bench/calibrate_adaptive.py --sampler ddim --steps 50 --reuse clockwork --out bench/results

Runs full-compute sampling (calibration labels and noise, disjoint from bench/quality.py's), fits
the polynomial from the indicator's change to the UNet output's change (frkern.calibration.calibrate)
and writes adaptive_tiny_<sampler><steps>_<reuse>.policy.json (load with frkern.load_policy; the
threshold in it is a default, bench/quality.py sweeps it) to bench/results/local/ or --out.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import DEVICE_HELP, TINY_MODEL_DIR, add_out, default_device, help_before_imports  # noqa: E402
from options import parser as new_parser  # noqa: E402
from options import quiet_known_warnings  # noqa: E402


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--model", default=TINY_MODEL_DIR, help="folder of the trained tiny model")
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "dpmpp"], help="DDIM or DPM-Solver++ (multistep)")
    ap.add_argument("--steps", type=int, default=50, help="sampler steps")
    ap.add_argument("--reuse", default="clockwork", choices=["deepcache", "clockwork", "units"], help="Adaptive's reuse kind")
    ap.add_argument("--degree", type=int, default=2, help="degree of the fitted polynomial")
    ap.add_argument("--images", type=int, default=8, help="calibration images (labels cycle through the classes)")
    ap.add_argument("--threshold", type=float, default=0.1, help="threshold stored in the policy")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=99, help="seed of the calibration noise")
    ap.add_argument("--device", default=None, help=DEVICE_HELP)
    add_out(ap, "the calibrated policy")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import torch  # noqa: E402

import frkern  # noqa: E402
from frkern.calibration import calibrate  # noqa: E402
from tiny_model import load, sample  # noqa: E402


def scheduler(name: str):
    from diffusers import DPMSolverMultistepScheduler

    from tiny_model import ddim_scheduler

    sch = ddim_scheduler()
    if name == "dpmpp":
        sch = DPMSolverMultistepScheduler.from_config(sch.config, algorithm_type="dpmsolver++")
    return sch


@torch.no_grad()
def main(argv=None):
    args = parser().parse_args(argv)
    quiet_known_warnings()
    args.device = default_device(args.device)
    unet, tokens = load(args.model, device=args.device)
    labels = torch.arange(args.images) % tokens.num_classes
    noise = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    policy = calibrate(unet, frkern.Adaptive(args.threshold, rule="accumulated", reuse=args.reuse),
                       lambda: sample(unet, tokens, labels, steps=args.steps, guidance=args.guidance, noise=noise,
                                      scheduler=scheduler(args.sampler)),
                       degree=args.degree, note=f"tiny model, {args.sampler} {args.steps} steps, "
                                                f"{args.images} images, seed {args.seed}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"adaptive_tiny_{args.sampler}{args.steps}_{args.reuse}.policy.json")
    frkern.save_policy(policy, path)
    print(f"poly {policy.poly} in {time.perf_counter() - t0:.1f} s -> {path}")


if __name__ == "__main__":
    main()
