"""The optimizer benchmark's quick mode runs end to end, so the benchmark never rots."""

import pathlib
import sys

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import optimizers as optimizers_benchmark  # noqa: E402


@pytest.mark.slow
def test_optimizers_benchmark_quick(tmp_path):
    results = optimizers_benchmark.main(["--quick", "--out", str(tmp_path)])
    for res in results.values():
        assert set(res["rows"]) == set(optimizers_benchmark.OPTIMIZERS)
        assert res["hvp_over_grad"] > 0 and res["ggn_over_grad"] > 0
        for row in res["rows"].values():
            assert row["steps"] >= 1 and row["best_lr"] > 0
            # One compiled step per optimizer serves every learning rate and seed.
            assert row["traces"] == 1
            assert row["grid_position"] in ("low", "high", "interior", "flat")
        assert res["rows"]["newton_cg (ggn)"]["curvature"] == "ggn"
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())


def test_grid_position_flags_the_ends_and_ties():
    grid = [0.1, 0.3, 1.0]
    position = optimizers_benchmark.grid_position
    assert position(grid, {0.1: 1.0, 0.3: 2.0, 1.0: 3.0}) == "low"
    assert position(grid, {0.1: float("nan"), 0.3: 2.0, 1.0: 1.0}) == "high"
    assert position(grid, {0.1: 3.0, 0.3: 1.0, 1.0: 2.0}) == "interior"
    assert position(grid, {0.1: 5.0, 0.3: 5.0, 1.0: 5.0}) == "flat"


@pytest.mark.slow
def test_every_problem_splits_into_model_and_output_loss():
    # The Gauss-Newton row needs loss == output_loss(model(params)) on every problem.
    for name in optimizers_benchmark.PROBLEMS:
        prob = optimizers_benchmark.PROBLEMS[name][1](0)
        composed = jax.jit(lambda p, d, prob=prob: prob.output_loss(prob.model(p, d), d))
        want = float(jax.jit(prob.loss)(prob.params, prob.data))
        got = float(composed(prob.params, prob.data))
        assert got == pytest.approx(want, rel=1e-6)
