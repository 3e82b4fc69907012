"""``optarena.optim``: every optimizer of the two studies as a drop-in ``torch.optim.Optimizer``.

>>> from optarena.optim import create
>>> opt = create("adam-mini", model, lr=1e-3)          # doctest: +SKIP

Each optimizer is a chain of transforms (:mod:`optarena.optim.transforms`) named by one row of
the registry (:mod:`optarena.optim.registry`), run by one ``torch.optim.Optimizer``
(:class:`ChainOptimizer`) on the roles the partition (:mod:`optarena.optim.partition`) finds.
"""

from optarena.optim.optimizer import ChainOptimizer, state_bytes
from optarena.optim.registry import CLASSES, REGISTRY, Hybrid, available, create, entry
from optarena.optim.roles import FusedPart, ParamInfo, Role

AdamW = CLASSES["AdamW"]
AdamMini = CLASSES["AdamMini"]
Adalayer = CLASSES["Adalayer"]
Adafactor = CLASSES["Adafactor"]
AdafactorClassic = CLASSES["AdafactorClassic"]
SGD = CLASSES["SGD"]
EMASGD = CLASSES["EMASGD"]
Lion = CLASSES["Lion"]
Muon = CLASSES["Muon"]
NorMuon = CLASSES["NorMuon"]
MARS = CLASSES["MARS"]
AdEMAMix = CLASSES["AdEMAMix"]
ADOPT = CLASSES["ADOPT"]
NAdamW = CLASSES["NAdamW"]
SOAP = CLASSES["SOAP"]
Kron = CLASSES["Kron"]
AdamWScheduleFree = CLASSES["AdamWScheduleFree"]
Signum = CLASSES["Signum"]
SophiaG = CLASSES["SophiaG"]

__all__ = [
    "ADOPT",
    "EMASGD",
    "MARS",
    "REGISTRY",
    "SGD",
    "SOAP",
    "AdEMAMix",
    "Adafactor",
    "AdafactorClassic",
    "Adalayer",
    "AdamMini",
    "AdamW",
    "AdamWScheduleFree",
    "ChainOptimizer",
    "FusedPart",
    "Hybrid",
    "Kron",
    "Lion",
    "Muon",
    "NAdamW",
    "NorMuon",
    "ParamInfo",
    "Role",
    "Signum",
    "SophiaG",
    "available",
    "create",
    "entry",
    "state_bytes",
]
