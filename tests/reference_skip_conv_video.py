"""An independent statement of the Skip-Convolution gate for a temporal (kt, 1, 1) Conv3d, in plain
PyTorch with explicit loops in fp64, and hooks that apply it (and the 2-D statement) to the
convolutions of an unpatched diffusers video UNet.

The definition (x, x_ref: (N, C, F, H, W); z: (N, Cout, F, H, W); conv: Conv3d, kernel (kt, 1, 1),
padding (kt // 2, 0, 0), stride 1; tile B; threshold t >= 0):
 1. every (n, f) frame is gated like one image: B x B spatial tiles, border tiles cut at the edge.
    For tile T of frame (n, f): change = mean over T's pixels of sum_c |x - x_ref|; scale(n, f) =
    mean over all H * W pixels of frame (n, f) of sum_c |x_ref| (x_ref before this step's update).
    T is active iff change > t * scale.
 2. x_ref takes x on every active (n, f, T), all channels.
 3. dense = conv3d(new x_ref) (with bias). Output tile (n, f, T) is recomputed (dense) iff some
    active tile (n, f', T) -- same n, same spatial tile -- has |f' - f| <= kt // 2; otherwise it
    keeps z.
Returns (out, new x_ref).
"""
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer, TemporalResnetBlock

from test_skip_conv import skip_conv_fp64_loops


def _spans(size, tile):
    """[start, stop) of each tile along one axis, the last one cut at the edge."""
    return [(i, min(i + tile, size)) for i in range(0, size, tile)]


def temporal_tile_masks_fp64(x, x_ref, tile, threshold, kt):
    """(active, affected) of the definition as bool (N, 1, F, ceil(H/B), ceil(W/B)), tile by tile.

    active: step 1's gate (x_ref as before the update). affected: the output tiles step 3
    recomputes -- an active tile of the same n and spatial tile within kt // 2 frames."""
    x, x_ref = x.double(), x_ref.double()
    n_, _, f_, h, w = x.shape
    rows, cols = _spans(h, tile), _spans(w, tile)
    active = torch.zeros(n_, 1, f_, len(rows), len(cols), dtype=torch.bool)
    for n in range(n_):
        for f in range(f_):
            scale = x_ref[n, :, f].abs().sum(0).mean()
            for i, (r0, r1) in enumerate(rows):
                for j, (c0, c1) in enumerate(cols):
                    change = (x[n, :, f, r0:r1, c0:c1] - x_ref[n, :, f, r0:r1, c0:c1]).abs().sum(0).mean()
                    active[n, 0, f, i, j] = bool(change > threshold * scale)
    half = kt // 2
    affected = torch.zeros_like(active)
    for n in range(n_):
        for f in range(f_):
            for i in range(len(rows)):
                for j in range(len(cols)):
                    affected[n, 0, f, i, j] = any(
                        bool(active[n, 0, g, i, j]) for g in range(f_) if abs(g - f) <= half)
    return active, affected


def temporal_skip_conv_fp64_loops(x, x_ref, z, weight, bias, tile, threshold, conv=None):
    """The definition in fp64 with Python loops: (output, new x_ref), both float64.

    weight: (Cout, Cin, kt, 1, 1) with kt odd. conv: optional callable standing in for the
    convolution of step 3; it is applied to the new x_ref in x's dtype (x_ref only ever holds
    values of x, so that cast is exact) and its result is taken in fp64."""
    x_in_dtype = x.dtype
    x = x.double()
    x_ref = x_ref.double().clone()
    z = z.double().clone()
    kt = weight.shape[2]
    assert tuple(weight.shape[3:]) == (1, 1) and kt % 2 == 1, weight.shape
    assert x.dim() == 5 and x_ref.shape == x.shape, (x.shape, x_ref.shape)
    assert z.shape == (x.shape[0], weight.shape[0], *x.shape[2:]), (z.shape, x.shape, weight.shape)
    n_, _, f_, h, w = x.shape
    rows, cols = _spans(h, tile), _spans(w, tile)
    active, affected = temporal_tile_masks_fp64(x, x_ref, tile, threshold, kt)  # x_ref before the update
    for n in range(n_):
        for f in range(f_):
            for i, (r0, r1) in enumerate(rows):
                for j, (c0, c1) in enumerate(cols):
                    if active[n, 0, f, i, j]:
                        x_ref[n, :, f, r0:r1, c0:c1] = x[n, :, f, r0:r1, c0:c1]
    if conv is None:
        dense = F.conv3d(x_ref, weight.double(), None if bias is None else bias.double(),
                         stride=1, padding=(kt // 2, 0, 0))
    else:
        dense = conv(x_ref.to(x_in_dtype)).double()
    for n in range(n_):
        for f in range(f_):
            for i, (r0, r1) in enumerate(rows):
                for j, (c0, c1) in enumerate(cols):
                    if any(active[n, 0, g, i, j] for g in range(max(0, f - kt // 2), min(f_, f + kt // 2 + 1))):
                        z[n, :, f, r0:r1, c0:c1] = dense[n, :, f, r0:r1, c0:c1]
    return z, x_ref


class VideoGatedConvHooks:
    """Hooks on the convolutions of an unpatched diffusers video UNet: every ResnetBlock2D's
    conv1/conv2 (2-D statement), every TemporalResnetBlock's conv1/conv2 and the Conv3d closing
    each of a TemporalConvLayer's conv1..conv4 (temporal statement). Keyframes record
    (x, conv(x)) per convolution; other calls replace the convolution's output by the
    statement's, cast to the output's dtype, and keep the new (x_ref, output) as state."""

    def __init__(self, model, tile, threshold):
        self.keyframe, self.state, self.tile, self.threshold = True, {}, tile, threshold
        self.names = []
        for name, m in model.named_modules():
            if isinstance(m, ResnetBlock2D):
                for c in ("conv1", "conv2"):
                    self._register(f"{name}.{c}", getattr(m, c), skip_conv_fp64_loops)
            elif isinstance(m, TemporalResnetBlock):
                for c in ("conv1", "conv2"):
                    self._register(f"{name}.{c}", getattr(m, c), temporal_skip_conv_fp64_loops)
            elif isinstance(m, TemporalConvLayer):
                for c in ("conv1", "conv2", "conv3", "conv4"):
                    seq = getattr(m, c)
                    last = len(seq) - 1
                    assert isinstance(seq[last], torch.nn.Conv3d), seq
                    self._register(f"{name}.{c}.{last}", seq[last], temporal_skip_conv_fp64_loops)

    def _register(self, name, conv, statement):
        self.names.append(name)
        conv.register_forward_hook(partial(self._hook, name, statement))

    def weights(self, conv):
        """(weight, bias) of the convolution the module computes."""
        return conv.weight, conv.bias

    def _hook(self, name, statement, conv, args, out):
        x = args[0]
        if self.keyframe:
            self.state[name] = (x.double(), out.double())
            return None
        x_ref, z = self.state[name]
        z, x_ref = statement(x, x_ref, z, *self.weights(conv), self.tile, self.threshold)
        self.state[name] = (x_ref, z)
        return z.to(out.dtype)
