"""Policy specs on the bench command lines: their grammar, parsing and validation (helper module,
not a script).

Every bench script that takes a policy (latency.py --policies, step_anatomy.py / host_overhead.py /
compile_check.py --policy, autofr_search.py --init) parses it here, before any model is built, so
that a typo fails in a second with one line naming the spec, not after minutes of baselines.
The grammar is GRAMMAR below (shown in each script's --help). Importing this module needs no
torch. Policy objects are frkern's: once frkern is imported, those of frkern.policies; before (a
script checking its specs before torch loads, check_before_imports), the same classes from
frkern/policies.py loaded on its own (it needs only the standard library), so that a bad spec
fails in a fraction of a second.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY_NAMES = ("NoReuse", "FRDiff", "Keyframes", "Clockwork", "DeepCache", "SkipConv", "Adaptive", "EncoderPropagation",
                "TGate")

GRAMMAR_LINE = ("NAME[:FIELD=VALUE,...] or @FILE.json[:FIELD=VALUE,...]; NAME one of " + ", ".join(POLICY_NAMES)
                + "; VALUE true/false, none, a number, a tuple (0,3,7) or [0,3,7], a bare or quoted string")
GRAMMAR = """\
policy specs (--policies / --policy / --init):
  NAME[:FIELD=VALUE[,FIELD=VALUE...]]
      a frkern policy by class name (NoReuse, FRDiff, Keyframes, Clockwork, DeepCache, SkipConv,
      Adaptive; case-insensitive) and any of its fields (those of frkern.<NAME>; unset fields keep
      their defaults)
  @FILE[:FIELD=VALUE,...]   (also a bare path ending in .json, or inline JSON {"policy": ...})
      a policy saved with frkern.save_policy (Auto-FR searches, calibrated Adaptive rules), with
      fields overriding the saved ones
  VALUE: true / false, none, an int or a float (3, 0.05, 1e-3), a tuple (0,3,7) or [0,3,7], a
      string, bare (clockwork) or quoted ("clockwork", needed for a string with , = ( or [)
  Relative paths (FILE, Clockwork's adaptor=) are looked up from the current folder, then from the
  repository root. Every spec is parsed and checked (the policy built, Keyframes' num_steps and a
  Clockwork adaptor's steps and clock against --steps where the script has one) before any work;
  a bad one stops the script with a one-line error. Quote specs with ( ) or spaces in the shell.
  examples:
    FRDiff:interval=3,score_mix=false      Clockwork:clock=4,adaptor=bench/results/adaptors/clockwork_tiny_ddim50_c4
    Adaptive:threshold=0.05,reuse=clockwork      'Keyframes:keyframes=(0,3,7),num_steps=10'
    SkipConv:threshold=0.05,tile=4         @bench/results/adaptive_tiny_ddim50_clockwork.policy.json:threshold=0.06
"""

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INT = re.compile(r"[+-]?\d+$")


class SpecError(ValueError):
    """A policy spec that does not parse or does not make a valid policy."""


@dataclass(frozen=True)
class Spec:
    """A parsed, validated spec: the text as given, the policy it makes, and the row label."""

    text: str
    policy: object  # a frkern.Policy
    label: str
    path: str = ""  # the policy file of an @FILE spec


def split_top(text: str, sep: str = ",") -> list[str]:
    """text split at `sep` outside brackets and quotes: 'a=1,b=(2,3)' -> ['a=1', 'b=(2,3)']."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced {ch!r} in {text!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote:
        raise SpecError(f"unclosed quote {quote} in {text!r}")
    if depth:
        raise SpecError(f"unclosed bracket in {text!r}")
    parts.append("".join(cur))
    return parts


def parse_value(text: str):
    """One VALUE of the grammar -> a Python value (tuples as tuples)."""
    v = text.strip()
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.match(v):
        return int(v)
    if _NUMBER.match(v):
        return float(v)
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return json.loads(v) if v[0] == '"' else v[1:-1]
    if v[:1] in "([" or v[-1:] in ")]":
        if len(v) < 2 or {v[0], v[-1]} not in ({"(", ")"}, {"[", "]"}):
            raise SpecError(f"value {v!r}: a tuple is (a,b,...) or [a,b,...]")
        inner = v[1:-1].strip()
        return tuple(parse_value(p) for p in split_top(inner) if p.strip()) if inner else ()
    if not v:
        raise SpecError("empty value")
    if any(c in v for c in "=,{}"):
        raise SpecError(f"value {v!r}: quote a string that holds = , {{ or }}")
    return v  # a bare string: clockwork, a path


def parse_fields(argstr: str) -> dict:
    """'interval=3,score_mix=false' -> {'interval': 3, 'score_mix': False}."""
    fields = {}
    for part in split_top(argstr):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise SpecError(f"{part.strip()!r} is not FIELD=VALUE")
        if key in fields:
            raise SpecError(f"field {key!r} given twice")
        if key in ("policy", "version"):
            raise SpecError(f"field {key!r} is not set in a spec")
        fields[key] = parse_value(value)
    return fields


def find_path(path: str, suffixes=("",)) -> str | None:
    """An existing path: as given (from the current folder), else from the repository root."""
    for base in ("", REPO_ROOT):
        cand = os.path.join(base, os.path.expanduser(path)) if base else os.path.expanduser(path)
        if any(os.path.exists(cand + s) for s in suffixes):
            return cand
    return None


def _jsonable(value):
    """Tuples as lists, as frkern's policy JSON has them."""
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def split_file(body: str) -> tuple[str, str]:
    """'FILE:FIELD=VALUE,...' -> (FILE, 'FIELD=VALUE,...'): FILE is the shortest prefix before a ':'
    that is an existing file (paths may hold ':'), else everything before the last ':'."""
    for i, ch in enumerate(body):
        if ch == ":":
            found = find_path(body[:i])
            if found is not None and os.path.isfile(found):
                return body[:i], body[i + 1:]
    if find_path(body) is not None or ":" not in body:
        return body, ""
    path, _, argstr = body.rpartition(":")
    return path, argstr


def spec_dict(text: str) -> tuple[dict, str]:
    """The policy dict (frkern's JSON form) a spec stands for, and the policy file it read ("" for
    NAME specs); stdlib only."""
    t = text.strip()
    if not t:
        raise SpecError("empty spec")
    if t.startswith("{"):
        try:
            data = json.loads(t)
        except json.JSONDecodeError as e:
            raise SpecError(f"inline policy JSON does not parse: {e}") from None
        return data, ""
    if t.startswith("@") or t.partition(":")[0].lower().endswith(".json"):
        path, argstr = split_file(t[1:] if t.startswith("@") else t)
        found = find_path(path)
        if found is None or not os.path.isfile(found):
            raise SpecError(f"policy file {path!r} not found (looked in the current folder and {REPO_ROOT})")
        try:
            with open(found, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpecError(f"policy file {path!r} does not parse as JSON: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"policy file {path!r} holds no policy object")
        data.update({k: _jsonable(v) for k, v in parse_fields(argstr).items()})
        return data, found
    name, _, argstr = t.partition(":")
    name = name.strip()
    known = {n.lower(): n for n in POLICY_NAMES}
    if name.lower() not in known:
        raise SpecError(f"unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})")
    data = {"policy": known[name.lower()]}
    data.update({k: _jsonable(v) for k, v in parse_fields(argstr).items()})
    return data, ""


def _resolve_adaptor(data: dict) -> None:
    """Clockwork's adaptor= path (a stem: .safetensors + .json) resolved like FILE paths."""
    if data.get("policy") == "Clockwork" and isinstance(data.get("adaptor"), str) and data["adaptor"]:
        found = find_path(data["adaptor"], (".safetensors", ".json"))
        if found is None:
            raise SpecError(f"Clockwork adaptor {data['adaptor']!r} not found (no .safetensors/.json there, "
                            f"from the current folder or {REPO_ROOT})")
        data["adaptor"] = found


def check_steps(policy, steps: int) -> None:
    """What a policy says about the step count, checked without a model: Keyframes' num_steps
    (via its schedule) and a Clockwork adaptor's training steps and clock."""
    try:
        policy.schedule(steps)
    except ValueError as e:
        raise SpecError(f"{e} (--steps {steps})") from None
    adaptor = getattr(policy, "adaptor", "")
    if adaptor and os.path.exists(adaptor + ".json"):
        with open(adaptor + ".json", encoding="utf-8") as f:
            cfg = json.load(f).get("config", {})
        if cfg.get("num_steps") not in (None, steps):
            raise SpecError(f"the adaptor was trained for {cfg['num_steps']} steps, --steps is {steps}")
        if cfg.get("clock") not in (None, policy.clock):
            raise SpecError(f"the adaptor was trained for clock {cfg['clock']}, the policy has clock {policy.clock}")


STANDALONE = "_bench_specs_frkern_policies"  # sys.modules name of frkern/policies.py loaded on its own


def policies_module():
    """frkern.policies once frkern is imported; before that, frkern/policies.py loaded on its own
    (stdlib only: no torch), or, should that fail, frkern.policies after all."""
    for name in ("frkern.policies", STANDALONE):
        if name in sys.modules:
            return sys.modules[name]
    if "frkern" in sys.modules:
        import frkern.policies

        return frkern.policies
    try:
        found = importlib.util.find_spec("frkern")  # locates the package without importing it
        path = os.path.join(os.path.dirname(found.origin), "policies.py")
        spec = importlib.util.spec_from_file_location(STANDALONE, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[STANDALONE] = mod  # dataclasses resolve ClassVar annotations through it
        spec.loader.exec_module(mod)
        return mod
    except Exception:
        sys.modules.pop(STANDALONE, None)
        import frkern.policies

        return frkern.policies


def parse_spec(text: str, steps: int | None = None) -> Spec:
    """A spec -> Spec (policy built and checked); SpecError says what is wrong."""
    data, path = spec_dict(text)
    _resolve_adaptor(data)
    try:
        policy = policies_module().policy_from_dict(data)
    except (TypeError, ValueError) as e:
        raise SpecError(str(e)) from None
    if steps is not None:
        check_steps(policy, steps)
    label = text.strip()
    if path:
        argstr = split_file(label[1:] if label.startswith("@") else label)[1]
        label = f"{policy.name} @{os.path.basename(path)}" + (f":{argstr}" if argstr else "")
    return Spec(text, policy, label, path)


def policy_from_spec(text: str, steps: int | None = None):
    """'FRDiff:interval=3,score_mix=false' -> frkern.FRDiff(interval=3, score_mix=False)."""
    return parse_spec(text, steps).policy


def error_line(option: str, text: str, e: Exception) -> str:
    return f"{option} {text!r}: {e}. Spec grammar: {GRAMMAR_LINE} (examples in --help)"


def parse_specs(texts, steps: int | None = None, option: str = "--policies") -> list[Spec]:
    """Every spec parsed and checked; the first bad one raises SpecError with error_line's text."""
    out = []
    for text in texts:
        try:
            out.append(parse_spec(text, steps))
        except SpecError as e:
            raise SpecError(error_line(option, text, e)) from None
    return out


def specs_or_exit(ap, texts, steps: int | None = None, option: str = "--policies") -> list[Spec]:
    """parse_specs, or exit 2 with one line on stderr (argparse's error form, without the usage)."""
    try:
        return parse_specs(texts, steps, option)
    except SpecError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")


def spec_or_exit(ap, text: str, steps: int | None = None, option: str = "--policy") -> Spec:
    return specs_or_exit(ap, [text], steps, option)[0]


def check_before_imports(make_parser, check) -> None:
    """For a script run as __main__, before its heavy imports: parse the command line and run
    check(ap, args) (which exits on a bad spec), so that a typo fails before torch loads."""
    ap = make_parser()
    check(ap, ap.parse_args())
