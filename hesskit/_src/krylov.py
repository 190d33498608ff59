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

import enum
import functools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src.tree import (
    _HIGHEST,
    leaf_sharding,
    stacked_sharding,
    tree_matvec,
    tree_norm,
    tree_normalize,
    tree_random_sphere,
    tree_rmatvec,
    tree_sub,
    tree_vdot,
)

PyTree = Any

__all__ = [
    "CONVERGED",
    "KrylovState",
    "MAX_MATVECS",
    "NONFINITE",
    "PRECISION_FLOOR",
    "Status",
    "cast_like",
    "check_devices",
    "default_tol",
    "krylov_dtype",
    "init_state",
    "is_traced",
    "linearized",
    "loop_penalized",
    "loop_penalized_fn",
    "resolve_loop",
    "rows_per_block",
    "krylov_like",
    "block_copy_rows",
    "block_rows",
    "lanczos_step",
    "num_kept",
    "orthogonalize",
    "orthogonalize_filled",
    "product",
    "random_orthogonal",
    "ritz",
    "ritz_pairs",
    "rotate_rows",
    "to_krylov",
    "unflatten_rows",
    "vector_like",
]


class Status(enum.IntEnum):
    """How a solver's run ended (``EigResult.status``).

    Nothing can be raised inside compiled loops, so a run says how it ended in this field;
    compare it with these members (``int(res.status) == hk.Status.PRECISION_FLOOR``).
    """

    CONVERGED = 0
    """Every wanted pair met the tolerance."""
    MAX_MATVECS = 1
    """The product budget ran out first."""
    NONFINITE = 2
    """A NaN or Inf was met; nothing in the result is meaningful."""
    PRECISION_FLOOR = 3
    """The tolerance is below what the products' precision can reach: the residuals stopped
    improving above it. Raise ``tol`` (or use wider parameters); more products will not help."""


CONVERGED = int(Status.CONVERGED)
MAX_MATVECS = int(Status.MAX_MATVECS)
NONFINITE = int(Status.NONFINITE)
PRECISION_FLOOR = int(Status.PRECISION_FLOOR)


def _krylov_leaf_dtype(dtype: Any) -> jnp.dtype:
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def _struct(s: Any, dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(s), dtype, sharding=leaf_sharding(s))


def krylov_like(like: PyTree) -> PyTree:
    """``like`` as :class:`jax.ShapeDtypeStruct` leaves in Krylov precision (float32 or wider).

    Leaves on a mesh with ``Explicit`` axes keep their sharding.
    """
    return jax.tree_util.tree_map(
        lambda s: _struct(s, _krylov_leaf_dtype(jnp.result_type(s))), like
    )


def _devices_of(x: Any) -> tuple[int, ...] | None:
    sharding = getattr(x, "sharding", None)
    if isinstance(x, jax.core.Tracer) or sharding is None or not getattr(x, "committed", True):
        return None
    try:
        return tuple(d.id for d in sharding._device_assignment)
    except AttributeError:
        return None


def _leaf_name(path: str) -> str:
    # "[<flat index 0>][<flat index 1>]['params']['w']" -> "params['w']"
    path = re.sub(r"\[<flat index \d+>\]", "", path)
    return re.sub(r"^\['([^']*)'\]", r"\1", path) or "an array"


def check_devices(op: Any, name: str = "op") -> None:
    """Raise a clear error when the operator's arrays cannot meet in one computation.

    Parameters and operator arguments (data) placed on meshes over different devices (or the
    same devices in another order) cannot be combined by one compiled program.

    Raises:
        ValueError: naming two arrays that sit on different device assignments.
    """
    seen: dict[tuple[int, ...], str] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(op)[0]:
        devices = _devices_of(leaf)
        if devices is None:
            continue
        where = _leaf_name(jax.tree_util.keystr(path))
        if seen and devices not in seen:
            (other, first), *_ = seen.items()
            msg = (
                f"{name}'s arrays live on meshes that cannot be combined: {first} is on devices "
                f"{list(other)} and {where} (shape {jnp.shape(leaf)}) on devices "
                f"{list(devices)}. Put the parameters and the operator's arguments (data) on "
                "one mesh, e.g. jax.device_put(x, NamedSharding(mesh, P('data'))) with the "
                "parameters' mesh."
            )
            raise ValueError(msg)
        seen.setdefault(devices, where)


