"""``fastps.DistributedOptimizer``: gradient averaging through push_pull, local step.

The second dense mode: wrap any ``torch.optim`` optimizer; gradients are summed
over all workers by the parameter servers (the all-reduce replacement),
divided by the number of workers, and the wrapped optimizer steps locally, so
every rank keeps the same parameters (all start from rank 0's).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import _C, _cluster
from ._tensor import GradSnapshot, check_grad, check_param, grad_changed, grad_snapshot
from .errors import FastPSError


class DistributedOptimizer:
    """Wrap a torch optimizer so its gradients are averaged across workers by fastps.

    In a single process (no ``torchrun``) it is a transparent pass-through.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over float32 CPU parameters.
        overlap: push each gradient from its accumulation hook while backward
            still runs (default True); False pushes everything in ``step()``.

    Example::

        opt = fastps.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        loss.backward(); opt.step(); opt.zero_grad()

    To edit the averaged gradients before the step (clipping by the global
    norm, unscaling), call :meth:`synchronize` first; ``step()`` then does not
    average again::

        loss.backward()
        opt.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    Editing a gradient between backward and ``synchronize()``/``step()``
    races with its averaging (the result lands in ``.grad`` in place):
    ``synchronize()`` detects it and raises :class:`fastps.FastPSError`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, overlap: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"fastps.DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._cluster = _cluster.cluster()
        self._ids: Dict[int, int] = {}
        self._numel: Dict[int, int] = {}  # id(p) -> numel registered
        # id(p) -> (push_pull future, the gradient, the parameter, its grad_snapshot() when sent)
        self._inflight: Dict[int, Tuple[Any, torch.Tensor, torch.Tensor, GradSnapshot]] = {}
        self._clock = 0
        self._sync = True
        self._synchronized = False  # synchronize() ran since the last step()
        self._hooks: List[Any] = []
        if self._cluster is None:
            return
        # Each trainable parameter once (torch allows one twice in a group, with a
        # warning); frozen ones are left alone, as DDP leaves them out of its buckets.
        params: List[torch.Tensor] = []
        seen = set()
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.numel() > 0 and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        for p in params:
            check_param(p)
        client = self._cluster.client
        h = _C.OptimHyper()
        futures = []
        for p in params:
            tid = self._cluster.next_tensor_id()
            self._ids[id(p)] = tid
            self._numel[id(p)] = p.numel()
            if self._cluster.rank == 0:
                # A non-contiguous parameter (a strided view) travels through a contiguous copy.
                init = p.detach().contiguous()
                futures.append((client.register_dense(tid, p.numel(), True, h, init.data_ptr(), init.numel()),
                                init))
            else:
                futures.append((client.register_dense(tid, p.numel(), True, h, 0, 0), None))
        for f, _ in futures:
            f.wait()
        if params:
            self._cluster.barrier(f"register/{self._ids[id(params[0])]}", "every rank to register")
            # An aggregation key holds rank 0's initial values until its first round.
            dsts = [p.detach() if p.is_contiguous() else torch.empty(p.shape, dtype=p.dtype) for p in params]
            for f in [client.pull(self._ids[id(p)], d.data_ptr(), d.numel(), 0) for p, d in zip(params, dsts)]:
                f.wait()
            with torch.no_grad():
                for p, d in zip(params, dsts):
                    if not p.is_contiguous():
                        p.copy_(d)
        if overlap:
            for p in params:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    # The wrapped optimizer's attributes, so schedulers and user code see it.
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> Dict[str, Any]:
        return self.optimizer.defaults

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Not supported: a new group's parameters would need registering on every rank
        mid-training. Build the DistributedOptimizer after all groups exist.

        Raises:
            fastps.FastPSError: always (in the distributed mode).
        """
        if self._cluster is None:
            self.optimizer.add_param_group(param_group)
            return
        raise FastPSError("fastps: DistributedOptimizer.add_param_group is not supported in the distributed "
                          "mode; add every param group to the wrapped optimizer before wrapping it")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients, as the wrapped optimizer does."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict (identical on every rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load into the wrapped optimizer."""
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r})"

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally without communication."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _hook(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        if id(p) in self._inflight:
            raise FastPSError(
                "fastps: a parameter's gradient arrived twice before step() completed the round its first "
                "backward opened. Call step() (or synchronize()) after each backward, also after an "
                "interrupted one; for gradient accumulation or a second loss into the same parameters run "
                "the extra backward passes inside `with optimizer.no_sync():`")
        self._send(p)

    def _send(self, p: torch.Tensor) -> None:
        self._synchronized = False  # a new round: step() must wait for it
        if p.numel() != self._numel[id(p)]:
            raise TypeError(
                f"fastps: a parameter registered with {self._numel[id(p)]} values now has {p.numel()}; its "
                "gradient is averaged as a tensor of the registered size. Build the DistributedOptimizer after "
                "the model's final shape")
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # as DDP: an unused parameter contributes zeros
        g = check_grad(p, p.grad)  # the parameter's shape, contiguous
        if g is not p.grad:
            p.grad = g
        fut = self._cluster.client.push_pull(self._ids[id(p)], g.data_ptr(), g.numel(), g.data_ptr(), g.numel(),
                                             self._clock + 1)
        self._inflight[id(p)] = (fut, g, p, grad_snapshot(p))

    def synchronize(self) -> None:
        """Finish averaging every gradient; ``step()`` calls it unless it already ran.

        Raises:
            fastps.FastPSError: a gradient was replaced or edited in place after
                backward sent it for averaging (edit it after ``synchronize()``).
        """
        if self._cluster is None:
            return
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in self._ids:
                    if p.requires_grad and p.numel() > 0:
                        raise FastPSError(
                            "fastps: DistributedOptimizer has a trainable parameter it did not register (a "
                            "param group added to the wrapped optimizer later, or a parameter unfrozen after "
                            "construction); its gradient would not be averaged. Build the DistributedOptimizer "
                            "after the wrapped optimizer has all its groups and trainable parameters")
                    continue
                if id(p) not in self._inflight:
                    self._send(p)
        try:
            for fut, *_ in self._inflight.values():
                fut.wait()
            if any(grad_changed(p, snapshot) for _, _, p, snapshot in self._inflight.values()):
                raise FastPSError(
                    "fastps: a gradient was changed between backward and optimizer.step() while it was being "
                    "averaged across workers (clip_grad_norm_, GradScaler.unscale_ or another edit). Call "
                    "optimizer.synchronize() after backward and edit the averaged gradients after it, then "
                    "step(); or pass overlap=False to average in step()")
            for _, g, *_ in self._inflight.values():
                g.div_(self._cluster.world_size)
        except BaseException as e:
            _cluster.wait_all((fut for fut, *_ in self._inflight.values()),  # sums may still be landing
                              list(self._inflight.values()), e)
            raise
        finally:
            self._inflight.clear()
            self._clock += 1  # this round was sent, whatever happened to it
        self._synchronized = True

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Average gradients across workers, then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._synchronized:
            self.synchronize()
        self._synchronized = False
        self.optimizer.step()
        return loss
