"""Figures of curvature: spectral densities, eigenvalue tracks, directional losses, step sizes.

The figures follow Alain, Le Roux and Manzagol (2019), *Negative eigenvalues of the Hessian in
deep neural networks*: eigenvalue tracks over training on a log scale (their figures 5-6), the
loss along an eigenvector against its quadratic model (figures 1-2), and the best loss decrease
and the optimal step size along each eigenvector (figures 3-4).

matplotlib is an optional dependency (``pip install 'hesskit[plot]'``), imported only when a
function here is called. Figures are built with :class:`matplotlib.figure.Figure` directly,
without ``pyplot``: no GUI backend is touched, nothing is kept in pyplot's figure registry, and
``savefig`` renders with Agg; each figure has a PNG repr, so it shows as a notebook cell's
result. Every function takes plain arrays (or the NamedTuples of hesskit's
estimators and diagnostics where noted), returns the Figure, and saves a PNG when ``path`` is
given.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "plot_directional_loss",
    "plot_eigenvalue_tracks",
    "plot_preconditioner_agreement",
    "plot_spectral_density",
    "plot_step_sizes",
    "plot_training_loss",
]

_POS_COLOR = "tab:blue"
_NEG_COLOR = "tab:red"


def _figure(ncols: int = 1, *, width: float = 5.5, height: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        msg = "hesskit.plots needs matplotlib: pip install 'hesskit[plot]'."
        raise ImportError(msg) from err
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    return buffer.getvalue()


def _finish(fig, path: str | os.PathLike | None):
    if path is not None:
        fig.savefig(os.fspath(path), dpi=110, format="png")
    # A Figure made without pyplot has no display hook in Jupyter (that comes with pyplot's
    # inline backend); a PNG repr makes it show as a cell's result.
    fig._repr_png_ = functools.partial(_png, fig)
    return fig


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        msg = f"{name} must be one-dimensional, got shape {arr.shape}."
        raise ValueError(msg)
    return arr


def _as_2d(x: Any, name: str, rows: int) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != rows:
        msg = f"{name} must have shape ({rows}, k), got {arr.shape}."
        raise ValueError(msg)
    return arr


def plot_spectral_density(
    grid: Any,
    density: Any = None,
    *,
    eigenvalues: Any = None,
    floor: float = 1e-8,
    title: str | None = None,
    path: str | os.PathLike | None = None,
):
    r"""Plot a smoothed spectral density :math:`\phi(t)` on a log scale.

    The density of a Hessian spans many orders of magnitude (a bulk near zero and a few outliers),
    so it is drawn on a logarithmic vertical axis, clipped below at ``floor``.

    Args:
        grid: the points :math:`t` (shape ``(m,)``), or a ``Density`` NamedTuple from
            :func:`hesskit.spectral_density` (then ``density`` is taken from it).
        density: the density values at ``grid`` (shape ``(m,)``).
        eigenvalues: optional eigenvalues (for example LA(k) and SA(k) from
            :func:`hesskit.eigsh`) marked as ticks along the bottom of the axes.
        floor: smallest density drawn; values below are clipped to it.
        title: axes title.
        path: where to save a PNG, if given.

    Returns:
        The matplotlib ``Figure`` (one axes, log-scaled ``y``).

    Examples:
        >>> import numpy as np
        >>> t = np.linspace(-1, 5, 200)
        >>> fig = plot_spectral_density(t, np.exp(-(t**2)))
        >>> fig.axes[0].get_yscale()
        'log'
    """
    if density is None:
        if not (hasattr(grid, "grid") and hasattr(grid, "density")):
            msg = "pass grid and density arrays, or a Density result as the first argument."
            raise TypeError(msg)
        grid, density = grid.grid, grid.density
    t = _as_1d(grid, "grid")
    phi = _as_1d(density, "density")
    if t.shape != phi.shape:
        msg = f"grid and density must have the same shape, got {t.shape} and {phi.shape}."
        raise ValueError(msg)
    fig, (ax,) = _figure()
    ax.plot(t, np.maximum(phi, floor), color="k", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel(r"density $\phi(\lambda)$")
    if eigenvalues is not None:
        lam = np.asarray(eigenvalues, dtype=float).ravel()
        colors = np.where(lam >= 0, _POS_COLOR, _NEG_COLOR)
        ax.scatter(lam, np.full_like(lam, floor * 3), marker="|", s=200, c=colors, zorder=3)
    ax.set_title(title or "Spectral density (Lanczos quadrature)")
    ax.grid(alpha=0.3, which="both")
    return _finish(fig, path)


def plot_eigenvalue_tracks(
    steps: Any,
    top: Any,
    bottom: Any = None,
    *,
    loss: Any = None,
    loss_steps: Any = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
):
    r"""Plot extreme eigenvalues over training as :math:`\log|\lambda|`, with the loss.

    Positive eigenvalues are drawn in blue and negative ones in red (by their magnitude, since
    the axis is logarithmic); the loss is a dotted black curve on a second, log-scaled axis on the
    right, as in figures 5-6 of Alain et al. (2019).

    Args:
        steps: training steps of the measurements, shape ``(T,)``.
        top: the largest eigenvalues LA(k) at each step, shape ``(T, k)``.
        bottom: the smallest eigenvalues SA(k) at each step, shape ``(T, k')`` (optional).
        loss: loss values to draw on the right axis (optional).
        loss_steps: the steps of ``loss`` (default ``steps``).
        title: axes title.
        path: where to save a PNG, if given.

    Returns:
        The matplotlib ``Figure``; ``fig.axes[0]`` holds the eigenvalues and ``fig.axes[1]`` the
        loss when ``loss`` is given.

    Examples:
        >>> import numpy as np
        >>> fig = plot_eigenvalue_tracks([0, 10], [[4.0, 2.0], [5.0, 3.0]], [[-0.1], [-0.2]])
        >>> fig.axes[0].get_yscale()
        'log'
    """
    t = _as_1d(steps, "steps")
    eigs = [_as_2d(top, "top", len(t))]
    if bottom is not None:
        eigs.append(_as_2d(bottom, "bottom", len(t)))
    lam = np.concatenate(eigs, axis=1)
    fig, (ax,) = _figure(width=6.5)
    tiny = np.finfo(float).tiny
    for sign, color, label in (
        (1, _POS_COLOR, r"$\lambda > 0$"),
        (-1, _NEG_COLOR, r"$\lambda < 0$"),
    ):
        labelled = False
        for j in range(lam.shape[1]):
            y = np.where(sign * lam[:, j] > 0, np.abs(lam[:, j]), np.nan)
            if np.all(np.isnan(y)):
                continue
            y = np.maximum(y, tiny)
            ax.plot(t, y, color=color, lw=1.0, marker=".", ms=3, label=None if labelled else label)
            labelled = True
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(r"$|\lambda|$ (log scale)")
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if loss is not None:
        ls = t if loss_steps is None else _as_1d(loss_steps, "loss_steps")
        lv = _as_1d(loss, "loss")
        if ls.shape != lv.shape:
            msg = f"loss_steps and loss must have the same shape, got {ls.shape} and {lv.shape}."
            raise ValueError(msg)
        ax2 = ax.twinx()
        (line,) = ax2.plot(ls, np.maximum(lv, tiny), "k:", lw=1.5, label="loss")
        ax2.set_yscale("log")
        ax2.set_ylabel("loss (log scale)")
        handles.append(line)
        labels.append("loss")
    if handles:
        ax.legend(handles, labels, loc="best", fontsize="small")
    ax.set_title(title or "Extreme eigenvalues of the Hessian during training")
    return _finish(fig, path)


def plot_directional_loss(
    alphas: Any,
    losses: Any,
    *,
    eigenvalues: Any,
    slopes: Any,
    loss0: Any,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
):
    r"""Plot the loss along eigen-directions against its quadratic model (one panel each).

    Along :math:`\theta - \alpha (g^\top v) v` with :math:`Hv = \lambda v`, the second-order
    model of the loss is

    .. math::
        q(\alpha) = L(\theta) - \alpha (g^\top v)^2 + \tfrac12 \alpha^2 \lambda (g^\top v)^2,

    which for :math:`\lambda < 0` falls without bound while the true loss cannot (figures 1-2
    of Alain et al., 2019).

    Args:
        alphas: step sizes, shape ``(m,)`` (shared) or ``(n, m)`` (one row per direction).
        losses: the true losses :math:`L(\theta - \alpha (g^\top v) v)`, shape ``(n, m)`` or
            ``(m,)`` for one direction.
        eigenvalues: :math:`\lambda` of each direction, shape ``(n,)`` or a scalar.
        slopes: :math:`g^\top v` of each direction, shape ``(n,)`` or a scalar.
        loss0: :math:`L(\theta)`.
        labels: panel titles (default built from the eigenvalues).
        title: figure title.
        path: where to save a PNG, if given.

    Returns:
        The matplotlib ``Figure`` with one axes per direction.

    Examples:
        >>> import numpy as np
        >>> a = np.linspace(-1, 1, 21)
        >>> fig = plot_directional_loss(a, 1 - 0.5 * a + 0.1 * a**4, eigenvalues=-1.0,
        ...                             slopes=np.sqrt(0.5), loss0=1.0)
        >>> len(fig.axes)
        1
    """
    lv = np.asarray(losses, dtype=float)
    if lv.ndim == 1:
        lv = lv[None]
    if lv.ndim != 2:
        msg = f"losses must have shape (n, m) or (m,), got {lv.shape}."
        raise ValueError(msg)
    n, m = lv.shape
    av = np.asarray(alphas, dtype=float)
    if av.shape == (m,):
        av = np.broadcast_to(av, (n, m))
    if av.shape != (n, m):
        msg = f"alphas must have shape ({m},) or {(n, m)}, got {np.shape(alphas)}."
        raise ValueError(msg)
    lam = np.broadcast_to(np.asarray(eigenvalues, dtype=float).ravel(), (n,))
    gv = np.broadcast_to(np.asarray(slopes, dtype=float).ravel(), (n,))
    l0 = float(np.asarray(loss0))
    if labels is not None and len(labels) != n:
        msg = f"labels must have {n} entries, got {len(labels)}."
        raise ValueError(msg)
    fig, axes = _figure(n, width=4.5)
    for i, ax in enumerate(axes):
        a = av[i]
        quad = l0 - a * gv[i] ** 2 + 0.5 * a**2 * lam[i] * gv[i] ** 2
        color = _POS_COLOR if lam[i] >= 0 else _NEG_COLOR
        ax.plot(a, lv[i], color="tab:orange", lw=1.8, label="loss")
        ax.plot(a, quad, color=color, lw=1.2, ls="--", label="quadratic model")
        # keep the true loss readable when the model of a negative direction dives far below it
        lo, hi = np.nanmin(lv[i]), np.nanmax(lv[i])
        pad = 0.25 * (hi - lo) + 1e-12
        ax.set_ylim(min(lo, np.nanmin(quad)) - pad if lam[i] >= 0 else lo - pad, hi + pad)
        ax.axvline(0.0, color="0.6", lw=0.8)
        ax.set_xlabel(r"step size $\alpha$")
        ax.set_ylabel(r"$L(\theta - \alpha\,(g^\top v)\,v)$")
        ax.set_title(labels[i] if labels is not None else rf"$\lambda = {lam[i]:.3g}$")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_step_sizes(
    eigenvalues: Any,
    best_decrease: Any,
    alpha_star: Any,
    *,
    steps: Any = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
):
    r"""Plot the best loss decrease and :math:`1/\alpha^*` against each eigenvalue.

    Left panel (figure 3 of Alain et al., 2019): the best decrease
    :math:`\min_\alpha L(\theta - \alpha (g^\top v) v) - L(\theta)` along each eigenvector
    (lower is better). Right panel (figure 4): :math:`1/\alpha^*` against :math:`\lambda`, with the
    line :math:`1/\alpha^* = \lambda` that a quadratic loss would follow.

    Args:
        eigenvalues: :math:`\lambda_i`, shape ``(n,)``.
        best_decrease: best loss change along each eigenvector (``<= 0``), shape ``(n,)``.
        alpha_star: the minimising step sizes, shape ``(n,)``.
        steps: training step of each point, shape ``(n,)``, used as colour (optional).
        title: figure title.
        path: where to save a PNG, if given.

    Returns:
        The matplotlib ``Figure`` with two axes.

    Examples:
        >>> fig = plot_step_sizes([-0.5, 2.0], [-0.1, -0.01], [10.0, 0.5])
        >>> [ax.get_xlabel() for ax in fig.axes][:2]
        ['eigenvalue $\\lambda$', 'eigenvalue $\\lambda$']
    """
    lam = _as_1d(eigenvalues, "eigenvalues")
    dec = _as_1d(best_decrease, "best_decrease")
    ast = _as_1d(alpha_star, "alpha_star")
    if not lam.shape == dec.shape == ast.shape:
        msg = (
            "eigenvalues, best_decrease and alpha_star must have the same shape, got "
            f"{lam.shape}, {dec.shape} and {ast.shape}."
        )
        raise ValueError(msg)
    fig, (ax_dec, ax_inv) = _figure(2, width=4.8)
    if steps is not None:
        c = _as_1d(steps, "steps")
        kw: dict[str, Any] = {"c": c, "cmap": "viridis"}
    else:
        kw = {"c": np.where(lam >= 0, _POS_COLOR, _NEG_COLOR)}
    sc = ax_dec.scatter(lam, dec, s=22, edgecolors="k", linewidths=0.3, **kw)
    ax_dec.axvline(0.0, color="0.6", lw=0.8)
    ax_dec.set_xlabel(r"eigenvalue $\lambda$")
    ax_dec.set_ylabel(r"best loss change $L(\alpha^*) - L(0)$")
    ax_dec.set_title("Best loss decrease along each eigenvector")
    ax_dec.grid(alpha=0.3)

    with np.errstate(divide="ignore"):
        inv = np.where(ast != 0, 1.0 / ast, np.nan)
    ax_inv.scatter(lam, inv, s=22, edgecolors="k", linewidths=0.3, **kw)
    pos = lam[lam > 0]
    if pos.size:
        ref = np.linspace(0.0, pos.max() * 1.05, 2)
        ax_inv.plot(ref, ref, "k--", lw=0.8, label=r"$1/\alpha^* = \lambda$")
        ax_inv.legend(fontsize="small")
    ax_inv.axvline(0.0, color="0.6", lw=0.8)
    ax_inv.axhline(0.0, color="0.6", lw=0.8)
    ax_inv.set_xlabel(r"eigenvalue $\lambda$")
    ax_inv.set_ylabel(r"$1/\alpha^*$")
    ax_inv.set_title(r"Optimal step size: $1/\alpha^*$ vs $\lambda$")
    ax_inv.grid(alpha=0.3)
    if steps is not None:
        fig.colorbar(sc, ax=[ax_dec, ax_inv], label="training step")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_training_loss(
    steps: Any,
    loss: Any,
    *,
    eval_steps: Any = None,
    eval_loss: Any = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
):
    """Plot a training loss curve on a log scale, optionally with full-data evaluations.

    Args:
        steps: training steps, shape ``(T,)``.
        loss: the (minibatch) training loss at each step, shape ``(T,)``.
        eval_steps: steps of full-data evaluations (optional).
        eval_loss: full-data loss at ``eval_steps`` (optional).
        title: axes title.
        path: where to save a PNG, if given.

    Returns:
        The matplotlib ``Figure`` (one axes, log-scaled ``y``).

    Examples:
        >>> fig = plot_training_loss([0, 1, 2], [2.3, 1.5, 1.0])
        >>> fig.axes[0].get_yscale()
        'log'
    """
    t = _as_1d(steps, "steps")
    lv = _as_1d(loss, "loss")
    if t.shape != lv.shape:
        msg = f"steps and loss must have the same shape, got {t.shape} and {lv.shape}."
        raise ValueError(msg)
    fig, (ax,) = _figure()
    ax.plot(t, lv, color="0.5", lw=0.8, label="minibatch loss")
    if eval_loss is not None:
        es = _as_1d(eval_steps, "eval_steps")
        el = _as_1d(eval_loss, "eval_loss")
        if es.shape != el.shape:
            msg = f"eval_steps and eval_loss must match, got {es.shape} and {el.shape}."
            raise ValueError(msg)
        ax.plot(es, el, "ko-", ms=4, lw=1.2, label="full-data loss")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title(title or "Training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _finish(fig, path)


def _agreement_field(rec: Any, field: str) -> Any:
    # A PreconditionerAgreement or its to_dict() (a JSON record): the same fields by name.
    return rec[field] if isinstance(rec, dict) else getattr(rec, field)


def plot_preconditioner_agreement(
    steps: Any,
    agreements: Sequence[Any],
    *,
    measure: str = "spearman",
    references: Sequence[str] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
):
    r"""Plot the per-layer agreement of Adam's :math:`\sqrt{v_t}` with curvature diagonals.

    One panel per reference diagonal (``|diag H|``, ``diag GGN``, ...), one line per layer
    (group) of :func:`hesskit.preconditioner_agreement`, and the agreement over all entries as
    a thick black line. For references estimated with replicates (Hutchinson), the dotted
    line of the same colour is the layer's ``ceiling``: from the correlation of the logs of
    one half of the probes with the other's, the largest log correlation anything can reach
    against that noisy estimate (a guide for the rank correlation too).

    Args:
        steps: the training step of each record, shape ``(T,)``.
        agreements: ``T`` :class:`~hesskit.PreconditionerAgreement` records (or their
            ``to_dict()``), the same groups in each.
        measure: ``"spearman"`` (rank correlation) or ``"pearson_log"`` (correlation of
            ``log10`` values).
        references: which references to draw, in order (default: all of the first record's).
        title: figure title.
        path: where to save a PNG, if given.

    Returns:
        The matplotlib ``Figure`` (one axes per reference, ``y`` in [-1, 1]).

    Raises:
        ValueError: ``steps`` and ``agreements`` of different lengths, none of them, or an
            unknown ``measure`` or reference.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hesskit import preconditioner_agreement
        >>> nu = {"w": jnp.array([1.0, 4.0, 9.0])}
        >>> rec = preconditioner_agreement(nu, {"h": {"w": jnp.array([1.0, 2.0, 3.0])}})
        >>> fig = plot_preconditioner_agreement([10, 20], [rec, rec])
        >>> len(fig.axes), [float(y) for y in fig.axes[0].get_ylim()]
        (1, [-1.05, 1.05])
    """
    t = _as_1d(steps, "steps")
    if len(agreements) != t.shape[0] or t.shape[0] == 0:
        msg = f"need one agreement record per step, got {len(agreements)} and {t.shape[0]} steps."
        raise ValueError(msg)
    overall = {"spearman": "overall_spearman", "pearson_log": "overall_pearson_log"}
    if measure not in overall:
        msg = f"measure must be 'spearman' or 'pearson_log', got {measure!r}."
        raise ValueError(msg)
    first = agreements[0]
    names = list(_agreement_field(first, "names"))
    refs = list(references) if references is not None else list(_agreement_field(first, measure))
    unknown = [r for r in refs if r not in _agreement_field(first, measure)]
    if unknown:
        have = list(_agreement_field(first, measure))
        msg = f"unknown reference {unknown[0]!r}; the records have {have}."
        raise ValueError(msg)
    fig, axes = _figure(len(refs), width=4.2, height=3.8)
    colors = [f"C{i % 10}" for i in range(len(names))]
    for ax, ref in zip(axes, refs, strict=True):

        def series(field: str, ref: str = ref) -> np.ndarray:
            rows = []
            for rec in agreements:
                value = _agreement_field(rec, field)
                row = None if value is None else value.get(ref)
                rows.append(np.full(len(names), np.nan) if row is None else row)
            return np.asarray(rows, dtype=float)

        per = series(measure)
        # The ceiling (from the split-half reliability) is on the scale of a correlation.
        rel = series("ceiling" if _agreement_field(first, "ceiling") is not None else "reliability")
        for i, name in enumerate(names):
            ax.plot(t, per[:, i], "o-", ms=3, lw=1, color=colors[i], label=name)
            if np.isfinite(rel[:, i]).any():
                ax.plot(t, rel[:, i], ":", lw=1, color=colors[i])
        tot = [_agreement_field(rec, overall[measure])[ref] for rec in agreements]
        tot = [np.nan if v is None else float(v) for v in tot]
        ax.plot(t, tot, "k-", lw=2.2, label="all entries")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
        if t.min() > 0 and t.max() / t.min() > 20:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            # Labels on the minor ticks too would overlap on a few decades.
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training step")
        ax.set_ylabel({"spearman": "Spearman ρ", "pearson_log": "Pearson r of log10"}[measure])
        ax.set_title(f"√v vs {ref}", fontsize="medium")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small", loc="lower left")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _finish(fig, path)
