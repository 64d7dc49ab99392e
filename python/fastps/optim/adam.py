"""``fastps.optim.Adam`` and ``AdamW``: torch's rules, run fused on the parameter server."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import _C
from ._base import ServerOptimizerMixin


def _adam_hyper(group: Dict[str, Any]) -> "_C.OptimHyper":
    h = _C.OptimHyper()
    h.kind = _C.OptimKind.ADAM
    h.lr = float(group["lr"])
    beta1, beta2 = group["betas"]
    h.beta1 = float(beta1)
    h.beta2 = float(beta2)
    h.eps = float(group["eps"])
    h.weight_decay = float(group["weight_decay"])
    h.amsgrad = bool(group["amsgrad"])
    h.maximize = bool(group["maximize"])
    h.decoupled_weight_decay = bool(group.get("decoupled_weight_decay", False))
    return h


def _adam_init_state(p: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
    # The same tensors torch.optim.Adam creates on its first step.
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
        if name not in state:
            state[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)


class Adam(ServerOptimizerMixin, torch.optim.Adam):
    r"""Adam, matching :class:`torch.optim.Adam` on float32 to within 2 ulp per
    element, run as one fused pass per chunk on the parameter server.

    Same signature, defaults and validation as :class:`torch.optim.Adam`
    (including ``decoupled_weight_decay``). ``foreach``, ``fused`` and
    ``capturable`` are accepted and ignored (the server kernel is always
    fused); ``differentiable=True`` is not supported.

    Args:
        params: iterable of parameters, of named parameters, or of param-group dicts.
        lr: learning rate (default: 1e-3).
        betas: coefficients for the running averages (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: L2 penalty (default: 0).
        amsgrad: use the AMSGrad variant (default: False).
        maximize: maximize the objective (default: False).
        decoupled_weight_decay: apply AdamW-style decay (default: False).

    Example::

        opt = fastps.optim.Adam(model.parameters(), lr=3e-4)
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self._fastps_setup()

    def _hyper(self, group: Dict[str, Any]) -> "_C.OptimHyper":
        return _adam_hyper(group)

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        _adam_init_state(p, group, state)


class AdamW(ServerOptimizerMixin, torch.optim.AdamW):
    r"""AdamW (decoupled weight decay), matching :class:`torch.optim.AdamW` on
    float32 to within 2 ulp per element, run fused on the parameter server.

    Same signature and defaults as :class:`torch.optim.AdamW`
    (``weight_decay=1e-2``). See :class:`Adam` for the accepted flags.

    Example::

        opt = fastps.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self._fastps_setup()

    def _hyper(self, group: Dict[str, Any]) -> "_C.OptimHyper":
        h = _adam_hyper(group)
        h.decoupled_weight_decay = True
        return h

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        _adam_init_state(p, group, state)
