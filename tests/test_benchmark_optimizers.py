"""The optimizer benchmark's quick mode runs end to end, so the benchmark never rots."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import optimizers as optimizers_benchmark  # noqa: E402


@pytest.mark.slow
def test_optimizers_benchmark_quick(tmp_path):
    results = optimizers_benchmark.main(["--quick", "--out", str(tmp_path)])
    for res in results.values():
        assert set(res["rows"]) == {"adam", "sgd", "noisy_sgd", "adam + negative_curvature"}
        assert res["rows"]["adam"]["time_ratio_to_adam"] == 1.0
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())
