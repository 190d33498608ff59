"""Optimizers with and without curvature under one protocol: tuned, seeded, at equal cost.

Every optimizer (Adam, SGD with momentum, ``optax.contrib.sophia``, AdaHessian, Newton-CG,
saddle-free Newton, Adam + negative-curvature steps) runs on every problem for each learning
rate of its grid (five, log-spaced, chosen around the usual values of each method) and each of
three seeds, full batch, until it has spent the same budget of *gradient-equivalents*: one
gradient counts 1, one Hessian-vector product counts ``r``, the ratio of a jitted HVP's time to
a jitted gradient's measured on that problem in the same run, and a loss evaluation counts 0.5.
Products per step are counted from each transform's work (Newton-CG's from its state).

Problems: the digits CNN (``hesskit.examples``, 256 digits), a deep tanh autoencoder on the
digits (64-32-16-8-16-32-64, squared error: the classic Hessian-free benchmark, small), and a
two-layer linear network (4-5-3) started at zero, a strict saddle with zero gradient (with
three layers the Hessian vanishes there too and no method here moves).

Reported per problem and optimizer: the learning rate with the best mean final loss over the
seeds, that loss (mean and spread over seeds) at the budget, the loss at the wall time the best
Adam run needed for the budget (equal wall time), and the measured milliseconds per step. The
seed changes the initialisation (and the target map of the linear network) and the
transforms' keys. Wall times are on whatever machine runs it (CPU here, shared): compare rows of
one run only.

Usage::

    python benchmarks/optimizers.py            # saves results/optimizers-<backend>.{json,md,png}
    python benchmarks/optimizers.py --budget 150 --problems autoencoder linear
    python benchmarks/optimizers.py --quick    # tiny budget, two learning rates, one seed
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hesskit as hk
import hesskit.transforms as ht
from hesskit.examples import load_digits, make_classifier, make_loss

RESULTS = pathlib.Path(__file__).parent / "results"
NEWTON_MAXITER = 10
SFN_MATVECS = 10


def _grid(lo: float, hi: float, n: int = 5) -> list[float]:
    return [float(x) for x in np.geomspace(lo, hi, n)]


# name -> (factory of the learning rate, learning-rate grid, products per step (None: from
# the state), loss evaluations per step)
OPTIMIZERS = {
    "adam": (lambda learning_rate: optax.adam(learning_rate), _grid(1e-3, 1e-1), 0.0, 0),
    "sgd momentum": (
        lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
        _grid(3e-3, 3e-1),
        0.0,
        0,
    ),
    "sophia": (
        lambda learning_rate: optax.contrib.sophia(learning_rate),
        _grid(1e-3, 1e-1),
        0.1,
        0,
    ),
    "adahessian": (lambda learning_rate: ht.adahessian(learning_rate), _grid(1e-2, 1.0), 1.0, 0),
    "newton_cg": (
        lambda learning_rate: ht.newton_cg(learning_rate, maxiter=NEWTON_MAXITER),
        _grid(0.1, 1.0),
        None,
        1,
    ),
    "saddle_free_newton": (
        lambda learning_rate: ht.saddle_free_newton(learning_rate, num_matvecs=SFN_MATVECS),
        _grid(0.1, 1.0),
        float(SFN_MATVECS),
        0,
    ),
    "adam + negative_curvature": (
        lambda learning_rate: optax.chain(
            optax.adam(learning_rate), ht.negative_curvature(0.05, num_matvecs=5, every=5)
        ),
        _grid(1e-3, 1e-1),
        1.0,
        0,
    ),
}


# -- problems ------------------------------------------------------------------------------------
def cnn_problem(seed: int):
    data = load_digits(256, seed=seed)
    module, params = make_classifier("cnn", key=jax.random.key(seed), sample=data.x[:1])
    loss = make_loss(module)
    return params, loss, data


def _dense_init(key, sizes):
    params = []
    for k, (m, n) in zip(
        jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:], strict=False), strict=True
    ):
        params.append({"w": jax.random.normal(k, (m, n)) * np.sqrt(1.0 / m), "b": jnp.zeros(n)})
    return params


def _autoencoder_loss(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return 0.5 * jnp.mean(jnp.sum((out - x) ** 2, axis=1))


def autoencoder_problem(seed: int):
    x = load_digits(512, seed=seed).x.reshape(512, -1)
    params = _dense_init(jax.random.key(seed), [64, 32, 16, 8, 16, 32, 64])
    return params, _autoencoder_loss, x


def _linear_loss(params, data):
    x, y = data
    return 0.5 * jnp.mean(jnp.sum((x @ params["w1"] @ params["w2"] - y) ** 2, axis=1))


def linear_problem(seed: int):
    x = jax.random.normal(jax.random.key(100), (256, 4))
    y = x @ jax.random.normal(jax.random.key(seed), (4, 3))
    params = {"w1": jnp.zeros((4, 5)), "w2": jnp.zeros((5, 3))}
    return params, _linear_loss, (x, y)


PROBLEMS = {
    "cnn": ("digits CNN (256 digits, cross-entropy)", cnn_problem),
    "autoencoder": ("deep autoencoder 64-32-16-8-16-32-64 (512 digits)", autoencoder_problem),
    "linear": ("linear network 4-5-3 at the zero saddle", linear_problem),
}


def product_ratio(params, loss, data, repeats: int = 20) -> float:
    """Time of a jitted HVP over a jitted gradient, same point and data (median of repeats)."""
    grad = jax.jit(jax.grad(loss))
    hvp = jax.jit(lambda p, v, d: hk.hvp(lambda q: loss(q, d), p, v))
    v = hk.tree_random_sphere(jax.random.key(0), params)
    jax.block_until_ready(grad(params, data))
    jax.block_until_ready(hvp(params, v, data))

    def median(fn):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    return median(lambda: hvp(params, v, data)) / median(lambda: grad(params, data))


# -- one run -------------------------------------------------------------------------------------
def make_step(opt, loss):
    @jax.jit
    def step(p, s, data):
        f = lambda q: loss(q, data)  # noqa: E731
        value, g = jax.value_and_grad(f)(p)
        u, s = opt.update(g, s, p, value_fn=f, obj_fn=f)
        return optax.apply_updates(p, u), s, value

    return step


def train(step, opt, lr, params, data, *, budget, ratio, products, evals):
    state = opt.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    p, ge, wall = params, 0.0, 0.0
    curve = []
    while ge < budget:
        t0 = time.perf_counter()
        p, state, value = step(p, state, data)
        value = float(value)
        wall += time.perf_counter() - t0
        if products is None:  # Newton-CG: the solve's products, B u, the loss at the trial
            n = float(optax.tree_utils.tree_get(state, "num_cg_iters")) + 1
        else:
            n = products
        ge += 1.0 + ratio * n + 0.5 * evals
        curve.append((ge, wall, value if np.isfinite(value) else np.inf))
    final = float(loss_value(step, p, state, data))
    curve.append((ge, wall, final))
    return np.asarray(curve)


def loss_value(step, p, state, data):
    return step(p, state, data)[2]


def at(curve: np.ndarray, column: int, level: float) -> float:
    """The loss reached by ``level`` of a cost column (0: gradient-equivalents, 1: wall)."""
    idx = np.flatnonzero(curve[:, column] <= level)
    return float(curve[idx[-1], 2]) if idx.size else float(curve[0, 2])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget, 2 rates, 1 seed")
    parser.add_argument("--budget", type=float, default=400.0, help="gradient-equivalents")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--out", default=str(RESULTS), help="folder for the tables and plot")
    args = parser.parse_args(argv)
    budget = 30.0 if args.quick else args.budget
    seeds = list(range(1 if args.quick else args.seeds))
    problems = ["linear"] if args.quick else args.problems
    t_start = time.perf_counter()
    results, curves = {}, {}
    for pname in problems:
        title, build = PROBLEMS[pname]
        params0, loss, data0 = build(0)
        ratio = product_ratio(params0, loss, data0)
        rows = {}
        for oname in args.optimizers:
            factory, grid, products, evals = OPTIMIZERS[oname]
            grid = grid[1:4:2] if args.quick else grid
            opt = optax.inject_hyperparams(factory)(learning_rate=grid[0])
            step = make_step(opt, loss)
            t0 = time.perf_counter()
            jax.block_until_ready(step(params0, opt.init(params0), data0))  # compile once
            compile_s = time.perf_counter() - t0
            runs = {}
            for lr in grid:
                for seed in seeds:
                    params, _, data = build(seed)
                    runs[(lr, seed)] = train(
                        step, opt, lr, params, data, budget=budget, ratio=ratio,
                        products=products, evals=evals,
                    )  # fmt: skip
            finals = {lr: [runs[(lr, s)][-1, 2] for s in seeds] for lr in grid}
            best = min(grid, key=lambda lr: np.mean(np.nan_to_num(finals[lr], nan=np.inf)))
            best_runs = [runs[(best, s)] for s in seeds]
            steps = [len(c) - 1 for c in best_runs]
            rows[oname] = {
                "best_lr": best,
                "final_loss_mean": float(np.mean(finals[best])),
                "final_loss_std": float(np.std(finals[best])),
                "final_by_lr": {str(lr): float(np.mean(v)) for lr, v in finals.items()},
                "steps": int(np.mean(steps)),
                "ms_per_step": 1e3
                * float(np.mean([c[-2, 1] / max(len(c) - 1, 1) for c in best_runs])),
                "wall_s": float(np.mean([c[-2, 1] for c in best_runs])),
                "compile_s": compile_s,
                "_curves": best_runs,
            }
            curves[(pname, oname)] = best_runs[0]
        if "adam" in rows:
            t_eq = rows["adam"]["wall_s"]
            for r in rows.values():
                r["loss_at_adam_wall"] = float(np.mean([at(c, 1, t_eq) for c in r["_curves"]]))
        half = budget / 2
        for r in rows.values():
            r["loss_at_half_budget"] = float(np.mean([at(c, 0, half) for c in r.pop("_curves")]))
        results[pname] = {"title": title, "hvp_over_grad": ratio, "rows": rows}

    backend = jax.default_backend()
    total = time.perf_counter() - t_start
    cmd = "python benchmarks/optimizers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Optimizers ({backend}): {budget:g} gradient-equivalents, "
        f"{len(seeds)} seed(s), 5 learning rates each{' (quick: 2)' if args.quick else ''}",
        "",
        f"`{cmd.strip()}`, {total:.0f} s. Loss = mean over seeds at the best learning rate "
        "(by mean final loss); equal wall = the loss when the best Adam run had spent the "
        "budget. A product counts `hvp/grad` gradients (measured below).",
        "",
    ]
    for res in results.values():
        lines += [
            f"## {res['title']} (hvp / grad = {res['hvp_over_grad']:.2f})",
            "",
            "| optimizer | best lr | final loss (± sd) | at half budget | at Adam's wall time "
            "| steps | ms / step |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for oname, r in res["rows"].items():
            eq = r.get("loss_at_adam_wall", float("nan"))
            lines.append(
                f"| {oname} | {r['best_lr']:.3g} | {r['final_loss_mean']:.4g} "
                f"(± {r['final_loss_std']:.2g}) | {r['loss_at_half_budget']:.4g} | {eq:.4g} "
                f"| {r['steps']} | {r['ms_per_step']:.2f} |"
            )
        lines.append("")
    md = "\n".join(lines)
    print(md)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"optimizers-{backend}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(md + "\n")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(problems), 8))
    axes = fig.subplots(2, len(problems), squeeze=False)
    for j, pname in enumerate(problems):
        for oname in args.optimizers:
            c = curves[(pname, oname)]
            for i, col in enumerate((0, 1)):
                axes[i, j].plot(c[:-1, col], np.maximum(c[:-1, 2], 1e-12), label=oname)
        axes[0, j].set_title(results[pname]["title"], fontsize=9)
        axes[0, j].set_xlabel("gradient-equivalents")
        axes[1, j].set_xlabel("wall time (s)")
        for i in range(2):
            axes[i, j].set_yscale("log")
            axes[i, j].set_ylabel("loss (best lr, seed 0)")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    return results


if __name__ == "__main__":
    main()
