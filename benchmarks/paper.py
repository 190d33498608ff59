"""Alain, Le Roux and Manzagol (2019) at the paper's model size: findings 1-6 on the full set.

A ReLU CNN trained with RMSProp at batch 32 on the bundled digits (all 1,797, resized to 28x28
for the 3.3M-parameter :class:`hesskit.examples.LinenLeNet`; 8x8 for the 3,658-parameter
digits CNN of notebook 02). At each checkpoint the Hessian of the *full-set* mean loss (chunked,
``mean_hessian_operator(..., chunk_size=...)``) gets one ``eigsh(which="BE")`` solve (both ends
in one Krylov run, about half the products of separate LA and SA solves), warm-started from the
previous checkpoint's top eigenvector. Findings, measured as in notebook 02:

1. ``lambda_max / |lambda_min|`` per checkpoint;
2. along the most negative eigenvector the loss turns up where the quadratic model keeps falling;
3. ``alpha* lambda`` for positive and ``alpha* |lambda|`` for negative pairs, best decreases
   (``eigen_directional_losses``; ``at_edge`` marks minimizers that ran off the grid);
4. settle early: relative eigenvalue change and gap-aware principal angles
   (``compare_spectra(...).cluster_angles``) between consecutive checkpoints, in the memorising
   run and in an early-stopped run (``--label-noise``: a fraction of labels permuted, so the
   training loss stays well above zero, as in MNIST-scale training);
5. subset agreement as a curve: at the last checkpoint, the extreme eigenpairs of fixed subsets
   (fractions of the set) against the full set's: eigenvalue error, cluster angles, and the
   Rayleigh quotients of the subset's eigenvectors on the *full* Hessian.

The JSON is rewritten after every checkpoint, so an interrupted run keeps what finished.

Usage::

    python benchmarks/paper.py --quick               # the digits CNN, tiny budget (the test)
    python benchmarks/paper.py --model cnn           # 3,658 parameters, all 1,797 digits
    python benchmarks/paper.py --model lenet         # 3.3M parameters (about an hour on 2 cores)
    python benchmarks/paper.py --model lenet --regimes "label noise" \
        --subsets-regime "label noise" --name label-noise-converging   # one regime, own files
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import shlex
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hesskit as hk
from hesskit.examples import LinenCNN, LinenLeNet, load_digits, make_loss

RESULTS = pathlib.Path(__file__).parent / "results"
# The chunks of the full-set Hessian are unrolled, not scanned: XLA's CPU backend runs a
# convolution inside a loop about 11x slower than outside (measured on the LeNet, 128 digits in
# two chunks of 64: 11.6 s per product scanned, 1.05 s unrolled; jax-ml/jax#12868). A handful
# of chunks costs only a few copies of the program at compile time.
UNROLL = True


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(loss, opt, params, state, data, key):
    # loss and opt are static: one compile for the whole run, the data an argument. One jitted
    # step per host iteration, not a lax.scan over steps: the scan would put the convolutions in
    # a loop, where XLA's CPU backend runs them about 11x slower (see UNROLL).
    n = data.y.shape[0]
    idx = jax.random.choice(key, n, (32,), replace=False)
    batch = jax.tree_util.tree_map(lambda a: a[idx], data)
    g = jax.grad(loss)(params, batch)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state


def train_segment(loss, opt, params, state, data, steps: int, key: jax.Array):
    """``steps`` RMSProp steps on minibatches of 32 drawn without replacement per step."""
    for k in jax.random.split(key, steps) if steps else ():
        params, state = _train_step(loss, opt, params, state, data, k)
    return params, state


def full_loss(loss, params, data, chunk: int) -> float:
    n = int(data.y.shape[0])
    jitted = jax.jit(loss)
    tot = 0.0
    for s in range(0, n, chunk):
        b = jax.tree_util.tree_map(lambda a, s=s: a[s : s + chunk], data)
        tot += float(jitted(params, b)) * int(b.y.shape[0])
    return tot / n


def take(res: hk.EigResult, idx) -> hk.EigResult:
    """The pairs ``idx`` of ``res``, with their own residuals and convergence flags."""
    idx = np.asarray(idx)
    return res._replace(
        eigenvalues=jnp.asarray(res.eigenvalues)[idx],
        eigenvectors=jax.tree_util.tree_map(lambda a: a[idx], res.eigenvectors),
        residuals=jnp.asarray(res.residuals)[idx],
        converged=jnp.asarray(res.converged)[idx],
    )


def be_solve(op, k: int, key, v0, max_matvecs: int):
    """BE(k): k//2 bottom and the rest top, one Krylov run; returns (top, bottom, record)."""
    kw = {"max_matvecs": max_matvecs}
    if v0 is not None:
        kw["v0"] = v0
    t0 = time.perf_counter()
    res = hk.eigsh(op, key, k, which="BE", **kw)
    wall = time.perf_counter() - t0
    lam = np.asarray(res.eigenvalues)
    order = np.argsort(lam)
    nb = k // 2
    bottom = take(res, order[:nb])  # most negative first
    top = take(res, order[nb:][::-1])  # largest first
    rec = {
        "products": int(res.num_matvecs),
        "wall_s": wall,
        "converged": int(np.sum(np.asarray(res.converged))),
        # 0 converged, 1 budget spent, 3 precision floor (see hk.EigResult.status).
        "status": int(res.status),
        "max_residual": float(np.max(np.asarray(res.residuals))),
        "k": k,
    }
    return top, bottom, rec


