"""Quick start: the one-line swap from torch.optim to fastps.optim.

Trains the same small MLP twice from the same seed, once with
torch.optim.AdamW and once with fastps.optim.AdamW (the update runs fused on
fastps's embedded parameter server), and prints both loss curves side by side.

    python examples/quickstart.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fastps


def make_data(n: int = 4096, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def train(optimizer_cls, steps: int, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 1))
    opt = optimizer_cls(model.parameters(), lr=3e-3, weight_decay=0.01)  # <- the only line that differs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (256,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    x, y = make_data()
    print(f"fastps {fastps.__version__}: training a 3-layer MLP for {args.steps} steps, twice")
    ref, t_ref = train(torch.optim.AdamW, args.steps, x, y)
    ours, t_ours = train(fastps.optim.AdamW, args.steps, x, y)
    print(f"{'step':>6} {'torch.optim.AdamW':>18} {'fastps.optim.AdamW':>19}")
    for s in sorted({0, 1, 10, 50, 100, args.steps // 2, args.steps - 1}):
        if s < args.steps:
            print(f"{s:>6} {ref[s]:>18.6f} {ours[s]:>19.6f}")
    drift = max(abs(a - b) for a, b in zip(ref, ours))
    print(f"largest loss difference over the run: {drift:.2e} (float32 rounding; torch's sqrt is not "
          f"correctly rounded)")
    print(f"done in {t_ref + t_ours:.1f} s (for timings see bench/bench_optim.py)")
    k = max(1, min(10, args.steps // 4))
    if not sum(ours[-k:]) < sum(ours[:k]):  # mean of the last k minibatches vs the first k
        raise SystemExit("the loss did not decrease: something is wrong")


if __name__ == "__main__":
    main()
