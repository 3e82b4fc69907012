"""``python -m optarena`` is the ``optarena`` command (torchrun launches it this way)."""

from optarena.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
