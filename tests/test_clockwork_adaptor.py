"""Clockwork's learned adaptor (frkern/adaptor.py): identity at initialisation, the forward against
an independent functional statement, files, fit checks and FLOP figures."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from frkern.adaptor import (AdaptorConfig, ClockworkAdaptor, adaptor_flops, check_adaptor, load_adaptor,
                            model_fingerprint, save_adaptor)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "bench", "assets", "tiny_model", "config.json")
ADAPTORS = os.path.join(REPO, "bench", "results", "adaptors")


def config(**kw) -> AdaptorConfig:
    base = dict(in_channels=8, out_channels=12, stride=1, temb_dim=20, text_dim=6, hidden=16, levels=1, clock=3,
                sampler="DDIMScheduler", num_steps=50, model="0123456789abcdef")
    base.update(kw)
    return AdaptorConfig(**base)


def inputs(c: AdaptorConfig, hw=(10, 9), batch=2, tokens=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    return (torch.randn(batch, c.in_channels, h * c.stride, w * c.stride, generator=g).to(dtype),
            torch.randn(batch, c.out_channels, h, w, generator=g).to(dtype),
            torch.randn(batch, c.temb_dim, generator=g).to(dtype),
            torch.randn(batch, tokens, c.text_dim, generator=g).to(dtype))


def trained(c: AdaptorConfig, seed=1) -> ClockworkAdaptor:
    """An adaptor with every weight random (its head too), as after training."""
    torch.manual_seed(seed)
    a = ClockworkAdaptor(c)
    with torch.no_grad():
        for name, p in a.named_parameters():
            if name.startswith("conv_out"):
                p.normal_(0, 0.05)
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return a.eval()


# --- identity at initialisation -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fresh_adaptor_is_exactly_the_identity_adaptor(dtype):
    for c in (config(), config(inner_stride=1), config(stride=2, inner_stride=4)):
        a = ClockworkAdaptor(c).to(dtype)
        r_in, r_out, temb, text = inputs(c, dtype=dtype)
        out = a(r_in, r_out, temb, text)
        assert out.dtype == dtype and torch.equal(out, r_out)


def test_fp32_adaptor_returns_r_out_prevs_dtype():
    c = config()
    a = trained(c)
    r_in, r_out, temb, text = inputs(c, dtype=torch.float16)
    out = a(r_in, r_out, temb, text)
    assert out.dtype == torch.float16
    ref = a(r_in.float(), r_out.float(), temb.float(), text.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    assert torch.equal(ClockworkAdaptor(c)(r_in, r_out, temb, text), r_out)  # fresh fp32 adaptor, fp16 input


# --- the forward against an independent statement ---------------------------------------------------

def functional(p: dict, c: AdaptorConfig, r_in, r_out_prev, temb, text):
    """The architecture in torch.nn.functional (fp64 in, fp64 out): see frkern/adaptor.py's docstring."""
    groups = math.gcd(8, c.hidden)
    s, s_in = c.inner_stride, c.stride * c.inner_stride
    k_in, k = (s_in + 1 if s_in > 1 else 3), (s + 1 if s > 1 else 3)

    def gn(x, name):
        return F.group_norm(x, groups, p[name + ".weight"], p[name + ".bias"], eps=1e-5)

    h = F.conv2d(r_in, p["conv_in.weight"], p["conv_in.bias"], stride=s_in, padding=k_in // 2)
    h = h + F.conv2d(r_out_prev, p["conv_prev.weight"], p["conv_prev.bias"], stride=s, padding=k // 2)
    pooled = text.sum(dim=1) / text.shape[1]
    h = h + (pooled @ p["text_proj.weight"].T + p["text_proj.bias"])[:, :, None, None]
    t = temb * torch.sigmoid(temb)
    for i in range(2):
        b = f"blocks.{i}."
        g = F.conv2d(F.silu(gn(h, b + "norm1")), p[b + "conv1.weight"], p[b + "conv1.bias"], padding=1)
        g = g + (t @ p[b + "time_proj.weight"].T + p[b + "time_proj.bias"])[:, :, None, None]
        h = h + F.conv2d(F.silu(gn(g, b + "norm2")), p[b + "conv2.weight"], p[b + "conv2.bias"], padding=1)
    h = F.silu(gn(h, "norm_out"))
    if s == 1:
        d = F.conv2d(h, p["conv_out.weight"], p["conv_out.bias"], padding=1)
    else:
        natural = [(n - 1) * s - 2 * (k // 2) + k for n in h.shape[-2:]]
        extra = [want - got for want, got in zip(r_out_prev.shape[-2:], natural)]
        assert all(0 <= e < s for e in extra)
        d = F.conv_transpose2d(h, p["conv_out.weight"], p["conv_out.bias"], stride=s, padding=k // 2,
                               output_padding=tuple(extra))
    assert d.shape == r_out_prev.shape
    return r_out_prev + d


@pytest.mark.parametrize("kw,hw", [({}, (10, 9)), ({}, (7, 13)), ({"inner_stride": 1}, (6, 5)),
                                   ({"inner_stride": 4}, (11, 8)), ({"stride": 2}, (5, 6)),
                                   ({"stride": 4, "inner_stride": 1, "hidden": 12}, (3, 4))])
def test_forward_matches_a_functional_statement(kw, hw):
    c = config(**kw)
    a = trained(c)
    p = {k: v.double() for k, v in a.state_dict().items()}
    for seed in range(2):  # fresh inputs per case
        r_in, r_out, temb, text = inputs(c, hw=hw, seed=seed, tokens=2 + seed)
        kept = [x.clone() for x in (r_in, r_out, temb, text)]
        with torch.no_grad():
            out = a(r_in, r_out, temb, text)
        ref = functional(p, c, *(x.double() for x in (r_in, r_out, temb, text)))
        assert out.dtype == torch.float32 and out.shape == r_out.shape
        assert (out - r_out).abs().max() > 1e-2  # the head does something
        torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
        assert all(torch.equal(x, y) for x, y in zip(kept, (r_in, r_out, temb, text)))  # inputs untouched


def test_nan_propagates_within_its_batch_element_only():
    c = config()
    a = trained(c)
    r_in, r_out, temb, text = inputs(c, batch=3)
    with torch.no_grad():
        clean = a(r_in, r_out, temb, text)
        for i, which in enumerate((r_in, r_out, temb, text)):
            poisoned = [x.clone() for x in (r_in, r_out, temb, text)]
            poisoned[i].view(3, -1)[1, 5] = float("nan")
            out = a(*poisoned)
            assert out[1].isnan().any(), which.shape
            assert torch.equal(out[0], clean[0]) and torch.equal(out[2], clean[2])
        # The output is a fresh tensor: later writes to it reach neither the input nor the next call.
        out = a(r_in, r_out, temb, text)
        out.fill_(float("nan"))
        assert torch.equal(a(r_in, r_out, temb, text), clean) and not r_out.isnan().any()


def test_forward_refuses_inputs_of_the_wrong_shape():
    c = config()
    a = ClockworkAdaptor(c)
    r_in, r_out, temb, text = inputs(c)
    with pytest.raises(ValueError, match="r_in must be"):
        a(r_in[:, :4], r_out, temb, text)
    with pytest.raises(ValueError, match="r_out_prev must be"):
        a(r_in, r_out[:, :5], temb, text)
    with pytest.raises(ValueError, match="r_in's size"):
        a(r_in[..., :-1], r_out, temb, text)
    with pytest.raises(ValueError, match="temb must be"):
        a(r_in, r_out, temb[:, :3], text)
    with pytest.raises(ValueError, match="text must be"):
        a(r_in, r_out, temb, text[0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        a(r_in, r_out, temb[:1], text)


def test_config_validation():
    with pytest.raises(ValueError, match="stride must be a power of 2"):
        config(stride=3)
    with pytest.raises(ValueError, match="inner_stride"):
        config(inner_stride=0)
    with pytest.raises(ValueError, match="clock must be"):
        config(clock=1)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        config(hidden=0)
    with pytest.raises(ValueError, match="sampler"):
        config(sampler="")
    assert AdaptorConfig.from_dict(config().to_dict()) == config()
    with pytest.raises(ValueError, match="unknown fields \\['extra'\\]"):
        AdaptorConfig.from_dict({**config().to_dict(), "extra": 1})


# --- files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["stem", "stem.safetensors", "stem.json"])
def test_save_load_round_trip(tmp_path, given):
    c = config(inner_stride=2)
    a = trained(c)
    paths = save_adaptor(a, tmp_path / "stem")
    assert paths == (str(tmp_path / "stem.safetensors"), str(tmp_path / "stem.json"))
    doc = json.loads((tmp_path / "stem.json").read_text())
    assert doc["format"] == "frkern.clockwork_adaptor" and doc["config"] == c.to_dict()
    b = load_adaptor(tmp_path / given)
    assert b.config == c and not b.training
    x = inputs(c, seed=5)
    with torch.no_grad():
        assert torch.equal(a(*x), b(*x))
    h = load_adaptor(tmp_path / "stem", dtype=torch.float16, device="cpu")
    assert h.conv_in.weight.dtype == torch.float16 and h(*(t.half() for t in x)).dtype == torch.float16


def test_bad_files_are_refused_with_clear_errors(tmp_path):
    c = config()
    save_adaptor(trained(c), tmp_path / "a")
    good_json = (tmp_path / "a.json").read_text()
    good_weights = (tmp_path / "a.safetensors").read_bytes()

    def refused(match):
        with pytest.raises(ValueError, match=match):
            load_adaptor(tmp_path / "a")

    (tmp_path / "a.json").unlink()
    refused("missing file.*a.json")
    (tmp_path / "a.json").write_text("{not json")
    refused("not valid JSON")
    (tmp_path / "a.json").write_text(json.dumps({"config": c.to_dict()}))
    refused("not a frkern.clockwork_adaptor file")
    (tmp_path / "a.json").write_text(json.dumps({"format": "frkern.clockwork_adaptor", "version": 99,
                                                 "config": c.to_dict()}))
    refused("format version 99")
    bad = {**c.to_dict(), "clock": 1}
    (tmp_path / "a.json").write_text(json.dumps({"format": "frkern.clockwork_adaptor", "version": 1, "config": bad}))
    refused("bad config.*clock must be")
    (tmp_path / "a.json").write_text(good_json)

    (tmp_path / "a.safetensors").unlink()
    refused("missing file.*a.safetensors")
    (tmp_path / "a.safetensors").write_bytes(good_weights[:100])
    refused("not a readable safetensors file")
    (tmp_path / "a.safetensors").write_bytes(good_weights)
    load_adaptor(tmp_path / "a")  # intact again

    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "a.safetensors")
    # Weights of another width under this config.
    save_adaptor(trained(config(hidden=8)), tmp_path / "b")
    (tmp_path / "b.json").write_text(good_json)
    with pytest.raises(ValueError, match="conv_in.weight has shape \\(8, 8, 3, 3\\), the config needs \\(16, 8, 3, 3\\)"):
        load_adaptor(tmp_path / "b")
    for edit, match in [(lambda s: s.pop("conv_prev.bias"), "missing weights \\['conv_prev.bias'\\]"),
                        (lambda s: s.update(extra=torch.zeros(1)), "unexpected weights \\['extra'\\]"),
                        (lambda s: s["text_proj.weight"].view(-1).__setitem__(0, float("nan")),
                         "text_proj.weight has non-finite values")]:
        s = {k: v.clone() for k, v in state.items()}
        edit(s)
        save_file(s, tmp_path / "c.safetensors")
        (tmp_path / "c.json").write_text(good_json)
        with pytest.raises(ValueError, match=match):
            load_adaptor(tmp_path / "c")


# --- fit checks ----------------------------------------------------------------------------------------

FIT = dict(in_channels=8, out_channels=12, stride=1, temb_dim=20, text_dim=6, levels=1, clock=3)


def test_check_adaptor_accepts_a_fitting_adaptor():
    c = config()
    check_adaptor(c, **FIT)
    check_adaptor(ClockworkAdaptor(c), **FIT, sampler="DDIMScheduler", num_steps=50, model="0123456789abcdef")


@pytest.mark.parametrize("change,message", [
    ({"in_channels": 32}, "adaptor expects r_in with 8 channels, this UNet gives 32"),
    ({"out_channels": 64}, "adaptor expects r_out with 12 channels, this UNet gives 64"),
    ({"stride": 2}, "adaptor expects r_in at 1x r_out's resolution, this UNet gives 2x"),
    ({"temb_dim": 128}, "time embedding of width 20, this UNet gives 128"),
    ({"text_dim": 768}, "text embeddings of width 6, this UNet takes 768"),
    ({"levels": 2}, "adaptor was trained for levels 1, the policy has levels 2"),
    ({"clock": 2}, "adaptor was trained for clock 3, the policy has clock 2"),
    ({"sampler": "DPMSolverMultistepScheduler"},
     "adaptor was trained for sampler DDIMScheduler, the pipeline uses DPMSolverMultistepScheduler"),
    ({"num_steps": 20}, "adaptor was trained for 50 steps, this generation has 20"),
    ({"model": "fedcba9876543210"}, "adaptor was trained on UNet model 0123456789abcdef, this UNet is fedcba9876543210"),
])
def test_check_adaptor_names_each_mismatch(change, message):
    with pytest.raises(ValueError) as e:
        check_adaptor(config(), **{**FIT, **change})
    assert message in str(e.value) and str(e.value).count(";") == 0


def test_check_adaptor_names_every_mismatch_at_once():
    with pytest.raises(ValueError) as e:
        check_adaptor(config(), **{**FIT, "in_channels": 32, "clock": 2}, sampler="X", num_steps=20)
    text = str(e.value)
    assert all(s in text for s in ("r_in with 8 channels", "clock 3", "sampler DDIMScheduler", "50 steps"))
    with pytest.raises(ValueError, match="expected an AdaptorConfig"):
        check_adaptor({"clock": 3}, **FIT)


def test_model_fingerprint():
    with open(TINY_CONFIG) as f:
        cfg = json.load(f)
    fp = model_fingerprint(cfg)
    assert len(fp) == 16 and int(fp, 16) >= 0
    as_tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    assert model_fingerprint(as_tuples) == fp
    assert model_fingerprint({**cfg, "sample_size": 64, "_diffusers_version": "9"}) == fp  # not structural
    assert model_fingerprint({**cfg, "block_out_channels": [32, 64, 128]}) != fp
    assert model_fingerprint({**cfg, "cross_attention_dim": 768}) != fp
    with pytest.raises(ValueError):
        model_fingerprint("config.json")


# --- FLOPs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,hw,batch", [({}, (10, 9), 2), ({}, (7, 13), 1), ({"inner_stride": 1}, (6, 5), 3),
                                         ({"inner_stride": 4}, (11, 8), 1), ({"stride": 2}, (5, 6), 2)])
def test_adaptor_flops_match_the_flop_counter(kw, hw, batch):
    c = config(**kw)
    a = trained(c)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        a(*inputs(c, hw=hw, batch=batch))
    counted = counter.get_flop_counts()["Global"]
    assert set(str(op) for op in counted) <= {"aten.convolution", "aten.addmm", "aten.mm"}
    assert adaptor_flops(c, hw, batch) == counter.get_total_flops()


# --- the committed adaptors ----------------------------------------------------------------------------

COMMITTED = sorted(glob.glob(os.path.join(ADAPTORS, "clockwork_tiny_*.safetensors")))


@pytest.mark.skipif(not COMMITTED, reason="no committed adaptors")
@pytest.mark.parametrize("path", COMMITTED, ids=os.path.basename)
def test_committed_adaptors_load_and_fit_the_tiny_model(path):
    with open(TINY_CONFIG) as f:
        cfg = json.load(f)
    a = load_adaptor(path)
    name = os.path.basename(path)  # clockwork_tiny_<sampler><steps>_c<clock>.safetensors
    sampler = "DDIMScheduler" if "_ddim" in name else "DPMSolverMultistepScheduler"
    steps = int(name.split("_")[2].lstrip("dimp"))
    clock = int(name.split("_c")[-1].split(".")[0])
    check_adaptor(a, in_channels=cfg["block_out_channels"][0], out_channels=cfg["block_out_channels"][1],
                  stride=1, temb_dim=4 * cfg["block_out_channels"][0], text_dim=cfg["cross_attention_dim"],
                  levels=1, clock=clock, sampler=sampler, num_steps=steps, model=model_fingerprint(cfg))
    with open(path[: -len(".safetensors")] + ".log.json") as f:
        log = json.load(f)
    held_out = log["l2"]["branches"]  # the L2 of r_out on held-out trajectories, teacher-forced
    assert held_out["val_learned"] < held_out["val_identity"]
    e = log["end_to_end_val"]  # and closer to full compute than the identity adaptor, end to end
    assert e["learned"]["psnr_vs_full"] > e["identity"]["psnr_vs_full"]
    assert e["identity_hooks_vs_frkern_Clockwork_max_abs_diff"] == 0


def test_trainer_help_states_every_option_with_its_default(capsys):
    import importlib
    import sys

    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        from options import shown_default

        mod = importlib.import_module("train_clockwork_adaptor")
    finally:
        sys.path.remove(os.path.join(REPO, "bench"))
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--help"])
    assert exit_.value.code == 0
    text = "".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for action in mod.parser()._actions:
        if action.option_strings and action.dest != "help":
            assert len(action.help) > 5
            assert "default" in action.help or f"(default:{''.join(shown_default(action.default).split())})" in text
