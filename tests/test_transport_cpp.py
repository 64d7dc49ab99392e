"""Builds and runs the standalone C++ tests (tests/cpp: transport, shard, mapped buffer). Slow: it compiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cpp_transport_suite(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT / "tests" / "cpp"), "-B", str(build), *gen], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    for binary in ("test_transport", "test_shard", "test_mapped_buffer"):
        res = subprocess.run([str(build / binary)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        assert " 0 failed" in res.stdout
