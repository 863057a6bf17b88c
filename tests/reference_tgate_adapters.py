"""Independent statements of T-GATE with adapters, for tests/test_tgate_adapters.py (written from
the definition and the `tgate` package, not from frkern's code).

- `with_controlnet(unet, controlnet, cond, scale)`: makes every call of `unet` first run the
  ControlNet on that call's (sample, t, encoder_hidden_states), the conditioning image repeated to
  the call's batch, and hand its residuals to the UNet: put under the tgate package's SD loader, it
  states "T-GATE on a ControlNet pipeline" (after the gate the package calls the UNet with the
  unconditional half only, so the ControlNet sees that half only).
- `TGateHooks(unet, gate_step, sp_interval, fi_interval, warm_up)`: T-GATE as forward hooks on
  every diffusers `Attention` of the UNet, driven by the package's own `tgate_scheduler` flags (so
  the schedule is the package's, the attention output is whatever the module and its processor
  compute, IP-Adapter branch included), plus a wrapper of the UNet call that from the gate on
  narrows every batch-leading input to its first (unconditional) half and returns that half's
  output for both halves.
- `ip_adapter_state_dict(unet, image_embed_dim, seed)`: random weights in the layout diffusers'
  `_load_ip_adapter_weights` reads (the original IP-Adapter checkpoint layout), no hub.
"""
from __future__ import annotations

import torch
from tgate.tgate_utils import tgate_scheduler


def attention_modules(unet):
    """Every module the package's register_forward patches: class name 'Attention'."""
    return [(n, m) for n, m in unet.named_modules() if m.__class__.__name__ == "Attention"]


def with_controlnet(unet, controlnet, cond, conditioning_scale):
    """Wrap `unet.forward` (instance attribute) so each call runs `controlnet` first. Returns the list
    of batch sizes the ControlNet ran at, one per call."""
    inner = unet.forward
    batches = []

    def forward(sample, timestep, encoder_hidden_states=None, **kwargs):
        n = sample.shape[0]
        batches.append(n)
        down, mid = controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=cond.repeat(n, 1, 1, 1), conditioning_scale=conditioning_scale,
                               guess_mode=False, return_dict=False)
        return inner(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                     down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs)

    unet.forward = forward
    return batches


def _first_half(x, n):
    if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] == n:
        return x[: n // 2]
    if isinstance(x, (list, tuple)):
        return type(x)(_first_half(v, n) for v in x)
    if isinstance(x, dict):
        return {k: _first_half(v, n) for k, v in x.items()}
    return x


class TGateHooks:
    """T-GATE on `unet` (to be used on a copy: it installs hooks and a forward wrapper for good).

    Per UNet call i (one call per step: DDIM, order 1, no warm-up steps), the flags are
    tgate_scheduler(i, ...): (ca, sa, keep_shape). Each Attention is cross when called with
    encoder_hidden_states, self otherwise; with its flags f: if f['reuse'] and it has a stored
    output, its output is that; else if f['cache'] it stores its output (keep_shape) or the mean
    (uncond + cond) / 2 of the output's two halves (not keep_shape, i.e. at gate_step - 1). The store
    is only written when caching (as the package's `if cache != None: self.cache = cache`).
    From call gate_step on, the UNet runs on the first half of every batch-leading input (sample,
    a batched timestep, encoder_hidden_states, added_cond_kwargs' tensors and lists of tensors,
    ControlNet residuals, timestep_cond) and its output is duplicated to the full batch.
    cfg=False (T-GATE on a batch that is not [uncond, cond], e.g. PAG's [uncond, cond, perturbed]
    with TGate(cfg=False)): no halving, and the gate stores each output as it is."""

    def __init__(self, unet, gate_step, sp_interval, fi_interval, warm_up, cfg=True):
        self.g = gate_step
        self.cfg = cfg  # False: the batch is not [uncond, cond]: nothing halved, the gate stores the output itself
        self.params = dict(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up)
        self.step = -1
        self.flags = None
        self.store = {}
        self.kinds = {}
        self.halved_inputs = []  # per call: the batch of the inputs the UNet ran on
        for name, mod in attention_modules(unet):
            # the package returns its cache before the residual / rescale / 4-d reshape, the module's
            # output after them: equal only when those are identities, as in transformer blocks
            assert not mod.residual_connection and mod.rescale_output_factor == 1.0, name
            mod.register_forward_hook(self._hook(name), with_kwargs=True)
        inner = unet.forward

        def forward(sample, timestep, *args, **kwargs):
            self.step += 1
            self.flags = tgate_scheduler(cur_step=self.step, **self.params)
            n = sample.shape[0]
            if self.step < self.g or not self.cfg:
                self.halved_inputs.append(n)
                return inner(sample, timestep, *args, **kwargs)
            assert n % 2 == 0, "T-GATE after the gate needs [uncond, cond] halves"
            return_dict = kwargs.pop("return_dict", True)
            sample, timestep, args, kwargs = _first_half((sample, timestep, args, kwargs), n)
            self.halved_inputs.append(sample.shape[0])
            out = inner(sample, timestep, *args, return_dict=False, **kwargs)[0]
            out = torch.cat([out, out])
            if return_dict:
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
                return UNet2DConditionOutput(sample=out)
            return (out,)

        unet.forward = forward

    def _hook(self, name):
        def hook(mod, args, kwargs, out):
            ehs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
                args[1] if len(args) > 1 else None)
            cross = ehs is not None
            kind = "cross" if cross else "self"
            assert self.kinds.setdefault(name, kind) == kind
            ca, sa, keep_shape = self.flags
            f = ca if cross else sa
            if f["reuse"] and name in self.store:
                return self.store[name]
            if f["cache"]:
                if keep_shape or not self.cfg:
                    self.store[name] = out
                else:
                    uncond, cond = out.chunk(2)
                    self.store[name] = (uncond + cond) / 2
            return out
        return hook


def ip_adapter_state_dict(unet, image_embed_dim=16, seed=0, std=0.2):
    """{'image_proj': ..., 'ip_adapter': ...} for one plain IP-Adapter (ImageProjection, 4 tokens),
    random weights. Key ids 1, 3, 5, ... follow unet.attn_processors' order over the cross-attention
    processors, hidden sizes the block they sit in, as diffusers' converter reads them."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    cad = cfg.cross_attention_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        ip[f"{key_id}.to_k_ip.weight"] = rnd(hidden, cad)
        ip[f"{key_id}.to_v_ip.weight"] = rnd(hidden, cad)
        key_id += 2
    proj = {"proj.weight": rnd(4 * cad, image_embed_dim), "proj.bias": rnd(4 * cad),
            "norm.weight": 1 + rnd(cad), "norm.bias": rnd(cad)}
    return {"image_proj": proj, "ip_adapter": ip}
