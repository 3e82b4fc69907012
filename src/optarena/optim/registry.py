"""The registry: every optimizer as one row of a table, and everything built from it.

A row (:class:`Entry`) is a name, a chain of transforms, the constructor's defaults (torch's
names and order) and a description. The public classes (``AdamW``, ``AdamMini``, ...), ``create``
and ``available`` are generated from the rows; a hybrid routes parameter roles to rows. The four
Adams of the studies are one line each that differ only in the second moment:

>>> ADAMS = [adam("element"), adam("layer"), adam("adam-mini"), adam("factored")]  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from optarena.optim.checks import BETAS3, BOOL, POS_INT, Check, validate
from optarena.optim.engine import Chain, Factory
from optarena.optim.optimizer import ChainOptimizer, is_named
from optarena.optim.roles import Role
from optarena.optim.transforms import (
    EMA,
    ADOPTUpdate,
    Cautious,
    ClipByRMS,
    CoupledDecay,
    DecayAfterStep,
    DecoupledDecay,
    Gate,
    HeavyBall,
    KronPrecondition,
    LionUpdate,
    MarsCorrection,
    MatrixDecay,
    NAdamMomentum,
    NormalizeNeurons,
    Orthogonalize,
    RelativeStep,
    ScaleByLR,
    ScaleBySecondMoment,
    ScheduleFreeStep,
    Sign,
    SlowEMA,
    SoapStep,
    SophiaClip,
    classic_weights,
    frozen_weights,
    unfolded_weights,
)

Params = nn.Module | Iterable[Any]


@dataclass(frozen=True)
class Entry:
    """One registered optimizer."""

    name: str
    chain: Factory | None  # the group's options -> its transforms; None: a composite
    defaults: dict[str, Any]  # the constructor's hyperparameters, in torch's order
    description: str
    family: str
    class_name: str | None = None
    reference: str = ""  # what it is checked against (docs/optimizers.md)
    structured: bool = False  # cuts blocks or routes by role: roles must be known
    no_decay_roles: tuple[str, ...] = ()
    torch_kernel: str | None = None  # "adamw" | "sgd": torch's fused kernel is this chain
    checks: Mapping[str, Check] = field(default_factory=dict)  # options no transform reads
    consistent: Callable[[str, Mapping[str, Any]], None] | None = None
    build: Callable[..., torch.optim.Optimizer] | None = None  # composites (hybrids)
    complex_ok: bool = True  # complex parameters as their real view; False: refused
    # numbers that shape the chain (loop counts): compiled as constants
    static: tuple[str, ...] = ()

    def check_group(self, owner: str, group: Mapping[str, Any]) -> None:
        validate(owner, {"maximize": BOOL, "cautious": BOOL}, group)
        if self.consistent is not None:
            self.consistent(owner, group)


# --------------------------------------------------------------------------- chains


def caution(o: Mapping[str, Any]) -> tuple[Cautious, ...]:
    """``cautious=True``: the mask after a chain's momentum (SOAP, Kron: after the
    preconditioner, whose update's signs are no longer the momentum's)."""
    return (Cautious(),) if o.get("cautious") else ()


def adam(granularity: str) -> Factory:
    """Adam with its second moment at one granularity: element (Adam), layer (Adalayer),
    adam-mini (Adam-mini), factored (the study's Adafactor)."""

    def chain(o: Mapping[str, Any]) -> Chain:
        moment = ScaleBySecondMoment(granularity, amsgrad=bool(o.get("amsgrad")))
        return Chain((EMA(debias=True), *caution(o), moment, DecoupledDecay(), ScaleByLR()))

    return chain


def frozen(o: Mapping[str, Any]) -> Chain:
    """Adam whose second moment is a uniform mean over the first steps, then frozen."""
    moment = ScaleBySecondMoment("element", frozen_weights)
    return Chain((EMA(debias=True), moment, DecoupledDecay(), ScaleByLR(), Gate()))


def sgd(o: Mapping[str, Any]) -> Chain:
    """torch's SGD: coupled decay, heavy ball; decoupled decay on request."""
    if o.get("decoupled_weight_decay"):
        return Chain((HeavyBall(), *caution(o), DecoupledDecay(), ScaleByLR()))
    return Chain((CoupledDecay(), HeavyBall(), *caution(o), ScaleByLR()))


def sgd_ema(o: Mapping[str, Any]) -> Chain:
    momentum = EMA(beta=("momentum", None), debias=True)
    return Chain((momentum, *caution(o), DecoupledDecay(), ScaleByLR()))


def signum(o: Mapping[str, Any]) -> Chain:
    return Chain((EMA(beta=("momentum", None)), *caution(o), Sign(), DecoupledDecay(), ScaleByLR()))


def lion(o: Mapping[str, Any]) -> Chain:
    return Chain((LionUpdate(), *caution(o), DecoupledDecay(), ScaleByLR()))


def sophia(o: Mapping[str, Any]) -> Chain:
    momentum = EMA(beta=("betas", 0))
    return Chain((momentum, *caution(o), SophiaClip(), DecoupledDecay(), ScaleByLR()))


def nadamw(o: Mapping[str, Any]) -> Chain:
    """torch's NAdam with decoupled decay: Nesterov's momentum schedule, Adam's second moment."""
    moment = ScaleBySecondMoment("element")
    return Chain((NAdamMomentum(), *caution(o), moment, DecoupledDecay(), ScaleByLR()))


def ademamix(o: Mapping[str, Any]) -> Chain:
    """Adam whose numerator adds a slow EMA: ``(m̂ + α s) / (√v̂ + ε)``."""
    moment = ScaleBySecondMoment("element")
    return Chain((EMA(debias=True), *caution(o), SlowEMA(), moment, DecoupledDecay(), ScaleByLR()))


def mars(o: Mapping[str, Any]) -> Chain:
    """MARS-AdamW: AdamW on the variance-reduced gradient."""
    moment = ScaleBySecondMoment("element", unfolded_weights)
    steps = (MarsCorrection(), EMA(debias=True), *caution(o), moment)
    return Chain((*steps, DecoupledDecay(), ScaleByLR()))


def adopt(o: Mapping[str, Any]) -> Chain:
    return Chain((ADOPTUpdate(), *caution(o), DecoupledDecay(), ScaleByLR()))


def muon(o: Mapping[str, Any]) -> Chain:
    """torch.optim.Muon: EMA momentum (Nesterov's look-ahead by default), Newton-Schulz on each
    matrix, decoupled decay."""
    momentum = EMA("momentum_buffer", ("momentum", None), nesterov=bool(o.get("nesterov")))
    return Chain((momentum, Orthogonalize(), *caution(o), DecoupledDecay(), ScaleByLR()))


def normuon(o: Mapping[str, Any]) -> Chain:
    """NorMuon: Muon's chain, each neuron of each orthogonalised matrix normalised by an EMA of
    its mean square."""
    momentum, _, *rest = muon(o)
    return Chain((momentum, NormalizeNeurons(), *rest))  # Cautious, if asked, stays after it


def soap(o: Mapping[str, Any]) -> Chain:
    """SOAP: Adam in Shampoo's eigenbasis, decay on the stepped parameter."""
    return Chain((SoapStep(), *caution(o), DecoupledDecay(), ScaleByLR(), DecayAfterStep()))


def kron(o: Mapping[str, Any]) -> Chain:
    """PSGD-Kron: the bias-corrected momentum through a fitted Kronecker-factored
    preconditioner; decoupled decay on matrices."""
    momentum = EMA("momentum_buffer", ("momentum", None), debias=True)
    return Chain((momentum, KronPrecondition(), *caution(o), MatrixDecay(), ScaleByLR()))


def schedule_free(o: Mapping[str, Any]) -> Chain:
    """Schedule-Free AdamW: Adam's normalised gradient, the interpolated step."""
    return Chain((ScaleBySecondMoment("element"), ScheduleFreeStep()))


def adafactor_classic(o: Mapping[str, Any]) -> Chain:
    """Shazeer & Stern: the factored moment (last two axes, β2 schedule), update clipping, the
    relative step (which scales the decay), momentum on the scaled update."""
    moment = ScaleBySecondMoment("factored-classic", classic_weights, square_sum=True)
    return Chain(
        (moment, ClipByRMS(), DecoupledDecay(), RelativeStep(), EMA("exp_avg", ("beta1", None)))
    )


# --------------------------------------------------------------------------- consistency checks


def _sgd_consistent(owner: str, g: Mapping[str, Any]) -> None:
    if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"]):
        raise ValueError(f"{owner}: nesterov=True needs momentum > 0 and dampening = 0")


def _amsgrad_consistent(owner: str, g: Mapping[str, Any]) -> None:
    if g.get("amsgrad") not in (True, False):
        raise ValueError(f"{owner}: invalid amsgrad={g.get('amsgrad')!r}; expected True or False")
    if g.get("amsgrad") and g["optimizer"] == "adafactor":
        raise ValueError(
            f"{owner}: amsgrad=True has no meaning for a factored second moment; use adamw, "
            "adalayer or adam-mini"
        )


def _classic_consistent(owner: str, g: Mapping[str, Any]) -> None:
    if g["lr"] is None and not g["relative_step"]:
        raise ValueError(f"{owner}: lr=None needs relative_step=True; give an lr")
    if g["lr"] is not None and g["relative_step"]:
        raise ValueError(
            f"{owner}: lr={g['lr']!r} with relative_step=True would be ignored (the step size "
            "is min(1e-2, 1/sqrt(t))); pass lr=None or relative_step=False"
        )
    if g["warmup_init"] and not g["relative_step"]:
        raise ValueError(f"{owner}: warmup_init=True needs relative_step=True")


# --------------------------------------------------------------------------- constructors

_OPTIONS = {  # keyword-only options every optimizer takes, torch's flags among them
    "model": None,
    "partition": None,
    "state_dtype": None,
    "no_decay_roles": None,
    "fused": None,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
}


def _hyper(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` with the values ``given``, sequences as tuples (anything else as given, for
    the checks to refuse with their message)."""
    values = {k: given.get(k, v) for k, v in defaults.items()}
    return {k: tuple(v) if isinstance(v, (tuple, list)) else v for k, v in values.items()}


def _signature(defaults: Mapping[str, Any], *, method: bool = False) -> inspect.Signature:
    """torch's constructor form: ``params``, the hyperparameters in torch's order (by position
    or keyword), then the options (keyword-only)."""
    kind = inspect.Parameter
    params = [kind("self", kind.POSITIONAL_ONLY)] if method else []
    params.append(kind("params", kind.POSITIONAL_OR_KEYWORD))
    params += [kind(k, kind.POSITIONAL_OR_KEYWORD, default=v) for k, v in defaults.items()]
    params += [kind(k, kind.KEYWORD_ONLY, default=v) for k, v in _OPTIONS.items()]
    return inspect.Signature(params)


def _bind(
    sig: inspect.Signature, defaults: Mapping[str, Any], *args: Any, **kwargs: Any
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A call's ``params``, hyperparameters (defaults filled in) and the options it gives."""
    bound = sig.bind(*args, **kwargs).arguments
    options = {k: bound[k] for k in _OPTIONS if k in bound}
    return bound["params"], _hyper(defaults, bound), options


Build = Callable[[Any, dict[str, Any], dict[str, Any]], torch.optim.Optimizer]


def _constructor(defaults: Mapping[str, Any], build: Build) -> Callable[..., torch.optim.Optimizer]:
    """``build(params, hyperparameters, options)`` called in torch's constructor form, with a
    real signature (``create`` reads it)."""
    sig = _signature(defaults)

    def construct(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return build(*_bind(sig, defaults, *args, **kwargs))

    construct.__signature__ = sig  # type: ignore[attr-defined]
    return construct


# --------------------------------------------------------------------------- composites
# (hybrids of routes; ``Hybrid`` is defined below and looked up when they run)


def _hybrid_custom(params: Params, hp: dict[str, Any], options: dict[str, Any]):
    if hp["routes"] is None:
        raise ValueError(
            "hybrid needs routes, which optimizer for which role, e.g. "
            "routes={'default': 'sgd-ema', 'output': ('adamw', {'lr': 3e-3})} "
            "(in a config: [hparams.routes]); or take a registered one: "
            + ", ".join(n for n in REGISTRY if n.startswith("hybrid-"))
        )
    return Hybrid(params, hp["routes"], **options)


STUDY_HYBRID = {
    "lr": 1.0,
    "momentum": 0.9,
    "adaptive_lr": 3.16e-3,
    "betas": (0.9, 0.95),
    "eps": 1e-15,
    "weight_decay": 0.0,
}


def _study_hybrid(adaptive: str, roles: tuple[str, ...]) -> Callable[..., torch.optim.Optimizer]:
    """The study's "adaptivity only where it matters": EMA-momentum SGD on the body,
    ``adaptive`` (Adalayer or Adafactor) on ``roles``, each with its own peak LR."""

    def build(params: Params, hp: dict[str, Any], options: dict[str, Any]):
        body = {k: hp[k] for k in ("lr", "momentum", "weight_decay")}
        head = {"lr": hp["adaptive_lr"], **{k: hp[k] for k in ("betas", "eps", "weight_decay")}}
        routes: dict[str, Route] = {"default": ("sgd-ema", body)}
        routes |= {role: (adaptive, head) for role in roles}
        return Hybrid(params, routes, **options)

    return _constructor(STUDY_HYBRID, build)


FROZEN = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "precondition_steps": 1000,
    "freeze": True,
}


def _frozen_build(params: Params, hp: dict[str, Any], options: dict[str, Any]):
    """The frozen preconditioner, with ``v`` kept updating on ``unfrozen_roles``."""
    unfrozen = hp.pop("unfrozen_roles")
    if not unfrozen:
        return _private_class("adam-frozen", "AdamFrozen")(params, **hp, **options)
    routes: dict[str, Route] = {"default": ("adam-frozen", hp)}
    routes |= {str(role): ("adam-frozen", {**hp, "freeze": False}) for role in unfrozen}
    return Hybrid(params, routes, **options)


CAUTIOUS = {"cautious": False}  # every momentum optimizer's option (after torch's arguments)
MUON = {
    "lr": 1e-3,
    "weight_decay": 0.1,
    "momentum": 0.95,
    "nesterov": True,
    "ns_coefficients": (3.4445, -4.7750, 2.0315),
    "eps": 1e-7,
    "ns_steps": 5,
    "adjust_lr_fn": None,
    "ns_dtype": "bfloat16",
    "per_head": False,
} | CAUTIOUS
# pytorch-optimizer's NorMuon defaults; ``row_eps`` is its ``eps`` (``eps`` is Newton-Schulz's)
NORMUON = MUON | {
    "lr": 2e-2,
    "weight_decay": 0.0,
    "beta2": 0.95,
    "row_eps": 1e-10,
    "update_scale": "preserve_norm",
}
MUON_ADAMW_ROLES = ("embedding", "output", "norm", "bias", "other")


MATRIX_ADAMW = {  # the AdamW route of a matrix optimizer, as its adamw_* arguments
    "adamw_lr": 3e-4,
    "adamw_betas": (0.9, 0.95),
    "adamw_eps": 1e-8,
    "adamw_weight_decay": 0.0,
}


def _matrix_build(name: str, defaults: Mapping[str, Any]) -> Callable[..., torch.optim.Optimizer]:
    """``name`` (Muon, NorMuon) on the hidden matrices of a model (or named parameters), AdamW
    with its own ``adamw_*`` hyperparameters on the embeddings, output layer, norms, biases and
    parameters of no known role; plain parameters are all given to ``name``, as torch's Muon."""

    def build(params: Any, hp: dict[str, Any], options: dict[str, Any]):
        adam = {k.removeprefix("adamw_"): hp.pop(k) for k in MATRIX_ADAMW}
        if not isinstance(params, nn.Module):
            params = list(params)
            if not is_named(params):
                return CLASSES[REGISTRY[name].class_name or ""](params, **hp, **options)
        routes: dict[str, Route] = {"default": (name, hp)}
        routes |= {role: ("adamw", adam) for role in MUON_ADAMW_ROLES}
        return MatrixHybrid(params, routes, **options)

    return _constructor(defaults | MATRIX_ADAMW, build)


# --------------------------------------------------------------------------- the table

ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
CLASSIC = {
    "lr": None,
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "weight_decay": 0.0,
    "scale_parameter": True,
    "relative_step": True,
    "warmup_init": False,
}

# fmt: off
ENTRIES: list[Entry] = [
    Entry("adamw", adam("element"), ADAM | {"weight_decay": 1e-2},
          "Adam with decoupled weight decay (elementwise second moment)", "adam", "AdamW",
          "torch.optim.AdamW", torch_kernel="adamw", consistent=_amsgrad_consistent),
    Entry("adam-mini", adam("adam-mini"), ADAM | {"single_block_value": False},
          "Adam-mini: one second moment per head / neuron / token block (~half AdamW's state)",
          "adam", "AdamMini", "adam-mini 1.1.1", structured=True,
          no_decay_roles=("norm", "bias"), consistent=_amsgrad_consistent),
    Entry("adalayer", adam("layer"), ADAM | {"split_qkv": True, "per_row_output": True},
          "Adalayer: one second-moment scalar per layer (QKV split, per-row last layer)",
          "adam", "Adalayer", "the study's formula", structured=True,
          consistent=_amsgrad_consistent),
    Entry("adafactor", adam("factored"), ADAM,
          "Adafactor as in the Deconstructing study: Adam with a factored second moment",
          "adam", "Adafactor", "the study's formula", consistent=_amsgrad_consistent),
    Entry("adafactor-classic", adafactor_classic, CLASSIC,
          "Adafactor of Shazeer & Stern: relative step, update clipping, beta2 schedule",
          "adam", "AdafactorClassic", "transformers.optimization.Adafactor",
          consistent=_classic_consistent),
    Entry("sgd", sgd, {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                       "nesterov": False, "decoupled_weight_decay": False},
          "SGD with heavy-ball momentum (torch.optim.SGD; the study's baseline)", "sgd", "SGD",
          "torch.optim.SGD", torch_kernel="sgd", consistent=_sgd_consistent),
    Entry("sgd-ema", sgd_ema, {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
          "SGD with bias-corrected EMA momentum (the hybrids' body optimizer)", "sgd", "EMASGD",
          "the study's formula"),
    Entry("lion", lion, {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
          "Lion: sign of an interpolated momentum", "sign", "Lion", "lion-pytorch 0.2.5"),
    Entry("signum", signum, {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
          "Signum: sign of EMA momentum", "sign", "Signum", "pytorch-optimizer SignSGD"),
    Entry("sophia", sophia, {"lr": 1e-4, "betas": (0.965, 0.99), "rho": 0.04,
                             "weight_decay": 0.1, "bs": 5120, "hessian_interval": 10},
          "Sophia-G: momentum clipped by a Gauss-Newton-Bartlett Hessian estimate", "sign",
          "SophiaG", "sophia-opt 0.2.2", checks={"hessian_interval": POS_INT}),
    Entry("nadamw", nadamw, {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                             "weight_decay": 1e-2, "momentum_decay": 4e-3},
          "NAdamW: Adam with Nesterov momentum (torch's schedule) and decoupled weight decay",
          "adam", "NAdamW", "torch.optim.NAdam(decoupled_weight_decay=True)"),
    Entry("ademamix", ademamix, {"lr": 1e-3, "betas": (0.9, 0.999, 0.9999), "eps": 1e-8,
                                 "weight_decay": 0.0, "alpha": 5.0, "t_alpha_beta3": None},
          "AdEMAMix: Adam plus a slow EMA of gradients (alpha, beta3 warm-up)", "adam",
          "AdEMAMix", "pytorch-optimizer 4.1.0 AdEMAMix(weight_decouple=True)",
          checks={"betas": BETAS3}),
    Entry("mars", mars, {"lr": 3e-3, "betas": (0.95, 0.99), "eps": 1e-8, "weight_decay": 0.0,
                         "gamma": 0.025},
          "MARS-AdamW: AdamW on a variance-reduced (gradient-difference) gradient", "adam",
          "MARS", "pytorch-optimizer 4.1.0 MARS(mars_type='adamw', optimize_1d=True)"),
    Entry("adopt", adopt, {"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6,
                           "weight_decay": 0.0, "clip_exponent": 0.25},
          "ADOPT: momentum of the gradient normalised by the previous second moment, clipped",
          "adam", "ADOPT", "pytorch-optimizer 4.1.0 ADOPT(weight_decouple=True)"),
    Entry("muon", muon, MUON,
          "Muon: Newton-Schulz-orthogonalised momentum on each hidden matrix (AdamW on the rest)",
          "matrix", "Muon", "torch.optim.Muon", checks={"nesterov": BOOL}, complex_ok=False,
          static=("ns_steps",), build=_matrix_build("muon", MUON)),
    Entry("normuon", normuon, NORMUON,
          "NorMuon: Muon with each neuron of the orthogonalised update normalised (AdamW on the "
          "rest)", "matrix", "NorMuon", "pytorch-optimizer 4.1.0 NorMuon",
          checks={"nesterov": BOOL}, complex_ok=False, static=("ns_steps",),
          build=_matrix_build("normuon", NORMUON)),
    Entry("soap", soap, {"lr": 3e-3, "betas": (0.95, 0.95), "shampoo_beta": None,
                         "weight_decay": 1e-2, "precondition_frequency": 10,
                         "max_precondition_dim": 10000, "precondition_1d": False,
                         "correct_bias": True, "normalize_gradient": False, "eps": 1e-8},
          "SOAP: Adam in the eigenbasis of Shampoo's preconditioner, refreshed every few steps",
          "matrix", "SOAP", "pytorch-optimizer 4.1.0 SOAP", complex_ok=False,
          static=("max_precondition_dim",)),
    Entry("kron", kron, {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
                         "pre_conditioner_update_probability": None,
                         "max_size_triangular": 8192, "min_ndim_triangular": 2,
                         "memory_save_mode": None, "momentum_into_precondition_update": True,
                         "precondition_lr": 0.1, "precondition_init_scale": 1.0},
          "PSGD-Kron: momentum through a Kronecker-factored preconditioner fitted to random probes",
          "matrix", "Kron", "pytorch-optimizer 4.1.0 Kron", complex_ok=False),
    Entry("schedule-free", schedule_free, {"lr": 2.5e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                           "weight_decay": 0.0, "warmup_steps": 0, "r": 0.0,
                                           "weight_lr_power": 2.0},
          "Schedule-Free AdamW: no LR schedule; steps at an interpolation, evaluates the average",
          "adam", "AdamWScheduleFree", "schedulefree 1.4.1 AdamWScheduleFree", complex_ok=False),
    Entry("adam-frozen", frozen, FROZEN,
          "Adam whose second moment is averaged for the first steps, then frozen", "adam",
          reference="the study's formula",
          build=_constructor(FROZEN | {"unfrozen_roles": ()}, _frozen_build)),
]
# fmt: on
# ``cautious=True`` (a mask after the momentum, or after the preconditioner or orthogonalisation
# that follows it) on every optimizer with a momentum: all but these three (the classic
# Adafactor's momentum is off by default).
WITHOUT_MOMENTUM = ("adafactor-classic", "schedule-free", "adam-frozen")
ENTRIES = [
    e if e.name in WITHOUT_MOMENTUM else replace(e, defaults=e.defaults | CAUTIOUS) for e in ENTRIES
]

# --------------------------------------------------------------------------- lookup

REGISTRY: dict[str, Entry] = {}


def register(e: Entry) -> Entry:
    REGISTRY[e.name] = e
    return e


def entry(name: str) -> Entry:
    """The entry called ``name`` (case, ``_`` and ``-`` are not told apart)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in REGISTRY:
        close = difflib.get_close_matches(key, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; choose one of: " + ", ".join(REGISTRY))
    return REGISTRY[key]


def available() -> dict[str, str]:
    """Registry name -> one-line description, in registry order."""
    return {name: e.description for name, e in REGISTRY.items()}


# --------------------------------------------------------------------------- the classes


def make_class(e: Entry) -> type[ChainOptimizer]:
    """The public class of an entry: torch's constructor conventions (positional
    hyperparameters in torch's order, its flags), a real signature and a docstring."""
    sig = _signature(e.defaults, method=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            params, hp, options = _bind(sig, e.defaults, self, *args, **kwargs)
        except TypeError as err:  # a missing or unexpected argument: say whose
            raise TypeError(f"{type(self).__name__}.__init__() {err}") from None
        ChainOptimizer.__init__(self, params, {**hp, "optimizer": e.name}, **options)

    __init__.__signature__ = sig  # type: ignore[attr-defined]
    defaults = ", ".join(f"{k}={v!r}" for k, v in e.defaults.items())
    doc = f"{e.description}.\n\nDefaults ({e.reference or 'the study'}): {defaults}."
    cls = type(e.class_name, (ChainOptimizer,), {"__init__": __init__, "__doc__": doc})
    cls.__module__ = "optarena.optim"
    return cls


CLASSES: dict[str, type[ChainOptimizer]] = {}
_PRIVATE: dict[str, type[ChainOptimizer]] = {}


def _private_class(name: str, class_name: str) -> type[ChainOptimizer]:
    """The class of an entry offered through ``create`` only (made on first use)."""
    if name not in _PRIVATE:
        _PRIVATE[name] = make_class(replace(REGISTRY[name], class_name=class_name))
    return _PRIVATE[name]


for _entry in ENTRIES:
    register(_entry)
    if _entry.class_name:
        CLASSES[_entry.class_name] = make_class(_entry)


# --------------------------------------------------------------------------- hybrids

Route = str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]


def route_group(role: str, route: Route) -> dict[str, Any]:
    """A hybrid route (``"lion"``, ``("adamw", {"lr": 3e-3})`` or ``{"optimizer": ...}``) as
    the param-group options of the entry it names."""
    if isinstance(route, str):
        name, hp = route, {}
    elif isinstance(route, Mapping):
        hp = dict(route)
        if "optimizer" not in hp:
            raise ValueError(f"Hybrid: route {role!r} needs an 'optimizer' key")
        name = hp.pop("optimizer")
    else:
        name, hp = route
        hp = dict(hp)
    e = entry(name)
    if e.chain is None:
        raise ValueError(f"Hybrid: route {role!r} names {name!r}, which is not a single optimizer")
    per_route = ("no_decay_roles", "maximize")
    _refuse_unknown(f"Hybrid: route {role!r} ({name})", hp, [*e.defaults, *per_route])
    group = {**_hyper(e.defaults, hp), "optimizer": e.name, "route": role}
    if e.no_decay_roles:
        group["no_decay_roles"] = e.no_decay_roles
    return group | {k: hp[k] for k in per_route if k in hp}


class Hybrid(ChainOptimizer):
    """Different optimizers on different parameter roles, in one optimizer object.

    ``routes`` maps a role (``"output"``, ``"norm"``, ``"embedding"``, ``"q"``, ...; see
    :class:`~optarena.optim.roles.Role`) or ``"default"`` to a registry name, optionally with
    its own hyperparameters (its own peak ``lr`` included)::

        Hybrid(model, {"default": ("lion", {"lr": 3e-4}), "output": ("adamw", {"lr": 3e-3})})

    Each route becomes one param group (``group["route"]``); schedules scale every group's own
    lr. A route keeps its optimizer's weight-decay exemptions (``"adam-mini"``: norms and
    biases); ``no_decay_roles`` in a route's options changes them, ``Hybrid(...,
    no_decay_roles=...)`` sets them for routes whose optimizer has none. A tied embedding is
    the last layer too: an ``"output"`` route takes it.
    """

    def __init__(self, params: Params, routes: Mapping[str, Route], **options: Any):
        if "default" not in routes:
            raise ValueError("Hybrid: routes need a 'default' entry for unrouted parameters")
        self._route_of: dict[Role, str] = {}  # each routed role's key in ``routes``
        for key in routes:
            if key == "default":
                continue
            try:
                self._route_of.setdefault(Role(key), key)
            except ValueError:
                raise ValueError(
                    f"Hybrid: unknown role {key!r} in routes; expected 'default' or one of "
                    + ", ".join(r.value for r in Role)
                ) from None
        self._routes = {key: route_group(key, value) for key, value in routes.items()}
        for key, group in self._routes.items():  # a route no parameter takes is checked too
            e = entry(group["optimizer"])
            validate(f"Hybrid (route {key!r})", {**e.chain(group).hyper, **e.checks}, group)
        first = {k: v for k, v in self._routes["default"].items() if k != "no_decay_roles"}
        options.setdefault("no_decay_roles", ())  # for routes whose optimizer has none
        super().__init__(params, first, **options)

    def _resolve(self, params: Any) -> list:
        named = super()._resolve(params)
        if not is_named(named):
            raise TypeError("Hybrid needs a model or named_parameters to find parameter roles")
        self._roles.learn_names(named)
        by_route: dict[str, list] = {key: [] for key in self._routes}
        for name, p in named:
            info = self._roles.of(p, name)
            key = "default"
            if info is not None:
                tied_output = info.tied and Role.OUTPUT in self._route_of
                key = self._route_of.get(Role.OUTPUT if tied_output else info.role, "default")
            by_route[key].append((name, p))
        return [
            {**self._routes[key], "params": by_route[key]} for key in self._routes if by_route[key]
        ]


class MatrixHybrid(Hybrid):
    """A hybrid whose ``default`` route takes matrices only (Muon): a parameter of a hidden
    role that is not a matrix (nor a stack of MoE expert matrices) goes to the ``other``
    route."""

    def _resolve(self, params: Any) -> list:
        groups = super()._resolve(params)
        body = next((g for g in groups if g["route"] == "default"), None)
        odd = [(n, p) for n, p in body["params"] if not self._is_matrix(n, p)] if body else []
        if not odd:
            return groups
        body["params"] = [(n, p) for n, p in body["params"] if self._is_matrix(n, p)]
        rest = next((g for g in groups if g["route"] == "other"), None)
        if rest is None:
            groups.append(rest := {**self._routes["other"], "params": []})
        rest["params"] += odd
        return [g for g in groups if g["params"]]

    def _is_matrix(self, name: str, p: torch.Tensor) -> bool:
        info = self._roles.of(p, name)
        return p.dim() == 2 or (p.dim() == 3 and info is not None and bool(info.experts))


register(
    Entry(
        "hybrid",
        None,
        {},
        "Any mix: routes={role: optimizer name or (name, hyperparameters)}",
        "hybrid",
        build=_constructor({"routes": None}, _hybrid_custom),
    )
)
for _adaptive in ("adalayer", "adafactor"):
    for _suffix, _roles, _where in (
        ("last-ln", ("output", "norm"), "the last layer and LayerNorms"),
        ("last", ("output",), "the last layer"),
        ("ln", ("norm",), "the LayerNorms"),
    ):
        _what = f"SGD (EMA momentum) everywhere, {_adaptive.capitalize()} on {_where}"
        _build = _study_hybrid(_adaptive, _roles)
        register(Entry(f"hybrid-{_adaptive}-{_suffix}", None, {}, _what, "hybrid", build=_build))


# --------------------------------------------------------------------------- create


def create(name: str, model_or_params: Any, **hyperparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for a model (structure-aware roles), ``named_parameters()``
    or param groups, with the hyperparameters its class takes (torch's names and flags)."""
    e = entry(name)
    build = e.build or CLASSES[e.class_name or ""]
    known = [k for k in inspect.signature(build).parameters if k != "params"]
    _refuse_unknown(e.name, hyperparams, known)
    return build(model_or_params, **hyperparams)


def _refuse_unknown(owner: str, given: Iterable[str], valid: list[str]) -> None:
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise ValueError(
            f"{owner}: unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(valid)}"
        )


# --------------------------------------------------------------------------- earlier versions

_LEGACY_ADAPTIVE = {
    "element": "adamw",
    "layer": "adalayer",
    "adam-mini": "adam-mini",
    "factored": "adafactor",
}
LEGACY_STATE_KEYS = {"adafactor-classic": ("lr",)}


def legacy_name(group: Mapping[str, Any]) -> str | None:
    """The entry a param group saved by an earlier optarena (which named a "rule") ran."""
    rule = group.get("rule")
    if rule == "adaptive":
        if group.get("precondition_steps"):
            return "adam-frozen"
        return _LEGACY_ADAPTIVE.get(group.get("granularity", "element"))
    return rule if rule in REGISTRY else None


__all__ = ["CLASSES", "ENTRIES", "REGISTRY", "Entry", "Hybrid", "available", "create", "entry"]