def vector_like(op: Any) -> PyTree:
    """The operator's vectors as :class:`jax.ShapeDtypeStruct` leaves, with their shardings.

    ``op.like`` holds shapes and dtypes only. When the operator's arrays live on a mesh with
    ``Explicit`` axes, every vector a solver makes (probes, stacks) must carry the sharding of
    the products, which is read off an abstract evaluation of one product (no computation).
    Under ``Auto`` axes XLA propagates the products' sharding and ``op.like`` is returned.
    """
    if not any(leaf_sharding(x) is not None for x in jax.tree_util.tree_leaves(op)):
        return op.like
    if all(s.sharding is not None for s in jax.tree_util.tree_leaves(op.like)):
        # Already read off (see with_vector_like): a linearized operator cannot be evaluated on
        # unsharded zeros, its residuals fix the tangents' sharding.
        return op.like
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), op.like)
    out = jax.eval_shape(op, zeros)
    return jax.tree_util.tree_map(
        lambda o, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=leaf_sharding(o)),
        out,
        op.like,
    )


def with_vector_like(lin: Any, op: Any) -> Any:
    """``lin`` (``op`` linearized) with ``op``'s :func:`vector_like` as its ``like``.

    Under ``Explicit`` mesh axes the vectors' shardings are read off an abstract product of
    ``op``; the linearized operator's own product only accepts tangents that already carry them.
    """
    if lin is op:
        return op
    like = vector_like(op)
    if like is op.like:
        return lin
    out = lin.__replace__()
    out.like = like
    return out


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


