"""``fastps bench sparse``: a sparse embedding training step, fastps.nn.Embedding against torch and a floor.

A 1M x 64 float32 table, batches of 16384 ids drawn Zipf(1.05) over 1M ids
(about 42% unique per batch), forward + backward + optimizer step:

  fastps   fastps.nn.Embedding + fastps.optim.Adam (lazy Adam) / fastps.optim.Adagrad
  torch    torch.nn.Embedding(sparse=True) + torch.optim.SparseAdam / torch.optim.Adagrad
  floor    the same dedup-and-update done with whole-array vectorised ops on a
           preallocated dense table, no autograd and no framework around it:
           numpy (np.unique, np.add.at, fancy-indexed update) and torch ops
           (torch.unique, index_add_, index_select/index_copy_); the faster
           of the two per phase is "floor"

Prints per-variant milliseconds for forward, backward and step (step =
optimizer.step() + zero_grad()), fastps's speedup over torch, its ratio to the
floor (dedup + update = backward + step, and the whole iteration), rows/s and
memory per row against the ideal (dim * 4 + optimizer state bytes), then a
breakdown of fastps's iteration into its primitives.

    fastps bench sparse                                   # the recorded configuration
    fastps bench sparse --rows 100000 --steps 10 --warmup 3 --json s.json --plot s.png   # quick
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import fastps
from fastps import _C
from fastps.nn._backend import EmbeddedTable, TableSpec
from fastps.nn.embedding import _chains, _dedup, _segment_sum

from ._common import bar_chart, new_parser, positive_int, save_outputs


def zipf_batches(rows: int, batch: int, count: int, a: float, seed: int) -> List[torch.Tensor]:
    """Batches of ids drawn from a Zipf(a) law truncated to `rows` ids, hot ids scattered."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -a)
    cdf /= cdf[-1]
    perm = rng.permutation(rows).astype(np.int64)  # rank -> id: hot ids are not neighbours
    return [torch.from_numpy(perm[np.searchsorted(cdf, rng.random(batch))]) for _ in range(count)]


Phase = Tuple[float, float, float]  # forward, backward, step in ms


class ModuleVariant:
    """An embedding module and its optimizer; one iteration = forward, backward, step + zero_grad."""

    def __init__(self, emb: torch.nn.Module, opt: torch.optim.Optimizer, grad: torch.Tensor) -> None:
        self.emb, self.opt, self.grad = emb, opt, grad

    def iteration(self, ids: torch.Tensor) -> Phase:
        t0 = time.perf_counter()
        out = self.emb(ids)
        t1 = time.perf_counter()
        out.backward(self.grad)
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3


class NumpyFloor:
    """Lazy Adam / sparse Adagrad with numpy on preallocated dense arrays."""

    def __init__(self, rows: int, dim: int, rule: str, lr: float) -> None:
        self.w = np.random.default_rng(0).uniform(-0.05, 0.05, (rows, dim)).astype(np.float32)
        self.s1 = np.zeros((rows, dim), np.float32)
        self.s2 = np.zeros((rows, dim), np.float32) if rule == "adam" else None
        self.rule, self.lr, self.t = rule, lr, 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        self.u, self.inv = np.unique(ids, return_inverse=True)
        return self.w[self.u][self.inv]

    def backward(self, gout: np.ndarray) -> None:
        self.g = np.zeros((len(self.u), gout.shape[1]), np.float32)
        np.add.at(self.g, self.inv, gout)

    def step(self) -> None:
        self.t += 1
        u, g = self.u, self.g
        if self.rule == "adam":
            b1, b2, eps = 0.9, 0.999, 1e-8
            m, v = self.s1[u], self.s2[u]
            m += (g - m) * np.float32(1 - b1)
            v += (g * g - v) * np.float32(1 - b2)
            step_size = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
            self.w[u] -= np.float32(step_size) * m / (np.sqrt(v) + np.float32(eps))
            self.s1[u], self.s2[u] = m, v
        else:
            s = self.s1[u]
            s += g * g
            self.w[u] -= np.float32(self.lr) * g / (np.sqrt(s) + np.float32(1e-10))
            self.s1[u] = s


