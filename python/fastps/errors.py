"""Exceptions raised by fastps.

Every failure a user or a peer can cause surfaces as a subclass of
:class:`FastPSError`; the native core raises the same classes.
"""

from __future__ import annotations

import builtins

__all__ = [
    "FastPSError",
    "InvalidArgumentError",
    "TimeoutError",
    "ConnectionError",
    "ProtocolError",
]


class FastPSError(RuntimeError):
    """Base class of every fastps error."""


class InvalidArgumentError(FastPSError, ValueError):
    """A call received an argument fastps cannot use (shape, option, unknown key)."""


class TimeoutError(FastPSError, builtins.TimeoutError):  # noqa: A001 - mirrors the builtin
    """A wait passed its deadline. Raise it with ``FASTPS_TIMEOUT`` or ``timeout=``."""


class ConnectionError(FastPSError, builtins.ConnectionError):  # noqa: A001
    """A peer could not be reached or went away."""


class ProtocolError(FastPSError):
    """A peer sent bytes that break the fastps wire protocol."""