def num_kept(k: int, m: int) -> int:
    """Ritz vectors a thick restart keeps: the ``k`` wanted plus about half the free space.

    TRLan's rule of thumb: more kept vectors speed the convergence of the wanted ones, fewer
    leave room for new directions.
    """
    return min(m - 1, k + max(1, (m - k) // 2))


def _rows(basis: PyTree, num_rows: int | None) -> PyTree:
    if num_rows is None:
        return basis
    return jax.tree_util.tree_map(lambda b: b[:num_rows], basis)


def _masked(h: jax.Array, filled: jax.Array | None) -> jax.Array:
    if filled is None:
        return h
    return jnp.where(jnp.arange(h.shape[0]) < filled, h, 0.0).astype(h.dtype)


def orthogonalize(
    basis: PyTree,
    w: PyTree,
    num_rows: int | None = None,
    *,
    filled: jax.Array | None = None,
) -> tuple[PyTree, jax.Array]:
    """Remove from ``w`` its components along the rows of a stacked orthonormal ``basis``.

    Two passes of :func:`orthogonalize_filled` ("twice is enough", Giraud et al. 2005) keep a
    basis orthonormal to working precision in float32. ``num_rows`` (static) limits the work
    to the first rows; ``filled`` (traced) masks the coefficients of the rows at and past it,
    so stale rows left by a restart are ignored.

    Args:
        basis: a pytree whose leaves carry a leading axis ``m`` of orthonormal rows.
        w: the vector to orthogonalize, shaped like one row.
        num_rows: use only the first ``num_rows`` rows (a Python int), or all when ``None``.
        filled: the number of valid leading rows (a traced int), or all when ``None``.

    Returns:
        ``(w', h)``: the orthogonalized vector and the coefficients ``Q^T w`` summed over both
        passes, which form the new column of ``Q^T A Q`` when ``w = A q``.
    """
    rows = _rows(basis, num_rows)
    count = jax.tree_util.tree_leaves(rows)[0].shape[0] if filled is None else filled
    h = None
    for _ in range(2):
        w, c = orthogonalize_filled(rows, w, count)
        h = c if h is None else h + c
    return w, h


def random_orthogonal(
    key: jax.Array,
    basis: PyTree,
    *,
    filled: jax.Array | None = None,
    like: PyTree | None = None,
) -> PyTree:
    """A random unit vector orthogonal to the first ``filled`` rows of ``basis``.

    ``like`` gives the vector's leaf shapes when the stack holds flattened rows.
    """
    if like is None:
        like = jax.tree_util.tree_map(lambda b: b[0], basis)
    like = krylov_like(like)
    fresh = tree_random_sphere(key, like)
    fresh, _ = orthogonalize(basis, fresh, filled=filled)
    return tree_normalize(fresh)[0]


def _set_row(stack: PyTree, j: Any, x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda b, v: b.at[j].set(v.reshape(b.shape[1:]).astype(b.dtype)), stack, x
    )


def unflatten_rows(stack: PyTree, like: PyTree) -> PyTree:
    """A stack of rows (leading axis kept) reshaped to ``like``'s leaf shapes (free if equal)."""
    return jax.tree_util.tree_map(lambda b, s: b.reshape((b.shape[0], *jnp.shape(s))), stack, like)


def _rotate_leaf(leaf: jax.Array, coeffs: jax.Array, num_blocks: int | None) -> jax.Array:
    # Rows 0..r-1 become coeffs @ leaf, computed a column block at a time and written back
    # into the same buffer, so a restart needs a block of temporary rows, not a third stack.
    r = coeffs.shape[0]
    c = coeffs.astype(leaf.dtype)
    axis = _block_axis(leaf, _MIN_ROTATE_BLOCKS if num_blocks is None else num_blocks)
    if axis is None:
        return leaf.at[:r].set(jnp.tensordot(c, leaf, axes=1, precision=_HIGHEST))
    size = leaf.shape[axis]
    if num_blocks is None:
        num_blocks = _rotate_blocks(leaf, size)
    width = -(-size // num_blocks)
    # The last block is shifted back to end at the edge and writes only its columns not yet
    # rotated (each column rotates on its own). A separate tail slice made XLA copy the whole
    # stack when the axis was not a multiple of num_blocks.
    count = -(-size // width)
    shape = [1] * leaf.ndim
    shape[axis] = width

    def block(i, buf):
        done = i * width
        start = jnp.minimum(done, size - width)
        cols = jax.lax.dynamic_slice_in_dim(buf, start, width, axis=axis)
        new = jnp.tensordot(c, cols, axes=1, precision=_HIGHEST)
        fresh = (start + jnp.arange(width) >= done).reshape(shape)
        new = jnp.where(fresh, new, jax.lax.slice_in_dim(cols, 0, r, axis=0))
        return jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=axis)

    return jax.lax.fori_loop(0, count, block, leaf)


# On CPU a restart's rotation reads its column blocks of all m rows about once more from
# cache: blocks of a few MiB (measured on a 20 x 1e7 float32 stack: 8 blocks of 100 MiB took
# 0.27 s, 80 of 10 MiB 0.18 s, 320 of 2.5 MiB 0.19 s). Elsewhere the fewest blocks are fastest.
_ROTATE_BLOCK_BYTES = 8 << 20
_MIN_ROTATE_BLOCKS = 8


def _rotate_blocks(leaf: jax.Array, size: int) -> int:
    """Column blocks of a restart's rotation of ``leaf`` along an axis of ``size`` columns."""
    if jax.default_backend() != "cpu":
        return _MIN_ROTATE_BLOCKS
    nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    wanted = -(-nbytes // _ROTATE_BLOCK_BYTES)
    return int(max(_MIN_ROTATE_BLOCKS, min(wanted, size // 2)))


def _block_axis(leaf: jax.Array, num_blocks: int) -> int | None:
    # The axis a restart's rotation walks in blocks: one the stack is not sharded along, since
    # a dynamic slice of a sharded axis gathers it. Under Auto axes the sharding is not known
    # while tracing, so on more than one device the rotation runs in one piece (a temporary
    # of r rows, sharded like the basis).
    sharding = leaf_sharding(leaf)
    if sharding is None and jax.device_count() > 1:
        return None
    spec = () if sharding is None else tuple(sharding.spec)
    for axis in range(1, leaf.ndim):
        unsharded = axis >= len(spec) or spec[axis] is None
        if unsharded and leaf.shape[axis] >= 2 * num_blocks:
            return axis
    return None


def rotate_rows(stack: PyTree, coeffs: jax.Array, *, num_blocks: int | None = None) -> PyTree:
    """Replace the first ``r`` rows of a stacked basis by ``coeffs @ rows`` (in place).

    Used by thick restarts to keep ``r`` Ritz vectors ``Q s`` in the basis's own buffer; the
    rows past ``r`` are left stale (callers mask them, see :func:`orthogonalize`).

    Args:
        stack: a pytree whose leaves carry a leading axis ``m``.
        coeffs: shape ``(r, m)``, ``r <= m``.
        num_blocks: column blocks per leaf; the temporary is ``r / num_blocks`` rows. Default:
            8, and on CPU more, so a block of all ``m`` rows is about 8 MiB.

    Returns:
        The stack with rows ``0..r-1`` replaced.
    """
    return jax.tree_util.tree_map(lambda a: _rotate_leaf(a, coeffs, num_blocks), stack)


class KrylovState(NamedTuple):
    """A Lanczos basis being filled, with its projected matrix.

    Attributes:
        basis: the orthonormal rows ``Q`` (leading axis ``m``), in the storage dtype.
        images: ``A Q`` row by row (for true residuals without new products), or ``None``.
        proj: ``Q^T A Q``, shape ``(m, m)``, in Krylov precision.
        q: the next direction (unit norm, orthogonal to the filled rows).
        beta: the norm of the last residual, the coupling of ``q`` to the basis.
        key: PRNG key for fresh directions after a breakdown.
        scale: a running bound on ``||A||`` (for the breakdown test).
        alive: False once a breakdown ended a run that does not restart (plain Lanczos).
        ok: False once a NaN or Inf was met.
        chain_start: the first row of the current Lanczos chain (0, the kept rows after a
            thick restart, or the row of a fresh or repaired direction): within a chain the
            entries of ``Q^T A Q`` below the band are known to be zero.
    """

    basis: PyTree
    images: PyTree
    proj: jax.Array
    q: PyTree
    beta: jax.Array
    key: jax.Array
    scale: jax.Array
    alive: jax.Array
    ok: jax.Array
    chain_start: jax.Array


def init_state(
    q0: PyTree,
    key: jax.Array,
    m: int,
    *,
    with_images: bool,
    storage_dtype: Any = None,
) -> KrylovState:
    """An empty basis of ``m`` rows whose first direction is ``q0`` (unit, Krylov precision)."""
    dtype = krylov_dtype(q0)

    def stack(a):
        # Rows keep their leaf's shape, so the stacks keep the parameters' sharding on their
        # non-leading axes. (Flattened rows avoided a copy of the stacks XLA:CPU makes per step
        # for leaves of several dimensions, but lost the sharding: tests/test_sharding.py.)
        dtype = a.dtype if storage_dtype is None else storage_dtype
        return jnp.zeros((m, *a.shape), dtype, out_sharding=stacked_sharding(a))

    zeros = jax.tree_util.tree_map(stack, q0)
    return KrylovState(
        basis=zeros,
        images=jax.tree_util.tree_map(stack, q0) if with_images else None,
        proj=jnp.zeros((m, m), dtype),
        q=q0,
        beta=jnp.zeros((), dtype),
        key=key,
        scale=jnp.zeros((), dtype),
        alive=jnp.asarray(True),
        ok=jnp.asarray(True),
        chain_start=jnp.zeros((), jnp.int32),
    )


# Bytes of basis rows one Gram-Schmidt block reads on CPU: small enough that the block is
# still in cache when the same rows are read again to subtract their components.
_CPU_BLOCK_BYTES = 4 << 20


def block_rows(basis: PyTree) -> int:
    """Rows per block of :func:`orthogonalize_filled` for this basis (a Python int).

    On CPU, a few MiB of rows, so the second read of each block hits the cache; on GPUs and
    TPUs, all rows at once (their bandwidth makes the masked rows cheaper than a loop).
    """
    leaves = jax.tree_util.tree_leaves(basis)
    like = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in leaves]
    return rows_per_block(like, leaves[0].shape[0])


def rows_per_block(like: PyTree, m: int) -> int:
    """:func:`block_rows` for a basis of ``m`` rows shaped like ``like``."""
    if jax.default_backend() != "cpu":
        return m
    leaves = jax.tree_util.tree_leaves(like)
    row_bytes = sum(
        int(np.prod(np.shape(x) if not hasattr(x, "shape") else x.shape))
        * jnp.dtype(_krylov_leaf_dtype(jnp.result_type(x))).itemsize
        for x in leaves
    )
    return int(min(m, max(1, _CPU_BLOCK_BYTES // max(row_bytes, 1))))


def block_copy_rows(like: PyTree, m: int) -> int:
    """Rows a Gram-Schmidt block holds as a temporary (0 when one block is the whole basis)."""
    size = rows_per_block(like, m)
    return 0 if size >= m else size


def _batch_reduced(reduce: Callable[[jax.Array], jax.Array], doc: str) -> Callable:
    """``x -> x``, and under ``vmap`` ``reduce`` of the batch, returned unbatched."""

    @jax.custom_batching.custom_vmap
    def fn(x: jax.Array) -> jax.Array:
        return x

    @fn.def_vmap
    def _rule(axis_size, in_batched, x):
        del axis_size
        return (reduce(x) if in_batched[0] else x), False

    fn.__doc__ = doc
    return fn


batch_max = _batch_reduced(
    jnp.max,
    """``x`` itself; under ``vmap``, its largest member, unbatched.

    For sizes that pick a branch or a trip count: vmap turns a ``switch`` or ``cond`` with a
    batched index into all its branches (at ``krylov_dim`` 160, eighs of 32, 128 and 160 rows
    at every Ritz check; ``jit(vmap(eigsh))`` over 4 keys took 95x a Python loop of the same
    solves). Where a size large enough for the fullest member serves every member (rows past
    a member's own count are masked), one index for the batch keeps the branch a branch.
    """,
)
batch_any = _batch_reduced(
    jnp.any,
    """``x`` itself; under ``vmap``, whether any member holds, unbatched (see :func:`cond_any`).""",
)


@jax.custom_batching.custom_vmap
def _pick(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    # Reached only where ``pred`` holds, unless batched: no select, so no copy of ``old``.
    del pred, old
    return new


@_pick.def_vmap
def _pick_rule(axis_size, in_batched, pred, new, old):
    pred_batched, new_batched, old_batched = in_batched

    def lift(x, batched):
        return x if batched else jax.lax.broadcast(x, (axis_size,))

    new = jax.tree_util.tree_map(lift, new, new_batched)
    old = jax.tree_util.tree_map(lift, old, old_batched)
    pred = lift(pred, pred_batched)

    def select(n, o):
        p = jax.lax.broadcast_in_dim(pred, n.shape, (0,))
        return jax.lax.select(p, n, o)

    out = jax.tree_util.tree_map(select, new, old)
    return out, jax.tree_util.tree_map(lambda _: True, out)


def cond_any(pred: jax.Array, true_fn: Callable, false_fn: Callable, operand: PyTree) -> PyTree:
    """``jax.lax.cond(pred, true_fn, false_fn, operand)`` that stays a branch under ``vmap``.

    vmap turns a ``cond`` with a batched predicate into both branches for every member: a
    restart, a verification or a second Gram-Schmidt pass at every step of every member.
    Here the branch runs once when any member needs it and each member keeps its own choice;
    outside ``vmap`` it is the plain ``cond``.
    """

    def chosen(x):
        return _pick(pred, true_fn(x), false_fn(x))

    return jax.lax.cond(batch_any(pred), chosen, false_fn, operand)


def orthogonalize_filled(
    basis: PyTree, w: PyTree, filled: Any, *, rows_per_block: int | None = None
) -> tuple[PyTree, jax.Array]:
    """One Gram-Schmidt pass of ``w`` against the first ``filled`` rows, reading only those.

    The rows are taken a block at a time (classical Gram-Schmidt within a block, modified
    between blocks), and only the blocks that hold filled rows are read, so a step early in a
    large basis costs what its filled rows cost, not the whole basis. Rows at and past
    ``filled`` (stale after a restart) are masked.

    Args:
        basis: a pytree whose leaves carry a leading axis ``m`` of orthonormal rows.
        w: the vector to orthogonalize, shaped like one row.
        filled: the number of valid leading rows (a Python or traced int).
        rows_per_block: rows per block (static); default :func:`block_rows`.

    Returns:
        ``(w', c)``: the orthogonalized vector and the coefficients ``Q^T w``, shape ``(m,)``.
    """
    m = jax.tree_util.tree_leaves(basis)[0].shape[0]
    size = block_rows(basis) if rows_per_block is None else int(rows_per_block)
    dtype = krylov_dtype(w)

    def whole(w):
        c = _masked(tree_rmatvec(basis, w), filled)
        return tree_sub(w, tree_matvec(basis, c)), c.astype(dtype)

    if size >= m or (isinstance(filled, int) and 2 * filled > m):
        return whole(w)

    def block(b, carry):
        w, h = carry
        # The last block is shifted back to fit; rows it shares with the previous block are
        # masked by their index.
        start = jnp.minimum(b * size, m - size)
        rows = jax.tree_util.tree_map(
            lambda q: jax.lax.dynamic_slice_in_dim(q, start, size, axis=0), basis
        )
        idx = start + jnp.arange(size)
        c = tree_rmatvec(rows, w)
        c = jnp.where((idx >= b * size) & (idx < filled), c, 0.0).astype(c.dtype)
        return tree_sub(w, tree_matvec(rows, c)), h.at[idx].add(c.astype(h.dtype))

    # Under vmap the fullest member sets the blocks read and the branch (the others mask).
    most = batch_max(jnp.asarray(filled))

    def blocked(w):
        num_blocks = (most + size - 1) // size
        return jax.lax.fori_loop(0, num_blocks, block, (w, jnp.zeros((m,), dtype)))

    # Each block is sliced out (a copy), so past about half the rows one masked product with
    # the whole basis is faster (measured on the digits MLP's 160-row basis: blocked 0.7 ms at
    # 20 rows and 5.5 ms at 140, whole 3.6 ms at any fill).
    return jax.lax.cond(2 * most > m, whole, blocked, w)


def _row(stack: PyTree, i: Any) -> PyTree:
    return jax.tree_util.tree_map(
        lambda b: jax.lax.dynamic_index_in_dim(b, i, axis=0, keepdims=False), stack
    )


def _axpy(a: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """``y - a x`` leaf by leaf, in ``y``'s dtypes."""
    return jax.tree_util.tree_map(lambda u, v: (v - a * u.astype(v.dtype)).astype(v.dtype), x, y)


def lanczos_step(
    st: KrylovState, w: PyTree, j: Any, *, restart_on_breakdown: bool = True
) -> KrylovState:
    """Store ``q_j = st.q`` and ``w = A q_j`` as row ``j`` and make the next direction.

    The new column of ``Q^T A Q`` is the Gram-Schmidt coefficients of ``w`` against the rows
    filled so far (``0..j``): right after a thick restart it holds the coupling to the kept
    Ritz vectors, otherwise ``alpha_j`` and ``beta_{j-1}``. The three-term recurrence is
    applied first (``w - beta_{j-1} q_{j-1} - alpha_j q_j``, two rows), then one pass of
    Gram-Schmidt against the filled rows (:func:`orthogonalize_filled`) removes the drift, and
    a second pass runs only when that one cancelled much of the vector (the DGKS criterion:
    the norm fell below ``1/sqrt(2)`` of what it was, as right after a restart, where the
    coupling to the kept vectors is not in the recurrence). On a breakdown (an invariant
    subspace: the residual is rounding noise) the run continues with a fresh random direction
    with zero coupling, as ARPACK does, or stops filling when ``restart_on_breakdown`` is False.

    The projected matrix is the symmetric part of ``Q^T A Q``. A float32 network product is
    not exactly symmetric, so the coefficients ``q_i^T A q_j`` above the band carry its
    asymmetry while ``q_j^T A q_i`` below it are zero within a chain (``A q_i`` lies in the
    span of the rows up to ``i + 1`` by construction). Entries for rows of the current chain
    are averaged with those known values; mirroring the upper ones instead doubled the
    mismatch between the Ritz pairs and the operator, which grows with the basis: on the
    3.3M-parameter LeNet it lifted the true residuals of converged top pairs from 1e-7 to
    1.4e-5 of ``||A||`` over 114 products, past the float32 default ``tol``. Rows before the
    chain (kept Ritz vectors, a chain ended by a fresh direction) keep the mirrored value,
    the only estimate of their coupling to it.

    Args:
        st: the state; ``st.q`` is the direction whose product is ``w``.
        w: ``A q_j`` in Krylov precision.
        j: the row to fill (a Python or traced int).
        restart_on_breakdown: continue after a breakdown (eigensolvers) or stop (quadrature).

    Returns:
        The state with row ``j`` filled and ``q``, ``beta`` set to the next direction.

    References:
        Daniel, Gragg, Kaufman and Stewart, *Reorthogonalization and stable algorithms for
        updating the Gram-Schmidt QR factorization*, Math. Comp. 30(136), 1976.
    """
    m = st.proj.shape[0]
    dtype = st.proj.dtype
    eps = jnp.finfo(dtype).eps
    # Write row j first, then read: XLA then updates the stacks in place (reading a stack
    # before writing it made XLA copy it, measured with memory_analysis).
    basis = _set_row(st.basis, j, st.q)
    images = None if st.images is None else _set_row(st.images, j, w)
    prev = jnp.maximum(j - 1, 0)
    # The coupling to the previous row as recorded at the previous step (zero at j = 0, right
    # after a restart and after a fresh direction).
    b_prev = jnp.where(j > 0, st.proj[j, prev], 0.0).astype(dtype)
    w = _axpy(b_prev, _row(basis, prev), w)
    alpha = tree_vdot(st.q, w).astype(dtype)
    w = _axpy(alpha, st.q, w)
    before = tree_norm(w)
    w, c = orthogonalize_filled(basis, w, j + 1)
    after = tree_norm(w)

    def again(w):
        return orthogonalize_filled(basis, w, j + 1)

    w, c2 = cond_any(after < 0.7071 * before, again, lambda w: (w, jnp.zeros_like(c)), w)
    idx = jnp.arange(m)
    h = c + c2 + jnp.where(idx == j, alpha, 0.0) + jnp.where((idx == j - 1), b_prev, 0.0)
    h = h.astype(dtype)
    w, beta = tree_normalize(w)
    beta = beta.astype(dtype)
    finite = jnp.all(jnp.isfinite(h)) & jnp.isfinite(beta)
    scale = jnp.maximum(st.scale, jnp.max(jnp.abs(h)) + beta)
    # A residual of a few eps * ||A|| is rounding noise. Eigensolvers treat only that as a
    # breakdown: replacing a small but genuine residual by a fresh direction would cut the
    # wanted pairs off from their residual direction (they then stall at that residual; the
    # looser ``m * eps * ||A||`` did so on a spectrum whose bulk sits at 1e-5 of ||A||).
    # Quadrature stops at the looser bound, where the remaining weights are negligible.
    noise = (4 if restart_on_breakdown else m) * eps * scale
    breakdown = beta <= noise
    key, sub = jax.random.split(st.key)
    if restart_on_breakdown:
        q_next = cond_any(
            breakdown,
            lambda w: random_orthogonal(sub, basis, filled=j + 1, like=st.q),
            lambda w: w,
            w,
        )
        alive = st.alive
    else:
        alive = st.alive & ~breakdown & finite
        q_next = jax.tree_util.tree_map(lambda x: jnp.where(alive, x, 0.0).astype(x.dtype), w)
    beta = jnp.where(breakdown, 0.0, beta).astype(dtype)
    lower = st.proj[j]
    in_chain = (idx >= st.chain_start) & (idx < j)
    h = jnp.where(in_chain, 0.5 * (h + lower), h).astype(dtype)
    col = jnp.where(idx == j + 1, beta, jnp.where(idx <= j, h, 0.0)).astype(dtype)
    proj = st.proj.at[:, j].set(col).at[j, :].set(col)
    return KrylovState(
        basis=basis,
        images=images,
        proj=proj,
        q=q_next,
        beta=beta,
        key=key,
        scale=scale,
        alive=alive,
        ok=st.ok & (finite | ~st.alive),
        chain_start=st.chain_start,
    )


@jax.custom_batching.custom_vmap
def ritz(proj: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ritz values (ascending) and coefficient vectors of the projected matrix ``Q^T A Q``.

    Every symmetric eigendecomposition of hesskit's solvers goes through here. Under ``vmap``
    on CPU the batch runs one matrix after another (see :func:`_ritz_batched`).
    """
    theta, s = jnp.linalg.eigh(proj)
    return theta, s


@ritz.def_vmap
def _ritz_batched(axis_size, in_batched, proj):
    # jaxlib's batched LAPACK eigh splits its batch over XLA:CPU's intra-op pool and blocks
    # until its pieces finish. Under vmap a switch or cond runs all its branches, so two
    # batched eighs become ready together, each holds a pool thread while waiting for the
    # other's, and on a 2-thread pool the program never ends (found with jit(vmap(eigsh))).
    # One matrix at a time keeps each eigh on its own thread; accelerators keep the batch.
    del axis_size
    if not in_batched[0]:
        return ritz(proj), (False, False)
    out = jax.lax.platform_dependent(
        proj,
        cpu=lambda p: jax.lax.map(ritz, p),
        default=lambda p: tuple(jnp.linalg.eigh(p)),
    )
    return out, (True, True)


def _ritz_vectors(st: KrylovState, coeffs: jax.Array) -> tuple[PyTree, PyTree]:
    """The Ritz vectors ``Q c_i`` and their images ``A Q c_i``, stacked along ``r``."""
    vectors = unflatten_rows(to_krylov(tree_matvec(st.basis, coeffs)), st.q)
    images = unflatten_rows(to_krylov(tree_matvec(st.images, coeffs)), st.q)
    return vectors, images


def ritz_pairs(
    st: KrylovState, coeffs: jax.Array, theta: jax.Array
) -> tuple[jax.Array, PyTree, jax.Array]:
    """Refined Ritz pairs ``(values, vectors, residual norms)`` from the stored ``A Q``.

    ``coeffs`` has shape ``(r, m)`` (rows of Ritz coefficients) and ``theta`` shape ``(r,)``.
    Ritz values from the projected matrix carry rounding of order ``eps * ||A||``, which in
    float32 swamps small eigenvalues next to a large top end (a Hessian's negative ones). The
    Rayleigh quotient of each Ritz vector errs only by ``eps * |lambda|`` plus the squared
    residual over the gap; it is taken as ``theta + y^T (A y - theta y) / y^T y`` so the small
    correction, not the whole quotient, carries the rounding. No products are spent.
    """
    vectors, images = _ritz_vectors(st, coeffs)

    def refine(a, v, lam):
        r = tree_sub(a, jax.tree_util.tree_map(lambda x: (lam * x).astype(x.dtype), v))
        shift = tree_vdot(v, r) / tree_vdot(v, v)
        r = tree_sub(r, jax.tree_util.tree_map(lambda x: (shift * x).astype(x.dtype), v))
        return lam + shift, tree_norm(r)

    values, residuals = jax.vmap(refine)(images, vectors, theta)
    return values, vectors, residuals


def ritz_residuals(st: KrylovState, coeffs: jax.Array, theta: jax.Array) -> PyTree:
    """The residuals ``A y_i - theta_i y_i`` of Ritz pairs ``y_i = Q c_i``, from the stored ``A Q``.

    ``coeffs`` has shape ``(r, m)`` and ``theta`` shape ``(r,)``; the residuals are stacked along
    a leading axis ``r``. In exact arithmetic each is orthogonal to the basis: it is the
    direction the basis lacks to improve that pair. No products are spent.
    """
    vectors, images = _ritz_vectors(st, coeffs)
    return jax.tree_util.tree_map(
        lambda a, v: a - (theta.reshape((-1,) + (1,) * (v.ndim - 1)) * v).astype(v.dtype),
        images,
        vectors,
    )


# XLA:CPU primitives that run many times slower inside a while loop than outside it
# (jax-ml/jax#12868): the loop body loses the thunk runtime's fast kernels for them.
_LOOP_PENALIZED = frozenset({"conv_general_dilated"})


def _primitives(jaxpr: Any) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        stack = list(eqn.params.values())
        while stack:
            p = stack.pop()
            if isinstance(p, tuple | list):
                stack.extend(p)
            elif hasattr(p, "eqns"):
                names |= _primitives(p)
            elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                names |= _primitives(p.jaxpr)
    return names


@functools.lru_cache(maxsize=256)
def _product_primitives(treedef: Any, avals: tuple) -> frozenset[str]:
    leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    op = jax.tree_util.tree_unflatten(treedef, leaves)
    v = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), op.like)
    return frozenset(_primitives(jax.make_jaxpr(lambda o, x: o(x))(op, v).jaxpr))


def loop_penalized_fn(fn: Callable, *args: Any) -> bool:
    """Whether ``fn(*args)`` would run slower in a loop body: CPU and a penalized primitive.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; nothing is computed.
    """
    if jax.default_backend() != "cpu":
        return False
    return bool(_primitives(jax.make_jaxpr(fn)(*args).jaxpr) & _LOOP_PENALIZED)


def loop_penalized(op: Any) -> bool:
    """Whether the host loop is the faster choice: CPU, with a product XLA slows in loops."""
    if jax.default_backend() != "cpu":
        return False
    leaves, treedef = jax.tree_util.tree_flatten(op)
    avals = tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves)
    return bool(_product_primitives(treedef, avals) & _LOOP_PENALIZED)


def is_traced(*trees: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(trees)
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


LOOPS = ("auto", "compiled", "host")


def resolve_loop(loop: str, op: Any, *trees: Any) -> str:
    """The loop strategy to run: ``"compiled"`` or ``"host"`` (see :func:`hesskit.eigsh`).

    ``"auto"`` is ``"host"`` on CPU outside traced code when the product holds a primitive
    XLA:CPU slows inside loops (convolutions, jax-ml/jax#12868), and ``"compiled"`` otherwise.

    Raises:
        ValueError: an unknown ``loop``, or ``"host"`` inside ``jit``/``vmap``.
    """
    if loop not in LOOPS:
        msg = f"loop must be one of {LOOPS}, got {loop!r}."
        raise ValueError(msg)
    traced = is_traced(op, *trees)
    if loop == "host" and traced:
        msg = 'loop="host" cannot run inside jit or vmap; use loop="compiled" (or "auto").'
        raise ValueError(msg)
    if loop == "auto":
        return "host" if not traced and loop_penalized(op) else "compiled"
    return loop


@jax.jit
def linearized(op: Any) -> Any:
    """``op.linearize()`` as a pytree that crosses ``jit`` boundaries (host-dispatched loops)."""
    # jax.linearize returns a Partial: the linearized operator is a pytree whose residuals are
    # leaves, and jit returns the same static function each call, so the
    # per-step functions taking it compile once.
    return op.linearize()
