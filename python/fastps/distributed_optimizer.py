"""``fastps.DistributedOptimizer``: gradient averaging through push_pull, local step.

The second dense mode: wrap any ``torch.optim`` optimizer; gradients are summed
over all workers by the parameter servers (the all-reduce replacement),
divided by the number of workers, and the wrapped optimizer steps locally, so
every rank keeps the same parameters (all start from rank 0's).

Note [Averaged at the end of backward]
    As with DDP, the averaging completes before ``backward()`` returns: the
    first gradient hook of a backward queues a callback on the autograd engine
    (``Variable._execution_engine.queue_callback``, what DDP's reducer does),
    which runs once every gradient of that backward is accumulated, sends the
    ones the hooks did not (unused parameters, or all of them without
    overlap), and waits for the sums. Code between backward and ``step()``
    (``clip_grad_norm_``, ``GradScaler.unscale_``, logging a norm) then sees the
    global mean, and its edits are what the local step applies. With overlap
    the gradients still leave from their hooks while backward runs; only the
    wait moved from ``step()`` to the end of backward.

Note [An Optimizer that aliases the wrapped one]
    Schedulers and ``GradScaler`` check ``isinstance(opt, torch.optim.Optimizer)``
    and then only use ``param_groups``, ``state``, ``step`` and the hook
    machinery. Two ways to pass that check:

    - Horovod's: build a new object of a dynamic subclass of the wrapped
      optimizer's class over its param groups. The new object has its own
      ``state`` (state loaded into the original before wrapping is lost), the
      class's ``__init__`` must accept the groups alone, the dynamic class does
      not pickle, and the subclass's ``step`` and the base class's ``step`` are
      both wrapped by torch's hook decorator (step hooks run twice).
    - Ours: a ``torch.optim.Optimizer`` subclass whose ``param_groups``,
      ``state`` and ``defaults`` are properties reading and writing the wrapped
      optimizer's, so there is one copy of each: an lr set through either
      object (or by a scheduler built on either) is the one the wrapped step
      uses, and ``state_dict()``/``load_state_dict()`` are the wrapped
      optimizer's own (same format, interchangeable). ``Optimizer.__init__`` is
      not called (it would assign fresh groups and state); the hook machinery
      comes from ``Optimizer.__setstate__``, torch's own way to complete an
      optimizer object built without ``__init__`` (unpickling).

    The second is simpler and has no copy to keep in step, so it is the one
    used here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional

import torch

from . import _C, _cluster
from ._sender import GradientSender, Sent
from ._tensor import check_grad, check_param, grad_snapshot
from .errors import FastPSError


class DistributedOptimizer(torch.optim.Optimizer):
    """Wrap a torch optimizer so its gradients are averaged across workers by fastps.

    A ``torch.optim.Optimizer`` itself: LR schedulers and ``torch.amp.GradScaler``
    take it directly, and its ``param_groups``, ``state``, ``state_dict()`` and
    ``load_state_dict()`` are the wrapped optimizer's (see Note [An Optimizer
    that aliases the wrapped one] in this module). In a single process (no
    ``torchrun``) it is a transparent pass-through.

    Under ``torchrun``, when ``backward()`` returns each rank's ``.grad`` holds
    the mean of all ranks' gradients, as with ``DistributedDataParallel``; code
    between backward and ``step()`` (clipping by the global norm,
    ``GradScaler.unscale_`` and its inf/NaN check, which so agree on every
    rank) edits the averaged gradients, and ``step()`` applies what they hold.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over float32 CPU parameters.
        overlap: push each gradient from its accumulation hook while backward
            still runs (default True); False pushes them all at the end of
            backward. Either way the averaging completes before ``backward()``
            returns.

    Example::

        opt = fastps.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt); scaler.update(); sched.step(); opt.zero_grad()

    Gradient accumulation: run the backward passes that should not communicate
    inside ``with opt.no_sync():``. Gradients set by hand (no backward) are
    averaged by ``step()``; :meth:`synchronize` averages them earlier.

    Not supported: a model still wrapped in ``DistributedDataParallel`` (its
    averaging and this one would both write ``.grad``; drop the wrapper) and
    ``add_param_group`` after wrapping. Not picklable: save ``state_dict()``.
    """

    # GradScaler unscales the (averaged) gradients itself, then calls step(); the
    # wrapped optimizer's own flag (fused=True) does not apply through the wrapper.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, *, overlap: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"fastps.DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("fastps.DistributedOptimizer: the optimizer is already a DistributedOptimizer")
        self.optimizer = optimizer
        # The hooks' dicts and torch's step wrapper (see Note [An Optimizer that aliases
        # the wrapped one]); the state passed is empty, so nothing else is assigned.
        torch.optim.Optimizer.__setstate__(self, {})
        self._cluster = _cluster.cluster()
        self._overlap = overlap
        self._numel: Dict[int, int] = {}  # id(p) -> numel registered
        self._synchronized = False  # the gradients hold a completed round's average
        self._sender: Optional[GradientSender] = None
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
            self._numel[id(p)] = p.numel()
        self._sender = GradientSender(self._cluster)
        # An aggregation key holds rank 0's initial values until its first round.
        self._sender.register(params, True, [_C.OptimHyper()] * len(params))
        self._sender.add_hooks(params, self._hook)

    # -- the wrapped optimizer's attributes: one copy, read and written through --------
    @property  # type: ignore[override]
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> Dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> Dict[str, Any]:
        raise TypeError("fastps.DistributedOptimizer cannot be pickled or copied (it holds the job's "
                        "registrations); save optimizer.state_dict() and load it into a new one")

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
        self._synchronized = False  # whatever gradients come next are not averaged yet

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict (identical on every rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load into the wrapped optimizer (a state dict of it or of this wrapper)."""
        self.optimizer.load_state_dict(state_dict)

    # state_dict()/load_state_dict() are the wrapped optimizer's: so are their hooks
    # (they are called with the wrapped optimizer).
    def register_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        """Register on the wrapped optimizer, whose ``state_dict()`` this is."""
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        """Register on the wrapped optimizer, whose ``state_dict()`` this is."""
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        """Register on the wrapped optimizer, whose ``load_state_dict()`` this is."""
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        """Register on the wrapped optimizer, whose ``load_state_dict()`` this is."""
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r})"

    def no_sync(self) -> Any:
        """Backward passes inside accumulate locally without communication (a context manager)."""
        if self._sender is None:
            return contextlib.nullcontext()
        return self._sender.no_sync()

    # -- averaging -------------------------------------------------------------------
    def _in_ddp(self) -> bool:
        """Note [DistributedOptimizer under DDP]: a model still wrapped in
        DistributedDataParallel has its gradients averaged by DDP's all-reduce, so
        this optimizer averages nothing (no traffic; the result is DDP's) and only
        steps the wrapped optimizer."""
        return self._sender is not None and self._sender.wrapped_in_ddp()

    def _hook(self, p: torch.Tensor) -> None:
        sender = self._sender
        if self._in_ddp():
            return
        if sender.at_end_of_backward(self._end_of_backward):
            # See Note [Averaged at the end of backward].
            self._synchronized = False  # new gradients: the next round is theirs
        if not self._overlap:
            return
        if id(p) in sender.inflight:
            raise FastPSError(
                "fastps: a parameter's gradient arrived twice before the end of the backward that sent it "
                "first (that backward was interrupted). Call optimizer.synchronize() (or step()) after an "
                "interrupted backward, before the next one")
        self._send(p)

    def _end_of_backward(self) -> None:
        self._round()

    def _send(self, p: torch.Tensor) -> None:
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
        sender = self._sender
        fut = sender.client.push_pull(sender.ids[id(p)], g.data_ptr(), g.numel(), g.data_ptr(), g.numel(),
                                      sender.next_clock(p))
        sender.track(p, (fut,), g, grad_snapshot(p))

    def synchronize(self) -> None:
        """Average the gradients now unless the last backward (or ``synchronize()``) did.

        Backward averages them before it returns, so this is needed only for
        gradients set by hand, or after an interrupted backward; kept for
        scripts that call it before editing gradients.

        Raises:
            fastps.FastPSError: a gradient was replaced or edited in place while
                it was being averaged.
        """
        if self._cluster is not None and not self._synchronized and not self._in_ddp():
            self._round()

    def _round(self) -> None:
        """Send every gradient not yet sent, wait for the sums, divide by the world size."""
        sender = self._sender
        sender.backward_queued = False
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in sender.ids:
                    if p.requires_grad and p.numel() > 0:
                        raise FastPSError(
                            "fastps: DistributedOptimizer has a trainable parameter it did not register (a "
                            "param group added to the wrapped optimizer later, or a parameter unfrozen after "
                            "construction); its gradient would not be averaged. Build the DistributedOptimizer "
                            "after the wrapped optimizer has all its groups and trainable parameters")
                    continue
                if id(p) not in sender.inflight:
                    self._send(p)
        world = self._cluster.world_size

        def average(sent: List[Sent]) -> None:
            for s in sent:
                s.keep.div_(world)

        sender.complete_round(
            "fastps: a gradient was changed while it was being averaged across workers (between "
            "its accumulation hook and the end of backward, or by a gradient hook). Edit gradients "
            "after backward returns: they hold the average then", average)
        self._synchronized = True

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Step the wrapped optimizer on the averaged gradients (averaging them first if
        no backward did since the last step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._cluster is not None and not self._synchronized and not self._in_ddp():
            self._round()
        self._synchronized = False
        self.optimizer.step()
        return loss