class TorchOpsFloor:
    """The same with torch's C++ kernels (unique, index_add_, index_select, index_copy_)."""

    def __init__(self, rows: int, dim: int, rule: str, lr: float) -> None:
        self.w = torch.empty(rows, dim).uniform_(-0.05, 0.05)
        self.s1 = torch.zeros(rows, dim)
        self.s2 = torch.zeros(rows, dim) if rule == "adam" else None
        self.rule, self.lr, self.t = rule, lr, 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.u, self.inv = torch.unique(ids, return_inverse=True)
        return self.w.index_select(0, self.u).index_select(0, self.inv)

    def backward(self, gout: torch.Tensor) -> None:
        self.g = torch.zeros(len(self.u), gout.shape[1]).index_add_(0, self.inv, gout)

    def step(self) -> None:
        self.t += 1
        u, g = self.u, self.g
        w = self.w.index_select(0, u)
        if self.rule == "adam":
            b1, b2, eps = 0.9, 0.999, 1e-8
            m, v = self.s1.index_select(0, u), self.s2.index_select(0, u)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step_size = self.lr * (1 - b2 ** self.t) ** 0.5 / (1 - b1 ** self.t)
            w.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
            self.s1.index_copy_(0, u, m)
            self.s2.index_copy_(0, u, v)
        else:
            s = self.s1.index_select(0, u).addcmul_(g, g)
            w.addcdiv_(g, s.sqrt().add_(1e-10), value=-self.lr)
            self.s1.index_copy_(0, u, s)
        self.w.index_copy_(0, u, w)


class FloorVariant:
    """A floor (NumpyFloor / TorchOpsFloor) driven like a module."""

    def __init__(self, floor, grad: torch.Tensor, numpy: bool) -> None:
        self.floor, self.numpy = floor, numpy
        self.grad = grad.numpy() if numpy else grad

    def iteration(self, ids: torch.Tensor) -> Phase:
        x = ids.numpy() if self.numpy else ids
        t0 = time.perf_counter()
        self.floor.forward(x)
        t1 = time.perf_counter()
        self.floor.backward(self.grad)
        t2 = time.perf_counter()
        self.floor.step()
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3


class PrimitivesVariant:
    """What fastps.nn.Embedding does, as bare calls on a table (no module, no autograd):
    unique, chains + pull into the output | dedup (segment sum) | push. The
    difference to the module's time is the Python and autograd overhead."""

    PARTS = ("unique", "chains", "pull", "dedup", "push")

    def __init__(self, dim: int, rule: str, lr: float, grad: torch.Tensor) -> None:
        r = _C.SparseRule.SPARSE_ADAM if rule == "adam" else _C.SparseRule.ADAGRAD
        self.table = EmbeddedTable(TableSpec(dim=dim, rule=r, init=_C.SparseInit.UNIFORM, init_a=-0.05,
                                             init_b=0.05, seed=0))
        self.optim = _C.SparseOptim(r, lr=lr, eps=1e-8 if rule == "adam" else 1e-10)
        self.grad, self.dim = grad, dim
        self.parts: List[Tuple[float, ...]] = []

    def iteration(self, ids: torch.Tensor) -> Phase:
        t0 = time.perf_counter()
        u, inv, _, _ = _dedup(ids)
        t1 = time.perf_counter()
        first, nxt = _chains(inv, len(u))
        t2 = time.perf_counter()
        self.table.pull_scatter(u, first, nxt, torch.empty(len(ids), self.dim))
        t3 = time.perf_counter()
        g = _segment_sum(self.grad, inv, len(u))
        t4 = time.perf_counter()
        self.table.push(u, g, self.optim, self.table.step + 1)
        t5 = time.perf_counter()
        self.parts.append(tuple((b - a) * 1e3 for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))))
        return (t3 - t0) * 1e3, (t4 - t3) * 1e3, (t5 - t4) * 1e3


def prefill(v, rows: int, dim: int, chunk: int = 1 << 17) -> None:
    """Give every id of [0, rows) a row (zero gradients leave values and state as they were)."""
    for lo in range(0, rows, chunk):
        ids = torch.arange(lo, min(lo + chunk, rows))
        z = torch.zeros(len(ids), dim)
        if isinstance(v, PrimitivesVariant):
            v.table.push(ids, z, v.optim, v.table.step + 1)
        else:
            v.emb(ids).backward(z)
            v.opt.step()
            v.opt.zero_grad()


