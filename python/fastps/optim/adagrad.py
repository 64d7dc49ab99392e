"""``fastps.optim.Adagrad``: torch's rule, run fused on the parameter server."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import _C
from ._base import ServerOptimizerMixin


class Adagrad(ServerOptimizerMixin, torch.optim.Adagrad):
    r"""Adagrad, matching :class:`torch.optim.Adagrad` on float32 to within
    2 ulp per element, run as one fused pass per chunk on the parameter server.

    Same signature, defaults and validation as :class:`torch.optim.Adagrad`
    (``lr_decay``, ``weight_decay``, ``initial_accumulator_value``, ``eps``,
    ``maximize``). Dense gradients only.

    Example::

        opt = fastps.optim.Adagrad(model.parameters(), lr=0.01)
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self._fastps_setup()

    def _hyper(self, group: Dict[str, Any]) -> "_C.OptimHyper":
        h = _C.OptimHyper()
        h.kind = _C.OptimKind.ADAGRAD
        h.lr = float(group["lr"])
        h.lr_decay = float(group["lr_decay"])
        h.weight_decay = float(group["weight_decay"])
        h.initial_accumulator_value = float(group["initial_accumulator_value"])
        h.eps = float(group["eps"])
        h.maximize = bool(group["maximize"])
        return h

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        # torch.optim.Adagrad creates this state eagerly in __init__; this covers
        # groups added later with add_param_group.
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if "sum" not in state:
            state["sum"] = torch.full_like(
                p, group["initial_accumulator_value"], memory_format=torch.contiguous_format
            )
