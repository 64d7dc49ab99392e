"""The gradient sender both distributed dense modes share.

``fastps.optim`` in the distributed mode (``optim/_distributed.py``,
server-side optimizer) and ``fastps.DistributedOptimizer`` (gradient averaging,
local step) send gradients the same way: parameters registered on the
servers and started from rank 0's values, accumulation hooks that send while
backward runs (switched off by ``no_sync()``), a callback at the end of a
backward, an in-flight map of what was sent, and a round that waits for
every request, refuses a gradient edited after it was sent, and advances the
round clock whatever happened. :class:`GradientSender` is that machinery;
what each mode sends and when stays in its own module.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import _C
from ._cluster import wait_all
from ._tensor import GradSnapshot, grad_changed
from .errors import FastPSError

# Buffer number of a tensor's step counter in STATE_GET/STATE_SET (docs/protocol.md,
# ops 23-24): the native core's kStepCounterBuffer (csrc/protocol/message.h).
STEP_BUFFER = _C.STEP_COUNTER_BUFFER


@dataclass
class Sent:
    """One parameter's gradient in flight: its requests, what they read or write (kept
    alive until they end), the parameter, and its gradient's snapshot when sent."""

    futures: Tuple[Any, ...]
    keep: Any
    param: torch.Tensor
    snapshot: GradSnapshot


class GradientSender:
    """Registration, hooks, in-flight requests and the round clock of one optimizer.

    Not thread-safe: used from the training thread and autograd's callbacks,
    as the optimizer itself is.
    """

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.client = cluster.client
        # id(p) -> tensor id on the servers. Each tensor's round clock is the C++ client's
        # (Note [Round clocks] in csrc/client/ps_client.cc); every round ends for all of them.
        self.ids: Dict[int, int] = {}
        self.sync = True  # False inside no_sync(): the hooks send nothing
        self.hooks: List[Any] = []
        self.inflight: Dict[int, Sent] = {}  # id(p) -> what was sent this round
        self.backward_queued = False  # an end-of-backward callback is queued
        self._ddp: Optional[bool] = None  # wrapped_in_ddp(), looked up once

    def wrapped_in_ddp(self) -> bool:
        """Whether a ``DistributedDataParallel`` module holds any registered parameter: its
        all-reduce then averages the gradients already. Looked up once (the first backward
        or step), among the live objects."""
        if self._ddp is None:
            ddp_type = torch.nn.parallel.DistributedDataParallel
            ours = set(self.ids)
            # issubclass(type(obj)), not isinstance: DDP's ABC check reads obj.__class__,
            # which fires torch.distributed.reduce_op's deprecation warning.
            self._ddp = any(issubclass(type(obj), ddp_type) and any(id(q) in ours for q in obj.module.parameters())
                            for obj in gc.get_objects())
        return self._ddp

    # -- registration --------------------------------------------------------------
    def register(self, params: Sequence[torch.Tensor], aggregate: bool,
                 hypers: Sequence[Any]) -> None:
        """Register ``params`` on the servers (each with its hyperparameters; ``aggregate``:
        a push_pull key that sums, not an optimizer's), rank 0's values first; then every
        rank pulls them, so all start from rank 0's parameters, as DDP does."""
        futures = []
        for p, hyper in zip(params, hypers):
            tid = self.cluster.next_tensor_id()
            self.ids[id(p)] = tid
            if self.cluster.rank == 0:
                # A non-contiguous parameter (a strided view) travels through a contiguous copy.
                init = p.detach().contiguous()
                futures.append((self.client.register_dense(tid, p.numel(), aggregate, hyper, init.data_ptr(),
                                                           init.numel()), init))
            else:
                futures.append((self.client.register_dense(tid, p.numel(), aggregate, hyper, 0, 0), None))
        for f, _ in futures:
            f.wait()
        if not params:
            return
        self.cluster.barrier(f"register/{self.ids[id(params[0])]}", "every rank to register its parameters")
        dsts = [p.detach() if p.is_contiguous() else torch.empty(p.shape, dtype=p.dtype) for p in params]
        for f in [self.client.pull(self.ids[id(p)], d.data_ptr(), d.numel(), 0) for p, d in zip(params, dsts)]:
            f.wait()
        with torch.no_grad():
            for p, d in zip(params, dsts):
                if not p.is_contiguous():
                    p.copy_(d)

    def add_hooks(self, params: Sequence[torch.Tensor], hook: Callable[[torch.Tensor], None]) -> None:
        """Call ``hook(p)`` when autograd has accumulated ``p.grad``, outside ``no_sync()``."""
        def on_grad(p: torch.Tensor) -> None:
            if self.sync:
                hook(p)

        for p in params:
            self.hooks.append(p.register_post_accumulate_grad_hook(on_grad))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside send nothing: their gradients accumulate locally."""
        old, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = old

    def at_end_of_backward(self, callback: Callable[[], None]) -> bool:
        """Queue ``callback`` to run once the running backward accumulated every gradient
        (autograd's ``queue_callback``, as DDP's reducer does), unless one is queued already;
        True when this call queued it."""
        if self.backward_queued:
            return False
        self.backward_queued = True

        def done() -> None:
            self.backward_queued = False
            callback()

        torch.autograd.Variable._execution_engine.queue_callback(done)
        return True

    # -- rounds ----------------------------------------------------------------------
    @property
    def clock(self) -> int:
        """Rounds this optimizer sent, completed or failed: those of its first registered
        tensor, which took part in every one (0 before any tensor is registered)."""
        return self.client.round(next(iter(self.ids.values()))) if self.ids else 0

    def next_clock(self, p: torch.Tensor) -> int:
        """The clock of ``p``'s round being sent: the rounds its tensor was sent in since its
        registration, plus one."""
        return self.client.round(self.ids[id(p)]) + 1

    def end_round(self) -> None:
        """The round ends for every registered tensor, whatever happened to it."""
        self.client.end_round(list(self.ids.values()))

    def track(self, p: torch.Tensor, futures: Tuple[Any, ...], keep: Any, snapshot: GradSnapshot) -> None:
        """Record what was sent for ``p`` in this round."""
        self.inflight[id(p)] = Sent(futures, keep, p, snapshot)

    def complete_round(self, edited: str, then: Optional[Callable[[List[Sent]], None]] = None) -> None:
        """Wait for every request in flight; raise :class:`fastps.FastPSError` with message
        ``edited`` if a gradient changed after it was sent; then ``then(sent)``.

        After an error, waits for the requests already sent (``wait_all``: what they use
        stays alive until each ended) and re-raises. The round is over either way: the
        in-flight map is cleared and the clock advances.
        """
        sent = list(self.inflight.values())
        try:
            for s in sent:
                for f in s.futures:
                    f.wait()
            if any(grad_changed(s.param, s.snapshot) for s in sent):
                raise FastPSError(edited)
            if then is not None:
                then(sent)
        except BaseException as e:
            wait_all((f for s in sent for f in s.futures), sent, e)
            raise
        finally:
            self.inflight.clear()
            self.end_round()  # this round was sent, whatever happened to it


__all__ = ["GradientSender", "Sent", "STEP_BUFFER"]
