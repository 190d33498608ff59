"""The Hessian of a byte-level language model: HVP cost and memory, eigsh and the spectral density.

The model is :class:`hesskit.examples.Transformer` (GPT-2's architecture: pre-LayerNorm blocks,
causal :func:`jax.nn.dot_product_attention`, GELU MLP, tied embeddings) on bytes of the Python
standard library's own source (:func:`hesskit.examples.load_stdlib_corpus`: no download). The
script trains it briefly (optax AdamW), then on one fixed batch of ``--batch`` windows of
``--context`` tokens measures, side by side in one run:

* a jitted gradient, a jitted HVP (:func:`hesskit.hvp`, forward-over-reverse from scratch, as
  one product of ``hk.hessian_operator`` runs), and a linearized product inside a ``fori_loop``
  (what hesskit's solvers pay per product): median times, compile times, and each one's peak
  memory, from
  ``jax.jit(...).lower(...).compile().memory_analysis()`` (arguments + outputs + XLA
  temporaries) and, on accelerators, from the device's ``memory_stats()``;
* ``hk.eigsh`` LA(10), SA(3) and BE(6): products, wall time, compile time, converged pairs;
* ``hk.spectral_density`` (stochastic Lanczos quadrature);
* the goals of the GPU target (GPT-2 small at 4 x 1024 tokens on one H100/H200: LA(10) and SA(3)
  each within 300 products and 3 minutes including compilation, an HVP at most 2.5 gradients)
  against the measured numbers.

``--compile-check`` also lowers and compiles (never runs) the gradient and the HVP of GPT-2
small at ``--check-batch`` x ``--check-context`` tokens from abstract parameters (nothing is
allocated) and records their memory analysis: the check that the large configuration builds on
a machine that cannot run it.

Nothing here assumes a CPU: arrays go to JAX's default device, and the run records
``jax.devices()``. Usage::

    python benchmarks/transformer.py --compile-check   # tiny model; results/transformer-<backend>
    python benchmarks/transformer.py --quick           # smaller still (run by the test suite)
    python benchmarks/transformer.py --config gpt2-small --batch 4 --context 1024   # one GPU
    python benchmarks/transformer.py --config gpt2-small --batch 4 --context 1024 --bf16
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import hesskit as hk
from hesskit.examples import (
    TransformerConfig,
    load_stdlib_corpus,
    make_lm_loss,
    make_transformer,
    sample_windows,
)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from scale import device_peak_bytes, result_row, run_once  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
PROBLEMS = {"LA(10)": ("LA", 10), "SA(3)": ("SA", 3), "BE(6)": ("BE", 6)}
GOALS = {"products": 300, "seconds": 180.0, "hvp_over_grad": 2.5}
GOAL_SETTING = "gpt2-small, 4 x 1024 tokens, one H100/H200"

# Per configuration: batch, context, training steps, learning rate.
DEFAULTS = {
    "tiny": {"batch": 8, "context": 64, "steps": 300, "lr": 3e-3},
    "gpt2-small": {"batch": 4, "context": 1024, "steps": 100, "lr": 6e-4},
}
QUICK = {"batch": 2, "context": 32, "steps": 20}


def model_config(name: str, context: int, precision: str) -> TransformerConfig:
    """The named configuration, for windows of ``context`` tokens.

    The model keeps its own position table (64 for tiny, 1024 for GPT-2 small), so its
    parameter count does not depend on the window; a tiny model grows its table for longer
    windows, GPT-2 small refuses them.
    """
    if name == "tiny":
        cfg = TransformerConfig.tiny()
        cfg = TransformerConfig.tiny(context=max(cfg.context, context))
    else:
        cfg = TransformerConfig.gpt2_small()
        if context > cfg.context:
            msg = f"GPT-2 small's context is at most {cfg.context}, got {context}."
            raise ValueError(msg)
    if precision == "bf16":
        return cfg.bf16()
    if precision == "mixed":
        return cfg.bf16(params=False)
    return cfg


# -- Measurement helpers ---------------------------------------------------------------------


def device_bytes_in_use() -> int | None:
    """The default device's bytes in use now, or None where not reported (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (a backend without the query)
        return None
    return None if not stats else stats.get("bytes_in_use")


