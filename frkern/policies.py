"""Reuse policies: small frozen objects that decide, for step i of N, what a UNet call does.

Policies know nothing of tensors, modules or the runtime: the runtime asks `policy.plan(i, n)` for
a `StepPlan`; what a policy caches is its installer's business (frkern.install). A policy's JSON
carries a format `version` (POLICY_VERSION); older files without one read as version 1.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional, Union


@dataclass(frozen=True)
class StepPlan:
    """What one UNet call does.

    keyframe: run the full network and refresh every cache.
    mix: on non-keyframes, weight of the feature-reuse output against the last keyframe's output
      (score mixing). 1.0 = pure feature reuse, 0.0 = return the keyframe output without running
      the network (a reduced-NFE jump).
    """

    keyframe: bool
    mix: float = 1.0
    # Adaptive policies: whether this call may reuse is decided from the features at run time
    # (frkern.adaptive); keyframe is False until then.
    decide: bool = False
    # The call's batch is [unconditional, conditional] halves that compute the same thing (T-GATE
    # after its gate): run the first half only and return it for both.
    cfg_half: bool = False

    @property
    def runs_network(self) -> bool:
        return self.keyframe or self.decide or self.mix > 0.0


FULL = StepPlan(keyframe=True)


def _check_int(name: str, value, lo: int, cls: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{cls}: {name} must be an int >= {lo}, got {value!r}")


def _check_bool(name: str, value, cls: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{cls}: {name} must be True or False, got {value!r}")


def _check_number(name: str, value, cls: str, positive: bool) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ValueError(f"{cls}: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_bias(value, cls: str) -> None:
    # r - bias with r = step / num_steps in [0, 1): a bias outside [0, 1] makes every lambda 0 or 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{cls}: bias must be a number in [0, 1] (the schedule fraction where lambda = 0.5), got {value!r}")


POLICY_VERSION = 1  # the JSON format of policies; raised when a field's meaning changes


class Policy:
    """Base of all policies: JSON round trip and the `plan` protocol."""

    name: ClassVar[str] = ""
    # Where plan() counts steps from: the whole schedule's first entry (False: a pipeline that runs
    # only the last steps of its schedule, img2img, is planned by position in the whole schedule),
    # or the first step the pipeline runs (True: plan(0, n) is that step, n the steps it runs).
    counts_from_first_step: ClassVar[bool] = False

    def plan(self, step: int, num_steps: int) -> StepPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def schedule(self, num_steps: int) -> list[StepPlan]:
        return [self.plan(i, num_steps) for i in range(num_steps)]

    def to_dict(self) -> dict:
        return {"policy": self.name, "version": POLICY_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_step(step: int, num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    # step >= num_steps happens with samplers that evaluate once more than they have steps (PLMS)


@dataclass(frozen=True)
class NoReuse(Policy):
    """Every call is a full call: the parity baseline."""

    name: ClassVar[str] = "NoReuse"

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        return FULL


def score_mix_lambda(step: int, num_steps: int, bias: float = 0.5, slope: float = 30.0) -> float:
    """FRDiff's score-mixing weight: clip((slope * (r - bias) + 2) / 4, 0, 1), r = step / num_steps."""
    r = step / num_steps
    return min(1.0, max(0.0, (slope * (r - bias) + 2.0) / 4.0))


@dataclass(frozen=True)
class FRDiff(Policy):
    """FRDiff feature reuse (So et al., 2024).

    Keyframes are the steps {0, M, 2M, ...}; other steps reuse every ResNet's conv1 output and
    every transformer's residual branch from the last keyframe. With score_mix, a non-keyframe
    step's output is lambda * FR + (1 - lambda) * keyframe output, and lambda == 0 skips the network.
    """

    interval: int = 2
    score_mix: bool = True
    bias: float = 0.5

    name: ClassVar[str] = "FRDiff"

    def __post_init__(self):
        _check_int("interval", self.interval, 1, "FRDiff")
        _check_bool("score_mix", self.score_mix, "FRDiff")
        _check_bias(self.bias, "FRDiff")

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        if step % self.interval == 0:
            return FULL
        mix = score_mix_lambda(step, num_steps, self.bias) if self.score_mix else 1.0
        return StepPlan(keyframe=False, mix=mix)


