"""Pending sparse gradients of ``fastps.nn`` embeddings, pushed by ``fastps.optim`` at step().

Backward leaves each embedding's deduplicated gradient (unique ids, rows) on
the module and records the module here. ``ServerOptimizerMixin.step()`` calls
:func:`push_sparse_grads` first: every pending module whose handle parameter
is in one of the optimizer's param groups is pushed to its table with that
group's hyperparameters (see ``_rules``). Every push is validated before the
first one is sent, so a bad group leaves every table and every dense parameter
untouched. Optimizers that do not hold a module's handle leave it pending for
the optimizer that does.
"""

from __future__ import annotations

import weakref
from typing import Any, List, Tuple

import torch

# Modules with gradients not yet pushed. Weak: a dropped module takes its
# gradients with it.
_PENDING: "weakref.WeakSet[Any]" = weakref.WeakSet()
# Modules pushed at every step of an optimizer holding them, with no rows when
# they have no gradient: in the distributed mode a BSP round of a table needs
# every worker's push (a rank whose batch missed the embedding still counts).
_EVERY_STEP: "weakref.WeakSet[Any]" = weakref.WeakSet()


def mark_pending(module: Any) -> None:
    _PENDING.add(module)


def mark_every_step(module: Any) -> None:
    _EVERY_STEP.add(module)


def clear_pending(module: Any) -> None:
    _PENDING.discard(module)


def is_sparse_handle(p: torch.Tensor) -> bool:
    """True for the placeholder parameter of a ``fastps.nn`` embedding (its rows train via push)."""
    return getattr(p, "_fastps_sparse_handle", False) is True


def push_sparse_grads(optimizer: torch.optim.Optimizer) -> None:
    """Push the pending gradients of the embeddings whose handles ``optimizer`` holds.

    Called by ``fastps.optim`` optimizers at the start of ``step()``; costs one
    emptiness test when no embedding has pending gradients.
    """
    if not _PENDING and not _EVERY_STEP:
        return
    by_handle = {id(m.sparse_handle): m for m in list(_PENDING) + list(_EVERY_STEP)}
    work: List[Tuple[Any, Any]] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            m = by_handle.pop(id(p), None)
            if m is not None:
                work.append((m, m._sparse_optim(optimizer, group)))  # validates; changes nothing
        if not by_handle:
            break
    for m, optim in work:
        m._push_pending(optim)
