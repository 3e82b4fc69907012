"""The built-in fine-tuning task: short instructions with exactly one right answer, offline.

Six families, generated deterministically from a fixed seed (the same examples on every machine
and Python 3 version): add or subtract two numbers, say which of two numbers is larger, reverse a
word, sort digits, count the letters of a word. Every prompt appears once; a prompt's SHA-256
puts it in the validation split (1 in :data:`VAL_ONE_IN`) or the training split, so the two
never share a prompt. The answers are checked by exact match (:func:`is_correct`), so the task
measures accuracy as well as the loss on the responses.

:func:`preference_pairs` gives, for each prompt, the right answer (chosen) and a plausible wrong
one (rejected): a number off by a little, the word not reversed or with two letters swapped,
digits out of order: what a reward model learns to tell apart.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from optarena.posttrain.data import Example

TASK_VERSION = 1  # bump when the generator changes: it names the task in summaries
EXAMPLES = 24_000  # prompts generated (before the split)
VAL_ONE_IN = 16
NAME = "builtin"


@dataclass(frozen=True)
class PreferencePair:
    """A prompt, the right response and a wrong one."""

    messages: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a} + {b}?", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1000), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"Reverse the word {word}.", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 6))]
    return f"Sort the digits {' '.join(digits)}.", " ".join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"How many letters are in {word}?", str(len(word))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "subtract": _subtract,
    "larger": _larger,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}


def split_of(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") % VAL_ONE_IN == 0 else "train"


def _generate() -> list[tuple[str, str, str]]:
    """(family, prompt, answer) for every distinct prompt, in generation order."""
    rng = random.Random(f"optarena-sft-v{TASK_VERSION}")
    names = list(FAMILIES)
    seen: set[str] = set()
    out = []
    for i in range(EXAMPLES):
        family = names[i % len(names)]
        prompt, answer = FAMILIES[family](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((family, prompt, answer))
    return out


_CACHE: dict[str, list[Example]] = {}


def examples(split: str = "train") -> list[Example]:
    """The task's examples of ``split`` (``train`` or ``val``), each with its one answer."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if split not in _CACHE:
        rows: dict[str, list[Example]] = {"train": [], "val": []}
        for n, (_family, prompt, answer) in enumerate(_generate(), 1):
            part = split_of(prompt)
            rows[part].append(Example((("user", prompt),), answer, answer, n))
        _CACHE.update(rows)
    return list(_CACHE[split])


def is_correct(example: Example, text: str) -> bool:
    """Exact match of a generated response with the example's one answer (outer spaces aside)."""
    return example.answer is not None and text.strip() == example.answer.strip()


def wrong_answer(prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to one of the task's prompts."""
    if prompt.startswith("Reverse the word "):
        word = prompt.removeprefix("Reverse the word ").removesuffix(".")
        if word != answer:
            return word if rng.random() < 0.5 else _swap_two(answer, rng)
        return _swap_two(answer, rng)
    if prompt.startswith("Sort the digits "):
        digits = answer.split(" ")
        if len(set(digits)) > 1:
            while True:
                shuffled = digits[:]
                rng.shuffle(shuffled)
                if shuffled != digits:
                    return " ".join(shuffled)
        return " ".join([*digits, digits[0]])
    value = int(answer)
    while True:
        wrong = value + rng.choice((-10, -2, -1, 1, 2, 10))
        if wrong >= 0 and wrong != value:
            return str(wrong)


def _swap_two(word: str, rng: random.Random) -> str:
    if len(set(word)) == 1:
        return word + word[0]
    while True:
        i, j = sorted(rng.sample(range(len(word)), 2))
        swapped = word[:i] + word[j] + word[i + 1 : j] + word[i] + word[j + 1 :]
        if swapped != word:
            return swapped


def preference_pairs(split: str = "train", seed: int = 0) -> list[PreferencePair]:
    """One pair per example of ``split``: the right answer and a wrong one drawn with ``seed``."""
    rng = random.Random(f"optarena-pairs-v{TASK_VERSION}-{seed}")
    pairs = []
    for example in examples(split):
        prompt = example.messages[-1][1]
        assert example.answer is not None
        rejected = wrong_answer(prompt, example.answer, rng)
        pairs.append(PreferencePair(example.messages, example.answer, rejected))
    return pairs


__all__ = [
    "FAMILIES",
    "NAME",
    "TASK_VERSION",
    "PreferencePair",
    "examples",
    "is_correct",
    "preference_pairs",
    "split_of",
    "wrong_answer",
]
