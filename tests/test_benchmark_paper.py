"""The paper benchmark's quick mode runs end to end and its findings are finite and consistent."""

import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import paper as paper_benchmark  # noqa: E402


@pytest.mark.slow
def test_paper_benchmark_quick(tmp_path):
    out = paper_benchmark.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "paper-cnn-quick.json").read_text())
    assert saved["meta"]["quick"] is True and saved["params"] == out["params"] == 3658
    md = (tmp_path / "paper-cnn-quick.md").read_text()
    assert md.startswith("# The negative-eigenvalues paper")
    mem = saved["regimes"]["memorising"]
    rows = mem["checkpoints"]
    assert [r["step"] for r in rows] == [0, 60]
    for r in rows:
        # BE(4): two from each end, sorted; the bottom is negative, the top positive.
        assert r["top"][0] >= r["top"][1] > 0 > r["bottom"][1] >= r["bottom"][0]
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["products"] > 0
        # How each solve ended is recorded with it, and agrees with its convergence count.
        assert r["status"] in (0, 1, 3) and (r["status"] == 0) == (r["converged"] == r["k"])
        assert r["max_residual"] >= 0
    ch = rows[1]["change"]["top"]
    assert all(0 <= a <= 90 for a in ch["cluster_angles_deg"])
    d = rows[-1]["directional"]
    assert len(d["alpha_star"]) == len(d["at_edge"]) == 4
    sub = mem["subsets"][0]
    assert sub["examples"] == 50
    # Rayleigh quotients on the full Hessian of unit vectors lie within its spectrum's extremes.
    assert max(sub["top"]["full_rayleigh"]) <= rows[-1]["top"][0] * 1.01
    assert "label noise" in saved["regimes"]
    # The figures: eigenvalue tracks per regime and the subset curve, redrawable from the JSON.
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert {"paper-cnn-quick-memorising.png", "paper-cnn-quick-label-noise.png"} <= pngs
    assert "paper-cnn-quick-subsets.png" in pngs
    (tmp_path / "paper-cnn-quick-subsets.png").unlink()
    paper_benchmark.main(["--figures", str(tmp_path / "paper-cnn-quick.json")])
    assert (tmp_path / "paper-cnn-quick-subsets.png").stat().st_size > 1000


def test_paper_benchmark_rejects_an_unknown_regime():
    with pytest.raises(SystemExit):
        paper_benchmark.main(["--quick", "--regimes", "memorizing"])
