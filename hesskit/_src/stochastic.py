"""Randomized trace and diagonal estimators for operators known only through products.

Probes are Rademacher vectors shaped like the operator's pytree
(:func:`~hesskit.tree_random_rademacher`, drawn at Krylov precision). They are applied in chunks
(one :func:`jax.vmap` of the product per chunk of ``chunk_size`` probes, default
:data:`PROBE_CHUNK`, chunks run one after another by a :func:`jax.lax.scan`, or dispatched one by
one from Python with ``loop="host"``), so memory stays at one chunk of vectors (plus Hutch++'s
basis) while the hardware sees batched products.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hesskit._src import krylov, memory, validation
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import (
    stacked_sharding,
    tree_add,
    tree_matvec,
    tree_norm,
    tree_normalize,
    tree_random_rademacher,
    tree_rmatvec,
    tree_scale,
    tree_sub,
    tree_vdot,
    tree_zeros_like,
)

PyTree = Any

__all__ = ["PROBE_CHUNK", "Estimate", "diagonal", "trace"]

TRACE_METHODS = ("hutchinson", "hutch++")

PROBE_CHUNK = 25
"""The default ``chunk_size``: probes applied together in one batched product."""


class Estimate(NamedTuple):
    """A randomized estimate with its standard error.

    Attributes:
        value: the estimate (a scalar in the Krylov dtype: the operator's dtype for float32
            and float64 parameters, float32 for bfloat16 ones).
        stderr: the estimated standard error of ``value`` (sample standard deviation of the
            random part over the square root of its number of probes); ``inf`` when the random
            part has fewer than two probes, so no spread can be measured.
        num_matvecs: the number of operator products spent.
    """

    value: jax.Array
    stderr: jax.Array
    num_matvecs: jax.Array


def _batched(fn, xs: PyTree) -> PyTree:
    """``fn`` over the leading axis of ``xs`` at once; a batch of one runs unbatched.

    A size-1 vmap is not free: XLA turns in-place row updates inside it into copies.
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if n == 1:
        one = fn(jax.tree_util.tree_map(lambda a: a[0], xs))
        return jax.tree_util.tree_map(lambda a: a[None], one)
    return jax.vmap(fn)(xs)


