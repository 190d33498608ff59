"""The curvature report: train models on the bundled digits and write what their Hessians say.

``python -m hesskit report`` (or the ``hesskit report`` console script) trains each chosen model
with minibatch RMSProp (or Adam, ``--optimizer adam``) on a subset of scikit-learn's digits,
measures the Hessian of the full-subset loss at several checkpoints, compares Adam's second
moment with the Hessian, GGN and empirical Fisher diagonals (from the training run itself when
it is Adam, else from a side Adam run of the same model and minibatches), and writes a folder
with the figures, a JSON file of every number, a markdown summary and the same summary as one
self-contained HTML page.
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

from hesskit import __version__
from hesskit._src.compare import compare_spectra
from hesskit._src.critical import classify
from hesskit._src.directional import eigen_directional_losses
from hesskit._src.operators import hvp, mean_hessian_operator
from hesskit._src.report_html import write_html
from hesskit._src.slq import spectral_density
from hesskit._src.stochastic import trace
from hesskit._src.thick_restart import EigResult
from hesskit._src.tracking import Tracker
from hesskit._src.tree import tree_dim, tree_vdot

MODELS = ("cnn", "mlp", "mlp-large", "linear")
OPTIMIZERS = ("rmsprop", "adam")
DEFAULT_MODELS = ("cnn", "mlp")
NUM_DIGITS = 1797  # size of scikit-learn's bundled digits
SUBSET_FRACTION = 0.05  # the fixed subset of appendix D of Alain et al. (2019)


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    rep.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    rep.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="rmsprop",
        help="training optimizer; with rmsprop a side Adam run of the same model and steps "
        "feeds the Adam section",
    )
    rep.add_argument(
        "--adam-probes",
        type=int,
        default=40,
        help="Hutchinson products per diagonal in the Adam section (0: no Adam section)",
    )
    rep.add_argument("--seed", type=int, default=0, help="random seed (data order, init, probes)")
    rep.add_argument(
        "--fraction",
        type=float,
        default=SUBSET_FRACTION,
        help="fraction of the examples in the small fixed subset whose Hessian is compared",
    )
    rep.add_argument(
        "--max-matvecs", type=int, default=1000, help="HVP budget of each eigensolver run"
    )
    rep.add_argument(
        "--grad-tol",
        type=float,
        default=1e-3,
        help="gradient norm below which a point counts as critical",
    )
    rep.add_argument("--trace-probes", type=int, default=60, help="HVPs for the trace estimate")
    rep.add_argument("--density-runs", type=int, default=4, help="Lanczos runs for the density")
    rep.add_argument("--density-iters", type=int, default=60, help="Lanczos steps per run")
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
        parser.error(f"--subset must be in [20, {NUM_DIGITS}], got {args.subset}")
    if not 1 <= args.batch_size <= args.subset:
        parser.error(f"--batch-size must be in [1, --subset={args.subset}], got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite positive number, got {args.lr}")
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if not (math.isfinite(args.fraction) and 0 < args.fraction <= 1):
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if not (math.isfinite(args.grad_tol) and args.grad_tol > 0):
        parser.error(f"--grad-tol must be a finite positive number, got {args.grad_tol}")
    for flag, value, low in (
        ("--max-matvecs", args.max_matvecs, 10),
        ("--trace-probes", args.trace_probes, 3),
        ("--density-runs", args.density_runs, 1),
        ("--density-iters", args.density_iters, 2),
    ):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.adam_probes != 0 and (args.adam_probes < 2 or args.adam_probes % 2):
        parser.error(f"--adam-probes must be 0 or an even number >= 2, got {args.adam_probes}")
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


def _optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    return optax.adam(args.lr) if args.optimizer == "adam" else optax.rmsprop(args.lr)


def _tracker(k: int, max_matvecs: int) -> Tracker:
    """LA(k) and SA(k) from one ``which="BE"`` Lanczos run (both ends from one Krylov space).

    Measured on the report's defaults (512 digits, 300 RMSProp steps, k = 5, six checkpoints,
    warm-started, both trackers on the same operators): the cnn took 416 products with BE
    against 554 with separate LA and SA runs (74 s against 167 s on a loaded 2-core CPU), the
    mlp 651 against 790 (50 s against 70 s), with the same LA(1) and SA(1) to the printed five
    digits at every checkpoint. BE is cheaper on both, so the report uses it.
    """
    return Tracker(k=2 * k, which="BE", max_matvecs=max_matvecs)


def _adam_side_run(loss_fn, params, data, train_key, args) -> list:
    """Adam from the same start, minibatches and checkpoints as the RMSProp run."""
    opt = optax.adam(args.lr)
    state = opt.init(params)
    chunk = _train_fn(loss_fn, opt, args.batch_size)
    snapshots, t = [], 0
    while t < args.steps:
        n = min(args.every, args.steps - t)
        keys = jax.random.split(jax.random.fold_in(train_key, t), n)
        params, state, _ = chunk(params, state, data, keys)
        t += n
        snapshots.append((t, params, state))
    return snapshots


def _adam_section(module, loss_fn, data, snapshots, key, args) -> dict:
    """Adam's sqrt(v) against |diag H|, the GGN and empirical Fisher diagonals per checkpoint."""
    from hesskit._src.preconditioner import adam_hessian_agreement

    def model_fn(p, batch):
        return module.apply(p, batch.x.astype(jax.tree_util.tree_leaves(p)[0].dtype))

    def output_loss(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

    stats = jax.jit(loss_fn)
    records = []
    for t, params, state in snapshots:
        res = adam_hessian_agreement(
            loss_fn, params, state, data, jax.random.fold_in(key, t),
            model_fn=model_fn, output_loss_fn=output_loss, num_probes=args.adam_probes,
            groups="module", batch_size=args.batch_size,
        )  # fmt: skip
        records.append({"step": t, "loss": float(stats(params, data)), **res.to_dict()})
    return {"probes": args.adam_probes, "checkpoints": records}


def _stats_fn(loss_fn: Callable):
    """A jitted ``stats(params, data)``: loss, gradient norm and curvature along the gradient."""

    @jax.jit
    def stats(params, data):
        f = lambda p: loss_fn(p, data)  # noqa: E731
        loss, g = jax.value_and_grad(f)(params)
        gg = tree_vdot(g, g)
        g_curv = tree_vdot(g, hvp(f, params, g)) / gg
        return loss, jnp.sqrt(gg), g_curv

    return stats


def _one_chunk(data):
    """The whole dataset as a single chunk, for the chunked operators (data as pytree leaves)."""
    return jax.tree_util.tree_map(lambda a: a[None], data)


def _alpha_grid(lam_top: float, lam_bottom: float, num: int = 240) -> np.ndarray:
    """Step sizes for the directional losses: 0, then geometric from 1e-2/lam_max to 1e3/|lam_min|.

    A quadratic direction has its best step at 1/lambda, so the grid spans two decades below the
    sharpest direction's best step and three above the flattest one's, where negative-curvature
    directions are expected to keep improving (Alain et al. 2019, figure 4).
    """
    hi_curv = max(abs(lam_top), 1e-12)
    lo_curv = max(min(abs(lam_bottom), hi_curv), 1e-6 * hi_curv)
    grid = np.geomspace(1e-2 / hi_curv, 1e3 / lo_curv, num - 1)
    return np.concatenate([[0.0], grid])


def _eig_result(values, vectors, residuals, converged, num_matvecs) -> EigResult:
    fields = {
        "eigenvalues": jnp.asarray(values),
        "eigenvectors": vectors,
        "residuals": jnp.asarray(residuals),
        "converged": jnp.asarray(converged),
        "num_matvecs": jnp.asarray(num_matvecs),
        "num_restarts": jnp.asarray(0),
        "ok": jnp.asarray(True),
    }
    # By name, so that diagnostic fields EigResult may gain (None here) do not break this.
    return EigResult(**{name: fields.get(name) for name in EigResult._fields})


def _split(res: EigResult, idx: np.ndarray) -> EigResult:
    return _eig_result(
        np.asarray(res.eigenvalues)[idx],
        jax.tree_util.tree_map(lambda a: a[idx], res.eigenvectors),
        np.asarray(res.residuals)[idx],
        np.asarray(res.converged)[idx],
        res.num_matvecs,
    )


def _checkpoint_record(t, stats, rec, k, grad_tol) -> dict:
    loss, gnorm, g_curv = (float(x) for x in stats)
    bottom, top = rec.eigenvalues[:k], rec.eigenvalues[k:]
    r_bottom, r_top = rec.residuals[:k], rec.residuals[k:]
    conv = bool(np.all(rec.converged))
    return {
        "step": t,
        "loss": loss,
        "grad_norm": gnorm,
        "g_curvature": g_curv,
        "lambda_max": float(top[0]),
        "lambda_min": float(bottom[0]),
        "top": top.tolist(),
        "bottom": bottom.tolist(),
        "residuals_top": r_top.tolist(),
        "residuals_bottom": r_bottom.tolist(),
        "converged": conv,
        "num_matvecs": rec.num_matvecs,
        "angles_to_previous_top": rec.angles_to_previous[k:].tolist(),
        "angles_to_previous_bottom": rec.angles_to_previous[:k].tolist(),
        "classification": classify(
            gnorm,
            bottom[0],
            top[0],
            conv,
            grad_tol=grad_tol,
            residual_min=r_bottom[0],
            residual_max=r_top[0],
        ),
    }


def run_model(name: str, args: argparse.Namespace, out_dir: str, log: Callable[[str], None]):
    r"""Train one model, measure its Hessian along the way, and analyse the final point.

    At every checkpoint: the loss, gradient norm, :math:`g^\top H g / g^\top g`, and LA(k) and
    SA(k) of the Hessian of the mean loss over the training subset (one warm-started
    ``which="BE"`` solve, :class:`~hesskit.Tracker`). With ``--adam-probes`` (on by default):
    Adam's :math:`\sqrt{\hat v_t}` against the curvature diagonals at each checkpoint after
    the start (:func:`hesskit.adam_hessian_agreement`). At the end: the spectral density, the
    trace, the loss along each extreme eigenvector against its quadratic model (best step
    :math:`\alpha^*` next to :math:`1/\lambda`), and the same eigenpairs on a fixed small
    fraction of the data compared with the full ones. Returns the JSON-ready results.
    """
    import flax.serialization

    from hesskit.examples import load_digits, make_classifier, make_loss

    data = load_digits(args.subset, seed=args.seed)
    chunks = _one_chunk(data)
    num_small = max(1, round(args.fraction * args.subset))
    # load_digits shuffles, so the first examples are a fixed random subset.
    small_chunks = _one_chunk(jax.tree_util.tree_map(lambda a: a[:num_small], data))
    key = jax.random.key(args.seed)
    init_key, train_key, probe_key, analysis_key = jax.random.split(key, 4)
    # A key of its own, so the other sections' numbers do not change with the Adam section.
    adam_key = jax.random.fold_in(key, 5)
    module, params = make_classifier(name, key=init_key, sample=data.x[:1])
    loss_fn = make_loss(module)
    params0 = params
    opt = _optimizer(args)
    state = opt.init(params)
    chunk = _train_fn(loss_fn, opt, args.batch_size)
    stats_fn = _stats_fn(loss_fn)
    k = args.k
    tracker = _tracker(k, args.max_matvecs)
    snapshots = []  # (step, params, optimizer state) for the Adam section

    dim = tree_dim(params)
    log(f"[{name}] {dim} parameters, {len(data.y)} digits, {args.steps} steps, LA({k}) and SA({k})")
    log(
        f"{'step':>6} {'loss':>9} {'|g|':>9} {'gHg/gg':>9} {'lam_max':>10} {'lam_min':>10} "
        f"{'HVPs':>6}"
    )
    checkpoints = []
    train_losses: list[float] = []
    t = 0
    start = time.perf_counter()
    while True:
        stats = stats_fn(params, data)
        op = mean_hessian_operator(loss_fn, params, chunks)
        rec = tracker.update(t, op, jax.random.fold_in(probe_key, t), loss=stats[0])
        c = _checkpoint_record(t, stats, rec, k, args.grad_tol)
        checkpoints.append(c)
        flag = "" if c["converged"] else "  (not all converged)"
        log(
            f"{t:>6} {c['loss']:9.4f} {c['grad_norm']:9.4f} {c['g_curvature']:9.4f} "
            f"{c['lambda_max']:10.4g} {c['lambda_min']:10.4g} {c['num_matvecs']:>6}{flag}"
        )
        if args.optimizer == "adam" and t > 0:
            snapshots.append((t, params, state))
        if t >= args.steps:
            break
        n = min(args.every, args.steps - t)
        keys = jax.random.split(jax.random.fold_in(train_key, t), n)
        params, state, losses = chunk(params, state, data, keys)
        train_losses.extend(np.asarray(losses).tolist())
        t += n

    # The model is flax nnx (graphdef, params, rest = nnx.split(model, nnx.Param, ...)); msgpack
    # takes the parameters' nested dict, nnx.replace_by_pure_dict restores them.
    from flax import nnx

    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    with open(os.path.join(out_dir, "params.msgpack"), "wb") as fh:
        fh.write(flax.serialization.to_bytes(pure))
    last = tracker.history[-1]
    full = _eig_result(
        last.eigenvalues, last.eigenvectors, last.residuals, last.converged, last.num_matvecs
    )
    bottom_idx, top_idx = np.arange(k), np.arange(k, 2 * k)
    final = checkpoints[-1]
    key_density, key_trace, key_small = jax.random.split(analysis_key, 3)

    log(f"[{name}] final point: density, trace, directional losses, {args.fraction:.0%} subset")
    num_iters = min(args.density_iters, dim - 1)
    density = spectral_density(op, key_density, num_runs=args.density_runs, num_iters=num_iters)
    tr = trace(op, key_trace, num_probes=args.trace_probes)

    alphas = _alpha_grid(final["lambda_max"], final["lambda_min"])
    # Most negative first, then largest first: the order the plots and tables use.
    order = np.concatenate([top_idx, bottom_idx])
    directions = _split(full, order)
    dl = eigen_directional_losses(loss_fn, params, directions, alphas, chunks=chunks)
    lam = np.asarray(directions.eigenvalues, float)
    alpha_star = np.asarray(dl.alpha_star, float)
    best = np.asarray(dl.best_decrease, float)
    directional = {
        "eigenvalues": lam.tolist(),
        "inverse_eigenvalues": (1.0 / lam).tolist(),
        "alpha_star": alpha_star.tolist(),
        "inv_alpha_star": np.asarray(dl.inv_alpha_star, float).tolist(),
        "best_decrease": best.tolist(),
        "slope": np.asarray(dl.slope, float).tolist(),
        "alpha_at_grid_end": (alpha_star >= alphas[-1]).tolist(),
        "alphas": alphas.tolist(),
        "losses": np.asarray(dl.losses, float).tolist(),
        "loss0": float(dl.loss0[0]),
    }

    small_op = mean_hessian_operator(loss_fn, params, small_chunks)
    small_tracker = _tracker(k, args.max_matvecs)
    srec = small_tracker.update(t, small_op, key_small)
    small = _eig_result(
        srec.eigenvalues, srec.eigenvectors, srec.residuals, srec.converged, srec.num_matvecs
    )
    cmp_top = compare_spectra(_split(small, top_idx), _split(full, top_idx))
    cmp_bottom = compare_spectra(_split(small, bottom_idx), _split(full, bottom_idx))
    subset = {
        "num_examples": num_small,
        "fraction": num_small / args.subset,
        "top": np.asarray(small.eigenvalues)[top_idx].tolist(),
        "bottom": np.asarray(small.eigenvalues)[bottom_idx].tolist(),
        "converged": bool(np.all(srec.converged)),
        "relative_diff_top": np.asarray(cmp_top.relative_diff).tolist(),
        "relative_diff_bottom": np.asarray(cmp_bottom.relative_diff).tolist(),
        "matched_angles_top_deg": np.degrees(np.asarray(cmp_top.matched_angles)).tolist(),
        "matched_angles_bottom_deg": np.degrees(np.asarray(cmp_bottom.matched_angles)).tolist(),
        "principal_angles_top_deg": np.degrees(np.asarray(cmp_top.principal_angles)).tolist(),
        "principal_angles_bottom_deg": np.degrees(np.asarray(cmp_bottom.principal_angles)).tolist(),
    }
    analysis = {
        "classification": final["classification"],
        "grad_tol": args.grad_tol,
        "condition_number_extremes": abs(final["lambda_max"]) / abs(final["lambda_min"])
        if final["lambda_min"] != 0
        else None,
        "max_stable_lr": 2.0 / final["lambda_max"] if final["lambda_max"] > 0 else None,
        "damping_for_pd": max(0.0, -final["lambda_min"]),
        "la_over_abs_sa": final["lambda_max"] / abs(final["lambda_min"])
        if final["lambda_min"] != 0
        else None,
        "trace": {"value": float(tr.value), "stderr": float(tr.stderr), "probes": tr.num_matvecs},
        "density": {
            "grid": np.asarray(density.grid).tolist(),
            "density": np.asarray(density.density).tolist(),
            "num_runs": args.density_runs,
            "num_iters": num_iters,
        },
        "directional": directional,
        "subset": subset,
    }
    adam = None
    if args.adam_probes:
        if args.optimizer != "adam":
            log(f"[{name}] Adam section: a side Adam run from the same initial point")
            snapshots = _adam_side_run(loss_fn, params0, data, train_key, args)
        adam = _adam_section(module, loss_fn, data, snapshots, adam_key, args)
        adam["run"] = "the training run" if args.optimizer == "adam" else "a side Adam run"
        last_adam = adam["checkpoints"][-1]["overall_spearman"] if adam["checkpoints"] else {}
        log(
            f"[{name}] Adam sqrt(v) vs diagonals at the last step, Spearman: "
            + ", ".join(f"{r} {v:+.2f}" for r, v in last_adam.items())
        )
    result = {
        "model": name,
        "num_params": dim,
        "num_examples": int(len(data.y)),
        "train_loss": train_losses,
        "checkpoints": checkpoints,
        "final": analysis,
        "seconds": time.perf_counter() - start,
    }
    if adam is not None:
        result["adam"] = adam
    log(
        f"[{name}] {final['classification']}; trace {tr.value:.4g} +- {tr.stderr:.2g}; "
        f"LA(1)/|SA(1)| = {_fmt(analysis['la_over_abs_sa'])}; subset lambda_max rel. diff "
        f"{subset['relative_diff_top'][0]:+.2%}"
    )
    if not args.no_plots:
        result["figures"] = _plots(name, out_dir, train_losses, checkpoints, tracker, analysis)
        if adam is not None and adam["checkpoints"]:
            from hesskit import plots

            plots.plot_preconditioner_agreement(
                [c["step"] for c in adam["checkpoints"]],
                adam["checkpoints"],
                title=f"{name}: Adam's sqrt(v) against diagonal curvature, per layer",
                path=os.path.join(out_dir, "adam.png"),
            )
            result["figures"]["adam"] = "adam.png"
    return result


def _plots(name, out_dir, train_losses, checkpoints, tracker, analysis) -> dict:
    from hesskit import plots

    def path(fig: str) -> str:
        return os.path.join(out_dir, fig)

    steps, top, bottom, loss = tracker.as_arrays()
    plots.plot_training_loss(
        np.arange(len(train_losses)),
        train_losses,
        eval_steps=[c["step"] for c in checkpoints],
        eval_loss=[c["loss"] for c in checkpoints],
        title=f"{name}: training loss",
        path=path("loss.png"),
    )
    plots.plot_eigenvalue_tracks(
        steps,
        top,
        bottom,
        loss=loss,
        title=f"{name}: LA(k) and SA(k) of the Hessian, and the loss",
        path=path("tracks.png"),
    )
    d = analysis["density"]
    final = checkpoints[-1]
    plots.plot_spectral_density(
        d["grid"],
        d["density"],
        eigenvalues=final["top"] + final["bottom"],
        title=f"{name}: spectral density at the end of training",
        path=path("density.png"),
    )
    dl = analysis["directional"]
    k = len(final["top"])
    alphas = np.asarray(dl["alphas"])
    figures = {"loss": "loss.png", "tracks": "tracks.png", "density": "density.png"}
    # The sharpest and the most negative direction, each on its own scale: three times the larger
    # of its best step and 1/|lambda| (the geometric grid spans many decades).
    for i, label in ((0, "top"), (k, "bottom")):
        lam = dl["eigenvalues"][i]
        losses = np.asarray(dl["losses"][i], float)
        limit = 3.0 * max(dl["alpha_star"][i], 1.0 / abs(lam) if lam != 0 else 0.0)
        keep = (alphas <= limit) & np.isfinite(losses)
        which = "largest" if label == "top" else "most negative"
        plots.plot_directional_loss(
            alphas[keep],
            losses[keep],
            eigenvalues=lam,
            slopes=dl["slope"][i],
            loss0=dl["loss0"],
            labels=[f"{which} eigenvalue, lambda = {lam:.3g}"],
            title=f"{name}: loss along an eigenvector vs the quadratic model",
            path=path(f"directional_{label}.png"),
        )
        figures[f"directional_{label}"] = f"directional_{label}.png"
    plots.plot_step_sizes(
        dl["eigenvalues"],
        dl["best_decrease"],
        dl["alpha_star"],
        title=f"{name}: best loss decrease and 1/alpha* per eigen-direction",
        path=path("steps.png"),
    )
    figures.update(steps="steps.png")
    return figures


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


def _optimizer_name(cfg: dict) -> str:
    return "Adam" if cfg.get("optimizer") == "adam" else "RMSProp"


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _list(xs, spec: str = ".3g") -> str:
    return ", ".join(_fmt(x, spec) for x in xs)


def _findings(res: dict) -> list[str]:
    """Plain statements of what this run shows, next to what the paper reports."""
    fin = res["final"]
    first, last = res["checkpoints"][0], res["checkpoints"][-1]
    dl = fin["directional"]
    k = len(last["top"])
    lines = []
    ratio = fin["la_over_abs_sa"]
    if ratio is not None and last["lambda_min"] < 0:
        verdict = (
            "the positive end dominates, as in the paper"
            if ratio > 3
            else "the two ends are comparable, unlike the paper"
        )
        lines.append(f"- λ_max / |λ_min| = {ratio:.3g} at the last step: {verdict}.")
    else:
        lines.append(
            f"- No negative eigenvalue was found at the last step (λ_min = "
            f"{_fmt(last['lambda_min'])})."
        )
    neg = [i for i in range(k, 2 * k) if dl["eigenvalues"][i] < 0]
    pos = [i for i in range(k) if dl["eigenvalues"][i] > 0]
    if pos:
        r = [dl["alpha_star"][i] * dl["eigenvalues"][i] for i in pos]
        lines.append(f"- Positive directions: α* · λ = {_list(r, '.2f')} (1 for a quadratic loss).")
    if neg:
        r = [dl["alpha_star"][i] * abs(dl["eigenvalues"][i]) for i in neg]
        at_end = any(dl["alpha_at_grid_end"][i] for i in neg)
        lines.append(
            f"- Negative directions: α* · |λ| = {_list(r, '.3g')}"
            + (" (at least one α* is the end of the grid)" if at_end else "")
            + "; the quadratic model has no minimum there."
        )
        best_pos = min((dl["best_decrease"][i] for i in pos), default=0.0)
        best_neg = min(dl["best_decrease"][i] for i in neg)
        lines.append(
            f"- Best loss decrease along one eigenvector: {best_neg:.3g} (negative directions) vs "
            f"{best_pos:.3g} (positive directions)."
        )
    lines.append(
        f"- λ_max went from {_fmt(first['lambda_max'])} at step {first['step']} to "
        f"{_fmt(last['lambda_max'])} at step {last['step']}; λ_min from "
        f"{_fmt(first['lambda_min'])} to {_fmt(last['lambda_min'])}."
    )
    sub = fin["subset"]
    lines.append(
        f"- Hessian on a fixed {sub['fraction']:.0%} subset ({sub['num_examples']} examples): "
        f"relative differences of LA(k) {_list(sub['relative_diff_top'], '+.1%')}, angles of the "
        f"top eigenvectors to their matches {_list(sub['matched_angles_top_deg'], '.0f')} degrees."
    )
    return lines


ADAM_REFS = ("|diag H|", "diag GGN", "empirical Fisher", "sqrt E[g_B^2]")


def _adam_intro(adam: dict) -> str:
    return (
        f"Adam's √v̂ (bias-corrected, from {adam['run']}, same learning rate and minibatches) "
        f"against |diag H| and the GGN diagonal (Hutchinson, {adam['probes']} products each, "
        "in two independent halves), the empirical Fisher diagonal (mean squared per-example "
        "gradient) and sqrt E[g_B^2] (the root of the expected squared minibatch gradient at "
        "the checkpoint), layer by layer. ρ_s: Spearman rank correlation; r_log: Pearson "
        "correlation of log10 values (both blind to a per-layer scale and to a power); "
        "ceiling: the largest r_log the Hutchinson estimate's own noise allows (from its two "
        "halves); ratio: median log10(√v / |d|), in decades."
    )


def _adam_rows(adam: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The overall table (per checkpoint) and the per-layer table (last checkpoint)."""
    head = ["step", "loss", *(f"{r}: ρ_s / r_log" for r in ADAM_REFS)]
    rows = []
    for c in adam["checkpoints"]:
        cells = [
            f"{_fmt(c['overall_spearman'][r], '.2f')} / {_fmt(c['overall_pearson_log'][r], '.2f')}"
            for r in ADAM_REFS
        ]
        rows.append([str(c["step"]), _fmt(c["loss"]), *cells])
    last = adam["checkpoints"][-1]
    lhead = ["layer", "n", *(f"{r}: ρ_s / r_log (ceiling) / ratio" for r in ADAM_REFS)]
    lrows = []
    for i, layer in enumerate(last["names"]):
        cells = []
        for r in ADAM_REFS:
            ceil = last["ceiling"][r][i]
            ceil = "" if ceil is None or not math.isfinite(ceil) else f" ({ceil:.2f})"
            cells.append(
                f"{_fmt(last['spearman'][r][i], '.2f')} / {_fmt(last['pearson_log'][r][i], '.2f')}"
                f"{ceil} / {_fmt(last['log_ratio'][r][i], '+.2f')}"
            )
        lrows.append([layer, str(last["sizes"][i]), *cells])
    return head, rows, lhead, lrows


def _adam_findings(adam: dict) -> list[str]:
    """What the Adam section shows, in words."""
    if not adam["checkpoints"]:
        return []
    last = adam["checkpoints"][-1]
    sp = last["overall_spearman"]
    best = max(ADAM_REFS, key=lambda r: -math.inf if sp[r] is None else sp[r])
    ratio = np.nanmedian(np.asarray(last["log_ratio"]["|diag H|"], float))
    return [
        f"- At step {last['step']}, √v ranks the coordinates most like {best} (ρ_s = "
        f"{_fmt(sp[best], '.2f')}); like |diag H| ρ_s = {_fmt(sp['|diag H|'], '.2f')}, like the "
        f"GGN diagonal {_fmt(sp['diag GGN'], '.2f')}; √v / |diag H| is typically "
        f"10^{ratio:+.2f} (median over layers of the median ratio)."
    ]


def _fmt_md(text: str) -> str:
    # A pipe inside a markdown table cell would end the cell.
    return text.replace("|", "\\|")


def write_markdown(report: dict, path: str) -> None:
    """Write the human-readable summary of ``report`` to ``path``."""
    cfg = report["config"]
    lines = [
        "# hesskit curvature report",
        "",
        f"Digits subset of {cfg['subset']} examples, seed {cfg['seed']}, {cfg['steps']} "
        f"{_optimizer_name(cfg)} steps (batch {cfg['batch_size']}, learning rate {cfg['lr']}), "
        f"k = {cfg['k']}. The "
        "Hessian is that of the mean loss over the whole subset. Every number is in "
        f"`report.json`. Wall time {report['seconds']:.1f} s on {report['backend']}.",
        "",
    ]
    for res in report["models"]:
        name = res["model"]
        fin = res["final"]
        lines += [
            f"## {name} ({res['num_params']} parameters)",
            "",
            "| step | loss | gradient norm | gᵀHg / gᵀg | λ_max | λ_min | HVPs | point |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in res["checkpoints"]:
            conv = "" if c["converged"] else " (not converged)"
            lines.append(
                f"| {c['step']} | {_fmt(c['loss'])} | {_fmt(c['grad_norm'])} | "
                f"{_fmt(c['g_curvature'])} | {_fmt(c['lambda_max'])} | {_fmt(c['lambda_min'])} | "
                f"{c['num_matvecs']} | {c['classification']}{conv} |"
            )
        last = res["checkpoints"][-1]
        tr = fin["trace"]
        lines += [
            "",
            f"At the last step: LA({len(last['top'])}) = {_list(last['top'])}; "
            f"SA({len(last['bottom'])}) = {_list(last['bottom'])}.",
            f"Trace {tr['value']:.4g} ± {tr['stderr']:.2g} (Hutch++, {tr['probes']} HVPs). "
            f"Largest stable gradient-descent step 2/λ_max = {_fmt(fin['max_stable_lr'])}; "
            f"damping for a positive definite H + δI: δ > {_fmt(fin['damping_for_pd'])}. "
            f"Classification (gradient tolerance {fin['grad_tol']:g}): {fin['classification']}.",
            "",
            "| direction | λ | 1/λ | α* | best loss decrease |",
            "|---|---:|---:|---:|---:|",
        ]
        dl = fin["directional"]
        k = len(last["top"])
        for i, lam in enumerate(dl["eigenvalues"]):
            label = f"LA {i + 1}" if i < k else f"SA {i - k + 1}"
            end = " (grid end)" if dl["alpha_at_grid_end"][i] else ""
            lines.append(
                f"| {label} | {_fmt(lam)} | {_fmt(dl['inverse_eigenvalues'][i])} | "
                f"{_fmt(dl['alpha_star'][i])}{end} | {_fmt(dl['best_decrease'][i])} |"
            )
        lines += ["", "What this run shows:", "", *_findings(res), ""]
        adam = res.get("adam")
        if adam and adam["checkpoints"]:
            head, rows, lhead, lrows = _adam_rows(adam)
            lines += ["### Adam against the Hessian", "", _adam_intro(adam), ""]
            layer_note = f"Per layer at step {adam['checkpoints'][-1]['step']}:"
            for h, body in ((head, rows), (lhead, lrows)):
                if h is lhead:
                    lines += [layer_note, ""]
                lines.append("| " + " | ".join(map(_fmt_md, h)) + " |")
                lines.append("|" + "---|" * len(h))
                lines += ["| " + " | ".join(map(_fmt_md, r)) + " |" for r in body]
                lines.append("")
            lines += [*_adam_findings(adam), ""]
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
        for k in (
            "model",
            "steps",
            "every",
            "k",
            "subset",
            "batch_size",
            "lr",
            "seed",
            "fraction",
            "max_matvecs",
            "grad_tol",
            "trace_probes",
            "density_runs",
            "density_iters",
            "optimizer",
            "adam_probes",
        )
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
    write_html(report, os.path.join(args.out, "report.html"))
    log(f"done in {report['seconds']:.1f} s; see {os.path.join(args.out, 'report.md')}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    args = parse_args(argv)
    run_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
