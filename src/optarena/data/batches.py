"""Batches: random training windows from a seeded generator, fixed validation windows.

The training generator's state is part of a checkpoint, so a resumed run draws exactly the
windows the uninterrupted run would have drawn.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from optarena.errors import UserError


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)
    w = torch.from_numpy(tokens[idx].astype(np.int64))
    return w[:, :-1], w[:, 1:]


class RandomWindows:
    """``batch_size`` windows of ``seq_len + 1`` tokens at uniformly random offsets.

    With ``shard=(rank, world)`` every rank draws the offsets of the whole global batch (the same
    generator everywhere) and reads only its own ``batch_size / world`` rows: the global batch,
    and so the run, is the same at every world size, and resuming on another one is exact.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        shard: tuple[int, int] = (0, 1),
    ):
        if len(tokens) < seq_len + 2:
            raise UserError(
                f"the training split has {len(tokens)} tokens, fewer than one window of "
                f"seq_len {seq_len}; use more data or a shorter --seq-len"
            )
        rank, world = shard
        if batch_size % world:
            raise UserError(f"batch_size {batch_size} is not divisible by {world} processes")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """This rank's rows of the next global batch of ``batch_size`` windows."""
        n = batch_size or self.batch_size
        high = len(self.tokens) - self.seq_len
        starts = torch.randint(0, high, (n,), generator=self.generator).numpy()
        share = n // self.world
        mine = starts[self.rank * share : (self.rank + 1) * share]
        return _windows(self.tokens, mine, self.seq_len)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def validation_windows(tokens: np.ndarray, count: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """``count`` evenly spaced windows over the validation split: the same for every run, seed
    and optimizer, so final validation losses compare like with like."""
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"the validation split has {len(tokens)} tokens, fewer than one window of seq_len "
            f"{seq_len}; use more data, a larger val_fraction or a shorter --seq-len"
        )
    starts = np.linspace(0, len(tokens) - seq_len - 1, num=count).round().astype(np.int64)
    return _windows(tokens, starts, seq_len)


__all__ = ["RandomWindows", "validation_windows"]
