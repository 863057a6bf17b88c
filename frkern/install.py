"""Installers: how a policy goes into a model, in the style of torchao's handler registry.

Each policy type has one registered installer, `installer(target, policy) -> Plan`, that composes
the reuse mechanisms below over the family's map of parts (frkern.family.Parts). An installer and
its mechanisms validate everything and change nothing: they only fill a `Plan`. `install` then
swaps the plan's wrappers in and returns an `Installation`, which `uninstall` undoes (each wrapper
detaches itself). A new policy adds a dataclass and an installer; a new mechanism is one function
here plus, if it wraps a new kind of module, a wrapper class.

Mechanisms: units (FRDiff's cached ResNet and transformer branches, or fused kernels only),
segment cuts (Clockwork, DeepCache), the learned Clockwork adaptor, gated convolutions
(SkipConv), the adaptive probe, score mixing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from torch import nn

from .family import ModelFamily, Parts
from .policies import (Adaptive, Clockwork, DeepCache, EncoderPropagation, FRDiff, Keyframes, NoReuse, Policy,
                       SkipConv, TGate)
from .segments import adaptive_gate, clockwork_cut, deepcache_cut, encoder_cut


@dataclass(frozen=True)
class Target:
    """What an installer reads while it prepares (and must not change)."""

    model: nn.Module
    family: ModelFamily
    parts: Parts
    backend: str


@dataclass
class Plan:
    """Everything an installation will do, validated before anything is changed."""

    units: dict[str, bool] = field(default_factory=dict)  # unit path -> cache it (False: fused kernels only)
    segments: list[str] = field(default_factory=list)  # paths cached whole
    inner_segments: set[str] = field(default_factory=set)  # of those, the ones only cached modules read
    adaptor: Any = None  # a learned Clockwork adaptor and its (first cached, adapted) paths
    adapted: tuple[str, ...] = ()
    gated: list[str] = field(default_factory=list)  # convolutions called through a SkipConv gate
    gate_options: dict = field(default_factory=dict)
    probed: list[str] = field(default_factory=list)  # modules computed before the adaptive indicator
    probe_gate: str | None = None
    decider: Any = None  # the per-call decision of an adaptive policy (frkern.adaptive.Decider)
    keeps_keyframe_output: bool = False  # score mixing or reduced-NFE jumps need the keyframe's output
    decode_ahead: int = 1  # reuse calls batched into one (EncoderPropagation's parallel decoding)
    wrappers: dict = field(default_factory=dict)  # unit path -> wrapper class, for units outside the family's map
    attention_modes: Any = None  # step -> AttentionModes (T-GATE's attention units)
    gate_modes: Any = None  # the AttentionModes of T-GATE's gate step
    cfg_keep: int = 0  # the CFG half (0: uncond, 1: cond) a StepPlan.cfg_half call runs
    cfg_halves: bool = False  # every call's batch must be [uncond, cond] halves (TGate(cfg=True))
    prior_noise: tuple[float, float] | None = None  # (scale, below): scheduler-step injection (EncoderPropagation)
    reuse_limit: int | None = None  # the longest run of reuse calls (adaptive policies)
    begin_checks: list[Callable[[int], None]] = field(default_factory=list)

    @property
    def caches(self) -> bool:
        """Is anything kept between calls? (If not, no step protocol is needed.)"""
        return (any(self.units.values()) or bool(self.segments) or bool(self.gated)
                or self.keeps_keyframe_output or self.decider is not None)


INSTALLERS: dict[type, Callable[[Target, Policy], Plan]] = {}


def register_installer(policy_type: type):
    """Decorator: `fn(target, policy) -> Plan` installs policies of `policy_type`."""

    def register(fn):
        INSTALLERS[policy_type] = fn
        return fn

    return register


def prepare(target: Target, policy: Policy) -> Plan:
    """The validated plan for `policy` on `target`; changes nothing."""
    installer = INSTALLERS.get(type(policy))
    if installer is None:
        raise TypeError(f"frkern.patch: no installer for {type(policy).__name__}; "
                        f"known: {', '.join(sorted(t.__name__ for t in list(INSTALLERS)))}")
    plan = installer(target, policy)
    for path in [*plan.units, *plan.segments, *plan.gated, *plan.probed, *filter(None, [plan.probe_gate])]:
        target.model.get_submodule(path)  # every path must exist before anything changes
    return plan


# --- mechanisms: each fills part of a plan --------------------------------------------------------
def units(target: Target, plan: Plan, cache: bool, computed: tuple[str, ...] = ()) -> None:
    """Every unit of the family's map: cached when `cache` and its wrapper class reuses features
    (fused kernels otherwise), except units inside `computed` (they compute on every call)."""
    for path, kind in target.parts.units.items():
        wrapper = target.family.wrappers[kind]
        cached = cache and wrapper.reusable and not any(path == p or path.startswith(p + ".") for p in computed)
        if cached or wrapper.swap_when_not_cached:
            plan.units[path] = cached


def segment_cut(target: Target, plan: Plan, paths: list[str], u_shaped: bool = True) -> None:
    """Cache `paths` whole. u_shaped: the cut is a Clockwork / DeepCache one, a span of the forward
    around the bottom of the U whose every skip connection to a running block comes from a running
    block: only its last module's output is read by modules that run on a reuse call."""
    plan.segments = list(paths)
    plan.inner_segments = set(paths[:-1]) if u_shaped else set()


