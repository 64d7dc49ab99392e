"""``fastps.Client``: low-level push / pull / push_pull of dense tensors.

For benchmarks and advanced users; training code uses ``fastps.optim`` or
:class:`fastps.DistributedOptimizer`. Works in the distributed mode (one rank of
a ``torchrun`` job); every rank must register the same tensors in the same order.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C, _cluster
from ._tensor import check_param
from .errors import InvalidArgumentError


class Future:
    """A pending request. :meth:`wait` blocks until it completed and raises its error."""

    def __init__(self, native: "_C.Future", keep: tuple = ()) -> None:
        self._native = native
        self._keep = keep  # tensors the request reads or writes, alive until done

    def done(self) -> bool:
        """True once the request completed or failed."""
        return self._native.done()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until done (default deadline: ``FASTPS_TIMEOUT``).

        Raises:
            fastps.TimeoutError, fastps.ConnectionError, fastps.InvalidArgumentError
        """
        self._native.wait(0.0 if timeout is None else float(timeout))
        self._keep = ()


class Client:
    """Push, pull and push_pull dense float32 tensors through the job's servers.

    Example (run under ``torchrun --nproc-per-node 2``)::

        client = fastps.Client()
        key = client.register(torch.zeros(1 << 20), aggregate=True)
        out = torch.empty(1 << 20)
        client.push_pull(key, grad, out).wait()     # out = sum of every rank's grad
    """

    def __init__(self) -> None:
        cl = _cluster.cluster()
        if cl is None:
            raise InvalidArgumentError(
                "fastps.Client needs the distributed mode: launch with torchrun (WORLD_SIZE > 1)")
        self._cluster = cl
        self._client = cl.client
        self._numel = {}  # the round clocks are the C++ client's (Note [Round clocks])

    @property
    def rank(self) -> int:
        """This worker's rank."""
        return self._cluster.rank

    @property
    def world_size(self) -> int:
        """Number of workers."""
        return self._cluster.world_size

    def register(self, tensor: torch.Tensor, *, aggregate: bool = True) -> int:
        """Create a key for tensors shaped like ``tensor`` (rank 0's values are its initial value).

        Args:
            tensor: float32 CPU tensor.
            aggregate: True for a push_pull (sum) key; False for a plain parameter key
                updated by pushes with SGD(lr=1) semantics.
        Returns:
            The key to use in push/pull/push_pull.
        """
        check_param(tensor, "tensor")
        t = tensor.detach().contiguous()
        key = self._cluster.next_tensor_id()
        h = _C.OptimHyper()
        h.kind = _C.OptimKind.SGD
        h.lr = 1.0
        init = t.data_ptr() if self._cluster.rank == 0 else 0
        self._client.register_dense(key, t.numel(), aggregate, h, init, t.numel() if init else 0).wait()
        self._cluster.barrier(f"client/{key}", "every rank to register the key")
        self._numel[key] = t.numel()
        return key

    def _check(self, key: int, t: torch.Tensor, what: str) -> torch.Tensor:
        # The common case in a few attribute reads (a 1 KiB round trip is tens
        # of microseconds; check_param's messages cost more than that budget).
        if (type(t) is torch.Tensor and t.dtype is torch.float32 and t.is_cpu and t.layout is torch.strided
                and t.numel() == self._numel.get(key) and t.is_contiguous()):
            return t
        if key not in self._numel:
            raise InvalidArgumentError(f"fastps: unknown key {key}; call register() first")
        check_param(t, what)
        if t.numel() != self._numel[key] or not t.is_contiguous():
            raise InvalidArgumentError(
                f"fastps: {what} must be contiguous with {self._numel[key]} elements, got {t.numel()}")
        return t

    def push_pull(self, key: int, tensor: torch.Tensor, out: Optional[torch.Tensor] = None) -> Future:
        """Sum ``tensor`` over all workers into ``out`` (default: in place). Returns a Future."""
        self._check(key, tensor, "tensor")
        out = tensor if out is None or out is tensor else self._check(key, out, "out")
        clock = self._client.advance_round(key)
        return Future(self._client.push_pull(key, tensor.data_ptr(), tensor.numel(), out.data_ptr(), out.numel(),
                                             clock), (tensor, out))

    def push(self, key: int, tensor: torch.Tensor) -> Future:
        """Push a gradient to a parameter key (``aggregate=False``). Returns a Future."""
        self._check(key, tensor, "tensor")
        clock = self._client.advance_round(key)
        h = _C.OptimHyper()
        h.kind = _C.OptimKind.SGD
        h.lr = 1.0
        return Future(self._client.push(key, tensor.data_ptr(), tensor.numel(), h, clock), (tensor,))

    def pull(self, key: int, out: torch.Tensor) -> Future:
        """Pull the key's current value (after this worker's pushes are applied) into ``out``."""
        self._check(key, out, "out")
        return Future(self._client.pull(key, out.data_ptr(), out.numel(), self._client.round(key)), (out,))
