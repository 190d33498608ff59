"""Compare two sets of eigenpairs: eigenvalue differences, overlaps and principal angles."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src.thick_restart import EigResult
from hesskit._src.tree import tree_rmatvec

PyTree = Any

__all__ = ["SpectrumComparison", "compare_spectra", "eigenvector_overlaps"]


class SpectrumComparison(NamedTuple):
    r"""How two sets of eigenpairs :math:`(\lambda^a_i, a_i)` and :math:`(\lambda^b_j, b_j)` differ.

    Attributes:
        eigenvalue_diff: :math:`\lambda^a_i - \lambda^b_i` over the first
            :math:`\min(k_a, k_b)` pairs in the stored order (both results should come from the
            same ``which``), shape ``(min(k_a, k_b),)``.
        relative_diff: ``eigenvalue_diff / |lambda^b_i|`` (``b`` is the reference; ``inf`` or
            ``nan`` where :math:`\lambda^b_i = 0`).
        overlaps: :math:`|a_i^\top b_j|`, shape ``(k_a, k_b)``; 1 for the same direction up to
            sign, 0 for orthogonal ones.
        principal_angles: the principal angles between the spans of the two sets, in radians,
            ascending, shape ``(min(k_a, k_b),)``: :math:`\arccos` of the singular values of
            :math:`A^\top B` (clipped to ``[0, 1]``). Zero angles mean a shared subspace even
            when individual eigenvectors inside a degenerate eigenspace differ. Taken from
            cosines, angles near zero are resolved only to about :math:`\sqrt{\epsilon}` of the
            dtype (about ``3e-4`` rad in float32, ``1e-8`` in float64).
        matched_index: for each :math:`a_i`, the :math:`j` maximizing :math:`|a_i^\top b_j|`,
            shape ``(k_a,)``.
        matched_angles: :math:`\arccos \max_j |a_i^\top b_j|`, the angle between :math:`a_i`
            and its best match, shape ``(k_a,)``.
        cluster_index: gap-aware grouping of the first :math:`\min(k_a, k_b)` reference
            eigenvalues: pairs whose eigenvalues lie within ``cluster_rtol`` of their
            neighbour (relative to the larger magnitude) share an index, shape
            ``(min(k_a, k_b),)``. Inside such a cluster single eigenvectors are
            ill-conditioned (a perturbation of size comparable to the gap rotates them
            freely), so compare subspaces instead.
        cluster_angles: for each pair, the largest principal angle between the span of the
            ``a`` vectors and the span of the ``b`` vectors at the positions of its cluster,
            in radians, shape ``(min(k_a, k_b),)``; equals the single-vector angle for an
            isolated eigenvalue.
    """

    eigenvalue_diff: jax.Array
    relative_diff: jax.Array
    overlaps: jax.Array
    principal_angles: jax.Array
    matched_index: jax.Array
    matched_angles: jax.Array
    cluster_index: jax.Array
    cluster_angles: jax.Array


def eigenvector_overlaps(a: PyTree, b: PyTree) -> jax.Array:
    r"""The signed inner products :math:`a_i^\top b_j` of two stacked sets of vectors.

    Args:
        a: a pytree with a leading axis :math:`k_a` (e.g. ``EigResult.eigenvectors``).
        b: a pytree of the same structure with a leading axis :math:`k_b`.

    Returns:
        The ``(k_a, k_b)`` matrix, computed leaf by leaf on device (no raveling).
    """
    return jax.vmap(lambda x: tree_rmatvec(b, x))(a)


@jax.jit
def _compare(va, vb, la, lb) -> SpectrumComparison:
    dtype = jnp.result_type(la, lb)
    signed = eigenvector_overlaps(va, vb).astype(dtype)
    overlaps = jnp.abs(signed)
    sv = jnp.linalg.svd(signed, compute_uv=False)
    angles = jnp.sort(jnp.arccos(jnp.clip(sv, 0.0, 1.0)))
    n = min(la.shape[0], lb.shape[0])
    diff = (la[:n] - lb[:n]).astype(dtype)
    best = jnp.argmax(overlaps, axis=1)
    matched = jnp.arccos(jnp.clip(jnp.max(overlaps, axis=1), 0.0, 1.0))
    return SpectrumComparison(
        eigenvalue_diff=diff,
        relative_diff=diff / jnp.abs(lb[:n]).astype(dtype),
        overlaps=overlaps,
        principal_angles=angles,
        matched_index=best,
        matched_angles=matched,
        cluster_index=jnp.zeros(n, jnp.int32),
        cluster_angles=jnp.zeros(n, dtype),
    )


def clusters(values: Any, rtol: float) -> np.ndarray:
    """Group eigenvalues whose sorted neighbours are within ``rtol`` (relative) of each other."""
    lam = np.asarray(values, np.float64)
    order = np.argsort(lam)
    ids = np.zeros(lam.shape[0], np.int32)
    c = 0
    for prev, cur in zip(order[:-1], order[1:], strict=True):
        scale = max(abs(lam[prev]), abs(lam[cur]), np.finfo(np.float64).tiny)
        if abs(lam[cur] - lam[prev]) > rtol * scale:
            c += 1
        ids[cur] = c
    return ids


def _cluster_angles(signed: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.zeros(ids.shape[0])
    for c in np.unique(ids):
        idx = np.flatnonzero(ids == c)
        sv = np.linalg.svd(signed[np.ix_(idx, idx)], compute_uv=False)
        out[idx] = np.arccos(np.clip(sv.min(), 0.0, 1.0))
    return out


def _describe(vectors: PyTree) -> list[tuple[tuple[int, ...], Any]]:
    return [
        (tuple(jnp.shape(x)[1:]), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(vectors)
    ]


def compare_spectra(a: EigResult, b: EigResult, *, cluster_rtol: float = 0.1) -> SpectrumComparison:
    r"""Compare two sets of eigenpairs of operators on the same space.

    Typical uses: the same Hessian from two solvers or two seeds (are the eigenvectors the
    same?), the Hessian at two training steps (how fast does the top eigenspace turn?), or
    the Hessian of a minibatch against that of the full data. Overlaps are computed with tree
    inner products on device; the small SVD for the principal angles runs on the
    :math:`k_a \times k_b` matrix. Assumes each set is orthonormal (as
    :func:`hesskit.eigsh` returns). jit-compatible core; gradients are not promised.

    Args:
        a: an :class:`~hesskit.EigResult` (or any object with ``eigenvalues`` of shape
            ``(k_a,)`` and ``eigenvectors`` with a leading axis :math:`k_a`).
        b: the reference set, same vector structure, shapes and dtypes as ``a``.
        cluster_rtol: reference eigenvalues closer than this (relative) to a neighbour form
            one cluster for ``cluster_angles``; 0 makes every pair its own cluster.

    Returns:
        A :class:`SpectrumComparison`.

    Raises:
        ValueError: the eigenvector pytrees differ in structure, shapes or dtypes, or a
            result's eigenvalue count does not match its eigenvectors.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hesskit import EigResult
        >>> def pairs(vals, vecs):
        ...     n = len(vals)
        ...     return EigResult(jnp.array(vals), jnp.array(vecs), jnp.zeros(n),
        ...                      jnp.ones(n, bool), 0, 0, True)
        >>> c = 2 ** -0.5
        >>> cmp = compare_spectra(pairs([2.0], [[1.0, 0.0, 0.0]]), pairs([1.0], [[c, c, 0.0]]))
        >>> round(float(cmp.principal_angles[0]), 4), float(cmp.eigenvalue_diff[0])
        (0.7854, 1.0)
    """
    la = jnp.asarray(a.eigenvalues)
    lb = jnp.asarray(b.eigenvalues)
    for name, lam, vecs in (("a", la, a.eigenvectors), ("b", lb, b.eigenvectors)):
        if lam.ndim != 1:
            msg = f"{name}.eigenvalues must have shape (k,), got {lam.shape}."
            raise ValueError(msg)
        sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree_util.tree_leaves(vecs)}
        if sizes != {lam.shape[0]}:
            msg = (
                f"{name}.eigenvectors must have a leading axis of size k = {lam.shape[0]} on "
                f"every leaf, got leading sizes {sorted(sizes, key=str)}."
            )
            raise ValueError(msg)
    da = jax.tree_util.tree_structure(a.eigenvectors)
    db = jax.tree_util.tree_structure(b.eigenvectors)
    if da != db or _describe(a.eigenvectors) != _describe(b.eigenvectors):
        msg = (
            "a and b must hold eigenvectors of the same space: the same pytree structure, leaf "
            f"shapes and dtypes.\n  a: {da} {_describe(a.eigenvectors)}\n"
            f"  b: {db} {_describe(b.eigenvectors)}"
        )
        raise ValueError(msg)
    if not np.isfinite(cluster_rtol) or cluster_rtol < 0:
        msg = f"cluster_rtol must be a finite number >= 0, got {cluster_rtol!r}."
        raise ValueError(msg)
    res = _compare(a.eigenvectors, b.eigenvectors, la, lb)
    if isinstance(res.overlaps, jax.core.Tracer):
        return res  # inside jit the data-dependent clustering is not available
    n = res.eigenvalue_diff.shape[0]
    ids = clusters(lb[:n], cluster_rtol)
    signed = np.asarray(eigenvector_overlaps(a.eigenvectors, b.eigenvectors), np.float64)
    angles = _cluster_angles(signed[:n, :n], ids)
    return res._replace(
        cluster_index=jnp.asarray(ids), cluster_angles=jnp.asarray(angles, res.matched_angles.dtype)
    )