def learned_adaptor(target: Target, plan: Plan, policy: Clockwork) -> None:
    """Clockwork's learned adaptor (frkern.adaptor), checked against the model before anything changes."""
    from .adaptor import load_adaptor
    from .clockwork import adaptor_fit

    param = next(target.model.parameters())
    adaptor = load_adaptor(policy.adaptor, device=param.device, dtype=param.dtype)
    plan.adapted = adaptor_fit(target.model, target.parts, policy, adaptor)
    plan.adaptor = adaptor
    plan.begin_checks.append(partial(_check_adaptor_steps, adaptor.config))


def _check_adaptor_steps(config, num_steps: int) -> None:
    if num_steps != config.num_steps:
        raise ValueError(f"frkern: the Clockwork adaptor was trained for {config.num_steps} steps "
                         f"({config.sampler}), this generation has {num_steps}")


def gated_convs(target: Target, plan: Plan, policy: SkipConv) -> None:
    """Every convolution of the map's gated_convs, called through a Skip-Convolution gate by the
    wrapper of the nearest unit above it (swapped in for that, caching nothing)."""
    from .units import GATED_CONVS, gated_conv_supported

    model, parts = target.model, target.parts
    bad = []
    for path in parts.gated_convs:
        unit, child = _gating_unit(parts, path)
        if unit is None or child not in target.family.wrappers[parts.units[unit]].gated_children:
            raise ValueError(f"frkern.patch: {policy.name} cannot gate {path}: no unit above it is a wrapper that "
                             "calls it through a gate")
        if not gated_conv_supported(model.get_submodule(path)):
            bad.append(f"{path} ({model.get_submodule(path)})")
        plan.units.setdefault(unit, False)  # its wrapper calls it through the gate: swapped in, caching nothing
    if bad:
        raise ValueError(f"frkern.patch: {policy.name} gates {GATED_CONVS} only; these are not: {'; '.join(bad)}")
    plan.gated = list(parts.gated_convs)
    plan.gate_options = dict(tile=policy.tile, threshold=float(policy.threshold))


def _gating_unit(parts, path: str) -> tuple[str | None, str]:
    """(the nearest unit above a gated convolution, the convolution's path below it)."""
    head, rest = path, ""
    while "." in head:
        head, _, last = head.rpartition(".")
        rest = f"{last}.{rest}" if rest else last
        if head in parts.units:
            return head, rest
    return None, path


def adaptive_probe(target: Target, plan: Plan, policy: Adaptive, cut: list[str] | None) -> None:
    """The modules before the indicator record what they compute on a probe; the gate measures it."""
    from .adaptive import Decider

    plan.probed, plan.probe_gate = adaptive_gate(target.parts, cut)
    plan.decider = Decider(policy.threshold, policy.rule, policy.poly)
    plan.reuse_limit = policy.max_reuse


