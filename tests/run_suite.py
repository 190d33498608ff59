"""Run the test suite as one pytest process per test file, a few at a time (``make test``).

One process compiling the whole suite's programs (several hundred XLA:CPU executables) crashed
inside XLA's compiler late in the run, while each file passes on its own; a process per file
also lets two cores work side by side on a suite dominated by single-threaded compiles. A job
killed by a signal (a crash, not a failing test) is run once more and reported as such. Each
job's log is printed whole when it ends, then a table of wall times, longest first.

``make test`` leaves out the tests marked ``slow`` (the benchmarks' quick modes, the notebooks,
the docs build, the wheel, the report page) to stay under 20 minutes on two cores; ``--all``
(``make test-slow``) runs them too.

Usage::

    python tests/run_suite.py [--jobs N] [--all] [pytest args...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Started first so the long files do not end the run alone.
LONG_FIRST = (
    "test_lanczos_values.py",
    "test_docs.py",
    "test_notebooks.py",
    "test_benchmark_eigs.py",
    "test_benchmark_optimizers.py",
    "test_eigensolvers.py",
    "test_krylov.py",
)
# A fast subset with x64 off, jax's default and most users' setting (tests/conftest.py skips
# the float64 cases). The solver files are not in it: their float64 tolerances (1e-7 on a
# breakdown, exact zeros of a rank-deficient matrix) are the point of those tests.
X64_OFF = (
    "tests/test_tree.py",
    "tests/test_operators.py",
    "tests/test_model_state.py",
    "tests/test_frameworks.py",
)


def jobs(extra: list[str]) -> list[tuple[str, list[str], dict[str, str]]]:
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    ordered = [f for f in LONG_FIRST if f in files] + [f for f in files if f not in LONG_FIRST]
    out = [(f, [f"tests/{f}", *extra], {}) for f in ordered]
    out.append(("doctests (hesskit)", ["hesskit", *extra], {}))
    out.append(("x64 off", ["-m", "not slow", *X64_OFF], {"HESSKIT_TEST_X64": "0"}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3, help="processes at a time")
    parser.add_argument("--all", action="store_true", help="also the tests marked slow")
    args, extra = parser.parse_known_args(argv)
    if not args.all:
        extra = ["-m", "not slow", *extra]
    todo = jobs(extra)
    running: list[tuple[str, list[str], dict, subprocess.Popen, object, float, int]] = []
    times: list[tuple[float, str, str]] = []
    failed = []

    def start(name, cmd, env, attempt=1):
        log = tempfile.TemporaryFile(mode="w+")
        full = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cmd]
        proc = subprocess.Popen(
            full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        running.append((name, cmd, env, proc, log, time.perf_counter(), attempt))

    while todo or running:
        while todo and len(running) < args.jobs:
            start(*todo.pop(0))
        time.sleep(0.2)
        for item in list(running):
            name, cmd, env, proc, log, t0, attempt = item
            if proc.poll() is None:
                continue
            running.remove(item)
            wall = time.perf_counter() - t0
            log.seek(0)
            text = log.read()
            log.close()
            print(f"== {name} ({wall:.0f} s, exit {proc.returncode})", flush=True)
            print(text, flush=True)
            if proc.returncode < 0 and attempt == 1:
                print(f"== {name} was killed by signal {-proc.returncode}: running it again")
                start(name, cmd, env, attempt=2)
                continue
            # pytest exits 5 when a filter leaves nothing to run.
            ok = proc.returncode in (0, 5)
            times.append((wall, name, "ok" if ok else f"FAILED (exit {proc.returncode})"))
            if not ok:
                failed.append(name)
    print("== wall time per job")
    for wall, name, status in sorted(times, reverse=True):
        print(f"{wall:7.0f} s  {name}  {status}")
    if failed:
        print("== failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
