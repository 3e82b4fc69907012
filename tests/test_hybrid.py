"""``Hybrid``: routing by role, one lr per route, and equivalence with separate optimizers."""

from __future__ import annotations

import pytest
import torch

from optarena.optim import AdamMini, AdamW, Hybrid, Lion, Role, create
from optim_cases import clone_params, llama_partition, llama_shapes, make_params, set_grads

pytestmark = pytest.mark.usefixtures("single_thread")

N_HEADS, N_KV = 4, 2
SHAPES = llama_shapes(dim=16, n_heads=N_HEADS, n_kv_heads=N_KV, ffn=24, vocab=12, layers=2)
INFOS = llama_partition(SHAPES, N_HEADS, N_KV)


def role_of(name: str) -> Role:
    return INFOS[name].role


def groups_by_param(opt: torch.optim.Optimizer, params: dict) -> dict[str, dict]:
    ids = {id(p): n for n, p in params.items()}
    return {ids[id(p)]: g for g in opt.param_groups for p in g["params"]}


def test_each_role_gets_its_route() -> None:
    params = make_params(SHAPES)
    routes = {
        "default": ("sgd-ema", {"lr": 0.5, "momentum": 0.8}),
        "output": ("adalayer", {"lr": 3e-3}),
        "norm": ("lion", {"lr": 1e-4}),
        "q": ("adam-mini", {"lr": 2e-3}),
    }
    opt = Hybrid(list(params.items()), routes, partition=INFOS)
    expected = {
        Role.OUTPUT: ("output", "adalayer", 3e-3),
        Role.NORM: ("norm", "lion", 1e-4),
        Role.Q: ("q", "adam-mini", 2e-3),
    }
    by_param = groups_by_param(opt, params)
    assert set(by_param) == set(SHAPES)
    for name, group in by_param.items():
        route, optimizer, lr = expected.get(role_of(name), ("default", "sgd-ema", 0.5))
        assert (group["route"], group["optimizer"], group["lr"]) == (route, optimizer, lr), name
    assert by_param["model.embed_tokens.weight"]["momentum"] == 0.8
    assert len(opt.param_groups) == 4


@pytest.mark.parametrize(
    ("name", "adaptive_roles", "adaptive"),
    [
        ("hybrid-adalayer-last-ln", {Role.OUTPUT, Role.NORM}, "adalayer"),
        ("hybrid-adalayer-last", {Role.OUTPUT}, "adalayer"),
        ("hybrid-adalayer-ln", {Role.NORM}, "adalayer"),
        ("hybrid-adafactor-last-ln", {Role.OUTPUT, Role.NORM}, "adafactor"),
        ("hybrid-adafactor-last", {Role.OUTPUT}, "adafactor"),
        ("hybrid-adafactor-ln", {Role.NORM}, "adafactor"),
    ],
)
def test_registry_hybrids_route_the_study_way(name, adaptive_roles, adaptive) -> None:
    # Adaptive (own peak lr, study betas/eps) on the last layer and/or norms; EMA-momentum SGD
    # on everything else, embeddings included.
    params = make_params(SHAPES)
    opt = create(name, list(params.items()), partition=INFOS, lr=0.7, adaptive_lr=2e-3)
    for pname, group in groups_by_param(opt, params).items():
        if role_of(pname) in adaptive_roles:
            assert group["optimizer"] == adaptive, pname
            assert group["lr"] == 2e-3 and group["betas"] == (0.9, 0.95)
            assert group["eps"] == 1e-15
        else:
            assert group["optimizer"] == "sgd-ema" and group["lr"] == 0.7, pname
            assert group["momentum"] == 0.9


def test_lion_body_adamw_head_equals_two_optimizers() -> None:
    """One Hybrid == Lion on the body and AdamW on the output layer, run side by side."""
    p_hybrid = make_params(SHAPES)
    p_split = clone_params(p_hybrid)
    lion_hp = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    adamw_hp = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
    hybrid = Hybrid(
        list(p_hybrid.items()),
        {"default": ("lion", lion_hp), "output": ("adamw", adamw_hp)},
        partition=INFOS,
    )
    head = ["lm_head.weight"]
    body = [n for n in SHAPES if n not in head]
    lion = Lion([(n, p_split[n]) for n in body], **lion_hp)
    adamw = AdamW([(n, p_split[n]) for n in head], **adamw_hp)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)) for o in (hybrid,)]
    schedules += [
        torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)) for o in (lion, adamw)
    ]
    for t in range(1, 21):
        set_grads(p_hybrid, t, skip=())
        set_grads(p_split, t, skip=())
        hybrid.step()
        lion.step()
        adamw.step()
        for s in schedules:
            s.step()
    for name in SHAPES:
        assert torch.equal(p_hybrid[name], p_split[name]), name
        single = lion if name in body else adamw
        mine, theirs = hybrid.state[p_hybrid[name]], single.state[p_split[name]]
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"{key} of {name}"
    # each group kept its own peak lr under the schedule
    lrs = {g["route"]: g["lr"] for g in hybrid.param_groups}
    assert lrs == {"default": pytest.approx(3e-4 / 21), "output": pytest.approx(3e-3 / 21)}


