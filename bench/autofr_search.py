"""Run an Auto-FR search on the trained tiny model and save the policy.

    python bench/autofr_search.py --steps 50 --iters 100 --penalty 1e-3
Writes bench/results/autofr_<tag>.policy.json (load with frkern.load_policy) and
bench/results/autofr_<tag>.log.json (gate probabilities, loss history, command, wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frkern  # noqa: E402
from frkern import autofr  # noqa: E402
from tiny_model import ASSET_DIR, ddim_scheduler, load  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=ASSET_DIR)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--penalty", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4, help="calibration images per iteration (random labels)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    unet, tokens = load(args.model, device=args.device)

    def conditions(g):  # data-free: random labels and noise
        labels = torch.randint(0, tokens.num_classes, (args.batch,), generator=g)
        noise = torch.randn(args.batch, 3, 32, 32, generator=g).to(args.device)
        with torch.no_grad():
            ehs = torch.cat([tokens(torch.full_like(labels, tokens.num_classes).to(args.device)),
                             tokens(labels.to(args.device))])
        return noise, ehs, {}

    t0 = time.time()
    res = autofr.search(unet, conditions, ddim_scheduler, steps=args.steps, iters=args.iters, lr=args.lr,
                        penalty=args.penalty, guidance=args.guidance, seed=args.seed)
    wall = time.time() - t0
    tag = args.tag or f"tiny_{args.steps}steps_w{args.penalty:g}"
    os.makedirs(RESULTS, exist_ok=True)
    frkern.save_policy(res.policy, os.path.join(RESULTS, f"autofr_{tag}.policy.json"))
    log = json.loads(res.to_json())
    log.update(command="python bench/autofr_search.py " + " ".join(sys.argv[1:]), wall_time_s=round(wall),
               device=args.device, torch=torch.__version__)
    with open(os.path.join(RESULTS, f"autofr_{tag}.log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"keyframes ({len(res.policy.keyframes)} of {args.steps}): {res.policy.keyframes}; {wall:.0f} s")


if __name__ == "__main__":
    main()
