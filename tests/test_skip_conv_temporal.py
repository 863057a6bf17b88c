"""The temporal (kt, 1, 1) Skip-Convolution gate (skip_conv_temporal_reference) against the
independent fp64 statement of its definition in reference_skip_conv_video.py."""
import pytest
import torch

from frkern.kernels.skip_conv import skip_conv_temporal_reference
from reference_skip_conv_video import _spans, temporal_skip_conv_fp64_loops, temporal_tile_masks_fp64


def _conv(cin, cout, kt, g):
    conv = torch.nn.Conv3d(cin, cout, (kt, 1, 1), padding=(kt // 2, 0, 0))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return conv


def _regional_change(shape, tile, g, scale=0.8):
    """A change concentrated in one spatial rectangle on some frames of each sample, plus a
    few scattered pixels elsewhere (small, so only low thresholds pick them up)."""
    n_, c, f_, h, w = shape
    mask = torch.zeros(n_, 1, f_, h, w)
    for n in range(n_):
        r0 = int(torch.randint(0, h, (1,), generator=g))
        c0 = int(torch.randint(0, w, (1,), generator=g))
        r1 = r0 + int(torch.randint(1, tile + 2, (1,), generator=g))
        c1 = c0 + int(torch.randint(1, tile + 2, (1,), generator=g))
        frames = torch.rand(f_, generator=g) > 0.5
        mask[n, 0, frames, r0:r1, c0:c1] = 1.0
    sparse = (torch.rand(n_, 1, f_, h, w, generator=g) > 0.97).float() * 0.05
    return torch.randn(shape, generator=g) * (mask * scale + sparse)


def _dilate(active, half):
    """active dilated over frames by half, written out in loops."""
    out = torch.zeros_like(active)
    n_, _, f_, th, tw = active.shape
    for n in range(n_):
        for f in range(f_):
            for i in range(th):
                for j in range(tw):
                    out[n, 0, f, i, j] = any(bool(active[n, 0, g, i, j])
                                             for g in range(f_) if abs(g - f) <= half)
    return out


def _check_masks(active, affected, want_active, kt):
    n_, _, f_, th, tw = want_active.shape
    assert active.dtype == torch.bool and affected.dtype == torch.bool
    assert active.shape == (n_, 1, f_, th, tw) and affected.shape == active.shape
    assert torch.equal(active, want_active)
    assert torch.equal(affected, _dilate(active, kt // 2))


@pytest.mark.parametrize("kt", [3, 1])
@pytest.mark.parametrize("tile, size", [(4, (13, 9)), (3, (7, 11)), (8, (16, 16))])
@pytest.mark.parametrize("frames", [1, 4, 5])
@pytest.mark.parametrize("threshold", [0.0, 0.15, 0.4, 1e9])
def test_temporal_skip_conv_matches_the_fp64_definition_step_by_step(kt, tile, size, frames, threshold):
    g = torch.Generator().manual_seed(1000 * kt + 100 * tile + 10 * frames + int(threshold * 100) % 97)
    cin, cout = (6, 5) if frames != 4 else (3, 7)
    conv = _conv(cin, cout, kt, g)
    shape = (2, cin, frames, *size)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        x_ref, z = x.clone(), conv(x)
        x_ref64, z64 = x_ref.double(), z.double()
        for step in range(3):
            x = x + _regional_change(shape, tile, g)
            want_active, _ = temporal_tile_masks_fp64(x, x_ref64, tile, threshold, kt)
            out, x_ref, active, affected = skip_conv_temporal_reference(
                x, x_ref, z, conv.weight, conv.bias, tile, threshold)
            want, x_ref64 = temporal_skip_conv_fp64_loops(x, x_ref64, z64, conv.weight, conv.bias, tile, threshold)
            z64 = want
            assert out.shape == z.shape and out.dtype == torch.float32
            assert torch.isfinite(out).all() and torch.isfinite(x_ref).all()
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x_ref.double(), x_ref64, rtol=0, atol=0)
            _check_masks(active, affected, want_active, kt)
            if threshold == 0.0:  # every change recomputed: the dense convolution of x
                torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
                assert torch.equal(x_ref, x)
            if threshold == 1e9:
                assert not active.any() and not affected.any()
                assert torch.equal(out, z)
            z = out


@pytest.mark.parametrize("kt", [3, 1])
def test_threshold_zero_recomputes_exactly_the_changed_tiles_and_their_temporal_neighbours(kt):
    g = torch.Generator().manual_seed(7 + kt)
    tile, (h, w), f_ = 4, (10, 7), 6  # tiles: rows [0,4) [4,8) [8,10), cols [0,4) [4,7)
    conv = _conv(3, 5, kt, g)
    x_ref = torch.randn(2, 3, f_, h, w, generator=g)
    z = torch.randn(2, 5, f_, h, w, generator=g)  # unrelated to x_ref: shows which tiles are kept
    changed = [(0, 0, 1, 0), (0, 3, 2, 1), (1, 5, 0, 1), (1, 2, 1, 1)]  # (n, f, tile row, tile col)
    x = x_ref.clone()
    for n, f, i, j in changed:  # one pixel of the tile, one channel
        x[n, 1, f, i * tile + (1 if i < 2 else 0), j * tile + 2] += 0.5
    rows, cols = _spans(h, tile), _spans(w, tile)
    want_active = torch.zeros(2, 1, f_, len(rows), len(cols), dtype=torch.bool)
    for n, f, i, j in changed:
        want_active[n, 0, f, i, j] = True
    want_affected = torch.zeros_like(want_active)
    for n, f, i, j in changed:
        for df in range(-(kt // 2), kt // 2 + 1):
            if 0 <= f + df < f_:
                want_affected[n, 0, f + df, i, j] = True
    with torch.no_grad():
        out, new_ref, active, affected = skip_conv_temporal_reference(
            x, x_ref, z, conv.weight, conv.bias, tile, 0.0)
        dense = conv(x)
    assert torch.equal(active, want_active)
    assert torch.equal(affected, want_affected)
    assert torch.equal(new_ref, x)
    for n in range(2):
        for f in range(f_):
            for i, (r0, r1) in enumerate(rows):
                for j, (c0, c1) in enumerate(cols):
                    got = out[n, :, f, r0:r1, c0:c1]
                    if want_affected[n, 0, f, i, j]:
                        torch.testing.assert_close(got, dense[n, :, f, r0:r1, c0:c1], rtol=1e-5, atol=1e-5)
                    else:
                        assert torch.equal(got, z[n, :, f, r0:r1, c0:c1]), (n, f, i, j)


@pytest.mark.parametrize("kt", [3, 1])
def test_huge_threshold_keeps_z_bit_for_bit(kt):
    g = torch.Generator().manual_seed(21 + kt)
    conv = _conv(6, 5, kt, g)
    x_ref = torch.randn(2, 6, 5, 9, 13, generator=g)
    x = x_ref + torch.randn(x_ref.shape, generator=g) * 3.0
    z = torch.randn(2, 5, 5, 9, 13, generator=g)
    with torch.no_grad():
        out, new_ref, active, affected = skip_conv_temporal_reference(
            x, x_ref, z, conv.weight, conv.bias, 4, 1e9)
    assert torch.equal(out, z)
    assert torch.equal(new_ref, x_ref)
    assert not active.any() and not affected.any()
    assert active.shape == (2, 1, 5, 3, 4)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1e9])
def test_callers_x_ref_and_z_are_not_modified(threshold):
    g = torch.Generator().manual_seed(31)
    conv = _conv(3, 7, 3, g)
    x_ref = torch.randn(1, 3, 4, 8, 8, generator=g)
    x = x_ref + _regional_change(x_ref.shape, 4, g, scale=2.0)
    z = torch.randn(1, 7, 4, 8, 8, generator=g)
    x0, x_ref0, z0 = x.clone(), x_ref.clone(), z.clone()
    with torch.no_grad():
        out, new_ref, active, affected = skip_conv_temporal_reference(
            x, x_ref, z, conv.weight, conv.bias, 4, threshold)
    assert torch.equal(x, x0) and torch.equal(x_ref, x_ref0) and torch.equal(z, z0)
    want, want_ref = temporal_skip_conv_fp64_loops(x, x_ref, z, conv.weight, conv.bias, 4, threshold)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_ref.double(), want_ref, rtol=0, atol=0)


@pytest.mark.parametrize("kt", [3, 1])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_conv_callable_gives_the_recomputed_values(kt, threshold):
    g = torch.Generator().manual_seed(41 + kt)
    module = _conv(6, 5, kt, g)
    calls = []

    def conv(t):
        calls.append(t.shape)
        return module(t) + 1.0

    weight = torch.zeros_like(module.weight)  # only its shape may be used
    x_ref = torch.randn(2, 6, 5, 11, 7, generator=g)
    z = module(x_ref).detach()
    x = x_ref + _regional_change(x_ref.shape, 3, g)
    with torch.no_grad():
        out, new_ref, active, affected = skip_conv_temporal_reference(
            x, x_ref, z, weight, None, 3, threshold, conv=conv)
        want, want_ref = temporal_skip_conv_fp64_loops(x, x_ref, z, weight, None, 3, threshold, conv=conv)
    assert calls, "the callable was not used"
    assert affected.any() and not affected.all()  # both kinds of tile present
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_ref.double(), want_ref, rtol=0, atol=0)
    want_active, _ = temporal_tile_masks_fp64(x, x_ref, 3, threshold, kt)
    _check_masks(active, affected, want_active, kt)


def test_bad_input_raises_value_error():
    w = torch.randn(5, 4, 3, 1, 1)
    x = torch.randn(1, 4, 3, 8, 8)
    z = torch.randn(1, 5, 3, 8, 8)
    with pytest.raises(ValueError):  # a 4-D x
        skip_conv_temporal_reference(x[:, :, 0], x[:, :, 0], z[:, :, 0], w, None, 4, 0.1)
    with pytest.raises(ValueError):  # x_ref of another shape
        skip_conv_temporal_reference(x, x[:, :2], z, w, None, 4, 0.1)
    with pytest.raises(ValueError):  # x_ref with other frames
        skip_conv_temporal_reference(x, x[:, :, :2], z, w, None, 4, 0.1)
    with pytest.raises(ValueError):  # z with other frames
        skip_conv_temporal_reference(x, x, z[:, :, :2], w, None, 4, 0.1)


def test_video_hooks_state_the_definition_on_a_tiny_video_unet():
    """VideoGatedConvHooks (used by the video-UNet tests) on every hooked convolution: an unchanged
    input reproduces the keyframe bit for bit; threshold 0 recomputes every change (the dense UNet)."""
    import copy

    from diffusers import UNet3DConditionModel
    from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer

    from reference_skip_conv_video import VideoGatedConvHooks

    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=4).eval()
    with torch.no_grad():  # the temporal layers' last convolution starts at zero: make it count
        for p in unet.parameters():
            if p.dim() == 5:
                p.normal_(std=0.2)
    ref = copy.deepcopy(unet)
    hooks = VideoGatedConvHooks(ref, tile=4, threshold=0.0)
    assert {"down_blocks.0.resnets.0.conv1", "down_blocks.0.temp_convs.0.conv1.2",
            "down_blocks.0.temp_convs.0.conv4.3", "mid_block.temp_convs.0.conv2.3"} <= set(hooks.names)
    layers = sum(isinstance(m, TemporalConvLayer) for m in unet.modules())
    resnets = sum(isinstance(m, ResnetBlock2D) for m in unet.modules())
    assert layers and len(hooks.names) == 4 * layers + 2 * resnets
    x, ehs = torch.randn(1, 4, 3, 16, 16), torch.randn(1, 5, 8)
    with torch.no_grad():
        key = ref(x, 10, ehs).sample
        assert torch.equal(key, unet(x, 10, ehs).sample)
        hooks.keyframe = False
        assert torch.equal(ref(x, 10, ehs).sample, key)
        x2 = x.clone()
        x2[:, :, 1, :5, :5] += 0.3
        torch.testing.assert_close(ref(x2, 10, ehs).sample, unet(x2, 10, ehs).sample, rtol=1e-4, atol=1e-4)
