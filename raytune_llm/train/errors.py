"""The errors a run reports to its user as one line (the CLI prints them without a traceback, exit status 2)."""

from __future__ import annotations


class UserError(RuntimeError):
    """A problem with the user's input or environment; the CLI prints it as one line."""


class StoppedEarly(UserError):
    """Training stopped on request (SIGTERM or Ctrl-C) after saving a checkpoint."""
