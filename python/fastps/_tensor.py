"""Explicit checks before a tensor's memory is handed to the native core.

Tensors cross into C++ as (address, numel) only after these checks, so the
core never sees a dtype, device or layout it cannot handle (the way faiss's
``contrib/torch_utils.py`` does it).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

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
