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

from .. import _C, _cluster, _runtime
from ._distributed import DistState
from .._tensor import address, check_grad, check_param, check_state_fits, check_unshared
from ..nn._grads import is_sparse_handle, push_sparse_grads

_F32 = torch.float32
_STRIDED = torch.strided


class _Binding:
    """What one parameter is bound to on the embedded server.

    Holds strong references to the bound state tensors so their memory can
    never be freed while the server may still write it.
    """

    __slots__ = ("tensor_id", "server", "param_ptr", "numel", "state", "names", "tensors")

    def __init__(self, tensor_id: int, server: Any) -> None:
        self.tensor_id = tensor_id
        self.server = server
        self.param_ptr = 0
        self.numel = 0
        self.state: Optional[Dict[str, Any]] = None
        self.names: Tuple[str, ...] = ()
        self.tensors: Tuple[torch.Tensor, ...] = ()

    def current(self, emb: Any, p: torch.Tensor, state: Any, names: Tuple[str, ...]) -> bool:
        """True if nothing this binding points at has moved since it was made."""
        if self.server is not emb or self.state is not state or self.names != names:
            return False
        if p.data_ptr() != self.param_ptr:
            return False
        for n, t in zip(names, self.tensors):
            if state.get(n) is not t:
                return False
        return True