def test_groups_step_smallest_first() -> None:
    """A step takes the groups with the fewest elements first (their host work then finds its
    objects still cached); a group added later takes its place by size; results are those of
    the groups' own order (the test above compares a hybrid with separate optimizers)."""
    big, mid, small = (torch.nn.Parameter(torch.zeros(n)) for n in (300, 20, 3))
    opt = AdamW([{"params": [big]}, {"params": [mid]}], lr=0.1)
    stepped: list[int] = []
    step_group = opt._step_group

    def spy(group, hp, params):
        stepped.append(group["params"][0].numel())
        return step_group(group, hp, params)

    opt._step_group = spy  # type: ignore[method-assign]
    for p in (big, mid, small):
        p.grad = torch.ones_like(p)
    opt.step()
    assert stepped == [20, 300]
    opt.add_param_group({"params": [small]})
    stepped.clear()
    opt.step()
    assert stepped == [3, 20, 300]
    assert all((p < 0).all() for p in (big, mid, small))


def test_adam_mini_route_keeps_its_decay_exemptions() -> None:
    """An "adam-mini" route exempts norms (and biases) from weight decay as ``AdamMini`` does
    on its own, while an "adamw" route decays everything as ``AdamW`` does: one Hybrid equals
    the two optimizers run side by side, bitwise."""
    p_hybrid = make_params(SHAPES)
    p_split = clone_params(p_hybrid)
    mini_hp = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.5}
    adamw_hp = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.5}
    hybrid = Hybrid(
        list(p_hybrid.items()),
        {"default": ("adam-mini", mini_hp), "output": ("adamw", adamw_hp)},
        partition=INFOS,
    )
    routes = {g["route"]: g["no_decay_roles"] for g in hybrid.param_groups}
    assert routes == {"default": ("norm", "bias"), "output": ()}
    head = ["lm_head.weight"]
    body = [n for n in SHAPES if n not in head]
    mini = AdamMini([(n, p_split[n]) for n in body], partition=INFOS, **mini_hp)
    adamw = AdamW([(n, p_split[n]) for n in head], partition=INFOS, **adamw_hp)
    assert mini.param_groups[0]["no_decay_roles"] == ("norm", "bias")  # in the order given
    for t in range(1, 11):
        set_grads(p_hybrid, t, skip=())
        set_grads(p_split, t, skip=())
        for opt in (hybrid, mini, adamw):
            opt.step()
    for name in SHAPES:
        assert torch.equal(p_hybrid[name], p_split[name]), name
    # a first step with zero gradients moves a parameter by its decay alone
    fresh = make_params(SHAPES)
    kept = {n: p.detach().clone() for n, p in fresh.items()}
    hybrid = Hybrid(
        list(fresh.items()),
        {"default": ("adam-mini", mini_hp), "output": ("adamw", adamw_hp)},
        partition=INFOS,
    )
    for p in fresh.values():
        p.grad = torch.zeros_like(p)
    hybrid.step()
    for name, p in fresh.items():
        hp = adamw_hp if name in head else mini_hp
        keep = 1.0 if role_of(name) in (Role.NORM, Role.BIAS) else 1 - hp["lr"] * 0.5
        torch.testing.assert_close(p.detach(), kept[name] * keep, rtol=1e-15, atol=0)


def test_decay_exemptions_per_route_and_optimizer_wide() -> None:
    """``no_decay_roles`` in a route's options wins; the Hybrid's own applies to routes whose
    optimizer has none; the default route's exemptions do not leak into the others."""
    params = make_params(SHAPES)
    opt = Hybrid(
        list(params.items()),
        {
            "default": "adam-mini",
            "output": ("adamw", {"weight_decay": 0.1}),
            "norm": ("adam-mini", {"no_decay_roles": ()}),
            "q": "lion",
        },
        partition=INFOS,
        no_decay_roles=("output",),
    )
    routes = {g["route"]: g["no_decay_roles"] for g in opt.param_groups}
    assert routes == {
        "default": ("norm", "bias"),
        "output": ("output",),
        "norm": (),
        "q": ("output",),
    }
    with pytest.raises(ValueError, match=r"invalid no_decay_roles=.*expected role names from"):
        Hybrid(
            list(params.items()),
            {"default": ("adamw", {"no_decay_roles": ("nrm",)})},
            partition=INFOS,
        )


def test_hybrid_without_routes_says_what_it_needs() -> None:
    params = make_params(SHAPES)
    with pytest.raises(ValueError, match=r"hybrid needs routes.*hybrid-adalayer-last"):
        create("hybrid", list(params.items()), partition=INFOS)
