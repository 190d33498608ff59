"""Optimizers with and without curvature, side by side: steps to a target loss and cost per step.

Two problems: the digits MLP (64-32-10 tanh, 512 examples, full batch) from its usual random
initialisation, and a two-layer linear network (4-5-3, weights all zero: a strict saddle with zero
gradient) fitting a random linear map. Each optimizer runs the same number of jitted full-batch
steps; the table reports steps to reach the target loss, the final loss, and the median time per
step as a ratio to plain Adam measured in the same run. A plot of the loss curves is saved next
to the tables.

Usage::

    python benchmarks/optimizers.py          # saves results/optimizers-<backend>.{json,md,png}
    python benchmarks/optimizers.py --quick  # few steps (run by the test suite)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hesskit.transforms as ht
from hesskit.examples import load_digits, make_classifier, make_loss

RESULTS = pathlib.Path(__file__).parent / "results"


def optimizers(lr: float) -> dict[str, optax.GradientTransformationExtraArgs]:
    return {
        "adam": optax.adam(lr),
        "sgd": optax.sgd(10 * lr),
        "noisy_sgd": ht.noisy_sgd(10 * lr, radius=0.05),
        "adam + negative_curvature": optax.chain(
            optax.adam(lr), ht.negative_curvature(0.05, num_matvecs=5, every=5)
        ),
    }


def digits_problem():
    data = load_digits(512)
    module, params = make_classifier("mlp", key=jax.random.key(0), sample=data.x[:1])
    loss = make_loss(module)
    return params, lambda p: loss(p, data), 0.05


def deep_linear_problem():
    x = jax.random.normal(jax.random.key(0), (256, 4))
    y = x @ jax.random.normal(jax.random.key(1), (4, 3))
    params = {"w1": jnp.zeros((4, 5)), "w2": jnp.zeros((5, 3))}

    def f(p):
        return 0.5 * jnp.mean(jnp.sum((x @ p["w1"] @ p["w2"] - y) ** 2, axis=1))

    return params, f, 0.05 * float(f(params))


def train(opt, params, f, steps: int):
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(f)(p)
        u, s = opt.update(g, s, p, value_fn=f)
        return optax.apply_updates(p, u), s, value

    p, s, _ = step(params, state)  # compile
    jax.block_until_ready(p)
    p, s = params, state
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        p, s, value = step(p, s)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - t0)
        losses.append(float(value))
    return np.asarray(losses), statistics.median(times[1:] or times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the tables and plot")
    args = parser.parse_args(argv)
    steps = 20 if args.quick else 600
    problems = {"digits MLP": digits_problem(), "linear network at zero": deep_linear_problem()}
    results = {}
    curves = {}
    for pname, (params, f, target) in problems.items():
        rows = {}
        for oname, opt in optimizers(1e-2).items():
            losses, per_step = train(opt, params, f, steps)
            hit = np.flatnonzero(losses <= target)
            rows[oname] = {
                "steps_to_target": int(hit[0]) + 1 if hit.size else None,
                "final_loss": float(losses[-1]),
                "ms_per_step": 1e3 * per_step,
            }
            curves[(pname, oname)] = losses
        adam_ms = rows["adam"]["ms_per_step"]
        for r in rows.values():
            r["time_ratio_to_adam"] = r["ms_per_step"] / adam_ms
        results[pname] = {"target": target, "rows": rows}

    backend = jax.default_backend()
    lines = [f"# Optimizers ({backend}), {steps} full-batch steps, Adam lr 1e-2, SGD lr 0.1", ""]
    for pname, res in results.items():
        lines += [
            f"## {pname} (target loss {res['target']:.4g})",
            "",
            "| optimizer | steps to target | final loss | ms / step | time / Adam |",
            "|---|---:|---:|---:|---:|",
        ]
        for oname, r in res["rows"].items():
            hit = "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"])
            lines.append(
                f"| {oname} | {hit} | {r['final_loss']:.4g} | {r['ms_per_step']:.3f} "
                f"| {r['time_ratio_to_adam']:.2f} |"
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

    fig = Figure(figsize=(10, 4))
    for ax, pname in zip(fig.subplots(1, 2), problems, strict=True):
        for oname in optimizers(1e-2):
            ax.plot(curves[(pname, oname)], label=oname)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(pname)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    return results


if __name__ == "__main__":
    main()
