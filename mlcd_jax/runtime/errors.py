"""The one error type for a user's mistake.

A wrong config field, a missing or stale file, a flag out of range, a full disk: the package raises
`UserError` with one line that names the field or file and says the fix, and every command
(`runtime/cli.py`) prints that line and exits with the error's `exit_code` (2), before hours of
compute and without losing what was saved. Anything else is a bug, and reaches the user with its
traceback: a shape or sharding mistake inside jax must never look like a typo.

`UserError` is a `ValueError`, so a caller that checks a value the package refused keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix: the message is one line naming the field or file and the fix."""

    exit_code = 2


class Diverged(UserError):
    """The run diverged (a non-finite loss or parameters): the newest good checkpoint is kept, and
    the message says where it is and what to lower."""

    exit_code = 3


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named (or a step before should have made) is not there."""
