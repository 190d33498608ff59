"""Own process, simulated CPU devices: collectives in the compiled solvers on sharded vectors.

Prints one JSON line: for each (devices, axis types, layout, solver) the number of
``all-gather`` (and other collective) ops in the compiled HLO, and whether the result equals
the one-device result. The operator is elementwise (``v -> d * v``), so every collective in
the HLO comes from the solver, not from the product.
"""

import json
import os
import re
import sys

NUM = int(os.environ.get("HESSKIT_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from jax.tree_util import Partial  # noqa: E402

import hesskit as hk  # noqa: E402

jax.config.update("jax_enable_x64", True)

SHAPE = (8, 16)


def _matvec(d, v):
    return jax.tree_util.tree_map(jnp.multiply, d, v)


def operator(d):
    return hk.LinearOperator(Partial(_matvec, d), d)


SOLVERS = {
    "eigsh": lambda op, key: hk.eigsh(op, key, 3, which="BE", krylov_dim=12).eigenvalues,
    "lanczos": lambda op, key: hk.lanczos(op, key, 10).alphas,
    "power_iteration": lambda op, key: hk.power_iteration(op, key, num_iters=30).eigenvalues,
    "trace": lambda op, key: hk.trace(op, key, num_probes=12).value,
    "diagonal": lambda op, key: hk.diagonal(op, key, num_probes=4),
    "spectral_density": lambda op, key: (
        hk.spectral_density(op, key, num_runs=2, num_iters=8).density
    ),
    "solve": lambda op, key: (
        hk.solve(op.shifted(1.0), jax.tree_util.tree_map(jnp.cos, op._matvec.args[0]), tol=1e-10).x
    ),
}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def count(text, name):
    # One op per instruction line: "%x = f64[] all-reduce(...)" or its async "-start" half.
    return len(re.findall(rf" {name}(?:-start)?\(", text))


def mesh_error() -> str:
    # Parameters on devices 0-1 and data on devices 2-3: no one program can combine them.
    devices = np.array(jax.devices()[:4])
    m1, m2 = jax.sharding.Mesh(devices[:2], ("b",)), jax.sharding.Mesh(devices[2:], ("b",))
    p = jax.device_put({"w": jnp.ones((4, 3))}, NamedSharding(m1, P()))
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(m2, P("b")))
    op = hk.hessian_operator(lambda q, x: jnp.sum(jnp.tanh(x @ q["w"]) ** 2), p, x)
    try:
        hk.eigsh(op, jax.random.key(0), 2)
    except ValueError as e:
        return str(e)
    return ""


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    which = [a for a in sys.argv[1:] if a != "--quick"] or list(SOLVERS)
    rng = np.random.default_rng(0)
    diag = {
        "a": jnp.asarray(rng.uniform(-2, 3, SHAPE)),
        "b": jnp.asarray(rng.uniform(0.5, 2, (SHAPE[1],))),
    }
    key = jax.random.key(3)
    single = {name: jax.jit(SOLVERS[name])(operator(diag), key) for name in which}
    layouts = {
        "cols": {"a": P(None, "x"), "b": P("x")},
        "rows": {"a": P("x", None), "b": P()},
        "full": {"a": P("x", "y"), "b": P(("x", "y"))},
    }
    # Column- and row-sharded leaves on 4 devices, fully sharded ones (over both mesh axes) on 8.
    # --quick (make test): one layout per device count and one axis type each; the full grid of
    # 3 layouts x 2 axis types runs in make test-slow.
    both = ("auto", "explicit")
    if quick:
        configs = [(4, "rows", ("explicit",)), (NUM, "full", ("auto",))]
    else:
        configs = [(4, "cols", both), (4, "rows", both), (NUM, "full", both)]
    rows = []
    for ndev, layout, axis_types in configs:
        specs = layouts[layout]
        for types in axis_types:
            axis_type = AxisType.Auto if types == "auto" else AxisType.Explicit
            shape = (ndev // 2, 2) if layout == "full" else (ndev, 1)
            mesh = jax.make_mesh(
                shape, ("x", "y"), axis_types=(axis_type,) * 2, devices=jax.devices()[:ndev]
            )
            d = {n: jax.device_put(diag[n], NamedSharding(mesh, specs[n])) for n in diag}
            for name in which:
                row = {"devices": ndev, "types": types, "layout": layout, "solver": name}
                try:
                    with jax.set_mesh(mesh):
                        fn = jax.jit(SOLVERS[name])
                        text = fn.lower(operator(d), key).compile().as_text()
                        out = fn(operator(d), key)
                    row.update({c: count(text, c) for c in COLLECTIVES})
                    ok = jax.tree_util.tree_map(
                        lambda a, b: bool(np.allclose(a, b, rtol=1e-9, atol=1e-12)),
                        jax.device_get(out),
                        jax.device_get(single[name]),
                    )
                    row["equal"] = all(jax.tree_util.tree_leaves(ok))
                    if isinstance(out, dict):
                        row["out_specs"] = {n: str(out[n].sharding.spec) for n in out}
                        # Pytree results (diagonal, solve) keep the vectors' sharding.
                        row["keeps_sharding"] = all(
                            out[n].sharding.is_equivalent_to(d[n].sharding, d[n].ndim) for n in d
                        )
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
    print(json.dumps({"rows": rows, "mesh_error": mesh_error()}))


if __name__ == "__main__":
    sys.exit(main())