def memory_row(exe: Any) -> dict:
    """XLA's memory analysis of a compiled executable, and its peak as the sum of its parts."""
    try:
        m = exe.memory_analysis()
    except Exception as err:  # noqa: BLE001  (a backend without the analysis)
        return {"error": repr(err)}
    if m is None:
        return {"error": "memory_analysis() returned None"}
    row = {
        name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }
    # Aliased outputs reuse argument buffers, so they are counted once.
    row["peak_bytes"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    return row


def compile_all(cases: list[tuple[str, Callable, tuple, int]]) -> dict[str, dict]:
    """Lower and compile each ``jit(fn)`` once: executable, compile seconds, memory analysis."""
    out = {}
    for name, fn, args, per in cases:
        print(f"  {name} ...", flush=True)
        t0 = time.perf_counter()
        exe = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(exe(*args))  # the first run pays one-off transfers and allocation
        out[name] = {
            "exe": exe,
            "args": args,
            "per": per,
            "compile_s": compile_s,
            "memory": memory_row(exe),
            "device_peak_bytes": device_peak_bytes(),
            "device_bytes_in_use_after": device_bytes_in_use(),
        }
    return out


def interleaved_ms(compiled: dict[str, dict], repeats: int) -> dict[str, float]:
    """Median milliseconds per product of each executable, timed in alternation.

    One call of each per round, ``repeats`` rounds: on a shared or throttling machine a slow
    stretch then slows every case alike instead of whichever ran during it.
    """
    runs: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c["exe"](*c["args"]))
            runs[name].append((time.perf_counter() - t0) / c["per"])
    return {name: 1e3 * statistics.median(r) for name, r in runs.items()}


# -- The parts --------------------------------------------------------------------------------


