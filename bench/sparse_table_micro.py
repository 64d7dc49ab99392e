"""Pull and push of the sparse benchmark's batches straight on tables (no module, no autograd).

    python bench/sparse_table_micro.py [adam|adagrad]

The batches of ``fastps bench sparse`` (1M ids, 16384 per batch, Zipf 1.05),
deduplicated, pulled from and pushed to two tables: a **cold** one (rows are
created as ids first appear) and a **warm** one (all 1M ids given a row
first). Between calls 400 MiB of other memory is written, so the tables' memory
is as uncached as in the full benchmark, where torch's dense tables run in
between. Prints the median milliseconds of each call over 50 batches (after 10).
Used for the before/after figures in bench/README.md.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from fastps.bench.sparse import PrimitivesVariant, prefill, zipf_batches


def main() -> None:
    rule = sys.argv[1] if len(sys.argv) > 1 else "adam"
    if rule not in ("adam", "adagrad"):
        raise SystemExit("usage: python bench/sparse_table_micro.py [adam|adagrad]")
    batches = zipf_batches(1_000_000, 16384, 60, 1.05, seed=1)
    grad = torch.randn(16384, 64, generator=torch.Generator().manual_seed(2))
    dedup = [torch.unique(b, return_inverse=True) for b in batches]
    grads = [torch.zeros(len(u), 64).index_add_(0, inv, grad) for u, inv in dedup]
    cold = PrimitivesVariant(64, rule, 1e-3, grad)
    warm = PrimitivesVariant(64, rule, 1e-3, grad)
    prefill(warm, 1_000_000, 64)
    other = torch.empty(400 << 18)  # 400 MiB
    torch.set_num_threads(1)  # no OpenMP worker spinning on the second core between calls
    times = {k: [] for k in ("cold pull", "cold push", "warm pull", "warm push")}
    for i, ((u, _), g) in enumerate(zip(dedup, grads)):
        for name, v in (("cold", cold), ("warm", warm)):
            other.add_(1.0)
            t0 = time.perf_counter()
            v.table.pull(u)
            t1 = time.perf_counter()
            other.add_(1.0)
            t2 = time.perf_counter()
            v.table.push(u, g, v.optim, v.table.step + 1)
            t3 = time.perf_counter()
            if i >= 10:
                times[name + " pull"].append(t1 - t0)
                times[name + " push"].append(t3 - t2)
    print(rule, "  ".join(f"{k} {statistics.median(x) * 1e3:.2f}" for k, x in times.items()), "(ms, medians)")


if __name__ == "__main__":
    main()