def run(args) -> dict:
    torch.manual_seed(0)
    batches = zipf_batches(args.rows, args.batch, args.warmup + args.steps, args.zipf, seed=1)
    grad = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(2))
    seen: set = set()
    new_per_batch = []
    for b in batches[args.warmup:]:
        u = torch.unique(b).tolist()
        new_per_batch.append(sum(1 for i in u if i not in seen))
        seen.update(u)
    res: dict = {
        "config": vars(args),
        "unique_per_batch": statistics.mean(len(torch.unique(b)) for b in batches),
        "new_ids_per_batch": statistics.mean(new_per_batch),  # in the measured batches (cold tables)
        "distinct_ids": len(torch.unique(torch.cat(batches))),
        "torch_threads": torch.get_num_threads(),
        "shards": fastps._runtime.embedded().server.num_shards,
        "isa": _C.sparse_optim_isa(),
        "variants": {},
    }
    lr = {"adam": 1e-3, "adagrad": 1e-2}
    for rule in args.rules:
        fopt = fastps.optim.Adam if rule == "adam" else fastps.optim.Adagrad
        variants: Dict[str, object] = {}
        for mode in ("cold", "warm"):
            emb = fastps.nn.Embedding(args.dim, num_embeddings=args.rows)
            variants[f"fastps {mode}"] = ModuleVariant(emb, fopt(emb.parameters(), lr=lr[rule]), grad)
            variants[f"primitives {mode}"] = PrimitivesVariant(args.dim, rule, lr[rule], grad)
            if mode == "warm":
                prefill(variants["fastps warm"], args.rows, args.dim)
                prefill(variants["primitives warm"], args.rows, args.dim)
        temb = torch.nn.Embedding(args.rows, args.dim, sparse=True)
        topt = (torch.optim.SparseAdam(temb.parameters(), lr=lr[rule]) if rule == "adam"
                else torch.optim.Adagrad(temb.parameters(), lr=lr[rule]))
        variants["torch"] = ModuleVariant(temb, topt, grad)
        variants["floor numpy"] = FloorVariant(NumpyFloor(args.rows, args.dim, rule, lr[rule]), grad, True)
        variants["floor torch ops"] = FloorVariant(TorchOpsFloor(args.rows, args.dim, rule, lr[rule]), grad, False)
        names = list(variants)
        times: Dict[str, List[Phase]] = {n: [] for n in names}
        with torch.sparse.check_sparse_tensor_invariants(enable=False):  # torch's default, without its warning
            for i, ids in enumerate(batches):
                k = i % len(names)  # interleaved, in rotating order: load on a shared machine hits all alike
                for n in names[k:] + names[:k]:
                    ph = variants[n].iteration(ids)
                    if i >= args.warmup:
                        times[n].append(ph)
        out = {}
        for n in names:
            rec = {"ms": [statistics.median(t[j] for t in times[n]) for j in range(3)]}
            v = variants[n]
            if isinstance(v, PrimitivesVariant):
                rec["parts"] = dict(zip(v.PARTS, (statistics.median(p[j] for p in v.parts[args.warmup:])
                                                  for j in range(len(v.PARTS)))))
            if n.startswith("fastps"):
                st = v.emb.stats()
                rec["rows"], rec["bytes_per_row"] = st["rows"], st["memory_bytes"] / max(st["rows"], 1)
            out[n] = rec
        res["variants"][rule] = out
        del variants
    return res


