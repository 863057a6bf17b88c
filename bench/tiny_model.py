"""The small class-conditional model frkern trains and ships (bench/assets/tiny_model/); a helper
module, not a script.

A diffusers UNet2DConditionModel with SD's block types, in pixel space (32x32 RGB), conditioned
by cross-attention on a learned table of class tokens (one class per scikit-image photograph,
plus a null class for classifier-free guidance). Shared by training, the quality harness,
Auto-FR and the README's main job.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_model")
# RGB photographs bundled with scikit-image (no download).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "colorwheel", "retina")
TOKENS, TOKEN_DIM = 4, 64

# SDXL-like level layout (attention at 16x16 and 8x8, not at 32x32) so it trains on a 2-core CPU.
UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TOKEN_DIM, attention_head_dim=4, norm_num_groups=16,
)


class ClassTokens(nn.Module):
    """Class id -> (TOKENS, TOKEN_DIM) text-like embedding; id == num_classes is the null class."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, TOKENS * TOKEN_DIM)
        nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).view(-1, TOKENS, TOKEN_DIM)


def load_photos(short_side: int = 64) -> list[np.ndarray]:
    """Each photograph as float32 HxWx3 in [-1, 1], its short side resized to `short_side`."""
    import skimage.data
    from skimage.transform import resize

    out = []
    for name in PHOTOS:
        im = getattr(skimage.data, name)()[..., :3].astype(np.float32) / 255.0
        h, w = im.shape[:2]
        s = short_side / min(h, w)
        im = resize(im, (round(h * s), round(w * s)), anti_aliasing=True)
        out.append((im * 2 - 1).astype(np.float32))
    return out


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def load(path: str = ASSET_DIR, device="cpu", dtype=torch.float32):
    """(unet, class_tokens) from the committed assets, offline."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no trained model at {path}: run python bench/train_tiny.py first")
    # the dtype at load time, not by .to(dtype) after it (diffusers warns about such casts), and no
    # low-memory init (it needs accelerate, which is optional, and gains nothing at 2.5 M parameters)
    unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=False).eval().to(device)
    state = load_file(os.path.join(path, "class_tokens.safetensors"))
    tokens = ClassTokens(state["table.weight"].shape[0] - 1)
    tokens.load_state_dict(state)
    return unet, tokens.eval().to(device, dtype)


@torch.no_grad()
def sample(unet, tokens, labels, steps=50, guidance=3.0, seed=0, noise=None, handle=None, scheduler=None):
    """CFG DDIM sampling; with `handle` (a frkern handle) the loop tells it the steps."""
    device, dtype = unet.device, unet.dtype
    n = labels.shape[0]
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, 3, 32, 32, generator=g)
    x = noise.to(device, dtype)
    cond = tokens(labels.to(device))
    uncond = tokens(torch.full_like(labels, tokens.num_classes).to(device))
    ehs = torch.cat([uncond, cond])
    sch = scheduler or ddim_scheduler()
    sch.set_timesteps(steps, device=device)
    if handle is not None:
        handle.begin(steps)
    for i, t in enumerate(sch.timesteps):
        if handle is not None:
            handle.set_step(i)
        eps = unet(torch.cat([x, x]), t, ehs).sample
        u, c = eps.chunk(2)
        x = sch.step(u + guidance * (c - u), t, x).prev_sample
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str, cols: int) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).resize((cols * w * 2, rows * h * 2), Image.NEAREST).save(path)
