"""hesskit's eigensolver against scipy.sparse.linalg.eigsh over the same jitted HVP, side by side.

For each model (the digits MLP 64-256-256-10, about 85k parameters, batch 512, and the small
ReLU CNN), trained for a few hundred SGD steps first so the point has both positive and negative
curvature, this measures LA(10), SA(3) and BE(6) at ``tol=1e-5``:

* ``hesskit.eigsh``: thick-restart Lanczos in one compiled ``lax.while_loop``;
* ``hesskit.eigsh`` called eagerly on ``hessian_operator(loss, params, data)``: the default
  loop strategy (host dispatch on CPU when the product has convolutions), the
  eigenvalues-only mode (``return_eigenvectors=False``) and a bfloat16 basis (``basis_dtype``);
* ``scipy eigsh``: ARPACK driving a jitted flat HVP through a ``LinearOperator`` (the seed
  paper's method: one host round trip per product);

reporting HVP count, median wall time after compilation, compile time, the largest relative
eigenvalue error against a float64 reference (scipy ``eigsh`` at ``tol=1e-10`` on the float64
Hessian) and, for hesskit, the share of wall time spent outside HVPs (wall time minus HVP count
times the per-product cost measured in a compiled loop). It also times a 100-probe Hutchinson
trace batched with ``vmap`` against a Python loop of single jitted HVPs, and SA(3) from 4 keys in
one ``jit(vmap(eigsh))`` against a Python loop of the same jitted solves.

Usage::

    python benchmarks/eigs.py          # full sizes; saves results/eigs-<backend>.{json,md}
    python benchmarks/eigs.py --quick  # tiny sizes, one repeat (run by the test suite)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import statistics
import time

# OpenBLAS's threads fight XLA's for the two cores: the small eigh of the projected matrix
# took 29-176 ms at size 100 with them and 0.7 ms without (the peer benchmark pins them too).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402
from hvp import trained_point  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import hesskit as hk  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
TOL = 1e-5
PROBLEMS = {"LA(10)": ("LA", 10), "SA(3)": ("SA", 3), "BE(6)": ("BE", 6)}
SWEEP_OURS = (1e-3, 1e-4, 1e-5, 1e-6)
SWEEP_SCIPY = (1e-2, 1e-3, 1e-4, 1e-5)
TARGETS = (1e-4, 1e-5, 1e-6)
ORACLE = "one Lanczos run (oracle length)"


def median_time(fn, repeats: int) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs), out


def scipy_eigs(flat_hvp, dim, dtype, which, k, tol, v0):
    count = [0]

    def matvec(x):
        count[0] += 1
        return np.asarray(flat_hvp(jnp.asarray(x, dtype)), dtype=np.float64)

    lin = sla.LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
    vals = sla.eigsh(lin, k=k, which=which, tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(vals), count[0]


def rel_err(vals, ref) -> float:
    return float(np.max(np.abs(np.asarray(vals) - ref) / np.abs(ref)))


def fewest_hvps(sweep: list[dict], problem: str, tool: str, target: float) -> int | None:
    """Fewest products among the sweep's runs of ``tool`` whose error is at most ``target``."""
    hits = [
        r["hvps"]
        for r in sweep
        if r["problem"] == problem and r["tool"] == tool and r["max_rel_err"] <= target
    ]
    return min(hits) if hits else None


def sweep_row(row: dict, tol: float) -> dict:
    """A main-table row as a sweep entry at ``tol``."""
    keep = ("problem", "tool", "hvps", "max_rel_err", "converged", "k")
    return {"tol": tol, **{key: row[key] for key in keep}}


def wanted(vals, which):
    vals = np.sort(np.asarray(vals))
    return vals[::-1] if which == "LA" else vals


