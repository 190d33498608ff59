"""Optimizers with and without curvature under one protocol: tuned, seeded, at equal cost.

Every optimizer (Adam, SGD with momentum, ``optax.contrib.sophia``, AdaHessian, Newton-CG on
the Hessian and on the Gauss-Newton matrix, saddle-free Newton, Adam + negative-curvature
steps) runs on every problem for each learning rate of its grid (five or six, log-spaced,
around the usual values of each method; the Newton methods' spans 0.01-3.16 around the Newton
step 1) and each of three seeds, full batch, until it has spent the same budget of
*gradient-equivalents*: one gradient counts 1, one Hessian-vector product ``r_H`` and one
Gauss-Newton product ``r_G``, the ratios of a jitted product's time to a jitted gradient's
measured on that problem in the same run, and a loss evaluation counts 0.5. Products per step
are counted from each transform's work (Newton-CG's from its state: the solve's, the final
residual's, ``B u``'s and a negative-curvature stop's).

Problems: the digits CNN (``hesskit.examples``, 256 digits), a deep tanh autoencoder on the
digits (64-32-16-8-16-32-64, squared error: the classic Hessian-free benchmark, small), a
two-layer linear network (4-5-3) started at zero, a strict saddle with zero gradient (with
three layers the Hessian vanishes there too and no method here moves), and the tiny byte-level
transformer of ``hesskit.examples`` (35,712 parameters) on one fixed batch of windows of the
Python standard library's source. Each problem is split into a model and a convex output loss,
which the Gauss-Newton row needs.

Reported per problem and optimizer: the learning rate with the best mean final loss over the
seeds (flagged when it is an end of the grid), that loss (mean and spread over seeds) at the
budget and at half of it, the loss at the wall time the best Adam run needed for the budget
(equal wall time), and the measured milliseconds per step. The seed changes the initialisation
and, for the CNN and the autoencoder, the digits drawn (for the linear network the target map;
the transformer's batch is the same for all seeds). Each optimizer's step compiles once for all
rates and seeds (the rate is an injected hyperparameter, the data an argument; ``traces`` in the
JSON counts it). Wall times are on whatever machine runs it (CPU here, shared): compare rows of
one run only.

Usage::

    python benchmarks/optimizers.py --budget 200 --problems autoencoder linear
    python benchmarks/optimizers.py --budget 100 --problems cnn    # results/optimizers-cnn-cpu.*
    python benchmarks/optimizers.py --budget 100 --problems transformer
    python benchmarks/optimizers.py --quick    # tiny budget, two learning rates, one seed

One problem writes ``results/optimizers-<problem>-<backend>.{json,md,png}``, several
``results/optimizers-<backend>.*`` (``--tag`` names it).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hesskit as hk
import hesskit.transforms as ht
from hesskit.examples import (
    TransformerConfig,
    load_digits,
    load_stdlib_corpus,
    make_classifier,
    make_lm_loss,
    make_loss,
    make_transformer,
    sample_windows,
)

RESULTS = pathlib.Path(__file__).parent / "results"
NEWTON_MAXITER = 10
SFN_MATVECS = 10
# The transformer problem: windows of TRANSFORMER_T tokens (the tiny model's context is 64),
# TRANSFORMER_B of them, one fixed batch.
TRANSFORMER_T = 32
TRANSFORMER_B = 8


def _grid(lo: float, hi: float, n: int = 5) -> list[float]:
    return [float(x) for x in np.geomspace(lo, hi, n)]


class Spec(NamedTuple):
    """An optimizer of the benchmark.

    ``products``: curvature products per step (``None``: Newton-CG's, read from its state);
    ``evals``: loss evaluations per step; ``curvature``: which product they are, so which
    measured cost ratio counts them (``"ggn"`` also passes ``model_fn``/``output_loss_fn``).
    """

    factory: Callable[[Any], optax.GradientTransformation]
    grid: list[float]
    products: float | None
    evals: int
    curvature: str = "hessian"


# Newton-CG's and saddle-free Newton's grids span half-decades on both sides of the Newton step
# (1): with 0.1-1.0 the best rate sat at an edge on both the autoencoder and the CNN.
NEWTON_GRID = _grid(1e-2, 10**0.5, 6)
OPTIMIZERS = {
    "adam": Spec(lambda learning_rate: optax.adam(learning_rate), _grid(1e-3, 1e-1), 0.0, 0),
    "sgd momentum": Spec(
        lambda learning_rate: optax.sgd(learning_rate, momentum=0.9), _grid(3e-3, 3e-1), 0.0, 0
    ),
    "sophia": Spec(
        lambda learning_rate: optax.contrib.sophia(learning_rate), _grid(1e-3, 1e-1), 0.1, 0
    ),
    "adahessian": Spec(
        lambda learning_rate: ht.adahessian(learning_rate), _grid(1e-2, 1.0), 1.0, 0
    ),
    "newton_cg": Spec(
        lambda learning_rate: ht.newton_cg(learning_rate, maxiter=NEWTON_MAXITER),
        NEWTON_GRID,
        None,
        1,
    ),
    "newton_cg (ggn)": Spec(
        lambda learning_rate: ht.newton_cg(learning_rate, maxiter=NEWTON_MAXITER, curvature="ggn"),
        NEWTON_GRID,
        None,
        1,
        "ggn",
    ),
    "saddle_free_newton": Spec(
        lambda learning_rate: ht.saddle_free_newton(learning_rate, num_matvecs=SFN_MATVECS),
        NEWTON_GRID,
        float(SFN_MATVECS),
        0,
    ),
    "adam + negative_curvature": Spec(
        lambda learning_rate: optax.chain(
            optax.adam(learning_rate), ht.negative_curvature(0.05, num_matvecs=5, every=5)
        ),
        _grid(1e-3, 1e-1),
        1.0,
        0,
    ),
}
FIRST_ORDER = ("adam", "sgd momentum")


# -- problems ------------------------------------------------------------------------------------
class Problem(NamedTuple):
    """A problem at one seed: ``loss(params, data) == output_loss(model(params, data), data)``.

    The split into ``model`` (params -> outputs) and a convex ``output_loss`` is what
    ``newton_cg(curvature="ggn")`` needs. The functions of seed 0 serve every seed (one
    compiled step per optimizer), so they must depend on the seed only through their arguments.
    """

    params: Any
    loss: Callable
    data: Any
    model: Callable
    output_loss: Callable


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _squared_error(out, target):
    return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=-1))


def _composed(model, output_loss):
    return lambda params, data: output_loss(model(params, data), data)


def cnn_problem(seed: int) -> Problem:
    data = load_digits(256, seed=seed)
    module, params = make_classifier("cnn", key=jax.random.key(seed), sample=data.x[:1])
    model = lambda p, d: module.apply(p, d.x.astype(jnp.float32))  # noqa: E731
    output_loss = lambda logits, d: _cross_entropy(logits, d.y)  # noqa: E731
    return Problem(params, make_loss(module), data, model, output_loss)


def _dense_init(key, sizes):
    params = []
    for k, (m, n) in zip(
        jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:], strict=False), strict=True
    ):
        params.append({"w": jax.random.normal(k, (m, n)) * np.sqrt(1.0 / m), "b": jnp.zeros(n)})
    return params


def _autoencoder_model(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def autoencoder_problem(seed: int) -> Problem:
    x = load_digits(512, seed=seed).x.reshape(512, -1)
    params = _dense_init(jax.random.key(seed), [64, 32, 16, 8, 16, 32, 64])
    return Problem(
        params, _composed(_autoencoder_model, _squared_error), x, _autoencoder_model, _squared_error
    )


def _linear_model(params, data):
    return data[0] @ params["w1"] @ params["w2"]


def _linear_output_loss(out, data):
    return _squared_error(out, data[1])


def linear_problem(seed: int) -> Problem:
    x = jax.random.normal(jax.random.key(100), (256, 4))
    y = x @ jax.random.normal(jax.random.key(seed), (4, 3))
    params = {"w1": jnp.zeros((4, 5)), "w2": jnp.zeros((5, 3))}
    return Problem(
        params,
        _composed(_linear_model, _linear_output_loss),
        (x, y),
        _linear_model,
        _linear_output_loss,
    )


@functools.cache
def _transformer_batch() -> jax.Array:
    tokens = load_stdlib_corpus(1 << 20)
    return sample_windows(tokens, jax.random.key(1234), TRANSFORMER_B, TRANSFORMER_T)


def transformer_problem(seed: int) -> Problem:
    net, params = make_transformer(TransformerConfig.tiny(), key=jax.random.key(seed))
    model = lambda p, batch: net.apply(p, batch[:, :-1])  # noqa: E731
    output_loss = lambda logits, batch: _cross_entropy(logits, batch[:, 1:])  # noqa: E731
    return Problem(params, make_lm_loss(net), _transformer_batch(), model, output_loss)


PROBLEMS = {
    "cnn": ("digits CNN (256 digits, cross-entropy)", cnn_problem),
    "autoencoder": ("deep autoencoder 64-32-16-8-16-32-64 (512 digits)", autoencoder_problem),
    "linear": ("linear network 4-5-3 at the zero saddle", linear_problem),
    "transformer": (
        f"tiny byte transformer (35,712 parameters; one batch of {TRANSFORMER_B} windows of "
        f"{TRANSFORMER_T} stdlib bytes)",
        transformer_problem,
    ),
}


def product_ratios(prob: Problem, repeats: int = 30) -> dict[str, float]:
    """Time of a jitted HVP and of a jitted GGN product over a jitted gradient (medians).

    The same point and data; each product is a fresh one (``hk.hvp``, ``hk.ggn_operator(...)``
    applied once), as the gradient is. The three are timed in turn within each repeat, so a
    change of load on a shared machine hits them alike.
    """
    params, data = prob.params, prob.data
    grad = jax.jit(jax.grad(prob.loss))
    hvp = jax.jit(lambda p, v, d: hk.hvp(lambda q: prob.loss(q, d), p, v))
    ggn = jax.jit(lambda p, v, d: hk.ggn_operator(prob.model, prob.output_loss, p, d)(v))
    v = hk.tree_random_sphere(jax.random.key(0), params)
    fns = {
        "grad": lambda: grad(params, data),
        "hessian": lambda: hvp(params, v, data),
        "ggn": lambda: ggn(params, v, data),
    }
    times = {k: [] for k in fns}
    for fn in fns.values():
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    t_grad = float(np.median(times["grad"]))
    return {k: float(np.median(times[k])) / t_grad for k in ("hessian", "ggn")}


# -- one run -------------------------------------------------------------------------------------
def make_step(opt, prob: Problem, *, ggn: bool):
    """One jitted step (compiled once per optimizer) and the list its traces append to."""
    loss, model, output_loss = prob.loss, prob.model, prob.output_loss
    traces = []

    @jax.jit
    def step(p, s, data):
        traces.append(1)
        f = lambda q: loss(q, data)  # noqa: E731
        value, g = jax.value_and_grad(f)(p)
        extra = {}
        if ggn:
            extra = {
                "model_fn": lambda q: model(q, data),
                "output_loss_fn": lambda out: output_loss(out, data),
            }
        u, s = opt.update(g, s, p, value_fn=f, obj_fn=f, **extra)
        return optax.apply_updates(p, u), s, value

    return step, traces


def newton_cg_products(state) -> float:
    """Products of one Newton-CG step, from its state.

    The solve's (the warm start's included), CG's final true residual, ``B u`` for the damping,
    and one more at a negative-curvature stop (``cg_status == 2``).
    """
    iters = float(optax.tree_utils.tree_get(state, "num_cg_iters"))
    negative = float(int(optax.tree_utils.tree_get(state, "cg_status")) == 2)
    return iters + 2.0 + negative


def init_state(opt, params, lr):
    """The optimizer's state at rate ``lr``, typed alike for every rate (one compiled step)."""
    state = opt.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return state