def _unregister(server_ref: "weakref.ref[Any]", bindings: Dict[int, _Binding]) -> None:
    emb = server_ref()
    if emb is None:
        return
    for b in list(bindings.values()):
        if b.server is emb:
            try:
                emb.client.unregister_dense(b.tensor_id)
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
        # Distributed mode (WORLD_SIZE > 1): state lives on the servers.
        self._fastps_dist: Optional[DistState] = None
        cl = _cluster.cluster()
        if cl is not None:
            self._fastps_dist = DistState(self, cl, overlap=cl.config.overlap)
            self._fastps_dist.register_groups(self.param_groups)  # type: ignore[attr-defined]
        # GradScaler must unscale grads itself and then call step(): our step has
        # no grad_scale/found_inf arguments (torch sets this for fused=True).
        self._step_supports_amp_scaling = False

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        # Unpickling or deepcopy builds a new object: set it up. torch's own
        # load_state_dict also calls __setstate__ on a live optimizer: keep its
        # bindings (they are re-checked each step) and its distributed state.
        if not hasattr(self, "_fastps_bindings"):
            self._fastps_setup()

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group, after checking every tensor is float32, dense and on the CPU,
        and that no two parameters share memory (See :func:`fastps._tensor.check_unshared`).

        Raises:
            TypeError: for a parameter fastps cannot serve.
            fastps.InvalidArgumentError: (a ValueError) for a parameter listed twice, or
                parameters that are overlapping views of one tensor.
            ValueError: for ``differentiable=True`` (not supported).
        """
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            check_param(params)
            tensors = [params]
        else:
            params = list(params)
            # named parameters arrive as (name, tensor) pairs
            tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
            for p in tensors:
                check_param(p)
            param_group = dict(param_group, params=params)
        # Before torch's own add_param_group, which only warns about a duplicate.
        check_unshared(tensors, [p for g in self.param_groups for p in g["params"]])  # type: ignore[attr-defined]
        super().add_param_group(param_group)  # type: ignore[misc]
        if self.param_groups[-1].get("differentiable", False):  # type: ignore[attr-defined]
            self.param_groups.pop()  # type: ignore[attr-defined]
            raise ValueError("fastps.optim does not support differentiable=True; use torch.optim")
        dist = getattr(self, "_fastps_dist", None)
        if dist is not None:
            dist.register_groups([self.param_groups[-1]])  # type: ignore[attr-defined]

    def no_sync(self):
        """Context manager: backward passes inside it accumulate gradients locally
        without pushing them (gradient accumulation in the distributed mode, like
        DDP's ``no_sync``). A no-op in the embedded mode.

        Example::

            with opt.no_sync():
                loss1.backward()
            loss2.backward()   # pushes the accumulated gradient
            opt.step()
        """
        import contextlib

        dist = getattr(self, "_fastps_dist", None)
        return dist.no_sync() if dist is not None else contextlib.nullcontext()

    def state_dict(self) -> Dict[str, Any]:
        """torch's state_dict; in the distributed mode the state is first fetched from the servers."""
        dist = getattr(self, "_fastps_dist", None)
        if dist is not None:
            dist.fetch_state()
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's load_state_dict, then a check that the loaded state fits the parameters;
        in the distributed mode the loaded state and this rank's current parameter values
        are then sent to the servers.

        As in torch, state tensors are cast to their parameter's dtype and device.
        Unlike torch, which fails only in the next ``step()``, a state tensor of
        another shape than its parameter (a state dict saved for another model)
        is refused here, and the optimizer is left as it was.

        Raises:
            fastps.InvalidArgumentError: (a ValueError) a state tensor does not fit
                its parameter; the message names both.
        """
        old = self.state, self.param_groups  # type: ignore[attr-defined]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        try:
            self._check_state()
        except BaseException:
            # torch built new state and group objects: the old ones are intact.
            self.state, self.param_groups = old  # type: ignore[attr-defined]
            raise
        dist = getattr(self, "_fastps_dist", None)
        if dist is not None:
            dist.push_state()

    def _check_state(self) -> None:
        """Raise InvalidArgumentError unless every state tensor fits its parameter."""
        index = 0
        for group in self.param_groups:  # type: ignore[attr-defined]
            names = group.get("param_names")
            for k, p in enumerate(group["params"]):
                state = self.state.get(p)  # type: ignore[attr-defined]
                if state:
                    what = f"parameter {index}" + (f" ({names[k]!r})" if names else "")
                    check_state_fits(p, state, what)
                index += 1

    # -- implemented by each optimizer ---------------------------------------------
    def _hyper(self, group: Dict[str, Any]) -> "_C.OptimHyper":
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: Dict[str, Any], state: Dict[str, Any]) -> None:
        """Create the state tensors torch would create on the first step."""
        raise NotImplementedError

    def _has_step(self) -> bool:
        """Whether the rule keeps torch's float32 state['step'] counter."""
        return True

    # -- binding ---------------------------------------------------------------------
    def _names(self, hyper: "_C.OptimHyper") -> Tuple[str, ...]:
        return tuple(hyper.state_name(i) for i in range(hyper.state_count()))

    def _bind(self, emb: Any, p: torch.Tensor, group: Dict[str, Any], names: Tuple[str, ...]) -> _Binding:
        """Slow path: validate, create missing state, (re)register with the server."""
        check_param(p)
        if not p.is_contiguous():
            raise TypeError("fastps: parameters must be contiguous tensors")
        # Rules without state (SGD without momentum) leave self.state untouched, as torch does.
        need_state = bool(names) or self._has_step()
        state = self.state[p] if need_state else self.state.get(p)  # type: ignore[attr-defined]
        fresh = need_state and (any(n not in state for n in names) or (self._has_step() and "step" not in state))
        if fresh:
            self._init_state(p, group, state)
        for n in names:
            t = state[n]
            if t.dtype != torch.float32 or t.device.type != "cpu" or t.shape != p.shape:
                raise TypeError(
                    f"fastps: optimizer state {n!r} of shape {tuple(t.shape)}, dtype {t.dtype} on {t.device} "
                    f"does not match its float32 CPU parameter of shape {tuple(p.shape)}"
                )
            if not t.is_contiguous():  # a loaded state dict may hold strided tensors
                state[n] = t.contiguous()
        step_ptr = 0
        if self._has_step():
            step = state["step"]
            if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.numel() == 1
                    and step.device.type == "cpu"):
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
            step_ptr = state["step"].data_ptr()
        b = self._fastps_bindings.get(id(p))
        if b is None or b.server is not emb:
            b = _Binding(_runtime.next_tensor_id(), emb)
            self._fastps_bindings[id(p)] = b
        tensors = tuple(state[n] for n in names)
        emb.client.register_dense(b.tensor_id, address(p.detach()), p.numel(),
                                  [address(t) for t in tensors], [t.numel() for t in tensors],
                                  step_ptr, 1 if self._has_step() else 0, fresh)
        b.param_ptr, b.numel, b.state, b.names = p.data_ptr(), p.numel(), state, names
        # The step tensor is referenced too: the server writes through its pointer.
        b.tensors = tensors + ((state["step"],) if self._has_step() else ())
        if self._fastps_finalizer is None:
            self._fastps_finalizer = weakref.finalize(
                self, _unregister, weakref.ref(emb), self._fastps_bindings
            )
        return b

    def _step_empty(self, p: torch.Tensor, group: Dict[str, Any]) -> None:
        check_param(p)
        state = self.state[p]  # type: ignore[attr-defined]
        if not state:
            self._init_state(p, group, state)
        if self._has_step():
            state["step"] += 1

    # -- the step ------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform a single optimization step on the parameter server.

        Parameters whose ``.grad`` is None are left untouched.

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
        # fastps.nn embeddings whose handles this optimizer holds: push their rows'
        # gradients first (every such group is validated before the first push).
        push_sparse_grads(self)  # type: ignore[arg-type]
        if self._fastps_dist is not None:
            self._fastps_dist.step()
            return loss
        emb = _runtime.embedded()
        bindings = self._fastps_bindings
        state_map = self.state  # type: ignore[attr-defined]
        ids: List[int] = []
        grads: List[int] = []
        grad_numel: List[int] = []
        hyper_index: List[int] = []
        hypers = []
        keep_alive = []  # contiguous copies of strided gradients, alive until update() returns
        for group in self.param_groups:  # type: ignore[attr-defined]
            hyper = None
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if p.numel() == 0:  # nothing to update; count the step as torch does
                    if not is_sparse_handle(p):  # an embedding's handle: trained by push_sparse_grads
                        self._step_empty(p, group)
                    continue
                if hyper is None:
                    hyper = self._hyper(group)
                    names = self._names(hyper)
                    hypers.append(hyper)
                    gi = len(hypers) - 1
                b = bindings.get(id(p))
                if b is None or not b.current(emb, p, state_map.get(p), names):
                    b = self._bind(emb, p, group, names)
                if g.dtype is not _F32 or not g.is_contiguous() or not g.is_cpu or g.shape != p.shape \
                        or g.layout is not _STRIDED:
                    g = check_grad(p, g)
                    keep_alive.append(g)
                ids.append(b.tensor_id)
                grads.append(g.data_ptr())
                grad_numel.append(g.numel())
                hyper_index.append(gi)
        if ids:
            emb.client.update(ids, grads, grad_numel, hyper_index, hypers)
        return loss
