"""Step counts added a bucket at a time (``optarena.optim.step_counts``)."""

from __future__ import annotations

import random

import torch

from optarena.optim.step_counts import CountPool, StepCounts


def _states(n: int) -> list[dict]:
    return [{"step": torch.tensor(0.0)} for _ in range(n)]


def test_buckets_that_take_turns_count_exactly_and_settle() -> None:
    """Buckets over overlapping sets of states (none containing another, more states than the
    pool's first tensor holds), stepped in a random order and rebuilt, as the optimizer does,
    only when their states no longer hold their counts: every count equals the steps its
    states took part in, and once every bucket has run no bucket is rebuilt again."""
    rng = random.Random(0)
    states = _states(150)
    sets = [
        list(range(0, 100)),
        list(range(50, 150)),
        [i for i in range(150) if i % 3],
        [7],
    ]
    pool = CountPool()
    buckets: dict[int, StepCounts] = {}
    expected = [0] * len(states)
    rebuilds = []
    for step in range(200):
        k = rng.randrange(len(sets))
        chosen = [states[i] for i in sets[k]]
        counts = buckets.get(k)
        if counts is None or not counts.held_by(chosen):
            counts = buckets[k] = StepCounts(chosen, pool)
            rebuilds.append(step)
        after = counts.add_one()
        for i in sets[k]:
            expected[i] += 1
        assert after.tolist() == [expected[i] for i in sets[k]]
        assert [float(st["step"]) for st in states] == expected
    # every bucket built once, plus at most one move each when the pool grew; none after
    assert len(rebuilds) <= 2 * len(sets), rebuilds
    assert max(rebuilds) < 100, rebuilds


def test_counts_set_by_hand_or_of_another_dtype() -> None:
    states = _states(3)
    pool = CountPool()
    counts = StepCounts(states, pool)
    counts.add_one()
    states[1]["step"] = torch.tensor(10.0)  # set by hand: the bucket must be rebuilt
    assert not counts.held_by(states)
    counts = StepCounts(states, pool)
    assert counts.add_one().tolist() == [2.0, 11.0, 2.0]
    loaded = [{"step": torch.tensor(4.0, dtype=torch.float64)}]  # kept as loaded, added alone
    assert StepCounts(loaded, pool).add_one().tolist() == [5.0]
    assert loaded[0]["step"].dtype == torch.float64
