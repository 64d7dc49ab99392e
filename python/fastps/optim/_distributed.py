"""The distributed path of ``fastps.optim``: push gradients, pull parameters.

Used when the process is one rank of a job (see fastps/_cluster.py). The
optimizer state lives only on the servers. Gradients are pushed from
``Tensor.register_post_accumulate_grad_hook`` while backward still runs, and
the pull of each parameter is issued right behind its push: the server answers
it as soon as the chunk's update is applied (under BSP: once every worker
pushed). ``step()`` pushes whatever the hooks did not (parameters whose
gradient was set by hand, or that have none: a "skip"), then waits.

Parameters are overwritten in place by the pulled values as replies arrive.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import torch

from ..errors import FastPSError
from .._cluster import wait_all
from .._tensor import GradSnapshot, check_grad, check_param, grad_changed, grad_snapshot


@contextlib.contextmanager
def _requests() -> Iterator[Tuple[List[Any], List[torch.Tensor]]]:
    """Lists (futures, keep) to fill with native requests and the tensors they read or
    write. On leaving, waits for every request; after an error, also for those already
    sent (``wait_all``: ``keep`` stays alive until each of them ended), then re-raises."""
    futures: List[Any] = []
    keep: List[torch.Tensor] = []
    try:
        yield futures, keep
        for f in futures:
            f.wait()
    except BaseException as e:
        wait_all(futures, keep, e)
        raise


class DistState:
    """Per-optimizer bookkeeping of the distributed mode."""

    def __init__(self, opt: Any, cluster: Any, *, overlap: bool = True) -> None:
        self.opt = opt
        self.cluster = cluster
        self.client = cluster.client
        self.ids: Dict[int, int] = {}
        # Index of each parameter's group: torch's load_state_dict replaces the
        # group dicts, so the live dict is looked up at every push.
        self.group_index: Dict[int, int] = {}
        self.clock = 0
        # id(p) -> (push, pull, the gradient sent (kept alive), the parameter, the
        # grad_snapshot() taken when sent: a later edit is detected at step())
        self.inflight: Dict[int, Tuple[Any, Any, Any, Any, GradSnapshot]] = {}
        # id(p) -> (numel registered, this optimizer's clock at registration): a
        # chunk's rounds count from its registration (add_param_group after
        # training started), and the pointers handed to the servers must still
        # describe that many float32 values.
        self.registered: Dict[int, Tuple[int, int]] = {}
        self.sync = True
        self.overlap = overlap
        self.hooks: List[Any] = []

    # -- registration ----------------------------------------------------------
    def register_groups(self, groups: List[Dict[str, Any]]) -> None:
        """Create the chunks (rank 0's values), then every rank pulls them."""
        params = []
        futures = []
        for group in groups:
            gi = next(i for i, g in enumerate(self.opt.param_groups) if g is group)
            hyper = self.opt._hyper(group)
            for p in group["params"]:
                if p.numel() == 0 or id(p) in self.ids:
                    continue
                if not p.is_contiguous():
                    raise TypeError(
                        "fastps: a parameter is not contiguous (a transposed or sliced view); the "
                        "distributed mode reads and writes parameters in place. Make it contiguous "
                        "before building the optimizer (p.data = p.data.contiguous())")
                tid = self.cluster.next_tensor_id()
                self.registered[id(p)] = (p.numel(), self.clock)
                self.ids[id(p)] = tid
                self.group_index[id(p)] = gi
                data = p.detach()
                init, init_numel = (data.data_ptr(), data.numel()) if self.cluster.rank == 0 else (0, 0)
                futures.append((self.client.register_dense(tid, p.numel(), False, hyper, init, init_numel), data))
                params.append(p)
        for f, _ in futures:
            f.wait()
        if not params:
            return
        first = self.ids[id(params[0])]
        self.cluster.barrier(f"register/{first}", "every rank to register its parameters")
        pulls = [self.client.pull(self.ids[id(p)], p.detach().data_ptr(), p.numel(), 0) for p in params]
        for f in pulls:
            f.wait()  # every rank now starts from rank 0's parameters, as DDP does
        if self.overlap:
            for p in params:
                if p.requires_grad:
                    self.hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    # -- the step ----------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        if not self.sync:
            return
        if id(p) in self.inflight:
            raise FastPSError(
                "fastps: a parameter's gradient arrived twice before optimizer.step() completed the "
                "round its first backward opened (in the distributed mode every backward that reaches "
                "the optimizer's parameters sends their gradients). Call optimizer.step() after each "
                "backward (also after one that was interrupted), or, for gradient accumulation or a "
                "second loss backpropagated into the same parameters, run the extra backward passes "
                "inside `with optimizer.no_sync():`")
        self._send(p)

    def _check_registered(self, p: torch.Tensor) -> None:
        """Raise TypeError unless ``p`` still is what it was registered as (the servers
        read and write it in place as that many contiguous float32 values)."""
        numel, _ = self.registered[id(p)]
        if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous() or p.numel() != numel:
            check_param(p)  # dtype or device changed (model.double(), .to(...)): its TypeError
            raise TypeError(
                f"fastps: a parameter registered with {numel} contiguous float32 values now has "
                f"{p.numel()} values, contiguous={p.is_contiguous()}; the distributed mode writes "
                "parameters in place. Build the optimizer after the model's final shape and layout")

    def _send(self, p: torch.Tensor) -> None:
        tid = self.ids[id(p)]
        numel, base = self.registered[id(p)]
        if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous() or p.numel() != numel:
            self._check_registered(p)
        hyper = self.opt._hyper(self.opt.param_groups[self.group_index[id(p)]])
        snapshot = grad_snapshot(p)
        g = p.grad
        if g is not None:
            g = check_grad(p, g)
        clock = self.clock + 1 - base  # the chunk's own round count
        if g is None:
            push = self.client.push(tid, 0, 0, hyper, clock)
        else:
            push = self.client.push(tid, g.data_ptr(), g.numel(), hyper, clock)
        pull = self.client.pull(tid, p.detach().data_ptr(), numel, clock)
        self.inflight[id(p)] = (push, pull, g, p, snapshot)

    def step(self) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                if id(p) not in self.ids:
                    continue
                if id(p) not in self.inflight:
                    self._send(p)
        try:
            for push, pull, *_ in self.inflight.values():
                push.wait()
                pull.wait()
            self._check_unchanged()
        except BaseException as e:
            wait_all((f for push, pull, *_ in self.inflight.values() for f in (push, pull)),
                     list(self.inflight.values()), e)
            raise
        finally:
            self.inflight.clear()
            self.clock += 1  # this round was sent, whatever happened to it

    def _check_unchanged(self) -> None:
        """Raise if a gradient was replaced or edited in place after it was pushed.

        With overlap on, a gradient leaves during backward; clip_grad_norm_,
        GradScaler.unscale_ or any other edit between backward and step() would
        be silently ignored. Checked after the step completed, so every rank
        applied the same (unedited) gradients and stays consistent.
        """
        for _, _, _, p, snapshot in self.inflight.values():
            if grad_changed(p, snapshot):
                raise FastPSError(
                    "fastps: a parameter's gradient was changed after backward pushed it to the parameter "
                    "servers (clip_grad_norm_, GradScaler.unscale_ or another edit between backward and "
                    "optimizer.step()); this step used the gradients as backward produced them. Gradients "
                    "leave during backward (FASTPS_OVERLAP=1, the default): set FASTPS_OVERLAP=0 to push "
                    "them in step(), after such edits (each worker then edits its own local gradient, "
                    "e.g. clips by its local norm), or drop the edit")

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        old, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = old

    # -- state -------------------------------------------------------------------
    def _registered(self) -> Iterator[Tuple[torch.Tensor, Dict[str, Any], int, Tuple[str, ...]]]:
        """(param, group, tensor id, state buffer names) of every registered parameter."""
        for group in self.opt.param_groups:
            names = self.opt._names(self.opt._hyper(group))
            for p in group["params"]:
                if id(p) in self.ids:
                    yield p, group, self.ids[id(p)], names

    def fetch_state(self) -> None:
        """Copy the servers' optimizer state into optimizer.state (for state_dict)."""
        if self.clock == 0:
            return
        with _requests() as (futures, keep):  # keep: written by the replies
            for p, group, tid, names in self._registered():
                state = self.opt.state[p]
                if any(n not in state for n in names) or (self.opt._has_step() and "step" not in state):
                    self.opt._init_state(p, group, state)
                for i, n in enumerate(names):
                    t = state[n]
                    if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                            and t.shape == p.shape and t.is_contiguous()):
                        # The servers' state replaces it whole; a tensor of another shape or
                        # layout (set by hand) is not written through.
                        state[n] = t = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    keep.append(t)
                    futures.append(self.client.state_get(tid, i + 1, t.data_ptr(), t.numel()))
                if self.opt._has_step():
                    step = state["step"]
                    if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.numel() == 1
                            and step.device.type == "cpu" and step.is_contiguous()):
                        # the server sends one float32 (a loaded state dict may hold a float64 or a number)
                        state["step"] = step = torch.tensor(float(step), dtype=torch.float32)
                    keep.append(step)
                    futures.append(self.client.state_get(tid, 255, step.data_ptr(), 1))

    def push_state(self) -> None:
        """Send loaded optimizer state and this rank's parameters to the servers.

        The caller (``load_state_dict``) has checked that the state fits the
        parameters (``fastps._tensor.check_state_fits``); every buffer still goes
        to the servers with its size, which the native client checks again.
        """
        registered = list(self._registered())
        for p, *_ in registered:
            self._check_registered(p)  # before anything is sent
        with _requests() as (futures, keep):  # keep: read by the requests
            for p, _group, tid, names in registered:
                data = p.detach()
                keep.append(data)
                futures.append(self.client.state_set(tid, 0, data.data_ptr(), data.numel()))
                state = self.opt.state.get(p, {})
                for i, n in enumerate(names):
                    if isinstance(state.get(n), torch.Tensor):
                        t = state[n].detach().to(device="cpu", dtype=torch.float32).contiguous()
                        keep.append(t)
                        futures.append(self.client.state_set(tid, i + 1, t.data_ptr(), t.numel()))
                if self.opt._has_step() and "step" in state:
                    s = torch.tensor([float(state["step"])], dtype=torch.float32)
                    keep.append(s)
                    futures.append(self.client.state_set(tid, 255, s.data_ptr(), 1))
