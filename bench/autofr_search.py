"""Run an Auto-FR search on the trained tiny model and save the policy.

    python bench/autofr_search.py --steps 50 --iters 100 --penalty 1e-3
    python bench/autofr_search.py --jumps --init FRDiff:interval=3 --penalty 5e-4 --iters 30   # from FR+SM M=3
Writes autofr_<tag>.policy.json (load with frkern.load_policy) and autofr_<tag>.log.json (gate
probabilities, loss history, command, wall time) to bench/results/local/, or to --out (the
committed searches: --out bench/results, where bench/quality.py looks for them by default).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import DEVICE_HELP, TINY_MODEL_DIR, add_out, default_device, help_before_imports  # noqa: E402
from options import parser as new_parser  # noqa: E402
from options import quiet_known_warnings  # noqa: E402
from specs import GRAMMAR, SpecError, check_before_imports, parse_spec  # noqa: E402


def parser():
    ap = new_parser(__doc__, epilog=GRAMMAR)
    ap.add_argument("--model", default=TINY_MODEL_DIR, help="folder of the trained tiny model")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the schedule searched")
    ap.add_argument("--iters", type=int, default=100, help="optimisation iterations")
    ap.add_argument("--lr", type=float, default=5e-3, help="learning rate of the keyframe gates")
    ap.add_argument("--penalty", type=float, default=1e-3, help="weight of the gate penalty (the cost of keyframes) added to the MSE loss")
    ap.add_argument("--batch", type=int, default=4, help="calibration images per iteration (random labels)")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration noise and labels")
    ap.add_argument("--jumps", action="store_true",
                    help="also choose per non-keyframe step between feature reuse and a reduced-NFE jump")
    ap.add_argument("--fr-cost", type=float, default=0.33,
                    help="cost of a feature-reuse step relative to a full one, in the penalty (tiny model: 0.72 / 2.15 GFLOP)")
    ap.add_argument("--init", default="full",
                    help="starting schedule: full (every step a keyframe) or a policy spec (grammar below; "
                         "FRDiff:interval=3,bias=1: score mixing's lambda rounded to jump / reuse, needs --jumps; "
                         "Keyframes:..., or a policy JSON file, @FILE or a path)")
    ap.add_argument("--init-logit", type=float, default=1.0,
                    help="with --init other than full: the starting gates' logits are +-this")
    ap.add_argument("--val-batch", type=int, default=8,
                    help="images of the fixed held-out batch that picks the best iterate")
    ap.add_argument("--no-validate", action="store_true",
                    help="pick the best iterate on its own training batch instead of a fixed held-out batch")
    ap.add_argument("--tag", default=None, help="name of the result files (default: tiny_<steps>steps_w<penalty>)")
    ap.add_argument("--device", default=None, help=DEVICE_HELP)
    add_out(ap, "the policy and the search log")
    return ap


def init_policy(spec: str, steps: int | None = None):
    """--init's policy, or None for all keyframes."""
    if spec == "full":
        return None
    if os.path.isfile(spec) and not spec.startswith("@"):  # a policy JSON file by any name
        spec = "@" + spec
    try:
        return parse_spec(spec, steps).policy
    except SpecError as e:
        raise SystemExit(f"--init {spec!r}: {e} (expected full, a spec such as FRDiff:interval=3,bias=1, "
                         f"or a policy JSON file)")


if __name__ == "__main__":
    help_before_imports(parser)
    check_before_imports(parser, lambda ap, args: init_policy(args.init, args.steps))

import torch  # noqa: E402

import frkern  # noqa: E402
from frkern import autofr  # noqa: E402
from tiny_model import ddim_scheduler, load  # noqa: E402


def main(argv=None):
    args = parser().parse_args(argv)
    quiet_known_warnings()
    start = init_policy(args.init, args.steps)
    args.device = default_device(args.device)

    unet, tokens = load(args.model, device=args.device)

    def conditions(g, batch=args.batch):  # data-free: random labels and noise
        labels = torch.randint(0, tokens.num_classes, (batch,), generator=g)
        noise = torch.randn(batch, 3, 32, 32, generator=g).to(args.device)
        with torch.no_grad():
            ehs = torch.cat([tokens(torch.full_like(labels, tokens.num_classes).to(args.device)),
                             tokens(labels.to(args.device))])
        return noise, ehs, {}

    t0 = time.time()
    res = autofr.search(unet, conditions, ddim_scheduler, steps=args.steps, iters=args.iters, lr=args.lr,
                        penalty=args.penalty, guidance=args.guidance, seed=args.seed, jumps=args.jumps,
                        fr_cost=args.fr_cost, init_policy=start, init_logit=args.init_logit,
                        validate=not args.no_validate,
                        val_conditions=lambda g: conditions(g, args.val_batch))
    wall = time.time() - t0
    tag = args.tag or f"tiny_{args.steps}steps_w{args.penalty:g}" + ("_jumps" if args.jumps else "")
    os.makedirs(args.out, exist_ok=True)
    frkern.save_policy(res.policy, os.path.join(args.out, f"autofr_{tag}.policy.json"))
    log = json.loads(res.to_json())
    log.update(command="python bench/autofr_search.py " + " ".join(sys.argv[1:]), wall_time_s=round(wall),
               device=args.device, torch=torch.__version__)
    with open(os.path.join(args.out, f"autofr_{tag}.log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"keyframes ({len(res.policy.keyframes)} of {args.steps}): {res.policy.keyframes}; jumps {res.policy.jumps}; "
          f"best iterate {res.best_iter}; {wall:.0f} s")


if __name__ == "__main__":
    main()
