"""Multi-device: eigsh on a data-parallel Hessian over 4 simulated CPU devices (own process)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest


def test_eigsh_on_sharded_batch_matches_single_device():
    script = pathlib.Path(__file__).with_name("_sharded_eigsh.py")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_devices"] == 4
    assert result["x_sharded"]
    assert result["converged"]
    np.testing.assert_allclose(result["sharded"], result["single"], rtol=1e-9, atol=1e-12)
    # The eigenvectors keep the parameters' sharding (replicated across the data axis).
    assert all(result["vectors_replicated_like_params"].values())
    np.testing.assert_allclose(result["model_parallel"], result["single"], rtol=1e-9, atol=1e-12)
    assert all(result["vectors_sharded_like_params"].values())


def _gathers(*flags: str) -> dict:
    script = pathlib.Path(__file__).with_name("_sharded_gathers.py")
    out = subprocess.run(
        [sys.executable, str(script), *flags],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_gathers(result: dict) -> None:
    rows = result["rows"]
    for row in rows:
        assert "error" not in row, row
        assert row["all-gather"] == 0, row
        assert row["equal"], row
        if row["types"] == "explicit":
            # Under Explicit axes the result's sharding is part of its type; under Auto axes
            # XLA picks the layout of a jitted function's outputs.
            assert row.get("keeps_sharding", True), row
    # The reductions are all-reduces of scalars and short vectors.
    assert all(r["all-reduce"] > 0 for r in rows if r["solver"] != "diagonal")
    # Parameters and data on meshes over different devices: an error naming both.
    assert "meshes that cannot be combined" in result["mesh_error"]
    assert "devices [0, 1]" in result["mesh_error"] and "devices [2, 3]" in result["mesh_error"]


def test_solvers_on_sharded_vectors_compile_without_gathers():
    # Every solver on row-sharded leaves (4 devices, Explicit axes) and fully sharded ones (8
    # devices over both mesh axes, Auto axes): no all-gather in the compiled program (the
    # operator is elementwise, so any gather would be the solver's), and the one-device result.
    result = _gathers("--quick")
    assert len(result["rows"]) == 2 * 7
    got = {(r["devices"], r["layout"], r["types"]) for r in result["rows"]}
    assert got == {(4, "rows", "explicit"), (8, "full", "auto")}
    _check_gathers(result)


@pytest.mark.slow
def test_solvers_on_sharded_vectors_every_layout():
    # The whole grid: column-, row- and fully-sharded leaves, each under Auto and Explicit axes.
    result = _gathers()
    assert len(result["rows"]) == 3 * 2 * 7
    got = {(r["devices"], r["layout"]) for r in result["rows"]}
    assert got == {(4, "cols"), (4, "rows"), (8, "full")}
    _check_gathers(result)


@pytest.mark.slow
def test_sharding_benchmark_quick(tmp_path):
    # The benchmark's quick mode runs end to end: one and two devices, both layouts.
    bench = pathlib.Path(__file__).parent.parent / "benchmarks" / "sharding.py"
    cmd = [sys.executable, str(bench), "--quick", "--out", str(tmp_path)]
    subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    saved = json.loads(next(tmp_path.glob("sharding-*-quick.json")).read_text())
    rows = {(r["devices"], r["layout"]): r for r in saved["rows"]}
    assert set(rows) == {(1, "data"), (1, "model"), (2, "data"), (2, "model")}
    for r in rows.values():
        assert r["products"] > 0 and r["ms_per_product"] > 0
        assert r["eigsh_all_gathers"] == 0
    # One device moves nothing; two move the gradient's all-reduce (data parallel) at least.
    assert rows[1, "data"]["bytes_per_product"] == rows[1, "model"]["bytes_per_product"] == 0
    assert rows[2, "data"]["bytes_by_kind"]["all-reduce"] >= 4 * rows[2, "data"]["params"]
    np.testing.assert_allclose(
        rows[2, "data"]["eigenvalues"], rows[1, "data"]["eigenvalues"], rtol=1e-4
    )