def extreme(theta, which, k):
    """The ``k`` values ``which`` asks for among all of ``theta``, ordered as ``wanted``."""
    theta = np.sort(np.asarray(theta))
    if which == "LA":
        return theta[::-1][:k]
    if which == "SA":
        return theta[:k]
    return np.sort(np.concatenate([theta[: k // 2], theta[len(theta) - (k - k // 2) :]]))


def bench_model(model: str, n: int, steps: int, repeats: int, quick: bool) -> dict:
    params, data, loss = trained_point(model, n, steps)
    flat, unravel = ravel_pytree(params)
    dim = flat.size
    dtype = flat.dtype
    # Parameters and data are arguments, never closed-over constants: XLA would otherwise spend
    # seconds constant-folding the forward pass into every compiled function.
    hvp_flat = jax.jit(lambda p, d, x: ravel_pytree(hk.hvp(lambda q: loss(q, d), p, unravel(x)))[0])

    def flat_hvp(x):
        return hvp_flat(params, data, x)

    v0 = np.asarray(jax.random.normal(jax.random.key(7), (dim,)), np.float64)

    # Reference: float64 Hessian, tight tolerance.
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        data64 = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, data
        )
        flat64, unravel64 = ravel_pytree(params64)

        def hvp64(x):
            return hvp_flat(params64, data64, x)

        ref = {}
        for name, (which, k) in PROBLEMS.items():
            vals, _ = scipy_eigs(hvp64, dim, jnp.float64, which, k, 1e-10, v0)
            ref[name] = wanted(vals, which)

    # Per-product cost inside a compiled loop (what the solver's loop body pays for an HVP).
    loop = 3 if quick else 20

    @jax.jit
    def hvp_loop(p, d, v):
        op = hk.hessian_operator(lambda q: loss(q, d), p).linearize()
        return jax.lax.fori_loop(0, loop, lambda i, v: hk.tree_normalize(op(v))[0], v)

    v = hk.tree_random_sphere(jax.random.key(1), params)
    _, t_loop, _ = median_time(lambda: hvp_loop(params, data, v), repeats)
    hvp_ms = 1e3 * t_loop / loop
    _, t_single, _ = median_time(lambda: flat_hvp(flat), repeats)

    rows, sweep = [], []
    # The fewest products a single Krylov space needs: one Lanczos run with full
    # reorthogonalization and no restart, its Ritz values read at every length (an oracle that
    # knows when to stop; restarted solvers can at best approach it).
    length = 40 if quick else 260
    lz = hk.lanczos(hk.hessian_operator(loss, params, data), jax.random.key(0), length)
    alphas, betas = np.asarray(lz.alphas, np.float64), np.asarray(lz.betas, np.float64)
    for j in range(10, length + 1, 5):
        t = np.diag(alphas[:j]) + np.diag(betas[: j - 1], 1) + np.diag(betas[: j - 1], -1)
        theta = np.linalg.eigvalsh(t)
        for name, (which, k) in PROBLEMS.items():
            if j > k:
                sweep.append(
                    {
                        "problem": name,
                        "tool": ORACLE,
                        "tol": None,
                        "hvps": j,
                        "max_rel_err": rel_err(extreme(theta, which, k), ref[name]),
                        "converged": k,
                        "k": k,
                    }
                )
    for name, (which, k) in PROBLEMS.items():
        # tol is a traced argument: the tolerance sweep below reuses this one compilation.
        solvers = {
            tool: jax.jit(
                lambda p, d, key, tol, which=which, k=k, verify=verify: hk.eigsh(
                    hk.hessian_operator(lambda q: loss(q, d), p),
                    key,
                    k,
                    which=which,
                    tol=tol,
                    verify=verify,
                )
            )
            for tool, verify in (("hesskit.eigsh", True), ("hesskit.eigsh verify=False", False))
        }
        key = jax.random.key(0)
        for tool, run in solvers.items():
            first, t, res = median_time(lambda: run(params, data, key, TOL), repeats)  # noqa: B023
            n_hvp = int(res.num_matvecs)
            rows.append(
                {
                    "problem": name,
                    "tool": tool,
                    "hvps": n_hvp,
                    "median_s": t,
                    "compile_s": first - t,
                    "max_rel_err": rel_err(np.asarray(res.eigenvalues), ref[name]),
                    "converged": int(np.sum(res.converged)),
                    "k": k,
                    "outside_hvp": max(0.0, 1.0 - n_hvp * hvp_ms / (1e3 * t)),
                }
            )
            sweep.append(sweep_row(rows[-1], TOL))
        # Called eagerly with the data as operator arguments: the default loop strategy (host
        # dispatch on CPU for convolutions), the eigenvalues-only mode and a bfloat16 basis.
        op = hk.hessian_operator(loss, params, data)
        eager = {
            "hesskit.eigsh eager (loop=auto)": {},
            "hesskit.eigsh values only": {"return_eigenvectors": False},
            "hesskit.eigsh basis bf16": {"basis_dtype": jnp.bfloat16},
        }
        for tool, extra in eager.items():
            first, t, res = median_time(
                lambda extra=extra: hk.eigsh(op, key, k, which=which, tol=TOL, **extra),  # noqa: B023
                repeats,
            )
            n_hvp = int(res.num_matvecs)
            rows.append(
                {
                    "problem": name,
                    "tool": tool,
                    "hvps": n_hvp,
                    "median_s": t,
                    "compile_s": first - t,
                    "max_rel_err": rel_err(np.asarray(res.eigenvalues), ref[name]),
                    "converged": int(np.sum(res.converged)),
                    "k": k,
                    "outside_hvp": max(0.0, 1.0 - n_hvp * min(hvp_ms, 1e3 * t_single) / (1e3 * t)),
                    "status": int(res.status),
                }
            )
        times, counts = [], []
        for _ in range(max(1, repeats // 2 if not quick else 1)):
            t0 = time.perf_counter()
            vals, count = scipy_eigs(flat_hvp, dim, dtype, which, k, TOL, v0)
            times.append(time.perf_counter() - t0)
            counts.append(count)
        err = rel_err(wanted(vals, which), ref[name])
        rows.append(
            {
                "problem": name,
                "tool": "scipy eigsh (jit HVP)",
                "hvps": counts[-1],
                "median_s": statistics.median(times),
                "compile_s": 0.0,
                "max_rel_err": err,
                "converged": k,
                "k": k,
                "outside_hvp": None,
            }
        )
        sweep.append(sweep_row(rows[-1], TOL))

        # Equal accuracy: the same nominal tol means different things to the two tools (ours is
        # relative to max|lambda|, ARPACK's to each |lambda_i|), so sweep both and compare the
        # products each needs to reach a given eigenvalue error. The runs at TOL are above.
        for (tool, run), tol in itertools.product(solvers.items(), SWEEP_OURS):
            if tol == TOL:
                continue
            r = run(params, data, key, tol)
            sweep.append(
                {
                    "problem": name,
                    "tool": tool,
                    "tol": tol,
                    "hvps": int(r.num_matvecs),
                    "max_rel_err": rel_err(np.asarray(r.eigenvalues), ref[name]),
                    "converged": int(np.sum(r.converged)),
                    "k": k,
                }
            )
        for tol in SWEEP_SCIPY:
            if tol == TOL:
                continue
            vals, count = scipy_eigs(flat_hvp, dim, dtype, which, k, tol, v0)
            sweep.append(
                {
                    "problem": name,
                    "tool": "scipy eigsh (jit HVP)",
                    "tol": tol,
                    "hvps": count,
                    "max_rel_err": rel_err(wanted(vals, which), ref[name]),
                    "converged": k,
                    "k": k,
                }
            )

    # Trace: 100 Rademacher probes, batched in one vmap against a Python loop of single HVPs.
    num_probes = 10 if quick else 100
    probes = jax.vmap(lambda key: hk.tree_random_rademacher(key, params))(
        jax.random.split(jax.random.key(3), num_probes)
    )
    batched = jax.jit(
        lambda p, d, key: (
            hk.trace(
                hk.hessian_operator(lambda q: loss(q, d), p),
                key,
                num_probes=num_probes,
                method="hutchinson",
            ).value
        )
    )
    first_b, t_b, est_b = median_time(lambda: batched(params, data, jax.random.key(3)), repeats)
    batched_name = "hk.trace hutchinson (vmap)"
    single = jax.jit(lambda p, d, v: hk.tree_vdot(v, hk.hvp(lambda q: loss(q, d), p, v)))
    probe_list = hk.tree_unstack(probes)
    single(params, data, probe_list[0]).block_until_ready()

    def loop_trace():
        return sum(float(single(params, data, z)) for z in probe_list) / num_probes

    _, t_l, est_l = median_time(loop_trace, max(1, repeats // 3))
    trace = {
        "probes": num_probes,
        "batched": {"name": batched_name, "median_s": t_b, "compile_s": first_b - t_b},
        "loop": {"name": "Python loop of jitted HVPs", "median_s": t_l},
        "estimates": [float(est_b), float(est_l)],
        "speedup": t_l / t_b,
    }
    # SA(3) from 4 start vectors: one jit(vmap(eigsh)) against a Python loop of jitted solves.
    # Both run the same solves; under vmap every member steps until the last has converged.
    num_keys = 2 if quick else 4
    keys = jax.random.split(jax.random.key(11), num_keys)

    def sa3(p, d, key):
        return hk.eigsh(hk.hessian_operator(lambda q: loss(q, d), p), key, 3, which="SA", tol=TOL)

    solve_one = jax.jit(sa3)
    solve_many = jax.jit(jax.vmap(sa3, in_axes=(None, None, 0)))
    first_v, t_v, res_v = median_time(lambda: solve_many(params, data, keys), repeats)

    def loop_solves():
        return [solve_one(params, data, key) for key in keys]

    first_l, t_l1, res_l = median_time(loop_solves, repeats)
    batch = {
        "keys": num_keys,
        "vmap_s": t_v,
        "vmap_compile_s": first_v - t_v,
        "loop_s": t_l1,
        "vmap_products": np.asarray(res_v.num_matvecs).tolist(),
        "loop_products": [int(r.num_matvecs) for r in res_l],
        "max_abs_diff": float(
            np.max(
                np.abs(
                    np.asarray(res_v.eigenvalues)
                    - np.stack([np.asarray(r.eigenvalues) for r in res_l])
                )
            )
        ),
    }
    return {
        "model": model,
        "params": dim,
        "batch": n,
        "vmap_keys": batch,
        "hvp_ms_in_loop": hvp_ms,
        "hvp_ms_single": 1e3 * t_single,
        "reference": {k: v.tolist() for k, v in ref.items()},
        "rows": rows,
        "sweep": sweep,
        "trace": trace,
    }


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Eigensolvers vs scipy over the same HVP ({meta['backend']}, {meta['device']})",
        "",
        f"jax {meta['jax']}, {meta['date']}, repeats {meta['repeats']}, tol {TOL}.",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']}: {res['params']} parameters, batch {res['batch']}",
            "",
            f"HVP: {res['hvp_ms_single']:.2f} ms jitted alone, {res['hvp_ms_in_loop']:.2f} ms "
            "per product inside a compiled loop.",
            "",
            "| problem | tool | HVPs | median s | compile s | max rel err | converged "
            "| outside HVPs | status |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            out = "" if r["outside_hvp"] is None else f"{100 * r['outside_hvp']:.0f}%"
            lines.append(
                f"| {r['problem']} | {r['tool']} | {r['hvps']} | {r['median_s']:.3f} | "
                f"{r['compile_s']:.2f} | {r['max_rel_err']:.1e} | {r['converged']}/{r['k']} "
                f"| {out} | {r.get('status', '')} |"
            )
        tools = ("hesskit.eigsh", "hesskit.eigsh verify=False", "scipy eigsh (jit HVP)", ORACLE)
        lines += [
            "",
            "Equal accuracy: fewest HVPs to reach a max relative eigenvalue error (tolerance sweep "
            f"hesskit {list(SWEEP_OURS)}, scipy {list(SWEEP_SCIPY)}; the oracle is one "
            "unrestarted Lanczos run read at every fifth length; '-' = not reached).",
            "",
            "| problem | "
            + " | ".join(f"err <= {t:g}: hesskit / verify=False / scipy / one run" for t in TARGETS)
            + " |",
            "|---|" + "---:|" * len(TARGETS),
        ]
        for name in PROBLEMS:
            cells = []
            for t in TARGETS:
                counts = [fewest_hvps(res["sweep"], name, tool, t) for tool in tools]
                cells.append(" / ".join("-" if c is None else str(c) for c in counts))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        by = {(r["problem"], r["tool"]): r for r in res["rows"]}
        lines += [
            "",
            f"At tol {TOL}: hesskit.eigsh (compiled) against scipy in this run.",
            "",
            "| problem | HVPs hesskit / scipy | wall hesskit / scipy | outside HVPs |",
            "|---|---:|---:|---:|",
        ]
        for name in PROBLEMS:
            ours, theirs = by[(name, "hesskit.eigsh")], by[(name, "scipy eigsh (jit HVP)")]
            lines.append(
                f"| {name} | {ours['hvps']} / {theirs['hvps']} | "
                f"{ours['median_s'] / theirs['median_s']:.2f}x | "
                f"{100 * ours['outside_hvp']:.0f}% |"
            )
        tr = res["trace"]
        batched, looped = tr["batched"], tr["loop"]
        est = tr["estimates"]
        lines += [
            "",
            f"Trace, {tr['probes']} probes: {batched['name']} {batched['median_s']:.3f} s vs "
            f"{looped['name']} {looped['median_s']:.3f} s ({tr['speedup']:.1f}x); "
            f"estimates {est[0]:.3f} / {est[1]:.3f}.",
            "",
        ]
        vb = res.get("vmap_keys")
        if vb:
            lines += [
                f"SA(3) from {vb['keys']} keys: `jit(vmap(eigsh))` {vb['vmap_s']:.3f} s "
                f"(compile {vb['vmap_compile_s']:.1f} s) vs a Python loop of jitted solves "
                f"{vb['loop_s']:.3f} s ({vb['vmap_s'] / vb['loop_s']:.2f}x); products "
                f"{vb['vmap_products']} / {vb['loop_products']}, largest eigenvalue difference "
                f"{vb['max_abs_diff']:.1e}.",
                "",
            ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the json/md tables")
    parser.add_argument("--models", default=None, help="comma-separated subset of models")
    args = parser.parse_args(argv)
    if args.quick:
        configs = [("mlp", 64, 5)]
        repeats = 1
    else:
        configs = [("mlp-large", 512, 300), ("cnn", 512, 300)]
        repeats = 5
    if args.models:
        keep = set(args.models.split(","))
        configs = [c for c in configs if c[0] in keep]
    results = [bench_model(m, n, s, repeats, args.quick) for m, n, s in configs]
    meta = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "repeats": repeats,
        "machine": platform.platform(),
        "quick": args.quick,
    }
    md = to_markdown(results, meta)
    print(md)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"eigs-{meta['backend']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    stem.with_suffix(".md").write_text(md + "\n")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
