"""The one error type medadv raises for problems a user can fix.

Everything below ``cli.py`` raises :class:`MedadvError` instead of printing or exiting; the CLI turns it
into a single line (what went wrong, then how to fix it) and a non-zero exit, with no traceback.
"""

from __future__ import annotations


class MedadvError(Exception):
    """A user-facing error: ``what`` names the thing that is wrong, ``fix`` says what to do about it."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what} Fix: {fix}")

    def __str__(self) -> str:  # the one line the CLI prints
        return self.what if not self.fix else f"{self.what} Fix: {self.fix}"
