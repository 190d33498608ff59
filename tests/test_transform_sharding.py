"""Every transform's state keeps its sharding type through jitted updates (own process).

The pattern of optax's sharding test, on 4 simulated CPU devices with ``Explicit`` mesh axes
and column-sharded parameters: ``init`` under ``jit`` gives the same types as eagerly, two
jitted updates give back the same types, and the updates are sharded like the parameters.
"""

import json
import pathlib
import subprocess
import sys


def test_transform_states_keep_their_sharding():
    script = pathlib.Path(__file__).with_name("_sharded_transforms.py")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True
    )
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 9
    for row in rows:
        assert "error" not in row, row
        assert row["init_jit_like_eager"], row
        assert row["types_stable"] and row["state_stable"], row
        assert row["updates_like_params"] and row["finite"], row
