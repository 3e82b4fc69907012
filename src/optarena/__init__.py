"""optarena: choose, study and use optimizers for language-model training."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["TrainConfig", "__version__", "train"]


def __getattr__(name: str) -> Any:
    """``optarena.train`` and ``optarena.TrainConfig`` on first use, so that ``import optarena``
    does not import torch."""
    if name in ("train", "TrainConfig"):
        import importlib

        module = importlib.import_module("optarena.train")
        return module.train if name == "train" else module.TrainConfig
    raise AttributeError(f"module 'optarena' has no attribute {name!r}")
