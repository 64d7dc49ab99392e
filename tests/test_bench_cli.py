"""`fastps bench allreduce|sparse|optim` (fastps.bench) in tiny configurations.

Timing is not asserted (STYLE.md: timing lives in bench/); these check that the
commands run end to end, write their JSON and plots, and fail clearly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastps import _C
from fastps.__main__ import main as fastps_main
from fastps.bench import _common

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _local_env(monkeypatch):
    """No job variables from the caller's shell: the bench launches its own workers."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTPS_TRANSPORT",
              "FASTPS_NUM_SERVERS", "FASTPS_COLOCATE", "FASTPS_STALENESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FASTPS_TIMEOUT", "30")


def test_allreduce_sweep_writes_json_and_plot(tmp_path, capfd):
    out, png = tmp_path / "out", tmp_path / "out.png"
    rc = fastps_main(["bench", "allreduce", "-b", "4K", "-e", "16K", "-f", "2", "-n", "2", "-w", "1",
                      "--latency-iters", "20", "--timeout", "90", "--json", str(out), "--plot", str(png)])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "allreduce" and doc["world_size"] == 2 and doc["transport"]
    assert set(doc["latency_1k_us"]) == {"fastps", "gloo", "memcpy"}
    got = {(r["system"], r["size"]) for r in doc["records"]}
    assert got == {(s, n) for s in ("fastps", "gloo", "memcpy") for n in (4096, 8192, 16384)}
    for r in doc["records"]:
        assert r["wrong"] == 0 and r["count"] == r["size"] // 4
        assert r["time_us"] > 0 and r["algbw"] > 0 and r["busbw"] == pytest.approx(r["algbw"])
    assert png.read_bytes()[:8] == PNG_MAGIC
    # nccl-tests columns, one row per size, and the latency line
    assert "#wrong" in captured.out and "1 KiB round trip" in captured.out
    assert sum(1 for line in captured.out.splitlines() if line.strip().startswith(("4096 ", "8192 ", "16384 "))) == 3
    assert "all results exact" in captured.out


