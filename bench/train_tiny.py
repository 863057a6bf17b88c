"""Train the small class-conditional UNet that frkern ships (see bench/tiny_model.py).

    python bench/train_tiny.py --steps 4000            # CPU: slow but fine; GPU if available
Writes the UNet in diffusers format (config.json + safetensors), class_tokens.safetensors,
samples.png, training.json and MODEL_CARD.md to bench/results/local/tiny_model/; the committed model
is replaced only with an explicit --out bench/assets/tiny_model.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from options import DEVICE_HELP, LOCAL_RESULTS, add_out, default_device, help_before_imports  # noqa: E402
from options import parser as new_parser  # noqa: E402
from options import quiet_known_warnings  # noqa: E402


def parser():
    ap = new_parser(__doc__)
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=16, help="random 32x32 crops per step")
    ap.add_argument("--lr", type=float, default=4e-4, help="peak AdamW learning rate (one-cycle schedule)")
    ap.add_argument("--cfg-dropout", type=float, default=0.1,
                    help="probability of training on the null class (classifier-free guidance)")
    ap.add_argument("--ema", type=float, default=0.999, help="decay of the EMA weights that are saved")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and noise")
    ap.add_argument("--device", default=None, help=DEVICE_HELP)
    add_out(ap, "the trained model", default=os.path.join(LOCAL_RESULTS, "tiny_model"),
            committed="bench/assets/tiny_model")
    return ap


if __name__ == "__main__":
    help_before_imports(parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tiny_model import PHOTOS, UNET_CONFIG, ClassTokens, load_photos, sample, save_grid, to_uint8  # noqa: E402


def random_crops(photos, batch, rng, size=32):
    labels = rng.integers(0, len(photos), batch)
    out = np.empty((batch, 3, size, size), np.float32)
    for i, k in enumerate(labels):
        im = photos[k]
        y = rng.integers(0, im.shape[0] - size + 1)
        x = rng.integers(0, im.shape[1] - size + 1)
        crop = im[y:y + size, x:x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = crop.transpose(2, 0, 1)
    return torch.from_numpy(out), torch.from_numpy(labels)


def main(argv=None):
    args = parser().parse_args(argv)
    quiet_known_warnings()
    args.device = default_device(args.device)

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    photos = load_photos()
    unet = UNet2DConditionModel(**UNET_CONFIG).to(device).train()
    tokens = ClassTokens(len(photos)).to(device)
    ema_unet, ema_tokens = copy.deepcopy(unet).eval(), copy.deepcopy(tokens).eval()
    params = list(unet.parameters()) + list(tokens.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet {n_params / 1e6:.2f} M parameters, {len(photos)} classes, device {device}")

    t0 = time.time()
    losses = []
    bar = tqdm(range(args.steps), mininterval=10)
    for step in bar:
        x0, labels = random_crops(photos, args.batch, rng)
        x0, labels = x0.to(device), labels.to(device)
        drop = torch.rand(labels.shape, device=device) < args.cfg_dropout
        labels = torch.where(drop, torch.full_like(labels, len(photos)), labels)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],), device=device)
        xt = noise_sched.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, tokens(labels)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(list(ema_unet.parameters()) + list(ema_tokens.parameters()), params):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    wall = time.time() - t0

    os.makedirs(args.out, exist_ok=True)
    ema_unet.save_pretrained(args.out, safe_serialization=True)
    save_file({k: v.contiguous().cpu() for k, v in ema_tokens.state_dict().items()},
              os.path.join(args.out, "class_tokens.safetensors"))
    labels = torch.arange(len(photos)).repeat_interleave(4)
    imgs = to_uint8(sample(ema_unet, ema_tokens, labels, steps=50, guidance=3.0, seed=1))
    save_grid(imgs, os.path.join(args.out, "samples.png"), cols=8)
    final = float(np.mean(losses[-200:]))
    meta = {
        "command": "python bench/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "cfg_dropout": args.cfg_dropout,
        "wall_time_s": round(wall), "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "final_loss_last200": round(final, 5), "unet_params": n_params,
        "classes": list(PHOTOS),
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(args.out, "MODEL_CARD.md"), "w") as f:
        f.write(f"""# frkern tiny model

Class-conditional pixel-space diffusion UNet (`UNet2DConditionModel`, SD block types:
DownBlock2D + CrossAttnDownBlock2D x2, CrossAttnUpBlock2D x2 + UpBlock2D), {n_params / 1e6:.2f} M parameters,
32x32 RGB, epsilon prediction, 1000-step scaled-linear DDPM schedule (SD's betas).

- Data: random 32x32 crops (with horizontal flips) of scikit-image's bundled photographs, each resized
  to a short side of 64 px; one class per photograph: {', '.join(PHOTOS)}.
- Conditioning: cross-attention on {4} learned tokens of width 64 per class (`class_tokens.safetensors`,
  `bench/tiny_model.py:ClassTokens`); class {len(PHOTOS)} is the null class, used with probability
  {args.cfg_dropout} in training (classifier-free guidance).
- Training: `{meta['command']}`; {args.steps} steps of batch {args.batch}, AdamW lr {args.lr} (one-cycle),
  EMA {args.ema}; wall time {wall / 60:.1f} min on {meta['device']} ({meta['threads']} threads);
  final loss (mean of the last 200 steps) {final:.4f}. Weights saved are the EMA weights.
- Samples (`samples.png`): 50-step DDIM, guidance 3, four per class in class order (8 per row).

Load offline: `UNet2DConditionModel.from_pretrained("bench/assets/tiny_model")`, or
`bench/tiny_model.py:load()` for the UNet and the class tokens.
""")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
