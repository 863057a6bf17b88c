"""Train Clockwork's learned adaptor (frkern/adaptor.py) for the shipped tiny model by distillation.

    python bench/train_clockwork_adaptor.py --sampler ddim --clock 2      # CPU, 1 thread: ~6 min
    python bench/train_clockwork_adaptor.py --sampler dpmpp --clock 3 --out bench/results/adaptors   # ~4 min

(plus, once per sampler, recording the teacher trajectories: ~6 min for DDIM-50, ~1.5 min for
DPM-Solver++ 20; they take 2.5 GB / 1 GB of memory and of disk in --cache-dir.)

1. Record: sample trajectories with the full, unpatched UNet (CFG, guidance 3, class labels as
   prompts, as bench/quality.py does) and record at every step, through hooks, r_in (the input of
   down_blocks[levels-1].downsamplers[0]), r_out (the output of up_blocks[n-1-levels]), temb (the
   time embedding the UNet gives its blocks) and the text (encoder hidden states). Training
   trajectories start from noise seed 10000 and held-out ones from seed 20000, labels cycling over
   the 8 classes; bench/quality.py evaluates on noise seed 1234, so none of its images is used.
   Recordings are cached in --cache-dir (shared by every clock and seed).
2. Offline distillation: for clock C, every clocked step t (t % C != 0) with keyframe k = t - t % C
   gives a pair (r_in_t, r_out_k, temb_t, text) -> r_out_t; L2 loss, Adam, cosine learning rate.
   --weighting relative (default) divides each step's L2 by the identity adaptor's L2 at that step
   (on the training pairs): plain L2 is dominated by the last steps, where r_out changes most and
   errors matter least, and an adaptor trained on it beat identity in L2 but not in the images.
   --loss guided instead takes the L2 of the CFG combination (1 - w) e_uncond + w e_cond of the two
   branches' errors (tried on DPM-Solver++ 20, clock 2, 24 trajectories: worse end to end).
3. On-policy fine-tune (--unroll-iters > 0): sample the first --unroll-trajectories again with the
   adaptor in the loop on clocked steps (its prediction replaces r_out, so later steps see the
   adapted trajectory), record the true r_out of the inner part at each adapted state as the target,
   and train on the union of both sets (a DAgger-style round; no backpropagation through the
   sampler).
4. Evaluate on the held-out trajectories: teacher-forced L2 of identity (r_out_k) vs learned, and
   end to end: sampling with the identity adaptor and with the learned one, each against full
   compute (final image MSE/PSNR, and the L2 of r_out along each method's own trajectory). The
   identity run is also compared with frkern.patch(unet, Clockwork(C)) (they must agree).

Writes <out>/<name>.safetensors + .json (frkern.adaptor format) and <out>/<name>.log.json.
A checkpoint is written every --save-every iterations to --cache-dir; --resume continues from it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import LOCAL_RESULTS, TINY_MODEL_DIR, add_out, help_before_imports, quiet_known_warnings  # noqa: E402
from options import parser as new_parser  # noqa: E402

TRAIN_NOISE_SEED, VAL_NOISE_SEED = 10000, 20000  # bench/quality.py uses 1234
SAMPLERS = {"ddim": "DDIMScheduler", "dpmpp": "DPMSolverMultistepScheduler"}
DEFAULT_STEPS = {"ddim": 50, "dpmpp": 20}


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--clock", type=int, default=2, choices=(2, 3, 4), help="Clockwork clock the adaptor is for")
    ap.add_argument("--levels", type=int, default=1, help="Clockwork levels (outer resolution levels kept)")
    ap.add_argument("--sampler", default="ddim", choices=tuple(SAMPLERS),
                    help="ddim (DDIMScheduler) or dpmpp (DPMSolverMultistepScheduler, dpmsolver++)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 for ddim, 20 for dpmpp)")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    ap.add_argument("--train-trajectories", type=int, default=64, help="training trajectories (images)")
    ap.add_argument("--unroll-trajectories", type=int, default=32,
                    help="training trajectories re-sampled with the adaptor in the loop (the first ones)")
    ap.add_argument("--val-trajectories", type=int, default=8, help="held-out trajectories (images)")
    ap.add_argument("--hidden", type=int, default=32, help="adaptor width")
    ap.add_argument("--inner-stride", type=int, default=2, help="adaptor works at r_out's resolution / this")
    ap.add_argument("--iters", type=int, default=1500, help="offline distillation iterations")
    ap.add_argument("--unroll-iters", type=int, default=400,
                    help="on-policy fine-tune iterations after the offline ones (0: none)")
    ap.add_argument("--weighting", default="relative", choices=("none", "relative"),
                    help="per-step loss weights: none (plain L2, dominated by the last steps) or relative "
                         "(each step's L2 over the identity adaptor's L2 at that step)")
    ap.add_argument("--loss", default="branches", choices=("guided", "branches", "both"),
                    help="L2 of the CFG combination of the two branches' r_out errors (guided), of each "
                         "branch (branches), or the sum")
    ap.add_argument("--batch", type=int, default=16, help="(trajectory, step) pairs per iteration (x2: CFG)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate (cosine decay per phase)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N iterations")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --cache-dir")
    ap.add_argument("--name", default=None,
                    help="file stem (default: clockwork_tiny_<sampler><steps>_c<clock>)")
    ap.add_argument("--model", default=TINY_MODEL_DIR, help="folder of the trained tiny model")
    ap.add_argument("--cache-dir", default=os.path.join(LOCAL_RESULTS, "clockwork_adaptor"),
                    help="recorded trajectories and checkpoints")
    add_out(ap, "the adaptor (.safetensors, .json) and its .log.json", committed="bench/results/adaptors")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import torch  # noqa: E402

import frkern  # noqa: E402
from frkern.adaptor import (AdaptorConfig, ClockworkAdaptor, adaptor_flops, load_adaptor,  # noqa: E402
                            model_fingerprint, save_adaptor)
from tiny_model import ddim_scheduler, load  # noqa: E402




def progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, mininterval=1.0, file=sys.stderr)


def make_scheduler(sampler: str):
    base = ddim_scheduler()
    if sampler == "ddim":
        return base
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++")


def trajectory_inputs(n: int, noise_seed: int, num_classes: int):
    labels = torch.arange(n) % num_classes
    noise = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(noise_seed))
    return labels, noise


class Recorder:
    """Hooks on an unpatched UNet: r_in, r_out, temb at every call; on clocked steps (clock given)
    r_out is replaced by `adapt(r_in, r_out_key, temb, text)` (the true one is still recorded)."""

    def __init__(self, unet, levels: int):
        n = len(unet.down_blocks)
        self.in_mod = unet.down_blocks[levels - 1].downsamplers[0]
        self.out_mod = unet.up_blocks[n - 1 - levels]
        self.temb_mod = unet.down_blocks[0]
        self.adapt, self.clocked, self.text = None, False, None
        self.r_in = self.r_out = self.temb = self.key = None
        self.hooks = [
            self.in_mod.register_forward_pre_hook(self._in),
            self.temb_mod.register_forward_pre_hook(self._temb, with_kwargs=True),
            self.out_mod.register_forward_hook(self._out),
        ]

    def _in(self, mod, args):
        self.r_in = args[0]

    def _temb(self, mod, args, kwargs):
        self.temb = kwargs["temb"]

    def _out(self, mod, args, out):
        self.r_out = out
        if self.adapt is None:
            return None
        if not self.clocked:
            self.key = out
            return None
        return self.adapt(self.r_in, self.key, self.temb, self.text)

    def remove(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def run(unet, tokens, labels, noise, sampler, steps, guidance, levels, clock=None, adapt=None, handle=None,
        record=True, desc="sample"):
    """CFG sampling as tiny_model.sample does; returns the final x and, when `record`, the per-step
    (T, 2N, ...) r_in, true r_out, temb and the (2N, L, D) text."""
    cond = tokens(labels)
    uncond = tokens(torch.full_like(labels, tokens.num_classes))
    ehs = torch.cat([uncond, cond])
    x = noise.clone()
    sch = make_scheduler(sampler)
    sch.set_timesteps(steps)
    rec = Recorder(unet, levels) if handle is None else None
    out = {"r_in": [], "r_out": [], "temb": []}
    if handle is not None:
        handle.begin(steps)
    try:
        if rec is not None:
            rec.adapt, rec.text = adapt, ehs
        for i, t in enumerate(progress(sch.timesteps, desc)):
            if rec is not None:
                rec.clocked = clock is not None and i % clock != 0
            if handle is not None:
                handle.set_step(i)
            eps = unet(torch.cat([x, x]), t, ehs).sample
            u, c = eps.chunk(2)
            x = sch.step(u + guidance * (c - u), t, x).prev_sample
            if record and rec is not None:
                out["r_in"].append(rec.r_in)
                out["r_out"].append(rec.r_out)
                out["temb"].append(rec.temb)
    finally:
        if rec is not None:
            rec.remove()
    if not record or rec is None:
        return x, None
    data = {k: torch.stack(v) for k, v in out.items()}
    data["text"] = ehs
    return x, data


def clocked_pairs(steps: int, clock: int, trajectories: int) -> torch.Tensor:
    """(P, 3) rows (t, k, j): clocked step t, its keyframe k, trajectory j (whose unconditional and
    conditional batch elements are j and j + trajectories)."""
    rows = [(t, t - t % clock, j) for t in range(steps) if t % clock for j in range(trajectories)]
    return torch.tensor(rows, dtype=torch.long)


def gather(data, rows):
    """Adaptor inputs and target for the rows: batch 2P, the P unconditional elements first."""
    n = data["r_in"].shape[1] // 2
    t, k, j = rows.unbind(1)
    t, k, b = torch.cat([t, t]), torch.cat([k, k]), torch.cat([j, j + n])
    return data["r_in"][t, b], data["r_out"][k, b], data["temb"][t, b], data["text"][b], data["r_out"][t, b]


def errors(pred, target, guidance):
    """Per row: (guided, branches) mean squared errors. guided: of the CFG combination
    (1 - w) e_uncond + w e_cond, as the sampler applies it to the outputs; branches: of each
    element, averaged over the two."""
    e = (pred - target).flatten(1)
    eu, ec = e.chunk(2)
    return ((1 - guidance) * eu + guidance * ec).pow(2).mean(1), 0.5 * (eu.pow(2).mean(1) + ec.pow(2).mean(1))


@torch.no_grad()
def l2(adaptor, data, rows, steps, guidance, chunk=128):
    """Mean squared errors over the rows' r_out elements, identity vs learned:
    {"guided"|"branches": (identity, learned, {t: (identity, learned)})}."""
    se = torch.zeros(2, 2, steps, dtype=torch.float64)  # [kind, adaptor, step]
    n = torch.zeros(steps, dtype=torch.float64)
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        r_in, key, temb, text, target = gather(data, part)
        for a, out in enumerate((key, adaptor(r_in, key, temb, text))):
            for kind, err in enumerate(errors(out, target, guidance)):
                se[kind, a].index_add_(0, part[:, 0], err.double())
        n.index_add_(0, part[:, 0], torch.ones(len(part), dtype=torch.float64))
    out = {}
    for kind, name in enumerate(("guided", "branches")):
        per_step = {t: (float(se[kind, 0, t] / n[t]), float(se[kind, 1, t] / n[t])) for t in range(steps) if n[t] > 0}
        out[name] = (float(se[kind, 0].sum() / n.sum()), float(se[kind, 1].sum() / n.sum()), per_step)
    return out


def step_weights(data, rows, steps, guidance, weighting):
    """Per-step loss weights for the guided and the branch losses: 'none' all 1; 'relative'
    1 / (the identity adaptor's error at that step on the training pairs), so every clocked step
    counts as much and the identity adaptor scores 1."""
    w = torch.ones(2, steps)
    if weighting == "relative":
        res = l2(lambda r_in, key, temb, text: key, data, rows, steps, guidance)
        for kind, name in enumerate(("guided", "branches")):
            for t, (ident, _) in res[name][2].items():
                w[kind, t] = 1.0 / max(ident, 1e-12)
    return w


def psnr(x, ref):
    mse = float(((x.clamp(-1, 1) - ref.clamp(-1, 1)) / 2).pow(2).mean())
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def main(argv=None):
    args = parser().parse_args(argv)
    quiet_known_warnings()
    torch.set_num_threads(args.threads)
    steps = args.steps or DEFAULT_STEPS[args.sampler]
    name = args.name or f"clockwork_tiny_{args.sampler}{steps}_c{args.clock}"
    t_start = time.perf_counter()
    os.makedirs(args.cache_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)

    unet, tokens = load(args.model)
    unet.requires_grad_(False)
    tokens.requires_grad_(False)
    fingerprint = model_fingerprint(dict(unet.config))

    # 1. Record teacher trajectories (cached).
    def teacher(n, seed, split):
        path = os.path.join(args.cache_dir, f"traj_{fingerprint}_{args.sampler}{steps}_g{args.guidance}_L{args.levels}"
                                            f"_{split}{n}_s{seed}.pt")
        if os.path.exists(path):
            return torch.load(path)
        labels, noise = trajectory_inputs(n, seed, tokens.num_classes)
        x, data = run(unet, tokens, labels, noise, args.sampler, steps, args.guidance, args.levels,
                      desc=f"record {split}")
        rec = {"labels": labels, "noise": noise, "x": x, "data": data}
        torch.save(rec, path + ".tmp")
        os.replace(path + ".tmp", path)
        return rec

    t0 = time.perf_counter()
    train, val = (teacher(args.train_trajectories, TRAIN_NOISE_SEED, "train"),
                  teacher(args.val_trajectories, VAL_NOISE_SEED, "val"))
    record_s = time.perf_counter() - t0
    d = train["data"]
    config = AdaptorConfig(in_channels=d["r_in"].shape[2], out_channels=d["r_out"].shape[2],
                           stride=d["r_in"].shape[-1] // d["r_out"].shape[-1], temb_dim=d["temb"].shape[-1],
                           text_dim=d["text"].shape[-1], hidden=args.hidden, levels=args.levels, clock=args.clock,
                           sampler=SAMPLERS[args.sampler], num_steps=steps, model=fingerprint,
                           inner_stride=args.inner_stride)
    train_rows = clocked_pairs(steps, args.clock, args.train_trajectories)
    val_rows = clocked_pairs(steps, args.clock, args.val_trajectories)
    weights = step_weights(train["data"], train_rows, steps, args.guidance, args.weighting)
    mix = {"guided": (1.0, 0.0), "branches": (0.0, 1.0), "both": (1.0, 1.0)}[args.loss]

    # 2./3. Training, resumable.
    torch.manual_seed(args.seed)
    adaptor = ClockworkAdaptor(config)
    opt = torch.optim.Adam(adaptor.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    total = args.iters + args.unroll_iters
    state = {"it": 0, "losses": [], "phase1_adaptor": None}
    ckpt = os.path.join(args.cache_dir, f"{name}_seed{args.seed}.ckpt.pt")
    signature = {"config": config.to_dict(), **{k: getattr(args, k) for k in (
        "iters", "unroll_iters", "batch", "lr", "loss", "weighting", "guidance", "train_trajectories",
        "unroll_trajectories")}}
    if args.resume and os.path.exists(ckpt):
        saved = torch.load(ckpt)
        if saved["signature"] != signature:
            raise SystemExit(f"--resume: {ckpt} was written for another configuration; delete it or drop --resume")
        adaptor.load_state_dict(saved["adaptor"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        state = saved["state"]
        print(f"resumed from {ckpt} at iteration {state['it']}")

    def save_ckpt():
        torch.save({"signature": signature, "adaptor": adaptor.state_dict(),
                    "opt": opt.state_dict(), "gen": gen.get_state(), "state": state}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)

    def lr_at(it):
        start, length = (0, args.iters) if it < args.iters else (args.iters, args.unroll_iters)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (it - start) / max(1, length))))

    def collect_unrolled():
        """Training trajectories sampled with the end-of-phase-1 adaptor in the loop."""
        snap = ClockworkAdaptor(config)
        snap.load_state_dict(state["phase1_adaptor"])
        snap.eval()
        m = min(args.unroll_trajectories, args.train_trajectories)
        _, data = run(unet, tokens, train["labels"][:m], train["noise"][:m], args.sampler, steps, args.guidance,
                      args.levels, clock=args.clock, adapt=snap, desc="record unrolled")
        return data, clocked_pairs(steps, args.clock, m)

    sets = [(train["data"], train_rows)]
    t0 = time.perf_counter()
    unrolled_s = 0.0
    if state["phase1_adaptor"] is not None:  # resumed in the on-policy phase
        t1 = time.perf_counter()
        sets.append(collect_unrolled())
        unrolled_s += time.perf_counter() - t1
    bar = progress(range(state["it"], total), "train")
    for it in bar:
        if it == args.iters and args.unroll_iters and len(sets) == 1:
            state["phase1_adaptor"] = {k: v.clone() for k, v in adaptor.state_dict().items()}
            t1 = time.perf_counter()
            sets.append(collect_unrolled())
            unrolled_s += time.perf_counter() - t1
        adaptor.train()
        # Each batch: pairs drawn uniformly from the union of the sets.
        sizes = torch.tensor([len(r) for _, r in sets])
        pick = torch.randint(int(sizes.sum()), (args.batch,), generator=gen)
        loss = 0.0
        offset = 0
        for data, rows in sets:
            sel = pick[(pick >= offset) & (pick < offset + len(rows))] - offset
            offset += len(rows)
            if len(sel) == 0:
                continue
            r_in, key, temb, text, target = gather(data, rows[sel])
            guided, branches = errors(adaptor(r_in, key, temb, text), target, args.guidance)
            t = rows[sel][:, 0]
            loss = loss + (mix[0] * guided * weights[0, t] + mix[1] * branches * weights[1, t]).sum()
        loss = loss / args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["losses"].append(round(float(loss.detach()), 7))
        state["it"] = it + 1
        if hasattr(bar, "set_postfix") and it % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.5f}")
        if state["it"] % args.save_every == 0 or state["it"] == total:
            save_ckpt()
    train_s = time.perf_counter() - t0 - unrolled_s
    adaptor.eval()

    # 4. Evaluation.
    t0 = time.perf_counter()
    tr = l2(adaptor, train["data"], train_rows, steps, args.guidance)
    va = l2(adaptor, val["data"], val_rows, steps, args.guidance)
    l2_log = {}
    for kind in ("branches", "guided"):
        (tr_id, tr_ad, _), (va_id, va_ad, va_steps) = tr[kind], va[kind]
        l2_log[kind] = {"train_identity": tr_id, "train_learned": tr_ad, "val_identity": va_id, "val_learned": va_ad,
                        "val_learned_over_identity": va_ad / va_id,
                        "val_mean_over_steps_of_learned_over_identity":
                            sum(ad / ident for ident, ad in va_steps.values()) / len(va_steps),
                        "val_per_step_identity_learned": {str(t): v for t, v in va_steps.items()}}
    ref = val["x"]
    x_id, d_id = run(unet, tokens, val["labels"], val["noise"], args.sampler, steps, args.guidance, args.levels,
                     clock=args.clock, adapt=lambda r_in, key, temb, text: key, desc="val identity")
    x_ad, d_ad = run(unet, tokens, val["labels"], val["noise"], args.sampler, steps, args.guidance, args.levels,
                     clock=args.clock, adapt=adaptor, desc="val learned")
    handle = frkern.patch(unet, frkern.Clockwork(args.clock, args.levels), backend="torch")
    try:
        x_fr, _ = run(unet, tokens, val["labels"], val["noise"], args.sampler, steps, args.guidance, args.levels,
                      handle=handle, record=False, desc="val frkern")
    finally:
        frkern.unpatch(unet)

    def on_trajectory(data):
        """L2 of the adaptor's output vs the true r_out along a method's own trajectory (clocked steps)."""
        key = torch.stack([data["r_out"][t - t % args.clock] for t in range(steps)])
        if data is d_ad:
            pred = []
            with torch.no_grad():
                for t in range(steps):
                    pred.append(adaptor(data["r_in"][t], key[t], data["temb"][t], data["text"])
                                if t % args.clock else key[t])
            pred = torch.stack(pred)
        else:
            pred = key
        m = torch.tensor([t % args.clock != 0 for t in range(steps)])
        return float(((pred[m] - data["r_out"][m]) ** 2).mean())

    with torch.no_grad():
        from flops import count_gflop

        one = (torch.randn(1, 3, 32, 32), torch.tensor(500), train["data"]["text"][:1])
        full_gflop = count_gflop(lambda: unet(*one))
        h = frkern.patch(unet, frkern.Clockwork(args.clock, args.levels), backend="torch")
        try:
            h.begin(2)
            h.set_step(0)
            unet(*one)
            h.set_step(1)
            clocked_gflop = count_gflop(lambda: unet(*one))
        finally:
            frkern.unpatch(unet)
    hw = tuple(train["data"]["r_out"].shape[-2:])
    ad_flops = adaptor_flops(config, hw, 1)
    eval_s = time.perf_counter() - t0

    stem = os.path.join(args.out, name)
    save_adaptor(adaptor, stem)
    assert torch.equal(load_adaptor(stem)(*gather(val["data"], val_rows[:4])[:4]),
                       adaptor(*gather(val["data"], val_rows[:4])[:4]))
    import diffusers

    log = {
        "command": "python bench/train_clockwork_adaptor.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config.to_dict(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "model")},
        "data": {"train": f"{args.train_trajectories} trajectories, noise seed {TRAIN_NOISE_SEED}, labels i % 8",
                 "val": f"{args.val_trajectories} trajectories, noise seed {VAL_NOISE_SEED}, labels i % 8",
                 "pairs_per_trajectory_set": {"train": len(train_rows), "val": len(val_rows)},
                 "cfg": f"guidance {args.guidance}; each trajectory gives an unconditional and a conditional element"},
        "training": f"offline distillation on teacher trajectories, {args.loss} loss, {args.weighting} per-step weighting"
                    + (f", then {args.unroll_iters} iterations on-policy (the first {args.unroll_trajectories} training"
                       " trajectories re-sampled with the adaptor in the loop, true r_out as target, union with the"
                       " teacher pairs)"
                       if args.unroll_iters else ""),
        "params": sum(p.numel() for p in adaptor.parameters()),
        "flops": {"adaptor_per_call_per_image": ad_flops, "unet_full_call_per_image": round(full_gflop * 1e9),
                  "unet_clocked_call_per_image": round(clocked_gflop * 1e9),
                  "inner_part_per_image": round((full_gflop - clocked_gflop) * 1e9),
                  "adaptor_over_inner_part": ad_flops / ((full_gflop - clocked_gflop) * 1e9)},
        "l2": l2_log,
        "end_to_end_val": {
            "identity": {"psnr_vs_full": psnr(x_id, ref), "mse_vs_full": float(((x_id - ref) ** 2).mean()),
                         "r_out_l2_on_own_trajectory": on_trajectory(d_id)},
            "learned": {"psnr_vs_full": psnr(x_ad, ref), "mse_vs_full": float(((x_ad - ref) ** 2).mean()),
                        "r_out_l2_on_own_trajectory": on_trajectory(d_ad)},
            "identity_hooks_vs_frkern_Clockwork_max_abs_diff": float((x_id - x_fr).abs().max()),
        },
        "losses": state["losses"],
        "wall_s": {"record_teacher": round(record_s, 1), "record_unrolled": round(unrolled_s, 1),
                   "train": round(train_s, 1), "eval": round(eval_s, 1),
                   "total": round(time.perf_counter() - t_start, 1)},
        "threads": args.threads, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with open(stem + ".log.json", "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")
    e = log["end_to_end_val"]
    print(f"{name}: params {log['params']}, adaptor {ad_flops / 1e6:.1f} MFLOP/call/image "
          f"({100 * log['flops']['adaptor_over_inner_part']:.1f}% of the inner part)")
    for kind, v in l2_log.items():
        print(f"  teacher-forced L2 ({kind:8s}) train: identity {v['train_identity']:.5f} learned "
              f"{v['train_learned']:.5f} | held-out: identity {v['val_identity']:.5f} learned {v['val_learned']:.5f} "
              f"({v['val_learned_over_identity']:.3f}x; per step on average "
              f"{v['val_mean_over_steps_of_learned_over_identity']:.3f}x)")
    print(f"  end to end (held-out, vs full compute): identity PSNR {e['identity']['psnr_vs_full']:.2f} dB, "
          f"learned {e['learned']['psnr_vs_full']:.2f} dB; identity == frkern Clockwork within "
          f"{e['identity_hooks_vs_frkern_Clockwork_max_abs_diff']:.2e}")
    print(f"  wall {log['wall_s']}; wrote {stem}.safetensors/.json/.log.json")
    return log


if __name__ == "__main__":
    main()
