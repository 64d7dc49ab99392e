"""Where the rows of a ``fastps.nn`` embedding live: one small interface, one backend per mode.

A module talks to its table only through :class:`SparseBackend` (pull, push,
save, load, size, stats, step). :func:`make_backend` picks the implementation:
today the embedded, in-process :class:`EmbeddedTable` (a ``_C.SparseTable`` on
the shard threads of ``_runtime.embedded().server``); the distributed mode will
add a remote client with the same five calls. Until then a module built under
``torchrun`` raises :class:`DistributedNotSupportedError`.

Tensors reach the native table as (address, count) after the checks here
(int64 ids, float32 rows, contiguous, on the CPU), as in ``fastps._tensor``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol

import torch

from .. import _C, _cluster, _runtime
from ..errors import FastPSError

__all__ = [
    "DistributedNotSupportedError",
    "TableSpec",
    "SparseBackend",
    "EmbeddedTable",
    "make_backend",
    "check_supported",
    "read_file_header",
]


class DistributedNotSupportedError(FastPSError, NotImplementedError):
    """``fastps.nn`` embeddings do not run in the distributed (torchrun) mode yet."""


@dataclass(frozen=True)
class TableSpec:
    """Everything needed to create a table (the module's constructor arguments, resolved)."""

    dim: int
    rule: Any  # _C.SparseRule: fixes the optimizer state layout of every row
    init: Any  # _C.SparseInit
    init_a: float  # uniform: low; normal: mean
    init_b: float  # uniform: high; normal: std
    seed: int
    max_rows: int = 0
    eviction: Any = None  # _C.SparseEviction (None: NONE)
    ttl_steps: int = 0
    admit_threshold: int = 0
    max_pending: int = 1 << 20


class SparseBackend(Protocol):
    """The calls a module makes on its table. Every tensor is on the CPU.

    ``pull(ids)``: ids int64[n] (unique) -> float32[n, dim]; never creates rows.
    ``push(ids, grads, optim, step)``: one optimizer step on unique ids with
    float32[n, dim] gradients at table step ``step`` (the previous step + 1).
    """

    spec: TableSpec

    @property
    def rule(self) -> Any: ...
    @property
    def step(self) -> int: ...
    def pull(self, ids: torch.Tensor) -> torch.Tensor: ...
    def push(self, ids: torch.Tensor, grads: torch.Tensor, optim: Any, step: int) -> None: ...
    def save(self, path: str) -> None: ...
    def load(self, path: str) -> None: ...
    def size(self) -> int: ...
    def stats(self) -> Dict[str, int]: ...


def _check_ids(ids: torch.Tensor) -> None:
    # Internal contract: the module has validated the user's ids already.
    assert ids.dtype == torch.int64 and ids.dim() == 1 and ids.is_contiguous() and ids.device.type == "cpu"


class EmbeddedTable:
    """A ``_C.SparseTable`` on the embedded server's shard threads (single-process mode)."""

    def __init__(self, spec: TableSpec) -> None:
        rt = _runtime.embedded()
        self.spec = spec
        self._table = _C.SparseTable(
            rt.server, spec.dim, seed=spec.seed, init=spec.init, init_a=spec.init_a, init_b=spec.init_b,
            rule=spec.rule, max_rows=spec.max_rows,
            eviction=spec.eviction if spec.eviction is not None else _C.SparseEviction.NONE,
            ttl_steps=spec.ttl_steps, admit_threshold=spec.admit_threshold, max_pending=spec.max_pending,
            timeout_s=rt.config.timeout,
        )

    @property
    def rule(self) -> Any:
        return self._table.rule

    @property
    def step(self) -> int:
        return self._table.step

    def pull(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(ids)
        n = ids.numel()
        out = torch.empty(n, self.spec.dim, dtype=torch.float32)
        if n:
            self._table.pull(ids.data_ptr(), n, out.data_ptr())
        return out

    def push(self, ids: torch.Tensor, grads: torch.Tensor, optim: Any, step: int) -> None:
        _check_ids(ids)
        n = ids.numel()
        assert grads.dtype == torch.float32 and grads.is_contiguous() and tuple(grads.shape) == (n, self.spec.dim)
        self._table.push(ids.data_ptr() if n else 0, n, grads.data_ptr() if n else 0, optim, step)

    def save(self, path: str) -> None:
        self._table.save(path)

    def load(self, path: str) -> None:
        self._table.load(path)

    def size(self) -> int:
        return self._table.size()

    def stats(self) -> Dict[str, int]:
        return dict(self._table.stats())


def check_supported() -> None:
    """Raise :class:`DistributedNotSupportedError` in the distributed mode."""
    if _cluster.is_distributed_env():
        raise DistributedNotSupportedError(
            "fastps.nn embeddings run only in the embedded (single-process) mode for now; this process "
            "was launched as one rank of several (WORLD_SIZE > 1). Train the embedding in a single "
            "process, or use torch.nn.Embedding(sparse=True) with torch.optim.SparseAdam under torchrun"
        )


def make_backend(spec: TableSpec) -> SparseBackend:
    """The backend for this process's mode (see the module docstring)."""
    check_supported()
    return EmbeddedTable(spec)


# The fixed 128-byte header of a sparse table file (docs/sparse.md "File format").
_HEADER = struct.Struct("<8sIIqqIIddQIIqqqqqqII")
_MAGIC = b"FASTPSSP"


def read_file_header(path: str) -> Optional[Dict[str, Any]]:
    """dim, rule, init, init_a, init_b, seed and step of a table file; None if it is not one.

    The full validation (checksum included) is the native load's job; this only
    reads what is needed to create a table the file can load into.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEADER.size)
    except OSError:
        return None
    if len(raw) != _HEADER.size:
        return None
    (magic, _version, _hbytes, dim, _state, rule, init, init_a, init_b, seed,
     _ev, _samples, _max_rows, _ttl, _admit, _pending, step, _rec, _nsec, _zero) = _HEADER.unpack(raw)
    if magic != _MAGIC:
        return None
    try:
        rule_e, init_e = _C.SparseRule(rule), _C.SparseInit(init)
    except (ValueError, TypeError):
        return None
    if rule_e.name not in _C.SparseRule.__members__ or init_e.name not in _C.SparseInit.__members__:
        return None
    return {"dim": dim, "rule": rule_e, "init": init_e, "init_a": init_a, "init_b": init_b,
            "seed": seed, "step": step}