def test_allreduce_yardsticks_tcp_raw_and_memcpy_check_their_bytes(tmp_path, capfd):
    out = tmp_path / "out"
    rc = fastps_main(["bench", "allreduce", "-b", "64K", "-e", "64K", "-n", "2", "-w", "1", "--latency-iters",
                      "0", "--timeout", "90", "--transport", "tcp", "--systems", "fastps,tcp-raw,memcpy",
                      "--json", str(out)])
    assert rc == 0, capfd.readouterr().err
    doc = json.loads(out.read_text())
    assert {r["system"] for r in doc["records"]} == {"fastps", "tcp-raw", "memcpy"}
    assert all(r["wrong"] == 0 for r in doc["records"])
    assert "vs tcp-raw" in capfd.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["-b", "4X"], "not a size: '4X'"),
    (["-e", "lots"], "K, M or G suffix"),
    (["-b", "64K", "-e", "4K"], "-b (64K) must not exceed -e (4K)"),
    (["-b", "6"], "multiples of 4 bytes"),
    (["-f", "1"], "-f must be at least 2"),
    (["-n", "0"], "must be at least 1"),
    (["-np", "1"], "-np must be at least 2"),
    (["--systems", "fastps,mpi"], "from fastps, gloo, nccl"),
    (["--transport", "udp"], "transport='udp' is not allowed"),
    (["--transport", "tcp,udp"], "transport='udp' is not allowed"),
    (["-np", "3", "--systems", "fastps,tcp-raw"], "tcp-raw needs exactly 2 workers"),
])
def test_allreduce_bad_arguments_exit_2_and_say_what_to_write(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        fastps_main(["bench", "allreduce", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: fastps bench allreduce" in err


def test_allreduce_refuses_an_unknown_transport_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("FASTPS_TRANSPORT", "udp")
    with pytest.raises(SystemExit) as e:
        fastps_main(["bench", "allreduce"])
    assert e.value.code == 2
    assert "FASTPS_TRANSPORT='udp' is not allowed: it must be auto (shared memory between processes of one " \
        "host, UCX between hosts with RDMA devices, TCP otherwise), tcp, shm or ucx" in capsys.readouterr().err


@pytest.mark.skipif(bool(_C.ucx_unavailable()), reason=f"ucx transport unavailable: {_C.ucx_unavailable()}")
def test_allreduce_runs_once_per_transport_of_a_list_and_names_ucx_and_its_transports(capfd):
    rc = fastps_main(["bench", "allreduce", "-b", "4K", "-e", "4K", "-n", "2", "-w", "1", "--latency-iters", "0",
                      "--timeout", "90", "--systems", "fastps,memcpy", "--transport", "tcp,ucx"])
    out = capfd.readouterr().out
    assert rc == 0, out
    heads = [line for line in out.splitlines() if line.startswith("# fastps: transport")]
    assert len(heads) == 2, out
    assert "transport tcp (FASTPS_TRANSPORT=tcp)" in heads[0], heads
    assert "transport ucx (UCX " in heads[1] and "tcp" in heads[1] and "FASTPS_TRANSPORT=ucx" in heads[1], heads


def test_allreduce_nccl_needs_gpus(capsys):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine can run the nccl baseline")
    with pytest.raises(SystemExit):
        fastps_main(["bench", "allreduce", "--systems", "fastps,nccl"])
    assert "nccl needs CUDA and one GPU per worker" in capsys.readouterr().err


def test_allreduce_failing_worker_exits_nonzero_with_its_error(monkeypatch, capfd):
    monkeypatch.setenv("FASTPS_CHUNK_BYTES", "lots")  # every worker's fastps.Client() rejects it
    rc = fastps_main(["bench", "allreduce", "-b", "4K", "-e", "4K", "-n", "2", "--latency-iters", "0",
                      "--timeout", "60"])
    err = capfd.readouterr().err
    assert rc == 1
    assert "fastps bench allreduce: worker rank" in err and "exited with code 1" in err
    assert "FASTPS_CHUNK_BYTES='lots'" in err


def test_optim_tiny_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "optim.json", tmp_path / "optim.png"
    rc = fastps_main(["bench", "optim", "--numel", "20000", "--tensors", "1", "4", "--steps", "2",
                      "--warmup", "1", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    records = json.loads(out.read_text())
    assert {(r["tensors"], r["system"]) for r in records} == {
        (t, s) for t in (1, 4) for s in ("torch default", "torch foreach", "torch fused", "fastps")}
    assert all(r["ms"] > 0 and r["numel"] == 20000 for r in records)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "x vs fastps" in capsys.readouterr().out


def test_sparse_tiny_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "sparse.json", tmp_path / "sparse.png"
    rc = fastps_main(["bench", "sparse", "--rows", "2000", "--dim", "8", "--batch", "256", "--steps", "2",
                      "--warmup", "1", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"adam", "adagrad"}
    for variants in res["variants"].values():
        assert {"fastps cold", "fastps warm", "torch", "floor numpy"} <= set(variants)
        assert all(len(v["ms"]) == 3 for v in variants.values())
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "## adam" in capsys.readouterr().out


def test_sizes_parse_like_nccl_tests():
    assert [_common.parse_size(s) for s in ("1024", "4K", "4k", "4KiB", "256M", "1G", "1.5K")] == [
        1024, 4096, 4096, 4096, 256 << 20, 1 << 30, 1536]
    assert _common.size_sweep(4096, 64 << 10, 4) == [4096, 16384, 65536]
    assert _common.format_size(4096) == "4K" and _common.format_size(1000) == "1000"


def test_console_script_and_module_list_the_benchmarks():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    r = subprocess.run([sys.executable, "-m", "fastps.bench", "--help"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and all(b in r.stdout for b in ("allreduce", "sparse", "optim"))


def test_transport_push_pull_script_prints_one_row_per_size_and_op():
    """bench/transport_push_pull.py (a worker and a server process, one request at a time):
    it runs, checks its pulls, and prints a row per size and operation."""
    script = Path(__file__).resolve().parent.parent / "bench" / "transport_push_pull.py"
    res = subprocess.run([sys.executable, str(script), "--transport", "tcp", "-s", "4K,64K", "-n", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line and line.split()[0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("4096", "push"), ("4096", "pull"), ("65536", "push"),
                                            ("65536", "pull")], res.stdout
    assert all(r[-1] == "1.00x" for r in rows), res.stdout  # the baseline against itself