@dataclass(frozen=True)
class Keyframes(Policy):
    """Feature reuse with an explicit keyframe set (what Auto-FR searches for).

    Steps listed in `keyframes` (and step 0, always) are full; steps in `jumps` return the last
    keyframe's output without running the network (reduced-NFE steps); the others reuse units as
    FRDiff does. Steps beyond `num_steps` the set was searched for are keyframes (never a silent
    stale read).
    """

    keyframes: tuple[int, ...] = (0,)
    num_steps: int = 0  # the step count the set was made for; 0 = any
    score_mix: bool = False
    bias: float = 0.5
    jumps: tuple[int, ...] = ()

    name: ClassVar[str] = "Keyframes"

    def __post_init__(self):
        for field in ("keyframes", "jumps"):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(
                    f"Keyframes: {field} must be a sequence of step indices (e.g. (0, 5, 12)), got {value!r}"
                )
            for k in value:
                _check_int("each keyframe" if field == "keyframes" else "each jump", k, 0, "Keyframes")
        object.__setattr__(self, "keyframes", tuple(sorted(set(self.keyframes) | {0})))
        object.__setattr__(self, "jumps", tuple(sorted(set(self.jumps))))
        _check_int("num_steps", self.num_steps, 0, "Keyframes")
        _check_bool("score_mix", self.score_mix, "Keyframes")
        _check_bias(self.bias, "Keyframes")
        both = set(self.keyframes) & set(self.jumps)
        if both:
            raise ValueError(f"Keyframes: steps {sorted(both)} are both keyframes and jumps")
        last = max(self.keyframes + self.jumps)
        if self.num_steps and last >= self.num_steps:
            raise ValueError(f"Keyframes: step {last} is outside 0..{self.num_steps - 1}")

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        if self.num_steps and num_steps != self.num_steps:
            raise ValueError(
                f"Keyframes policy was made for {self.num_steps} steps, the sampler asks for {num_steps}"
            )
        if step >= num_steps or step in self.keyframes:
            return FULL
        if step in self.jumps:
            return StepPlan(keyframe=False, mix=0.0)
        mix = score_mix_lambda(step, num_steps, self.bias) if self.score_mix else 1.0
        return StepPlan(keyframe=False, mix=mix)


@dataclass(frozen=True)
class Clockwork(Policy):
    """Clockwork Diffusion (Habibian et al., 2024).

    A full pass every `clock` steps; other steps run only the outer `levels` resolution levels
    (conv_in, down_blocks[:levels], up_blocks[-levels:], conv_out) and reuse the cached input of
    up_blocks[-levels] (the identity adaptor), or, with `adaptor` (the path of an adaptor trained
    by bench/train_clockwork_adaptor.py, frkern.adaptor), the adaptor's prediction of it.
    """

    clock: int = 2
    levels: int = 1
    adaptor: str = ""

    name: ClassVar[str] = "Clockwork"

    def __post_init__(self):
        _check_int("clock", self.clock, 1, "Clockwork")
        _check_int("levels", self.levels, 1, "Clockwork")
        if not isinstance(self.adaptor, str):
            raise ValueError(f"Clockwork: adaptor must be the path of a saved adaptor (a string), got {self.adaptor!r}")

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        return FULL if step % self.clock == 0 else StepPlan(keyframe=False)


