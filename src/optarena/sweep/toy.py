"""A synthetic training function with a known loss landscape, for trying sweep machinery.

``optarena sweep SPEC --function optarena.sweep.toy:train`` checks a backend (a Ray cluster,
Slurm) in seconds, without torch or data; the tests use it for the same reason. The final loss
is a parabola in log10(LR) around an optimum that depends on the optimizer family, plus a small
deterministic per-seed offset; LRs far above the optimum diverge.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

from optarena import atomic

# log10 of the optimal LR and the loss reached there, per optimizer (others: adamw's).
OPTIMA = {
    "adamw": (-2.5, 3.0),
    "adam-mini": (-2.5, 3.01),
    "adafactor": (-2.5, 3.02),
    "adalayer": (-2.5, 3.03),
    "lion": (-3.5, 3.02),
    "signum": (-3.5, 3.05),
    "sgd": (0.0, 3.3),
}
CURVATURE = 0.2  # nats per decade squared
DIVERGE_DECADES = 1.5  # LRs this far above the optimum diverge
# With ``toy_hparams = true`` the loss also rises quadratically away from these optima
# (weight decay, beta2 as log10(1 - beta2), warmup fraction): a landscape to tune on.
WEIGHT_DECAY_OPTIMUM, WEIGHT_DECAY_CURVATURE = 0.1, 2.0
BETA2_OPTIMUM, BETA2_CURVATURE = 0.99, 0.1
WARMUP_OPTIMUM, WARMUP_CURVATURE = 0.05, 4.0


def expected_loss(
    optimizer: str,
    lr: float,
    seed: int = 0,
    weight_decay: float | None = None,
    beta2: float | None = None,
    warmup: float | None = None,
) -> float:
    """The final loss ``train`` reports for these settings (inf where it diverges); the
    hyperparameters other than the LR count only when given (``toy_hparams``)."""
    center, floor = OPTIMA.get(optimizer, OPTIMA["adamw"])
    offset = math.log10(lr) - center
    if offset > DIVERGE_DECADES:
        return math.inf
    noise = int(hashlib.sha256(f"{optimizer}:{seed}".encode()).hexdigest()[:8], 16) / 16**8
    loss = floor + CURVATURE * offset**2 + 0.01 * (noise - 0.5)
    if weight_decay is not None:
        loss += WEIGHT_DECAY_CURVATURE * (weight_decay - WEIGHT_DECAY_OPTIMUM) ** 2
    if beta2 is not None:
        gap = math.log10(1.0 - beta2) - math.log10(1.0 - BETA2_OPTIMUM)
        loss += BETA2_CURVATURE * gap**2
    if warmup is not None:
        loss += WARMUP_CURVATURE * (warmup - WARMUP_OPTIMUM) ** 2
    return loss


def _hparams_of(config: dict[str, Any]) -> dict[str, float]:
    """The tunable settings of a config as ``expected_loss`` takes them."""
    hparams = config.get("hparams") or {}
    betas = hparams.get("betas") or [0.9, 0.95]
    return {
        "weight_decay": float(hparams.get("weight_decay", 0.0)),
        "beta2": float(betas[1]),
        "warmup": float(config.get("warmup", 0.1)),
    }


def train(config: dict[str, Any]) -> dict[str, Any]:
    """Summary in the shape of ``optarena.train.train``. Knobs to rehearse trouble:
    ``toy_fail`` raises, ``toy_exit`` kills the worker process, ``toy_exit_once`` kills it on the
    first attempt only (a retried run then succeeds), ``toy_seconds`` sleeps (after writing
    ``OUT/toy_started`` with its pid), ``toy_hparams`` makes weight decay, beta2 and warmup
    count (:func:`expected_loss`)."""
    if config.get("toy_fail"):
        raise RuntimeError(f"toy run asked to fail (lr={config['lr']})")
    if config.get("toy_exit"):
        os._exit(13)
    if config.get("toy_exit_once") and config.get("out"):  # the first attempt dies
        marker = Path(config["out"]) / "toy_exit_once"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            os._exit(13)
    if config.get("toy_seconds") and config.get("out"):
        Path(config["out"]).mkdir(parents=True, exist_ok=True)
        (Path(config["out"]) / "toy_started").write_text(str(os.getpid()))
    time.sleep(float(config.get("toy_seconds", 0.0)))
    steps = int(config.get("steps", 10))
    extra = _hparams_of(config) if config.get("toy_hparams") else {}
    loss = expected_loss(
        config["optimizer"], float(config["lr"]), int(config.get("seed", 0)), **extra
    )
    diverged = not math.isfinite(loss)
    curve = [
        [s, (loss if not diverged else 10.0) + 2.0 * (1 - s / steps)]
        for s in range(0, steps + 1, max(1, steps // 5))
    ]
    summary = {
        "final_val_loss": None if diverged else loss,
        "diverged": diverged,
        "steps": steps,
        "tokens": steps * 64,
        "tokens_per_second": 1000.0,
        "params": 1000,
        "optimizer_state_bytes": 4000 if config["optimizer"] == "adam-mini" else 8000,
        "peak_memory_bytes": 0,
        "wall_seconds": float(config.get("toy_seconds", 0.0)),
        "eval_curve": curve,
        "config": dict(config),
        "pid": os.getpid(),
    }
    if config.get("out"):
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out / "summary.json", summary, default=str)
    return summary
