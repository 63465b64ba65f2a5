"""Errors a user can fix (a wrong path, an unreachable server): the CLI prints one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Something in the configuration or the command line is wrong; the message says what to do."""
