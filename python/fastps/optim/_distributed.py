"""The distributed path of ``fastps.optim``: push gradients, pull parameters.

Used when the process is one rank of a job (see fastps/_cluster.py). The
optimizer state lives only on the servers. Gradients are pushed from
``Tensor.register_post_accumulate_grad_hook`` while backward still runs.

Under BSP (the default) a round is deferred (Note [Deferred apply] in
csrc/server/dense_service.cc): the servers send the mean of all ranks' gradients
back into each rank's ``.grad`` before ``backward()`` returns, as DDP's
all-reduce does, so a script may clip, unscale or log them; ``step()`` then
sends one contribution per tensor (nothing, one scale factor such as
clipping's, or the edited gradient) and the servers apply the optimizer once
and return the parameters. A model kept in ``DistributedDataParallel`` has its
gradients averaged by DDP already: nothing is pushed during backward, and in
``step()`` one rank per tensor sends its gradient (the optimizer state stays
on the servers, sharded).

Under SSP/ASP, or with ``FASTPS_OVERLAP=0``, each push is applied as it
arrives (SSP/ASP) or at the end of its round, and the pull of each parameter
is issued right behind its push; gradients edited after they were pushed are
detected and refused.

Parameters are overwritten in place by the pulled values as replies arrive.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .. import _C
from ..errors import FastPSError
from .._cluster import wait_all
from .._sender import STEP_BUFFER, GradientSender, Sent
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
        # Registration, hooks, no_sync, the in-flight map ((push, pull) per parameter, the
        # gradient sent kept alive, its snapshot: a later edit is detected at step()) and the
        # round clock.
        self.sender = GradientSender(cluster)
        self.ids = self.sender.ids
        # Index of each parameter's group: torch's load_state_dict replaces the
        # group dicts, so the live dict is looked up at every push.
        self.group_index: Dict[int, int] = {}
        # id(p) -> numel registered: the pointers handed to the servers must still
        # describe that many float32 values. (A chunk's rounds count from its
        # registration, add_param_group after training started included: the C++
        # client keeps each tensor's round clock, Note [Round clocks].)
        self.registered: Dict[int, int] = {}
        self.overlap = overlap
        # Note [Deferred apply]: BSP with the pushes in backward.
        self.deferred = overlap and cluster.config.staleness == 0
        self.ddp: Optional[bool] = None  # a DDP wrapper averages the gradients (decided once)
        # id(p) -> (mean future, the gradient the mean lands in or None, the parameter)
        self.round: Dict[int, Tuple[Any, Optional[torch.Tensor], torch.Tensor]] = {}
        self.round_landed = False  # the round's means are in .grad; step() not yet called
        # id(p) -> .grad as the mean left it (to tell an edit from none)
        self.landed: Dict[int, GradSnapshot] = {}
        # Copies of the means, kept once a step saw an edit: a uniform scale
        # (clipping, unscaling) is then recognised and sent as one number.
        self.keep_means = False
        self.means: Dict[int, torch.Tensor] = {}

    # -- registration ----------------------------------------------------------
    def register_groups(self, groups: List[Dict[str, Any]]) -> None:
        """Create the chunks (rank 0's values), then every rank pulls them."""
        params = []
        hypers = []
        seen = set()
        for group in groups:
            gi = next(i for i, g in enumerate(self.opt.param_groups) if g is group)
            hyper = self.opt._hyper(group)
            for p in group["params"]:
                if p.numel() == 0 or id(p) in self.ids or id(p) in seen:
                    continue
                if not p.is_contiguous():
                    raise TypeError(
                        "fastps: a parameter is not contiguous (a transposed or sliced view); the "
                        "distributed mode reads and writes parameters in place. Make it contiguous "
                        "before building the optimizer (p.data = p.data.contiguous())")
                self.registered[id(p)] = p.numel()
                self.group_index[id(p)] = gi
                seen.add(id(p))
                params.append(p)
                hypers.append(hyper)
        self.sender.register(params, False, hypers)
        if self.overlap:
            self.sender.add_hooks([p for p in params if p.requires_grad], self._hook)

    @property
    def clock(self) -> int:
        """Rounds sent (completed or failed) by this optimizer."""
        return self.sender.clock

    @property
    def inflight(self) -> Dict[int, Sent]:
        return self.sender.inflight

    # -- the step ----------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        if self._in_ddp():
            return  # DDP averages the gradients; step() sends them (Note [Deferred apply])
        if self.deferred:
            if self.sender.at_end_of_backward(self._finish_round) and self.round_landed:
                # Another backward before step() (GradScaler skipped it, or
                # accumulation without no_sync()): the servers drop the
                # unapplied round when this one's first push arrives, and
                # .grad (mean + this backward's) is averaged again, as DDP does.
                self._clear_round()
            self._send_mean(p)
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

    def _checked(self, p: torch.Tensor) -> Tuple[int, Any]:
        """(tensor id, hyperparameters) of a registered parameter still as it was registered."""
        self._check_registered(p)
        return self.ids[id(p)], self.opt._hyper(self.opt.param_groups[self.group_index[id(p)]])

    def _check_registered(self, p: torch.Tensor) -> None:
        """Raise TypeError unless ``p`` still is what it was registered as (the servers
        read and write it in place as that many contiguous float32 values)."""
        numel = self.registered[id(p)]
        if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous() or p.numel() != numel:
            check_param(p)  # dtype or device changed (model.double(), .to(...)): its TypeError
            raise TypeError(
                f"fastps: a parameter registered with {numel} contiguous float32 values now has "
                f"{p.numel()} values, contiguous={p.is_contiguous()}; the distributed mode writes "
                "parameters in place. Build the optimizer after the model's final shape and layout")

    def _send(self, p: torch.Tensor) -> None:
        tid = self.ids[id(p)]
        numel = self.registered[id(p)]
        if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous() or p.numel() != numel:
            self._check_registered(p)
        hyper = self.opt._hyper(self.opt.param_groups[self.group_index[id(p)]])
        snapshot = grad_snapshot(p)
        g = p.grad
        if g is not None:
            g = check_grad(p, g)
        clock = self.sender.next_clock(p)  # the chunk's own round count
        if g is None:
            push = self.client.push(tid, 0, 0, hyper, clock)
        else:
            push = self.client.push(tid, g.data_ptr(), g.numel(), hyper, clock)
        pull = self.client.pull(tid, p.detach().data_ptr(), numel, clock)
        self.sender.track(p, (push, pull), g, snapshot)

    # -- deferred rounds (Note [Deferred apply]) ----------------------------------
    def _in_ddp(self) -> bool:
        if self.ddp is None:
            self.ddp = self.sender.wrapped_in_ddp()
            if self.ddp and self.cluster.config.staleness != 0:
                raise FastPSError(
                    "fastps: the model is wrapped in DistributedDataParallel, whose all-reduce already "
                    "averages the gradients synchronously; fastps then applies them under BSP only. Use "
                    "FASTPS_STALENESS=0 (the default), or drop the DDP wrapper for SSP/ASP")
        return self.ddp

    def _send_mean(self, p: torch.Tensor) -> None:
        """Push p's gradient; the round's mean lands back in p.grad."""
        tid, _ = self._checked(p)
        g = p.grad
        if g is not None:
            g = check_grad(p, g)
            if g is not p.grad:
                p.grad = g  # contiguous now: the mean lands in .grad itself
        ptr, n = (g.data_ptr(), g.numel()) if g is not None else (0, 0)
        fut = self.client.push_pull(tid, ptr, n, ptr, n, self.sender.next_clock(p), deferred=True)
        self.round[id(p)] = (fut, g, p)

    def _finish_round(self) -> None:
        """End of a backward that pushed (or a step() without one): the other parameters'
        skips, then every mean."""
        for p, _group, _tid, _names in self._registered():
            if id(p) not in self.round:
                if p.grad is not None:
                    self._send_mean(p)
                else:
                    self._send_skip(p)
        try:
            # Each mean is snapshotted (and copied) as soon as it lands, while the
            # later ones are still on their way.
            for key, (fut, g, p) in self.round.items():
                fut.wait()
                if g is None:
                    continue
                self.landed[key] = grad_snapshot(p)
                if self.keep_means:
                    m = self.means.get(key)
                    if m is None or m.shape != g.shape:
                        self.means[key] = m = torch.empty_like(g)
                    m.copy_(g)
        except BaseException as e:
            wait_all((f for f, _, _ in self.round.values()), list(self.round.values()), e)
            self._clear_round()  # (its clock too)
            raise
        self.round_landed = True

    def _send_skip(self, p: torch.Tensor) -> None:
        tid, _ = self._checked(p)
        self.round[id(p)] = (self.client.push_pull(tid, 0, 0, 0, 0, self.sender.next_clock(p), deferred=True),
                             None, p)

    def _clear_round(self) -> None:
        self.round.clear()
        self.landed.clear()
        self.round_landed = False
        self.sender.end_round()

    def _contribution(self, key: int, p: torch.Tensor) -> Tuple[int, float, bool, Optional[torch.Tensor]]:
        """(gradient address or 0, scale, skip, tensor to keep alive) for p's APPLY."""
        g = p.grad
        if g is None:
            return 0, 1.0, True, None
        snap = self.landed.get(key)
        if snap is not None and not grad_changed(p, snap):
            return 0, 1.0, False, None  # the mean as it landed
        g = check_grad(p, g)
        mean = self.means.get(key) if snap is not None else None
        if mean is not None:
            if mean.shape != g.shape:  # a copy made for another tensor of the same id()
                return g.data_ptr(), 1.0, False, g
            s = _C.uniform_scale(g.data_ptr(), g.numel(), mean.data_ptr(), mean.numel())
            if math.isfinite(s):
                return 0, s, False, None
        elif snap is not None:
            self.keep_means = True  # edited, and no copy to compare with: from the next step on
        return g.data_ptr(), 1.0, False, g

    def _step_deferred(self) -> None:
        if not self.round_landed:
            self._finish_round()  # gradients set by hand, or no hook fired: push them now
        futures, keep = [], []
        try:
            for key, (_, _, p) in self.round.items():
                tid, hyper = self._checked(p)
                ptr, scale, skip, g = self._contribution(key, p)
                keep.append(g)
                futures.append(self.client.apply(tid, hyper, p.detach().data_ptr(), p.numel(), ptr,
                                                 p.numel() if ptr else 0, scale, skip))
            for f in futures:
                f.wait()
        except BaseException as e:
            wait_all(futures, (keep, list(self.round.values())), e)
            raise
        finally:
            self._clear_round()

    def _step_ddp(self) -> None:
        """DDP averaged the gradients: one rank per tensor sends its (identical) gradient."""
        futures, keep = [], []
        try:
            for i, (p, group, tid, _names) in enumerate(self._registered()):
                _, hyper = self._checked(p)
                g = p.grad
                mine = i % self.cluster.world_size == self.cluster.rank
                if g is not None and mine:
                    g = check_grad(p, g)
                    keep.append(g)
                    futures.append(self.client.apply(tid, hyper, p.detach().data_ptr(), p.numel(), g.data_ptr(),
                                                     g.numel(), 1.0, False))
                else:
                    futures.append(self.client.apply(tid, hyper, p.detach().data_ptr(), p.numel(), 0, 0, 1.0, True))
            for f in futures:
                f.wait()
        except BaseException as e:
            wait_all(futures, keep, e)
            raise
        finally:
            self.sender.end_round()

    def step(self) -> None:
        if self._in_ddp():
            return self._step_ddp()
        if self.deferred:
            return self._step_deferred()
        for group in self.opt.param_groups:
            for p in group["params"]:
                if id(p) not in self.ids:
                    continue
                if id(p) not in self.inflight:
                    self._send(p)
        self.sender.complete_round(
            "fastps: a parameter's gradient was changed after backward pushed it to the parameter "
            "servers (clip_grad_norm_, GradScaler.unscale_ or another edit between backward and "
            "optimizer.step()); this step used the gradients as backward produced them. Under "
            "SSP/ASP (FASTPS_STALENESS != 0) each gradient is applied as it arrives during "
            "backward: use BSP (FASTPS_STALENESS=0, the default), which honours such edits, or "
            "set FASTPS_OVERLAP=0 to push in step(), after the edits (each worker then edits its "
            "own local gradient, e.g. clips by its local norm), or drop the edit")

    def no_sync(self) -> Any:
        """Backward passes inside send nothing (a context manager)."""
        return self.sender.no_sync()

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
                    futures.append(self.client.state_get(tid, STEP_BUFFER, step.data_ptr(), 1))

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
                    futures.append(self.client.state_set(tid, STEP_BUFFER, s.data_ptr(), 1))
