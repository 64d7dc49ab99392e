"""The one configuration resolver: keyword argument, then environment variable, then default.

Every setting of fastps, for the embedded and the distributed mode alike, is
declared once in :data:`SETTINGS` with its keyword, its ``FASTPS_*`` variable,
its type, its default and the values it allows. :func:`resolve` applies the one
rule (a keyword argument that is not None wins, then a non-empty environment
variable, then the default) and checks the result; a bad value raises
:class:`fastps.InvalidArgumentError` naming the keyword or the variable it came
from and what is allowed. docs/configuration.md lists the same table for users.

Keyword arguments given to :func:`fastps.init` are kept process-wide
(:func:`set_keywords`) so that the distributed mode, whose cluster is created on
first use, resolves them with the same rule.

The job's identity (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
comes from the launcher (torchrun) and has no keyword; it is parsed here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from . import _C
from .errors import InvalidArgumentError


@dataclass(frozen=True)
class Setting:
    """One setting: ``keyword`` (None: environment only), ``env``, ``kind``, ``default``,
    ``check`` (True for an allowed value) and ``allowed`` (those values in words)."""

    keyword: Optional[str]
    env: str
    kind: type
    default: Any
    allowed: str
    check: Callable[[Any], bool] = lambda v: True


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# FASTPS_TRANSPORT's values (docs/configuration.md).
TRANSPORTS = ("auto", "tcp", "shm", "ucx")


def _liveness_ok(v: float) -> bool:
    return v == 0 or 0.1 <= v <= 1e6


def _shm_ring_ok(v: int) -> bool:
    return _C.SHM_MIN_RING_BYTES <= v <= _C.SHM_MAX_RING_BYTES


def _settings() -> Dict[str, Setting]:
    s = [
        # embedded and distributed mode
        Setting("num_shards", "FASTPS_NUM_SHARDS", int, 0,
                "an integer >= 0 (0: one shard thread per hardware thread, at most 8)", lambda v: v >= 0),
        Setting("chunk_bytes", "FASTPS_CHUNK_BYTES", int, 4 << 20, "an integer >= 4096", lambda v: v >= 4096),
        Setting("timeout", "FASTPS_TIMEOUT", float, 300.0, "a number of seconds > 0", lambda v: v > 0),
        Setting("huge_pages", "FASTPS_HUGE_PAGES", bool, True, "1/true/yes/on or 0/false/no/off"),
        Setting("prefault", "FASTPS_PREFAULT", bool, True, "1/true/yes/on or 0/false/no/off"),
        # distributed mode
        Setting("staleness", "FASTPS_STALENESS", int, 0, "-1 (ASP), 0 (BSP) or k > 0 (SSP)", lambda v: v >= -1),
        Setting("num_servers", "FASTPS_NUM_SERVERS", int, 0, "an integer >= 0", lambda v: v >= 0),
        Setting("colocate", "FASTPS_COLOCATE", bool, True, "1/true/yes/on or 0/false/no/off"),
        Setting("bind", "FASTPS_BIND", str, "127.0.0.1", "an address to listen on"),
        Setting("advertise", "FASTPS_ADVERTISE", str, None, "an address other hosts reach this one by"),
        Setting("secret", "FASTPS_SECRET", str, None, "the job's shared secret"),
        Setting("connections", "FASTPS_CONNECTIONS", int, 1, "an integer >= 1", lambda v: v >= 1),
        Setting("transport", "FASTPS_TRANSPORT", str, "auto",
                "auto (shared memory between processes of one host, UCX between hosts with RDMA devices, "
                "TCP otherwise), tcp, shm or ucx",
                lambda v: v in TRANSPORTS),
        Setting("shm_ring_bytes", "FASTPS_SHM_RING_BYTES", int, 4 << 20,
                f"an integer between {_C.SHM_MIN_RING_BYTES} and {_C.SHM_MAX_RING_BYTES}", _shm_ring_ok),
        Setting("shm_spin_us", "FASTPS_SHM_SPIN_US", int, -1,
                "an integer >= 0 (microseconds), or -1 to let fastps pick", lambda v: v >= -1),
        Setting("shm_yield_us", "FASTPS_SHM_YIELD_US", int, -1,
                "an integer >= 0 (microseconds), or -1 to let fastps pick", lambda v: v >= -1),
        Setting("overlap", "FASTPS_OVERLAP", bool, True, "1/true/yes/on or 0/false/no/off"),
        Setting("liveness_timeout", "FASTPS_LIVENESS_TIMEOUT", float, 30.0,
                "0 (off) or between 0.1 and 1e6 seconds", _liveness_ok),
        Setting("send_queue_bytes", "FASTPS_SEND_QUEUE_BYTES", int, 4 << 30, "an integer >= 65536",
                lambda v: v >= 64 << 10),
        # the job (set by torchrun; no keyword)
        Setting(None, "WORLD_SIZE", int, 1, "an integer >= 1", lambda v: v >= 1),
        Setting(None, "RANK", int, 0, "an integer >= 0", lambda v: v >= 0),
        Setting(None, "MASTER_ADDR", str, None, "the rendezvous store's host"),
        Setting(None, "MASTER_PORT", int, 0, "a port between 1 and 65535", lambda v: 0 <= v <= 65535),
    ]
    return {x.keyword or x.env: x for x in s}


SETTINGS: Dict[str, Setting] = _settings()

# Keywords fastps.init() accepts: every setting that has one.
KEYWORDS = tuple(k for k, s in SETTINGS.items() if s.keyword is not None)

# Keyword arguments of the last fastps.init() call (only those given).
_keywords: Dict[str, Any] = {}


def _parse(s: Setting, raw: str) -> Any:
    """The environment variable's text as ``s.kind`` (whitespace and, for words, case ignored)."""
    text = raw.strip()
    if s.kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError
    if s.kind is str:
        return text.lower() if s.keyword == "transport" else text
    return s.kind(text)


