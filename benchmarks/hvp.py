"""Cost of Hessian-vector products relative to a gradient, measured side by side in one run.

For each model (the digits MLP 64-256-256-10, about 85k parameters, on a batch of 512; and the
small ReLU CNN) this times, after compilation, the median of:

* ``grad``: one jitted gradient (the unit of every ratio);
* ``hvp``: one jitted :func:`hesskit.hvp` (jvp of grad, forward + backward from scratch);
* ``rev-over-rev``: grad of <grad, v>, the other exact HVP, for comparison;
* ``matvec (jvp-of-grad)``: the operator applied repeatedly inside one compiled loop, as a
  solver does, without sharing work between products;
* ``matvec (linearized)``: the same loop after ``op.linearize()`` (forward and backward once,
  then only the tangent pass per product) -- what hesskit's solvers use;
* ``fd_hvp``: the central finite difference (two gradients);
* ``hk.hvp eager``: :func:`hesskit.hvp` called outside ``jit``, as the quickstart does (its
  first call compiles once per function and shapes, later calls reuse the executable), and
  ``op(v) eager``: an operator's product called outside ``jit`` (and ``new operator +
  op(v)``: building the operator each time, which validates the loss); for these rows the compile
  column is the first call's time and ``/ jit hvp`` compares a repeated call with the jitted
  ``hvp`` row;

plus compile times. Usage::

    python benchmarks/hvp.py          # full sizes; saves results/hvp-<backend>.{json,md}
    python benchmarks/hvp.py --quick  # tiny sizes, one repeat (run by the test suite)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import optax

import hesskit as hk
from hesskit.examples import load_digits, make_classifier, make_loss

RESULTS = pathlib.Path(__file__).parent / "results"


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """Return (compile seconds, median run seconds) of a jitted ``fn``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return compile_s, statistics.median(runs)


def trained_point(model: str, n: int, steps: int, seed: int = 0):
    data = load_digits(n, seed=seed)
    module, params = make_classifier(model, key=jax.random.key(seed), sample=data.x[:1])
    loss = make_loss(module)
    opt = optax.sgd(0.05)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(params, data)
        upd, state = opt.update(g, state)
        return optax.apply_updates(params, upd), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, data, loss


def bench_model(model: str, n: int, steps: int, repeats: int, loop: int) -> dict:
    params, data, loss = trained_point(model, n, steps)
    f = lambda p: loss(p, data)  # noqa: E731
    v = hk.tree_random_sphere(jax.random.key(1), params)
    dim = hk.tree_dim(params)

    grad = jax.jit(jax.grad(f))
    hvp = jax.jit(lambda p, v: hk.hvp(f, p, v))
    rev = jax.jit(lambda p, v: jax.grad(lambda q: hk.tree_vdot(jax.grad(f)(q), v))(p))
    fd = jax.jit(lambda p, v: hk.fd_hvp(f, p, v))

    def repeated(linearize: bool):
        @jax.jit
        def run(p, v):
            op = hk.hessian_operator(f, p)
            if linearize:
                op = op.linearize()

            def body(_, v):
                return hk.tree_normalize(op(v))[0]

            return jax.lax.fori_loop(0, loop, body, v)

        return run

    op = hk.hessian_operator(loss, params, data)
    rows = {}
    for name, fn, args in [
        ("grad", grad, (params,)),
        ("hvp (jvp-of-grad)", hvp, (params, v)),
        ("hvp (rev-over-rev)", rev, (params, v)),
        ("fd_hvp", fd, (params, v)),
        ("matvec in loop (jvp-of-grad)", repeated(False), (params, v)),
        ("matvec in loop (linearized)", repeated(True), (params, v)),
        # f is new to hesskit's eager cache here (the jitted row above traced it inline), so
        # the first call includes the one compile.
        ("hk.hvp eager", lambda p, v: hk.hvp(f, p, v), (params, v)),
        ("op(v) eager", lambda v: op(v), (v,)),
        ("new operator + op(v) eager", lambda v: hk.hessian_operator(loss, params, data)(v), (v,)),
    ]:
        # Eager calls take milliseconds at most: more repeats keep their median stable.
        reps = max(repeats, 20) if "eager" in name else repeats
        compile_s, median_s = timed(fn, *args, repeats=reps)
        per = median_s / loop if "loop" in name else median_s
        rows[name] = {"compile_s": compile_s, "median_ms": 1e3 * per}
    g = rows["grad"]["median_ms"]
    jitted = rows["hvp (jvp-of-grad)"]["median_ms"]
    for name, r in rows.items():
        r["ratio_to_grad"] = r["median_ms"] / g
        if "eager" in name:
            r["ratio_to_jit_hvp"] = r["median_ms"] / jitted
    return {"model": model, "params": dim, "batch": n, "rows": rows}


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# HVP cost vs gradient ({meta['backend']}, {meta['device']})",
        "",
        f"jax {meta['jax']}, {meta['date']}, repeats {meta['repeats']}, loop {meta['loop']}.",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']}: {res['params']} parameters, batch {res['batch']}",
            "",
            "| what | median ms | / grad | / jit hvp | compile s (eager: first call) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in res["rows"].items():
            ms, ratio, comp = r["median_ms"], r["ratio_to_grad"], r["compile_s"]
            vs_jit = f"{r['ratio_to_jit_hvp']:.2f}" if "ratio_to_jit_hvp" in r else ""
            lines.append(f"| {name} | {ms:.3f} | {ratio:.2f} | {vs_jit} | {comp:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the json/md tables")
    args = parser.parse_args(argv)
    if args.quick:
        configs = [("mlp", 64, 5), ("cnn", 32, 5)]
        repeats, loop = 1, 3
    else:
        configs = [("mlp-large", 512, 300), ("cnn", 512, 300)]
        repeats, loop = 30, 20
    results = [bench_model(m, n, s, repeats, loop) for m, n, s in configs]
    meta = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "repeats": repeats,
        "loop": loop,
        "machine": platform.platform(),
        "quick": args.quick,
    }
    md = to_markdown(results, meta)
    print(md)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    stem = out / f"hvp-{meta['backend']}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    stem.with_suffix(".md").write_text(md + "\n")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
