r"""Adam's preconditioner against the Hessian diagonal along training (seed 002, section 6).

The claim under test: Adam's second moment :math:`v_t` "approximates the Hessian's diagonal",
so :math:`\alpha/\sqrt{v_t}` scales each coordinate inversely with its curvature. At checkpoints
of an Adam run (batch 32, ``optax.adam``), :func:`hesskit.adam_hessian_agreement` compares
:math:`\sqrt{\hat v_t}` (bias-corrected), layer by layer (a kernel with its bias), with

- ``|diag H|``: Hutchinson's estimate of the Hessian diagonal of the mean loss,
- ``diag GGN``: the same on the generalized Gauss-Newton matrix (``hesskit.ggn_operator``),
- ``empirical Fisher``: the mean of squared per-example gradients,
- ``sqrt E[g_B^2]``: the root of the expected squared minibatch gradient *at the checkpoint*
  (full gradient squared plus the empirical Fisher's variance over the batch size),

by Spearman's rank correlation and the Pearson correlation of ``log10`` values (both blind to a
per-layer scale and to a power, so ``sqrt(v)`` and ``v`` score alike), the median
``log10(sqrt(v)/|d|)`` (scale), its median absolute deviation (the disagreement no single
per-layer scale removes, in decades) and the log-log slope (1: ``sqrt(v) ~ |d|``; 0.5:
``v ~ |d|``). Each Hutchinson diagonal is formed as two independent halves of its probes; from
the log correlation ``R`` of one half with the other (``reliability``), ``sqrt(2R/(1+R))`` is
the ceiling for any log correlation with that noisy estimate. The JSON and markdown are
rewritten after every checkpoint, so an interrupted run keeps what finished.

Problems: the digits CNN (3,658 parameters, all 1,797 8x8 digits; curvature on all of them)
and the 3.3M-parameter LeNet (``LinenLeNet``, the digits resized to 28x28, trained on all
1,797; curvature on a fixed subset of the first ``--lenet-curv`` examples, fewer checkpoints and
probes, because one Hessian product on 256 of its inputs takes seconds on a loaded 2-core CPU).
The committed run took 36 minutes on 2 cores shared with other jobs (load average about 9):
the CNN 4, the LeNet's 800 training steps 18 and its three diagnostics 14;
``--lenet-checkpoints 20 200`` stops after about half of that.

Usage::

    nice -n 10 python benchmarks/adam.py      # both problems; saves results/adam-<backend>.*
    python benchmarks/adam.py --quick          # the CNN only, tiny budget (the test)
    python benchmarks/adam.py --problems cnn
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import numpy as np
import optax

import hesskit as hk
from hesskit.examples import load_digits, make_classifier, make_loss

RESULTS = pathlib.Path(__file__).parent / "results"
BATCH = 32
REFS = ("|diag H|", "diag GGN", "empirical Fisher", "sqrt E[g_B^2]")


def problems(args) -> dict:
    """Name -> settings; ``--quick`` shrinks everything to seconds."""
    if args.quick:
        return {
            "cnn": dict(
                title="digits CNN (quick: 256 digits)", model="cnn", size=None, n_train=256,
                n_curv=256, checkpoints=[5, 20], probes=8, lr=1e-3, probe_chunk=4,
            )
        }  # fmt: skip
    table = {
        "cnn": dict(
            title="digits CNN, 3,658 parameters, all 1,797 digits (curvature on all)",
            model="cnn", size=None, n_train=1797, n_curv=1797,
            checkpoints=[10, 100, 500, 1500, 3000], probes=args.cnn_probes, lr=1e-3,
            probe_chunk=25,
        ),
        "lenet": dict(
            title=(
                f"LeNet, 3.3M parameters, all 1,797 digits at 28x28 (curvature on a fixed "
                f"subset of {args.lenet_curv})"
            ),
            model="lenet", size=28, n_train=1797, n_curv=args.lenet_curv,
            checkpoints=args.lenet_checkpoints, probes=args.lenet_probes, lr=1e-3, probe_chunk=5,
        ),
    }  # fmt: skip
    return {k: table[k] for k in args.problems}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_scan(loss, opt, params, state, data, keys):
    # loss and opt are static: one compile per segment length, not one per checkpoint.
    n = data.y.shape[0]

    def step(carry, k):
        p, s = carry
        idx = jax.random.choice(k, n, (BATCH,), replace=False)
        val, g = jax.value_and_grad(loss)(p, jax.tree_util.tree_map(lambda a: a[idx], data))
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), val

    (params, state), losses = jax.lax.scan(step, (params, state), keys)
    return params, state, losses


def run_problem(name: str, cfg: dict, seed: int, log, on_checkpoint=None) -> dict:
    data = load_digits(cfg["n_train"], seed=seed, size=cfg["size"])
    curv = jax.tree_util.tree_map(lambda a: a[: cfg["n_curv"]], data)
    init_key, train_key, probe_key = jax.random.split(jax.random.key(seed), 3)
    module, params = make_classifier(cfg["model"], key=init_key, sample=data.x[:1], api="linen")
    loss = make_loss(module)

    def model_fn(p, batch):
        return module.apply(p, batch.x)

    def output_loss(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

    opt = optax.adam(cfg["lr"])
    state = opt.init(params)
    full_loss = jax.jit(loss)
    t, train_losses, records = 0, [], []
    result = {
        "title": cfg["title"],
        "num_params": hk.tree_dim(params),
        "n_train": cfg["n_train"],
        "n_curvature": cfg["n_curv"],
        "probes": cfg["probes"],
        "lr": cfg["lr"],
        "batch": BATCH,
        "train_loss": train_losses,
        "checkpoints": records,
    }
    log(f"[{name}] {hk.tree_dim(params)} parameters; {cfg['title']}")
    for c in cfg["checkpoints"]:
        keys = jax.random.split(jax.random.fold_in(train_key, t), c - t)
        t0 = time.perf_counter()
        params, state, losses = _train_scan(loss, opt, params, state, data, keys)
        train_losses.extend(np.asarray(losses).tolist())
        train_s = time.perf_counter() - t0
        t = c
        t0 = time.perf_counter()
        res = hk.adam_hessian_agreement(
            loss, params, state, curv, jax.random.fold_in(probe_key, t),
            model_fn=model_fn, output_loss_fn=output_loss, num_probes=cfg["probes"],
            groups="module", batch_size=BATCH, probe_chunk=cfg["probe_chunk"],
            chunk_size=16 if cfg["model"] == "lenet" else 64,
        )  # fmt: skip
        rec = {
            "step": t,
            "loss": float(full_loss(params, data)),
            "train_s": train_s,
            "diagnostic_s": time.perf_counter() - t0,
            **res.to_dict(),
        }
        records.append(rec)
        sp = rec["overall_spearman"]
        log(
            f"[{name}] step {t:>5}  loss {rec['loss']:.4f}  overall Spearman "
            + "  ".join(f"{r} {sp[r]:+.2f}" for r in REFS)
            + f"  ({rec['diagnostic_s']:.0f} s)"
        )
        if on_checkpoint is not None:
            on_checkpoint(name, result)
    return result


def _md(ref: str) -> str:
    # A pipe inside a cell would end it.
    return ref.replace("|", "\\|")


def _f(x, spec=".2f") -> str:
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def markdown(results: dict, cmd: str, total: float, backend: str) -> str:
    lines = [
        f"# Adam's sqrt(v) against the Hessian diagonal ({backend})",
        "",
        f"`{cmd.strip()}`, {total:.0f} s. Adam (optax defaults, lr 1e-3, batch {BATCH}); sqrt(v) "
        "is bias-corrected. Per layer (kernel and bias together): Spearman rank correlation "
        "(ρ_s) and Pearson correlation of log10 values (r_log) of sqrt(v) with each diagonal's "
        "absolute value; ceiling = sqrt(2R/(1+R)), R the r_log of one half of the Hutchinson "
        "probes against the other: the largest r_log anything can reach against that noisy "
        "estimate; ratio = median log10(sqrt(v)/|d|) "
        "(decades); spread = its median absolute deviation (decades left after the best "
        "per-layer scale); slope = log-log slope (1: sqrt(v) ∝ |d|, 0.5: v ∝ |d|).",
        "",
    ]
    for res in results.values():
        lines += [
            f"## {res['title']}",
            "",
            f"{res['num_params']:,} parameters; Hutchinson diagonals with {res['probes']} "
            f"probes each ({res['probes'] // 2} + {res['probes'] // 2}) on {res['n_curvature']} "
            "examples.",
            "",
            "Overall (all entries), ρ_s / r_log:",
            "",
            "| step | loss | " + " | ".join(map(_md, REFS)) + " |",
            "|---:|---:|" + "---:|" * len(REFS),
        ]
        for c in res["checkpoints"]:
            cells = [
                f"{_f(c['overall_spearman'][r])} / {_f(c['overall_pearson_log'][r])}" for r in REFS
            ]
            lines.append(f"| {c['step']} | {c['loss']:.4f} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Per layer, ρ_s / r_log (ceiling) at each checkpoint:",
            "",
            "| step | layer | n | " + " | ".join(map(_md, REFS)) + " |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in res["checkpoints"]:
            for i, layer in enumerate(c["names"]):
                cells = []
                for r in REFS:
                    cell = f"{_f(c['spearman'][r][i])} / {_f(c['pearson_log'][r][i])}"
                    ceil = c["ceiling"][r][i]
                    if ceil is not None and np.isfinite(ceil):
                        cell += f" ({_f(ceil)})"
                    cells.append(cell)
                lines.append(
                    f"| {c['step']} | `{layer}` | {c['sizes'][i]} | " + " | ".join(cells) + " |"
                )
        last = res["checkpoints"][-1]
        lines += [
            "",
            f"Scale at the last checkpoint (step {last['step']}), ratio / spread / slope:",
            "",
            "| layer | " + " | ".join(map(_md, REFS)) + " |",
            "|---|" + "---:|" * len(REFS),
        ]
        for i, layer in enumerate(last["names"]):
            cells = [
                f"{_f(last['log_ratio'][r][i], '+.2f')} / {_f(last['spread'][r][i])} / "
                f"{_f(last['log_slope'][r][i])}"
                for r in REFS
            ]
            lines.append(f"| `{layer}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CNN on 256 digits, 2 checkpoints")
    parser.add_argument("--problems", nargs="+", default=["cnn", "lenet"], choices=["cnn", "lenet"])
    parser.add_argument("--cnn-probes", type=int, default=60, help="Hutchinson probes (CNN)")
    parser.add_argument("--lenet-probes", type=int, default=20, help="Hutchinson probes (LeNet)")
    parser.add_argument("--lenet-curv", type=int, default=256, help="LeNet curvature examples")
    parser.add_argument(
        "--lenet-checkpoints", type=int, nargs="+", default=[20, 200, 800], help="LeNet steps"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="folder for the tables and plot")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    backend = jax.default_backend()
    cmd = "python benchmarks/adam.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"adam-{backend}{'-quick' if args.quick else ''}"
    results: dict = {}

    def save(name: str | None = None, res: dict | None = None, final: bool = False) -> str:
        if name is not None:
            results[name] = res
        total = time.perf_counter() - t_start
        md = markdown(results, cmd, total, backend)
        meta = {"command": cmd.strip(), "seconds": total, "backend": backend}
        meta.update(jax=jax.__version__, complete=final)
        payload = {"meta": meta, "problems": results}
        # NaN (a constant layer, an empty overlap) is written as null: strict JSON.
        stem.with_suffix(".json").write_text(
            json.dumps(_nan_to_none(payload), indent=1, allow_nan=False)
        )
        stem.with_suffix(".md").write_text(md + "\n")
        return md

    for name, cfg in problems(args).items():
        results[name] = run_problem(
            name, cfg, args.seed, lambda s: print(s, flush=True), on_checkpoint=save
        )
    print(save(final=True))

    from hesskit import plots

    for name, res in results.items():
        steps = [c["step"] for c in res["checkpoints"]]
        plots.plot_preconditioner_agreement(
            steps,
            res["checkpoints"],
            title=f"{name}: Adam's sqrt(v) against diagonal curvature, per layer",
            path=f"{stem}-{name}.png",
        )
    return results


def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


if __name__ == "__main__":
    main()
