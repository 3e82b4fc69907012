"""Scale presets and the two studies' protocols, as data.

A *scale* fixes what a reproduction can afford (model size, steps, batch, data); the *protocol*
(LR grids, betas, epsilon, schedule, clipping, z-loss) is the study's and does not change with
the scale, except that LR grids slide by whole half decades toward the model's width (the study
tuned its grids at width 1024; see ``docs/sweeps.md``), so every point stays on the study's
sqrt(10) lattice. The ``test`` scale is the CI-sized run: a handful of micro runs of a few steps,
fewer optimizers and LR points, every stage still exercised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from optarena.errors import UserError

STUDY_WIDTH = 1024  # the width the Deconstructing study tuned its LR grids at

# Half-decade LR grids of the study at width 1024: (from, to). Sophia is a sign-like update
# (Signum before its first Hessian estimate), so it gets Lion's and Signum's grid.
LR_GRIDS: dict[str, tuple[float, float]] = {
    "adamw": (1e-4, 1.0),
    "adafactor": (1e-4, 1.0),
    "adalayer": (1e-4, 1.0),
    "lion": (1e-5, 1e-1),
    "signum": (1e-5, 1e-1),
    "sophia": (1e-5, 1e-1),
    "sgd": (1e-3, 10.0),
}
# Optima the study found at width 1024: the reduced scale keeps the points nearest to these.
LR_OPTIMA: dict[str, float] = {
    "adamw": 3.16e-3,
    "adafactor": 3.16e-3,
    "adalayer": 3.16e-3,
    "lion": 3.16e-4,
    "signum": 3.16e-4,
    "sophia": 3.16e-4,
    "sgd": 1.0,
    "hybrid": 10.0,
}
# The SGD body's LR in the hybrids: the study's 0.1..3160, extended one decade down. SGD's
# optimum does not move with the width as Adam's does (micro: heavy-ball SGD's optimum is 0.1,
# the study's at width 1024 is 1.0), so the shifted study grid put the hybrids' optimum on its
# lower edge at micro scale.
HYBRID_GRID = (0.01, 3160.0)
HYBRID_ADAPTIVE_LR = 3.16e-3  # the adaptive last layer / LayerNorms' own peak LR
BETA1_VALUES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
BETA2_VALUES = (0.8, 0.9, 0.95, 0.98, 0.99)
BETAS = (0.9, 0.95)
EPS = 1e-15
SGD_MOMENTUM = 0.98

STAGE1_OPTIMIZERS = ("adamw", "adafactor", "lion", "signum", "sophia", "adalayer", "sgd")
BETA1_OPTIMIZERS = ("adamw", "adafactor", "adalayer", "lion", "signum", "sophia", "sgd")
BETA2_OPTIMIZERS = ("adamw", "adafactor", "adalayer", "lion", "sophia")
HYBRIDS = (
    "hybrid-adalayer-last-ln",
    "hybrid-adalayer-last",
    "hybrid-adalayer-ln",
    "hybrid-adafactor-last-ln",
    "hybrid-adafactor-last",
    "hybrid-adafactor-ln",
)
FROZEN_LABELS = {"adam-frozen": (), "adam-frozen-last-ln": ("output", "norm")}

# Adam-mini's Llama-style models: RMSNorm, SwiGLU, grouped-query attention, untied output, no
# QK-norm. The authors advise AdamW's hyperparameters for Adam-mini; these are their
# pre-training settings (betas (0.9, 0.95), eps 1e-8, weight decay 0.1).
LLAMA_OVERRIDES: dict[str, Any] = {"norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False}
ADAM_MINI_HPARAMS: dict[str, Any] = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
ADAM_MINI_LRS = (1e-4, 1.0)  # AdamW's grid at width 1024, shifted like the study's
# The window of ADAM_MINI_POINTS grid points is centred half a decade below the study's AdamW
# optimum: centred on it, AdamW's best LR sat on the window's lowest point at micro and tiny
# (Adam's optimum moves less with the width than the shift assumes).
ADAM_MINI_CENTER = 3.16e-3 / math.sqrt(10)
ADAM_MINI_POINTS = 6
# The authors' final validation perplexities (Llama, Chinchilla-optimal tokens), for context.
ADAM_MINI_PAPER_TABLE: tuple[tuple[str, str, float, float], ...] = (
    ("39M", "1.02B", 40.795, 40.407),
    ("67M", "1.76B", 29.319, 29.014),
    ("102M", "2.67B", 24.670, 24.192),
    ("162M", "4.25B", 20.360, 20.172),
    ("271M", "7.10B", 17.178, 17.035),
    ("1B", "26.21B", 12.452, 12.372),
)


@dataclass(frozen=True)
class Scale:
    """What one reproduction affords: shapes, steps, data, and how much of each grid to run."""

    name: str
    model: str
    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    data: str = "builtin"
    eval_windows: int = 64
    # Adam-mini: the model sizes (presets) compared, each with Llama options and GQA.
    adam_mini_models: tuple[str, ...] = ("micro", "tiny")
    adam_mini_steps: int | None = None  # None: ``steps``
    # Seed-to-seed standard deviation of the final loss assumed when a run has no repeats.
    noise_sd: float = 0.02
    # Reduced protocol (CI): None keeps everything.
    optimizers: tuple[str, ...] | None = None
    lr_points: int | None = None  # keep this many grid points nearest the study's optimum
    beta1_values: tuple[float, ...] = BETA1_VALUES
    beta2_values: tuple[float, ...] = BETA2_VALUES
    beta_optimizers: tuple[str, ...] | None = None
    hybrids: tuple[str, ...] = HYBRIDS
    frozen: tuple[str, ...] = tuple(FROZEN_LABELS)
    workers: int | None = None  # None: one per core (small models use one core well)
    # Adam-mini's SFT stages (optarena.reproduce.adam_mini_sft): steps, batch, LR points,
    # validation examples for the response loss and for exact match
    sft_steps: int = 200
    sft_batch_size: int = 16
    sft_lr_points: int = 5
    sft_eval_examples: int = 256
    sft_eval_generate: int = 128
    # Adam-mini's RLHF stages (on the SFT stage's model): the reward model's steps and LR,
    # ReMax's steps, LR grid and held-out prompts
    reward_steps: int = 300
    reward_lr: float = 3e-4
    rlhf_steps: int = 100
    rlhf_lrs: tuple[float, ...] = (1e-4, 3.16e-4, 1e-3)
    rlhf_eval_prompts: int = 128
    rlhf_max_new_tokens: int = 16
    extra: dict[str, Any] = field(default_factory=dict)  # more [base] keys

    def base(self, model: str | None = None) -> dict[str, Any]:
        """The ``[base]`` of every run: the study's schedule, clipping and z-loss."""
        return {
            "model": model or self.model,
            "data": self.data,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "eval_every": self.eval_every,
            "eval_windows": self.eval_windows,
            "schedule": "cosine",
            "warmup": 0.1,
            "warmup_start": 0.1,
            "final_lr_fraction": 0.1,
            "grad_clip": 1.0,
            "z_loss": 1e-4,
            **self.extra,
        }


