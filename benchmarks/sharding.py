"""eigsh on 1, 2, 4 and 8 simulated devices: time per product and bytes moved per product.

A tanh MLP on random data, the Hessian of its mean loss. Two layouts on a one-axis mesh of
``n`` devices:

- **data parallel**: the batch split over the devices, the parameters replicated; each product
  all-reduces a parameter-sized gradient;
- **model parallel**: the hidden layers' weights split over the devices (``w1`` by columns,
  ``w2`` by rows, ``w3`` by columns), the batch replicated; the products exchange activations,
  and the solver's inner products all-reduce scalars.

For each, ``eigsh`` LA(5) with its products, wall time after compilation, time per product,
and the bytes the compiled programs move: every collective (all-reduce, all-gather,
reduce-scatter, all-to-all, collective-permute) in the HLO of one jitted product, with the
size of its result, summed (the bytes each device receives or contributes per product, in the
same units on every layout), and the all-gathers of the whole compiled eigsh (zero: the
solver's reductions keep each leaf's sharding). The simulated devices share the host's cores,
so wall times show the overhead of partitioning, not a speed-up; the bytes are what a cluster
would move.

Usage::

    python benchmarks/sharding.py          # saves results/sharding-<backend>.{json,md}
    python benchmarks/sharding.py --quick  # a tiny MLP on 1 and 2 devices (test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of each collective's result in an HLO text, summed by kind (each op once)."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        for name in COLLECTIVES:
            # "%x = f32[8,16]{1,0} all-reduce(...)" or a tuple result "(f32[2], f32[3])".
            m = re.search(rf"= (.*?) {name}(?:-start)?\(", line)
            if m:
                for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                    size = 1
                    for d in filter(None, dims.split(",")):
                        size *= int(d)
                    out[name] += size * _BYTES.get(dtype, 4)
    return out


def solver_gathers(hlo: str) -> dict[str, int]:
    """All-gathers in a compiled eigsh: in the products (autodiff of the loss) and the rest."""
    lines = [line for line in hlo.splitlines() if re.search(r" all-gather(?:-start)?\(", line)]
    # The products' ops carry their autodiff origin in the metadata (``jvp(...)``).
    in_product = sum("jvp(" in line or "transpose(" in line for line in lines)
    return {"eigsh_all_gathers": len(lines) - in_product, "product_all_gathers": in_product}


def worker(num_devices: int, widths: list[int], batch: int, k: int) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import hesskit as hk

    rng = np.random.default_rng(0)
    sizes = list(zip(widths[:-1], widths[1:], strict=True))
    params = {
        f"w{i + 1}": (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32)
        for i, s in enumerate(sizes)
    }
    x = rng.normal(size=(batch, widths[0])).astype(np.float32)
    y = rng.normal(size=(batch, widths[-1])).astype(np.float32)

    def loss(p, x, y):
        h = x
        for i in range(len(sizes) - 1):
            h = jnp.tanh(h @ p[f"w{i + 1}"])
        return 0.5 * jnp.mean((h @ p[f"w{len(sizes)}"] - y) ** 2)

    @jax.jit
    def solve(p, x, y, key):
        res = hk.eigsh(hk.hessian_operator(loss, p, x, y), key, k, tol=1e-4)
        return res.eigenvalues, res.num_matvecs

    @jax.jit
    def product(p, x, y, v):
        return hk.hvp(lambda q: loss(q, x, y), p, v)

    # Auto axes: XLA chooses the layout of the model's own activations (under Explicit axes
    # the model-parallel matmuls would each have to name one).
    mesh = jax.make_mesh(
        (num_devices,),
        ("d",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )
    model_specs = {name: P() for name in params}
    for i, name in enumerate(params):
        if i < len(params) - 1 or len(params) == 1:
            model_specs[name] = P(None, "d") if i % 2 == 0 else P("d", None)
    layouts = {
        "data": ({n: P() for n in params}, P("d")),
        "model": (model_specs, P()),
    }
    key = jax.random.key(0)
    rows = []
    for layout, (pspecs, dspec) in layouts.items():
        p = {n: jax.device_put(v, NamedSharding(mesh, pspecs[n])) for n, v in params.items()}
        xs, ys = (jax.device_put(a, NamedSharding(mesh, dspec)) for a in (x, y))
        t0 = time.perf_counter()
        compiled = solve.lower(p, xs, ys, key).compile()
        compile_s = time.perf_counter() - t0
        vals, n = compiled(p, xs, ys, key)
        jax.block_until_ready(vals)
        t0 = time.perf_counter()
        vals, n = compiled(p, xs, ys, key)
        jax.block_until_ready(vals)
        wall = time.perf_counter() - t0
        hvp = product.lower(p, xs, ys, p).compile()
        jax.block_until_ready(hvp(p, xs, ys, p))
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            out = hvp(p, xs, ys, p)
        jax.block_until_ready(out)
        moved = collective_bytes(hvp.as_text())
        rows.append(
            {
                "devices": num_devices,
                "layout": layout,
                "params": int(sum(v.size for v in params.values())),
                "products": int(n),
                "wall_s": wall,
                "ms_per_product": 1e3 * wall / int(n),
                "bare_hvp_ms": 1e3 * (time.perf_counter() - t0) / reps,
                "compile_s": compile_s,
                "bytes_per_product": sum(moved.values()),
                "bytes_by_kind": moved,
                **solver_gathers(compiled.as_text()),
                "eigenvalues": np.asarray(vals).tolist(),
            }
        )
    return {"rows": rows}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# eigsh on simulated devices: time and bytes moved per product",
        "",
        f"MLP {meta['widths']} (tanh), batch {meta['batch']}, float32, LA({meta['k']}) "
        f"to tol 1e-4; {meta['backend']} with {meta['cores']} cores shared by all the "
        "simulated devices (wall times show partitioning overhead, not speed-up). "
        "Bytes: the results of every collective in one jitted product's HLO, summed. "
        "All-gathers: in the compiled eigsh, outside the products (the solver's) and inside "
        "them (the model's activations, where XLA chose to gather).",
        "",
        "| devices | layout | products | wall (s) | ms / product | bare HVP (ms) | "
        "compile (s) | bytes / product | all-gathers: solver | in products |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['devices']} | {r['layout']} | {r['products']} | {r['wall_s']:.3f} | "
            f"{r['ms_per_product']:.2f} | {r['bare_hvp_ms']:.2f} | {r['compile_s']:.1f} | "
            f"{r['bytes_per_product']:,} | {r['eigsh_all_gathers']} | "
            f"{r['product_all_gathers']} |"
        )
    lines += ["", f"Reproduce: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP, 1 and 2 devices")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    widths, batch, counts, k = (
        ([8, 16, 16, 2], 32, [1, 2], 2)
        if args.quick
        else ([64, 256, 256, 10], 512, [1, 2, 4, 8], 5)
    )
    if args.worker:
        print(json.dumps(worker(args.worker, widths, batch, k)))
        return {}
    rows = []
    for n in counts:
        # Each device count needs its own process: XLA reads the flag once, at start-up.
        cmd = [sys.executable, __file__, "--worker", str(n)] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    import jax

    result = {
        "meta": {
            "widths": widths,
            "batch": batch,
            "k": k,
            "quick": args.quick,
            "backend": jax.default_backend(),
            "cores": os.cpu_count(),
            "jax": jax.__version__,
            "command": "python benchmarks/sharding.py" + (" --quick" if args.quick else ""),
        },
        "rows": rows,
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"sharding-{result['meta']['backend']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
