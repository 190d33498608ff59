"""The repeated-eigenvalue benchmark's quick mode runs end to end, so the benchmark never rots."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import copies as copies_benchmark  # noqa: E402


@pytest.mark.slow
def test_copies_benchmark_quick(tmp_path):
    out = copies_benchmark.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / f"copies-{out['meta']['backend']}-quick.json").read_text())
    rows = saved["rows"]
    assert {r["which"] for r in rows} == {"SA", "LA", "BE"}
    # With the verification on, no solve misses a copy while calling itself converged.
    assert not any(r["silent"] for r in rows if r["verify"])
    assert all(r["products"] > 0 for r in rows)
