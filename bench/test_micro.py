"""pytest-benchmark entries for the suite's microbenchmarks (`fastps bench ...` has the full runs).

    pip install ".[bench]"
    python -m pytest bench/ --benchmark-only                 # all of them
    python -m pytest bench/ --benchmark-only -k push_pull     # one family

Not part of the test run (pyproject's testpaths is tests/). Three families:

- push_pull: ``fastps.Client.push_pull`` of 4 KiB .. 16 MiB between this process
  (rank 0, with its colocated server) and one peer process (rank 1) that this
  module starts; the peer mirrors every operation, driven over its stdin.
- adam_step: one ``step()`` on 1M float32 parameters, fastps.optim.Adam against
  torch.optim.Adam (default, foreach, fused), as in ``fastps bench optim``.
- sparse_step: forward + backward + step of a 100k x 32 embedding on 4096
  Zipf ids, fastps.nn.Embedding + lazy Adam against torch's sparse Embedding +
  SparseAdam, as in ``fastps bench sparse``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import fastps  # noqa: E402 - after the skip: `pytest bench/` without the plugin skips, not errors
from fastps import _cluster  # noqa: E402
from fastps._cluster import free_port  # noqa: E402
from fastps.bench.optim import VARIANTS, _params  # noqa: E402
from fastps.bench.sparse import ModuleVariant, zipf_batches  # noqa: E402

PUSH_PULL = {4 << 10: 200, 64 << 10: 200, 1 << 20: 50, 16 << 20: 10}  # bytes -> timed rounds
WARMUP = 3
JOB_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "FASTPS_TIMEOUT")


def _peer() -> int:
    """Rank 1: for each line 'numel count' on stdin, register a key and take part in `count` push_pulls."""
    client = fastps.Client()
    for line in sys.stdin:
        numel, count = map(int, line.split())
        inp, out = torch.full((numel,), 2.0), torch.empty(numel)
        key = client.register(inp, aggregate=True)
        for _ in range(count):
            client.push_pull(key, inp, out).wait()
    return 0


class TestPushPull:
    @pytest.fixture(scope="class")
    def job(self):
        """This process as rank 0 of a 2-worker job, the peer as rank 1; both leave at the end."""
        saved = {k: os.environ.get(k) for k in JOB_ENV}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                          FASTPS_TIMEOUT="30")
        peer = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, text=True,
                                env=dict(os.environ, RANK="1", LOCAL_RANK="1"), start_new_session=True)
        os.environ.update(RANK="0", LOCAL_RANK="0")
        try:
            yield peer, fastps.Client()
        finally:
            peer.stdin.close()  # the peer's loop ends; both meet at the shutdown barrier
            _cluster.reset_for_tests()
            try:
                peer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @pytest.mark.parametrize("size", list(PUSH_PULL), ids=lambda n: f"{n >> 10}KiB")
    def test_push_pull(self, benchmark, job, size):
        peer, client = job
        numel, rounds = size // 4, PUSH_PULL[size]
        total = rounds + WARMUP
        peer.stdin.write(f"{numel} {total}\n")
        peer.stdin.flush()
        inp, out = torch.ones(numel), torch.empty(numel)
        key = client.register(inp, aggregate=True)
        done = [0]

        def op() -> None:
            client.push_pull(key, inp, out).wait()
            done[0] += 1

        benchmark.group = "push_pull (2 processes)"
        benchmark.extra_info["bytes"] = size
        benchmark.pedantic(op, rounds=rounds, warmup_rounds=WARMUP, iterations=1)
        while done[0] < total:  # --benchmark-disable runs op once: keep step with the peer
            op()
        assert done[0] == total and torch.equal(out, torch.full((numel,), 3.0))


@pytest.mark.parametrize("system", list(VARIANTS))
def test_adam_step(benchmark, system):
    params = _params(1 << 20, 1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = VARIANTS[system](params)
    benchmark.group = "adam_step (1M params)"
    benchmark(opt.step)


@pytest.mark.parametrize("system", ["fastps", "torch"])
def test_sparse_step(benchmark, system):
    rows, dim, batch = 100_000, 32, 4096
    ids = zipf_batches(rows, batch, 1, 1.05, seed=1)[0]
    grad = torch.randn(batch, dim, generator=torch.Generator().manual_seed(2))
    if system == "fastps":
        emb = fastps.nn.Embedding(dim, num_embeddings=rows)
        opt = fastps.optim.Adam(emb.parameters(), lr=1e-3)
    else:
        emb = torch.nn.Embedding(rows, dim, sparse=True)
        opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
    v = ModuleVariant(emb, opt, grad)
    benchmark.group = "sparse_step (100k x 32, 4096 ids, Adam)"
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        benchmark(v.iteration, ids)


if __name__ == "__main__":
    sys.exit(_peer())
