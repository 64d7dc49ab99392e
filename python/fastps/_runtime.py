"""The process-wide embedded parameter server and its configuration.

A plain ``python train.py`` gets an in-process server the first time an
optimizer steps. Its settings, and those of the distributed mode, come from
:func:`fastps.init` keyword arguments first, then ``FASTPS_*`` environment
variables, then defaults (fastps/_config.py, docs/configuration.md).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _C, _config
from .errors import InvalidArgumentError


def _default(name: str):
    return _config.SETTINGS[name].default


@dataclass(frozen=True)
class Config:
    """Resolved settings (keyword argument > ``FASTPS_*`` variable > default), for the
    embedded and the distributed mode; docs/configuration.md lists them all."""

    num_shards: int = _default("num_shards")              # shard threads; 0: one per hardware thread, at most 8
    chunk_bytes: int = _default("chunk_bytes")            # dense tensors are split into chunks of this size
    timeout: float = _default("timeout")                  # seconds; every wait's deadline
    huge_pages: bool = _default("huge_pages")             # large sparse tables ask for transparent huge pages
    prefault: bool = _default("prefault")                 # back a sparse table's next rows with memory ahead
    # distributed mode
    staleness: int = _default("staleness")                # 0 BSP, k SSP, -1 ASP
    num_servers: int = _default("num_servers")            # dedicated server processes
    colocate: bool = _default("colocate")                 # each rank hosts a server
    bind: str = _default("bind")                          # address servers listen on
    advertise: Optional[str] = _default("advertise")      # address others use (default: bind, or hostname)
    secret: Optional[str] = field(default=_default("secret"), repr=False)  # the job's secret (default: rank 0 makes one)
    connections: int = _default("connections")            # TCP connections per server
    transport: str = _default("transport")                # auto (shm on this host, else ucx/tcp), tcp, shm, ucx
    shm_ring_bytes: int = _default("shm_ring_bytes")      # each shared-memory ring
    shm_spin_us: int = _default("shm_spin_us")            # idle ring reader spins this long (-1: pick)
    shm_yield_us: int = _default("shm_yield_us")          # then yields this long before sleeping (-1: pick)
    overlap: bool = _default("overlap")                   # push gradients from backward's hooks
    liveness_timeout: float = _default("liveness_timeout")  # a peer silent this long is dead (0: off)
    send_queue_bytes: int = _default("send_queue_bytes")  # replies a server holds for one worker


class _Embedded:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.server = _C.Server(cfg.num_shards)
        self.client = _C.EmbeddedClient(self.server, cfg.chunk_bytes, cfg.timeout)


_lock = threading.Lock()
_embedded: Optional[_Embedded] = None
_ids = itertools.count(1)


def resolve(**keywords: Any) -> Config:
    """The settings: ``keywords`` (None: not given), then those of the last :func:`init`,
    then ``FASTPS_*`` variables, then the defaults (fastps/_config.py)."""
    return Config(**_config.resolve_all(overrides=keywords))


def init(*, num_shards: Optional[int] = None, chunk_bytes: Optional[int] = None,
         timeout: Optional[float] = None, huge_pages: Optional[bool] = None,
         prefault: Optional[bool] = None, staleness: Optional[int] = None, num_servers: Optional[int] = None,
         colocate: Optional[bool] = None, bind: Optional[str] = None, advertise: Optional[str] = None,
         secret: Optional[str] = None, connections: Optional[int] = None, transport: Optional[str] = None,
         shm_ring_bytes: Optional[int] = None, shm_spin_us: Optional[int] = None,
         shm_yield_us: Optional[int] = None, overlap: Optional[bool] = None,
         liveness_timeout: Optional[float] = None, send_queue_bytes: Optional[int] = None) -> Config:
    """Configure fastps before training (or reconfigure the embedded server between steps).

    Every setting comes from its keyword argument here, else its ``FASTPS_*``
    environment variable, else its default; docs/configuration.md lists them
    all. A setting left out (None) is resolved again from the environment, so a
    later ``init()`` replaces the keywords of an earlier one.

    Args:
        num_shards: shard threads of a server (0 = one per core, at most 8).
            Default: ``FASTPS_NUM_SHARDS`` or 0.
        chunk_bytes: dense tensors are split into chunks of this many bytes.
            Default: ``FASTPS_CHUNK_BYTES`` or 4 MiB.
        timeout: seconds any wait may take before :class:`fastps.TimeoutError`.
            Default: ``FASTPS_TIMEOUT`` or 300.
        huge_pages: large sparse tables ask for transparent huge pages.
            Default: ``FASTPS_HUGE_PAGES`` or True.
        prefault: a background thread backs the pages of a large sparse table's
            next rows with memory ahead of the pushes that create them.
            Default: ``FASTPS_PREFAULT`` or True.
        staleness: distributed mode: 0 BSP, k > 0 SSP, -1 ASP. Default: ``FASTPS_STALENESS`` or 0.
        num_servers: dedicated ``fastps server`` processes. Default: ``FASTPS_NUM_SERVERS`` or 0.
        colocate: each rank hosts a server. Default: ``FASTPS_COLOCATE`` or True.
        bind: address servers listen on. Default: ``FASTPS_BIND`` or 127.0.0.1.
        advertise: address other processes use to reach this one's server.
            Default: ``FASTPS_ADVERTISE``, else the bind address (the hostname when binding to all).
        secret: the job's handshake secret, the same in every process.
            Default: ``FASTPS_SECRET``, else rank 0 generates one.
        connections: TCP connections from each worker to each server. Default: ``FASTPS_CONNECTIONS`` or 1.
        transport: ``auto``, ``tcp``, ``shm`` or ``ucx`` (docs/ucx.md). Default: ``FASTPS_TRANSPORT`` or auto.
        shm_ring_bytes: bytes of each shared-memory ring. Default: ``FASTPS_SHM_RING_BYTES`` or 4 MiB.
        shm_spin_us, shm_yield_us: microseconds an idle shared-memory reader spins, then
            yields, before it sleeps (-1: fastps picks). Default: ``FASTPS_SHM_SPIN_US``,
            ``FASTPS_SHM_YIELD_US`` or -1.
        overlap: push gradients from autograd hooks during backward. Default: ``FASTPS_OVERLAP`` or True.
        liveness_timeout: seconds of silence after which a peer is dead (0: off).
            Default: ``FASTPS_LIVENESS_TIMEOUT`` or 30.
        send_queue_bytes: replies a server holds for one worker connection.
            Default: ``FASTPS_SEND_QUEUE_BYTES`` or 4 GiB.

    Returns:
        The resolved :class:`Config`.

    Raises:
        fastps.InvalidArgumentError: a value is not allowed (the message names the
            keyword or variable and what it allows), or, in the distributed mode,
            the settings changed after the job's connections were made (the first
            optimizer, embedding or ``Client``): call ``init`` before those.

    Reconfiguring drops the running embedded server: optimizers created before
    re-register their tensors on their next step, so this is safe between steps.

    Example::

        fastps.init(num_shards=4)
        fastps.init(staleness=1, transport="tcp")  # under torchrun, before the optimizer
    """
    keywords = {k: v for k, v in locals().items() if v is not None}
    cfg = Config(**_config.resolve_all(overrides=keywords, keep=False))
    from . import _cluster  # the distributed mode reads these settings when it starts

    _cluster.check_settings_unchanged(cfg)
    _config.set_keywords(keywords)
    _start(cfg)
    return cfg


def _start(cfg: Config) -> None:
    global _embedded
    _config.apply_process_settings(cfg)
    with _lock:
        _embedded = _Embedded(cfg)


def embedded() -> _Embedded:
    """The embedded server, created on first use."""
    e = _embedded
    if e is None:
        _start(resolve())
        e = _embedded
    assert e is not None
    return e


def next_tensor_id() -> int:
    """A process-unique id for a registered tensor (the high bits of its chunk keys)."""
    i = next(_ids)
    if i >= 1 << 32:
        raise InvalidArgumentError("fastps: ran out of tensor ids (more than 2**32 registrations)")
    return i
