"""Errors for bad input: each names the field, the value and what is allowed."""

from __future__ import annotations


class StaircaseError(Exception):
    """Base class for errors a user can fix; the CLI prints them on one line (exit 2)."""


class ConfigError(StaircaseError, ValueError):
    """A field holds a value that is not allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        # args are the constructor's: SimPy re-raises a process's exception as type(e)(*e.args), pickle too
        super().__init__(field, value, allowed)

    def __str__(self) -> str:  # one line, whatever a user's names hold
        return one_line(f"{self.field}: got {self.value!r}; allowed: {self.allowed}")


_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits at


def one_line(text: str) -> str:
    return "".join(c.encode("unicode_escape").decode() if c in _BREAKS else c for c in text)


class ProtocolError(StaircaseError, RuntimeError):
    """An event that the scheduler's state does not allow (a runner bug, not user input)."""
