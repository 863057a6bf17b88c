"""frkern.EncoderPropagation (Faster Diffusion's encoder propagation) against the independent hook
statement of tests/reference_encoder_propagation.py, step by step, bit for bit (torch backend):
image and video families, the authors' 50-step key steps, uniform and explicit key steps; in a
pipeline; and its refusals."""
from __future__ import annotations

import copy

import pytest
import torch

import frkern
from frkern.policies import FASTER_DIFFUSION_KEY_STEPS_50
from reference_encoder_propagation import FASTER_DIFFUSION_SD50_KEYS, encoder_propagation_reference, uniform_keys
from test_contract import FAMILIES, assert_close, run_patched
from test_contract import calls as contract_calls
from test_pipelines import generate
from tiny import make_sd_pipeline, sd_prompt_kwargs


def calls(base, inputs, steps, batch=2):
    # the contract's call sequence, its timesteps spread over a 50-step schedule
    return contract_calls(base, inputs, steps, batch=batch, t0=980, dt=19)


def test_the_published_key_steps_are_the_authors():
    # two transcriptions of the authors' '50ls' list, one per side of the independence line
    assert FASTER_DIFFUSION_KEY_STEPS_50 == FASTER_DIFFUSION_SD50_KEYS
    plans = frkern.EncoderPropagation().schedule(50)
    assert [i for i, p in enumerate(plans) if p.keyframe] == list(FASTER_DIFFUSION_SD50_KEYS)
    assert [i for i, p in enumerate(frkern.EncoderPropagation(interval=4).schedule(10)) if p.keyframe] == \
        list(uniform_keys(10, 4))


@pytest.mark.parametrize("family, policy, steps", [
    ("sd", frkern.EncoderPropagation(), 50),
    ("sd", frkern.EncoderPropagation(interval=3), 7),
    ("sdxl", frkern.EncoderPropagation(key_steps=(0, 1, 4)), 6),
    ("svd", frkern.EncoderPropagation(interval=2), 5),
    ("motion", frkern.EncoderPropagation(interval=3), 5),
    ("unet3d", frkern.EncoderPropagation(key_steps=(2,)), 5),
])
def test_equals_the_hook_statement_step_by_step(family, policy, steps):
    make, inputs, _ = FAMILIES[family]
    base = make()
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    seq = calls(base, inputs, steps, batch=1 if steps > 10 else 2)
    handle = frkern.patch(model, policy, backend="torch")
    assert handle.installation.plan.segments[-1] == "mid_block"
    handle.begin(steps)
    got = run_patched(model, handle, seq)
    keys = [i for i, p in enumerate(policy.schedule(steps)) if p.keyframe]
    want = encoder_propagation_reference(ref, [dict(kw, return_dict=False) for kw in seq], keys)
    assert_close(got, want, 0, f"{family} {policy}")
    assert handle.stats == {"full": len(keys), "reuse": steps - len(keys)}, handle.stats


def test_in_a_pipeline_and_the_default_key_steps_need_50_steps():
    pipe = make_sd_pipeline()
    prompt = sd_prompt_kwargs()
    want = generate(pipe, prompt)
    frkern.patch(pipe, frkern.EncoderPropagation(), backend="torch")
    with pytest.raises(ValueError, match="published key steps are for 50 steps, this generation has 8"):
        generate(pipe, prompt)  # refused when the generation begins: before any UNet call
    frkern.unpatch(pipe)
    assert torch.equal(generate(pipe, prompt), want)  # nothing left behind
    handle = frkern.patch(pipe, frkern.EncoderPropagation(key_steps=(0, 1, 2, 5)), backend="torch")
    out = generate(pipe, prompt)
    assert handle.stats == {"full": 4, "reuse": 4}, handle.stats
    assert torch.isfinite(out).all() and 0 < ((out - want).norm() / want.norm()).item() < 0.5
    frkern.unpatch(pipe)
    assert torch.equal(generate(pipe, prompt), want)


