"""Which server-side sparse rule trains an embedding, with which hyperparameters.

At ``optimizer.step()`` an embedding's rows are trained with the param group
that holds its handle parameter:

* ``optimizer=None`` on the module (the default): the sparse counterpart of the
  optimizer's rule. ``SGD`` -> ``SGD``; ``Adam``/``AdamW`` -> ``SPARSE_ADAM``
  (lazy Adam, as ``torch.optim.SparseAdam``); ``Adagrad`` -> ``ADAGRAD`` (as
  ``torch.optim.Adagrad`` on a sparse gradient).
* ``optimizer="<name>"``: that rule; ``lr`` and whatever of ``eps``, ``betas``,
  ``lr_decay``, ``initial_accumulator_value``, ``maximize``, ``l1``, ``l2``,
  ``ftrl_beta`` the group holds (extra keys of a param group are allowed), the
  rule's defaults for the rest.
* ``optimizer=fastps.nn.SparseOptim(...)``: exactly that rule and those
  hyperparameters; the group only decides when the rows step (so LR schedulers
  do not apply).

Weight decay has no sparse rule: a group with ``weight_decay != 0`` raises
:class:`fastps.errors.InvalidArgumentError` (also a ``ValueError``) before
anything is updated, except with an explicit ``SparseOptim``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch

from .. import _C
from ..errors import InvalidArgumentError

R = _C.SparseRule

RULE_NAMES: Dict[str, Any] = {
    "sgd": R.SGD,
    "adagrad": R.ADAGRAD,
    "rowwise_adagrad": R.ROWWISE_ADAGRAD,
    "adam": R.SPARSE_ADAM,
    "sparse_adam": R.SPARSE_ADAM,
    "lazy_adam": R.SPARSE_ADAM,
    "row_adam": R.ROW_ADAM,
    "ftrl": R.FTRL,
}

# eps when the group has none (an SGD group): the usual default of each rule.
_DEFAULT_EPS = {R.ADAGRAD: 1e-10, R.ROWWISE_ADAGRAD: 1e-8, R.SPARSE_ADAM: 1e-8, R.ROW_ADAM: 1e-8}
_DEFAULT_INIT_ACC = {R.FTRL: 0.1}  # Keras's Ftrl default; 0 for the Adagrad rules

Explicit = Union[None, Any]  # None, a _C.SparseRule, or a _C.SparseOptim


def resolve_optimizer_arg(optimizer: Union[None, str, Any]) -> Explicit:
    """The module's ``optimizer=`` argument as None, a ``_C.SparseRule`` or a ``_C.SparseOptim``."""
    if optimizer is None or isinstance(optimizer, _C.SparseOptim):
        return optimizer
    if isinstance(optimizer, _C.SparseRule):
        return optimizer
    if isinstance(optimizer, str):
        rule = RULE_NAMES.get(optimizer.lower())
        if rule is None:
            raise InvalidArgumentError(
                f"fastps.nn: unknown sparse optimizer {optimizer!r}; choose one of {sorted(RULE_NAMES)} "
                "or pass a fastps.nn.SparseOptim")
        return rule
    raise TypeError(f"fastps.nn: optimizer must be None, a name or a fastps.nn.SparseOptim, got {type(optimizer).__name__}")


def implied_rule(optimizer: torch.optim.Optimizer) -> Any:
    """The sparse counterpart of ``optimizer``'s dense rule."""
    # AdamW may or may not subclass Adam depending on the torch version: test both.
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return R.SPARSE_ADAM
    if isinstance(optimizer, torch.optim.Adagrad):
        return R.ADAGRAD
    if isinstance(optimizer, torch.optim.SGD):
        return R.SGD
    raise InvalidArgumentError(
        f"fastps.nn: {type(optimizer).__name__} has no sparse counterpart; pass optimizer='sgd', 'adagrad', "
        "'rowwise_adagrad', 'adam', 'row_adam' or 'ftrl' to the embedding")


def _f(group: Dict[str, Any], key: str, default: float) -> float:
    v = group.get(key, default)
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def sparse_optim(optimizer: torch.optim.Optimizer, group: Dict[str, Any], explicit: Explicit,
                 what: str) -> Any:
    """The ``_C.SparseOptim`` for one push of the embedding ``what`` (named in errors)."""
    if isinstance(explicit, _C.SparseOptim):
        return explicit
    if _f(group, "weight_decay", 0.0) != 0.0:
        raise InvalidArgumentError(
            f"fastps.nn: {what} is in a param group with weight_decay={group['weight_decay']}; sparse rows "
            "have no weight decay. Give the embedding its own group with weight_decay=0, e.g. "
            "[{'params': dense_params}, {'params': embedding.parameters(), 'weight_decay': 0.0}]")
    if explicit is None:
        rule = implied_rule(optimizer)
        if rule == R.SGD and (_f(group, "momentum", 0.0) != 0.0 or group.get("nesterov", False)):
            raise InvalidArgumentError(
                f"fastps.nn: {what} is in an SGD group with momentum={group['momentum']}; sparse SGD has no "
                "momentum. Give the embedding its own group with momentum=0, or pass optimizer='adagrad' "
                "(or another sparse rule) to the embedding")
        if rule == R.SPARSE_ADAM and group.get("amsgrad", False):
            raise InvalidArgumentError(
                f"fastps.nn: {what} is in an Adam group with amsgrad=True; lazy (sparse) Adam has no "
                "AMSGrad variant, as torch.optim.SparseAdam. Use amsgrad=False for the embedding's group")
    else:
        rule = explicit
    betas = group.get("betas", (0.9, 0.999))
    return _C.SparseOptim(
        rule,
        lr=_f(group, "lr", 0.01),
        eps=_f(group, "eps", _DEFAULT_EPS.get(rule, 1e-8)),
        maximize=bool(group.get("maximize", False)),
        lr_decay=_f(group, "lr_decay", 0.0),
        initial_accumulator_value=_f(group, "initial_accumulator_value", _DEFAULT_INIT_ACC.get(rule, 0.0)),
        beta1=float(betas[0]),
        beta2=float(betas[1]),
        l1=_f(group, "l1", 0.0),
        l2=_f(group, "l2", 0.0),
        ftrl_beta=_f(group, "ftrl_beta", 0.0),
    )


def rule_name(rule: Optional[Any]) -> str:
    return "undecided" if rule is None else rule.name
