"""The Krylov core: precision rules, Gram-Schmidt, fresh directions and Ritz extraction.

Every hesskit solver that builds a Krylov basis (:func:`hesskit.eigsh`, :func:`hesskit.lanczos`,
stochastic Lanczos quadrature, the transforms and diagnostics built on them) takes its small
kernels from here, so each exists once.

Mixed precision: the Krylov work (the basis, the projected matrix, the recurrence and the Ritz
extraction) runs in float32 or wider whatever the parameters' dtype, while each product runs in
the parameters' own dtypes (bfloat16 weights stay bfloat16 inside the Hessian-vector product).
A bfloat16 basis would lose orthogonality after a few steps, and ``eigh``/``qr`` have no
bfloat16 kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src.tree import (
    tree_matvec,
    tree_normalize,
    tree_random_sphere,
    tree_rmatvec,
    tree_sub,
)

PyTree = Any

__all__ = [
    "CONVERGED",
    "MAX_MATVECS",
    "NONFINITE",
    "PRECISION_FLOOR",
    "cast_like",
    "default_tol",
    "krylov_dtype",
    "krylov_like",
    "orthogonalize",
    "product",
    "random_orthogonal",
    "to_krylov",
]

# Status codes of the solvers' results (``EigResult.status``). Nothing can be raised inside
# compiled loops, so a run says how it ended in this field.
CONVERGED = 0
"""Every wanted pair met the tolerance."""
MAX_MATVECS = 1
"""The product budget ran out first."""
NONFINITE = 2
"""A NaN or Inf was met; nothing in the result is meaningful."""
PRECISION_FLOOR = 3
"""The tolerance is below what the products' precision can reach: the residuals stopped
improving above it. Raise ``tol`` (or use wider parameters); more products will not help."""


def _krylov_leaf_dtype(dtype: Any) -> jnp.dtype:
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def krylov_like(like: PyTree) -> PyTree:
    """``like`` as :class:`jax.ShapeDtypeStruct` leaves in Krylov precision (float32 or wider)."""
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(jnp.shape(s), _krylov_leaf_dtype(jnp.result_type(s))),
        like,
    )


def krylov_dtype(like: PyTree) -> jnp.dtype:
    """The dtype of the small dense Krylov work: float32, or float64 if any leaf is float64."""
    leaves = jax.tree_util.tree_leaves(like)
    return jnp.result_type(*[_krylov_leaf_dtype(jnp.result_type(x)) for x in leaves])


def to_krylov(tree: PyTree) -> PyTree:
    """Cast each leaf to Krylov precision (bfloat16 and float16 become float32)."""
    return jax.tree_util.tree_map(lambda a: a.astype(_krylov_leaf_dtype(a.dtype)), tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Cast each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda a, s: a.astype(jnp.result_type(s)), tree, like)


def product(op: Any) -> Callable[[PyTree], PyTree]:
    """``q -> A q`` on Krylov-precision vectors, running the product in the operator's dtypes."""
    like = op.like

    def apply(q: PyTree) -> PyTree:
        return to_krylov(op(cast_like(q, like)))

    return apply


def default_tol(like_or_dtype: Any) -> float:
    """The default relative residual tolerance for the least precise leaf.

    1e-10 when every leaf is float64, 1e-5 when the least precise is float32, and ``4 eps`` of
    a narrower dtype (about 3e-2 for bfloat16, 4e-3 for float16): the residual of a product
    computed in that dtype cannot fall much below ``eps * max|lambda|``.
    """
    if isinstance(like_or_dtype, str | np.dtype | type):
        dtypes = [jnp.dtype(like_or_dtype)]
    else:
        leaves = jax.tree_util.tree_leaves(like_or_dtype)
        dtypes = [jnp.dtype(jnp.result_type(x)) for x in leaves]
    worst = max(dtypes, key=lambda d: float(jnp.finfo(d).eps))
    if worst == jnp.float64:
        return 1e-10
    if worst == jnp.float32:
        return 1e-5
    return float(4 * jnp.finfo(worst).eps)


def _rows(basis: PyTree, num_rows: int | None) -> PyTree:
    if num_rows is None:
        return basis
    return jax.tree_util.tree_map(lambda b: b[:num_rows], basis)


def orthogonalize(
    basis: PyTree, w: PyTree, num_rows: int | None = None
) -> tuple[PyTree, jax.Array]:
    """Remove from ``w`` its components along the rows of a stacked orthonormal ``basis``.

    Two passes of classical Gram-Schmidt ("twice is enough", Giraud et al. 2005) keep a basis
    orthonormal to working precision in float32; each pass is one batched product with the
    basis. Rows that are zero (not filled yet) contribute nothing; ``num_rows`` (static) limits
    the work to the first rows when only those are filled.

    Args:
        basis: a pytree whose leaves carry a leading axis ``m`` of orthonormal (or zero) rows.
        w: the vector to orthogonalize, shaped like one row.
        num_rows: use only the first ``num_rows`` rows (a Python int), or all when ``None``.

    Returns:
        ``(w', h)``: the orthogonalized vector and the coefficients ``Q^T w`` summed over both
        passes (shape ``(num_rows,)``), which are the new column of ``Q^T A Q`` when ``w = A q``.
    """
    rows = _rows(basis, num_rows)
    h1 = tree_rmatvec(rows, w)
    w = tree_sub(w, tree_matvec(rows, h1))
    h2 = tree_rmatvec(rows, w)
    w = tree_sub(w, tree_matvec(rows, h2))
    return w, h1 + h2


def random_orthogonal(key: jax.Array, basis: PyTree, num_rows: int | None = None) -> PyTree:
    """A random unit vector orthogonal to the rows of ``basis`` (a restart after breakdown)."""
    like = jax.tree_util.tree_map(lambda b: jax.ShapeDtypeStruct(b.shape[1:], b.dtype), basis)
    fresh = tree_random_sphere(key, like)
    fresh, _ = orthogonalize(basis, fresh, num_rows)
    return tree_normalize(fresh)[0]
