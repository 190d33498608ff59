"""The curvature report: train a model on the bundled digits and print what the Hessian says."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from hesskit._src.operators import hessian_operator
from hesskit._src.tree import tree_normalize, tree_random_sphere, tree_vdot


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hesskit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="train on the bundled digits and report curvature")
    rep.add_argument("--model", default="mlp", help="mlp, mlp-large, cnn or linear")
    rep.add_argument("--steps", type=int, default=300, help="training steps")
    rep.add_argument("--every", type=int, default=50, help="measure curvature every N steps")
    rep.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    rep.add_argument("--subset", type=int, default=512, help="number of training examples")
    rep.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def run_report(args: argparse.Namespace) -> dict:
    """Train with Adam and print the curvature along the gradient and lambda_max as it goes."""
    from hesskit.examples import load_digits, make_classifier, make_loss

    data = load_digits(args.subset, seed=args.seed)
    key = jax.random.key(args.seed)
    module, params = make_classifier(args.model, key=key, sample=data.x[:1])
    loss_fn = make_loss(module)
    opt = optax.adam(args.lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, data)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def curvature(params, key):
        f = lambda p: loss_fn(p, data)  # noqa: E731
        loss, g = jax.value_and_grad(f)(params)
        op = hessian_operator(f, params)
        gg = tree_vdot(g, g)
        g_curv = tree_vdot(g, op(g)) / gg
        return loss, jnp.sqrt(gg), g_curv, _power_lambda_max(op, key, 20)

    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"hesskit report: model={args.model} ({n_params} parameters), {len(data.y)} digits")
    print(f"{'step':>6} {'loss':>9} {'|g|':>9} {'gHg/gg':>9} {'lam_max':>9}")
    rows = []
    start = time.perf_counter()
    for t in range(args.steps + 1):
        if t % args.every == 0 or t == args.steps:
            loss, gnorm, g_curv, lam = curvature(params, jax.random.fold_in(key, t))
            row = {"step": t, "loss": float(loss), "grad_norm": float(gnorm)}
            row.update({"g_curvature": float(g_curv), "lambda_max": float(lam)})
            rows.append(row)
            print(f"{t:>6} {loss:9.4f} {gnorm:9.4f} {g_curv:9.4f} {lam:9.4f}", flush=True)
        if t < args.steps:
            params, state, _ = step(params, state)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps < 0 or args.every < 1:
        parser.error("--steps must be >= 0 and --every >= 1")
    run_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