def score_mixing(plan: Plan, on: bool) -> None:
    plan.keeps_keyframe_output = plan.keeps_keyframe_output or on


# --- one installer per policy type ----------------------------------------------------------------
@register_installer(NoReuse)
def _no_reuse(target, policy):
    plan = Plan()
    units(target, plan, cache=False)
    return plan


@register_installer(FRDiff)
def _frdiff(target, policy):
    plan = Plan()
    units(target, plan, cache=True)
    score_mixing(plan, policy.score_mix)
    return plan


@register_installer(Keyframes)
def _keyframes(target, policy):
    plan = Plan()
    units(target, plan, cache=True)
    score_mixing(plan, policy.score_mix or bool(policy.jumps))
    return plan


@register_installer(Clockwork)
def _clockwork(target, policy):
    plan = Plan()
    units(target, plan, cache=False)
    segment_cut(target, plan, clockwork_cut(target.parts, policy.levels))
    if policy.adaptor:
        learned_adaptor(target, plan, policy)
    return plan


@register_installer(DeepCache)
def _deepcache(target, policy):
    plan = Plan()
    units(target, plan, cache=False)
    segment_cut(target, plan, deepcache_cut(target.parts, policy.branch))
    return plan


@register_installer(EncoderPropagation)
def _encoder_propagation(target, policy):
    plan = Plan()
    units(target, plan, cache=False)
    segment_cut(target, plan, encoder_cut(target.parts), u_shaped=False)  # the decoder reads every output
    plan.begin_checks.append(policy.keys_for)  # a step count without key steps is refused at begin
    plan.decode_ahead = policy.parallel
    if policy.prior_noise:
        if target.family.name == "UNetSpatioTemporalConditionModel":  # EDM: timesteps are log-sigmas
            raise ValueError(f"{policy.name}: prior_noise is defined on DDPM-style timesteps (t < "
                             f"{policy.prior_noise_below} of 1000, the authors' SD pipelines); SVD's scheduler "
                             "passes continuous noise levels (about -1.6..1.6), where it would inject at every step")
        plan.prior_noise = (float(policy.prior_noise), float(policy.prior_noise_below))
    return plan


# The families T-GATE is defined on (those its package has loaders for), with the CFG half the
# package's loader runs after the gate (half="auto").
TGATE_FAMILIES = {"UNet2DConditionModel": "uncond", "UNetSpatioTemporalConditionModel": "cond"}


def attention_phases(target: Target, plan: Plan, policy: TGate) -> None:
    """Every attention inside the map's transformers (SVD: spatial and temporal) becomes a T-GATE
    attention unit."""
    from diffusers.models.attention_processor import Attention

    from .attention_units import TGateAttention, tgate_supported

    if target.family.name not in TGATE_FAMILIES:
        raise ValueError(f"frkern.patch: {policy.name} is defined on {' and '.join(TGATE_FAMILIES)} (what the tgate "
                         f"package covers); {target.family.name}'s motion/temporal attentions are not part of it")
    half = TGATE_FAMILIES[target.family.name] if policy.half == "auto" else policy.half
    plan.cfg_keep = 0 if half == "uncond" else 1
    plan.cfg_halves = policy.cfg
    bad = []
    for path, kind in target.parts.units.items():
        if kind not in ("transformer", "temporal_transformer"):
            continue
        for name, m in target.model.get_submodule(path).named_modules():
            if isinstance(m, Attention):
                why = tgate_supported(m)
                if why:
                    bad.append(f"{path}.{name}: {why}")
                plan.units[f"{path}.{name}"] = True
                plan.wrappers[f"{path}.{name}"] = TGateAttention
    if bad:
        raise ValueError(f"frkern.patch: {policy.name} stores an attention's output as its result; " + "; ".join(bad))
    if not plan.wrappers:
        raise ValueError(f"frkern.patch: {policy.name}: the model has no transformer attention to gate")
    plan.attention_modes = policy.attention_modes
    plan.gate_modes = policy.attention_modes(policy.gate_step - 1)


