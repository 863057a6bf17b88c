import json

import pytest

import frkern
from frkern.policies import Keyframes
from reference import lam


@pytest.mark.parametrize(
    "policy",
    [frkern.NoReuse(), frkern.FRDiff(3, False, 0.4), frkern.Clockwork(4, 2), frkern.DeepCache(5, 1),
     Keyframes((0, 3, 7), 10, True, 0.5)],
)
def test_json_round_trip(policy, tmp_path):
    assert frkern.from_json(policy.to_json()) == policy
    path = tmp_path / "p.json"
    frkern.save_policy(policy, path)
    assert frkern.load_policy(path) == policy


def test_frozen():
    p = frkern.FRDiff()
    with pytest.raises(Exception):
        p.interval = 5


def test_lambda_values_match_formula():
    for n in (10, 25, 50):
        for i in range(n):
            assert frkern.score_mix_lambda(i, n) == pytest.approx(lam(i, n), abs=0)
    # REFERENCE: b = 0.5 gives lambda = 0 for r <= 0.4333 and 1 for r >= 0.5667.
    assert frkern.score_mix_lambda(433, 1000) == 0.0
    assert frkern.score_mix_lambda(434, 1000) > 0.0
    assert frkern.score_mix_lambda(567, 1000) == 1.0
    assert frkern.score_mix_lambda(566, 1000) < 1.0
    assert frkern.score_mix_lambda(25, 50) == 0.5


def test_frdiff_schedule_n50_m2():
    plans = frkern.FRDiff(interval=2, score_mix=True).schedule(50)
    full = [i for i, p in enumerate(plans) if p.keyframe]
    skipped = [i for i, p in enumerate(plans) if not p.runs_network]
    fr = [i for i, p in enumerate(plans) if p.runs_network and not p.keyframe]
    assert full == list(range(0, 50, 2))
    assert skipped == list(range(1, 22, 2))
    assert (len(full), len(skipped)) == (25, 11)
    assert len(fr) == 14 and fr[0] == 23


def test_frdiff_without_mixing_never_skips():
    plans = frkern.FRDiff(interval=3, score_mix=False).schedule(30)
    assert all(p.runs_network for p in plans)
    assert [i for i, p in enumerate(plans) if p.keyframe] == list(range(0, 30, 3))
    assert all(p.mix == 1.0 for p in plans if not p.keyframe)


def test_clockwork_and_deepcache_schedules():
    assert [p.keyframe for p in frkern.Clockwork(clock=3).schedule(7)] == [1, 0, 0, 1, 0, 0, 1]
    assert [p.keyframe for p in frkern.DeepCache(interval=2).schedule(5)] == [1, 0, 1, 0, 1]


def test_keyframes_policy():
    p = Keyframes(keyframes=(4, 2), num_steps=6)
    assert p.keyframes == (0, 2, 4)
    assert [q.keyframe for q in p.schedule(6)] == [1, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="made for 6 steps"):
        p.plan(0, 8)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: frkern.FRDiff(interval=0), "interval"),
        (lambda: frkern.FRDiff(interval=2.0), "interval"),
        (lambda: frkern.FRDiff(score_mix="yes"), "score_mix"),
        (lambda: frkern.FRDiff(bias=float("nan")), "bias"),
        (lambda: frkern.Clockwork(clock=0), "clock"),
        (lambda: frkern.DeepCache(branch=-1), "branch"),
        (lambda: Keyframes((0, 9), num_steps=5), "outside"),
        (lambda: frkern.from_json("{"), "does not parse"),
        (lambda: frkern.from_json('{"policy": "Nope"}'), "unknown policy"),
        (lambda: frkern.from_json('{"policy": "FRDiff", "intervall": 2}'), "unknown fields"),
        (lambda: frkern.from_json('[1, 2]'), "JSON object"),
        (lambda: frkern.from_json(json.dumps({"policy": "Keyframes", "keyframes": 3})), "list of ints"),
    ],
)
def test_bad_policies_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make, match", [
    (lambda: frkern.FRDiff(bias=1.5), r"bias must be a number in \[0, 1\].*got 1.5"),
    (lambda: frkern.FRDiff(bias=-0.1), r"bias must be a number in \[0, 1\].*got -0.1"),
    (lambda: frkern.FRDiff(bias="0.5"), r"bias must be a number.*got '0.5'"),
    (lambda: frkern.FRDiff(score_mix=1), r"score_mix must be True or False, got 1"),
    (lambda: Keyframes(keyframes=5), r"keyframes must be a sequence of step indices.*got 5"),
    (lambda: Keyframes(keyframes="0,5"), r"keyframes must be a sequence.*got '0,5'"),
    (lambda: Keyframes((0, 2), bias=2.0), r"Keyframes: bias must be a number in \[0, 1\]"),
    (lambda: Keyframes((0, 2), score_mix="no"), r"Keyframes: score_mix must be True or False"),
])
def test_bad_policy_arguments_name_the_value_and_what_is_accepted(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("data, match", [
    ({"policy": "FRDiff", "interval": "2"}, r"FRDiff: interval must be an int >= 1, got '2'"),
    ({"policy": "FRDiff", "bias": [0.5]}, r"bias must be a number in \[0, 1\].*got \[0.5\]"),
    ({"policy": "Keyframes", "keyframes": 5}, r"keyframes must be a JSON list of ints, got 5"),
    ({"policy": "Keyframes", "keyframes": [0, "3"]}, r"each keyframe must be an int >= 0, got '3'"),
    ({"policy": "Clockwork", "clock": 2.0}, r"clock must be an int >= 1, got 2.0"),
    ({"policy": "DeepCache", "interval": None}, r"interval must be an int >= 1, got None"),
])
def test_json_policy_with_wrong_field_types(data, match):
    with pytest.raises(ValueError, match=match):
        frkern.from_json(json.dumps(data))


def test_policy_json_carries_a_format_version():
    import json

    from frkern.policies import POLICY_VERSION

    p = frkern.Adaptive(0.2, reuse="units")
    data = json.loads(p.to_json())
    assert data["version"] == POLICY_VERSION == 1
    assert frkern.from_json(p.to_json()) == p
    del data["version"]  # files written before the field existed read as version 1
    assert frkern.from_json(json.dumps(data)) == p
    for bad in (POLICY_VERSION + 1, 0, "1", True):
        with pytest.raises(ValueError, match="policy format version"):
            frkern.from_json(json.dumps(dict(data, version=bad)))
