r"""Adam's preconditioner against diagonal curvature: per-layer correlations and ratios.

Adam divides each coordinate by :math:`\sqrt{\hat v_t} + \epsilon`, with :math:`v_t` a running
mean of squared minibatch gradients, which is often read as a diagonal curvature estimate.
:func:`preconditioner_agreement` compares :math:`\sqrt{v_t}` leaf by leaf with diagonals of
curvature matrices given as pytrees (e.g. :math:`|\operatorname{diag} H|` from
:func:`hesskit.diagonal` on a Hessian operator, the GGN diagonal from the same on
:func:`hesskit.ggn_operator`, and the empirical Fisher diagonal from
:func:`empirical_fisher_diagonal`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["PreconditionerAgreement", "empirical_fisher_diagonal", "preconditioner_agreement"]


class PreconditionerAgreement(NamedTuple):
    """Per-leaf agreement of ``sqrt(nu)`` with each reference diagonal.

    Attributes:
        names: leaf paths (``jax.tree_util.keystr``), in leaf order.
        sizes: number of entries per leaf.
        spearman: ``{reference: array (n_leaves,)}``, the rank correlation of ``sqrt(nu)``
            with the reference's absolute value inside each leaf (``nan`` for leaves of one
            entry or constant values).
        log_ratio: ``{reference: array (n_leaves,)}``, the median of
            ``log10(sqrt(nu) / |reference|)`` over each leaf's entries with a nonzero
            reference: the typical scale mismatch (0 means the same scale).
        overall_spearman: ``{reference: float}``, the rank correlation over all entries.
    """

    names: list[str]
    sizes: list[int]
    spearman: dict[str, np.ndarray]
    log_ratio: dict[str, np.ndarray]
    overall_spearman: dict[str, float]


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(x.shape[0])
    r[order] = np.arange(x.shape[0])
    # Ties get their mean rank, so constant blocks do not fake a correlation.
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[0] < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return float("nan")
    return float(np.mean((ra - ra.mean()) * (rb - rb.mean())) / (sa * sb))


def preconditioner_agreement(nu: PyTree, references: dict[str, PyTree]) -> PreconditionerAgreement:
    r"""Compare Adam's :math:`\sqrt{v_t}` with diagonal curvature estimates, leaf by leaf.

    For each leaf and reference diagonal :math:`d`: the Spearman rank correlation of
    :math:`\sqrt{v}` with :math:`|d|` (does Adam rank the coordinates as the curvature does?)
    and the median :math:`\log_{10}(\sqrt{v}/|d|)` (how far apart are the scales?). Rank
    correlation because both span many orders of magnitude. Runs on the host (NumPy).

    Args:
        nu: Adam's second-moment pytree (``optax.ScaleByAdamState.nu``), shaped like the
            parameters.
        references: name to diagonal pytree with ``nu``'s structure, e.g.
            ``{"|diag H|": ..., "diag GGN": ..., "empirical Fisher": ...}``.

    Returns:
        A :class:`PreconditionerAgreement`.

    Raises:
        ValueError: a reference whose structure or shapes differ from ``nu``'s, or no
            references.

    Examples:
        >>> import jax.numpy as jnp
        >>> nu = {"w": jnp.array([1.0, 4.0, 9.0])}
        >>> res = preconditioner_agreement(nu, {"h": {"w": jnp.array([1.0, 2.0, 3.0])}})
        >>> float(res.spearman["h"][0]), float(res.log_ratio["h"][0])
        (1.0, 0.0)
    """
    if not references:
        msg = "references must name at least one diagonal."
        raise ValueError(msg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nu)
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    roots = [np.sqrt(np.maximum(np.asarray(x, np.float64).ravel(), 0)) for _, x in flat]
    spear, ratio, overall = {}, {}, {}
    for key, ref in references.items():
        leaves, rdef = jax.tree_util.tree_flatten(ref)
        if rdef != treedef or [np.shape(x) for x in leaves] != [np.shape(x) for _, x in flat]:
            msg = f"reference {key!r} must have nu's pytree structure and leaf shapes."
            raise ValueError(msg)
        refs = [np.abs(np.asarray(x, np.float64).ravel()) for x in leaves]
        spear[key] = np.array([_spearman(a, b) for a, b in zip(roots, refs, strict=True)])
        lr = []
        for a, b in zip(roots, refs, strict=True):
            ok = (b > 0) & (a > 0)
            lr.append(float(np.median(np.log10(a[ok] / b[ok]))) if ok.any() else float("nan"))
        ratio[key] = np.array(lr)
        overall[key] = _spearman(np.concatenate(roots), np.concatenate(refs))
    return PreconditionerAgreement(names, [a.shape[0] for a in roots], spear, ratio, overall)


def empirical_fisher_diagonal(
    loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, data: Any, *, chunk_size: int = 64
) -> PyTree:
    r"""The empirical Fisher diagonal :math:`\frac1n \sum_i g_i \odot g_i` of per-example gradients.

    Args:
        loss_fn: ``loss_fn(params, batch)``, a mean loss over a batch whose leaves have a
            leading example axis.
        params: the point.
        data: the examples (a pytree of arrays with a leading axis ``n``).
        chunk_size: examples whose gradients are formed together (one vmap), ``>= 1``.

    Returns:
        A pytree shaped like ``params``.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = lambda w, b: jnp.mean((b @ w) ** 2)
        >>> d = empirical_fisher_diagonal(f, jnp.array([1.0, 0.0]), jnp.eye(2))
        >>> [float(v) for v in d]  # per-example gradients (2, 0) and (0, 0)
        [2.0, 0.0]
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        msg = f"chunk_size must be a positive int, got {chunk_size!r}."
        raise ValueError(msg)
    n = int(jax.tree_util.tree_leaves(data)[0].shape[0])

    @jax.jit
    def chunk_sum(p, batch):
        one = lambda ex: jax.grad(loss_fn)(p, jax.tree_util.tree_map(lambda a: a[None], ex))  # noqa: E731
        g = jax.vmap(one)(batch)
        return jax.tree_util.tree_map(lambda x: jnp.sum(x * x, axis=0), g)

    total = None
    for s in range(0, n, chunk_size):
        part = chunk_sum(params, jax.tree_util.tree_map(lambda a, s=s: a[s : s + chunk_size], data))
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
    return jax.tree_util.tree_map(lambda x: x / n, total)
