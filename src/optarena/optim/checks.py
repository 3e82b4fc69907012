"""Hyperparameter checks: a valid range and the sentence that explains it.

Transforms declare the hyperparameters they read with one of these (``Transform.hyper``), so an
optimizer's validation is the union of its transforms' and a bad value is refused with its
name, the value and what is expected, whichever optimizer reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Check:
    """A hyperparameter's valid range, and the sentence that explains it."""

    test: Callable[[Any], bool]
    expected: str


def number(x: Any) -> float | None:
    """``x`` as a float when it is a finite real number (a one-element tensor counts, as
    torch's tensor ``lr`` does), else ``None``."""
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.is_complex() or x.dtype == torch.bool:
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


NONNEG = Check(lambda x: (v := number(x)) is not None and v >= 0, "a finite number >= 0")
POSITIVE = Check(lambda x: (v := number(x)) is not None and v > 0, "a finite number > 0")
UNIT = Check(lambda x: (v := number(x)) is not None and 0 <= v < 1, "a number in [0, 1)")
PROBABILITY = Check(lambda x: (v := number(x)) is not None and 0 < v <= 1, "in (0, 1]")
NEGATIVE = Check(lambda x: (v := number(x)) is not None and v < 0, "a number < 0")
BETAS = Check(
    lambda x: isinstance(x, (tuple, list)) and len(x) == 2 and all(UNIT.test(b) for b in x),
    "a pair (beta1, beta2) with each in [0, 1)",
)
BETAS3 = Check(
    lambda x: isinstance(x, (tuple, list)) and len(x) == 3 and all(UNIT.test(b) for b in x),
    "a triple (beta1, beta2, beta3) with each in [0, 1)",
)
BOOL = Check(lambda x: isinstance(x, bool), "True or False")
POS_INT = Check(lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0, "an int > 0")
NONNEG_INT = Check(
    lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0, "an int >= 0"
)


def optional(check: Check) -> Check:
    return Check(lambda x: x is None or check.test(x), f"None or {check.expected}")


def pair(check: Check, what: str) -> Check:
    return Check(
        lambda x: isinstance(x, (tuple, list)) and len(x) == 2 and all(check.test(e) for e in x),
        f"a pair {what} of {check.expected.removeprefix('a ').removeprefix('an ')}s",
    )


def one_of(*values: Any) -> Check:
    return Check(lambda x: x in values, "one of " + ", ".join(repr(v) for v in values))


def validate(owner: str, checks: dict[str, Check], group: dict[str, Any]) -> None:
    """Raise a ValueError naming the first hyperparameter of ``group`` outside its range."""
    for key, check in checks.items():
        if key in group and not check.test(group[key]):
            raise ValueError(f"{owner}: invalid {key}={group[key]!r}; expected {check.expected}")
