"""The HVP benchmark's quick mode runs end to end, so the benchmark never rots."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import hvp as hvp_benchmark  # noqa: E402


@pytest.mark.slow
def test_hvp_benchmark_quick(tmp_path):
    out = hvp_benchmark.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / f"hvp-{out['meta']['backend']}-quick.json").read_text())
    assert [r["model"] for r in saved["results"]] == ["mlp", "cnn"]
    for res in saved["results"]:
        rows = res["rows"]
        assert rows["grad"]["ratio_to_grad"] == 1.0
        assert all(r["median_ms"] > 0 for r in rows.values())
        # Eager calls reuse one compiled program: a repeated eager call is within a small
        # factor of the jitted one (loose: one repeat on a shared machine).
        assert rows["hk.hvp eager"]["ratio_to_jit_hvp"] < 20
        assert rows["op(v) eager"]["ratio_to_jit_hvp"] < 20
    assert (tmp_path / f"hvp-{out['meta']['backend']}-quick.md").read_text().startswith("# HVP")
