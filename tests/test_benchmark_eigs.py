"""The eigensolver benchmark's quick mode runs end to end, so the benchmark never rots."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))

import eigs as eigs_benchmark  # noqa: E402


@pytest.mark.slow
def test_eigs_benchmark_quick(tmp_path):
    out = eigs_benchmark.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / f"eigs-{out['meta']['backend']}-quick.json").read_text())
    rows = saved["results"][0]["rows"]
    tools = {"hesskit.eigsh", "hesskit.eigsh verify=False", "scipy eigsh (jit HVP)"}
    eager = {"hesskit.eigsh eager (loop=auto)", "hesskit.eigsh values only"}
    assert {r["tool"] for r in rows} == tools | eager | {"hesskit.eigsh basis bf16"}
    for r in rows:
        assert r["hvps"] > 0 and r["median_s"] > 0
        if r["tool"] == "hesskit.eigsh basis bf16":
            # tol=1e-5 is below a bfloat16 basis's reach: the run says so instead of spinning.
            assert r["status"] == 3 and r["max_rel_err"] < 2e-2
        elif r["tool"].startswith("hesskit.eigsh"):
            assert r["converged"] == r["k"]
            assert r["max_rel_err"] < 1e-3
    sweep = saved["results"][0]["sweep"]
    assert {r["tool"] for r in sweep} == tools | {eigs_benchmark.ORACLE}
    # The oracle (one unrestarted Lanczos run) bounds what a restarted solver can reach.
    assert eigs_benchmark.fewest_hvps(sweep, "LA(10)", eigs_benchmark.ORACLE, 1e-4) is not None
    # A tighter tolerance must buy accuracy: the float32 floor is about 1e-7 relative.
    tight = [r for r in sweep if r["tool"] == "hesskit.eigsh" and r["tol"] == 1e-6]
    assert tight and all(r["max_rel_err"] < 1e-5 for r in tight)
    assert eigs_benchmark.fewest_hvps(sweep, "SA(3)", "hesskit.eigsh", 1e-4) is not None
