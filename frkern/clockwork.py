"""Clockwork's learned adaptor in the patched UNet (the adaptor itself: frkern.adaptor).

On a clocked (reuse) call the Clockwork cut's first cached module, the outer level's downsampler,
still receives r_in (it is not run); the cut's last cached module, the up block whose output is
r_out, returns the adaptor's prediction from r_in, its cached r_out, the time embedding and the text
instead of the cached r_out itself (the identity adaptor). Keyframes are unchanged. Everything
stays inside the network, so CUDA graphs and torch.compile capture the adaptor too.
"""
from __future__ import annotations

from .cache import signature
from .units import CachedSegment, InnerSegment, _primary_input


class Tap:
    """r_in of the current call, handed from the downsampler to the adapted up block."""

    r_in = None


class TappedSegment(InnerSegment):
    """The cut's first cached module (an inner segment: its output feeds only cached modules), its
    input recorded as r_in."""

    def __init__(self, original, runtime, unit, cache_unit, backend, tap: Tap):
        super().__init__(original, runtime, unit, cache_unit, backend)
        object.__setattr__(self, "tap", tap)

    def forward(self, *args, **kwargs):
        self.tap.r_in = _primary_input(args, kwargs)
        return super().forward(*args, **kwargs)


class AdaptedSegment(CachedSegment):
    """The up block whose output is r_out: on reuse calls, adaptor(r_in, cached r_out, temb, text)."""

    def __init__(self, original, runtime, unit, cache_unit, backend, tap: Tap, adaptor):
        super().__init__(original, runtime, unit, cache_unit, backend)
        object.__setattr__(self, "tap", tap)
        object.__setattr__(self, "adaptor", adaptor)  # not a submodule: the state dict stays the UNet's

    def forward(self, *args, **kwargs):
        def adapted(r_out):
            r_in, self.tap.r_in = self.tap.r_in, None
            return self.adaptor(r_in, r_out, kwargs["temb"], kwargs["encoder_hidden_states"])

        def compute():
            out = self.run_original(*args, **kwargs)
            return out, out  # (output, state): the cached state is r_out itself

        return self.cached(signature(_primary_input(args, kwargs)), compute, reuse=adapted)


def adaptor_fit(model, parts, policy, adaptor) -> tuple[str, str]:
    """(first cached path, adapted path) of `policy`'s cut on `model` (whose map of parts is
    `parts`) after checking that `adaptor` fits them (channels, widths, levels, clock, model); a
    clear ValueError otherwise."""
    from .adaptor import check_adaptor, model_fingerprint

    levels = policy.levels
    n = len(parts.levels)
    if not 1 <= levels < n:
        raise ValueError(f"Clockwork: levels must lie in 1..{n - 1} for a UNet with {n} levels, got {levels}")
    down_level, up_level = parts.levels[levels - 1], parts.levels[levels]
    down = model.get_submodule(down_level.down_block)
    up = model.get_submodule(up_level.up_block)
    if not down_level.downsamplers:
        raise ValueError(f"Clockwork adaptor: {down_level.down_block} has no downsampler to take r_in from")
    if not getattr(up, "has_cross_attention", False):
        raise ValueError(f"Clockwork adaptor: {up_level.up_block} ({type(up).__name__}) gets no text "
                         "(a cross-attention up block is needed there)")
    # a video ResNet (SVD's SpatioTemporalResBlock) holds the 2-D one that sets its width
    r_in_channels = getattr(down.resnets[-1], "spatial_res_block", down.resnets[-1]).out_channels
    r_out_channels = getattr(up.resnets[-1], "spatial_res_block", up.resnets[-1]).out_channels
    # r_in sits at the outer level's resolution; r_out at the up block's output, which is upsampled
    # to the same resolution when the block has an upsampler
    stride = 1 if getattr(up, "upsamplers", None) else 2
    check_adaptor(adaptor, in_channels=r_in_channels, out_channels=r_out_channels, stride=stride,
                  temb_dim=model.get_submodule(parts.time_embedding).linear_2.out_features,
                  text_dim=parts.text_dim, levels=levels, clock=policy.clock,
                  model=model_fingerprint(dict(model.config)))
    return down_level.downsamplers[0], up_level.up_block