def train(loss, params, tokens, cfg, *, batch: int, steps: int, lr: float, key) -> tuple:
    """``steps`` AdamW steps on fresh windows; returns the parameters and a summary."""
    # A warm-up: Adam's first steps at full rate throw GPT-2 small's loss up (5.5 -> 6.4 nats
    # in two steps at 6e-4), and a short run may not recover before the Hessian is measured.
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    state = opt.init(params)

    @jax.jit
    def step(params, state, tokens, key):
        windows = sample_windows(tokens, key, batch, cfg.context)
        value, grads = jax.value_and_grad(loss)(params, windows)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        params, state, value = step(params, state, tokens, jax.random.fold_in(key, i))
        if i == 0 or i == steps - 1 or (i + 1) % max(1, steps // 10) == 0:
            losses.append((i + 1, float(value)))
    seconds = time.perf_counter() - t0
    summary = {"steps": steps, "lr": lr, "warmup": warmup, "schedule": "warmup, cosine to lr/10"}
    return params, {**summary, "seconds": seconds, "losses": losses}


def product_costs(loss, params, batch, *, repeats: int, loop_n: int) -> dict:
    """Gradient, HVP, operator product and in-loop linearized product: time and memory."""
    v = hk.tree_random_sphere(jax.random.key(1), params)
    op = hk.hessian_operator(loss, params, batch)

    def in_loop(op, v):
        lin = op.linearize()
        return jax.lax.fori_loop(0, loop_n, lambda i, w: hk.tree_normalize(lin(w))[0], v)

    cases = [
        ("grad", jax.grad(loss), (params, batch), 1),
        ("hvp (jit, from scratch)", lambda p, b, v: hk.hvp(lambda q: loss(q, b), p, v),
         (params, batch, v), 1),
        (f"linearized product (fori_loop of {loop_n})", in_loop, (op, v), loop_n),
    ]  # fmt: skip
    compiled = compile_all(cases)
    ms = interleaved_ms(compiled, repeats)
    rows = {}
    for name, c in compiled.items():
        rows[name] = {k: v for k, v in c.items() if k not in ("exe", "args", "per")}
        rows[name]["ms"] = ms[name]
        rows[name]["ratio_to_grad"] = ms[name] / ms["grad"]
    return {"mode": op.mode, "repeats": repeats, "rows": rows}


def krylov_dim_used(op, k: int, which: str, max_matvecs: int) -> int | None:
    """The basis size eigsh picks by default here (it shrinks with free memory), if visible."""
    try:
        from hesskit._src.thick_restart import _default_krylov_dim

        return int(_default_krylov_dim(k, which, op.dim, max_matvecs, op.like))
    except Exception:  # noqa: BLE001  (a private helper; absent on other versions)
        return None


def eigsh_rows(op, problems, *, max_matvecs: int, tol: float | None, seed: int) -> dict:
    rows = {}
    for label in problems:
        which, k = PROBLEMS[label]
        print(f"  eigsh {label} ...", flush=True)
        kwargs = {"max_matvecs": max_matvecs}
        if tol is not None:
            kwargs["tol"] = tol
        basis = krylov_dim_used(op, k, which, max_matvecs)
        try:
            res, wall, compile_s = run_once(
                lambda which=which, k=k, kw=kwargs: hk.eigsh(
                    op, jax.random.key(seed), k, which=which, **kw
                )
            )
        except Exception as err:  # noqa: BLE001  (an out-of-memory on a device, say)
            rows[label] = {"error": f"{type(err).__name__}: {str(err)[:500]}", "k": k}
            continue
        row = result_row(res, wall, compile_s, k)
        row.update(
            which=which,
            max_matvecs=max_matvecs,
            krylov_dim=basis,
            total_s=wall + compile_s,
            device_peak_bytes=device_peak_bytes(),
        )
        rows[label] = row
    return rows


def slq_row(op, *, num_runs: int, num_iters: int, seed: int) -> dict:
    print("  spectral_density ...", flush=True)
    try:
        dens, wall, compile_s = run_once(
            lambda: hk.spectral_density(
                op, jax.random.key(seed), num_runs=num_runs, num_iters=num_iters
            )
        )
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    grid, density = np.asarray(dens.grid, np.float64), np.asarray(dens.density, np.float64)
    nodes, weights = np.asarray(dens.nodes, np.float64), np.asarray(dens.weights, np.float64)
    mass = weights / max(weights.sum(), 1e-300)
    # Every 10th grid point keeps the JSON small and the curve plottable.
    return {
        "num_runs": num_runs,
        "num_iters": num_iters,
        "products": num_runs * num_iters,
        "wall_s": wall,
        "compile_s": compile_s,
        "min_node": float(nodes.min()),
        "max_node": float(nodes.max()),
        "negative_mass": float(mass[nodes < 0].sum()),
        "grid": grid[::10].tolist(),
        "density": density[::10].tolist(),
        "device_peak_bytes": device_peak_bytes(),
    }


def compile_check(precision: str, batch: int, context: int) -> dict:
    """Lower and compile GPT-2 small's gradient and HVP from abstract parameters; no run."""
    cfg = model_config("gpt2-small", context, precision)  # 1024 positions, 128-token windows
    model, params = make_transformer(cfg, abstract=True)
    loss = make_lm_loss(model)
    tokens = jax.ShapeDtypeStruct((batch, context + 1), jnp.int32)
    out = {
        "config": "gpt2-small",
        "params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
        "formula": cfg.num_params(),
        "batch": batch,
        "context": context,
        "precision": precision,
    }
    for name, fn, args in [
        ("grad", jax.grad(loss), (params, tokens)),
        ("hvp", lambda p, b, v: hk.hvp(lambda q: loss(q, b), p, v), (params, tokens, params)),
    ]:
        print(f"  compile check: gpt2-small {name} at {batch}x{context} ...", flush=True)
        t0 = time.perf_counter()
        exe = jax.jit(fn).lower(*args).compile()
        out[name] = {"compile_s": time.perf_counter() - t0, "memory": memory_row(exe)}
    return out


# -- Tables -----------------------------------------------------------------------------------


def _bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b} B"


