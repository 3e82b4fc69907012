"""Every registered optimizer behaves as a ``torch.optim.Optimizer`` must.

For each entry of the registry: a deepcopy and a pickled copy step exactly as the original;
``torch.compile`` of a function that calls ``step()`` computes what eager does; LambdaLR at 0
leaves the parameters where they are; a tensor ``lr`` works; complex parameters follow torch's
``view_as_real`` semantics; ``maximize=True`` is minimising the negated objective; ``create()``
takes what the classes take; another optimizer's state dict is refused; state dicts saved by
the previous release load and continue its trajectory.
"""

from __future__ import annotations

import copy
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from optarena.optim import REGISTRY, AdamW, ParamInfo, Role, available, create
from optarena.optim.registry import CLASSES
from optim_cases import llama_partition, llama_shapes, make_params, set_grads

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = list(available())
SHAPES = llama_shapes(dim=8, n_heads=2, n_kv_heads=1, ffn=8, vocab=6, layers=1)
INFOS = llama_partition(SHAPES, 2, 1)
STEPS = 6

# Hyperparameters that make every transform of an entry do its work within STEPS.
HYPER: dict[str, dict[str, Any]] = {
    "hybrid": {"routes": {"default": ("lion", {"lr": 1e-3}), "output": ("adamw", {"lr": 1e-2})}},
    "adam-frozen": {"precondition_steps": 2, "unfrozen_roles": ("norm",)},
    "sophia": {"hessian_interval": 2, "lr": 1e-2},
    "adafactor-classic": {"beta1": 0.9, "weight_decay": 0.1},
    "sgd": {"momentum": 0.9, "weight_decay": 0.1},
    "adamw": {"weight_decay": 0.1},
    "adam-mini": {"weight_decay": 0.1},
    "lion": {"weight_decay": 0.1},
}
# classic Adafactor with an external LR (its relative step ignores schedulers)
WITH_LR = {"adafactor-classic": {"lr": 1e-2, "relative_step": False, "beta1": 0.9}}


def build(name: str, params: dict[str, nn.Parameter], **extra: Any) -> torch.optim.Optimizer:
    return create(name, list(params.items()), partition=INFOS, **{**HYPER.get(name, {}), **extra})


def train(opt, params, first: int, last: int, grads=set_grads) -> None:
    for t in range(first, last + 1):
        grads(params, t, skip=())
        opt.step()
        interval = getattr(opt, "hessian_interval", None)
        if interval and t % interval == 0:
            grads(params, t, seed=2, skip=())
            opt.update_hessian()


def assert_same_params(a: dict, b: dict, exact: bool = True) -> None:
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), n
        else:
            torch.testing.assert_close(
                a[n], b[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}"
            )


# --------------------------------------------------------------------------- copies


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_a_copy_steps_as_the_original(name: str, how: str) -> None:
    params = make_params(SHAPES)
    opt = build(name, params)
    train(opt, params, 1, 3)
    if how == "deepcopy":
        twin_opt, twin_params = copy.deepcopy((opt, params))
    else:
        twin_opt, twin_params = pickle.loads(pickle.dumps((opt, params)))
    assert type(twin_opt) is type(opt)
    train(opt, params, 4, STEPS)
    train(twin_opt, twin_params, 4, STEPS)
    assert_same_params(params, twin_params)
    assert [g["optimizer"] for g in twin_opt.param_groups] == [
        g["optimizer"] for g in opt.param_groups
    ]


# --------------------------------------------------------------------------- a user's torch.compile


