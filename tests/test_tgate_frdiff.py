"""frkern.TGate(reuse=frkern.FRDiff(...)) against an independent statement
(tests/reference_tgate_frdiff.py: the `tgate` package's pipeline + FRDiff forward replacements and a
score-mixing UNet wrapper) on tiny SD and SDXL pipelines; the statement's keyframe schedule; that
the composition is neither T-GATE alone nor FRDiff alone; and that the statement discriminates
(wrong keyframe grids, attentions storing inside reused transformers, a shifted mixing weight each
change the latents in at least one case)."""
from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

import frkern
from tiny import make_sd_pipeline, make_sdxl_pipeline, sd_prompt_kwargs, sdxl_prompt_kwargs

tgate = pytest.importorskip("tgate")
from reference_tgate_frdiff import is_keyframe, mix_weight, tgate_frdiff  # noqa: E402

RUN = dict(height=32, width=32, output_type="latent")
# name -> (T-GATE params, FRDiff params, steps). Comments: keyframes / reuse steps with lam.
CASES = {
    # keys 0,2,3,4,6; reuse 1,5,7 (lam 1)
    "g4-sp2-fi1-w1-M2": (dict(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1), dict(interval=2, score_mix=False), 8),
    # keys 0,3,4,5,8; reuse 1,2 (lam 0: UNet not run), 6,7 (lam 1)
    "g5-sp2-fi2-w1-M3-S": (dict(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1), dict(interval=3, score_mix=True), 9),
    # keys 0,2,3,5,7; reuse 1 (lam 0), 4 (lam 1/12, B batch after the gate), 6,8 (lam 1)
    "g3-sp3-fi1-w0-M2-S": (dict(gate_step=3, sp_interval=3, fi_interval=1, warm_up=0), dict(interval=2, score_mix=True), 9),
    # keys 0,2,4,6,7; reuse 1,3 (lam 0), 5 (lam 11/12, CFG batch before the gate), 8 (lam 1)
    "g7-sp2-fi1-w1-M2-S": (dict(gate_step=7, sp_interval=2, fi_interval=1, warm_up=1), dict(interval=2, score_mix=True), 9),
    # keys 0,2,4,5,6; reuse 1,3,7 (lam 1); self-attention caches stored at warm_up 1 and at 3 (sp) fall on
    # reuse steps, so the keyframes 2 and 4 (sp reuse) find no cache and compute
    "g6-sp3-fi2-w1-M2": (dict(gate_step=6, sp_interval=3, fi_interval=2, warm_up=1), dict(interval=2, score_mix=False), 8),
}
SDXL_CASES = ["g4-sp2-fi1-w1-M2", "g5-sp2-fi2-w1-M3-S", "g3-sp3-fi1-w0-M2-S"]
KINDS = {"sd": (make_sd_pipeline, sd_prompt_kwargs, tgate.TgateSDLoader),
         "sdxl": (make_sdxl_pipeline, sdxl_prompt_kwargs, tgate.TgateSDXLLoader)}


def _pipe(kind):
    """A fresh pipeline each time (cheap): the statement never sees a pipeline frkern has touched."""
    return KINDS[kind][0]()


def _gen():
    return torch.Generator().manual_seed(0)


def _statement(kind, case, variant=None):
    tg, fr, n = CASES[case]
    _, prompt, loader = KINDS[kind]
    return tgate_frdiff(_pipe(kind), loader, **tg, **fr, num_inference_steps=n, variant=variant, return_log=True,
                        **prompt(), **RUN, generator=_gen())


@lru_cache(maxsize=None)
def _want(kind, case):
    return _statement(kind, case)


def _frkern(kind, policy, n):
    pipe = _pipe(kind)
    frkern.patch(pipe, policy, backend="torch")
    try:
        return pipe(**KINDS[kind][1](), **RUN, num_inference_steps=n, generator=_gen()).images
    finally:
        frkern.unpatch(pipe)