@dataclass(frozen=True)
class DeepCache(Policy):
    """DeepCache (Ma et al., 2024): full pass when step % interval == 0; other steps recompute only
    the layers outside cache branch `branch` (branch = 3 * block + layer, as in the `deepcache` package).
    """

    interval: int = 3
    branch: int = 0

    name: ClassVar[str] = "DeepCache"

    def __post_init__(self):
        _check_int("interval", self.interval, 1, "DeepCache")
        _check_int("branch", self.branch, 0, "DeepCache")

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        return FULL if step % self.interval == 0 else StepPlan(keyframe=False)


@dataclass(frozen=True)
class SkipConv(Policy):
    """Skip-Convolutions with an exact reference input (Habibian et al. 2021, REFERENCE §8).

    Every ResNet conv1 and conv2 keeps a reference input x_ref and z = conv(x_ref). Keyframes (step 0,
    and every `interval`-th step if given) compute densely; other steps recompute only the output
    tiles (tile x tile pixels) whose receptive field touches an input tile whose relative change
    exceeds `threshold`. threshold 0 computes what full compute computes.
    """

    threshold: float = 0.05
    tile: int = 8
    interval: Optional[int] = None

    name: ClassVar[str] = "SkipConv"

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"SkipConv: threshold must be a finite number >= 0, got {self.threshold!r}")
        _check_int("tile", self.tile, 1, "SkipConv")
        if self.interval is not None:
            _check_int("interval", self.interval, 1, "SkipConv")

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        if step == 0 or (self.interval is not None and step % self.interval == 0):
            return FULL
        return StepPlan(keyframe=False)


# Faster Diffusion's key steps for 50-step Stable Diffusion: the step indices of its "50ls" mode, the
# default of the authors' code (hutaiHang/Faster-Diffusion, utils_sd.py).
FASTER_DIFFUSION_KEY_STEPS_50: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 15, 25, 35)


@dataclass(frozen=True)
class EncoderPropagation(Policy):
    """Faster Diffusion's encoder propagation (Li et al. 2023, arXiv 2312.09608).

    Key steps run the whole UNet; every other step skips the encoder (conv_in, the down blocks, the
    mid block) and reuses its outputs (the mid block's output and every skip connection) from the
    last key step, and runs the decoder with its own timestep. Key steps: `key_steps` (step indices;
    step 0 always), or every `interval`-th step, or, with neither, the authors' published set for
    50-step Stable Diffusion (FASTER_DIFFUSION_KEY_STEPS_50; other step counts must say theirs).
    parallel=k: the decoders of up to k consecutive non-key steps run as one batched call at the
    first of them (their inputs are the cached encoder outputs and their own timesteps, known from
    the tracked scheduler); the following calls return what it computed.

    prior_noise (0 = off; the authors' pipelines use 0.003): their "prior noise injection", a
    sampler change. Each call of the tracked scheduler's step(model_output, t, sample) at a timestep
    t < prior_noise_below (500) gets sample + prior_noise * z instead of sample, z being the sample
    of the generation's first step (text-to-image: the initial latents). The UNet's inputs are
    unchanged, as in the authors' parallel and ControlNet pipelines (utils_sd.py, hutaiHang/
    Faster-Diffusion); their sequential pipeline also feeds the injected latents to the UNet, which
    differs only at key steps with t < 500 (non-key steps skip the encoder, where the sample enters).
    """

    key_steps: tuple[int, ...] = ()
    interval: int = 0
    parallel: int = 1
    prior_noise: float = 0.0
    prior_noise_below: float = 500

    name: ClassVar[str] = "EncoderPropagation"

    def __post_init__(self):
        value = self.key_steps
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ValueError(f"EncoderPropagation: key_steps must be a sequence of step indices (e.g. (0, 1, 2, 5)), "
                             f"got {value!r}")
        for k in value:
            _check_int("each key step", k, 0, "EncoderPropagation")
        _check_int("interval", self.interval, 0, "EncoderPropagation")
        _check_int("parallel", self.parallel, 1, "EncoderPropagation")
        if self.key_steps and self.interval:
            raise ValueError("EncoderPropagation: give key_steps or interval, not both")
        _check_number("prior_noise", self.prior_noise, "EncoderPropagation", positive=False)
        _check_number("prior_noise_below", self.prior_noise_below, "EncoderPropagation", positive=True)
        keys = tuple(sorted(set(self.key_steps) | {0})) if self.key_steps else ()
        object.__setattr__(self, "key_steps", keys)

    def keys_for(self, num_steps: int) -> tuple[int, ...]:
        """The key steps of a num_steps-step generation."""
        if self.interval:
            return tuple(range(0, num_steps, self.interval))
        if self.key_steps:
            return self.key_steps
        if num_steps != 50:
            raise ValueError(f"EncoderPropagation: the published key steps are for 50 steps, this generation has "
                             f"{num_steps}; give key_steps=(...) or interval=k")
        return FASTER_DIFFUSION_KEY_STEPS_50

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        if step >= num_steps or step in self.keys_for(num_steps):
            return FULL
        return StepPlan(keyframe=False)


