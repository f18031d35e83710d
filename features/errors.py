"""The one base class of expected failures.

A `UserError` is a problem the user can fix (bad input, a config key, a missing file, a refused output): the CLI
prints its message on one line and exits with status 2, without a traceback (`ctr --debug ...` shows it). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure; the message names the file or key, what was expected and how to fix it."""


class DatasetError(UserError, FileNotFoundError):
    """A dataset or run directory that is missing, incomplete, of another schema version, or not the one expected."""