@register_installer(TGate)
def _tgate(target, policy):
    if policy.reuse is not None:  # its own installer's plan, with the attention units added
        plan = prepare(target, policy.reuse)
    else:
        plan = Plan()
        units(target, plan, cache=False)
    attention_phases(target, plan, policy)
    return plan


@register_installer(SkipConv)
def _skip_conv(target, policy):
    plan = Plan()
    units(target, plan, cache=False)
    gated_convs(target, plan, policy)
    return plan


@register_installer(Adaptive)
def _adaptive(target, policy):
    plan = Plan()
    if policy.reuse == "units":
        cut = None
        probed, _ = adaptive_gate(target.parts, None)
        units(target, plan, cache=True, computed=tuple(probed))
    else:
        cut = (clockwork_cut(target.parts, policy.levels) if policy.reuse == "clockwork"
               else deepcache_cut(target.parts, policy.branch))
        units(target, plan, cache=False)
        segment_cut(target, plan, cut)
    adaptive_probe(target, plan, policy, cut)
    score_mixing(plan, policy.score_mix)
    return plan


# --- installing a plan ----------------------------------------------------------------------------
class Installation:
    """What `install` put into a model; `uninstall` takes it out again, in reverse order."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.attached: list = []  # wrappers and gates, in the order they were attached
        self.gates: list = []  # SkipConv's gates (the active-tile measure reads them)

    def hooked_skipped_modules(self) -> list[str]:
        """Modules that a reuse call skips whole (the cached segments of a cut) and that carry forward
        hooks or pre-hooks not frkern's own: hooks inside a segment run on full calls only; hooks on the
        segment itself (the wrapper shares its hook dicts) run on every call but see the cached
        output, zero stand-ins where only cached modules read it."""
        from .units import CachedSegment

        return [name for part in self.attached if isinstance(part, CachedSegment) and part.cache_unit
                for name, m in part.original.named_modules(prefix=part.unit)
                if any(not getattr(h, "__module__", "").startswith("frkern")
                       for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))]

    def uninstall(self) -> None:
        for part in reversed(self.attached):
            part.detach()
        self.attached.clear()
        self.gates.clear()


def _place(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def install(target: Target, plan: Plan, runtime) -> Installation:
    """Swap the plan's wrappers into the model (cannot fail once `prepare` passed)."""
    from .adaptive import AdaptiveGate, ProbedModule
    from .clockwork import AdaptedSegment, TappedSegment, Tap
    from .units import CachedSegment, ConvGate, InnerSegment

    model, backend = target.model, target.backend
    inst = Installation(plan)

    def swap(path, make):
        parent, name = _place(model, path)
        wrapper = make(parent._modules[name])
        wrapper.attach(parent, name)
        inst.attached.append(wrapper)

    for path, cached in plan.units.items():
        wrapper_cls = plan.wrappers.get(path) or target.family.wrappers[target.parts.units[path]]
        swap(path, lambda m: wrapper_cls(m, runtime, path, cached, backend))
    tap = Tap()
    for path in plan.segments:
        if path in plan.adapted:
            make = (partial(TappedSegment, tap=tap) if path == plan.adapted[0]
                    else partial(AdaptedSegment, tap=tap, adaptor=plan.adaptor))
        else:
            make = InnerSegment if path in plan.inner_segments else CachedSegment
        swap(path, lambda m: make(m, runtime, path, True, backend))
    for path in plan.gated:  # the convolution stays in the tree; its unit's wrapper calls it through the gate
        unit, child = _gating_unit(target.parts, path)
        gate = ConvGate(runtime, path, backend, **plan.gate_options)
        gate.attach(model.get_submodule(unit), child)
        inst.attached.append(gate)
        inst.gates.append(gate)
    for path in plan.probed:
        swap(path, lambda m: ProbedModule(m, runtime, path, False, backend))
    if plan.probe_gate is not None:
        decider = plan.decider
        swap(plan.probe_gate, lambda m: AdaptiveGate(m, runtime, plan.probe_gate, True, backend,
                                                      rule=decider.rule, poly=decider.poly))
    return inst
