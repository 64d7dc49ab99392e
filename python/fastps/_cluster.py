"""Distributed mode: rendezvous, colocated servers and the worker's connections.

A process is in the distributed mode when ``WORLD_SIZE`` > 1 (as ``torchrun``
sets it). Ranks meet in torch's own ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``
under the key prefix ``fastps/<restart>/``: under torchrun every rank connects
to the agent's store as a client; otherwise rank 0 hosts a multi-tenant store
that ``torch.distributed.init_process_group`` can share.

By default every rank hosts one parameter server (colocated); ``FASTPS_NUM_SERVERS``
dedicated ``fastps server`` processes can be added. Every worker connects to
every server. All settings are in docs/configuration.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import ipaddress
import os
import secrets
import socket
import sys
import time
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from . import _C, _config
from ._config import TRANSPORTS  # noqa: F401 - demo/launch.py imports it from here
from ._runtime import Config
from .errors import ConnectionError as FastPSConnectionError
from .errors import InvalidArgumentError, TimeoutError as FastPSTimeoutError


# Requests still unfinished when an error path stopped waiting for them, with
# what they may still read or write (gradients, parameters): referenced until
# they finish; pruned at every wait_all().
_PARKED: List[Tuple[List[Any], Any]] = []


def wait_all(futures, keep: Any, error: BaseException) -> None:
    """After ``error``, wait for native futures, ignoring their errors, within one deadline
    for all of them (the job's ``FASTPS_TIMEOUT``; none after a KeyboardInterrupt). For
    error paths: the servers may still read a gradient in place or write a parameter, so
    ``keep`` (whatever those requests use) stays referenced until each of them finished;
    requests unfinished at the deadline are parked with it instead of costing a deadline each."""
    _PARKED[:] = [(fs, k) for fs, k in _PARKED if not all(f.done() for f in fs)]
    if isinstance(error, KeyboardInterrupt):
        timeout = 0.0  # Ctrl-C: leave at once
    else:
        cl = cluster()
        timeout = cl.config.timeout if cl is not None else _config.resolve("timeout")
    deadline = time.monotonic() + timeout
    left = []
    for f in futures:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                f.wait(remaining)
            except Exception:  # noqa: BLE001 - the caller re-raises the error it met first
                pass
        if not f.done():
            left.append(f)
    if left:
        _PARKED.append((left, keep))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local job's rendezvous store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, kw_only=True)
class ClusterConfig(Config):
    """The job (from torchrun's variables) and every setting (fastps/_config.py)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def is_distributed_env() -> bool:
    """True when this process was launched as one rank of several (torchrun)."""
    return _config.is_distributed()


def config_from_env(**overrides) -> ClusterConfig:
    """The distributed mode's configuration: ``overrides`` (None: not given), then the
    keywords of :func:`fastps.init`, then ``FASTPS_*`` variables, then the defaults."""
    addr = _config.resolve("MASTER_ADDR")
    port = _config.resolve("MASTER_PORT")
    if not addr or not port:
        raise InvalidArgumentError(
            "fastps: WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun "
            "or set them to the rendezvous store's address")
    c = ClusterConfig(rank=_config.resolve("RANK"), world_size=_config.resolve("WORLD_SIZE"),
                      master_addr=addr, master_port=port, **_config.resolve_all(overrides=overrides))
    if not 0 <= c.rank < c.world_size:
        raise InvalidArgumentError(f"fastps: RANK={c.rank} is outside WORLD_SIZE={c.world_size}")
    if not c.colocate and c.num_servers < 1:
        raise InvalidArgumentError("fastps: FASTPS_COLOCATE=0 needs FASTPS_NUM_SERVERS >= 1 dedicated servers")
    return c


def check_settings_unchanged(cfg: Config) -> None:
    """Raise if the distributed mode started with other settings than ``cfg`` (a
    :func:`fastps.init` called after the job's connections were made)."""
    cl = _cluster
    if cl is None:
        return
    changed = [f.name for f in dataclasses.fields(Config) if getattr(cfg, f.name) != getattr(cl.config, f.name)]
    if changed:
        raise InvalidArgumentError(
            f"fastps: init() changes {', '.join(changed)} after the distributed job started (the first "
            "optimizer, embedding or Client connected this rank); call fastps.init(...) before creating them")


def advertised_host(cfg: ClusterConfig) -> str:
    if cfg.advertise:
        return cfg.advertise
    if cfg.bind in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return cfg.bind


def hosts_store(cfg: ClusterConfig) -> bool:
    """Whether this rank hosts the job's store: rank 0, unless a torchrun agent does."""
    return cfg.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def open_store(cfg: ClusterConfig, *, host_store: Optional[bool] = None):
    """Connect to the job's TCPStore and return it under the fastps/ prefix."""
    import torch.distributed as dist

    is_master = hosts_store(cfg) if host_store is None else host_store
    try:
        store = dist.TCPStore(cfg.master_addr, cfg.master_port, world_size=None, is_master=is_master,
                              timeout=datetime.timedelta(seconds=cfg.timeout), wait_for_workers=False,
                              multi_tenant=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types here
        raise FastPSConnectionError(
            f"fastps: cannot reach the rendezvous store at {cfg.master_addr}:{cfg.master_port} "
            f"({'hosting' if is_master else 'as a client'}): {e}") from e
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fastps/{restart}/", store), store


# Note [Job failure marker]
# A rank that exits because of an uncaught exception sets the store key FAILED_KEY
# (under the job's prefix) to a line saying which rank failed and why, then leaves
# without the shutdown barrier. Every store_get polls that key as well as its own,
# so the others stop waiting (in the shutdown barrier, a registration barrier, for
# a server's address) as soon as it is set, instead of at their deadline; dedicated
# `fastps server` processes leave on it too. Keys live under fastps/<restart>/, so
# a torchrun restart starts without it.
FAILED_KEY = "failed"

_T = TypeVar("_T")


def _store_name(where: Optional[str]) -> str:
    if where:
        return where
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _store_call(fn: Callable[[], _T], what: str, where: Optional[str]) -> _T:
    """Run one store operation; a failure to reach the store (its host died, the
    connection broke) becomes fastps.ConnectionError naming the store, at once."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - torch raises DistNetworkError, DistStoreError, RuntimeError
        raise FastPSConnectionError(
            f"fastps: lost the rendezvous store at {_store_name(where)} while waiting for {what} "
            f"({type(e).__name__}: {e}); did the process hosting it (rank 0, or the torchrun agent) "
            "exit?") from e


def store_get(store, key: str, timeout: float, what: str, *, where: Optional[str] = None) -> bytes:
    """The value of store key ``key``, waiting at most ``timeout`` seconds for it to be set.

    Args:
        store: the job's (prefixed) store.
        key: the key to read.
        timeout: seconds to wait before :class:`fastps.TimeoutError`.
        what: what the key stands for, for error messages ("rank 0 to publish the job secret").
        where: the store's ``host:port`` for error messages (default ``MASTER_ADDR:MASTER_PORT``).

    Raises :class:`fastps.TimeoutError` naming ``what`` when the deadline passes,
    :class:`fastps.ConnectionError` at once when the store cannot be reached or
    another rank published a failure (Note [Job failure marker]).

    The store is polled (every few ms at first, then every 0.2 s), which keeps
    Ctrl-C responsive and lets one wait watch two keys; the last look is taken
    after the deadline, so a key set as the deadline passes is still returned.
    """
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        expired = time.monotonic() >= deadline  # decided before looking: the last look is after it
        if _store_call(lambda: store.check([key]), what, where):
            return _store_call(lambda: store.get(key), what, where)
        if key != FAILED_KEY and _store_call(lambda: store.check([FAILED_KEY]), what, where):
            reason = _store_call(lambda: store.get(FAILED_KEY), what, where).decode(errors="replace")
            raise FastPSConnectionError(f"fastps: stopped waiting for {what}: {reason}")
        if expired:
            raise FastPSTimeoutError(
                f"fastps: timed out after {timeout:.0f}s waiting for {what} (store key {key!r}); "
                "is every process of the job running? Raise FASTPS_TIMEOUT if startup is slow")
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(0.2, pause * 2)


def store_barrier(store, name: str, parties: int, timeout: float, what: str, *,
                  where: Optional[str] = None) -> None:
    """Block until `parties` processes reached barrier `name` (errors as :func:`store_get`)."""
    n = _store_call(lambda: store.add(f"barrier/{name}", 1), what, where)
    if n == parties:
        _store_call(lambda: store.set(f"barrier/{name}/done", b"1"), what, where)
    store_get(store, f"barrier/{name}/done", timeout, what, where=where)


def _is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address (127/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


_warned_secret = False


def warn_if_secret_exposed(cfg: ClusterConfig) -> None:
    """Warn (once per process) that the generated job secret is published in a rendezvous
    store other hosts reach: called by rank 0 when ``FASTPS_SECRET`` is not set."""
    global _warned_secret
    if _warned_secret or _is_loopback(cfg.master_addr):
        return
    _warned_secret = True
    warnings.warn(
        f"fastps: FASTPS_SECRET is not set, so rank 0 publishes the job's generated secret in the "
        f"rendezvous store at {cfg.master_addr}:{cfg.master_port}, which torch serves without "
        "authentication: anyone who can reach that port can read it and connect to the parameter "
        "servers. On a shared network set FASTPS_SECRET to the same random value in every process "
        "of the job (docs/distributed.md, \"Secret\")", stacklevel=3)


def _uncaught_error() -> Optional[str]:
    """At exit: the exception the interpreter is exiting with, as one line, or None.

    Python records an exception that ends the program in ``sys.last_exc``
    (3.12+) / ``sys.last_value`` before it runs atexit handlers."""
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if exc is None:
        return None
    line = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {line}"[:300]


class Cluster:
    """This process's place in a distributed job: its server (if colocated) and client."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.config = cfg
        _config.apply_process_settings(cfg)
        self.rank = cfg.rank
        self.world_size = cfg.world_size
        self.store, self._raw_store = open_store(cfg)
        self.store_addr = f"{cfg.master_addr}:{cfg.master_port}"
        self.secret = self._exchange_secret()
        self.server: Optional[_C.PsServer] = None
        if cfg.colocate:
            self.server = _C.PsServer(cfg.rank, cfg.world_size, num_shards=cfg.num_shards,
                                      staleness=cfg.staleness, host=cfg.bind, port=0,
                                      secret=self.secret, timeout_s=cfg.timeout,
                                      **_config.transport_kwargs(cfg), liveness_timeout_s=cfg.liveness_timeout,
                                      send_queue_bytes=cfg.send_queue_bytes)
            self.store.set(f"server/{cfg.rank}", f"{advertised_host(cfg)}:{self.server.port}")
        self.num_servers = (cfg.world_size if cfg.colocate else 0) + cfg.num_servers
        self.server_ids = (list(range(cfg.world_size)) if cfg.colocate else []) + \
            [cfg.world_size + i for i in range(cfg.num_servers)]
        addrs = []
        for sid in self.server_ids:
            raw = store_get(self.store, f"server/{sid}", cfg.timeout, f"parameter server {sid} to start",
                            where=self.store_addr).decode()
            host, port = raw.rsplit(":", 1)
            addrs.append((host, int(port)))
        self.client = _C.PsClient(cfg.rank, secret=self.secret, timeout_s=cfg.timeout,
                                  chunk_bytes=cfg.chunk_bytes, connections_per_peer=cfg.connections,
                                  **_config.transport_kwargs(cfg), liveness_timeout_s=cfg.liveness_timeout)
        self.client.connect(addrs)
        if self.server is not None:
            # The colocated server is reached without the socket (Note [Local requests]).
            self.client.attach_local(self.server, self.server_ids.index(cfg.rank))
        self._next_id = 0
        self._next_table = 0
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self._at_exit)

    def _exchange_secret(self) -> str:
        s = self.config.secret
        if s:
            return s
        if self.rank == 0:
            warn_if_secret_exposed(self.config)
            s = secrets.token_hex(32)
            self.store.set("secret", s)
            return s
        return store_get(self.store, "secret", self.config.timeout, "rank 0 to publish the job secret",
                         where=self.store_addr).decode()

    def next_tensor_id(self) -> int:
        """Ids in registration order: equal on every rank that runs the same script."""
        with self._lock:
            self._next_id += 1
            return self._next_id

    def next_table_id(self) -> int:
        """Sparse table ids in creation order (their own namespace on the servers): equal on every
        rank that builds the same embeddings in the same order."""
        with self._lock:
            self._next_table += 1
            return self._next_table

    def barrier(self, name: str, what: str) -> None:
        store_barrier(self.store, name, self.world_size, self.config.timeout, what, where=self.store_addr)

    def shutdown(self, *, failed: Optional[str] = None) -> None:
        """Leave the job, then close this process's server and connections.

        Normally waits for every rank to arrive (at most ``min(FASTPS_TIMEOUT, 60)``
        seconds), so that no colocated server disappears while another rank still
        needs it; the wait ends early when another rank failed or the store is gone.
        With ``failed`` (why this process is failing) it does not wait: it publishes
        the failure for the others (Note [Job failure marker]) and leaves. (A store
        ``set`` awaits no reply, so even a frozen store host cannot hold it up.)
        """
        if self._closed:
            return
        self._closed = True
        if failed is not None:
            try:
                self.store.set(FAILED_KEY, f"rank {self.rank} failed ({failed})".encode())
            except Exception:  # noqa: BLE001 - the store is gone too: nobody is left to tell
                pass
        else:
            try:
                store_barrier(self.store, "shutdown", self.world_size, min(self.config.timeout, 60.0),
                              "every rank to finish", where=self.store_addr)
                self._leave_store()
            except Exception as e:  # noqa: BLE001 - a peer failed, or the store is gone: leave anyway
                print(f"fastps: rank {self.rank} leaves without waiting for the others: {e}",
                      file=sys.stderr, flush=True)
        self.client = None  # holds the colocated server (attach_local), which goes with it
        self.server = None

    def _leave_store(self) -> None:
        """After the shutdown barrier: the store's host stays (at most 5 s) until every other
        rank has seen the barrier end, so none of them finds the store gone instead."""
        n = _store_call(lambda: self.store.add("barrier/shutdown/left", 1), "every rank to leave",
                        self.store_addr)
        if not hosts_store(self.config):
            return
        deadline = time.monotonic() + 5.0
        while n < self.world_size and time.monotonic() < deadline:
            time.sleep(0.01)
            n = _store_call(lambda: self.store.add("barrier/shutdown/left", 0), "every rank to leave",
                            self.store_addr)

    def _at_exit(self) -> None:
        # An uncaught exception fails the job: skip the barrier (see shutdown).
        self.shutdown(failed=_uncaught_error())


_cluster: Optional[Cluster] = None
_cluster_lock = threading.Lock()


def cluster() -> Optional[Cluster]:
    """The process's Cluster in the distributed mode (created on first use), else None."""
    global _cluster
    if _cluster is not None:
        return _cluster
    if not is_distributed_env():
        return None
    with _cluster_lock:
        if _cluster is None:
            _cluster = Cluster(config_from_env())
    return _cluster


def reset_for_tests() -> None:
    global _cluster
    if _cluster is not None:
        _cluster.shutdown()
    _cluster = None
