"""The machinery shared by every ``fastps.optim`` optimizer.

A fastps optimizer is a subclass of the matching ``torch.optim`` class: it
inherits the signature, defaults, hyperparameter validation, ``param_groups``,
``state_dict``/``load_state_dict``, hooks and LR-scheduler support unchanged,
and replaces only :meth:`step`. The step hands every gradient to the parameter
server, whose shard threads run one fused C++ pass per chunk over parameter,
gradient and optimizer state.

Optimizer state lives in ordinary tensors in ``self.state`` under torch's own
names (``exp_avg``, ``sum``, ...), and the embedded server updates those tensors
and the parameters in place, without copies. So a state dict of a fastps
optimizer loads into the torch optimizer and back.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import _C, _runtime
from .._tensor import address, check_grad, check_param


class _Binding:
    __slots__ = ("tensor_id", "addresses", "numel", "server")

    def __init__(self, tensor_id: int, addresses: Tuple[int, ...], numel: int, server: Any) -> None:
        self.tensor_id = tensor_id
        self.addresses = addresses
        self.numel = numel
        self.server = server


def _unregister(server_ref: "weakref.ref[Any]", bindings: Dict[int, _Binding]) -> None:
    emb = server_ref()
    if emb is None:
        return
    for b in list(bindings.values()):
        if b.server is emb:
            try:
                emb.client.unregister_dense(b.tensor_id, b.numel)
            except Exception:  # noqa: BLE001 - best effort at interpreter shutdown
                pass
    bindings.clear()


class ServerOptimizerMixin:
    """Mixed in before a ``torch.optim`` class; see the module docstring."""

    # Names of the per-element state buffers, in the order the C++ rule expects.
    _STATE_NAMES: Tuple[str, ...] = ()

    def _fastps_setup(self) -> None:
        # Binding per parameter (keyed by id(param)); rebuilt after unpickling.
        self._fastps_bindings: Dict[int, _Binding] = {}
        self._fastps_finalizer: Optional[weakref.finalize] = None
        # GradScaler must unscale grads itself and then call step(): our step has
        # no grad_scale/found_inf arguments (torch sets this for fused=True).
        self._step_supports_amp_scaling = False

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._fastps_setup()

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            check_param(params)
        else:
            params = list(params)
            for p in params:
                check_param(p)
            param_group = dict(param_group, params=params)
        if param_group.get("differentiable", False):
            raise ValueError("fastps.optim does not support differentiable=True; use torch.optim")
        super().add_param_group(param_group)  # type: ignore[misc]

    # -- implemented by each optimizer ---------------------------------------------
    def _hyper(self, group: Dict[str, Any]) -> "_C.OptimHyper":
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        """Create the state tensors torch would create on the first step."""
        raise NotImplementedError

    def _advance(self, state: Dict[str, Any], created: bool) -> Tuple[float, bool]:
        """Count one step in ``state``; return (step number, first step?).

        ``created`` is True when :meth:`_init_state` just created the state."""
        step_t = state["step"]
        step_t += 1
        return float(step_t), False

    # -- the step ------------------------------------------------------------------
    def _state_buffers(self, state: Dict[str, Any], hyper: "_C.OptimHyper") -> List[torch.Tensor]:
        names = self._required_state(hyper)
        for n in names:  # a loaded state dict may hold non-contiguous tensors
            if not state[n].is_contiguous():
                state[n] = state[n].contiguous()
        return [state[n] for n in names]

    def _bind(self, emb: Any, p: torch.Tensor, buffers: List[torch.Tensor]) -> None:
        for b in buffers:
            if b.dtype != torch.float32 or b.device.type != "cpu" or b.shape != p.shape:
                raise TypeError(
                    f"fastps: optimizer state of shape {tuple(b.shape)}, dtype {b.dtype} on {b.device} "
                    f"does not match its float32 CPU parameter of shape {tuple(p.shape)}"
                )
        data = p.detach()
        if not data.is_contiguous():
            raise TypeError("fastps: parameters must be contiguous tensors (call .contiguous() on the module's data)")
        addrs = (address(data),) + tuple(address(b) for b in buffers)
        binding = self._fastps_bindings.get(id(p))
        if binding is not None and binding.server is emb and binding.addresses == addrs:
            return
        if binding is None or binding.server is not emb:
            binding = _Binding(_runtime.next_tensor_id(), addrs, p.numel(), emb)
            self._fastps_bindings[id(p)] = binding
        emb.client.register_dense(binding.tensor_id, addrs[0], p.numel(), list(addrs[1:]))
        binding.addresses = addrs
        binding.numel = p.numel()
        if self._fastps_finalizer is None:
            self._fastps_finalizer = weakref.finalize(
                self, _unregister, weakref.ref(emb), self._fastps_bindings
            )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform a single optimization step on the parameter server.

        Args:
            closure: a closure that re-evaluates the model and returns the loss
                (run with gradients enabled, as in torch.optim).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        emb = _runtime.embedded()
        ids: List[int] = []
        grads: List[int] = []
        numels: List[int] = []
        hyper_index: List[int] = []
        steps: List[float] = []
        firsts: List[bool] = []
        hypers = []
        keep_alive = []  # contiguous copies of non-contiguous grads
        for group in self.param_groups:  # type: ignore[attr-defined]
            hyper = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if hyper is None:
                    hyper = self._hyper(group)
                    hypers.append(hyper)
                check_param(p)
                g = check_grad(p, p.grad)
                if g is not p.grad:
                    keep_alive.append(g)
                state = self.state[p]  # type: ignore[attr-defined]
                first_init = len(state) == 0 or any(n not in state for n in self._required_state(hyper))
                if first_init:
                    self._init_state(p, group, state)
                step, first = self._advance(state, first_init)
                self._bind(emb, p, self._state_buffers(state, hyper))
                ids.append(self._fastps_bindings[id(p)].tensor_id)
                grads.append(address(g))
                numels.append(p.numel())
                hyper_index.append(len(hypers) - 1)
                steps.append(step)
                firsts.append(first)
        if ids:
            emb.client.update(ids, grads, numels, hyper_index, steps, firsts, hypers)
        return loss

    def _required_state(self, hyper: "_C.OptimHyper") -> Tuple[str, ...]:
        return tuple(hyper.state_name(i) for i in range(hyper.state_count()))
