"""Own process, 4 simulated CPU devices: every transform's state keeps its sharding.

The pattern of optax's ``contrib/_sharding_test.py``: parameters sharded over a mesh, the
state made by a jitted ``init`` and advanced by two jitted ``update`` steps; every state leaf
must keep the sharding it started with (a state that drifts to another sharding would be
resharded, or recompiled for, at every step), and the updates follow the parameters'.
Prints one JSON line per transform and mesh axis type.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import hesskit as hk  # noqa: E402

jax.config.update("jax_enable_x64", True)

TRANSFORMS = {
    "add_sphere_noise": lambda: hk.add_sphere_noise(0.01),
    "noisy_sgd": lambda: hk.noisy_sgd(0.1, 0.01),
    "perturb_near_saddle": lambda: hk.perturb_near_saddle(0.01, 10.0, 1),
    "negative_curvature": lambda: hk.negative_curvature(0.01, num_matvecs=4),
    "monitor_curvature": lambda: hk.monitor_curvature(1, num_matvecs=4, num_tracked=2),
    "scale_by_sharpness": lambda: hk.scale_by_sharpness(
        max_learning_rate=0.1, every=1, num_matvecs=4
    ),
    "saddle_free_newton": lambda: hk.saddle_free_newton(num_matvecs=4),
    "newton_cg": lambda: hk.newton_cg(maxiter=4),
    "adahessian": lambda: hk.adahessian(),
}


def loss(p):
    return jnp.sum(jnp.tanh(p["w"]) ** 2 * p["c"]) + 0.5 * jnp.sum(p["b"] ** 2) ** 2


def shardings(tree):
    return [
        str(jax.typeof(x).sharding.spec) if hasattr(x, "sharding") else None
        for x in jax.tree_util.tree_leaves(tree)
    ]


def main() -> None:
    rng = np.random.default_rng(0)
    values = {
        "w": rng.normal(size=(8, 16)),
        "c": rng.uniform(-1, 1, (8, 16)),
        "b": rng.normal(size=(16,)),
    }
    specs = {"w": P(None, "x"), "c": P(None, "x"), "b": P("x")}
    rows = []
    # Explicit axes, where the sharding is part of each array's type (optax's own test
    # pattern); under Auto axes a state made from zeros inside a jitted init is placed by XLA,
    # as optax's own transforms' states are.
    for types in ("explicit",):
        axis_type = AxisType.Explicit
        mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
        params = {n: jax.device_put(v, NamedSharding(mesh, specs[n])) for n, v in values.items()}
        for name, make in TRANSFORMS.items():
            row = {"transform": name, "types": types}
            try:
                opt = make()

                @jax.jit
                def step(p, state, opt=opt):
                    updates, state = opt.update(jax.grad(loss)(p), state, p, value_fn=loss)
                    return optax.apply_updates(p, updates), updates, state

                with jax.set_mesh(mesh):
                    state0 = jax.jit(opt.init)(params)
                    eager = opt.init(params)
                    p1, updates, state1 = step(params, state0)
                    p2, _, state2 = step(p1, state1)
                row["state_stable"] = all(
                    a.sharding.is_equivalent_to(b.sharding, a.ndim)
                    and a.sharding.is_equivalent_to(c.sharding, a.ndim)
                    for a, b, c in zip(
                        *(jax.tree_util.tree_leaves(s) for s in (state0, state1, state2)),
                        strict=True,
                    )
                )
                row["init_jit_like_eager"] = jax.tree_util.tree_map(
                    jax.typeof, eager
                ) == jax.tree_util.tree_map(jax.typeof, state0)
                row["types_stable"] = jax.tree_util.tree_map(
                    jax.typeof, state0
                ) == jax.tree_util.tree_map(jax.typeof, state2)
                row["updates_like_params"] = all(
                    updates[n].sharding.is_equivalent_to(params[n].sharding, params[n].ndim)
                    for n in params
                )
                row["finite"] = bool(all(np.all(np.isfinite(np.asarray(p2[n]))) for n in p2))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.exit(main())