class AttentionModes(NamedTuple):
    """What each attention of a call does (T-GATE): per kind, (cache, reuse, average) = store its
    output as the module's state, return the stored state instead of computing (when there is one),
    store the mean of the output's two CFG halves rather than the output."""

    cross: tuple[bool, bool, bool]
    self_: tuple[bool, bool, bool]


TGATE_HALVES = ("auto", "uncond", "cond")


@dataclass(frozen=True)
class TGate(Policy):
    """T-GATE (Liu et al. 2024, "Faster Diffusion via Temporal Attention Decomposition"), in the
    UNet: steps before gate_step - 1 compute cross-attention; self-attention is computed in the
    first warm_up steps, then cached at step warm_up and every sp_interval-th step and reused in
    between. At step gate_step - 1 both are computed and stored as the mean of their CFG halves.
    From gate_step on, cross-attention returns that mean, self-attention is cached every
    fi_interval-th step and reused in between, and (cfg=True: the batch is [uncond, cond]) the two
    CFG halves compute the same thing, so only the first runs and its output is returned for both:
    the pipeline's guidance then yields it exactly (u + s * (u - u) = u). Steps count from the
    first step the pipeline runs, as the package's denoising loop counts them: an img2img pipeline
    (strength < 1) is planned as a text-to-image run of the steps it runs, so its gate comes
    gate_step steps after its first step, wherever in the schedule that is.

    reuse (a DeepCache or an FRDiff policy, or None): feature reuse for the rest of the network, as
    the package's SD/SDXL DeepCache loaders compose it. Its keyframe grid runs from step 0 up to
    the gate, steps gate_step - 1 (every attention must run to store its mean) and gate_step (the
    batch halves: nothing cached before it fits) are keyframes, and the grid restarts at
    gate_step: step i >= gate_step is a keyframe when (i - gate_step) % interval == 0. FRDiff's
    score-mixing weight stays that of the absolute step (it follows the sampler's progress).
    Attention outputs stored by T-GATE outlive keyframes; attentions inside reused parts do not
    run (they neither store nor read).

    half: which CFG half runs after the gate, "uncond" or "cond"; "auto" = what the package's
    loader for the model does (SD/SDXL: the unconditional half, whose added conditioning SDXL's
    time embedding still reads; SVD: the conditional half)."""

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    cfg: bool = True
    reuse: Optional[Union["DeepCache", "FRDiff"]] = None
    half: str = "auto"

    name: ClassVar[str] = "TGate"
    counts_from_first_step: ClassVar[bool] = True

    def __post_init__(self):
        _check_int("gate_step", self.gate_step, 1, "TGate")
        _check_int("sp_interval", self.sp_interval, 1, "TGate")
        _check_int("fi_interval", self.fi_interval, 1, "TGate")
        _check_int("warm_up", self.warm_up, 0, "TGate")
        _check_bool("cfg", self.cfg, "TGate")
        if self.reuse is not None and type(self.reuse) not in (DeepCache, FRDiff):
            raise ValueError("TGate: reuse must be None, a frkern.DeepCache or a frkern.FRDiff (policies on a "
                             f"fixed keyframe grid that restarts at the gate), got {self.reuse!r}")
        if self.half not in TGATE_HALVES:
            raise ValueError(f"TGate: half must be one of {', '.join(TGATE_HALVES)}, got {self.half!r}")

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        half = self.cfg and step >= self.gate_step
        inner = self.reuse
        if inner is None:
            return FULL if step == 0 else StepPlan(keyframe=False, cfg_half=half)
        g = self.gate_step
        k = step if step < g - 1 else step - g  # the inner grid restarts at the gate
        if step in (g - 1, g) or k % inner.interval == 0:
            return StepPlan(keyframe=True, cfg_half=half)
        mix = score_mix_lambda(step, num_steps, inner.bias) if isinstance(inner, FRDiff) and inner.score_mix else 1.0
        return StepPlan(keyframe=False, mix=mix, cfg_half=half)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["reuse"] = None if self.reuse is None else self.reuse.to_dict()
        return d

    def attention_modes(self, step: int) -> AttentionModes:
        compute, cache, reuse = (False, False, False), (True, False, False), (False, True, False)
        if step < self.gate_step - 1:  # semantics planning
            if step <= self.warm_up:
                sa = cache if step == self.warm_up else compute
            else:
                sa = cache if step % self.sp_interval == 0 else reuse
            return AttentionModes(cross=compute, self_=sa)
        if step == self.gate_step - 1:  # the gate: both stored as the mean of the CFG halves
            both = (True, False, self.cfg)
            return AttentionModes(cross=both, self_=both)
        # fidelity improving
        return AttentionModes(cross=reuse, self_=cache if step % self.fi_interval == 0 else reuse)


