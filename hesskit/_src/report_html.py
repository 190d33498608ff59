"""The curvature report as one self-contained HTML page (``report.html`` next to ``report.md``).

Same content as the markdown summary: the run's settings, a short guide to reading it, and per
model the checkpoint table, the final-point numbers, the directional table, the findings and
the figures. The figures are embedded as base64 ``data:`` PNG URIs and the styles are inline,
so the page can be mailed or attached as a single file and opens with no network. Standard
library only (``html``, ``base64``).
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { margin-top: 2.2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.guide { background: #f6f8fa; border-left: 4px solid #4a7bd0; padding: .4em 1.2em; }
.findings li { margin: .3em 0; }
.warn { color: #a33; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""

_GUIDE = [
    "<b>λ_max and λ_min</b> are the largest and the most negative eigenvalues of the Hessian of "
    "the mean training loss, found by Lanczos (LA(k) and SA(k): the k largest and k smallest). "
    "A negative λ_min means there are directions in which the loss curves downward.",
    "<b>gᵀHg / gᵀg</b> is the curvature along the gradient; gradient descent with learning rate "
    "η is stable along a direction of curvature λ only when η &lt; 2/λ.",
    "<b>point</b> classifies each checkpoint (minimum, maximum, strict saddle, degenerate, or not "
    "critical when the gradient norm is above the tolerance).",
    "<b>α*</b> is the step along an eigenvector (in the descent direction) that lowers the loss "
    "most on the grid. For a quadratic loss α* = 1/λ, so α*·λ ≈ 1 along positive directions "
    "means the quadratic model is right; along negative directions the model has no minimum and "
    "α* shows how far the descent really goes.",
    "The <b>subset</b> line compares the eigenpairs of the Hessian on a small fixed fraction of "
    "the data with the full ones (relative eigenvalue differences and the angles between matched "
    "eigenvectors): small angles mean a cheap subset Hessian can stand in for the full one.",
    "<b>Adam against the Hessian</b> tests the reading of Adam's second moment v as a diagonal "
    "curvature estimate: per layer, how well √v ranks the coordinates like |diag H|, the "
    "Gauss-Newton diagonal, the empirical Fisher (squared per-example gradients) and the "
    "expected squared minibatch gradient, and how far apart the scales are.",
    "The figures: training loss, the eigenvalue tracks over training, the spectral density at the "
    "end (stochastic Lanczos quadrature), the loss along the sharpest and the most negative "
    "eigenvector against its quadratic model, the best decrease and step per direction, and "
    "the Adam correlations over training.",
]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _finding(line: str) -> str:
    # The findings are markdown bullet lines of plain text; drop the bullet, escape the rest.
    return f"<li>{_e(line.removeprefix('- '))}</li>"


def _image(path: str, alt: str) -> str:
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
        f"<figcaption>{_e(alt)}</figcaption></figure>"
    )


def render_html(report: dict, out_dir: str) -> str:
    """The report page as a string; figures are read from ``out_dir/<model>/<file>``.

    Args:
        report: the dictionary :func:`hesskit._src.report.run_report` builds (the content of
            ``report.json`` before conversion).
        out_dir: the report folder, where each model's figures were written.

    Returns:
        A complete HTML document with every figure that ``report.md`` references embedded.
    """
    from hesskit._src.report import (
        _adam_findings,
        _adam_intro,
        _adam_rows,
        _findings,
        _fmt,
        _list,
        _optimizer_name,
    )

    cfg = report["config"]
    body = [
        "<h1>hesskit curvature report</h1>",
        f"<p>Digits subset of {_e(cfg['subset'])} examples, seed {_e(cfg['seed'])}, "
        f"{_e(cfg['steps'])} {_optimizer_name(cfg)} steps (batch {_e(cfg['batch_size'])}, "
        "learning rate "
        f"{_e(cfg['lr'])}), k = {_e(cfg['k'])}. The Hessian is that of the mean loss over the "
        f"whole subset. Every number is in <code>report.json</code>. Wall time "
        f"{report['seconds']:.1f} s on {_e(report['backend'])} "
        f"(jax {_e(report.get('jax_version', '?'))}).</p>",
        '<div class="guide"><h3>How to read this</h3><ul>',
        *(f"<li>{g}</li>" for g in _GUIDE),
        "</ul></div>",
    ]
    for res in report["models"]:
        name = res["model"]
        fin = res["final"]
        body.append(f'<h2 id="{_e(name)}">{_e(name)} ({_e(res["num_params"])} parameters)</h2>')
        rows = []
        for c in res["checkpoints"]:
            point = c["classification"] + ("" if c["converged"] else " (not converged)")
            rows.append(
                [
                    str(c["step"]),
                    _fmt(c["loss"]),
                    _fmt(c["grad_norm"]),
                    _fmt(c["g_curvature"]),
                    _fmt(c["lambda_max"]),
                    _fmt(c["lambda_min"]),
                    str(c["num_matvecs"]),
                    point,
                ]
            )
        header = ["step", "loss", "gradient norm", "gᵀHg / gᵀg", "λ_max", "λ_min", "HVPs", "point"]
        body.append(_table(header, rows, numeric=set(range(7))))
        last = res["checkpoints"][-1]
        tr = fin["trace"]
        body.append(
            f"<p>At the last step: LA({len(last['top'])}) = {_e(_list(last['top']))}; "
            f"SA({len(last['bottom'])}) = {_e(_list(last['bottom']))}.<br>"
            f"Trace {tr['value']:.4g} ± {tr['stderr']:.2g} (Hutch++, {_e(tr['probes'])} HVPs). "
            f"Largest stable gradient-descent step 2/λ_max = {_e(_fmt(fin['max_stable_lr']))}; "
            f"damping for a positive definite H + δI: δ &gt; {_e(_fmt(fin['damping_for_pd']))}. "
            f"Classification (gradient tolerance {fin['grad_tol']:g}): "
            f"<b>{_e(fin['classification'])}</b>.</p>"
        )
        dl = fin["directional"]
        k = len(last["top"])
        rows = []
        for i, lam in enumerate(dl["eigenvalues"]):
            label = f"LA {i + 1}" if i < k else f"SA {i - k + 1}"
            end = " (grid end)" if dl["alpha_at_grid_end"][i] else ""
            rows.append(
                [
                    label,
                    _fmt(lam),
                    _fmt(dl["inverse_eigenvalues"][i]),
                    _fmt(dl["alpha_star"][i]) + end,
                    _fmt(dl["best_decrease"][i]),
                ]
            )
        header = ["direction", "λ", "1/λ", "α*", "best loss decrease"]
        body.append(_table(header, rows, numeric={1, 2, 3, 4}))
        body.append("<h3>What this run shows</h3>")
        body.append('<ul class="findings">' + "".join(map(_finding, _findings(res))) + "</ul>")
        adam = res.get("adam")
        if adam and adam["checkpoints"]:
            head, rows, lhead, lrows = _adam_rows(adam)
            body.append("<h3>Adam against the Hessian</h3>")
            body.append(f"<p>{_e(_adam_intro(adam))}</p>")
            body.append(_table(head, rows, numeric=set(range(len(head)))))
            body.append(f"<p>Per layer at step {_e(adam['checkpoints'][-1]['step'])}:</p>")
            body.append(_table(lhead, lrows, numeric=set(range(1, len(lhead)))))
            body.append(
                '<ul class="findings">' + "".join(map(_finding, _adam_findings(adam))) + "</ul>"
            )
        for label, fig in res.get("figures", {}).items():
            path = os.path.join(out_dir, name, fig)
            if os.path.exists(path):
                body.append(_image(path, f"{name} {label}"))
            else:
                body.append(f'<p class="warn">Figure {_e(name)}/{_e(fig)} is missing.</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>hesskit curvature report</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_html(report: dict, path: str) -> None:
    """Write :func:`render_html` of ``report`` to ``path`` (figures read from its folder)."""
    page = render_html(report, os.path.dirname(os.path.abspath(path)))
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