SCALES: dict[str, Scale] = {
    # CI: a handful of micro runs of a few steps; checks the machinery, not the science.
    "test": Scale(
        "test",
        "micro",
        steps=16,
        batch_size=8,
        seq_len=32,
        eval_every=8,
        eval_windows=8,
        adam_mini_models=("micro",),
        optimizers=("adamw", "sgd"),
        lr_points=2,
        beta1_values=(0.8, 0.9),
        beta2_values=(0.9, 0.95),
        beta_optimizers=("adamw",),
        hybrids=("hybrid-adalayer-last-ln",),
        frozen=("adam-frozen-last-ln",),
        sft_steps=6,
        sft_batch_size=8,
        sft_lr_points=1,
        sft_eval_examples=16,
        sft_eval_generate=8,
        reward_steps=4,
        rlhf_steps=3,
        rlhf_lrs=(1e-3,),
        rlhf_eval_prompts=8,
        rlhf_max_new_tokens=8,
    ),
    # The full protocol on a 2-core CPU: Deconstructing 215 runs of 200 steps in 22 min,
    # Adam-mini 24 runs of 400 steps in 12 min (idle box, docs/reproduction.md).
    "micro": Scale(
        "micro",
        "micro",
        steps=200,
        batch_size=16,
        seq_len=64,
        eval_every=25,
        adam_mini_models=("micro", "tiny"),
        adam_mini_steps=400,
    ),
    "tiny": Scale(
        "tiny", "tiny", steps=1000, batch_size=32, seq_len=128, eval_every=100, noise_sd=0.01
    ),
    "small": Scale(
        "small",
        "small",
        steps=3000,
        batch_size=32,
        seq_len=256,
        eval_every=250,
        adam_mini_models=("tiny", "small"),
        noise_sd=0.01,
        workers=1,
    ),
    # The study's smallest model at its full protocol: a GPU cluster's job (C4, T5 vocabulary).
    "150m": Scale(
        "150m",
        "150m",
        steps=25_000,
        batch_size=256,
        seq_len=512,
        eval_every=1000,
        data="c4",
        eval_windows=256,
        adam_mini_models=("small", "150m"),
        noise_sd=0.005,
        workers=1,
        extra={"tokenizer": "t5-base"},
    ),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise UserError(f"unknown scale {name!r}; choose one of: {', '.join(SCALES)}")
    return SCALES[name]


def round12(x: float) -> float:
    """12 significant digits, as sweep specs round generated values (stable run ids)."""
    return float(f"{x:.12g}")


def half_decades(model: str) -> int:
    """Half decades by which the study's LR grids slide toward ``model``'s width."""
    from optarena.model import PRESETS

    width = int(PRESETS[model]["d_model"])
    return round(2 * math.log10(STUDY_WIDTH / width))


def lr_grid(
    lo: float, hi: float, model: str, points: int | None = None, center: float = 0.0
) -> list[float]:
    """The study's half-decade grid from ``lo`` to ``hi``, shifted to ``model``'s width; with
    ``points``, only that many nearest the (shifted) ``center``."""
    shift = 10 ** (half_decades(model) / 2)
    n = round(2 * math.log10(hi / lo))
    grid = [round12(lo * shift * 10 ** (k / 2)) for k in range(n + 1)]
    if points is not None and center > 0:
        target = math.log10(center * shift)
        grid = sorted(sorted(grid, key=lambda x: abs(math.log10(x) - target))[:points])
    return grid


def shifted(lr: float, model: str) -> float:
    return round12(lr * 10 ** (half_decades(model) / 2))
