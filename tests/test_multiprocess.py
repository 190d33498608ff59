"""Many processes: two processes under ``jax.distributed`` (gloo CPU collectives) on localhost.

Each process holds two simulated CPU devices; eigsh and trace of a data-parallel Hessian and of
a data x model parallel one must match the one-process answer and agree exactly across the
processes. Every process is killed at the timeout, so a stuck collective cannot hang the suite.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(*argv: object) -> subprocess.Popen:
    # Own process group, so a timeout kills the worker and anything it started.
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _collect(procs: list[subprocess.Popen]) -> list[dict]:
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a worker ran past {TIMEOUT} s (killed)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return outs


def test_two_processes_match_one_process():
    port = _free_port()
    workers = [_launch(i, 2, port) for i in range(2)]
    reference = _launch(0, 0, 0)
    first, second, single = _collect([*workers, reference])
    assert (first["process"], second["process"]) == (0, 1)
    assert first["devices"] == second["devices"] == 4
    assert first["local_devices"] == 2
    assert first["model_rows_are_processes"]
    for part in ("data", "model"):
        # Both processes hold the same replicated answer, bit for bit.
        assert first[part] == second[part]
        np.testing.assert_allclose(first[part]["eig"], single[part]["eig"], rtol=1e-9)
        np.testing.assert_allclose(first[part]["trace"], single[part]["trace"], rtol=1e-9)
    # BE: the most negative eigenvalue and the two largest.
    assert single["data"]["eig"][0] < 0 < single["data"]["eig"][1]