ADAPTIVE_RULES = ("first_block", "accumulated")
ADAPTIVE_REUSE = ("deepcache", "clockwork", "units")


@dataclass(frozen=True)
class Adaptive(Policy):
    """Reuse decided per call from how much the features changed (First-Block-Cache / TeaCache
    for UNets). The indicator is the input of the first cached part (frkern.adaptive): computed on
    every call, it is compared with its state on the last full call, and the rest of the network
    runs in full or reuses according to `reuse`:
    - "deepcache": DeepCache's cut at `branch`; "clockwork": Clockwork's cut at `levels`;
    - "units": FRDiff's units (every ResNet conv1 output and transformer residual branch), except
      those of down_blocks[0], which compute on every call and give the indicator.
    Rules (value v, largest over the batch; the call reuses iff v < threshold):
    - "first_block": v = mean|g - g_key| / mean|g_key|, g_key = the indicator on the last full call;
    - "accumulated": v = acc + max(poly(d), 0), d = the same relative change against the previous
      call, acc = v of the previous call, reset to 0 on full calls. `poly` (numpy.polyval order,
      identity by default) maps the indicator's change to the output's, calibrated with
      frkern.calibration.calibrate.
    The first `warmup` steps are full; at most `max_reuse` calls in a row reuse. threshold 0 =
    full compute. With score_mix, reuse outputs are blended with the keyframe's as FRDiff does.
    """

    threshold: float = 0.1
    rule: str = "first_block"
    reuse: str = "deepcache"
    branch: int = 0
    levels: int = 1
    warmup: int = 1
    max_reuse: int = 3
    poly: tuple[float, ...] = (1.0, 0.0)
    calibrated_for: str = ""  # what the poly was fitted on (model, sampler, steps), for the record
    score_mix: bool = False
    bias: float = 0.5

    name: ClassVar[str] = "Adaptive"

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"Adaptive: threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.rule not in ADAPTIVE_RULES:
            raise ValueError(f"Adaptive: rule must be one of {ADAPTIVE_RULES}, got {self.rule!r}")
        if self.reuse not in ADAPTIVE_REUSE:
            raise ValueError(f"Adaptive: reuse must be one of {tuple(ADAPTIVE_REUSE)}, got {self.reuse!r}")
        _check_int("branch", self.branch, 0, "Adaptive")
        _check_int("levels", self.levels, 1, "Adaptive")
        _check_int("warmup", self.warmup, 1, "Adaptive")
        _check_int("max_reuse", self.max_reuse, 1, "Adaptive")
        if isinstance(self.poly, (str, bytes)) or not hasattr(self.poly, "__iter__"):
            raise ValueError(f"Adaptive: poly must be a sequence of coefficients (highest degree first), got {self.poly!r}")
        poly = tuple(self.poly)
        if not poly or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in poly):
            raise ValueError(f"Adaptive: poly must be a non-empty sequence of finite numbers, got {self.poly!r}")
        object.__setattr__(self, "poly", tuple(float(c) for c in poly))
        if not isinstance(self.calibrated_for, str):
            raise ValueError(f"Adaptive: calibrated_for must be a string, got {self.calibrated_for!r}")
        _check_bool("score_mix", self.score_mix, "Adaptive")
        _check_bias(self.bias, "Adaptive")

    def plan(self, step: int, num_steps: int) -> StepPlan:
        _check_step(step, num_steps)
        if step < self.warmup or self.threshold == 0:  # v < 0 never holds: no need to measure it
            return FULL
        mix = score_mix_lambda(step, num_steps, self.bias) if self.score_mix else 1.0
        # mix 0 would skip the network, but the decision needs the indicator: blend with 0 weight
        return StepPlan(keyframe=False, mix=mix, decide=True)

    def reuses(self, value: float) -> bool:
        """The decision for an indicator value read from the device."""
        return value < self.threshold


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (NoReuse, FRDiff, Keyframes, Clockwork, DeepCache, SkipConv, Adaptive,
                              EncoderPropagation, TGate)
}

