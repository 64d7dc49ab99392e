"""Where the rows of a ``fastps.nn`` embedding live: one small interface, one backend per mode.

A module talks to its table only through :class:`SparseBackend` (pull, push,
save, load, size, stats, step). :func:`make_backend` picks the implementation:
the embedded, in-process :class:`EmbeddedTable` (a ``_C.SparseTable`` on the
shard threads of ``_runtime.embedded().server``), or, in the distributed mode
(``WORLD_SIZE`` > 1, see ``fastps._cluster``), :class:`RemoteTable`: the rows
spread over every parameter server of the job, reached through the rank's
``_C.PsClient`` (docs/sparse.md "Distributed mode", docs/protocol.md "Sparse
tables").

Tensors reach the native table as (address, count) after the checks here
(int64 ids, float32 rows, contiguous, on the CPU), as in ``fastps._tensor``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol

import torch

from .. import _C, _cluster, _runtime

__all__ = [
    "TableSpec",
    "SparseBackend",
    "EmbeddedTable",
    "RemoteTable",
    "make_backend",
    "read_file_header",
]


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
    ``pull_scatter(ids, first, next_, out)`` (optional; the embedded table has
    it): the same rows written to every position of their chains in ``out``.
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
        self._table = _C.SparseTable(rt.server, spec.dim, **_table_kwargs(spec), timeout_s=rt.config.timeout)

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
            self._table.pull(ids.data_ptr(), n, out.data_ptr(), out.numel())
        return out

    def pull_scatter(self, ids: torch.Tensor, first: torch.Tensor, next_: torch.Tensor, out: torch.Tensor) -> None:
        """Like pull(), but the row of ids[i] goes to rows first[i], next_[first[i]], ... (-1
        ends) of ``out`` (n x dim): a batch's rows written straight into the lookup's output."""
        _check_ids(ids)
        n = ids.numel()
        assert first.dtype == next_.dtype == torch.int64 and first.numel() == n and first.is_contiguous()
        assert next_.is_contiguous() and out.dtype == torch.float32 and out.is_contiguous()
        assert next_.numel() * self.spec.dim == out.numel()
        if n:
            self._table.pull_scatter(ids.data_ptr(), n, first.data_ptr(), next_.data_ptr(), next_.numel(),
                                     out.data_ptr(), out.numel())

    def push(self, ids: torch.Tensor, grads: torch.Tensor, optim: Any, step: int) -> None:
        _check_ids(ids)
        n = ids.numel()
        assert grads.dtype == torch.float32 and grads.is_contiguous() and tuple(grads.shape) == (n, self.spec.dim)
        self._table.push(ids.data_ptr() if n else 0, n, grads.data_ptr() if n else 0, grads.numel(), optim, step)

    def save(self, path: str) -> None:
        self._table.save(path)

    def load(self, path: str) -> None:
        self._table.load(path)

    def size(self) -> int:
        return self._table.size()

    def stats(self) -> Dict[str, int]:
        return dict(self._table.stats())


def _table_kwargs(spec: TableSpec) -> Dict[str, Any]:
    """The table settings of ``spec`` as keywords of ``_C.SparseTable``/``_C.SparseTableConfig``."""
    return dict(seed=spec.seed, init=spec.init, init_a=spec.init_a, init_b=spec.init_b, rule=spec.rule,
                max_rows=spec.max_rows,
                eviction=spec.eviction if spec.eviction is not None else _C.SparseEviction.NONE,
                ttl_steps=spec.ttl_steps, admit_threshold=spec.admit_threshold, max_pending=spec.max_pending)


def _config(spec: TableSpec) -> Any:
    return _C.SparseTableConfig(spec.dim, **_table_kwargs(spec))


class RemoteTable:
    """A table spread over the parameter servers of a distributed job (one per module and rank).

    Every rank builds the same modules in the same order, so the k-th table a
    rank creates has id k on every rank, and the servers' idempotent
    ``SPARSE_CREATE`` makes the ranks' creations one table. Ids are split over
    the servers by a hash and over each server's shards by another
    (docs/protocol.md "Sparse tables").

    Steps: this rank counts its pushes (``step``); a pull asks for rows that
    reflect that step (under BSP: every worker's gradients of it, averaged and
    applied once per id). Pushes are sent at ``step()`` and confirmed lazily:
    the next pull, ``size``, ``stats``, ``save`` or ``load`` waits for them and
    raises their errors. Every wait has the job's deadline (``FASTPS_TIMEOUT``).

    Args:
        spec: the table's settings.
        replaces: a RemoteTable of the same module whose table this one takes
            over (same id) with ``spec`` (the module's provisional rule
            replaced at its first step, or a load): nothing is sent until the
            first call, which creates with replacement (a load sends the
            file's rows and spec instead).
    """

    # A BSP round needs every worker's push: fastps.optim pushes this table at
    # every step of an optimizer that holds the module, with no rows if it has none.
    needs_every_step = True

    def __init__(self, spec: TableSpec, *, replaces: Optional["RemoteTable"] = None) -> None:
        cl = _cluster.cluster()
        assert cl is not None
        self.spec = spec
        self._client = cl.client
        self._config = _config(spec)  # validates
        self._inflight: List[Any] = []
        # The table's step is the C++ client's, by table id (Note [Round clocks]): a
        # backend that replaces another on the same table continues its step.
        if replaces is None:
            self._id = cl.next_table_id()
            self._client.sparse_create(self._id, self._config, False).wait()
            self._created = True
        else:
            self._id = replaces._id
            replaces._flush()
            self._created = False

    @property
    def table_id(self) -> int:
        return self._id

    @property
    def rule(self) -> Any:
        return self.spec.rule

    @property
    def step(self) -> int:
        return self._client.sparse_step(self._id)

    def _ensure(self) -> None:
        if not self._created:
            self._client.sparse_create(self._id, self._config, True).wait()
            self._created = True

    def _flush(self) -> None:
        """Wait for the pushes sent so far; raise the first one's error."""
        inflight, self._inflight = self._inflight, []
        for f in inflight:
            f.wait()

    def pull(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(ids)
        self._ensure()
        self._flush()
        n = ids.numel()
        out = torch.empty(n, self.spec.dim, dtype=torch.float32)
        if n:
            self._client.sparse_pull(self._id, ids.data_ptr(), n, self.spec.dim, out.data_ptr(), out.numel(),
                                     self.step).wait()
        return out

    def push(self, ids: torch.Tensor, grads: torch.Tensor, optim: Any, step: int) -> None:
        _check_ids(ids)
        n = ids.numel()
        assert grads.dtype == torch.float32 and grads.is_contiguous() and tuple(grads.shape) == (n, self.spec.dim)
        assert step == self.step + 1, (step, self.step)
        self._ensure()
        # Under BSP a server takes step t + 1 only once step t is applied; a rank
        # that stepped without pulling in between (its batch missed the module)
        # must not run ahead. Normally the forward's pull has waited already.
        self._flush()
        # The frames are written (or copied for the colocated server) before this returns.
        f = self._client.sparse_push(self._id, ids.data_ptr() if n else 0, n, self.spec.dim,
                                     grads.data_ptr() if n else 0, grads.numel(), optim, step)
        self._inflight.append(f)

    def save(self, path: str) -> None:
        self._ensure()
        self._flush()
        self._client.sparse_save(self._id, self._config, self.step, path)

    def load(self, path: str) -> None:
        self._flush()
        self._client.sparse_load(self._id, self._config, path)
        self._created = True

    def size(self) -> int:
        return self.stats()["rows"]

    def stats(self) -> Dict[str, int]:
        self._ensure()
        self._flush()
        s = dict(self._client.sparse_stats(self._id, self.step))
        s.pop("step", None)
        return s


def make_backend(spec: TableSpec, *, replaces: Optional[SparseBackend] = None) -> SparseBackend:
    """The backend for this process's mode (see the module docstring).

    ``replaces``: the module's current backend, when the new one takes over
    its table (a provisional rule replaced at the first step, or a load). The
    embedded mode then simply builds a new table; the distributed mode keeps
    the table id, which must stay equal on every rank.
    """
    if _cluster.is_distributed_env():
        return RemoteTable(spec, replaces=replaces if isinstance(replaces, RemoteTable) else None)
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