def train(step, opt, lr, params, data, *, budget, ratio, products, evals):
    state = init_state(opt, params, lr)
    p, ge, wall = params, 0.0, 0.0
    curve = []
    while ge < budget:
        t0 = time.perf_counter()
        p, state, value = step(p, state, data)
        value = float(value)
        wall += time.perf_counter() - t0
        n = newton_cg_products(state) if products is None else products
        ge += 1.0 + ratio * n + 0.5 * evals
        curve.append((ge, wall, value if np.isfinite(value) else np.inf))
    final = float(step(p, state, data)[2])
    curve.append((ge, wall, final if np.isfinite(final) else np.inf))
    return np.asarray(curve)


def at(curve: np.ndarray, column: int, level: float) -> float:
    """The loss reached by ``level`` of a cost column (0: gradient-equivalents, 1: wall)."""
    idx = np.flatnonzero(curve[:, column] <= level)
    return float(curve[idx[-1], 2]) if idx.size else float(curve[0, 2])


def grid_position(grid: list[float], mean_finals: dict[float, float]) -> str:
    """Where the best rate sits: ``"low"``, ``"high"`` (an end), ``"interior"`` or ``"flat"``.

    ``"flat"``: every rate ends at the same loss (nothing moved); at an end, the optimum may lie
    outside the grid.
    """
    values = np.asarray([mean_finals[lr] for lr in grid])
    finite = values[np.isfinite(values)]
    if finite.size == values.size and np.ptp(values) <= 1e-6 * max(np.abs(values).max(), 1e-30):
        return "flat"
    best = grid[int(np.argmin(np.nan_to_num(values, nan=np.inf)))]
    return {grid[0]: "low", grid[-1]: "high"}.get(best, "interior")


