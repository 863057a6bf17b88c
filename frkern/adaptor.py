"""Clockwork's learned adaptor (Habibian et al., 2024; REFERENCE §2): a small network that replaces
the identity adaptor on clocked steps.

On a clocked step Clockwork runs only the outer `levels` resolution levels. The inner part's
input is `r_in` (the hidden state entering `down_blocks[levels-1].downsamplers[0]`) and its output
`r_out` (the hidden state returned by `up_blocks[n-1-levels]`, the input of `up_blocks[n-levels]`).
The identity adaptor reuses `r_out` from the last full step; this module predicts it instead:

    r_out_hat = r_out_prev + head(r_in, r_out_prev, temb, pooled text)

Architecture (``S = config.inner_stride``, the factor by which the adaptor works below r_out's
resolution; ``S_in = config.stride * S``; ``K(s) = s + 1`` for s > 1, 3 for s == 1; padding
``K // 2``):

    h = Conv2d(in_channels -> hidden, K(S_in), stride S_in)(r_in)
      + Conv2d(out_channels -> hidden, K(S), stride S)(r_out_prev)
      + Linear(text_dim -> hidden)(mean of text over tokens)[:, :, None, None]
    2 x time-conditioned ResBlock:
      g = Conv3x3(silu(GroupNorm(h))) + Linear(temb_dim -> hidden)(silu(temb))[:, :, None, None]
      h = h + Conv3x3(silu(GroupNorm(g)))
    d = ConvTranspose2d(hidden -> out_channels, K(S), stride S)(silu(GroupNorm(h)))   # output_size = r_out's
        (a 3x3 Conv2d when S == 1); weight and bias zero-initialised
    r_out_hat = r_out_prev + d

GroupNorms have gcd(8, hidden) groups. A fresh adaptor therefore returns r_out_prev + 0: exactly
the identity adaptor. The network runs in its parameters' dtype; the result has r_out_prev's dtype.

Files: `save_adaptor(adaptor, "dir/name")` writes ``dir/name.safetensors`` (weights) and
``dir/name.json`` (``{"format": "frkern.clockwork_adaptor", "version": 1, "config": {...}}``).
Every function taking a path accepts the stem or either file's path.

This module knows torch and safetensors only (no diffusers).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "frkern.clockwork_adaptor"
VERSION = 1

# UNet2DConditionModel config fields that decide the features an adaptor sees (not sample_size:
# the adaptor is resolution independent).
FINGERPRINT_FIELDS = (
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "mid_block_type", "layers_per_block", "cross_attention_dim", "attention_head_dim",
    "num_attention_heads", "transformer_layers_per_block", "norm_num_groups", "norm_eps", "act_fn",
    "time_embedding_type", "time_embedding_dim", "flip_sin_to_cos", "freq_shift",
    "addition_embed_type", "addition_time_embed_dim", "class_embed_type", "encoder_hid_dim_type",
    "use_linear_projection", "resnet_time_scale_shift", "conv_in_kernel", "conv_out_kernel",
    "only_cross_attention", "upcast_attention", "attention_type",
)


def model_fingerprint(unet_config: dict) -> str:
    """First 16 hex digits of the sha256 of the sorted JSON of the UNet config's FINGERPRINT_FIELDS
    (absent fields count as null; tuples and lists are the same). Pass the model's complete config
    (`unet.config`): a partial dict that leaves defaults out gives another fingerprint."""
    if not isinstance(unet_config, dict):
        raise ValueError(f"model_fingerprint: expected the UNet's config dict, got {type(unet_config).__name__}")
    fields = {k: unet_config.get(k) for k in FINGERPRINT_FIELDS}
    text = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _power_of_two(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


@dataclass(frozen=True)
class AdaptorConfig:
    """Shapes of the adaptor and what it was trained for.

    in_channels / out_channels: channels of r_in / r_out. stride: r_in's spatial size over r_out's
    (a power of 2; 1 for a standard UNet's Clockwork cut, where both sit at the same resolution).
    temb_dim: the UNet's time embedding width (the `temb` its blocks get). text_dim: the encoder
    hidden states' width. hidden: the adaptor's width. inner_stride: how far below r_out's
    resolution the adaptor works (power of 2). levels, clock, sampler (scheduler class name),
    num_steps, model (`model_fingerprint(unet.config)`): what it was trained for.
    """

    in_channels: int
    out_channels: int
    stride: int
    temb_dim: int
    text_dim: int
    hidden: int
    levels: int
    clock: int
    sampler: str
    num_steps: int
    model: str
    inner_stride: int = 2

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "temb_dim", "text_dim", "hidden", "levels", "num_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AdaptorConfig: {name} must be a positive int, got {v!r}")
        if not isinstance(self.clock, int) or isinstance(self.clock, bool) or self.clock < 2:
            raise ValueError(f"AdaptorConfig: clock must be an int >= 2 (clock 1 has no clocked steps), got {self.clock!r}")
        for name in ("stride", "inner_stride"):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(f"AdaptorConfig: {name} must be a power of 2 (1, 2, 4, ...), got {getattr(self, name)!r}")
        for name in ("sampler", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"AdaptorConfig: {name} must be a non-empty string, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptorConfig":
        if not isinstance(d, dict):
            raise ValueError(f"AdaptorConfig: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = sorted(set(d) - names), sorted(required - set(d))
        if unknown or missing:
            raise ValueError(f"AdaptorConfig: unknown fields {unknown}, missing fields {missing}")
        return cls(**d)


def _kernel(s: int) -> int:
    return s + 1 if s > 1 else 3


def _groups(hidden: int) -> int:
    return math.gcd(8, hidden)


class _ResBlock(nn.Module):
    def __init__(self, hidden: int, temb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(hidden), hidden)
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, hidden)
        self.norm2 = nn.GroupNorm(_groups(hidden), hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        g = self.conv1(F.silu(self.norm1(h))) + self.time_proj(temb_act)[:, :, None, None]
        return h + self.conv2(F.silu(self.norm2(g)))


class ClockworkAdaptor(nn.Module):
    """r_out_hat = r_out_prev + head(r_in, r_out_prev, temb, text); see the module docstring."""

    def __init__(self, config: AdaptorConfig):
        super().__init__()
        if not isinstance(config, AdaptorConfig):
            raise ValueError(f"ClockworkAdaptor: expected an AdaptorConfig, got {type(config).__name__}")
        self.config = config
        c, s = config, config.inner_stride
        s_in = c.stride * s
        self.conv_in = nn.Conv2d(c.in_channels, c.hidden, _kernel(s_in), stride=s_in, padding=_kernel(s_in) // 2)
        self.conv_prev = nn.Conv2d(c.out_channels, c.hidden, _kernel(s), stride=s, padding=_kernel(s) // 2)
        self.text_proj = nn.Linear(c.text_dim, c.hidden)
        self.blocks = nn.ModuleList([_ResBlock(c.hidden, c.temb_dim) for _ in range(2)])
        self.norm_out = nn.GroupNorm(_groups(c.hidden), c.hidden)
        if s == 1:
            self.conv_out = nn.Conv2d(c.hidden, c.out_channels, 3, padding=1)
        else:
            self.conv_out = nn.ConvTranspose2d(c.hidden, c.out_channels, _kernel(s), stride=s, padding=_kernel(s) // 2)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _check(self, r_in, r_out_prev, temb, text):
        c = self.config
        problems = []
        if r_in.dim() != 4 or r_in.shape[1] != c.in_channels:
            problems.append(f"r_in must be (B, {c.in_channels}, H, W), got {tuple(r_in.shape)}")
        if r_out_prev.dim() != 4 or r_out_prev.shape[1] != c.out_channels:
            problems.append(f"r_out_prev must be (B, {c.out_channels}, H, W), got {tuple(r_out_prev.shape)}")
        elif r_in.dim() == 4 and tuple(r_in.shape[-2:]) != tuple(c.stride * v for v in r_out_prev.shape[-2:]):
            problems.append(f"r_in's size {tuple(r_in.shape[-2:])} must be {c.stride} x r_out_prev's "
                            f"{tuple(r_out_prev.shape[-2:])}")
        if temb.dim() != 2 or temb.shape[1] != c.temb_dim:
            problems.append(f"temb must be (B, {c.temb_dim}), got {tuple(temb.shape)}")
        if text.dim() != 3 or text.shape[2] != c.text_dim:
            problems.append(f"text must be (B, L, {c.text_dim}), got {tuple(text.shape)}")
        batches = {t.shape[0] for t in (r_in, r_out_prev, temb, text) if t.dim() > 0}
        if len(batches) > 1:
            problems.append(f"batch sizes differ: r_in {r_in.shape[0]}, r_out_prev {r_out_prev.shape[0]}, "
                            f"temb {temb.shape[0]}, text {text.shape[0]}")
        if problems:
            raise ValueError("ClockworkAdaptor: " + "; ".join(problems))

    def forward(self, r_in: torch.Tensor, r_out_prev: torch.Tensor, temb: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        self._check(r_in, r_out_prev, temb, text)
        dt = self.conv_in.weight.dtype
        h = self.conv_in(r_in.to(dt)) + self.conv_prev(r_out_prev.to(dt))
        h = h + self.text_proj(text.to(dt).mean(dim=1))[:, :, None, None]
        temb_act = F.silu(temb.to(dt))
        for block in self.blocks:
            h = block(h, temb_act)
        h = F.silu(self.norm_out(h))
        if isinstance(self.conv_out, nn.ConvTranspose2d):
            d = self.conv_out(h, output_size=list(r_out_prev.shape[-2:]))
        else:
            d = self.conv_out(h)
        return r_out_prev + d.to(r_out_prev.dtype)


def _paths(path) -> tuple[str, str]:
    path = os.fspath(path)
    for ext in (".safetensors", ".json"):
        if path.endswith(ext):
            path = path[: -len(ext)]
            break
    return path + ".safetensors", path + ".json"


def save_adaptor(adaptor: ClockworkAdaptor, path) -> tuple[str, str]:
    """Write `<stem>.safetensors` (weights, fp32 unless the adaptor is in another dtype) and
    `<stem>.json` (the config); `path` is the stem or either file's path. Returns both paths."""
    from safetensors.torch import save_file

    if not isinstance(adaptor, ClockworkAdaptor):
        raise ValueError(f"save_adaptor: expected a ClockworkAdaptor, got {type(adaptor).__name__}")
    weights, meta = _paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(weights)), exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adaptor.state_dict().items()}
    save_file(state, weights, metadata={"format": FORMAT, "version": str(VERSION)})
    with open(meta, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "config": adaptor.config.to_dict()}, f, indent=1)
        f.write("\n")
    return weights, meta


