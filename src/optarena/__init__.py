"""optarena: choose, study and use optimizers for language-model training."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
