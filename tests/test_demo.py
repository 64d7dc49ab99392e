"""The GPT demo (`fastps demo`, examples/train_gpt.py) in a tiny configuration."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastps.__main__ import main as fastps_main
from fastps._local_job import poll_until
from fastps.demo import GPT, GPTConfig, load_corpus, train_batch
from fastps.demo import train as train_mod
from fastps.demo.data import val_windows

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "10", "--batch-size", "8", "--context", "32", "--n-layer", "2", "--n-head", "2",
        "--d-model", "32", "--data-bytes", "200000", "--warmup", "2", "--eval-every", "5",
        "--eval-batches", "2", "--save-every", "5", "--sample-bytes", "40"]


def _env():
    env = dict(os.environ)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTPS_STALENESS",
              "FASTPS_NUM_SERVERS", "FASTPS_COLOCATE"):
        env.pop(k, None)
    env["FASTPS_TIMEOUT"] = "60"
    return env


def _demo(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "fastps", "demo", "--timeout", str(timeout - 10), *args],
                       cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"fastps demo exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _metrics(run_dir: Path):
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train = [(m["step"], m["loss"]) for m in rows if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in rows if "val_loss" in m]
    return train, val


def _assert_same_curves(a: Path, b: Path, tol: float) -> None:
    (ta, va), (tb, vb) = _metrics(a), _metrics(b)
    assert [s for s, _ in ta] == [s for s, _ in tb] and [s for s, _ in va] == [s for s, _ in vb]
    for (s, x), (_, y) in zip(ta + va, tb + vb):
        assert abs(x - y) <= tol, f"step {s}: {x} vs {y}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted 10-step demo on 2 workers (checkpoints at 5 and 10)."""
    cwd = tmp_path_factory.mktemp("demo")
    r = _demo(cwd, *TINY, "--logdir", "full")
    return cwd, cwd / "full", r


# -- pieces ---------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_seed_and_step():
    data = torch.arange(10_000, dtype=torch.int64).remainder(256).to(torch.uint8)
    x, y = train_batch(data, seed=3, step=7, batch_size=8, context=16)
    x2, _ = train_batch(data, seed=3, step=7, batch_size=8, context=16)
    assert torch.equal(x, x2) and torch.equal(y[:, :-1], x[:, 1:])
    # the ranks' shares concatenate to the one-process batch
    parts = [train_batch(data, seed=3, step=7, batch_size=8, context=16, rank=r, world_size=4)[0]
             for r in range(4)]
    assert torch.equal(torch.cat(parts), x)
    assert not torch.equal(train_batch(data, seed=3, step=8, batch_size=8, context=16)[0], x)
    with pytest.raises(ValueError, match="divisible"):
        train_batch(data, seed=3, step=7, batch_size=8, context=16, rank=0, world_size=3)