def goal_rows(out: dict) -> list[tuple[str, str, str, str]]:
    """``(goal, target, measured, met)`` for the GPU target, whatever this run's setting."""
    rows = []
    hvp = out.get("products", {}).get("rows", {}).get("hvp (jit, from scratch)")
    if hvp is not None:
        ratio = hvp["ratio_to_grad"]
        rows.append(("HVP / gradient", f"<= {GOALS['hvp_over_grad']}", f"{ratio:.2f}",
                     ratio <= GOALS["hvp_over_grad"]))  # fmt: skip
    for label in ("LA(10)", "SA(3)"):
        r = out.get("eigsh", {}).get(label, {})
        if "products" not in r:
            rows.append((f"{label}", "", r.get("error", "not run"), False))
            continue
        conv = f"{r['converged']}/{r['k']} converged"
        rows.append((f"{label} products", f"<= {GOALS['products']} ({conv})", str(r["products"]),
                     r["products"] <= GOALS["products"] and r["converged"] == r["k"]))  # fmt: skip
        rows.append((f"{label} wall + compile", f"<= {GOALS['seconds']:.0f} s",
                     f"{r['total_s']:.1f} s", r["total_s"] <= GOALS["seconds"]))  # fmt: skip
    return [(g, t, m, "yes" if ok else "no") for g, t, m, ok in rows]


