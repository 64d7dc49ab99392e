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
    "TransportUnavailableError",
    "ProtocolError",
    "CapacityError",
    "CheckpointError",
]


class FastPSError(RuntimeError):
    """Base class of every fastps error."""


class InvalidArgumentError(FastPSError, ValueError):
    """A call received an argument fastps cannot use (shape, option, unknown key)."""


class TimeoutError(FastPSError, builtins.TimeoutError):  # noqa: A001 - mirrors the builtin
    """A wait passed its deadline. Raise it with ``FASTPS_TIMEOUT`` or ``timeout=``."""


class ConnectionError(FastPSError, builtins.ConnectionError):  # noqa: A001
    """A peer could not be reached or went away."""


class TransportUnavailableError(ConnectionError):
    """The transport asked for cannot work in this process: ``FASTPS_TRANSPORT=ucx`` where
    this fastps was built without UCX or the system's UCX (``libucp.so.0``) cannot be loaded.
    The message says why and what to set (install UCX, ``LD_LIBRARY_PATH``, or
    ``FASTPS_TRANSPORT=tcp``/``shm``)."""


class ProtocolError(FastPSError):
    """A peer sent bytes that break the fastps wire protocol."""


class CapacityError(FastPSError):
    """A limit was reached: a sparse table at its ``max_rows`` with eviction off (raise
    ``max_rows`` or choose an eviction policy), or a server's per-connection limits on
    waiting requests (docs/protocol.md, "Limits"). Nothing was changed."""


class CheckpointError(FastPSError):
    """A table file is corrupt, truncated or not a fastps table file, or could not be read
    or written (the message names the file and the OS error). The live table is unchanged."""
