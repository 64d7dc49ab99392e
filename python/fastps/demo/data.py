"""The demo's data: Python's own standard library source, as bytes.

The corpus is every ``*.py`` file under ``sysconfig.get_paths()['stdlib']``
(site-packages excluded), in sorted path order, read until ``max_bytes``; so
it is the same on every machine with the same Python version and needs no
download. Every 20th file goes to the validation split.

A training batch is a pure function of ``(seed, step)``: the global batch of
step ``s`` is the same whatever the number of workers, rank ``r`` of ``W``
takes rows ``[r * B/W, (r+1) * B/W)`` of it, and a job resumed at step ``s``
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import List, Tuple

import torch

VAL_EVERY = 20  # every 20th file (5%) is held out for validation


@dataclass
class Corpus:
    """Training and validation bytes (uint8 tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    root: str
    files: int
    val_files: int

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.val.numel()


def stdlib_files(root: str = "") -> List[str]:
    """The standard library's ``*.py`` files, relative paths in sorted order."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if f.endswith(".py"):
                out.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
    return sorted(out)


def load_corpus(max_bytes: int = 4_000_000, *, root: str = "") -> Corpus:
    """Read standard library sources in sorted order until ``max_bytes`` in total.

    Args:
        max_bytes: bound on the bytes read (the last file is truncated to fit).
        root: directory to read instead of the standard library (for tests).
    """
    if max_bytes < 4096:
        raise ValueError(f"--data-bytes must be >= 4096, got {max_bytes}")
    root = root or sysconfig.get_paths()["stdlib"]
    train: List[bytes] = []
    val: List[bytes] = []
    total = 0
    files = 0
    for i, rel in enumerate(stdlib_files(root)):
        if total >= max_bytes:
            break
        try:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read(max_bytes - total)
        except OSError:
            continue
        if not data:
            continue
        (val if files % VAL_EVERY == VAL_EVERY - 1 else train).append(data + b"\n")
        total += len(data) + 1
        files += 1
    if not val:  # a tiny cap: hold out the tail of the last file instead
        last = train.pop()
        cut = max(1, len(last) * 19 // 20)
        train.append(last[:cut])
        val.append(last[cut:])
    t = torch.frombuffer(bytearray(b"".join(train)), dtype=torch.uint8)
    v = torch.frombuffer(bytearray(b"".join(val)), dtype=torch.uint8)
    return Corpus(train=t, val=v, root=root, files=files, val_files=len(val))


def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(data: torch.Tensor, *, seed: int, step: int, batch_size: int, context: int,
                rank: int = 0, world_size: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step ``step``'s global batch: inputs and next-byte targets.

    Args:
        data: the training bytes.
        batch_size: the global batch (sequences); must be divisible by ``world_size``.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by {world_size} workers")
    if data.numel() < context + 2:
        raise ValueError(f"the corpus ({data.numel()} bytes) is shorter than the context {context}")
    g = torch.Generator().manual_seed(_mix(seed, step))
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=g)
    per = batch_size // world_size
    return _windows(data, starts[rank * per:(rank + 1) * per], context)


def val_windows(data: torch.Tensor, *, count: int, context: int) -> torch.Tensor:
    """Start offsets of ``count`` evenly spaced validation windows (fixed for a run)."""
    last = data.numel() - context - 1
    if last < 0:
        raise ValueError(f"the validation split ({data.numel()} bytes) is shorter than the context {context}")
    return torch.linspace(0, last, count).long()


def val_batch(data: torch.Tensor, starts: torch.Tensor, context: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _windows(data, starts, context)
