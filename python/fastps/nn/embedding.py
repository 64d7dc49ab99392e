"""``fastps.nn.Embedding`` and ``EmbeddingBag``: rows in a server-side hash table.

Design (docs/sparse.md, "fastps.nn"):

* Forward deduplicates the batch's ids (unique ids in order of first
  appearance and the inverse index, see ``_dedup``), pulls only the unique rows
  from the table, and gathers them by the inverse (``_gather``). For
  ``Embedding`` pull and gather are one custom autograd Function (``_Lookup``)
  whose only differentiable input is the module's *handle*, a 0-element
  parameter that puts the module in ``model.parameters()`` (so
  ``fastps.optim.Adam(model.parameters())`` sees it) and the lookup in the
  autograd graph. ``EmbeddingBag`` pulls through ``_PullRows`` (the rows are the
  differentiable output) and reduces them with ``F.embedding_bag``.
* Backward sums the output gradient per unique id on the worker
  (``_segment_sum``; for ``EmbeddingBag`` torch's ``embedding_bag`` backward
  does it) and stashes (unique ids, gradient rows) on the module; gradients of
  several backward passes before one step (accumulation, or a module called
  twice) are concatenated and deduplicated again at push time, so they sum per
  id. The three helpers are C++ loops on the calling thread (Note
  [Worker-side embedding ops] in csrc/table/embedding_ops.h).
* ``fastps.optim`` pushes the stash at ``step()`` (``_grads``) with the param
  group's hyperparameters and the sparse counterpart of its rule
  (``_rules``); the table applies the fused update on its shard threads and
  counts one table step.
* The table's rule fixes its state layout. With ``optimizer=None`` the module
  starts with a provisional ``SGD`` table (no state; before the first push it
  holds no rows, so nothing can be lost) and replaces it with an empty table
  of the right rule at the first push. After that, or after loading a trained
  checkpoint, the rule is fixed. ``optimizer=...`` fixes it at construction.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _C
from ..errors import FastPSError, InvalidArgumentError
from . import _backend, _grads, _rules

__all__ = ["Embedding", "EmbeddingBag"]

_INITS = {"uniform": _C.SparseInit.UNIFORM, "normal": _C.SparseInit.NORMAL, "zeros": _C.SparseInit.ZEROS}
_EVICTIONS = {
    "none": _C.SparseEviction.NONE,
    "lru": _C.SparseEviction.LRU,
    "lfu": _C.SparseEviction.LFU,
    "ttl": _C.SparseEviction.TTL,
}
_EXTRA_STATE_FORMAT = "fastps.nn.sparse_table/1"


class SparseHandle(nn.Parameter):
    """The 0-element placeholder parameter of a ``fastps.nn`` embedding.

    It carries no values: its only job is to appear in ``model.parameters()``
    and in the autograd graph. ``fastps.optim`` recognises it (the marker
    attribute also survives pickling, which turns it into a plain Parameter)
    and trains the module's rows instead.
    """

    _fastps_sparse_handle = True


def _new_handle() -> nn.Parameter:
    h = SparseHandle(torch.empty(0, dtype=torch.float32), requires_grad=True)
    h._fastps_sparse_handle = True  # instance attribute: kept by pickling
    return h


def _handle_grad(ctx: Any) -> torch.Tensor:
    # A 0-element gradient for the handle: its .grad being set (and cleared by
    # zero_grad) is how forward() tells accumulation from a missed step.
    return torch.zeros(0, dtype=ctx.handle_dtype)


class _PullRows(torch.autograd.Function):
    """rows = table[uids]; backward stashes d(loss)/d(rows) on the module for the next step."""

    @staticmethod
    def forward(ctx: Any, handle: torch.Tensor, module: "_SparseEmbedding", uids: torch.Tensor,
                pad_pos: Optional[int]) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(uids)
        ctx.pad_pos = pad_pos
        ctx.handle_dtype = handle.dtype
        return module._pull(uids, pad_pos)

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None]:
        # Not once_differentiable: under create_graph (a gradient penalty over
        # model.parameters()) the handle's constant gradient must stay usable.
        # The rows' gradient leaves the graph here (the table has no second
        # derivative), so no_grad.
        (uids,) = ctx.saved_tensors
        with torch.no_grad():
            ctx.module._stash(uids, grad_rows, ctx.pad_pos)
        return _handle_grad(ctx), None, None, None


class _Lookup(torch.autograd.Function):
    """out = table[uids][inverse]; backward sums d(loss)/d(out) per unique id and stashes it."""

    @staticmethod
    def forward(ctx: Any, handle: torch.Tensor, module: "_SparseEmbedding", uids: torch.Tensor,
                inverse: torch.Tensor, pad_pos: Optional[int]) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(uids, inverse)
        ctx.pad_pos = pad_pos
        ctx.handle_dtype = handle.dtype
        return module._lookup_rows(uids, inverse, pad_pos)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None]:
        uids, inverse = ctx.saved_tensors  # see _PullRows.backward
        with torch.no_grad():
            ctx.module._stash(uids, _segment_sum(grad_out, inverse, uids.numel()), ctx.pad_pos)
        return _handle_grad(ctx), None, None, None, None


def _native(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    # Internal contract of the C++ loops (they trust the pointers they get).
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise FastPSError(f"fastps.nn internal error: {what} must be a contiguous {dtype} CPU tensor, got "
                          f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}")


def _dedup(ids: torch.Tensor, sort: bool = False) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """(unique ids, int64 inverse with ids' shape, smallest id, largest id) of an
    int64 CPU tensor. One hash pass in C++: unique ids in order of first
    appearance (0.17 ms for the benchmark's 16384 ids, ``np.unique`` 0.5-0.6
    ms); ``sort=True`` sorts them (0.28 ms), so that the inverse is monotone in
    the ids and their order does not depend on the order of the batch."""
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    _native(flat, torch.int64, "ids")
    n = flat.numel()
    uids = torch.empty(n, dtype=torch.int64)
    inverse = torch.empty(ids.shape, dtype=torch.int64)
    count, lo, hi = _C.embedding_unique(flat.data_ptr(), n, uids.data_ptr(), uids.numel(), inverse.data_ptr(),
                                        inverse.numel(), sort)
    # A copy when the batch repeats ids: the slice alone would keep all n slots alive.
    return (uids[:count].clone() if count < n // 2 else uids[:count]), inverse, lo, hi


def _gather(rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``rows[inverse]`` as ``inverse.shape + (dim,)``; rows: contiguous float32 (n_unique, dim)."""
    _native(rows, torch.float32, "rows")
    _native(inverse, torch.int64, "inverse")
    dim = rows.shape[1]
    out = torch.empty(*inverse.shape, dim, dtype=torch.float32)
    _C.embedding_gather(rows.data_ptr(), rows.numel(), inverse.data_ptr(), inverse.numel(), dim, out.data_ptr(),
                        out.numel())
    return out


def _chains(inverse: torch.Tensor, n_unique: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(first, next): each unique id's positions in the batch as a chain (-1 ends)."""
    _native(inverse, torch.int64, "inverse")
    first = torch.empty(n_unique, dtype=torch.int64)
    nxt = torch.empty(inverse.numel(), dtype=torch.int64)
    _C.embedding_chains(inverse.data_ptr(), inverse.numel(), n_unique, first.data_ptr(), first.numel(),
                        nxt.data_ptr(), nxt.numel())
    return first, nxt


def _segment_sum(grads: torch.Tensor, inverse: torch.Tensor, n_unique: int) -> torch.Tensor:
    """``(n_unique, dim)`` float32 sums of the rows of ``grads`` (``inverse.shape + (dim,)``) per
    ``inverse`` value, in row order from +0.0 (a sequential ``index_add_`` into zeros)."""
    dim = grads.shape[-1]
    g = grads.detach().reshape(-1, dim)
    if g.dtype != torch.float32 or g.device.type != "cpu":
        g = g.to("cpu", torch.float32)
    if not g.is_contiguous():
        g = g.contiguous()
    _native(inverse, torch.int64, "inverse")
    if g.shape[0] != inverse.numel():
        raise FastPSError(f"fastps.nn internal error: {g.shape[0]} gradient rows for {inverse.numel()} ids")
    out = torch.empty(n_unique, dim, dtype=torch.float32)
    _C.embedding_segment_sum(g.data_ptr(), g.numel(), inverse.data_ptr(), g.shape[0], dim, n_unique,
                             out.data_ptr(), out.numel())
    return out


class _SparseEmbedding(nn.Module):
    """Shared machinery of :class:`Embedding` and :class:`EmbeddingBag`."""

    _kind = "Embedding"

    def __init__(
        self,
        embedding_dim: int,
        *,
        num_embeddings: Optional[int] = None,
        optimizer: Union[None, str, Any] = None,
        init: str = "uniform",
        init_range: Union[float, Tuple[float, float]] = 0.05,
        mean: float = 0.0,
        std: float = 1.0,
        seed: int = 0,
        max_rows: int = 0,
        eviction: str = "none",
        ttl_steps: int = 0,
        admit_threshold: int = 0,
        max_pending: int = 1 << 20,
        padding_idx: Optional[int] = None,
    ) -> None:
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise InvalidArgumentError(f"fastps.nn: embedding_dim must be a positive int, got {embedding_dim!r}")
        if num_embeddings is not None and (isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int)
                                           or num_embeddings < 1):
            raise InvalidArgumentError(
                f"fastps.nn: num_embeddings must be None (any int64 id) or a positive int, got {num_embeddings!r}")
        if init not in _INITS:
            raise InvalidArgumentError(f"fastps.nn: init must be one of {sorted(_INITS)}, got {init!r}")
        if init == "uniform":
            if isinstance(init_range, (tuple, list)):
                if len(init_range) != 2:
                    raise InvalidArgumentError(f"fastps.nn: init_range must be r or (low, high), got {init_range!r}")
                a, b = float(init_range[0]), float(init_range[1])
            else:
                a, b = -float(init_range), float(init_range)
        elif init == "normal":
            a, b = float(mean), float(std)
        else:
            a, b = 0.0, 0.0
        if eviction not in _EVICTIONS:
            raise InvalidArgumentError(f"fastps.nn: eviction must be one of {sorted(_EVICTIONS)}, got {eviction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise InvalidArgumentError(f"fastps.nn: seed must be an int in [0, 2**64), got {seed!r}")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise InvalidArgumentError(f"fastps.nn: padding_idx must be None or an int, got {padding_idx!r}")
            if num_embeddings is not None:
                if not -num_embeddings <= padding_idx < num_embeddings:
                    raise InvalidArgumentError("fastps.nn: padding_idx must be within num_embeddings")
                padding_idx %= num_embeddings
            elif not -(1 << 63) <= padding_idx < 1 << 63:
                raise InvalidArgumentError("fastps.nn: padding_idx must be an int64 id")
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings
        self.padding_idx = padding_idx
        self._explicit = _rules.resolve_optimizer_arg(optimizer)
        explicit_rule = self._explicit.rule if isinstance(self._explicit, _C.SparseOptim) else self._explicit
        self._spec = _backend.TableSpec(
            dim=embedding_dim, rule=explicit_rule if explicit_rule is not None else _C.SparseRule.SGD,
            init=_INITS[init], init_a=a, init_b=b, seed=seed, max_rows=int(max_rows),
            eviction=_EVICTIONS[eviction], ttl_steps=int(ttl_steps), admit_threshold=int(admit_threshold),
            max_pending=int(max_pending),
        )
        # Created now so a bad option fails here (the native table validates).
        self._backend: _backend.SparseBackend = _backend.make_backend(self._spec)
        self._pending: list = []
        self.sparse_handle = _new_handle()
        if getattr(self._backend, "needs_every_step", False):
            _grads.mark_every_step(self)

    # -- public surface --------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Rows the table holds (ids pushed at least once and not evicted)."""
        return self._backend.size()

    @property
    def step_count(self) -> int:
        """Optimizer steps applied to the table (the table-wide step)."""
        return self._backend.step

    @property
    def rule(self) -> Optional[str]:
        """The sparse rule's name, or None while it is not decided yet (no step, ``optimizer=None``)."""
        b = self._backend
        return b.rule.name if (self._explicit is not None or b.step > 0) else None

    def stats(self) -> Dict[str, Any]:
        """Table counters (docs/sparse.md): rows, admitted, evicted, expired, rejected,
        pending, memory_bytes; plus ``step`` and ``rule`` (None while undecided)."""
        s: Dict[str, Any] = self._backend.stats()
        s["step"] = self._backend.step
        s["rule"] = self.rule
        return s

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The current rows of ``ids`` (any shape) as ``ids.shape + (dim,)``, without gradient.

        The replacement for ``weight``, which an unbounded table cannot have. Ids
        without a row read as their initial value; like a forward, a lookup counts
        as an access for LRU/LFU/TTL eviction.
        """
        uids, inverse, pad_pos = self._unique(ids)
        return self._lookup_rows(uids, inverse, pad_pos)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the table (rows, optimizer state, admission/eviction metadata, step)
        atomically to ``path`` (temp file, fsync, rename; SHA-256 checked on load)."""
        self._backend.save(os.fspath(path))

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Replace the table with the one in ``path`` (written by :meth:`save`).

        The file's rule, initialiser and seed replace the module's (so untouched
        ids read exactly as before); caps, eviction and admission settings stay
        the module's. On any error the live table is unchanged.

        Raises:
            fastps.errors.FastPSError: a corrupt, truncated or foreign file, or rows beyond max_rows.
            fastps.errors.InvalidArgumentError: another dim, or a rule other than this module's ``optimizer=``.
        """
        path = os.fspath(path)
        h = _backend.read_file_header(path)
        if h is None:  # not a table file: the native load says why, and changes nothing
            self._backend.load(path)
            raise FastPSError(f"fastps.nn: {path} is not a fastps sparse table file")  # pragma: no cover
        if h["dim"] != self.embedding_dim:
            raise InvalidArgumentError(
                f"fastps.nn: {path} holds rows of dim {h['dim']}, this {self._kind} has dim {self.embedding_dim}")
        fixed = self._fixed_rule()
        if fixed is not None and h["rule"] != fixed:
            raise InvalidArgumentError(
                f"fastps.nn: {path} holds {h['rule'].name} optimizer state, this {self._kind} was built with "
                f"optimizer {fixed.name}")
        spec = dataclasses.replace(self._spec, rule=h["rule"], init=h["init"], init_a=h["init_a"],
                                   init_b=h["init_b"], seed=h["seed"])
        b = _backend.make_backend(spec, replaces=self._backend)
        b.load(path)
        self._backend, self._spec = b, spec

    def discard_pending_grads(self) -> None:
        """Drop gradients stashed by backward that no optimizer step has applied yet."""
        self._pending = []
        _grads.clear_pending(self)

    # -- state -------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        """The whole table as a uint8 tensor of the :meth:`save` file (loads with weights_only=True).

        For very large tables prefer :meth:`save`/:meth:`load`: the state dict
        holds a full in-memory copy.
        """
        with tempfile.TemporaryDirectory(prefix="fastps-") as d:
            p = os.path.join(d, "table.fpst")
            self._backend.save(p)
            blob = torch.from_file(p, shared=False, size=os.path.getsize(p), dtype=torch.uint8)  # a private copy
        return {"format": _EXTRA_STATE_FORMAT, "table": blob}

    def set_extra_state(self, state: Any) -> None:
        if not (isinstance(state, dict) and state.get("format") == _EXTRA_STATE_FORMAT
                and isinstance(state.get("table"), torch.Tensor)):
            raise InvalidArgumentError(f"fastps.nn: not a {self._kind} state (expected format {_EXTRA_STATE_FORMAT!r})")
        blob = state["table"].detach().to("cpu", torch.uint8).contiguous()
        with tempfile.TemporaryDirectory(prefix="fastps-") as d:
            p = os.path.join(d, "table.fpst")
            with open(p, "wb") as f:
                f.write(memoryview(blob.numpy()))
            self.load(p)

    def __getstate__(self) -> Dict[str, Any]:
        # pickle / copy.deepcopy: the native table travels as its file image;
        # pending gradients are not copied (like .grad under deepcopy of a module).
        d = self.__dict__.copy()
        d["_fastps_table"] = self.get_extra_state()
        d["_backend"] = None
        d["_pending"] = []
        return d

    def __setstate__(self, d: Dict[str, Any]) -> None:
        table = d.pop("_fastps_table", None)
        super().__setstate__(d)
        self._backend = _backend.make_backend(self._spec)
        if getattr(self._backend, "needs_every_step", False):
            _grads.mark_every_step(self)
        if table is not None:
            self.set_extra_state(table)

    def __getattr__(self, name: str) -> Any:
        if name == "weight":
            raise AttributeError(
                f"fastps.nn.{self._kind} has no dense weight (its rows live in a server-side hash table, "
                "possibly unbounded); read rows with .lookup(ids)")
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        s = f"{self.embedding_dim}"
        if self.num_embeddings is not None:
            s += f", num_embeddings={self.num_embeddings}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self._explicit is not None:
            name = self._explicit.rule.name if isinstance(self._explicit, _C.SparseOptim) else self._explicit.name
            s += f", optimizer={name.lower()}"
        if self._spec.max_rows:
            s += f", max_rows={self._spec.max_rows}, eviction={self._spec.eviction.name.lower()}"
        return s

    # -- forward helpers -----------------------------------------------------------------
    def _check_ids(self, ids: Any) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"fastps.nn.{self._kind}: ids must be an int64 (or int32) torch.Tensor, "
                            f"got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"fastps.nn.{self._kind}: ids must be int64 (or int32) tensors, got {ids.dtype}")
        if ids.device.type != "cpu" or ids.layout != torch.strided:
            raise TypeError(f"fastps.nn.{self._kind}: ids must be a dense CPU tensor, got {ids.layout} on {ids.device}")
        return ids if ids.dtype == torch.int64 else ids.to(torch.int64)

    def _check_range(self, lo: int, hi: int) -> None:
        n = self.num_embeddings
        if n is not None and (lo < 0 or hi >= n):
            raise IndexError(f"fastps.nn.{self._kind}: index {lo if lo < 0 else hi} is out of range "
                             f"[0, {n}) (num_embeddings={n})")

    def _pad_pos(self, uids: torch.Tensor) -> Optional[int]:
        """Position of padding_idx in the unique ids, if the batch holds it."""
        if self.padding_idx is None:
            return None
        hit = (uids == self.padding_idx).nonzero()
        return int(hit[0, 0]) if hit.numel() else None

    @property
    def _sorted_ids(self) -> bool:
        """Whether the batch's unique ids are sorted (else: in order of first appearance).

        Sorted where their order can change results: a table that evicts or
        admits picks victims and creates rows in the order of the ids it is
        given, and sorted ids make that independent of the order of the batch.
        EmbeddingBag always sorts (see its class attribute).
        """
        s = self._spec
        return (s.eviction is not None and s.eviction != _C.SparseEviction.NONE) or s.admit_threshold > 1

    def _unique(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        """(unique ids, inverse index with input's shape, padding position) of checked ids."""
        uids, inverse, lo, hi = _dedup(self._check_ids(input), self._sorted_ids)
        if uids.numel():
            self._check_range(lo, hi)
        return uids, inverse, self._pad_pos(uids)

    def _tracked(self) -> bool:
        """Whether this forward records the lookup for a backward (the handle needs a gradient)."""
        handle = self.sparse_handle
        if not (torch.is_grad_enabled() and handle.requires_grad):
            return False
        if self._pending and handle.grad is None:
            self._missed_step()
        return True

    def _missed_step(self) -> None:
        raise FastPSError(
            f"fastps.nn.{self._kind}: gradients of an earlier backward were never applied, and "
            "zero_grad() has cleared the embedding's parameter since. The rows of a fastps.nn embedding are "
            "trained only by a fastps.optim optimizer (SGD, Adam, AdamW, Adagrad) whose param groups hold the "
            "embedding's parameters (torch.optim optimizers do not see the rows). Step one, or call "
            ".discard_pending_grads() to drop the gradients on purpose")

    def _lookup_rows(self, uids: torch.Tensor, inverse: torch.Tensor, pad_pos: Optional[int]) -> torch.Tensor:
        """The batch's rows, ``inverse.shape + (dim,)``: pulled straight into the output
        where the table can (embedded: each shard writes its rows to their positions),
        else pulled once per unique id and gathered."""
        scatter = getattr(self._backend, "pull_scatter", None)
        if scatter is None or pad_pos is not None:
            return _gather(self._pull(uids, pad_pos), inverse)
        out = torch.empty(*inverse.shape, self.embedding_dim, dtype=torch.float32)
        first, nxt = _chains(inverse, uids.numel())
        scatter(uids, first, nxt, out)
        return out

    def _pull(self, uids: torch.Tensor, pad_pos: Optional[int]) -> torch.Tensor:
        rows = self._backend.pull(uids)
        if pad_pos is not None:
            rows[pad_pos] = 0.0  # padding reads as zeros (torch's padding row is zero-initialised)
        return rows

    # -- backward / step (see _grads) --------------------------------------------------
    def _stash(self, uids: torch.Tensor, grad_rows: torch.Tensor, pad_pos: Optional[int]) -> None:
        g = grad_rows.detach()
        if g.dtype != torch.float32 or g.device.type != "cpu":
            g = g.to("cpu", torch.float32)
        if pad_pos is not None:  # the padding row gets no gradient and no update (as in torch)
            keep = torch.ones(uids.numel(), dtype=torch.bool)
            keep[pad_pos] = False
            uids, g = uids[keep], g[keep]
        self._pending.append((uids, g.contiguous()))
        _grads.mark_pending(self)

    def _fixed_rule(self) -> Optional[Any]:
        if isinstance(self._explicit, _C.SparseOptim):
            return self._explicit.rule
        return self._explicit

    def _sparse_optim(self, optimizer: torch.optim.Optimizer, group: Dict[str, Any]) -> Any:
        """The SparseOptim for the next push; raises (changing nothing) if it cannot apply."""
        optim = _rules.sparse_optim(optimizer, group, self._explicit, f"fastps.nn.{self._kind}")
        b = self._backend
        if optim.rule != b.rule and (b.step != 0 or self._fixed_rule() is not None):
            raise InvalidArgumentError(
                f"fastps.nn.{self._kind}: its table holds {b.rule.name} optimizer state (fixed by its first "
                f"step, by a checkpoint or by optimizer=), but {type(optimizer).__name__} maps to "
                f"{optim.rule.name}. Pass optimizer='{b.rule.name.lower()}' to the embedding or step it with "
                "the optimizer it was trained with")
        return optim

    def _push_pending(self, optim: Any) -> None:
        entries = self._pending
        if not entries:
            if not getattr(self._backend, "needs_every_step", False):
                return
            # Distributed BSP: this rank's (empty) share of the step still counts.
            entries = [(torch.empty(0, dtype=torch.int64), torch.empty(0, self.embedding_dim))]
        if len(entries) == 1:
            uids, grads = entries[0]
        else:  # several backward passes: sum per id
            uids, inverse, _, _ = _dedup(torch.cat([e[0] for e in entries]), self._sorted_ids)
            grads = _segment_sum(torch.cat([e[1] for e in entries]), inverse, uids.numel())
        b = self._backend
        if b.rule != optim.rule:  # first push, provisional table: it holds no rows
            assert b.step == 0
            spec = dataclasses.replace(self._spec, rule=optim.rule)
            b = _backend.make_backend(spec, replaces=b)
            self._backend, self._spec = b, spec
        b.push(uids, grads, optim, b.step + 1)
        self._pending.clear()  # not a new list: nn.Module.__setattr__ is slow on the step path
        _grads.clear_pending(self)


class Embedding(_SparseEmbedding):
    r"""A drop-in for :class:`torch.nn.Embedding` whose rows live in a server-side hash table.

    Ids may be any int64 (``num_embeddings=None``, the default) or limited to
    ``[0, num_embeddings)`` (out-of-range ids raise ``IndexError``, as in torch).
    A row is created the first time an optimizer step pushes a gradient for its
    id; until then it reads as its initial value, a pure function of
    ``(seed, id)``. Forward pulls only the batch's unique ids; backward
    deduplicates the gradient on the worker; ``fastps.optim``'s ``step()``
    applies the fused sparse rule on the server (lazy Adam for Adam/AdamW,
    sparse Adagrad for Adagrad, SGD for SGD, or ``optimizer=``).

    Args:
        embedding_dim: size of each row.
        num_embeddings: None (any int64 id) or the id bound.
        optimizer: None (the sparse counterpart of the stepping optimizer), a rule
            name (``'sgd'``, ``'adagrad'``, ``'rowwise_adagrad'``, ``'adam'``,
            ``'row_adam'``, ``'ftrl'``) or a ``fastps.nn.SparseOptim``.
        init: ``'uniform'`` (``init_range`` r or (low, high), default 0.05),
            ``'normal'`` (``mean``, ``std``; default N(0, 1) as torch) or ``'zeros'``.
        seed: seed of the initial values (give tables that share ids different seeds).
        max_rows: row cap (0: none). When full, a push raises
            :class:`fastps.FastPSError` unless ``eviction`` is ``'lru'``,
            ``'lfu'`` or ``'ttl'`` (``ttl_steps``: rows idle that many steps expire;
            under ``'lfu'``, the half-life in steps of the access counts, 0: no decay).
        admit_threshold: an id gets a row on its k-th push (0/1: the first).
        max_pending: ids counted towards admission at most.
        padding_idx: an id that reads as zeros and is never trained.

    Example::

        emb = fastps.nn.Embedding(64)                     # any int64 id
        model = nn.Sequential(emb, nn.Flatten(), nn.Linear(64 * 4, 1))
        opt = fastps.optim.Adam(model.parameters(), lr=1e-3)
        loss = model(torch.tensor([[3, -7, 2**40, 3]])).sum()
        loss.backward(); opt.step(); opt.zero_grad()
    """

    _kind = "Embedding"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Rows of ``input`` (int64/int32 ids of any shape) as ``input.shape + (embedding_dim,)``."""
        uids, inverse, pad_pos = self._unique(input)
        if self._tracked():
            return _Lookup.apply(self.sparse_handle, self, uids, inverse, pad_pos)
        return self._lookup_rows(uids, inverse, pad_pos)


class EmbeddingBag(_SparseEmbedding):
    r"""A drop-in for :class:`torch.nn.EmbeddingBag` (sums, means or maxima of bags of rows)
    whose rows live in a server-side hash table; see :class:`Embedding` for the table options.

    Args:
        embedding_dim: size of each row.
        mode: ``'mean'`` (torch's default), ``'sum'`` or ``'max'``.
        include_last_offset: as in torch.
        **kwargs: the table options of :class:`Embedding`.

    ``forward(input, offsets=None, per_sample_weights=None)`` takes the same
    arguments as torch's: a 2-D input (one bag per row) or a 1-D input with
    ``offsets``; ``per_sample_weights`` (float32, input's shape) with ``mode='sum'``.

    Example::

        bag = fastps.nn.EmbeddingBag(32, mode="sum")
        out = bag(torch.tensor([1, 2, 3, 99]), torch.tensor([0, 3]))   # 2 bags -> (2, 32)
    """

    _kind = "EmbeddingBag"
    # torch's embedding_bag backward sums with an unstable sort of the indices,
    # so only an inverse that is monotone in the ids sums a repeated id's
    # gradients in the order torch's module does (bit-exact parity).
    _sorted_ids = True  # type: ignore[assignment]

    def __init__(self, embedding_dim: int, *, mode: str = "mean", include_last_offset: bool = False,
                 **kwargs: Any) -> None:
        if mode not in ("sum", "mean", "max"):
            raise InvalidArgumentError(f"fastps.nn.EmbeddingBag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
        super().__init__(embedding_dim, **kwargs)
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)

    def forward(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One reduced row per bag: ``(bags, embedding_dim)``."""
        uids, inverse, pad_pos = self._unique(input)
        rows = (_PullRows.apply(self.sparse_handle, self, uids, pad_pos) if self._tracked()
                else self._pull(uids, pad_pos))
        if offsets is not None:
            if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int64, torch.int32):
                raise TypeError("fastps.nn.EmbeddingBag: offsets must be an int64 (or int32) tensor")
            offsets = offsets.to(torch.int64)
        return F.embedding_bag(inverse, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset, padding_idx=pad_pos)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}"
