"""Cost of Hessian-vector products relative to a gradient, measured side by side in one run.

For each model (the digits MLP 64-256-256-10, about 85k parameters, on a batch of 512; and the
small ReLU CNN) this times, after compilation, the median of:

* ``grad``: one jitted gradient (the unit of every ratio);
* ``hk.hvp mode=M (jit)`` for each product mode ``M`` of :func:`hesskit.hvp`: one jitted
  ``hk.hvp(f, params, v, mode=M)``, a product from scratch. ``fwd-rev`` is the jvp of the
  gradient (what ``mode="auto"`` picks where forward mode lowers), ``rev-rev`` the vjp of the
  gradient (auto's fallback for a ``custom_vjp`` loss), ``fd`` the central difference of two
  gradients (the product of :func:`hesskit.fd_hvp`);
* ``op mode=M, N in fori_loop (linearized)``: ``hessian_operator(loss, params, data,
  mode=M).linearize()`` applied ``N`` times inside one compiled ``lax.fori_loop``, as
  ``loop="compiled"`` solvers do (one forward and backward pass, then per product only the
  tangent pass for fwd-rev or the cotangent pass for rev-rev; fd shares nothing), and
  ``op mode=M, N jitted calls from Python (linearized)``: the same products dispatched one by
  one from Python, as ``loop="host"`` solvers do (XLA's CPU backend runs convolutions inside
  loops many times slower, jax-ml/jax#12868: compare the two rows on the CNN);
* ``op mode=fwd-rev, N in fori_loop (not linearized)``: the same loop without sharing work
  between products;
* ``hk.hvp eager``: :func:`hesskit.hvp` called outside ``jit``, as the quickstart does (its
  first call compiles once per function and shapes, later calls reuse the executable), and
  ``op(v) eager``: an operator's product called outside ``jit`` (and ``new operator +
  op(v)``: building the operator each time, which validates the loss); for these rows the compile
  column is the first call's time and ``/ jit hvp`` compares a repeated call with the jitted
  ``hk.hvp mode=fwd-rev`` row;

plus compile times, and a summary table of each mode's cost per product in gradients. The
cases are timed in interleaved rounds (each case once per round, ``repeats`` rounds, medians),
so a drifting load on a shared machine moves every row alike. Usage::

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


MODES = ("fwd-rev", "rev-rev", "fd")
JIT_HVP = "hk.hvp mode=fwd-rev (jit)"


def bench_model(model: str, n: int, steps: int, repeats: int, loop: int) -> dict:
    params, data, loss = trained_point(model, n, steps)
    f = lambda p: loss(p, data)  # noqa: E731
    v = hk.tree_random_sphere(jax.random.key(1), params)
    dim = hk.tree_dim(params)

    grad = jax.jit(jax.grad(f))

    def jit_hvp(mode: str):
        return jax.jit(lambda p, v: hk.hvp(f, p, v, mode=mode))

    def in_loop(linearize: bool):
        @jax.jit
        def run(op, v):
            if linearize:
                op = op.linearize()

            def body(_, v):
                return hk.tree_normalize(op(v))[0]

            return jax.lax.fori_loop(0, loop, body, v)

        return run

    linearized = jax.jit(lambda op: op.linearize())
    step = jax.jit(lambda lin, v: hk.tree_normalize(lin(v))[0])

    def from_python(op):
        # The linearization is the solver's one-off cost: outside the timed products.
        lin = jax.block_until_ready(linearized(op))

        def run(v):
            for _ in range(loop):
                v = step(lin, v)
            return v

        return run

    ops = {m: hk.hessian_operator(loss, params, data, mode=m) for m in MODES}
    cases = [("grad", grad, (params,))]
    cases += [(f"hk.hvp mode={m} (jit)", jit_hvp(m), (params, v)) for m in MODES]
    for m in MODES:
        cases += [
            (f"op mode={m}, {loop} in fori_loop (linearized)", in_loop(True), (ops[m], v)),
            (
                f"op mode={m}, {loop} jitted calls from Python (linearized)",
                from_python(ops[m]),
                (v,),
            ),
        ]
    op = ops["fwd-rev"]
    cases += [
        (f"op mode=fwd-rev, {loop} in fori_loop (not linearized)", in_loop(False), (op, v)),
        # f is new to hesskit's eager cache here (the jitted rows above traced it inline), so
        # the first call includes the one compile.
        ("hk.hvp eager", lambda p, v: hk.hvp(f, p, v), (params, v)),
        ("op(v) eager", lambda v: op(v), (v,)),
        ("new operator + op(v) eager", lambda v: hk.hessian_operator(loss, params, data)(v), (v,)),
    ]
    rows = {}
    for name, fn, args in cases:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        rows[name] = {"compile_s": time.perf_counter() - t0}
    # Interleaved rounds, every case once per round: on a shared machine the load drifts over
    # minutes, and timing each case in its own block would put that drift into the ratios.
    runs: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(repeats):
        for name, fn, args in cases:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            runs[name].append(time.perf_counter() - t0)
    for name, _, _ in cases:
        per = loop if name.startswith("op mode=") else 1
        rows[name]["median_ms"] = 1e3 * statistics.median(runs[name]) / per
    g = rows["grad"]["median_ms"]
    jitted = rows[JIT_HVP]["median_ms"]
    for name, r in rows.items():
        r["ratio_to_grad"] = r["median_ms"] / g
        if "eager" in name:
            r["ratio_to_jit_hvp"] = r["median_ms"] / jitted
    return {"model": model, "params": dim, "batch": n, "loop": loop, "rows": rows}


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# HVP cost vs gradient ({meta['backend']}, {meta['device']})",
        "",
        f"jax {meta['jax']}, {meta['date']}, repeats {meta['repeats']}, loop {meta['loop']}.",
        "",
    ]
    loop = meta["loop"]
    lines += [
        "## Per product, in gradients, by mode",
        "",
        "`hk.hvp` jitted (a product from scratch), and the linearized operator inside one "
        'compiled loop (`loop="compiled"` solvers) and called from Python '
        '(`loop="host"` solvers).',
        "",
        "| model | product | fwd-rev | rev-rev | fd |",
        "|---|---|---:|---:|---:|",
    ]
    kinds = [
        ("hk.hvp (jit)", "hk.hvp mode={m} (jit)"),
        ("operator in fori_loop", "op mode={m}, " + f"{loop} in fori_loop (linearized)"),
        (
            "operator from Python",
            "op mode={m}, " + f"{loop} jitted calls from Python (linearized)",
        ),
    ]
    for res in results:
        for label, pattern in kinds:
            cells = [f"{res['rows'][pattern.format(m=m)]['ratio_to_grad']:.2f}" for m in MODES]
            lines.append(f"| {res['model']} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
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
        repeats, loop = 20, 20
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
