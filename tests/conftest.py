"""Test configuration: x64 on by default, so tests pick float32 or float64 explicitly and upcasts
show; ``HESSKIT_TEST_X64=0`` runs with x64 off, jax's default and most users' setting.

With x64 off, cases that need float64 are skipped with the reason: a test parametrized by a
float64 dtype, and a test marked ``@pytest.mark.x64(reason=...)`` (a float64 reference or a
tolerance only float64 reaches). Everything else runs in float32.
"""

import os

import jax
import numpy as np
import pytest

X64 = os.environ.get("HESSKIT_TEST_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)


def _is_float64(value) -> bool:
    # np.dtype(None) is float64, and parameters may be any object: only dtypes count.
    if value is None or isinstance(value, str | bool | int | float):
        return False
    try:
        return np.dtype(value) == np.float64
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """Skip the float64 cases when x64 is off (see the module docstring)."""
    if X64:
        return
    for item in items:
        marker = item.get_closest_marker("x64")
        if marker is not None:
            reason = marker.kwargs.get("reason", "needs float64")
            item.add_marker(pytest.mark.skip(reason=f"x64 off: {reason}"))
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(_is_float64(v) for v in params.values()):
            item.add_marker(pytest.mark.skip(reason="x64 off: float64 case"))
