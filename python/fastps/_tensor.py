"""Explicit checks before a tensor's memory is handed to the native core.

Tensors cross into C++ as (address, numel) only after these checks, so the
core never sees a dtype, device or layout it cannot handle (the way faiss's
``contrib/torch_utils.py`` does it).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import InvalidArgumentError

SUPPORTED = "float32 tensors on the CPU (dense, strided)"


def check_param(p: torch.Tensor, what: str = "parameter") -> None:
    """Raise TypeError unless ``p`` is a float32, dense CPU tensor."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"fastps: {what} must be a torch.Tensor, got {type(p).__name__}")
    if p.layout != torch.strided:
        raise TypeError(f"fastps: {what} has layout {p.layout}; fastps supports {SUPPORTED}")
    if p.device.type != "cpu":
        raise TypeError(
            f"fastps: {what} is on device {p.device}; fastps.optim supports {SUPPORTED}. "
            "Keep the model on the CPU or use torch.optim for this parameter."
        )
    if p.dtype != torch.float32:
        raise TypeError(
            f"fastps: {what} has dtype {p.dtype}; fastps.optim supports {SUPPORTED}. "
            "Convert with .float() (keep a float32 master copy for mixed precision)."
        )


def check_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Return a contiguous float32 view of ``g`` matching ``p``, or raise TypeError."""
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(
            f"fastps: got a sparse gradient (torch.nn.Embedding(sparse=True)?); fastps.optim supports dense "
            f"{SUPPORTED}. For sparse embeddings use fastps.nn.Embedding or fastps.nn.EmbeddingBag: their rows "
            "live on the parameter servers and the same fastps.optim optimizer trains them (docs/sparse.md)"
        )
    if g.device.type != "cpu" or g.dtype != torch.float32:
        raise TypeError(
            f"fastps: gradient has dtype {g.dtype} on {g.device}; fastps.optim supports {SUPPORTED}"
        )
    if g.shape != p.shape:
        raise ValueError(f"fastps: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    return g if g.is_contiguous() else g.contiguous()


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The bytes [start, end) a strided tensor's elements lie in (strides are never negative)."""
    start = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_unshared(params: Sequence[torch.Tensor], existing: Sequence[torch.Tensor] = ()) -> None:
    """Raise InvalidArgumentError if ``params`` (one new param group) lists a tensor twice, or
    if two tensors of ``params`` and ``existing`` (the optimizer's other groups) share memory.

    fastps.optim updates every parameter as a tensor of its own on the parameter
    server, once per step. torch.optim updates a parameter listed twice twice
    (with a warning), and overlapping views one after the other in place; the
    server cannot do either (the distributed mode would lose one update of the
    shared elements, the embedded mode would race on them), so fastps refuses
    both, the same way in every mode. The very same tensor in two groups is left
    to torch's own ValueError. See docs/optim.md "Parameters that share memory".
    """
    seen: Dict[int, int] = {}
    base = len(existing)
    for i, p in enumerate(params):
        if id(p) in seen:
            raise InvalidArgumentError(
                f"fastps: parameter {base + i} is parameter {base + seen[id(p)]} again (one tensor listed twice "
                "in a param group). torch.optim warns about a duplicate and then updates it twice per step (and plans "
                "to refuse it, pytorch/pytorch#40967); fastps refuses it: the parameter server updates each "
                "parameter once per step. List each parameter once, e.g. params = list(dict.fromkeys(params)) "
                "(model.parameters() already lists tied weights once)")
        seen[id(p)] = i
    spans: List[Tuple[int, int, int, Any]] = []
    for i, p in enumerate(list(existing) + list(params)):
        if p.numel() > 0 and p.layout == torch.strided and p.device.type == "cpu":
            start, end = _span(p)
            spans.append((start, end, i, p))
    spans.sort(key=lambda s: (s[0], s[1]))
    reach: Optional[Tuple[int, int, int, Any]] = None  # the span reaching furthest so far
    for span in spans:
        if reach is not None and span[0] < reach[1] and span[3] is not reach[3] and max(span[2], reach[2]) >= base:
            i, j = sorted((reach[2], span[2]))
            raise InvalidArgumentError(
                f"fastps: parameters {i} and {j} share memory (views of one tensor that overlap). torch.optim "
                "updates them one after the other in place; fastps updates each parameter as a tensor of its own "
                "on the parameter server, so the shared elements would lose one of the two updates (distributed mode) "
                "or get both at once, racing (embedded mode). Make them "
                "separate tensors (nn.Parameter(view.clone())), or optimize the tensor they view as one parameter")
        if reach is None or span[1] > reach[1]:
            reach = span


def check_state_fits(p: torch.Tensor, state: Dict[str, Any], what: str) -> None:
    """Raise InvalidArgumentError unless the optimizer state of parameter ``p`` fits it.

    Every state tensor but ``step`` holds one value per element of the
    parameter (``exp_avg``, ``sum``, ``momentum_buffer``, ...) and must have its
    shape; ``step`` must be one number. ``what`` names the parameter in the message.
    """
    for key, value in state.items():
        if key == "step":
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                continue
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidArgumentError(
                f"fastps: the optimizer state 'step' of {what} is a {got}, not one number; load a state dict "
                "saved by a torch.optim or fastps.optim optimizer of the same kind")
        if isinstance(value, torch.Tensor) and value.shape != p.shape:
            raise InvalidArgumentError(
                f"fastps: the optimizer state {key!r} of {what} has shape {tuple(value.shape)}, but the parameter "
                f"has shape {tuple(p.shape)}: the state dict was saved for another model (or with the parameters "
                "in another order). Load a state dict saved by an optimizer over this model, with its param "
                "groups in the same order, or start this optimizer afresh (do not load it)")


def address(t: torch.Tensor) -> int:
    """Address of the first element of a contiguous tensor."""
    return t.data_ptr()


GradSnapshot = Tuple[Optional[torch.Tensor], int]


def grad_snapshot(p: torch.Tensor) -> GradSnapshot:
    """``p.grad`` and its in-place version counter now, for :func:`grad_changed` later."""
    g = p.grad
    return g, (g._version if g is not None else 0)


def grad_changed(p: torch.Tensor, snapshot: GradSnapshot) -> bool:
    """True if ``p.grad`` was replaced, or edited in place, since ``snapshot`` was taken
    (clip_grad_norm_, GradScaler.unscale_, ...); a gradient that was None is never changed."""
    g, version = snapshot
    return g is not None and (p.grad is not g or g._version != version)
