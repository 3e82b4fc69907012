"""A plain training run: every registered optimizer lowers the loss of a tiny Llama-named LM.

The task (next token of ``x_{t+1} = (5 x_t + 3) mod V``) is deterministic, so a working
optimizer drives the cross-entropy far below its start (``ln V``); a broken one does not.
Sophia's loop samples labels from the model every ``hessian_interval`` steps and calls
``update_hessian`` (Gauss-Newton-Bartlett), as its reference training script does.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from optarena.optim import available, create
from optim_cases import TinyLM, lm_batch, lm_loss, sampled_label_loss

VOCAB, BATCH, SEQ, STEPS = 16, 16, 8, 100

HYPER: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-2},
    "adam-mini": {"lr": 1e-2},
    "adalayer": {"lr": 1e-2},
    "adafactor": {"lr": 1e-2},
    "adafactor-classic": {},  # relative step
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "sgd-ema": {"lr": 0.5},
    "lion": {"lr": 1e-3},
    "signum": {"lr": 1e-3},
    "sophia": {"lr": 1e-3, "rho": 0.05, "bs": BATCH * SEQ, "hessian_interval": 5},
    "adam-frozen": {"lr": 1e-2, "precondition_steps": 20},
    "hybrid": {"routes": {"default": ("lion", {"lr": 1e-3}), "output": ("adamw", {"lr": 1e-2})}},
    "muon": {"lr": 2e-2, "adamw_lr": 1e-2},
    "normuon": {"lr": 2e-2, "adamw_lr": 1e-2},
    "nadamw": {"lr": 1e-2},
    "ademamix": {"lr": 1e-2},
    "mars": {"lr": 1e-2},
    "adopt": {"lr": 1e-2},
}
HYBRID_DEFAULTS = {"lr": 0.5, "adaptive_lr": 1e-2}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", list(available()))
def test_training_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = TinyLM(vocab=VOCAB)
    hp = HYPER.get(name, HYBRID_DEFAULTS if name.startswith("hybrid-") else {})
    opt = create(name, model, **hp)  # structure-aware partition of the module
    gen = torch.Generator().manual_seed(1)
    interval = getattr(opt, "hessian_interval", None)
    losses = []
    for t in range(1, STEPS + 1):
        idx, targets = lm_batch(VOCAB, BATCH, SEQ, gen)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if interval and t % interval == 0:
            opt.zero_grad(set_to_none=True)
            sampled_label_loss(model, idx, gen).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.update_hessian()
    first, last = losses[0], sum(losses[-10:]) / 10
    assert all(math.isfinite(x) for x in losses), name
    assert first > 0.8 * math.log(VOCAB)
    assert last < 0.25 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


def test_model_partition_gives_the_roles_written_by_hand() -> None:
    """``create(name, model)`` reads roles from the module structure; on this Llama-named model
    they must be the ones the parity tests spell out by name (heads under GQA included)."""
    model = TinyLM(vocab=VOCAB)
    opt = create("adam-mini", model)
    by_hand = model.partition()
    for name, p in model.named_parameters():
        found = opt.param_info(p)
        assert (found.role, found.heads) == (by_hand[name].role, by_hand[name].heads), name