def _composed(kind, case):
    tg, fr, n = CASES[case]
    return _frkern(kind, frkern.TGate(**tg, reuse=frkern.FRDiff(**fr, bias=0.5)), n)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind,case", [("sd", c) for c in CASES] + [("sdxl", SDXL_CASES[0])] + [
    pytest.param("sdxl", c, marks=pytest.mark.slow) for c in SDXL_CASES[1:]])  # the other sdxl cases: extended
def test_equals_the_statement(kind, case):
    want, _ = _want(kind, case)
    got = _composed(kind, case)
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    assert torch.equal(got, want), f"relative L2 difference {_rel(got, want):.3e}"


def test_the_statements_schedule():
    """The keyframe rule and the mixing weight, as the statement ran them (its per-step log)."""
    assert [i for i in range(9) if is_keyframe(i, 3, 2)] == [0, 2, 3, 5, 7]
    assert [i for i in range(9) if is_keyframe(i, 5, 3)] == [0, 3, 4, 5, 8]
    assert [mix_weight(i, 9, True) for i in (3, 4, 5, 6)] == [0.0, (30 * (4 / 9 - 0.5) + 2) / 4,
                                                              (30 * (5 / 9 - 0.5) + 2) / 4, 1.0]
    _, log = _want("sd", "g3-sp3-fi1-w0-M2-S")
    assert [(i, k, r) for i, k, _, r in log] == [
        (0, True, True), (1, False, False), (2, True, True), (3, True, True), (4, False, True),
        (5, True, True), (6, False, True), (7, True, True), (8, False, True)]
    assert 0 < log[4][2] < 1 and log[6][2] == log[8][2] == 1.0


def test_not_vacuous():
    """The composition is neither T-GATE alone (the package) nor frkern's FRDiff alone."""
    case = "g3-sp3-fi1-w0-M2-S"
    tg, fr, n = CASES[case]
    want, _ = _want("sd", case)
    ref = tgate.TgateSDLoader(copy.deepcopy(_pipe("sd")))
    tgate_alone = ref.tgate(**sd_prompt_kwargs(), **RUN, num_inference_steps=n, generator=_gen(), **tg).images
    frdiff_alone = _frkern("sd", frkern.FRDiff(**fr, bias=0.5), n)
    assert torch.isfinite(tgate_alone).all() and torch.isfinite(frdiff_alone).all()
    assert _rel(want, tgate_alone) > 1e-4 and _rel(want, frdiff_alone) > 1e-4


@pytest.mark.parametrize("variant,case", [("no_restart", "g3-sp3-fi1-w0-M2-S"), ("shift", "g4-sp2-fi1-w1-M2"),
                                          ("attn_store", "g6-sp3-fi2-w1-M2"), ("lam_next", "g3-sp3-fi1-w0-M2-S")])
def test_the_statement_discriminates(variant, case):
    """A wrong rule changes the latents in this case (so the comparison above can see it)."""
    want, _ = _want("sd", case)
    wrong, _ = _statement("sd", case, variant)
    assert _rel(wrong, want) > 1e-6


def test_every_step_a_keyframe_is_tgate_alone():
    """Self-check of the statement's wrapping: with interval 1 every step is a keyframe, nothing is
    reused or mixed, and it is the `tgate` package's result bit for bit."""
    tg, n = CASES["g4-sp2-fi1-w1-M2"][0], 8
    want = tgate_frdiff(_pipe("sd"), tgate.TgateSDLoader, **tg, interval=1, score_mix=True, num_inference_steps=n,
                        **sd_prompt_kwargs(), **RUN, generator=_gen())
    ref = tgate.TgateSDLoader(copy.deepcopy(_pipe("sd")))
    assert torch.equal(want, ref.tgate(**sd_prompt_kwargs(), **RUN, num_inference_steps=n, generator=_gen(), **tg).images)