def _fold_chunks(body, consts: tuple, carry: PyTree, xs: PyTree, chunk: int, host: bool) -> PyTree:
    """``carry = body(consts, carry, xs[i : i + chunk])`` over consecutive chunks of ``xs``.

    ``xs`` is a pytree of arrays sharing a leading axis ``n``; ``consts`` (the linearized
    operator, Hutch++'s basis) are the same for every chunk. Compiled (``host=False``), the
    chunks run one after another in one :func:`jax.lax.scan`; a ragged last chunk (``n % chunk``
    entries) runs in the same loop as the other branch of a :func:`jax.lax.cond`: run after the
    loop instead, XLA holds its buffers on top of the loop's (measured), doubling the peak.
    From the host (``host=True``, ``body`` a module-level function), each chunk is one compiled
    call dispatched from Python with the carry donated, the ragged one a second compile of its
    size: the same arithmetic on the same chunks, without the convolution-in-a-loop penalty of
    XLA:CPU (jax-ml/jax#12868).
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    full, rest = divmod(n, chunk)
    if host:
        step = _host_body(body)
        bounds = [(i * chunk, (i + 1) * chunk) for i in range(full)]
        bounds += [(full * chunk, n)] if rest else []
        for lo, hi in bounds:
            carry = step(consts, carry, jax.tree_util.tree_map(lambda a, s=slice(lo, hi): a[s], xs))
        return carry
    if full == 0 or (full == 1 and rest == 0):
        # One chunk: a one-step scan would stay a while loop (see mean_hessian_operator).
        return body(consts, carry, xs)
    if rest == 0:
        batches = jax.tree_util.tree_map(lambda a: a.reshape(full, chunk, *a.shape[1:]), xs)
        return jax.lax.scan(lambda c, x: (body(consts, c, x), None), carry, batches)[0]
    num = full + 1

    def pad(a: jax.Array) -> jax.Array:
        # Filler entries (copies of the first ones) are never read: the ragged branch cuts them.
        return jnp.concatenate([a, a[: num * chunk - n]]).reshape(num, chunk, *a.shape[1:])

    def whole(c: PyTree, x: PyTree) -> PyTree:
        return body(consts, c, x)

    def ragged(c: PyTree, x: PyTree) -> PyTree:
        return body(consts, c, jax.tree_util.tree_map(lambda a: a[:rest], x))

    def step(c: PyTree, ix: tuple) -> tuple[PyTree, None]:
        i, x = ix
        return jax.lax.cond(i < full, whole, ragged, c, x), None

    return jax.lax.scan(step, carry, (jnp.arange(num), jax.tree_util.tree_map(pad, xs)))[0]


@functools.cache
def _host_body(body):
    # One compiled chunk per body, operator type and chunk shape; the carry is written in place.
    return jax.jit(body, donate_argnums=1)


def _deflate(basis: PyTree, z: PyTree) -> PyTree:
    """``(I - Q^T Q) z`` for a stacked basis ``Q`` of orthonormal (or zero) rows."""
    return tree_sub(z, tree_matvec(basis, tree_rmatvec(basis, z)))


def _probe_like(op: LinearOperator) -> PyTree:
    return krylov.krylov_like(krylov.vector_like(op))


def _sample_chunk(consts: tuple, out: jax.Array, batch: tuple) -> jax.Array:
    """``out[idx] = z^T A z`` for one Rademacher ``z`` per key of the chunk.

    ``consts`` is ``(op,)`` or ``(op, basis)``: with a basis each probe is deflated by it.
    """
    op, basis = consts if len(consts) == 2 else (consts[0], None)
    apply, like = krylov.product(op), _probe_like(op)
    idx, ks = batch

    def sample(key: jax.Array) -> jax.Array:
        z = tree_random_rademacher(key, like)
        if basis is not None:
            z = _deflate(basis, z)
        return tree_vdot(z, apply(z))

    return out.at[idx].set(_batched(sample, ks))


def _quadratic_samples(op, keys: jax.Array, chunk: int, host: bool, basis=None) -> jax.Array:
    """``z^T A z`` for one Rademacher ``z`` per key (deflated by ``basis`` when given).

    ``op`` is the linearized operator; ``chunk`` probes are applied together.
    """
    n = keys.shape[0]
    consts = (op,) if basis is None else (op, basis)
    out = jnp.zeros(n, krylov.krylov_dtype(_probe_like(op)))
    return _fold_chunks(_sample_chunk, consts, out, (jnp.arange(n), keys), chunk, host)


def _mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = samples.shape[0]
    mean = jnp.mean(samples)
    if n < 2:
        return mean, jnp.asarray(jnp.inf, samples.dtype)
    return mean, jnp.std(samples, ddof=1) / jnp.sqrt(jnp.asarray(n, samples.dtype))


def trace(
    op: LinearOperator,
    key: jax.Array,
    *,
    num_probes: int = 100,
    method: str = "hutch++",
    chunk_size: int = PROBE_CHUNK,
    loop: str = "auto",
) -> Estimate:
    r"""Estimate :math:`\operatorname{tr}(A)` from ``num_probes`` products with random vectors.

    ``"hutchinson"`` averages :math:`z^\top A z` over Rademacher probes :math:`z` (Hutchinson
    1989); it is unbiased with variance :math:`2(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)` per
    probe, so the standard error is the sample standard deviation over :math:`\sqrt{n}`.

    ``"hutch++"`` (Meyer et al. 2021) splits the budget in thirds: it sketches the range of
    :math:`A` with :math:`k = \lfloor n/3 \rfloor` Rademacher vectors :math:`S`, takes an
    orthonormal basis :math:`Q` of :math:`AS`, computes :math:`\operatorname{tr}(Q^\top A Q)`
    exactly with :math:`k` more products, and runs Hutchinson with the remaining
    :math:`n - 2k` probes on the deflated :math:`(I - QQ^\top) A (I - QQ^\top)`. When a few
    eigenvalues dominate (the shape of neural network Hessians) the deflated remainder has a
    much smaller Frobenius norm, and the error falls like :math:`1/n` instead of
    :math:`1/\sqrt{n}`. The reported standard error is that of the Hutchinson part (the
    deflated trace is exact given :math:`Q`).

    :math:`Q` is built on the pytree as the sketch is taken: each image :math:`A s_j` is
    orthogonalized against the rows so far by two passes of classical Gram-Schmidt
    (:func:`hesskit._src.krylov.orthogonalize`) and becomes the next row, so the sketch is
    never stored next to its basis and no ``dim x k`` matrix is raveled. An image that is
    (numerically) in the span of the rows so far, as for a low-rank :math:`A`, leaves a zero
    row instead of a direction made of rounding: the rows stay orthonormal or zero, so
    :math:`QQ^\top` stays an orthogonal projector and the estimate stays unbiased.

    Memory: Hutchinson holds ``4 * chunk_size + 4`` parameter-sized vectors (per probe of a
    chunk: its random bits, the probe, its product and their elementwise product), whatever
    ``num_probes``; Hutch++ holds its basis on top, ``k + 4 * chunk_size + 4`` with
    ``k = num_probes // 3`` when ``chunk_size < k`` divides ``k`` and ``num_probes - 2k``,
    up to ``k`` more for a ragged last chunk and ``4 * chunk_size`` more when the sketch fits
    in one chunk (:func:`hesskit._src.memory.hutchinson_vectors`,
    :func:`hesskit._src.memory.hutchpp_vectors`). A request that cannot fit in the memory the
    backend reports raises before anything runs.

    Mixed precision: probes, the basis and every sum are in float32 or wider
    (:func:`hesskit._src.krylov.krylov_like`); the products run in the parameters' own dtypes.
    For bfloat16 parameters the estimate is float32.

    The operator is linearized once (:meth:`LinearOperator.linearize`). The function is
    jit-compatible and vmappable over ``key``; gradients through it are not promised.

    Loop strategy, as in :func:`hesskit.eigsh`: ``loop="compiled"`` runs every chunk in one
    compiled :func:`jax.lax.scan` (the only choice inside a user's ``jit`` or ``vmap``);
    ``loop="host"`` dispatches each chunk (its batched products, and for Hutch++ the
    Gram-Schmidt of its images) as one compiled call from Python and reads nothing back until
    the end. XLA's CPU backend runs convolutions inside loops many times slower than outside
    (jax-ml/jax#12868), so ``"auto"`` (default) picks ``"host"`` on CPU, outside traced code,
    when the product contains a convolution, and ``"compiled"`` otherwise. Both run the same
    arithmetic on the same chunks and return the same estimate (to rounding).

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator` (its shift is included in the trace).
        key: PRNG key for the probes.
        num_probes: total number of operator products, ``>= 1`` (``>= 3`` for ``"hutch++"``).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        chunk_size: probes applied together in one batched product, ``>= 1``; memory grows
            with it, the result does not depend on it beyond rounding.
        loop: ``"auto"``, ``"compiled"`` or ``"host"`` (see above).

    Returns:
        An :class:`Estimate` with ``num_matvecs == num_probes``, in the Krylov dtype (the
        operator's dtype for float32 and float64 parameters).

    Raises:
        ValueError: unknown ``method`` or ``loop``, ``num_probes`` or ``chunk_size`` out of
            range, or ``loop="host"`` inside traced code.
        InsufficientMemoryError: (a ``MemoryError``) the vectors cannot fit.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> d = jnp.array([100.0, 50.0, 1.0, 1.0, 1.0, 1.0])
        >>> op = LinearOperator(lambda v: d * v, jnp.zeros(6))
        >>> est = trace(op, jax.random.key(0), num_probes=30, method="hutchinson")
        >>> round(float(est.value), 3)  # a diagonal operator: Rademacher probes are exact
        154.0

    References:
        Hutchinson, *A stochastic estimator of the trace of the influence matrix for Laplacian
        smoothing splines*, Comm. Statist. Simulation Comput. 18(3), 1989.
        Meyer, Musco, Musco and Woodruff, *Hutch++: optimal stochastic trace estimation*,
        SOSA 2021.
    """
    krylov.check_devices(op)
    method = validation.check_one_of(method, "method", TRACE_METHODS)
    minimum = 3 if method == "hutch++" else 1
    num_probes = validation.check_positive_int(num_probes, "num_probes", minimum=minimum)
    chunk_size = validation.check_positive_int(chunk_size, "chunk_size")
    if method == "hutch++":
        k = num_probes // 3
        chunk = min(chunk_size, max(k, num_probes - 2 * k))
        needed = memory.hutchpp_vectors(num_probes, chunk)
    else:
        chunk = min(chunk_size, num_probes)
        needed = memory.hutchinson_vectors(chunk)
    memory.check_fits(
        needed,
        op.like,
        f"trace(method={method!r}, num_probes={num_probes}, chunk_size={chunk})",
        reduce="a smaller chunk_size" + (" or fewer num_probes" if method == "hutch++" else ""),
    )
    if krylov.resolve_loop(loop, op, key) == "host":
        lin = krylov.with_vector_like(krylov.linearized(op), op)
        return _trace_impl(lin, key, num_probes, method, chunk, host=True)
    return _trace(op, key, num_probes, method, chunk)


def _orthonormal_rows(basis: PyTree, rows: PyTree, at: jax.Array) -> PyTree:
    """Orthogonalize each of ``rows`` in turn against ``basis`` and store it at ``at[j]``.

    Two passes of classical Gram-Schmidt against every row of ``basis`` (unfilled rows are
    zero and contribute nothing). A row left with less than ``sqrt(eps)`` of its norm is in
    the span already; it is stored as zero, since normalizing what is left would turn rounding
    into a direction that Gram-Schmidt can no longer make orthogonal.
    """
    dtype = krylov.krylov_dtype(rows)
    floor = jnp.sqrt(jnp.finfo(dtype).eps)

    def insert(j: int, basis: PyTree) -> PyTree:
        y = jax.tree_util.tree_map(lambda a: a[j], rows)
        w, _ = krylov.orthogonalize(basis, y)
        w, norm = tree_normalize(w)
        keep = norm > floor * tree_norm(y)
        w = tree_scale(jnp.where(keep, 1.0, 0.0), w)
        return jax.tree_util.tree_map(lambda b, x: b.at[at[j]].set(x), basis, w)

    return jax.lax.fori_loop(0, at.shape[0], insert, basis)


def _sketch_chunk(consts: tuple, basis: PyTree, batch: tuple) -> PyTree:
    # The range finder: images of a chunk of the sketch, each folded into Q at once.
    (op,) = consts
    apply, like = krylov.product(op), _probe_like(op)
    idx, ks = batch
    images = _batched(lambda kk: apply(tree_random_rademacher(kk, like)), ks)
    return _orthonormal_rows(basis, images, idx)


def _exact_chunk(consts: tuple, total: jax.Array, idx: jax.Array) -> jax.Array:
    op, basis = consts
    apply = krylov.product(op)
    rows = jax.tree_util.tree_map(lambda b: b[idx], basis)
    return total + jnp.sum(_batched(lambda q: tree_vdot(q, apply(q)), rows))


def _trace_impl(op, key: jax.Array, n: int, method: str, chunk: int, host: bool) -> Estimate:
    """The estimator on a linearized ``op``: traced whole (compiled) or run from Python (host)."""
    num = jnp.asarray(n, jnp.int32)
    if method == "hutchinson":
        samples = _quadratic_samples(op, jax.random.split(key, n), chunk, host)
        value, stderr = _mean_and_stderr(samples)
        return Estimate(value, stderr, num)

    k = n // 3
    key_s, key_g = jax.random.split(key)
    zeros = jax.tree_util.tree_map(
        lambda s: jnp.zeros((k, *s.shape), s.dtype, out_sharding=stacked_sharding(s)),
        _probe_like(op),
    )
    sketch_chunk = min(chunk, k)
    sketch_keys = (jnp.arange(k), jax.random.split(key_s, k))
    basis = _fold_chunks(_sketch_chunk, (op,), zeros, sketch_keys, sketch_chunk, host)
    total = jnp.zeros((), krylov.krylov_dtype(_probe_like(op)))
    exact_trace = _fold_chunks(_exact_chunk, (op, basis), total, jnp.arange(k), sketch_chunk, host)

    m = n - 2 * k
    keys = jax.random.split(key_g, m)
    samples = _quadratic_samples(op, keys, min(chunk, m), host, basis=basis)
    rest, stderr = _mean_and_stderr(samples)
    return Estimate(exact_trace + rest, stderr, num)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _trace(op: LinearOperator, key: jax.Array, n: int, method: str, chunk: int) -> Estimate:
    return _trace_impl(
        krylov.with_vector_like(op.linearize(), op), key, n, method, chunk, host=False
    )


def diagonal(
    op: LinearOperator,
    key: jax.Array,
    *,
    num_probes: int = 100,
    chunk_size: int = PROBE_CHUNK,
    loop: str = "auto",
) -> PyTree:
    r"""Estimate the diagonal of :math:`A` as a pytree shaped like the parameters.

    Bekas, Kokiopoulou and Saad (2007): with Rademacher probes :math:`z`,

    .. math::
        \widehat{\operatorname{diag}}(A) = \frac{1}{n} \sum_{j=1}^n z_j \odot A z_j,

    unbiased, with entry :math:`i` carrying variance
    :math:`\sum_{l \ne i} A_{il}^2 / n` (exact for a diagonal operator, since
    :math:`z_i^2 = 1`). Probes run in chunks of ``chunk_size`` (a :func:`jax.lax.scan` over
    chunks, one :func:`jax.vmap` inside; or, with ``loop="host"``, one compiled call per chunk
    from Python, as in :func:`trace`, which ``"auto"`` picks on CPU outside traced code for
    products with a convolution). The operator's shift is included. Jit-compatible and
    vmappable over ``key``; gradients through it are not promised.

    Memory: ``4 * chunk_size + 4`` parameter-sized vectors (per probe of a chunk: its random
    bits, the probe, its product and their elementwise product; the running sum), whatever
    ``num_probes``
    (:func:`hesskit._src.memory.diagonal_vectors`). A request that cannot fit in the memory
    the backend reports raises before anything runs.

    Mixed precision: the probes and the running sum are float32 or wider, the products run in
    the parameters' dtypes, and the result is cast back to them.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator`.
        key: PRNG key for the probes.
        num_probes: number of probes (operator products), ``>= 1``.
        chunk_size: probes applied together in one batched product, ``>= 1``.
        loop: ``"auto"``, ``"compiled"`` or ``"host"`` (see :func:`trace`); same result.

    Returns:
        A pytree with the structure, shapes and dtypes of ``op.like``.

    Raises:
        ValueError: ``num_probes``, ``chunk_size`` or ``loop`` out of range, or
            ``loop="host"`` inside traced code.
        InsufficientMemoryError: (a ``MemoryError``) the vectors cannot fit.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> op = LinearOperator(lambda v: {"w": 3.0 * v["w"]}, {"w": jnp.zeros(2)})
        >>> diagonal(op, jax.random.key(0), num_probes=4)["w"].tolist()
        [3.0, 3.0]

    References:
        Bekas, Kokiopoulou and Saad, *An estimator for the diagonal of a matrix*, Applied
        Numerical Mathematics 57(11-12), 2007.
    """
    krylov.check_devices(op)
    num_probes = validation.check_positive_int(num_probes, "num_probes")
    chunk = min(validation.check_positive_int(chunk_size, "chunk_size"), num_probes)
    memory.check_fits(
        memory.diagonal_vectors(chunk),
        op.like,
        f"diagonal(num_probes={num_probes}, chunk_size={chunk})",
        reduce="a smaller chunk_size",
    )
    if krylov.resolve_loop(loop, op, key) == "host":
        lin = krylov.with_vector_like(krylov.linearized(op), op)
        return _diagonal_impl(lin, key, num_probes, chunk, host=True)
    return _diagonal(op, key, num_probes, chunk)


def _diagonal_chunk(consts: tuple, total: PyTree, ks: jax.Array) -> PyTree:
    (op,) = consts
    apply, like = krylov.product(op), _probe_like(op)

    def product(key: jax.Array) -> PyTree:
        z = tree_random_rademacher(key, like)
        return jax.tree_util.tree_map(jnp.multiply, z, apply(z))

    part = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), _batched(product, ks))
    return tree_add(total, part)


def _diagonal_impl(op, key: jax.Array, n: int, chunk: int, host: bool) -> PyTree:
    zeros = tree_zeros_like(_probe_like(op))
    total = _fold_chunks(_diagonal_chunk, (op,), zeros, jax.random.split(key, n), chunk, host)
    return krylov.cast_like(tree_scale(1.0 / n, total), op.like)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _diagonal(op: LinearOperator, key: jax.Array, n: int, chunk: int) -> PyTree:
    return _diagonal_impl(krylov.with_vector_like(op.linearize(), op), key, n, chunk, host=False)
