"""The curvature report: train models on the bundled digits and write what their Hessians say.

``python -m hesskit report`` (or the ``hesskit report`` console script) trains each chosen model
with minibatch RMSProp on a subset of scikit-learn's digits, measures the Hessian of the
full-subset loss at several checkpoints, and writes a folder with the figures, a JSON file of
every number, and a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hesskit._src.operators import hessian_operator
from hesskit._src.tree import tree_dim, tree_normalize, tree_random_sphere, tree_vdot

MODELS = ("cnn", "mlp", "mlp-large", "linear")
DEFAULT_MODELS = ("cnn", "mlp")
NUM_DIGITS = 1797  # size of scikit-learn's bundled digits
SUBSET_FRACTION = 0.05  # the fixed subset of appendix D of Alain et al. (2019)


def _power_lambda_max(op, key, num_iters: int) -> jax.Array:
    """A cheap lambda_max estimate from a few power steps on the operator (largest magnitude)."""
    op = op.linearize()
    v = tree_random_sphere(key, op.like)

    def body(_, carry):
        v, _ = carry
        hv = op(v)
        lam = tree_vdot(v, hv)
        return tree_normalize(hv)[0], lam

    _, lam = jax.lax.fori_loop(0, num_iters, body, (v, jnp.zeros((), op.dtype)))
    return lam


# -- command line -------------------------------------------------------------------------------
def _model_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        msg = "give at least one model name"
        raise argparse.ArgumentTypeError(msg)
    bad = [n for n in names if n not in MODELS]
    if bad:
        msg = f"unknown model {bad[0]!r}; choose from {', '.join(MODELS)} (comma-separated)"
        raise argparse.ArgumentTypeError(msg)
    return list(dict.fromkeys(names))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesskit", description="Curvature tools for JAX loss functions."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = sub.add_parser(
        "report",
        help="train on the bundled digits and write a curvature report",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rep.add_argument(
        "--model",
        type=_model_list,
        default=list(DEFAULT_MODELS),
        help=f"comma-separated models, from {', '.join(MODELS)}",
    )
    rep.add_argument("--steps", type=int, default=300, help="training steps (minibatches)")
    rep.add_argument(
        "--every", type=int, default=None, help="measure curvature every N steps (default steps/5)"
    )
    rep.add_argument("--k", type=int, default=5, help="eigenpairs at each end of the spectrum")
    rep.add_argument("--subset", type=int, default=512, help="number of training examples")
    rep.add_argument("--batch-size", type=int, default=32, help="minibatch size")
    rep.add_argument("--lr", type=float, default=1e-3, help="RMSProp learning rate")
    rep.add_argument("--seed", type=int, default=0, help="random seed (data order, init, probes)")
    rep.add_argument("--out", default="hesskit-report", help="output folder")
    rep.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    return parser


def _num_params(name: str) -> int:
    from hesskit.examples import make_classifier

    sample = jnp.zeros((1, 8, 8, 1), jnp.float32)
    shapes = jax.eval_shape(
        lambda key: make_classifier(name, key=key, sample=sample)[1], jax.random.key(0)
    )
    return tree_dim(shapes)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; bad values exit with code 2 and a clear message."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "report":  # pragma: no cover - only one command today
        parser.error(f"unknown command {args.command!r}")
    if args.steps < 0:
        parser.error(f"--steps must be >= 0, got {args.steps}")
    if args.every is None:
        args.every = max(1, math.ceil(args.steps / 5))
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    if not 20 <= args.subset <= NUM_DIGITS:
        parser.error(
            f"--subset must be in [20, {NUM_DIGITS}] (the {SUBSET_FRACTION:.0%} subset needs at "
            f"least one example), got {args.subset}"
        )
    if not 1 <= args.batch_size <= args.subset:
        parser.error(f"--batch-size must be in [1, --subset={args.subset}], got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite positive number, got {args.lr}")
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    for name in args.model:
        dim = _num_params(name)
        if 4 * args.k > dim:
            parser.error(
                f"--k={args.k} is too large for model {name!r} with {dim} parameters "
                f"(need 4*k <= {dim}, so k <= {dim // 4})"
            )
    return args


# -- one model ----------------------------------------------------------------------------------
def _train_fn(loss_fn: Callable, opt: optax.GradientTransformation, batch_size: int):
    """A jitted ``chunk(params, state, data, keys)``: one minibatch update per key (a scan)."""

    def one_step(carry, key, data):
        params, state = carry
        idx = jax.random.choice(key, data.y.shape[0], (batch_size,), replace=False)
        batch = jax.tree_util.tree_map(lambda a: a[idx], data)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    @jax.jit
    def chunk(params, state, data, keys):
        step = lambda carry, key: one_step(carry, key, data)  # noqa: E731
        (params, state), losses = jax.lax.scan(step, (params, state), keys)
        return params, state, losses

    return chunk


def run_model(name: str, args: argparse.Namespace, out_dir: str, log: Callable[[str], None]):
    """Train one model and measure its curvature; returns the JSON-ready results."""
    import flax.serialization

    from hesskit.examples import load_digits, make_classifier, make_loss

    data = load_digits(args.subset, seed=args.seed)
    key = jax.random.key(args.seed)
    init_key, train_key, probe_key = jax.random.split(key, 3)
    module, params = make_classifier(name, key=init_key, sample=data.x[:1])
    loss_fn = make_loss(module)
    opt = optax.rmsprop(args.lr)
    state = opt.init(params)
    chunk = _train_fn(loss_fn, opt, args.batch_size)

    @jax.jit
    def curvature(params, data, key):
        f = lambda p: loss_fn(p, data)  # noqa: E731
        loss, g = jax.value_and_grad(f)(params)
        op = hessian_operator(f, params)
        gg = tree_vdot(g, g)
        g_curv = tree_vdot(g, op(g)) / gg
        return loss, jnp.sqrt(gg), g_curv, _power_lambda_max(op, key, 20)

    dim = tree_dim(params)
    log(f"[{name}] {dim} parameters, {len(data.y)} digits, {args.steps} steps")
    log(f"{'step':>6} {'loss':>9} {'|g|':>9} {'gHg/gg':>9} {'lam_max':>9}")
    checkpoints = []
    train_losses: list[float] = []
    t = 0
    start = time.perf_counter()
    while True:
        loss, gnorm, g_curv, lam = curvature(params, data, jax.random.fold_in(probe_key, t))
        checkpoints.append(
            {
                "step": t,
                "loss": float(loss),
                "grad_norm": float(gnorm),
                "g_curvature": float(g_curv),
                "lambda_max": float(lam),
            }
        )
        log(f"{t:>6} {loss:9.4f} {gnorm:9.4f} {g_curv:9.4f} {lam:9.4f}")
        if t >= args.steps:
            break
        n = min(args.every, args.steps - t)
        keys = jax.random.split(jax.random.fold_in(train_key, t), n)
        params, state, losses = chunk(params, state, data, keys)
        train_losses.extend(np.asarray(losses).tolist())
        t += n

    with open(os.path.join(out_dir, "params.msgpack"), "wb") as fh:
        fh.write(flax.serialization.to_bytes(params))
    result = {
        "model": name,
        "num_params": dim,
        "num_examples": int(len(data.y)),
        "train_loss": train_losses,
        "checkpoints": checkpoints,
        "seconds": time.perf_counter() - start,
    }
    if not args.no_plots:
        from hesskit import plots

        plots.plot_training_loss(
            np.arange(len(train_losses)),
            train_losses,
            eval_steps=[c["step"] for c in checkpoints],
            eval_loss=[c["loss"] for c in checkpoints],
            title=f"{name}: training loss",
            path=os.path.join(out_dir, "loss.png"),
        )
        plots.plot_eigenvalue_tracks(
            [c["step"] for c in checkpoints],
            [[c["lambda_max"]] for c in checkpoints],
            loss=[c["loss"] for c in checkpoints],
            title=f"{name}: lambda_max (power iteration) and full-data loss",
            path=os.path.join(out_dir, "tracks.png"),
        )
        result["figures"] = {"loss": "loss.png", "tracks": "tracks.png"}
    return result


# -- output -------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    """Plain Python for ``json``: arrays to lists, non-finite floats to ``None``."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def write_markdown(report: dict, path: str) -> None:
    """Write the human-readable summary of ``report`` to ``path``."""
    cfg = report["config"]
    lines = [
        "# hesskit curvature report",
        "",
        f"Digits subset of {cfg['subset']} examples, seed {cfg['seed']}, {cfg['steps']} RMSProp "
        f"steps (batch {cfg['batch_size']}, learning rate {cfg['lr']}), k = {cfg['k']}. "
        f"Every number is in `report.json`. Wall time {report['seconds']:.1f} s.",
        "",
    ]
    for res in report["models"]:
        name = res["model"]
        lines += [
            f"## {name} ({res['num_params']} parameters)",
            "",
            "| step | loss | gradient norm | gᵀHg / gᵀg | λ_max |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c in res["checkpoints"]:
            lines.append(
                f"| {c['step']} | {_fmt(c['loss'])} | {_fmt(c['grad_norm'])} | "
                f"{_fmt(c['g_curvature'])} | {_fmt(c['lambda_max'])} |"
            )
        lines.append("")
        for label, fig in res.get("figures", {}).items():
            lines += [f"![{name} {label}]({name}/{fig})", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def run_report(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> dict:
    """Run the report for every model in ``args`` and write the output folder."""
    if log is None:

        def log(line: str) -> None:
            print(line, flush=True)

    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    log(f"hesskit report: models {', '.join(args.model)}; writing to {os.path.abspath(args.out)}")
    results = []
    for name in args.model:
        model_dir = os.path.join(args.out, name)
        os.makedirs(model_dir, exist_ok=True)
        results.append(run_model(name, args, model_dir, log))
    config = {
        k: getattr(args, k)
        for k in ("model", "steps", "every", "k", "subset", "batch_size", "lr", "seed")
    }
    report = {
        "config": config,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "models": results,
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(_jsonable(report), fh, indent=1, allow_nan=False)
    write_markdown(report, os.path.join(args.out, "report.md"))
    log(f"done in {report['seconds']:.1f} s; see {os.path.join(args.out, 'report.md')}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    args = parse_args(argv)
    run_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