def test_validation_and_json():
    p = frkern.EncoderPropagation(key_steps=(5, 2))
    assert p.key_steps == (0, 2, 5) and frkern.from_json(p.to_json()) == p
    assert frkern.from_json(frkern.EncoderPropagation(interval=4, parallel=3).to_json()) == \
        frkern.EncoderPropagation(interval=4, parallel=3)
    for kwargs, match in [(dict(key_steps=(0, -1)), "each key step must be an int >= 0"),
                          (dict(key_steps="0,1"), "key_steps must be a sequence"),
                          (dict(interval=-1), "interval must be an int >= 0"),
                          (dict(key_steps=(0, 3), interval=2), "give key_steps or interval, not both"),
                          (dict(parallel=0), "parallel must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            frkern.EncoderPropagation(**kwargs)


# --- parallel decoding ------------------------------------------------------------------------------
def _parallel_runs(make_pipe, run, policy_kw, widths=(1, 3)):
    pipe = make_pipe()
    outs, stats = {}, {}
    for k in widths:
        handle = frkern.patch(pipe, frkern.EncoderPropagation(parallel=k, **policy_kw), backend="torch")
        outs[k] = run(pipe)
        stats[k] = dict(handle.stats)
        frkern.unpatch(pipe)
    return outs, stats


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", ["sd", "sdxl", "svd"])
def test_parallel_decoding_equals_the_sequential_form(kind):
    """Key steps 0, 1, 4 of 8 (SVD: 0, 3 of 4): the non-key runs [2, 3] and [5, 6, 7] decode at once
    (width 3), so 3 calls return precomputed outputs; the latents equal the sequential run's within
    fp32 rounding of the batched matmuls (rel 1e-5)."""
    from test_video_families import _svd_run
    import tiny_video as tv
    from tiny import make_sdxl_pipeline, sdxl_prompt_kwargs

    if kind == "svd":
        outs, stats = _parallel_runs(tv.svd_pipeline, lambda p: _svd_run(p, 1), dict(key_steps=(0, 3)))
        ahead = 1  # [1, 2]
    else:
        make, prompt = (make_sd_pipeline, sd_prompt_kwargs()) if kind == "sd" else (make_sdxl_pipeline,
                                                                                   sdxl_prompt_kwargs())
        outs, stats = _parallel_runs(make, lambda p: generate(p, prompt), dict(key_steps=(0, 1, 4)))
        ahead = 3
    assert stats[1].get("decoded_ahead", 0) == 0 and stats[3]["decoded_ahead"] == ahead, stats
    assert {k: stats[3][k] for k in ("full", "reuse")} == {k: stats[1][k] for k in ("full", "reuse")}
    assert torch.isfinite(outs[3]).all() and _rel(outs[3], outs[1]) <= 1e-5


def test_parallel_decoding_drops_what_no_longer_applies():
    """A callback swaps the text embeddings after step 5: the outputs batched at step 5 for steps 6
    and 7 were made with the old ones, so they are dropped and step 6 computes anew; the result
    equals the sequential run with the same callback (step 6 then decodes 6 and 7 at once again)."""
    prompt = sd_prompt_kwargs()
    swap = sd_prompt_kwargs(seed=9)["prompt_embeds"]

    def callback(pipe, i, t, kw):
        if i == 5:
            return {"prompt_embeds": torch.cat([kw["prompt_embeds"][:1], swap])}
        return {}

    def run(pipe):
        return generate(pipe, prompt, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])

    outs, stats = _parallel_runs(make_sd_pipeline, run, dict(key_steps=(0, 1, 4)))
    assert stats[3]["ahead_dropped"] == 1 and stats[3]["decoded_ahead"] == 1 + 2 + 1, stats
    assert _rel(outs[3], outs[1]) <= 1e-5


def test_parallel_decoding_drops_outputs_after_an_in_place_edit_of_the_conditioning():
    """A callback scales prompt_embeds in place after step 1, when steps 2 and 3 were decoded ahead
    with the old values: the same tensor object, so only its version counter tells (before, the
    stale outputs were returned: off by rel 5e-2)."""
    prompt = sd_prompt_kwargs()

    def callback(pipe, i, t, kw):
        if i == 1:
            kw["prompt_embeds"].mul_(1.5)
        return {}

    def run(pipe):
        return generate(pipe, prompt, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])

    outs, stats = _parallel_runs(make_sd_pipeline, run, dict(key_steps=(0, 4)))
    assert stats[3]["ahead_dropped"] == 1, stats
    assert _rel(outs[3], outs[1]) <= 1e-5, _rel(outs[3], outs[1])


@pytest.mark.parametrize("change", ["weights", "lora_scale", "freeu"])
def test_parallel_decoding_drops_outputs_after_a_weight_change(change):
    """Weights change after step 1 (in place, an adapter's scale, or FreeU's factors, which are
    block attributes), when steps 2 and 3 were decoded
    ahead with the old ones: step 2 is promoted to a keyframe, which drops what was decoded from the
    features it replaces, so step 3 decodes anew (before, it returned the stale output: rel 3e-2)."""
    from peft import LoraConfig

    prompt = sd_prompt_kwargs()

    def make():
        pipe = make_sd_pipeline()
        if change == "lora_scale":
            pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "conv1"],
                                             init_lora_weights=False), adapter_name="a")
        return pipe

    def callback(pipe, i, t, kw):
        if i == 1:
            if change == "weights":
                with torch.no_grad():
                    pipe.unet.up_blocks[1].resnets[0].conv1.weight.mul_(1.5)
            elif change == "freeu":
                pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
            else:
                pipe.unet.set_adapters(["a"], weights=[0.3])
        return {}

    outs = {}
    for k in (1, 3):  # a fresh pipeline each: the callback changes it
        pipe = make()
        handle = frkern.patch(pipe, frkern.EncoderPropagation(key_steps=(0, 4), parallel=k), backend="torch")
        outs[k] = generate(pipe, prompt, callback_on_step_end=callback)
        stats = dict(handle.stats)
        assert stats["promoted"] == 1, stats
    assert stats["decoded_ahead"] >= 2, stats
    assert _rel(outs[3], outs[1]) <= 1e-5, _rel(outs[3], outs[1])


