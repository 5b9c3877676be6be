"""What every command body shares: the usage check (a bad option value: exit 2, one line)."""

from __future__ import annotations

from charlm.errors import CharlmError


def check(condition: bool, message: str) -> None:
    """A usage error unless `condition`: one line on stderr naming the option and the fix, exit code 2."""
    if not condition:
        raise CharlmError(message, exit_code=2)