def to_markdown(out: dict) -> str:
    meta, run = out["meta"], out["run"]
    lines = [
        f"# Hessian of a byte-level transformer ({meta['backend']}, {meta['device']})",
        "",
        f"jax {meta['jax']}, flax {meta['flax']}, {meta['date']}, devices {meta['devices']}, "
        f"quick={meta['quick']}, {meta['total_s']:.0f} s in all.",
        "",
        f"Command: `python benchmarks/transformer.py {' '.join(meta['argv'])}`",
        "",
        f"Model: `{run['config']}` ({run['precision']}), {run['params']:,} parameters "
        f"(tied embeddings, vocabulary {run['vocab_size']} bytes, {run['layers']} layers, width "
        f"{run['width']}, {run['heads']} heads, {run['positions']} positions); fixed batch "
        f"{run['batch']} x {run['context']} tokens of the stdlib corpus "
        f"({run['corpus_bytes']:,} bytes). HVP mode `{run.get('hvp_mode', 'n/a')}`; "
        + (
            "the Hessian over one raveled vector (`--flat`)."
            if run.get("flat")
            else "the Hessian over the parameter pytree as it is."
        ),  # fmt: skip
        "",
    ]
    if "stage" in meta:
        lines += [f"**Incomplete run**: saved after {meta['stage']}.", ""]
    tr = out.get("train")
    if tr and tr["losses"]:
        first, last = tr["losses"][0][1], tr["losses"][-1][1]
        lines += [
            f"Training: {tr['steps']} AdamW steps (lr {tr['lr']}, {tr['warmup']} warm-up steps, "
            f"cosine decay to lr/10), {tr['seconds']:.1f} s, loss "
            f"{first:.3f} -> {last:.3f} nats/byte; loss on the fixed batch {run['loss']:.3f}.",
            "",
        ]
    lines += [
        f"## Goals ({GOAL_SETTING}) against this run ({run['config']}, {run['batch']} x "
        f"{run['context']}, {meta['backend']})",
        "",
        "| goal | target | measured | met |",
        "|---|---|---:|---|",
        *[f"| {g} | {t} | {m} | {ok} |" for g, t, m, ok in goal_rows(out)],
        "",
        "## Products: time and peak memory",
        "",
        "Peak = arguments + outputs - aliased + XLA temporaries (`memory_analysis()`); the device "
        "peak is the allocator's lifetime high-water mark after the call (accelerators only).",
        "",
        f"Medians of {out.get('products', {}).get('repeats')} rounds, the cases timed in "
        "alternation.",
        "",
        "| what | ms | / grad | compile s | peak (XLA) | temporaries | device peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out.get("products", {}).get("rows", {}).items():
        m = r["memory"]
        lines.append(
            f"| {name} | {r['ms']:.2f} | {r['ratio_to_grad']:.2f} | {r['compile_s']:.1f} | "
            f"{_bytes(m.get('peak_bytes'))} | {_bytes(m.get('temp'))} | "
            f"{_bytes(r['device_peak_bytes'])} |"
        )
    lines += [
        "",
        "## eigsh",
        "",
        "| problem | products | converged | wall s | compile s | total s | ms / product "
        "| basis | max rel. residual | status | eigenvalues |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, r in out.get("eigsh", {}).items():
        if "products" not in r:
            lines.append(f"| {label} | {r['error']} |  |  |  |  |  |  |  |  |  |")
            continue
        vals = ", ".join(f"{x:.4g}" for x in r["eigenvalues"])
        lines.append(
            f"| {label} | {r['products']} / {r['max_matvecs']} | {r['converged']}/{r['k']} | "
            f"{r['wall_s']:.1f} | {r['compile_s']:.1f} | {r['total_s']:.1f} | "
            f"{r['ms_per_product']:.1f} | {r['krylov_dim']} | {r['max_rel_residual']:.1e} | "
            f"{r['status']} | {vals} |"
        )
    s = out.get("slq")
    lines += ["", "## Spectral density (SLQ)", ""]
    if not s:
        lines.append("Not run.")
    elif "error" in s:
        lines.append(f"Failed: {s['error']}")
    else:
        lines.append(
            f"{s['num_runs']} runs x {s['num_iters']} Lanczos steps ({s['products']} products): "
            f"{s['wall_s']:.1f} s + {s['compile_s']:.1f} s compile; nodes in "
            f"[{s['min_node']:.4g}, {s['max_node']:.4g}], {100 * s['negative_mass']:.1f}% of "
            "the quadrature mass on negative nodes."
        )
    cc = out.get("compile_check")
    if cc:
        lines += [
            "",
            f"## Compile check: GPT-2 small ({cc['precision']}) at {cc['batch']} x "
            f"{cc['context']} tokens",
            "",
            f"{cc['params']:,} parameters from `jax.eval_shape` (formula {cc['formula']:,}); "
            "compiled from abstract parameters, not run.",
            "",
            "| what | compile s | peak (XLA) | arguments | temporaries |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in ("grad", "hvp"):
            r, m = cc[name], cc[name]["memory"]
            lines.append(
                f"| {name} | {r['compile_s']:.1f} | {_bytes(m.get('peak_bytes'))} | "
                f"{_bytes(m.get('argument'))} | {_bytes(m.get('temp'))} |"
            )
    return "\n".join(lines)


# -- Main -------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps (tests)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the json/md tables")
    parser.add_argument("--config", choices=sorted(DEFAULTS), default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="windows in the fixed batch")
    parser.add_argument("--context", type=int, default=None, help="tokens per window")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bf16", action="store_true", help="bfloat16 parameters and activations")
    group.add_argument("--mixed", action="store_true", help="float32 parameters, bf16 activations")
    parser.add_argument("--steps", type=int, default=None, help="AdamW training steps")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    parser.add_argument("--max-matvecs", type=int, default=300, help="eigsh product budget")
    parser.add_argument("--tol", type=float, default=None, help="eigsh tol (default: dtype's)")
    parser.add_argument(
        "--problems",
        default=None,
        help=f"comma-separated eigsh problems out of {','.join(PROBLEMS)}, or none (default: "
        "all; --quick: LA(10),SA(3))",
    )
    parser.add_argument("--slq-runs", type=int, default=None, help="0 skips the density")
    parser.add_argument("--slq-iters", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per product")
    parser.add_argument("--corpus-bytes", type=int, default=1 << 22)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flat",
        action="store_true",
        help="the Hessian over one raveled parameter vector (one leaf) instead of the pytree",
    )
    parser.add_argument(
        "--compile-check",
        action="store_true",
        help="also compile (not run) GPT-2 small's gradient and HVP at the check size",
    )
    parser.add_argument("--check-batch", type=int, default=1)
    parser.add_argument("--check-context", type=int, default=128)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    d = {**DEFAULTS[args.config], **(QUICK if args.quick else {})}
    batch, context = args.batch or d["batch"], args.context or d["context"]
    steps = d["steps"] if args.steps is None else args.steps
    lr = args.lr or d["lr"]
    precision = "bf16" if args.bf16 else "mixed" if args.mixed else "float32"
    repeats = args.repeats or (3 if args.quick else 30 if args.config == "tiny" else 10)
    slq_runs = (2 if args.quick else 4) if args.slq_runs is None else args.slq_runs
    slq_iters = args.slq_iters or (20 if args.quick else 60)
    max_matvecs = min(args.max_matvecs, 120) if args.quick else args.max_matvecs
    problems = args.problems or ("LA(10),SA(3)" if args.quick else ",".join(PROBLEMS))
    problems = [x.strip() for x in problems.split(",") if x.strip() not in ("", "none")]
    unknown = [x for x in problems if x not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problems {unknown}; choose from {list(PROBLEMS)}")

    folder = pathlib.Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"transformer-{jax.default_backend()}"
    name += "" if args.config == "tiny" else f"-{args.config}"
    name += "" if precision == "float32" else f"-{precision}"
    name += "-flat" if args.flat else ""
    name += "-quick" if args.quick else ""
    stem = folder / name

    cfg = model_config(args.config, context, precision)
    key = jax.random.key(args.seed)
    model, params = make_transformer(cfg, key=jax.random.fold_in(key, 0))
    loss = make_lm_loss(model)
    corpus = load_stdlib_corpus(args.corpus_bytes)
    tokens = jnp.asarray(corpus)
    dim = hk.tree_dim(params)
    print(f"{args.config} ({precision}): {dim:,} parameters on {jax.devices()}", flush=True)
    out: dict[str, Any] = {
        "meta": {
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
            "devices": [str(x) for x in jax.devices()],
            "jax": jax.__version__,
            "flax": flax.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.platform(),
            "quick": args.quick,
            "argv": argv,
        },
        "run": {
            "config": args.config,
            "precision": precision,
            "params": dim,
            "vocab_size": cfg.vocab_size,
            "layers": cfg.layers,
            "width": cfg.width,
            "heads": cfg.heads,
            "positions": cfg.context,
            "flat": args.flat,
            "batch": batch,
            "context": context,
            "tokens": batch * context,
            "corpus_bytes": int(corpus.size),
        },
        "goals": {**GOALS, "setting": GOAL_SETTING},
    }

    def save(stage: str | None) -> str:
        # Saved after every part, so a run cut short by a time limit keeps what it measured.
        out["meta"]["total_s"] = time.perf_counter() - start
        if stage is None:
            out["meta"].pop("stage", None)
        else:
            out["meta"]["stage"] = stage
        fields = ("goal", "target", "measured", "met")
        out["goal_rows"] = [dict(zip(fields, r, strict=True)) for r in goal_rows(out)]
        md = to_markdown(out)
        stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
        stem.with_suffix(".md").write_text(md + "\n")
        return md

    print(f"training {steps} steps ...", flush=True)
    params, out["train"] = train(
        loss, params, tokens, cfg, batch=batch, steps=steps, lr=lr, key=jax.random.fold_in(key, 1)
    )
    fixed = sample_windows(tokens, jax.random.fold_in(key, 2), batch, context)
    out["run"]["loss"] = float(jax.jit(loss)(params, fixed))
    save("training")

    print("products ...", flush=True)
    hloss, hparams = loss, params
    if args.flat:
        # One leaf: the solvers' per-leaf work (and compiled program) does not grow with the
        # model's ~150 arrays; each product pays one ravel and one unravel.
        hparams, unravel = ravel_pytree(params)

        def hloss(z, batch):
            return loss(unravel(z), batch)

    out["products"] = product_costs(
        hloss, hparams, fixed, repeats=repeats, loop_n=3 if args.quick else 10
    )
    out["run"]["hvp_mode"] = out["products"]["mode"]
    save("products")
    op = hk.hessian_operator(hloss, hparams, fixed)
    out["eigsh"] = {}
    for label in problems:
        out["eigsh"].update(
            eigsh_rows(op, [label], max_matvecs=max_matvecs, tol=args.tol, seed=args.seed + 3)
        )
        save(f"eigsh {label}")
    if slq_runs > 0:
        out["slq"] = slq_row(op, num_runs=slq_runs, num_iters=slq_iters, seed=args.seed + 4)
        save("spectral density")
    if args.compile_check:
        out["compile_check"] = compile_check(precision, args.check_batch, args.check_context)
    md = save(None)
    print(md)
    out["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    return out


if __name__ == "__main__":
    main()