def test_parallel_decoding_in_a_hand_written_loop_runs_each_call_alone():
    """Without a tracked scheduler frkern does not know the next timesteps: every reuse call runs on
    its own (stats say so), bit-identical to parallel=1."""
    make, inputs, _ = FAMILIES["sd"]
    base = make()
    seq = calls(base, inputs, 6)
    outs = []
    for k in (1, 3):
        model = copy.deepcopy(base)
        handle = frkern.patch(model, frkern.EncoderPropagation(interval=3, parallel=k), backend="torch")
        handle.begin(6)
        outs.append(run_patched(model, handle, seq))
    assert handle.stats["decoded_alone"] == 4 and "decoded_ahead" not in handle.stats
    assert_close(outs[1], outs[0], 0, "hand loop")


def _graph_case():
    from test_contract import COMPILE_MODELS

    policy, steps = frkern.EncoderPropagation(interval=2), 6
    base = COMPILE_MODELS["sd"]()
    seq = calls(base, FAMILIES["sd"][1], steps)
    eager = copy.deepcopy(base)
    h_eager = frkern.patch(eager, policy, backend="torch")
    h_eager.begin(steps)
    return policy, steps, base, seq, run_patched(eager, h_eager, seq), h_eager.stats


def test_emulated_cuda_graphs_equal_eager():
    """Graphs (emulated capture on a CPU): one capture per step kind, bit-equal to eager over two
    generations."""
    from devices import EmulatedCapture

    policy, steps, base, seq, want, stats = _graph_case()
    graphed = copy.deepcopy(base)
    h_graph = frkern.patch(graphed, policy, backend="torch", cuda_graphs=True)
    h_graph.graphs.capture = EmulatedCapture()
    for generation in range(2):
        h_graph.begin(steps)
        assert_close(run_patched(graphed, h_graph, seq), want, 0, f"graphs, generation {generation}")
        assert h_graph.stats == stats
    assert h_graph.graph_stats["captures"] == 2 and h_graph.graph_stats["replays"] > 0


@pytest.mark.slow
def test_compiled_has_no_breaks_and_no_recompiles():
    from test_contract import assert_compiles_once

    policy, steps, base, seq, _, stats = _graph_case()
    assert assert_compiles_once(base, policy, seq, steps, what="EncoderPropagation") == stats


@pytest.mark.parametrize("strength", [0.55, 1.0])
def test_img2img_plans_key_steps_by_position_in_the_whole_schedule(strength):
    """img2img starts at position p0 > 0 of the scheduler's schedule: key steps are positions of the
    whole schedule (interval 3: 0, 3, 6, 9), and the first call of a generation has nothing to
    propagate, so it runs in full. The statement: the hook statement keyed by the position of
    each call's timestep in scheduler.timesteps."""
    from reference_encoder_propagation import EncoderPropagationHooks
    from test_ecosystem import ddim, img2img_pipeline

    pipe, prompt = img2img_pipeline("img2img", ddim())
    ref_pipe = copy.deepcopy(pipe)
    hooks = EncoderPropagationHooks(ref_pipe.unet)
    positions = []

    def pre(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        p = int((ref_pipe.scheduler.timesteps == t).nonzero()[0, 0])
        hooks.keyframe = p % 3 == 0 or not positions
        positions.append(p)

    handle_ref = ref_pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    want = generate(ref_pipe, prompt, steps=10, strength=strength)
    handle_ref.remove()
    hooks.remove()
    handle = frkern.patch(pipe, frkern.EncoderPropagation(interval=3), backend="torch")
    got = generate(pipe, prompt, steps=10, strength=strength)
    assert (positions[0] > 0) == (strength < 1.0) and positions == list(range(positions[0], 10))
    assert torch.isfinite(got).all() and torch.equal(got, want), (positions, handle.stats)
    keys = [p for i, p in enumerate(positions) if i == 0 or p % 3 == 0]
    assert handle.stats["full"] == len(keys) and handle.stats["reuse"] == len(positions) - len(keys)
