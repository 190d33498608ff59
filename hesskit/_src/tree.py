"""Linear algebra on pytrees: inner products, norms, axpy, random probes, stacking.

Every helper here treats a pytree of arrays as one vector of the concatenated leaves, without
ever raveling it into a single host array. Reductions accumulate in the leaves' own floating
dtype (float64 leaves under ``jax_enable_x64`` stay float64).

Sharding: no helper reshapes a leaf, so a sharded leaf stays sharded and every reduction is a
contraction over the leaf's own axes, which XLA partitions into local sums and one all-reduce
of the (scalar or ``m``-vector) result; ``jnp.vdot`` ravels its operands, which gathers a leaf
sharded along any axis but the first. Under ``Explicit`` mesh axes the contractions name their
replicated output, and stacks and probes take their leaf's sharding (:func:`leaf_sharding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

# Accelerators default to reduced-precision float32 matmuls (TF32 on GPUs, bfloat16 passes on
# TPUs), which would cost the Krylov solvers their orthogonality; CPUs pay nothing for this.
_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = [
    "leaf_sharding",
    "replicated_like",
    "stacked_sharding",
    "tree_add",
    "tree_axpy",
    "tree_dim",
    "tree_matvec",
    "tree_normalize",
    "tree_norm",
    "tree_rmatvec",
    "tree_random_normal",
    "tree_random_rademacher",
    "tree_random_sphere",
    "tree_scale",
    "tree_stack",
    "tree_sub",
    "tree_unstack",
    "tree_vdot",
    "tree_zeros_like",
]


def _leaves(tree: PyTree) -> list[jax.Array]:
    return jax.tree_util.tree_leaves(tree)


def leaf_sharding(x: Any) -> NamedSharding | None:
    """The :class:`~jax.sharding.NamedSharding` a leaf's values must keep, or ``None``.

    An array (or :class:`jax.ShapeDtypeStruct`) on a mesh with ``Explicit`` axes carries its
    sharding in its type, and every array built from it must match; under ``Auto`` axes (or
    without a mesh) XLA propagates shardings itself and ``None`` is returned.
    """
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.ShapeDtypeStruct) else None
    if sharding is None and not isinstance(x, jax.ShapeDtypeStruct):
        try:
            sharding = jax.typeof(x).sharding
        except (TypeError, AttributeError):
            return None
    if not isinstance(sharding, NamedSharding):
        return None
    if not getattr(sharding.mesh, "_any_axis_explicit", False):
        return None
    return sharding


def replicated_like(x: Any) -> NamedSharding | None:
    """A replicated sharding on ``x``'s explicit mesh (for reductions of ``x``), or ``None``."""
    sharding = leaf_sharding(x)
    return None if sharding is None else NamedSharding(sharding.mesh, P())


def stacked_sharding(x: Any, lead: int = 1) -> NamedSharding | None:
    """``x``'s explicit sharding with ``lead`` unsharded leading axes added, or ``None``."""
    sharding = leaf_sharding(x)
    if sharding is None:
        return None
    spec = tuple(sharding.spec) + (None,) * (len(jnp.shape(x)) - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*((None,) * lead), *spec))


def _place(x: jax.Array, like: Any) -> jax.Array:
    # Lay a replicated value out in ``like``'s sharding: a local slice, no communication.
    sharding = leaf_sharding(like)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def _dot(a: jax.Array, b: jax.Array, axes: int, like: Any) -> jax.Array:
    # A contraction over ``b``'s own (last ``axes``) axes, no ravel. Under Explicit axes a
    # contraction over sharded axes must name its output sharding, which ``vmap`` (probes in
    # batches) cannot carry yet in jax 0.10; a product summed over those axes needs none and
    # compiles to the same fused reduction and one all-reduce.
    if leaf_sharding(like) is None:
        return jnp.tensordot(a, b, axes=axes, precision=_HIGHEST)
    return jnp.sum(a * b, axis=tuple(range(a.ndim - axes, a.ndim)))


def tree_dim(tree: PyTree) -> int:
    """Total number of scalars in ``tree`` (a static Python int)."""
    return int(sum(leaf.size for leaf in _leaves(tree)))