def report(res: dict) -> None:
    c = res["config"]
    print(f"# {c['rows']:,} x {c['dim']} float32, batches of {c['batch']} ids Zipf({c['zipf']}): "
          f"{res['unique_per_batch']:.0f} unique per batch ({100 * res['unique_per_batch'] / c['batch']:.1f}%), "
          f"{res['new_ids_per_batch']:.0f} of them new to a cold table; {res['distinct_ids']:,} distinct ids "
          f"in {c['warmup'] + c['steps']} batches")
    print(f"# torch {torch.__version__} ({res['torch_threads']} threads), fastps {fastps.__version__} "
          f"({res['shards']} shards, {res['isa']} sparse kernels); median ms of {c['steps']} steps after "
          f"{c['warmup']}, all variants interleaved step by step")
    print("# cold: rows are created as ids first appear (first pass over the data); warm: every id already has "
          "a row (as in torch's dense table)")
    for rule, v in res["variants"].items():
        state = 2 if rule == "adam" else 1
        ideal = c["dim"] * 4 * (1 + state)
        t = v["torch"]["ms"]
        fl = [min(v["floor numpy"]["ms"][j], v["floor torch ops"]["ms"][j]) for j in range(3)]
        print(f"\n## {rule}: fastps.optim.{'Adam (lazy Adam)' if rule == 'adam' else 'Adagrad'} vs "
              f"torch.optim.{'SparseAdam' if rule == 'adam' else 'Adagrad'}; ideal row {ideal} B (dim*4 + state)")
        print(f"{'variant':>18} {'fwd':>7} {'bwd':>7} {'step':>7} {'total':>7} {'step vs':>8} {'total vs':>9} "
              f"{'bwd+step':>9} {'total /':>8} {'Mrows/s':>8} {'B/row':>6}")
        print(f"{'':>18} {'':>7} {'':>7} {'':>7} {'':>7} {'torch':>8} {'torch':>9} {'/ floor':>9} {'floor':>8} "
              f"{'(step)':>8} {'':>6}")
        for n in ("fastps cold", "fastps warm", "primitives cold", "primitives warm", "torch", "floor numpy",
                  "floor torch ops"):
            f, b, s = v[n]["ms"]
            tot = f + b + s
            mrows = res["unique_per_batch"] / (s * 1e-3) / 1e6
            if n.startswith("fastps"):
                bpr = f"{v[n]['bytes_per_row']:6.0f}"
            elif n.startswith("primitives"):
                bpr = f"{'':>6}"
            else:
                bpr = f"{ideal * c['rows'] / res['distinct_ids']:6.0f}"  # dense: every id allocated
            print(f"{n:>18} {f:7.2f} {b:7.2f} {s:7.2f} {tot:7.2f} {t[2] / s:7.1f}x {sum(t) / tot:8.1f}x "
                  f"{(b + s) / (fl[1] + fl[2]):8.2f}x {tot / sum(fl):7.2f}x {mrows:8.1f} {bpr}")
        print(f"{'floor (best)':>18} {fl[0]:7.2f} {fl[1]:7.2f} {fl[2]:7.2f} {sum(fl):7.2f}")
        for mode in ("cold", "warm"):
            parts = v[f"primitives {mode}"]["parts"]
            over = sum(v[f"fastps {mode}"]["ms"]) - sum(parts.values())
            print(f"# fastps {mode} primitives (ms): " + ", ".join(f"{k} {x:.2f}" for k, x in parts.items())
                  + f"; module overhead (Python, autograd, allocation) {over:.2f}")


def plot(path: str, res: dict) -> None:
    """Bars of each variant's whole iteration (forward + backward + step, median ms), one group per rule."""
    c = res["config"]
    groups = {rule: {n: sum(r["ms"]) for n, r in v.items()} for rule, v in res["variants"].items()}
    bar_chart(path, f"sparse embedding step, {c['rows']:,} x {c['dim']}, batch {c['batch']}, "
              f"Zipf({c['zipf']}) (lower is better)", groups, "ms per iteration (fwd + bwd + step)")


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    ap = new_parser(prog or "fastps bench sparse", __doc__, json_help="also write the results to this file",
                    plot_help="write a PNG bar chart of each variant's iteration time")
    ap.add_argument("--rows", type=positive_int, default=1_000_000, help="ids in the table (1000000)")
    ap.add_argument("--dim", type=positive_int, default=64, help="embedding dimension (64)")
    ap.add_argument("--batch", type=positive_int, default=16384, help="ids per batch (16384)")
    ap.add_argument("--zipf", type=float, default=1.05, help="exponent of the Zipf law of the ids (1.05)")
    ap.add_argument("--steps", type=positive_int, default=50, help="timed steps (50)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    ap.add_argument("--rules", nargs="+", default=["adam", "adagrad"], choices=["adam", "adagrad"])
    args = ap.parse_args(argv)
    if args.zipf <= 0 or args.warmup < 0:
        ap.error("--zipf must be > 0 and --warmup >= 0")
    res = run(args)
    report(res)
    save_outputs(args, res, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
