"""Multi-device: eigsh on a data-parallel Hessian over 4 simulated CPU devices (own process)."""

import json
import pathlib
import subprocess
import sys

import numpy as np


def test_eigsh_on_sharded_batch_matches_single_device():
    script = pathlib.Path(__file__).with_name("_sharded_eigsh.py")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_devices"] == 4
    assert result["x_sharded"]
    assert result["converged"]
    np.testing.assert_allclose(result["sharded"], result["single"], rtol=1e-9, atol=1e-12)
    # The eigenvectors keep the parameters' sharding (replicated across the data axis).
    assert all(result["vectors_replicated_like_params"].values())
    np.testing.assert_allclose(result["model_parallel"], result["single"], rtol=1e-9, atol=1e-12)
    assert all(result["vectors_sharded_like_params"].values())