def tree_zeros_like(tree: PyTree) -> PyTree:
    """A pytree of zeros with the structure, shapes, dtypes (and explicit shardings) of ``tree``."""
    return jax.tree_util.tree_map(
        lambda s: jnp.zeros(jnp.shape(s), jnp.result_type(s), out_sharding=leaf_sharding(s)), tree
    )


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    r"""Inner product :math:`\langle x, y \rangle = \sum_{\text{leaves}} \sum x_i y_i`.

    Args:
        x: a pytree of real arrays.
        y: a pytree with the same structure and shapes as ``x``.

    Returns:
        A scalar in the result dtype of the leaves.

    Examples:
        >>> import jax.numpy as jnp
        >>> float(tree_vdot({"a": jnp.ones(3)}, {"a": jnp.arange(3.0)}))
        3.0
    """
    parts = jax.tree_util.tree_map(lambda a, b: _dot(a, b, jnp.ndim(b), b), x, y)
    leaves = _leaves(parts)
    if not leaves:
        return jnp.zeros(())
    return sum(leaves[1:], leaves[0])


def tree_norm(x: PyTree) -> jax.Array:
    """Euclidean norm of ``x`` over all leaves at once."""
    return jnp.sqrt(tree_vdot(x, x))


def tree_scale(alpha: jax.typing.ArrayLike, x: PyTree) -> PyTree:
    """``alpha * x`` leaf by leaf, keeping each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a: (alpha * a).astype(a.dtype), x)


def tree_add(x: PyTree, y: PyTree) -> PyTree:
    """``x + y`` leaf by leaf."""
    return jax.tree_util.tree_map(jnp.add, x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    """``x - y`` leaf by leaf."""
    return jax.tree_util.tree_map(jnp.subtract, x, y)


def tree_axpy(alpha: jax.typing.ArrayLike, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf by leaf, keeping the dtype of ``y``."""
    return jax.tree_util.tree_map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def tree_normalize(x: PyTree) -> tuple[PyTree, jax.Array]:
    """Return ``(x / ||x||, ||x||)``; a zero vector stays zero instead of turning into NaN."""
    norm = tree_norm(x)
    safe = jnp.where(norm > 0, norm, 1.0)
    return tree_scale(1.0 / safe, x), norm


def _flat_sample(sampler, key: jax.Array, like: PyTree) -> PyTree:
    # One draw for the whole pytree, split into leaves: a network with dozens of leaves would
    # otherwise compile dozens of random-bit generators into every solver that draws probes.
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if not leaves:
        return like
    dtype = jnp.result_type(*[jnp.result_type(leaf) for leaf in leaves])
    sizes = [int(np.prod(jnp.shape(leaf))) for leaf in leaves]
    flat = sampler(key, (sum(sizes),), dtype)
    out, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        # The draw does not depend on the sharding (the same probe on one device and on many);
        # each device then keeps its own slice of it.
        piece = flat[start : start + size].reshape(jnp.shape(leaf))
        out.append(_place(piece.astype(jnp.result_type(leaf)), leaf))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_random_normal(key: jax.Array, like: PyTree) -> PyTree:
    """Standard Gaussian probe with the structure, shapes and dtypes of ``like``."""
    return _flat_sample(jax.random.normal, key, like)


def tree_random_rademacher(key: jax.Array, like: PyTree) -> PyTree:
    """Rademacher (random sign) probe with the structure, shapes and dtypes of ``like``."""
    return _flat_sample(jax.random.rademacher, key, like)


def tree_random_sphere(key: jax.Array, like: PyTree) -> PyTree:
    """A sample uniform on the unit sphere of the *whole* parameter space.

    One direction across all leaves (a Gaussian normalised by its global norm), not a unit
    vector per leaf.
    """
    return tree_normalize(tree_random_normal(key, like))[0]


def tree_stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack ``k`` pytrees of equal structure into one pytree with a leading axis ``k``."""
    if len(trees) == 0:
        msg = "tree_stack needs at least one pytree, got an empty sequence."
        raise ValueError(msg)
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def tree_unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`tree_stack`: split the leading axis into a list of pytrees."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return []
    n = leaves[0].shape[0]
    return [jax.tree_util.tree_unflatten(treedef, [leaf[i] for leaf in leaves]) for i in range(n)]


def tree_rmatvec(basis: PyTree, x: PyTree) -> jax.Array:
    """Coefficients ``Q^T x`` of ``x`` against a stacked basis ``Q`` (leading axis ``m``)."""
    parts = jax.tree_util.tree_map(lambda q, a: _dot(q, a, a.ndim, a), basis, x)
    leaves = _leaves(parts)
    return sum(leaves[1:], leaves[0])


def tree_matvec(basis: PyTree, coeffs: jax.Array) -> PyTree:
    """Linear combination ``Q c`` of a stacked basis ``Q`` (leading axis ``m``) with ``c``.

    ``coeffs`` of shape ``(m,)`` gives one vector; ``(r, m)`` gives ``r`` combinations stacked
    along a new leading axis.
    """
    return jax.tree_util.tree_map(
        lambda q: jnp.tensordot(coeffs.astype(q.dtype), q, axes=1, precision=_HIGHEST), basis
    )
