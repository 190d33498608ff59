"""One process of a two-process run under ``jax.distributed`` (or the one-process reference).

Usage: ``_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT`` (``NUM_PROCESSES`` 0: the plain
one-device reference). Each process holds two CPU devices; CPU collectives go through gloo.
Prints one JSON line with the eigenvalues (``which="BE"``) and Hutch++ traces of a
data-parallel Hessian (batch split over all four devices, so over both processes) and of a
data x model parallel one (a 2 x 2 mesh: batch over processes, parameters within each).
"""

import json
import os
import sys

PID, NPROC, PORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + ("2" if NPROC else "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)
if NPROC:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{PORT}", num_processes=NPROC, process_id=PID
    )

import hesskit as hk  # noqa: E402


def problem():
    # Every process builds the same data from the same seed; each then keeps its own slice.
    rng = np.random.default_rng(0)
    params = {"w1": 0.7 * rng.normal(size=(6, 8)), "w2": 0.7 * rng.normal(size=(8, 3))}
    return params, rng.normal(size=(32, 6)), rng.normal(size=(32, 3))


def loss(p, x, y):
    return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)


@jax.jit
def solve(p, x, y, key):
    op = hk.hessian_operator(loss, p, x, y)
    k1, k2 = jax.random.split(key)
    res = hk.eigsh(op, k1, 3, which="BE")
    return res.eigenvalues, hk.trace(op, k2, num_probes=30).value


def put(a, mesh, spec):
    # A global array from a host copy that every process holds in full.
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def local(a):
    # A replicated result: this process's own copy.
    return np.asarray(a.addressable_data(0)).tolist()


def main() -> None:
    params, x, y = problem()
    key = jax.random.key(1)
    out = {"process": jax.process_index(), "devices": jax.device_count()}
    if not NPROC:
        vals, tr = solve(params, x, y, key)
        out.update(data={"eig": local(vals), "trace": float(tr)})
        out["model"] = out["data"]
        print(json.dumps(out))
        return
    out["local_devices"] = jax.local_device_count()
    data = jax.make_mesh((4,), ("data",), devices=jax.devices())
    p = {n: put(v, data, P()) for n, v in params.items()}
    vals, tr = solve(p, put(x, data, P("data")), put(y, data, P("data")), key)
    out["data"] = {"eig": local(vals), "trace": float(local(tr))}
    # Rows of the device grid are processes: the batch is split over processes, the
    # parameters over the two devices of each.
    grid = np.array(jax.devices()).reshape(2, 2)
    both = jax.sharding.Mesh(grid, ("data", "model"))
    specs = {"w1": P(None, "model"), "w2": P("model", None)}
    p = {n: put(v, both, specs[n]) for n, v in params.items()}
    vals, tr = solve(p, put(x, both, P("data")), put(y, both, P("data")), key)
    out["model"] = {"eig": local(vals), "trace": float(local(tr))}
    out["model_rows_are_processes"] = all(len({d.process_index for d in row}) == 1 for row in grid)
    print(json.dumps(out))
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