def _fmt_lr(r: dict) -> str:
    mark = {"low": " (low edge)", "high": " (high edge)", "flat": " (all tie)"}
    return f"{r['best_lr']:.3g}{mark.get(r['grid_position'], '')}"


def _summary(res: dict) -> list[str]:
    """Generated lines: the curvature methods against Adam, and the rates at a grid edge."""
    rows = res["rows"]
    out = []
    if "adam" in rows:
        adam = rows["adam"]
        for label, key in (
            ("at the budget", "final_loss_mean"),
            ("at Adam's wall time", "loss_at_adam_wall"),
        ):
            worse = [o for o, r in rows.items() if o not in FIRST_ORDER and r[key] > adam[key]]
            better = [o for o, r in rows.items() if o not in FIRST_ORDER and r[key] < adam[key]]
            out.append(
                f"- {label}: behind Adam: {', '.join(worse) or 'none'}; "
                f"ahead of Adam: {', '.join(better) or 'none'}."
            )
    edges = [
        f"{o} ({r['grid_position']})"
        for o, r in rows.items()
        if r["grid_position"] in ("low", "high")
    ]
    out.append(f"- best rate at an edge of its grid: {', '.join(edges) or 'none'}.")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget, 2 rates, 1 seed")
    parser.add_argument("--budget", type=float, default=400.0, help="gradient-equivalents")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", nargs="+", default=None, choices=list(PROBLEMS))
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS)
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for the tables and plot")
    parser.add_argument(
        "--tag", default=None, help="file stem optimizers-<tag>-<backend> (default: the problem "
        "when there is one, else none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    budget = 30.0 if args.quick else args.budget
    seeds = list(range(1 if args.quick else args.seeds))
    problems = args.problems or (["linear"] if args.quick else list(PROBLEMS))
    tag = (
        args.tag
        if args.tag is not None
        else (problems[0] if len(problems) == 1 and not args.quick else "")
    )
    t_start = time.perf_counter()
    results, curves = {}, {}
    for pname in problems:
        title, build = PROBLEMS[pname]
        prob0 = build(0)
        ratios = product_ratios(prob0)
        rows = {}
        for oname in args.optimizers:
            spec = OPTIMIZERS[oname]
            grid = spec.grid[1:4:2] if args.quick else spec.grid
            opt = optax.inject_hyperparams(spec.factory)(learning_rate=grid[0])
            step, traces = make_step(opt, prob0, ggn=spec.curvature == "ggn")
            t0 = time.perf_counter()
            jax.block_until_ready(
                step(prob0.params, init_state(opt, prob0.params, grid[0]), prob0.data)
            )
            compile_s = time.perf_counter() - t0
            runs = {}
            for lr in grid:
                for seed in seeds:
                    prob = build(seed)
                    runs[(lr, seed)] = train(
                        step, opt, lr, prob.params, prob.data, budget=budget,
                        ratio=ratios[spec.curvature], products=spec.products, evals=spec.evals,
                    )  # fmt: skip
            finals = {lr: [runs[(lr, s)][-1, 2] for s in seeds] for lr in grid}
            means = {lr: float(np.mean(v)) for lr, v in finals.items()}
            best = min(grid, key=lambda lr: np.nan_to_num(means[lr], nan=np.inf))
            best_runs = [runs[(best, s)] for s in seeds]
            steps = [len(c) - 1 for c in best_runs]
            rows[oname] = {
                "best_lr": best,
                "grid": grid,
                "grid_position": grid_position(grid, means),
                "curvature": spec.curvature,
                "final_loss_mean": means[best],
                "final_loss_std": float(np.std(finals[best])),
                "final_by_lr": {str(lr): v for lr, v in means.items()},
                "steps": int(np.mean(steps)),
                "ms_per_step": 1e3
                * float(np.mean([c[-2, 1] / max(len(c) - 1, 1) for c in best_runs])),
                "wall_s": float(np.mean([c[-2, 1] for c in best_runs])),
                "compile_s": compile_s,
                "traces": len(traces),
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
        results[pname] = {
            "title": title,
            "hvp_over_grad": ratios["hessian"],
            "ggn_over_grad": ratios["ggn"],
            "rows": rows,
        }

    backend = jax.default_backend()
    total = time.perf_counter() - t_start
    cmd = "python benchmarks/optimizers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Optimizers ({backend}): {budget:g} gradient-equivalents, "
        f"{len(seeds)} seed(s), 5-6 learning rates each{' (quick: 2)' if args.quick else ''}",
        "",
        f"`{cmd.strip()}`, {total:.0f} s. Loss = mean over seeds at the best learning rate "
        "(by mean final loss); equal wall = the loss when the best Adam run had spent the "
        "budget; half budget = the loss at half the gradient-equivalents. A Hessian-vector "
        "product counts `hvp/grad` gradients, a Gauss-Newton product `ggn/grad` (both measured "
        "on the problem, below), a loss evaluation 0.5. A best rate marked *edge* is an end of "
        "its grid (the optimum may lie outside); *all tie*: every rate ends at the same loss.",
        "",
    ]
    for res in results.values():
        lines += [
            f"## {res['title']} (hvp / grad = {res['hvp_over_grad']:.2f}, "
            f"ggn / grad = {res['ggn_over_grad']:.2f})",
            "",
            "| optimizer | grid | best lr | final loss (± sd) | at half budget "
            "| at Adam's wall time | steps | ms / step |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for oname, r in res["rows"].items():
            eq = r.get("loss_at_adam_wall", float("nan"))
            g = r["grid"]
            lines.append(
                f"| {oname} | {g[0]:.3g}-{g[-1]:.3g} ({len(g)}) | {_fmt_lr(r)} "
                f"| {r['final_loss_mean']:.4g} (± {r['final_loss_std']:.2g}) "
                f"| {r['loss_at_half_budget']:.4g} | {eq:.4g} "
                f"| {r['steps']} | {r['ms_per_step']:.2f} |"
            )
        lines += ["", *_summary(res), ""]
    md = "\n".join(lines)
    print(md)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "-".join(x for x in ("optimizers", tag, backend) if x)
    stem = out / f"{name}{'-quick' if args.quick else ''}"
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
