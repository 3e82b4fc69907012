"""``optarena.optim``: every optimizer of the two studies as a drop-in ``torch.optim.Optimizer``.

>>> from optarena.optim import create
>>> opt = create("adam-mini", model, lr=1e-3)          # doctest: +SKIP

Each optimizer is one :class:`RuleOptimizer` whose param groups name an update rule; the rules
are compositions of the pieces in :mod:`optarena.optim.transforms`, and block optimizers read
the parameter roles found by :mod:`optarena.optim.partition`.
"""

from optarena.optim.base import RuleOptimizer, state_bytes
from optarena.optim.optimizers import (
    EMASGD,
    SGD,
    Adafactor,
    AdafactorClassic,
    Adalayer,
    AdamMini,
    AdamW,
    Hybrid,
    Lion,
    Signum,
    SophiaG,
)
from optarena.optim.registry import REGISTRY, available, create
from optarena.optim.roles import FusedPart, ParamInfo, Role

__all__ = [
    "EMASGD",
    "REGISTRY",
    "SGD",
    "Adafactor",
    "AdafactorClassic",
    "Adalayer",
    "AdamMini",
    "AdamW",
    "FusedPart",
    "Hybrid",
    "Lion",
    "ParamInfo",
    "Role",
    "RuleOptimizer",
    "Signum",
    "SophiaG",
    "available",
    "create",
    "state_bytes",
]
