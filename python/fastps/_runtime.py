"""The process-wide embedded parameter server and its configuration.

A plain ``python train.py`` gets an in-process server the first time an
optimizer steps. Its settings come from :func:`fastps.init` keyword arguments
first, then ``FASTPS_*`` environment variables (see docs/configuration.md).
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass
from typing import Optional

from . import _C
from .errors import InvalidArgumentError


@dataclass(frozen=True)
class Config:
    """Resolved settings of the embedded server."""

    num_shards: int = 0          # 0: one per hardware thread, capped at 8
    chunk_bytes: int = 4 << 20   # dense tensors are split into chunks of this size
    timeout: float = 300.0       # seconds; every wait's deadline


def _env_number(name: str, kind, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise InvalidArgumentError(f"fastps: environment variable {name}={raw!r} is not a {kind.__name__}") from None


def _validate(cfg: Config) -> Config:
    if cfg.num_shards < 0:
        raise InvalidArgumentError(f"fastps: num_shards must be >= 0, got {cfg.num_shards}")
    if cfg.chunk_bytes < 4096:
        raise InvalidArgumentError(f"fastps: chunk_bytes must be >= 4096, got {cfg.chunk_bytes}")
    if not cfg.timeout > 0:
        raise InvalidArgumentError(f"fastps: timeout must be > 0 seconds, got {cfg.timeout}")
    return cfg


class _Embedded:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.server = _C.Server(cfg.num_shards)
        self.client = _C.EmbeddedClient(self.server, cfg.chunk_bytes, cfg.timeout)


_lock = threading.Lock()
_embedded: Optional[_Embedded] = None
_ids = itertools.count(1)


def init(*, num_shards: Optional[int] = None, chunk_bytes: Optional[int] = None,
         timeout: Optional[float] = None) -> Config:
    """Configure (or reconfigure) the embedded server before training.

    Args:
        num_shards: shard threads of the embedded server (0 = one per core, at most 8).
            Default: ``FASTPS_NUM_SHARDS`` or 0.
        chunk_bytes: dense tensors are split into chunks of this many bytes.
            Default: ``FASTPS_CHUNK_BYTES`` or 4 MiB.
        timeout: seconds any wait may take before :class:`fastps.TimeoutError`.
            Default: ``FASTPS_TIMEOUT`` or 300.

    Returns:
        The resolved :class:`Config`.

    Reconfiguring drops the running server: optimizers created before re-register
    their tensors on their next step, so this is safe between steps.

    Example::

        fastps.init(num_shards=4)
    """
    global _embedded
    cfg = _validate(Config(
        num_shards=num_shards if num_shards is not None else _env_number("FASTPS_NUM_SHARDS", int, 0),
        chunk_bytes=chunk_bytes if chunk_bytes is not None else _env_number("FASTPS_CHUNK_BYTES", int, 4 << 20),
        timeout=float(timeout) if timeout is not None else _env_number("FASTPS_TIMEOUT", float, 300.0),
    ))
    with _lock:
        _embedded = _Embedded(cfg)
    return cfg


def embedded() -> _Embedded:
    """The embedded server, created on first use."""
    e = _embedded
    if e is None:
        init()
        e = _embedded
    assert e is not None
    return e


def next_tensor_id() -> int:
    """A process-unique id for a registered tensor (the high bits of its chunk keys)."""
    i = next(_ids)
    if i >= 1 << 32:
        raise InvalidArgumentError("fastps: ran out of tensor ids (more than 2**32 registrations)")
    return i
