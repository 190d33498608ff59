"""The scale benchmark's quick mode runs end to end, so the benchmark never rots."""

import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import scale as scale_benchmark  # noqa: E402


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.mark.slow
def test_scale_benchmark_quick(tmp_path):
    out = scale_benchmark.main(["--quick", "--out", str(tmp_path)])
    stem = tmp_path / f"scale-{out['meta']['backend']}-quick"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["meta"]["quick"] is True
    assert stem.with_suffix(".md").read_text().startswith("# hesskit at scale")

    # Part 1: every product cost is a positive time with finite ratios; the bare HVP is the unit.
    models = [r["model"] for r in saved["products"]]
    assert models[-1] == "lenet"
    for res in saved["products"]:
        rows = res["rows"]
        assert rows["bare HVP (jit, whole batch)"]["ratio_to_bare_hvp"] == 1.0
        assert rows["grad"]["ratio_to_grad"] == 1.0
        assert any(name.startswith("eigsh") for name in rows)
        for r in rows.values():
            assert r["ms"] > 0 and _finite(r["ratio_to_bare_hvp"]) and _finite(r["ratio_to_grad"])
    assert any("fori_loop" in name for name in saved["products"][0]["rows"])

    # Part 2: the LeNet solves ran (none skipped by the time budget) with finite results.
    lenet = saved["lenet"]
    assert lenet["params"] == scale_benchmark.hk.tree_dim(
        scale_benchmark.LeNet(channels=(2, 4), hidden=16).init(
            scale_benchmark.jax.random.key(0), scale_benchmark.jnp.zeros((1, 28, 28, 1))
        )
    )
    assert lenet["examples"] == 40 and lenet["bare_hvp_ms"] > 0
    ran = [r for r in lenet["rows"] if "products" in r]
    assert {r["mode"] for r in ran} >= {"eigenvectors"}
    for r in ran:
        assert 0 < r["products"] <= r["max_matvecs"]
        assert r["wall_s"] > 0 and r["compile_s"] >= 0
        assert len(r["eigenvalues"]) == r["k"] and all(map(_finite, r["eigenvalues"]))
        assert _finite(r["max_rel_residual"]) and 0 <= r["converged"] <= r["k"]
        assert r["peak_rss_bytes"] > 0 and r["rss_delta_bytes"] >= 0
    for r in lenet["rows"]:
        assert "products" in r or r["note"].startswith("not available")

    # Part 3: compiled memory in vectors next to the documented count; per-product timing.
    assert saved["sweep"]
    for size in saved["sweep"]:
        assert size["vector_bytes"] == 4 * size["params"]
        for name in ("eigsh", "hutch++"):
            m = size["memory"][name]
            assert m["temp_bytes"] > 0 and _finite(m["vectors_held"])
            assert isinstance(m["formula_vectors"], int) and m["formula_vectors"] > 0
        # Hutch++'s own vectors are counted beyond a vmapped chunk of products, not one.
        assert size["memory"]["hutch++"]["baseline"] == scale_benchmark.HVP_CHUNK
        assert _finite(size["memory"]["hutch++"]["vectors_beyond_hvp"])
        assert size["timing"]["bare_hvp_ms"] > 0
        loops = [v for k, v in size["timing"].items() if k.startswith("loop=")]
        assert loops and all(_finite(t["ratio_to_bare_hvp"]) and t["products"] > 0 for t in loops)
        # The product alone in a compiled loop, and eigsh's time per product split around it.
        assert size["timing"]["product_in_loop_ms"] > 0
        assert _finite(size["timing"]["product_in_loop_ratio"])
        assert all(_finite(t["krylov_ms_per_product"]) for t in loops)


def test_partial_run_carries_the_rest_of_the_previous_table():
    def row(problem, mode, values, bare=None):
        r = {"problem": problem, "mode": mode, "products": 10, "eigenvalues": values}
        return r if bare is None else {**r, "bare_hvp_ms": bare}

    old = {
        "meta": {"date": "old"},
        "products": [{"model": "mlp-large"}, {"model": "lenet", "old": True}],
        "sweep": [{"target": 10}, {"target": 100, "old": True}],
        "lenet": {
            "bare_hvp_ms": 5.0,
            "rows": [
                row("SA(3)", "eigenvectors", [-2.0, -1.0]),
                row("SA(3)", "eigenvalues only", [-2.0, -0.5]),
            ],
        },
    }
    new = {
        "meta": {"date": "new"},
        "products": [{"model": "lenet", "old": False}],
        "sweep": [{"target": 100, "old": False}],
        "lenet": {"bare_hvp_ms": 4.0, "rows": [row("SA(3)", "eigenvalues only", [-2.2, -1.0])]},
    }
    only = {("SA(3)", False)}
    out = scale_benchmark.carry_forward(new, old, {"products"}, only, some_sizes=True)
    assert [p["model"] for p in out["products"]] == ["mlp-large", "lenet"]
    assert out["products"][1]["old"] is False
    assert [(s["target"], s.get("old")) for s in out["sweep"]] == [(10, None), (100, False)]
    vectors, values = out["lenet"]["rows"]
    assert (vectors["run"], vectors["bare_hvp_ms"]) == ("old", 5.0)
    assert (values["run"], values["bare_hvp_ms"], values["eigenvalues"]) == (
        "new",
        4.0,
        [-2.2, -1.0],
    )
    assert values["max_rel_diff_to_eigenvector_mode"] == pytest.approx(0.1)
    assert set(out["meta"]["carried"]) == {
        "products (mlp, cnn)",
        "sweep sizes 1e+01",
        "lenet solves not rerun",
    }
    assert out["meta"]["carried"]["lenet solves not rerun"] == "old"


def test_partial_run_dates_carried_lenet_rows_by_the_run_that_measured_them():
    rows = [{"problem": "LA(3)", "mode": "eigenvectors", "products": 5, "eigenvalues": [1.0]}]
    # The old file skipped LeNet, so its rows are from the run before it.
    old = {
        "meta": {"date": "middle", "carried": {"lenet solves": "first"}},
        "products": [],
        "lenet": {"bare_hvp_ms": 5.0, "rows": rows},
    }
    new = {
        "meta": {"date": "new"},
        "products": [],
        "lenet": {"bare_hvp_ms": 4.0, "rows": []},
    }
    out = scale_benchmark.carry_forward(new, old, {"products", "sweep"}, {("SA(3)", False)})
    assert out["lenet"]["rows"][0]["run"] == "first"
    assert out["meta"]["carried"] == {
        "products (mlp, cnn)": "middle",
        "lenet solves not rerun": "first",
    }