def load_adaptor(path, device=None, dtype=None) -> ClockworkAdaptor:
    """The adaptor saved at `path` (stem or either file's path), in eval mode, on `device` in
    `dtype` (default: CPU, the stored dtype). ValueError when a file is missing or unreadable, the
    config is invalid, or the weights do not match the config (names, shapes, non-finite values)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, meta = _paths(path)
    missing = [p for p in (weights, meta) if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"load_adaptor: missing file(s) {missing} (an adaptor is <stem>.safetensors + <stem>.json)")
    try:
        with open(meta) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"load_adaptor: {meta} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
        raise ValueError(f"load_adaptor: {meta} is not a {FORMAT} file (needs 'format': '{FORMAT}' and 'config')")
    if doc.get("version") != VERSION:
        raise ValueError(f"load_adaptor: {meta} has format version {doc.get('version')!r}, this frkern reads {VERSION}")
    try:
        config = AdaptorConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adaptor: bad config in {meta}: {e}") from e
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"load_adaptor: {weights} is not a readable safetensors file: {e}") from e
    adaptor = ClockworkAdaptor(config)
    expected = adaptor.state_dict()
    problems = []
    if set(state) != set(expected):
        problems.append(f"missing weights {sorted(set(expected) - set(state))}, unexpected weights "
                        f"{sorted(set(state) - set(expected))}")
    for k in sorted(set(state) & set(expected)):
        if state[k].shape != expected[k].shape:
            problems.append(f"{k} has shape {tuple(state[k].shape)}, the config needs {tuple(expected[k].shape)}")
        elif not state[k].is_floating_point():
            problems.append(f"{k} has dtype {state[k].dtype}, expected a floating-point tensor")
        elif not torch.isfinite(state[k]).all():
            problems.append(f"{k} has non-finite values")
    if problems:
        raise ValueError(f"load_adaptor: weights {weights} do not match the config in {meta}: " + "; ".join(problems))
    stored = {v.dtype for v in state.values()}
    adaptor = adaptor.to(dtype if dtype is not None else (stored.pop() if len(stored) == 1 else torch.float32))
    adaptor.load_state_dict(state)
    return adaptor.to(device=device).eval()


def check_adaptor(adaptor_config, *, in_channels: int, out_channels: int, stride: int, temb_dim: int,
                  text_dim: int, levels: int, clock: int, sampler: str | None = None,
                  num_steps: int | None = None, model: str | None = None) -> None:
    """Raise one ValueError naming every way the adaptor does not fit (None: not checked).
    `adaptor_config`: an AdaptorConfig or a ClockworkAdaptor. `sampler` is the scheduler's class
    name, `model` is `model_fingerprint(unet.config)`."""
    if isinstance(adaptor_config, ClockworkAdaptor):
        adaptor_config = adaptor_config.config
    if not isinstance(adaptor_config, AdaptorConfig):
        raise ValueError(f"check_adaptor: expected an AdaptorConfig or ClockworkAdaptor, got {type(adaptor_config).__name__}")
    c = adaptor_config
    # (field, what this UNet / policy / generation has (None: not checked), the mismatch in words)
    expected = [
        ("in_channels", in_channels, "adaptor expects r_in with {} channels, this UNet gives {}"),
        ("out_channels", out_channels, "adaptor expects r_out with {} channels, this UNet gives {}"),
        ("stride", stride, "adaptor expects r_in at {}x r_out's resolution, this UNet gives {}x"),
        ("temb_dim", temb_dim, "adaptor expects a time embedding of width {}, this UNet gives {}"),
        ("text_dim", text_dim, "adaptor expects text embeddings of width {}, this UNet takes {}"),
        ("levels", levels, "adaptor was trained for levels {}, the policy has levels {}"),
        ("clock", clock, "adaptor was trained for clock {}, the policy has clock {}"),
        ("model", model, "adaptor was trained on UNet model {}, this UNet is {}"),
        ("sampler", sampler, "adaptor was trained for sampler {}, the pipeline uses {}"),
        ("num_steps", num_steps, "adaptor was trained for {} steps, this generation has {}"),
    ]
    problems = [msg.format(getattr(c, field), have) for field, have, msg in expected
                if have is not None and getattr(c, field) != have]
    if problems:
        raise ValueError("Clockwork adaptor does not fit: " + "; ".join(problems))


def _conv_flops(batch, cin, cout, k, spatial) -> int:
    return 2 * batch * cin * cout * k * k * spatial


def adaptor_flops(config: AdaptorConfig, r_out_hw: tuple[int, int], batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one forward call's convolutions and linear layers, as
    torch.utils.flop_counter counts them (no bias adds, norms or activations); r_out_hw is r_out's
    (H, W)."""
    c, s = config, config.inner_stride
    h, w = r_out_hw
    inner = -(-h // s) * -(-w // s)  # ceil(h/s) * ceil(w/s): the adaptor's working resolution
    flops = _conv_flops(batch, c.in_channels, c.hidden, _kernel(c.stride * s), inner)
    flops += _conv_flops(batch, c.out_channels, c.hidden, _kernel(s), inner)
    flops += 2 * batch * c.text_dim * c.hidden
    flops += 2 * (2 * _conv_flops(batch, c.hidden, c.hidden, 3, inner) + 2 * batch * c.temb_dim * c.hidden)
    # ConvTranspose2d: counted per input pixel; a plain 3x3 conv (inner_stride 1) per output pixel (the same).
    flops += _conv_flops(batch, c.hidden, c.out_channels, _kernel(s), inner)
    return flops
