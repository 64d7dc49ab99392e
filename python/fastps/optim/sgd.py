"""``fastps.optim.SGD``: torch.optim.SGD with the update run on the parameter server."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import _C
from ._base import ServerOptimizerMixin


class SGD(ServerOptimizerMixin, torch.optim.SGD):
    r"""Stochastic gradient descent (optionally with momentum), bit-for-bit as
    :class:`torch.optim.SGD`, run as one fused pass per chunk on the server.

    Same signature, defaults and validation as :class:`torch.optim.SGD`.
    ``foreach`` and ``fused`` are accepted and ignored: the server kernel is
    always fused. ``differentiable=True`` is not supported.

    Args:
        params: iterable of parameters, of named parameters, or of param-group dicts.
        lr: learning rate (default: 1e-3).
        momentum: momentum factor (default: 0).
        dampening: dampening for momentum (default: 0).
        weight_decay: L2 penalty (default: 0).
        nesterov: enables Nesterov momentum (default: False).
        maximize: maximize the objective instead of minimizing (default: False).

    Example::

        opt = fastps.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self._fastps_setup()

    def _hyper(self, group: Dict[str, Any]) -> "_C.OptimHyper":
        h = _C.OptimHyper()
        h.kind = _C.OptimKind.SGD
        h.lr = float(group["lr"])
        h.momentum = float(group["momentum"])
        h.dampening = float(group["dampening"])
        h.weight_decay = float(group["weight_decay"])
        h.nesterov = bool(group["nesterov"])
        h.maximize = bool(group["maximize"])
        return h

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            # torch clones the first gradient; the kernel writes it (first_step=True).
            state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)

    def _has_step(self) -> bool:
        return False  # torch.optim.SGD keeps no step counter
