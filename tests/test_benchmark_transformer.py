"""The transformer benchmark's quick mode runs end to end as a script, so it never rots."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "transformer.py"


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.mark.slow
def test_transformer_benchmark_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [path] = tmp_path.glob("transformer-*-quick.json")
    saved = json.loads(path.read_text())
    assert saved["meta"]["quick"] is True and saved["meta"]["devices"]
    assert path.with_suffix(".md").read_text().startswith("# Hessian of a byte-level transformer")
    run = saved["run"]
    assert run["config"] == "tiny" and run["params"] > 10_000 and _finite(run["loss"])

    # Training lowered the loss from near-uniform (ln 256 = 5.55 nats per byte).
    losses = [value for _, value in saved["train"]["losses"]]
    assert losses[0] > losses[-1] and abs(losses[0] - math.log(256)) < 0.5

    rows = saved["products"]["rows"]
    assert saved["products"]["mode"] == "fwd-rev"
    assert rows["grad"]["ratio_to_grad"] == 1.0
    for r in rows.values():
        assert r["ms"] > 0 and _finite(r["ratio_to_grad"]) and r["compile_s"] > 0
        # The HVP holds at least the gradient's arguments; XLA reports every executable here.
        assert r["memory"]["peak_bytes"] > 0 and r["memory"]["temp"] >= 0

    assert set(saved["eigsh"]) == {"LA(10)", "SA(3)"}  # BE(6): full runs only
    for r in saved["eigsh"].values():
        assert 0 < r["products"] <= r["max_matvecs"]
        assert len(r["eigenvalues"]) == r["k"] and all(map(_finite, r["eigenvalues"]))
        assert r["wall_s"] > 0 and r["total_s"] >= r["wall_s"] and 0 <= r["converged"] <= r["k"]
    la, sa = saved["eigsh"]["LA(10)"]["eigenvalues"], saved["eigsh"]["SA(3)"]["eigenvalues"]
    assert max(la) > 0 and min(sa) < max(la)

    slq = saved["slq"]
    assert slq["products"] == slq["num_runs"] * slq["num_iters"]
    assert slq["min_node"] <= slq["max_node"] and len(slq["grid"]) == len(slq["density"])
    assert {g["goal"] for g in saved["goal_rows"]} >= {"HVP / gradient", "SA(3) products"}
