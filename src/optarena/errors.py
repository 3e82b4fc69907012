"""User-facing errors: one line that names the problem and the fix, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a config key).

    The CLI prints ``optarena: error: <message>`` on one line and exits with code 2; no
    traceback. The message should say what is wrong and how to fix it.
    """

    exit_code = 2
