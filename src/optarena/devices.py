"""A ``--device`` string as a usable ``torch.device``, or a one-line error saying why not."""

from __future__ import annotations

import torch

from optarena.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """``"auto"`` or ``None``: CUDA if present, else the CPU. Anything else must name a device
    torch can allocate on here (``cuda`` on a CPU-only build, ``cuda:3`` on a one-GPU machine
    or a misspelling is a :class:`UserError`, not a traceback from the first tensor)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"device {name!r} is not usable here: {reason}; use --device cpu or auto"
        ) from None
    return device