AnyPolicy = Union[NoReuse, FRDiff, Keyframes, Clockwork, DeepCache, SkipConv, Adaptive, EncoderPropagation, TGate]


def policy_from_dict(data: dict) -> Policy:
    if not isinstance(data, dict) or "policy" not in data:
        raise ValueError(f"a policy must be a JSON object with a 'policy' field, got {data!r}")
    kind = data["policy"]
    if kind not in POLICIES:
        raise ValueError(f"unknown policy {kind!r}; known: {sorted(POLICIES)}")
    cls = POLICIES[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= POLICY_VERSION:
        raise ValueError(f"{kind}: policy format version {version!r} is not one this frkern reads "
                         f"(1..{POLICY_VERSION}); a newer frkern wrote it?")
    args = {k: v for k, v in data.items() if k not in ("policy", "version")}
    unknown = set(args) - fields
    if unknown:
        raise ValueError(f"{kind}: unknown fields {sorted(unknown)}; accepted: {sorted(fields)}")
    if isinstance(args.get("reuse"), dict):  # a policy inside a policy (TGate's reuse)
        args["reuse"] = policy_from_dict(args["reuse"])
    for field in ("keyframes", "jumps", "key_steps"):
        if field in args:
            if not isinstance(args[field], list):
                raise ValueError(f"{kind}: {field} must be a JSON list of ints, got {args[field]!r}")
            args[field] = tuple(args[field])
    if "poly" in args:
        if not isinstance(args["poly"], list):
            raise ValueError(f"{kind}: poly must be a JSON list of numbers, got {args['poly']!r}")
        args["poly"] = tuple(args["poly"])
    return cls(**args)


def from_json(text: str) -> Policy:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"policy JSON does not parse: {e}") from None
    return policy_from_dict(data)


def load_policy(path) -> Policy:
    """Load a policy saved with `save_policy` (or written by the Auto-FR search)."""
    with open(path, encoding="utf-8") as f:
        return from_json(f.read())


def save_policy(policy: Policy, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(policy.to_json() + "\n")