def test_corpus_is_stdlib_source_bounded_and_deterministic():
    a, b = load_corpus(100_000), load_corpus(100_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert 0 < a.val.numel() < a.train.numel()
    assert a.num_bytes <= 100_000 + a.files  # a newline ends each file
    assert b"import" in bytes(a.train[:50_000].tolist())
    assert len(val_windows(a.val, count=5, context=32)) == 5


def test_model_shapes_tied_head_and_generate():
    model = GPT(GPTConfig(context=16, n_layer=1, n_head=2, d_model=16))
    assert model.head.weight is model.wte.weight
    x = torch.randint(0, 256, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 256) and 5.0 < loss.item() < 6.0  # about ln 256 at init
    out = model.generate(x[:1, :4], 20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 24)
    with pytest.raises(ValueError, match="divide"):
        GPTConfig(n_head=3, d_model=16)


def test_cli_rejects_other_transports_and_bad_settings(capsys):
    with pytest.raises(SystemExit) as exc:
        fastps_main(["demo", "--transport", "udp"])
    assert exc.value.code == 2
    assert "invalid choice: 'udp'" in capsys.readouterr().err
    assert fastps_main(["demo", "--workers", "3", "--batch-size", "8"]) == 2
    assert "divisible" in capsys.readouterr().err


# -- whole runs -------------------------------------------------------------------------

def test_demo_trains_logs_plots_and_samples(tiny_run):
    _, logdir, r = tiny_run
    run = logdir / "fastps"
    train, val = _metrics(run)
    assert [s for s, _ in train] == list(range(10)) and [s for s, _ in val] == [0, 5, 10]
    assert train[-1][1] < train[0][1] - 0.3 and val[-1][1] < val[0][1]
    assert (logdir / "loss.png").stat().st_size > 10_000
    assert glob.glob(str(run / "events.out.tfevents.*"))
    assert (run / "ckpt.pt").exists() and (run / "sample.txt").read_text().startswith("def ")
    info = json.loads((run / "run.json").read_text())
    assert info["workers"] == 2 and info["mode"] == "bsp" and info["servers"] == 2
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["runs"][0]["run"] == "fastps"
    assert "ms/step" in r.stdout and "sample from the fastps model" in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["sent"] > rows[0]["sent"] > 0  # push/pull traffic is recorded


def test_bsp_on_two_workers_equals_one_process(tiny_run, tmp_path):
    _, logdir, _ = tiny_run
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_gpt.py"), *TINY, "--logdir", "one"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "single" in r.stdout and (tmp_path / "one" / "loss.png").exists()
    _assert_same_curves(logdir / "fastps", tmp_path / "one" / "fastps", 1e-5)  # float32 summation order


def test_rerun_resumes_from_the_checkpoint_exactly(tiny_run):
    """The same command run again continues from the checkpoint (no flag needed)."""
    cwd, logdir, _ = tiny_run
    r = _demo(cwd, *TINY, "--logdir", "resumed", "--stop-after", "5")
    assert "stopped after step 5" in r.stdout and "--logdir resumed" in r.stdout
    assert len(_metrics(cwd / "resumed" / "fastps")[0]) == 5
    r = _demo(cwd, *TINY, "--logdir", "resumed")
    assert "continuing from the checkpoint of fastps" in r.stdout
    _assert_same_curves(logdir / "fastps", cwd / "resumed" / "fastps", 1e-6)


def test_ctrl_c_stops_every_process(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "fastps", "demo", *TINY, "--steps", "100000",
                          "--logdir", "run"], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = tmp_path / "run" / "fastps" / "metrics.jsonl"

        def demo_alive() -> None:
            if p.poll() is not None:
                raise AssertionError(f"the demo exited {p.returncode} before training:\n{p.communicate()[1][-3000:]}")

        # SIGINT only once both workers train (rows of their steps written): the state under
        # test. Deadlines generous for a loaded machine, but bounded.
        poll_until(lambda: metrics.exists() and metrics.stat().st_size > 200, 180, "the demo to start training",
                   check=demo_alive, interval=0.1)
        children = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        assert len(children) == 2
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the demo still ran 60 s after Ctrl-C") from None
        assert p.returncode == 130 and "interrupted" in err, (p.returncode, err[-3000:])
        for c in children:
            assert not Path(f"/proc/{c}").exists() or "Z" in Path(f"/proc/{c}/stat").read_text().split()[2]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


@pytest.mark.slow
def test_compare_ddp_agrees_in_bsp(tmp_path):
    args = list(TINY)
    args[args.index("--steps") + 1] = "20"
    r = _demo(tmp_path, *args, "--logdir", "cmp", "--compare", "ddp", timeout=240)
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert [s["run"] for s in summary["runs"]] == ["fastps", "ddp"]
    assert summary["agreement"]["steps_compared"] == 20
    assert summary["agreement"]["max_abs_diff_train"] < 1e-4, summary["agreement"]
    assert "fastps vs ddp" in r.stdout


# -- resuming, and checkpoints that cannot be written ---------------------------------------------

def _with(args, **flags):
    """``args`` with some flags' values replaced (``save_every=2`` sets ``--save-every 2``)."""
    args = list(args)
    for name, value in flags.items():
        args[args.index("--" + name.replace("_", "-")) + 1] = str(value)
    return args


SINGLE = _with(TINY, steps=6, eval_every=3, save_every=2) + ["--no-report"]  # in-process, one worker


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    """Run fastps.demo.train.main in this process, in tmp_path, on one torch thread (several
    threads spinning against the embedded server's shards make tiny steps 10x slower on a
    busy 2-core machine)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_interrupted_single_process_run_resumes_when_rerun(in_process, capsys):
    """A run killed after its checkpoint at step 4 (it got to step 5 and was writing a metrics
    line and a checkpoint) continues at step 4 when the same command runs again: every step
    once, the losses of an uninterrupted run, no temporary files left."""
    tmp_path = in_process
    assert train_mod.main([*SINGLE, "--logdir", "full"]) == 0
    assert train_mod.main([*SINGLE, "--logdir", "run", "--stop-after", "5"]) == 0
    run = tmp_path / "run" / "fastps"
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in _rows(run) if "loss" in r] == [0, 1, 2, 3, 4]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.9')  # the line the kill cut short
    (run / f".ckpt.pt.tmp{os.getpid() + 1}").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert train_mod.main([*SINGLE, "--logdir", "run"]) == 0
    assert "resuming from run/fastps/ckpt.pt at step 4" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["start_step"] == 4
    train, val = _metrics(run)
    assert [s for s, _ in train] == list(range(6)) and [s for s, _ in val] == [0, 3, 6]
    _assert_same_curves(tmp_path / "full" / "fastps", run, 0.0)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 6


def test_no_resume_starts_over_and_resume_needs_no_checkpoint(in_process, capsys):
    tmp_path = in_process
    # --resume on a first attempt's command line: nothing to resume, it trains from step 0.
    assert train_mod.main([*SINGLE, "--logdir", "run", "--stop-after", "3", "--resume"]) == 0
    run = tmp_path / "run" / "fastps"
    assert [r["step"] for r in _rows(run) if "loss" in r] == [0, 1, 2]
    capsys.readouterr()
    assert train_mod.main([*SINGLE, "--logdir", "run", "--stop-after", "2", "--no-resume"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert [r["step"] for r in _rows(run) if "loss" in r] == [0, 1]  # the earlier rows are replaced
    # A checkpoint of another model is refused with a way out, not silently mixed in.
    assert train_mod.main([*SINGLE, "--logdir", "run", "--d-model", "16"]) == 2
    assert "--no-resume" in capsys.readouterr().err


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    train_mod.save_checkpoint(path, {"step": 3})
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"\0" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_mod.save_checkpoint(path, {"step": 6})
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_training_stops_on_a_full_disk_with_the_last_good_checkpoint(in_process, monkeypatch):
    tmp_path = in_process
    real_save = torch.save
    calls = []

    def second_fails(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", second_fails)
    with pytest.raises(OSError, match="No space left"):
        train_mod.main([*SINGLE, "--logdir", "run"])
    monkeypatch.setattr(torch, "save", real_save)
    run = tmp_path / "run" / "fastps"
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 2


def _children(pid: int):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_worker_resumes_from_the_checkpoint(tmp_path):
    """examples/train_gpt.py under `torchrun --max-restarts 1`: SIGKILL worker 1 once a checkpoint
    exists; torchrun restarts both workers, which continue from the checkpoint (not step 0)
    and finish, with one metrics row per step."""
    steps = 300
    args = _with(SINGLE, steps=steps, save_every=10, eval_every=100)
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", "1", str(ROOT / "examples" / "train_gpt.py"), *args, "--logdir", "run"],
                         cwd=tmp_path, env=_env(), stdout=out, stderr=err, start_new_session=True)
    run = tmp_path / "run" / "fastps"
    try:
        deadline = time.monotonic() + 120
        while not (run / "ckpt.pt").exists():
            assert p.poll() is None, f"torchrun exited {p.returncode}:\n{(tmp_path / 'err.txt').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        workers = {_environ(c).get("RANK"): c for c in _children(p.pid)}
        assert "1" in workers, f"worker 1 not found among {workers}"
        os.kill(workers["1"], signal.SIGKILL)
        p.wait(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        out.close()
        err.close()
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert p.returncode == 0, f"torchrun exited {p.returncode}:\n{stdout[-2000:]}\n{stderr[-3000:]}"
    resumed = [int(m) for m in re.findall(r"resuming from run/fastps/ckpt\.pt at step (\d+)", stdout)]
    assert len(resumed) == 1 and 0 < resumed[0] < steps and resumed[0] % 10 == 0, stdout[-3000:]
    assert f"steps 0..{steps} of {steps}" in stdout and f"steps {resumed[0]}..{steps} of {steps}" in stdout
    assert json.loads((run / "run.json").read_text())["start_step"] == resumed[0]
    train, val = _metrics(run)
    assert [s for s, _ in train] == list(range(steps)) and [s for s, _ in val] == [0, 100, 200, 300]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == steps
