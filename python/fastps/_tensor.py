"""Explicit checks before a tensor's memory is handed to the native core.

Tensors cross into C++ as (address, numel) only after these checks, so the
core never sees a dtype, device or layout it cannot handle (the way faiss's
``contrib/torch_utils.py`` does it).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

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
            f"fastps: got a sparse gradient; fastps.optim supports dense {SUPPORTED}. "
            "Use torch.optim.SparseAdam for sparse embedding gradients"
        )
    if g.device.type != "cpu" or g.dtype != torch.float32:
        raise TypeError(
            f"fastps: gradient has dtype {g.dtype} on {g.device}; fastps.optim supports {SUPPORTED}"
        )
    if g.shape != p.shape:
        raise ValueError(f"fastps: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    return g if g.is_contiguous() else g.contiguous()


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