def directional(loss, params, data, chunk, top, bottom, grid: int = 200):
    """Findings 2-3: the loss along each eigenvector on a wide geometric grid."""
    n = int(data.y.shape[0])
    m = (n // chunk) * chunk  # equal chunks for lax.map; the ragged tail is dropped here
    chunks = jax.tree_util.tree_map(lambda a: a[:m].reshape(m // chunk, chunk, *a.shape[1:]), data)
    both = top._replace(
        **{
            f: jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([a, b]), getattr(top, f), getattr(bottom, f)
            )
            for f in ("eigenvalues", "eigenvectors", "residuals", "converged")
        }
    )
    lam = np.asarray(both.eigenvalues)
    lo = 1e-2 / np.max(np.abs(lam))
    hi = 1e4 / np.min(np.abs(lam))
    alphas = jnp.concatenate([jnp.zeros(1), jnp.geomspace(lo, hi, grid, dtype=jnp.float32)])
    dl = hk.eigen_directional_losses(loss, params, both, alphas, chunks=chunks)
    ast, best = np.asarray(dl.alpha_star), np.asarray(dl.best_decrease)
    kt = int(top.eigenvalues.shape[0])
    i = kt  # the most negative direction
    a = np.asarray(alphas)
    far = a >= 3 * ast[i]
    true, model = np.asarray(dl.losses[i]), np.asarray(dl.model[i])
    local = bool(np.any(far) and np.min(true[far]) > true.min() and np.all(model[far] < true[far]))
    return {
        "eigenvalues": lam.tolist(),
        "alpha_star": ast.tolist(),
        "best_decrease": best.tolist(),
        "at_edge": np.asarray(dl.at_edge).tolist(),
        "slope": np.asarray(dl.slope).tolist(),
        "alpha_lambda_pos": (ast[:kt] * lam[:kt]).tolist(),
        "alpha_lambda_neg": (ast[kt:] * np.abs(lam[kt:])).tolist(),
        "negative_is_local": local,
        "neg_better": bool(best[kt:].max() < best[:kt].min()),
    }


def changes(prev, cur) -> dict:
    """Finding 4 between consecutive checkpoints: eigenvalue change and gap-aware angles."""
    out = {}
    for end in ("top", "bottom"):
        c = hk.compare_spectra(cur[end], prev[end])
        out[end] = {
            "rel_change": np.abs(np.asarray(c.relative_diff)).tolist(),
            "cluster_angles_deg": np.degrees(np.asarray(c.cluster_angles)).tolist(),
            "principal_angles_deg": np.degrees(np.asarray(c.principal_angles)).tolist(),
        }
    return out


def rayleigh(op, res: hk.EigResult) -> list[float]:
    vs = res.eigenvectors
    k = int(res.eigenvalues.shape[0])
    out = []
    for i in range(k):
        v = jax.tree_util.tree_map(lambda a, i=i: a[i], vs)
        out.append(float(hk.tree_vdot(v, op.matvec(v)) / hk.tree_vdot(v, v)))
    return out


def subset_curve(loss, params, data, chunk, k, fracs, full, max_matvecs, key) -> list[dict]:
    """Finding 5 (the paper's appendix D) as a curve over subset size."""
    rows = []
    n = int(data.y.shape[0])
    op_full = hk.mean_hessian_operator(loss, params, data, chunk_size=chunk, unroll=UNROLL)
    for f in fracs:
        m = max(2, round(f * n))
        sub = jax.tree_util.tree_map(lambda a, m=m: a[:m], data)
        op = hk.mean_hessian_operator(loss, params, sub, chunk_size=min(chunk, m), unroll=UNROLL)
        v0 = jax.tree_util.tree_map(lambda a: a[0], full["top"].eigenvectors)
        top, bottom, rec = be_solve(op, k, key, v0, max_matvecs)
        row = {"fraction": f, "examples": m, **rec}
        for end, res in (("top", top), ("bottom", bottom)):
            c = hk.compare_spectra(res, full[end])
            ref = np.asarray(full[end].eigenvalues)
            rq = np.asarray(rayleigh(op_full, res))
            row[end] = {
                "eigenvalues": np.asarray(res.eigenvalues).tolist(),
                "max_rel_err": float(np.max(np.abs(np.asarray(c.relative_diff)))),
                "max_cluster_angle_deg": float(np.degrees(np.max(np.asarray(c.cluster_angles)))),
                "max_single_angle_deg": float(np.degrees(np.max(np.asarray(c.matched_angles)))),
                "full_rayleigh": rq.tolist(),
                "max_rayleigh_rel_err": float(np.max(np.abs(rq - ref) / np.abs(ref))),
            }
        rows.append(row)
        print(
            f"  subset {f:5.0%} ({m:4d}): LA err {row['top']['max_rel_err']:.1%} "
            f"angle {row['top']['max_cluster_angle_deg']:.0f} deg RQ err "
            f"{row['top']['max_rayleigh_rel_err']:.1%}; SA err {row['bottom']['max_rel_err']:.1%} "
            f"RQ err {row['bottom']['max_rayleigh_rel_err']:.1%}",
            flush=True,
        )
    return rows


def run_regime(name, module, data, args, checkpoints, out, path, noise: float) -> None:
    loss = make_loss(module)
    y = np.asarray(data.y).copy()
    if noise > 0:
        rng = np.random.default_rng(1)
        flip = rng.random(y.shape[0]) < noise
        y[flip] = rng.integers(0, 10, int(flip.sum()))
    train = data._replace(y=jnp.asarray(y))
    params = module.init(jax.random.key(0), data.x[:1])
    opt = optax.rmsprop(args.lr)
    state, t = opt.init(params), 0
    reg = {"label_noise": noise, "checkpoints": []}
    out["regimes"][name] = reg
    prev, v0 = None, None
    for i, target in enumerate(checkpoints):
        params, state = train_segment(
            loss, opt, params, state, train, target - t, jax.random.fold_in(jax.random.key(1), t)
        )
        t = target
        op = hk.mean_hessian_operator(loss, params, train, chunk_size=args.chunk, unroll=UNROLL)
        top, bottom, rec = be_solve(op, 2 * args.k, jax.random.key(100 + i), v0, args.max_matvecs)
        v0 = jax.tree_util.tree_map(lambda a: a[0], top.eigenvectors)
        cur = {"top": top, "bottom": bottom}
        row = {"step": t, "loss": full_loss(loss, params, train, args.chunk), **rec}
        row["top"] = np.asarray(top.eigenvalues).tolist()
        row["bottom"] = np.asarray(bottom.eigenvalues).tolist()
        row["ratio"] = float(row["top"][0] / abs(row["bottom"][0]))
        if prev is not None:
            row["change"] = changes(prev, cur)
        if i == len(checkpoints) - 1 and not noise:
            row["directional"] = directional(
                loss, params, train, args.chunk, top, bottom, args.grid
            )
        prev = cur
        reg["checkpoints"].append(row)
        print(
            f"[{name}] step {t:5d} loss {row['loss']:.4f} LA {np.round(row['top'], 3)} "
            f"SA {np.round(row['bottom'], 4)} {rec['products']} products {rec['wall_s']:.0f} s",
            flush=True,
        )
        path.write_text(json.dumps(out, indent=1))
    if name == args.subsets_regime and args.fracs:
        reg["subsets"] = subset_curve(
            loss,
            params,
            train,
            args.chunk,
            2 * args.k,
            args.fracs,
            prev,
            args.max_matvecs,
            jax.random.key(7),
        )
        path.write_text(json.dumps(out, indent=1))


def to_markdown(out: dict) -> str:
    lines = [f"# The negative-eigenvalues paper: {out['model']} ({out['params']:,} parameters)", ""]
    lines.append(
        f"Command: `{out['command']}`; {out['examples']} digits; total {out.get('total_s', 0):.0f} s."  # noqa: E501
    )
    for name, reg in out["regimes"].items():
        lines += ["", f"## {name} (label noise {reg['label_noise']:.0%})", ""]
        lines.append(
            "| step | loss | LA | SA | λmax/\\|λmin\\| | products | converged | top Δλ | top cluster angle |"  # noqa: E501
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in reg["checkpoints"]:
            ch = r.get("change", {}).get("top")
            d = f"{max(ch['rel_change']):.1%}" if ch else ""
            a = f"{max(ch['cluster_angles_deg']):.0f}°" if ch else ""
            lines.append(
                f"| {r['step']} | {r['loss']:.4g} | {np.round(r['top'], 3).tolist()} | "
                f"{np.round(r['bottom'], 4).tolist()} | {r['ratio']:.1f} | {r['products']} | {r['converged']}/{len(r['top']) + len(r['bottom'])} | {d} | {a} |"  # noqa: E501
            )
        for r in reg["checkpoints"]:
            if "directional" in r:
                d = r["directional"]
                lines += [
                    "",
                    f"Directional (step {r['step']}): α*λ positive {np.round(d['alpha_lambda_pos'], 2).tolist()}, "  # noqa: E501
                    f"α*|λ| negative {np.round(d['alpha_lambda_neg'], 1).tolist()}, at grid edge "
                    f"{d['at_edge']}, negative curvature local: {d['negative_is_local']}, "
                    f"negative directions decrease more: {d['neg_better']}.",
                ]
        if reg.get("subsets"):
            lines += [
                "",
                "| subset | examples | LA rel err | LA cluster angle | LA RQ err on full | SA rel err | SA RQ err on full |",  # noqa: E501
                "|---|---|---|---|---|---|---|",
            ]
            for s in reg["subsets"]:
                lines.append(
                    f"| {s['fraction']:.0%} | {s['examples']} | {s['top']['max_rel_err']:.1%} | "
                    f"{s['top']['max_cluster_angle_deg']:.0f}° | {s['top']['max_rayleigh_rel_err']:.1%} | "  # noqa: E501
                    f"{s['bottom']['max_rel_err']:.1%} | {s['bottom']['max_rayleigh_rel_err']:.1%} |"  # noqa: E501
                )
    return "\n".join(lines) + "\n"


def figures(out: dict, stem: pathlib.Path) -> list[pathlib.Path]:
    """PNG figures of a saved run: eigenvalue tracks per regime and the subset curve."""
    from matplotlib.figure import Figure

    from hesskit.plots import plot_eigenvalue_tracks

    paths = []
    for name, reg in out["regimes"].items():
        rows = reg["checkpoints"]
        path = stem.parent / f"{stem.name}-{name.replace(' ', '-')}.png"
        plot_eigenvalue_tracks(
            [r["step"] for r in rows],
            [r["top"] for r in rows],
            [r["bottom"] for r in rows],
            loss=[r["loss"] for r in rows],
            title=f"{out['model']} ({out['params']:,} parameters), {name}",
            path=path,
        )
        paths.append(path)
        subs = reg.get("subsets")
        if not subs:
            continue
        fig = Figure(figsize=(6.5, 4.0), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        m = [s["examples"] for s in subs]
        for end, color in (("top", "tab:blue"), ("bottom", "tab:red")):
            label = "LA" if end == "top" else "SA"
            ax.plot(
                m,
                [s[end]["max_rel_err"] for s in subs],
                "o-",
                color=color,
                label=f"{label} eigenvalue error",
            )  # noqa: E501
            ax.plot(
                m,
                [s[end]["max_rayleigh_rel_err"] for s in subs],
                "s--",
                color=color,
                label=f"{label} subset vector's Rayleigh quotient on the full set",
            )  # noqa: E501
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("examples in the subset")
        ax.set_ylabel("relative error against the full set")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        ax.set_title(f"Subset Hessians, {out['model']}, last checkpoint")
        path = stem.parent / f"{stem.name}-subsets.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", choices=["cnn", "lenet"], default="cnn")
    p.add_argument("--k", type=int, default=3, help="pairs per end (BE solves 2k)")
    p.add_argument("--checkpoints", default="0,100,500,2000")
    p.add_argument("--max-matvecs", type=int, default=300)
    p.add_argument("--chunk", type=int, default=599)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-noise", type=float, default=0.3)
    p.add_argument("--fracs", default="0.05,0.1,0.25,0.5,1.0")
    p.add_argument("--grid", type=int, default=200, help="step sizes per direction")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument(
        "--regimes",
        default="memorising,label noise",
        help="comma-separated subset of 'memorising,label noise'",
    )
    p.add_argument("--name", default="", help="suffix of the output files' stem")
    p.add_argument(
        "--subsets-regime",
        default="memorising",
        choices=["memorising", "label noise"],
        help="the regime whose last checkpoint gets the subset curve",
    )
    p.add_argument(
        "--figures", metavar="JSON", help="only redraw the figures and markdown of a saved run"
    )
    args = p.parse_args(argv)
    regimes = {r.strip() for r in args.regimes.split(",") if r.strip()}
    if not regimes or regimes - {"memorising", "label noise"}:
        p.error(f"--regimes: expected a subset of 'memorising,label noise', got {args.regimes!r}")
    if args.figures:
        saved = pathlib.Path(args.figures)
        out = json.loads(saved.read_text())
        saved.with_suffix(".md").write_text(to_markdown(out))
        for path in figures(out, saved.with_suffix("")):
            print(path)
        return out
    if args.quick:
        args.model, args.k, args.checkpoints, args.max_matvecs = "cnn", 2, "0,60", 80
        args.grid, args.label_noise = 40, 0.3
        args.chunk, args.fracs, n = 100, "0.25", 200
    else:
        n = None
    args.fracs = [float(f) for f in args.fracs.split(",") if f]
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    size = 28 if args.model == "lenet" else None
    data = load_digits(n, size=size)
    module = LinenLeNet() if args.model == "lenet" else LinenCNN()
    dim = hk.tree_dim(module.init(jax.random.key(0), data.x[:1]))
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "model": args.model,
        "params": dim,
        "examples": int(data.y.shape[0]),
        "command": "python benchmarks/paper.py " + shlex.join(argv if argv is not None else []),
        "meta": {"quick": args.quick, "backend": jax.default_backend()},
        "args": {k: v for k, v in vars(args).items()},
        "regimes": {},
    }
    outdir = pathlib.Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.name}" if args.name else ""
    stem = outdir / f"paper-{args.model}{'-quick' if args.quick else ''}{suffix}"
    path = stem.with_suffix(".json")
    if "memorising" in regimes:
        run_regime("memorising", module, data, args, checkpoints, out, path, 0.0)
    if "label noise" in regimes and args.label_noise > 0:
        run_regime("label noise", module, data, args, checkpoints, out, path, args.label_noise)
    out["total_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(out, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(out))
    figures(out, stem)
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
