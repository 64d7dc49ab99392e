"""Builds the standalone C++ tests (tests/cpp) and runs them.

The build happens once per session in build/cpp-tests (kept between runs, so a
second run recompiles only what changed): about 45 s of CPU from scratch, the
core library included, on two cores. The default suite then runs every test
binary and a few seconds of the seeded fuzzer (docs/fuzzing.md); the
AddressSanitizer and ThreadSanitizer builds (docs/development.md, "Sanitizers")
are marked slow. cmake and ninja come from PATH, or from the `cmake` and
`ninja` packages of the `test` extra.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp"
BUILD_ROOT = ROOT / "build"

# Binary -> arguments. Each prints "N passed, M failed" last and exits non-zero on failure.
FAST_BINARIES = {
    "test_waits": [],
    "test_shard": [],
    "test_mapped_buffer": [],
    "test_transport": [],
    "test_consistency": [],
    "test_local_endpoint": [],
    "test_placement": [],
    # Seeded (--seed 1 by default), so a failure here reproduces with the same command.
    "fuzz_protocol": ["--seconds", "3"],
}
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed", re.MULTILINE)
BUILD_TIMEOUT_S = 900
RUN_TIMEOUT_S = 300


def _tool(name: str) -> str | None:
    """Path of `name` (cmake, ctest, ninja): PATH, then beside this interpreter, then the PyPI package."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    package, attribute = ("ninja", "BIN_DIR") if name == "ninja" else ("cmake", "CMAKE_BIN_DIR")
    try:
        bin_dir = getattr(importlib.import_module(package), attribute)
    except (ImportError, AttributeError):
        return None
    candidate = Path(bin_dir) / name
    return str(candidate) if candidate.exists() else None


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _build(build: Path, *defines: str) -> Path:
    """Configures (first time only) and builds tests/cpp in `build`; fails with the compiler's output."""
    cmake = _tool("cmake")
    if cmake is None:
        pytest.skip("needs cmake: pip install cmake ninja (both are in the `test` extra)")
    ninja = _tool("ninja")
    configure = [cmake, "-S", str(SOURCE), "-B", str(build), *defines]
    if not (build / "CMakeCache.txt").exists() and ninja is not None:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    res = subprocess.run(configure, capture_output=True, text=True, errors="replace", timeout=BUILD_TIMEOUT_S)
    if res.returncode != 0 and (build / "CMakeCache.txt").exists():
        # A folder configured for another checkout or generator: start it over.
        shutil.rmtree(build)
        return _build(build, *defines)
    assert res.returncode == 0, f"cmake configure failed:\n{_tail(res.stdout + res.stderr)}"
    jobs = str(os.cpu_count() or 2)
    res = subprocess.run([cmake, "--build", str(build), "--parallel", jobs], capture_output=True, text=True,
                         errors="replace", timeout=BUILD_TIMEOUT_S)
    assert res.returncode == 0, f"building tests/cpp failed:\n{_tail(res.stdout + res.stderr)}"
    return build


def _check_summary(what: str, res: subprocess.CompletedProcess) -> None:
    output = f"--- stdout ---\n{_tail(res.stdout)}\n--- stderr ---\n{_tail(res.stderr, 3000)}"
    summaries = SUMMARY.findall(res.stdout)
    assert summaries, f"{what} printed no 'N passed, M failed' line (exit code {res.returncode})\n{output}"
    passed, failed = (int(n) for n in summaries[-1])
    assert res.returncode == 0 and failed == 0 and passed > 0, (
        f"{what}: {passed} passed, {failed} failed, exit code {res.returncode}\n{output}")


@pytest.fixture(scope="module")
def cpp_tests() -> Path:
    """build/cpp-tests, built for this checkout (Release, no sanitizer)."""
    return _build(BUILD_ROOT / "cpp-tests", "-DCMAKE_BUILD_TYPE=Release", "-DFASTPS_SANITIZE=",
                  "-DFASTPS_LIBFUZZER=OFF")


@pytest.mark.parametrize("binary", sorted(FAST_BINARIES))
def test_cpp_binary(cpp_tests: Path, binary: str) -> None:
    args = FAST_BINARIES[binary]
    res = subprocess.run([str(cpp_tests / binary), *args], capture_output=True, text=True,
                         errors="replace", timeout=RUN_TIMEOUT_S)
    _check_summary(" ".join([binary, *args]), res)


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_cpp_tests_under_sanitizer(sanitizer: str) -> None:
    """Every C++ test and 5 s of fuzzing under ASan+UBSan or TSan (several minutes each)."""
    build = _build(BUILD_ROOT / ("cpp-asan" if sanitizer == "address" else "cpp-tsan"),
                   "-DCMAKE_BUILD_TYPE=Release", f"-DFASTPS_SANITIZE={sanitizer}", "-DFASTPS_LIBFUZZER=OFF")
    ctest = _tool("ctest")
    assert ctest is not None, "ctest not found next to cmake"
    res = subprocess.run([ctest, "--output-on-failure", "--timeout", "900"], cwd=build, capture_output=True,
                         text=True, errors="replace", timeout=3600)
    assert res.returncode == 0, f"ctest under {sanitizer} sanitizer failed:\n{_tail(res.stdout + res.stderr, 20000)}"
