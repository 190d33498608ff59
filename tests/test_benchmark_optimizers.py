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
        assert set(res["rows"]) == set(optimizers_benchmark.OPTIMIZERS)
        assert res["hvp_over_grad"] > 0
        for row in res["rows"].values():
            assert row["steps"] >= 1 and row["best_lr"] > 0
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())
