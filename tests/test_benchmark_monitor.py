"""The monitor benchmark's quick mode runs end to end, so the benchmark never rots."""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import monitor as monitor_benchmark  # noqa: E402


@pytest.mark.slow
def test_monitor_benchmark_quick(tmp_path):
    out = monitor_benchmark.main(["--quick", "--out", str(tmp_path)])
    stem = tmp_path / f"monitor-{out['meta']['backend']}-quick"
    saved = json.loads(stem.with_suffix(".json").read_text())
    steps = saved["meta"]["steps"]
    ref = saved["reference"]
    assert len(ref["lambda_max"]) == len(ref["lambda_min"]) == steps
    # The reference: converged, lambda_min < 0 < lambda_max on the CNN at initialisation.
    assert max(ref["relative_residual"]) < 1e-4
    assert all(lo < 0 < hi for lo, hi in zip(ref["lambda_min"], ref["lambda_max"], strict=True))
    assert list(saved["rows"]) == list(monitor_benchmark.QUICK_CONFIGS)
    for row in saved["rows"].values():
        cfg = row["config"]
        assert row["steady_products_per_step"] == cfg["num_matvecs"] / cfg["every"]
        # The products the monitor counted: the first run twice as long, then one per `every`.
        runs = -(-steps // cfg["every"])
        total = (2 + runs - 1) * cfg["num_matvecs"]
        assert row["total_products_per_step"] == pytest.approx(total / steps)
        assert len(row["lambda_max"]) == steps
        # Ritz values lie inside the spectrum: a measured lambda_max never exceeds the
        # reference and a measured lambda_min never falls below it (float32 slack).
        est_hi, est_lo = np.array(row["lambda_max"]), np.array(row["lambda_min"])
        meas = np.arange(steps) % cfg["every"] == 0
        assert np.all(est_hi[meas] <= np.array(ref["lambda_max"])[meas] * (1 + 1e-4))
        assert np.all(est_lo[meas] >= np.array(ref["lambda_min"])[meas] * (1 + 1e-4))
        assert 0.0 <= row["fraction_within"] <= 1.0
        assert row["max_rel_err_max"] >= row["meas_max_rel_err_max"]
    assert stem.with_suffix(".md").read_text().startswith("# monitor_curvature")
