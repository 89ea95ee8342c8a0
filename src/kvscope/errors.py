"""Errors that carry the exit code the CLI should end with.

Library code raises these and never calls ``sys.exit``; the CLI maps them to exit codes in one
place (``kvscope.cli.main``). Messages are one sentence that says what is wrong and where.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1  # analysis ran and a finding at or above --fail-on exists
EXIT_BAD_INPUT = 2  # the input (trace, option, file) is invalid
EXIT_RUNTIME = 3  # the work itself failed (recording crashed, a kernel failed)


class KvscopeError(Exception):
    """Base class of every error kvscope raises on purpose."""

    exit_code: int = EXIT_RUNTIME

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class TraceError(KvscopeError):
    """A trace is missing, unreadable, of another major version, or breaks an invariant."""

    exit_code = EXIT_BAD_INPUT


class UsageError(KvscopeError):
    """A bad option value, an unknown detector, a malformed file given by the user."""

    exit_code = EXIT_BAD_INPUT


class RecordingError(KvscopeError):
    """The recorder could not attach to the model or record it."""

    exit_code = EXIT_RUNTIME