class Little(nn.Module):
    """Embedding, MLP, norm and output layer: every role an optimizer treats apart."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(6, 8)
        self.up_proj = nn.Linear(8, 16, bias=False)
        self.norm = nn.LayerNorm(16, bias=False)
        self.lm_head = nn.Linear(16, 6, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(
            self.norm(torch.nn.functional.gelu(self.up_proj(self.embed_tokens(idx))))
        )


LITTLE_ROLES = {
    "embed_tokens.weight": Role.EMBEDDING,
    "up_proj.weight": Role.MLP,
    "norm.weight": Role.NORM,
    "lm_head.weight": Role.OUTPUT,
}


def _little(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Little().double()
    infos = {n: ParamInfo(n, tuple(p.shape), LITTLE_ROLES[n]) for n, p in model.named_parameters()}
    return model, create(
        name, list(model.named_parameters()), partition=infos, **HYPER.get(name, {})
    )


# SOAP divides by ε (1e-8) in the directions where the gradient is zero only up to rounding
# (the rows of the output layer's softmax gradient sum to zero): there the compiled backward's
# rounding and the eager one's give steps about lr·rounding/ε apart, 2e-9 here. Its bases of
# rank-deficient statistics are settled (``transforms.settle``), so nothing else separates them.
ATOL = {"soap": 1e-8}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_of_a_training_step_equals_eager(name: str) -> None:
    """A user's ``torch.compile`` (inductor) of a whole training step, ``step()`` inside: the
    model's forward and backward are compiled, the update is the eager one."""
    models = [_little(name) for _ in range(2)]

    def loss_of(model, x, y) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def train_step(model, opt, x, y) -> None:
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    compiled = torch.compile(train_step, backend="inductor")
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 5):
        x, y = (
            torch.randint(0, 6, (2, 5), generator=gen),
            torch.randint(0, 6, (2, 5), generator=gen),
        )
        for (model, opt), run in zip(models, (train_step, compiled), strict=True):
            run(model, opt, x, y)
            if opt.hessian_interval and t % opt.hessian_interval == 0:  # Sophia's estimate
                loss_of(model, x, (y + 1) % 6).backward()
                opt.update_hessian()
                opt.zero_grad(set_to_none=True)
    (eager, _), (traced, _) = models
    for (n, a), b in zip(eager.named_parameters(), traced.parameters(), strict=True):
        atol = ATOL.get(name, 1e-10)
        torch.testing.assert_close(b, a, rtol=1e-8, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


# --------------------------------------------------------------------------- schedules and lr


@pytest.mark.parametrize("name", NAMES)
def test_lambda_lr_at_zero_freezes_the_parameters(name: str) -> None:
    params = make_params(SHAPES)
    opt = build(name, params, **WITH_LR.get(name, {}))
    start = {n: p.detach().clone() for n, p in params.items()}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    for t in range(1, STEPS + 1):
        set_grads(params, t, skip=())
        opt.step()
        sched.step()
    assert_same_params(params, start)
    assert opt.state, "the optimizer kept no state: it did not run"


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].chain is not None])
def test_a_tensor_lr_steps_as_the_same_float(name: str) -> None:
    lr = WITH_LR.get(name, {}).get("lr", 3e-3)
    extra = {**WITH_LR.get(name, {}), "lr": lr}
    a, b = make_params(SHAPES), make_params(SHAPES)
    opt_a = build(name, a, **extra)
    opt_b = build(name, b, **{**extra, "lr": torch.tensor(lr, dtype=torch.float64)})
    train(opt_a, a, 1, STEPS)
    train(opt_b, b, 1, STEPS)
    assert_same_params(a, b)


# --------------------------------------------------------------------------- complex, maximize


def _as_real(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(torch.view_as_real(p.detach()).clone()) for n, p in params.items()}


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_step_as_their_real_view(name: str) -> None:
    """torch's semantics: a complex parameter is updated as ``view_as_real`` of itself; an
    optimizer without a complex meaning (``Entry.complex_ok``) refuses it in one line."""
    shapes = {n: s for n, s in SHAPES.items() if len(s) == 2}
    gen = torch.Generator().manual_seed(0)
    cplx = {
        n: nn.Parameter(torch.randn(s, dtype=torch.complex128, generator=gen))
        for n, s in shapes.items()
    }
    as_real = _as_real(cplx)
    infos_c = {n: INFOS[n] for n in shapes}
    infos_r = {n: type(i)(**{**i.__dict__, "shape": (*i.shape, 2)}) for n, i in infos_c.items()}
    hp = HYPER.get(name, {})
    opt_c = create(name, list(cplx.items()), partition=infos_c, **hp)
    opt_r = create(name, list(as_real.items()), partition=infos_r, **hp)
    if not all(REGISTRY[g["optimizer"]].complex_ok for g in opt_c.param_groups):
        for p in cplx.values():
            p.grad = torch.zeros_like(p)
        with pytest.raises(ValueError, match="has no meaning for complex parameters"):
            opt_c.step()
        return

    def grads(params, t, seed=1, skip=()):
        for i, (n, p) in enumerate(params.items()):
            g = torch.randn(
                (*shapes[n], 2),
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(seed * 97 + t * 13 + i),
            )
            p.grad = torch.view_as_complex(g) if p.is_complex() else g

    train(opt_c, cplx, 1, STEPS, grads)
    train(opt_r, as_real, 1, STEPS, grads)
    for n in shapes:
        torch.testing.assert_close(
            torch.view_as_real(cplx[n].detach()), as_real[n].detach(), rtol=1e-12, atol=1e-14
        )


