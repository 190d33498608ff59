"""The Adam benchmark's quick mode runs end to end and writes its tables, JSON and figure."""

import json
import pathlib
import sys

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import adam as adam_benchmark  # noqa: E402


@pytest.mark.slow
def test_adam_benchmark_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    results = adam_benchmark.main(["--quick", "--out", str(tmp_path)])
    (res,) = results.values()
    assert [c["step"] for c in res["checkpoints"]] == [5, 20]
    for c in res["checkpoints"]:
        assert set(c["overall_spearman"]) == set(adam_benchmark.REFS)
        assert len(c["names"]) == 4  # two convolutions and two dense layers
        assert all(-1 <= v <= 1 for v in c["overall_spearman"].values())
    stem = tmp_path / f"adam-{jax.default_backend()}-quick"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["meta"]["complete"] and data["problems"]["cnn"]["num_params"] == 3658
    md = stem.with_suffix(".md").read_text()
    assert "\\|diag H\\|" in md and "ceiling" in md
    assert pathlib.Path(f"{stem}-cnn.png").stat().st_size > 1000
