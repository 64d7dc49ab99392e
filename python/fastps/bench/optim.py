"""``fastps bench optim``: one optimizer step, fastps.optim.Adam against torch.optim.Adam, in one run.

Compares torch's default CPU Adam (single-tensor loop), foreach=True and
fused=True with fastps's server-side fused kernel, on the same parameter count
laid out as one tensor and as many tensors. Prints median milliseconds per
step and each torch variant's time divided by fastps's (higher = fastps faster).

    fastps bench optim                              # 25M params, 1 and 200 tensors
    fastps bench optim --numel 1e6 --steps 5 --json o.json --plot o.png
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import fastps

from ._common import bar_chart, new_parser, positive_int, save_outputs


def _params(numel: int, ntensors: int) -> List[torch.Tensor]:
    sizes = [numel // ntensors] * ntensors
    sizes[-1] += numel - sum(sizes)
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=gen).requires_grad_() for n in sizes]


def _time_steps(make_opt: Callable[[List[torch.Tensor]], torch.optim.Optimizer], numel: int,
                ntensors: int, steps: int, warmup: int) -> float:
    params = _params(numel, ntensors)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make_opt(params)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        if i >= warmup:
            times.append((t1 - t0) * 1e3)
    del opt, params
    return statistics.median(times)


VARIANTS: Dict[str, Callable[[List[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch default": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "torch foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "torch fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "fastps": lambda ps: fastps.optim.Adam(ps, lr=1e-3),
}


def run(numel: int, layouts: List[int], steps: int, warmup: int) -> List[dict]:
    """Time every variant on every layout; return one record per (layout, variant)."""
    records = []
    for ntensors in layouts:
        ms = {name: _time_steps(make, numel, ntensors, steps, warmup) for name, make in VARIANTS.items()}
        for name, t in ms.items():
            records.append({"numel": numel, "tensors": ntensors, "system": name, "ms": t,
                            "fastps_speedup": t / ms["fastps"]})
    return records


def plot(path: str, records: List[dict]) -> None:
    """Bars of ms per step, one group per layout, one bar per system."""
    groups: Dict[str, Dict[str, float]] = {}
    for r in records:
        groups.setdefault(f"{r['tensors']} tensor{'s' if r['tensors'] > 1 else ''}", {})[r["system"]] = r["ms"]
    bar_chart(path, f"one Adam step, {records[0]['numel'] / 1e6:.1f}M float32 parameters (lower is better)",
              groups, "ms per step")


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    ap = new_parser(prog or "fastps bench optim", __doc__, json_help="also write the records as JSON",
                    plot_help="write a PNG bar chart of ms per step")
    ap.add_argument("--numel", type=float, default=25e6, help="parameters in total (default 25M)")
    ap.add_argument("--tensors", type=positive_int, nargs="+", default=[1, 200], help="layouts to time")
    ap.add_argument("--steps", type=positive_int, default=10, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = ap.parse_args(argv)
    if args.numel < max(args.tensors) or args.warmup < 0:
        ap.error("--numel must be at least the largest --tensors (one element per tensor) and --warmup >= 0")
    numel = int(args.numel)
    print(f"# Adam step, {numel / 1e6:.1f}M float32 params, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fastps {fastps.__version__} "
          f"({fastps._C.optim_kernel_isa()} kernels)")
    print(f"# {'tensors':>8} {'system':>14} {'ms/step':>9} {'x vs fastps':>12}  GB/s*")
    records = run(numel, args.tensors, args.steps, args.warmup)
    for r in records:
        # Bytes an ideal fused Adam moves: read p, g, m, v; write p, m, v (7 x 4 bytes / param).
        gbs = 28 * r["numel"] / (r["ms"] * 1e-3) / 1e9
        print(f"  {r['tensors']:>8} {r['system']:>14} {r['ms']:>9.2f} {r['fastps_speedup']:>11.2f}x  {gbs:6.1f}")
    print("# x vs fastps = that system's time / fastps's time (>1: fastps is faster)")
    print("# GB/s* = 28 bytes per parameter (ideal fused traffic) / time")
    save_outputs(args, records, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
