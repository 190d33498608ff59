"""Run in its own process with 4 simulated CPU devices: eigsh on a data-parallel Hessian."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import hesskit as hk  # noqa: E402

jax.config.update("jax_enable_x64", True)


def main() -> None:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("batch",))
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": 0.7 * jax.random.normal(k[0], (6, 8)),
        "w2": 0.7 * jax.random.normal(k[1], (8, 3)),
    }
    x = jax.random.normal(k[2], (64, 6))
    y = jax.random.normal(k[3], (64, 3))

    def loss(p, x, y):
        return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    @jax.jit
    def solve(p, x, y, key):
        op = hk.hessian_operator(lambda q: loss(q, x, y), p)
        return hk.eigsh(op, key, 4, which="BE")

    key = jax.random.key(1)
    single = solve(params, x, y, key)
    data_sharding = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, data_sharding), jax.device_put(y, data_sharding)
    ps = jax.device_put(params, replicated)
    sharded = solve(ps, xs, ys, key)
    vec_shardings = {
        name: leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
        for name, leaf in sharded.eigenvectors.items()
    }
    # Model-parallel parameters: the Krylov basis and eigenvectors follow their sharding.
    specs = {"w1": P(None, "batch"), "w2": P("batch", None)}
    pm = {n: jax.device_put(params[n], NamedSharding(mesh, specs[n])) for n in params}
    model_parallel = solve(pm, x, y, key)
    follows = {
        n: v.sharding.is_equivalent_to(NamedSharding(mesh, P(None, *specs[n])), v.ndim)
        for n, v in model_parallel.eigenvectors.items()
    }
    print(
        json.dumps(
            {
                "num_devices": len(devices),
                "x_sharded": not xs.sharding.is_fully_replicated,
                "single": np.asarray(single.eigenvalues).tolist(),
                "sharded": np.asarray(sharded.eigenvalues).tolist(),
                "converged": bool(np.all(sharded.converged)),
                "vectors_replicated_like_params": vec_shardings,
                "model_parallel": np.asarray(model_parallel.eigenvalues).tolist(),
                "vectors_sharded_like_params": follows,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