def test_complex_adamw_equals_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    ours = nn.Parameter(torch.randn(5, 3, dtype=torch.complex128, generator=gen))
    ref = nn.Parameter(ours.detach().clone())
    opt, ref_opt = AdamW([ours], lr=1e-2), torch.optim.AdamW([ref], lr=1e-2)
    for t in range(STEPS):
        g = torch.randn(5, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(t))
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].chain is not None])
def test_maximize_is_minimising_the_negated_gradient(name: str) -> None:
    a, b = make_params(SHAPES), make_params(SHAPES)
    opt_a, opt_b = build(name, a, maximize=True), build(name, b)

    def negated(params, t, seed=1, skip=()):
        set_grads(params, t, seed=seed, skip=skip)
        for p in params.values():
            p.grad.neg_()

    train(opt_a, a, 1, STEPS)
    train(opt_b, b, 1, STEPS, negated)
    assert_same_params(a, b)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize(
    ("name", "torch_cls"), [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_maximize_and_amsgrad_equal_torch(name: str, torch_cls: type, fused: bool | None) -> None:
    flags = {"maximize": True} | ({"amsgrad": True} if name == "adamw" else {"momentum": 0.9})
    a = make_params(SHAPES)
    b = {n: nn.Parameter(p.detach().clone()) for n, p in a.items()}
    ours = create(name, list(a.items()), partition=INFOS, lr=1e-2, fused=fused, **flags)
    ref = torch_cls(list(b.values()), lr=1e-2, foreach=False, **flags)
    train(ours, a, 1, STEPS)
    train(ref, b, 1, STEPS)
    assert_same_params(a, b, exact=False)


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].class_name])
def test_create_takes_what_the_class_takes(name: str) -> None:
    cls = CLASSES[REGISTRY[name].class_name]
    params = inspect.signature(cls.__init__).parameters
    for key, p in params.items():
        if key in ("self", "params"):
            continue
        given = {"partition": INFOS, key: INFOS if key == "partition" else p.default}
        opt = create(name, list(make_params(SHAPES).items()), **given)
        if REGISTRY[name].build is not None:  # named parameters routed (muon: AdamW elsewhere)
            own = [g for g in opt.param_groups if g["optimizer"] == name]
            assert own and (key not in REGISTRY[name].defaults or own[0][key] == given[key])
        else:
            assert isinstance(opt, cls)


def test_torch_positional_arguments_work() -> None:
    a = make_params({"w": (3, 2)})
    opt = AdamW(list(a.values()), 1e-2, (0.8, 0.9), 1e-6, 0.0, False)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"]) == (
        1e-2,
        (0.8, 0.9),
        1e-6,
        0.0,
        False,
    )


def test_a_model_that_is_not_parameters_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="params must be a model, named_parameters"):
        create("adamw", 5)


# --------------------------------------------------------------------------- state dicts


def test_another_optimizers_state_dict_is_refused() -> None:
    params = make_params(SHAPES)
    lion = build("lion", params)
    train(lion, params, 1, 2)
    adamw = build("adamw", params)
    before = copy.deepcopy(adamw.state_dict())
    with pytest.raises(
        ValueError, match="param group 0 was saved by 'lion', this group runs 'adamw'"
    ):
        adamw.load_state_dict(lion.state_dict())
    assert adamw.state_dict() == before
    assert all(g["optimizer"] == "adamw" for g in adamw.param_groups)


LEGACY = Path(__file__).parent / "fixtures" / "legacy_states.pt"
LEGACY_NAMES = list(torch.load(LEGACY, weights_only=True))  # the previous release's optimizers


@pytest.mark.parametrize("name", LEGACY_NAMES)
def test_state_dicts_of_the_previous_release_continue_its_trajectory(name: str) -> None:
    """``fixtures/legacy_states.pt`` holds, per optimizer, the state dict and parameters that
    optarena 95f6bdf saved after 4 steps and its parameters after 8 (see
    ``fixtures/make_legacy_states.py``): loaded here, 4 more steps land on the same numbers."""
    from fixtures.make_legacy_states import HYPER as OLD_HYPER
    from fixtures.make_legacy_states import INFOS as OLD_INFOS
    from fixtures.make_legacy_states import M, N
    from fixtures.make_legacy_states import train as old_train

    saved = torch.load(LEGACY, weights_only=True)[name]
    params = {n: nn.Parameter(p.clone()) for n, p in saved["params"].items()}
    opt = create(name, list(params.items()), partition=OLD_INFOS, **OLD_HYPER.get(name, {}))
    opt.load_state_dict(saved["state"])
    expected, unseen_entries = dict(saved["final"]), 0
    if name == "adam-frozen":
        # the one change of trajectory: an entry whose frozen v is 0 (no gradient while v was
        # measured) is no longer divided by eps alone; it stays put (decay is 0 here)
        for group in opt.param_groups:
            if not group["freeze"]:
                continue
            for n, p in zip(group["param_names"], group["params"], strict=True):
                unseen = opt.state[p]["exp_avg_sq"] == 0
                unseen_entries += int(unseen.sum())
                expected[n] = torch.where(unseen, saved["params"][n], expected[n])
        assert unseen_entries > 0  # the case is exercised
    old_train(opt, params, N + 1, N + M)
    assert_same_params(params, expected, exact=False)