def _convert(s: Setting, value: Any) -> Any:
    """A keyword argument as ``s.kind``; ValueError for a value of another kind."""
    if s.kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if s.kind is str:
        if not isinstance(value, str):
            raise ValueError
        return value.strip().lower() if s.keyword == "transport" else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError
    if s.kind is int and value != int(value):
        raise ValueError
    return s.kind(value)


def resolve(name: str, value: Any = None, *, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The value of setting ``name`` (a keyword, or the variable of an environment-only setting).

    ``value`` (a keyword argument; None: not given) wins, then a non-empty
    environment variable, then the default; the result is checked.

    Raises:
        fastps.InvalidArgumentError: the value is not allowed; the message names
            the keyword or the variable it came from and what is allowed.
    """
    s = SETTINGS[name]
    env = os.environ if environ is None else environ
    allowed = s.allowed
    if value is not None:
        given = f"{s.keyword or s.env}={value!r}"
        if s.kind is bool:
            allowed = "True or False"
        try:
            out = _convert(s, value)
        except (TypeError, ValueError):
            out = None
    else:
        raw = env.get(s.env)
        if raw is None or raw.strip() == "":
            return s.default
        given = f"environment variable {s.env}={raw!r}"
        try:
            out = _parse(s, raw)
        except ValueError:
            out = None
    if out is None or not s.check(out):
        raise InvalidArgumentError(f"fastps: {given} is not allowed: it must be {allowed}")
    return out


def set_keywords(keywords: Mapping[str, Any]) -> None:
    """Keep the keyword arguments of :func:`fastps.init` (None values dropped) for every
    later resolution in this process; replaces those of an earlier call."""
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise InvalidArgumentError(f"fastps: unknown setting(s) {', '.join(unknown)}; "
                                   f"the settings are {', '.join(KEYWORDS)}")
    _keywords.clear()
    _keywords.update({k: v for k, v in keywords.items() if v is not None})


def resolve_all(names=KEYWORDS, overrides: Optional[Mapping[str, Any]] = None, *,
                keep: bool = True) -> Dict[str, Any]:
    """``{name: value}`` for ``names``: ``overrides`` (None: not given), then (with ``keep``)
    the keywords of the last :func:`fastps.init`, then the environment, then the defaults."""
    over = overrides or {}
    kept = _keywords if keep else {}
    out = {}
    for n in names:
        v = over.get(n)
        out[n] = resolve(n, v if v is not None else kept.get(n))
    return out


def is_distributed() -> bool:
    """True when this process is one rank of several (``WORLD_SIZE`` > 1, as torchrun sets)."""
    return resolve("WORLD_SIZE") > 1


# Note [Settings the native core takes]
# The native core reads no environment variable: huge_pages, prefault,
# shm_spin_us and shm_yield_us are resolved here like every other setting, and
# the two functions below are the only places that hand them to it
# (_C.set_huge_pages / _C.set_populate_ahead for the process, keyword
# arguments shm_spin_us / shm_yield_us wherever a transport is made).


def apply_process_settings(cfg: Any) -> None:
    """Hand the process-wide native settings (``huge_pages``, ``prefault``) of ``cfg`` to the core."""
    _C.set_huge_pages(bool(cfg.huge_pages))
    _C.set_populate_ahead(bool(cfg.prefault))


def transport_kwargs(cfg: Any) -> Dict[str, Any]:
    """Keyword arguments of ``_C.PsServer``/``_C.PsClient`` for ``cfg``'s transport settings."""
    return dict(transport=cfg.transport, shm_ring_bytes=cfg.shm_ring_bytes, shm_spin_us=cfg.shm_spin_us,
                shm_yield_us=cfg.shm_yield_us)
