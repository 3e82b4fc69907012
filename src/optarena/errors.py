"""User-facing errors: one line that names the problem and the fix, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a config key).

    The CLI prints ``optarena: error: <message>`` on one line and exits with code 2; no
    traceback. The message should say what is wrong and how to fix it.
    """

    exit_code = 2


class StorageError(UserError):
    """A file could not be written: the disk is full, a quota is spent, or the location is
    read-only. What was written before is kept; the message names the path and the fix."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after saving what it could; the message says at
    which step and where (the CLI prints it and exits with 130)."""
