"""The exit codes scripts can rely on, and the exception that ends a command with one."""

from __future__ import annotations

from fastapi_catga.exceptions import CatgaError, ConfigurationError, TransportError

__all__ = ["FAILED", "INTERRUPTED", "OK", "UNREACHABLE", "USAGE", "Exit", "exit_for"]

OK = 0
#: The operation failed: an error reply, no such node, type or dead letter, no answer in time.
FAILED = 1
#: The command line is wrong (argparse's own code).
USAGE = 2
#: The broker is unreachable or misconfigured (the in-memory transport included: no broker to ask).
UNREACHABLE = 3
#: Ctrl-C (128 + SIGINT), except for ``watch``, which ends with 0.
INTERRUPTED = 130


class Exit(Exception):
    """Ends a command with ``code``; ``message`` goes to stderr (nothing when empty)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def exit_for(exc: CatgaError) -> Exit:
    """The exit an error escaping a command means: the broker's and the settings' fault is 3, any
    other (an error reply, a deadline that passed) is 1."""
    if isinstance(exc, ConfigurationError | TransportError):
        return Exit(UNREACHABLE, str(exc))
    return Exit(FAILED, str(exc))
