"""Randomized trace and diagonal estimators for operators known only through products.

Probes are Rademacher vectors shaped like the operator's pytree. They are applied in batches
(one :func:`jax.vmap` of the product per chunk of :data:`PROBE_CHUNK` probes, chunks run by
:func:`jax.lax.map` / :func:`jax.lax.scan`), so memory stays at one chunk of vectors while the
hardware sees batched products.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hesskit._src import validation
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import (
    tree_add,
    tree_matvec,
    tree_rmatvec,
    tree_scale,
    tree_sub,
    tree_vdot,
)

PyTree = Any

__all__ = ["PROBE_CHUNK", "Estimate", "diagonal", "trace"]

TRACE_METHODS = ("hutchinson", "hutch++")

PROBE_CHUNK = 25
"""Probes applied together in one batched product; larger budgets run in chunks of this size."""


class Estimate(NamedTuple):
    """A randomized estimate with its standard error.

    Attributes:
        value: the estimate (a scalar in the operator's dtype).
        stderr: the estimated standard error of ``value`` (sample standard deviation of the
            random part over the square root of its number of probes); ``inf`` when the random
            part has fewer than two probes, so no spread can be measured.
        num_matvecs: the number of operator products spent.
    """

    value: jax.Array
    stderr: jax.Array
    num_matvecs: jax.Array


def _zeros(like: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)


def rademacher_probe(key: jax.Array, like: PyTree) -> PyTree:
    """A Rademacher vector shaped like ``like``, drawn as one flat sample and split into leaves.

    One draw for the whole pytree (rather than one per leaf, as
    :func:`~hesskit.tree_random_rademacher` does) keeps the compiled program small: a network
    with dozens of parameter leaves would otherwise compile dozens of random-bit generators.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    dtype = jnp.result_type(*[leaf.dtype for leaf in leaves])
    flat = jax.random.rademacher(key, (sum(leaf.size for leaf in leaves),), dtype)
    out, start = [], 0
    for leaf in leaves:
        out.append(flat[start : start + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
        start += leaf.size
    return jax.tree_util.tree_unflatten(treedef, out)


def _quadratic_samples(op: LinearOperator, keys: jax.Array, project=None) -> jax.Array:
    """``z^T A z`` for one Rademacher ``z`` per key (optionally ``z`` projected first)."""

    def sample(key: jax.Array) -> jax.Array:
        z = rademacher_probe(key, op.like)
        if project is not None:
            z = project(z)
        return tree_vdot(z, op(z))

    return jax.lax.map(sample, keys, batch_size=min(keys.shape[0], PROBE_CHUNK))


def _mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = samples.shape[0]
    mean = jnp.mean(samples)
    if n < 2:
        return mean, jnp.asarray(jnp.inf, samples.dtype)
    return mean, jnp.std(samples, ddof=1) / jnp.sqrt(jnp.asarray(n, samples.dtype))


def trace(
    op: LinearOperator, key: jax.Array, *, num_probes: int = 100, method: str = "hutch++"
) -> Estimate:
    r"""Estimate :math:`\operatorname{tr}(A)` from ``num_probes`` products with random vectors.

    ``"hutchinson"`` averages :math:`z^\top A z` over Rademacher probes :math:`z` (Hutchinson
    1989); it is unbiased with variance :math:`2(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)` per
    probe, so the standard error is the sample standard deviation over :math:`\sqrt{n}`.

    ``"hutch++"`` (Meyer et al. 2021) splits the budget in thirds: it sketches the range of
    :math:`A` with :math:`k = \lfloor n/3 \rfloor` Rademacher vectors :math:`S`, takes an
    orthonormal basis :math:`Q` of :math:`AS` (a thin QR of the ``dim x k`` block, on device),
    computes :math:`\operatorname{tr}(Q^\top A Q)` exactly with :math:`k` more products, and
    runs Hutchinson with the remaining :math:`n - 2k` probes on the deflated
    :math:`(I - QQ^\top) A (I - QQ^\top)`. When a few eigenvalues dominate (the shape of neural
    network Hessians) the deflated remainder has a much smaller Frobenius norm, and the error
    falls like :math:`1/n` instead of :math:`1/\sqrt{n}`. The reported standard error is that
    of the Hutchinson part (the deflated trace is exact given :math:`Q`).

    The operator is linearized once (:meth:`LinearOperator.linearize`). The function is
    jit-compatible and vmappable over ``key``; gradients through it are not promised.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator` (its shift is included in the trace).
        key: PRNG key for the probes.
        num_probes: total number of operator products, ``>= 1`` (``>= 3`` for ``"hutch++"``).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.

    Returns:
        An :class:`Estimate` with ``num_matvecs == num_probes``.

    Raises:
        ValueError: unknown ``method`` or ``num_probes`` out of range.

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
    method = validation.check_one_of(method, "method", TRACE_METHODS)
    minimum = 3 if method == "hutch++" else 1
    num_probes = validation.check_positive_int(num_probes, "num_probes", minimum=minimum)
    return _trace(op, key, num_probes, method)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _trace(op: LinearOperator, key: jax.Array, n: int, method: str) -> Estimate:
    op = op.linearize()
    dtype = op.dtype
    if method == "hutchinson":
        value, stderr = _mean_and_stderr(_quadratic_samples(op, jax.random.split(key, n)))
        return Estimate(value, stderr, jnp.asarray(n, jnp.int32))

    k = n // 3
    key_s, key_g = jax.random.split(key)
    sketch = jax.vmap(lambda kk: rademacher_probe(kk, op.like))(jax.random.split(key_s, k))
    image = op.matmat(sketch)
    # The QR of a dim x k block is small dense work; ravelling it inside the compiled function
    # keeps it on device. Householder QR returns orthonormal columns even when A S is rank
    # deficient (a low-rank operator), so the projector below stays a projector.
    _, unravel = ravel_pytree(_zeros(op.like))
    rows = jax.vmap(lambda t: ravel_pytree(t)[0])(image)
    q, _ = jnp.linalg.qr(rows.T.astype(dtype))
    basis = jax.vmap(unravel)(q.T)
    exact = jnp.sum(jax.vmap(tree_vdot)(basis, op.matmat(basis)))

    def deflate(z: PyTree) -> PyTree:
        return tree_sub(z, tree_matvec(basis, tree_rmatvec(basis, z)))

    samples = _quadratic_samples(op, jax.random.split(key_g, n - 2 * k), project=deflate)
    rest, stderr = _mean_and_stderr(samples)
    return Estimate((exact + rest).astype(dtype), stderr.astype(dtype), jnp.asarray(n, jnp.int32))


def diagonal(op: LinearOperator, key: jax.Array, *, num_probes: int = 100) -> PyTree:
    r"""Estimate the diagonal of :math:`A` as a pytree shaped like the parameters.

    Bekas, Kokiopoulou and Saad (2007): with Rademacher probes :math:`z`,

    .. math::
        \widehat{\operatorname{diag}}(A) = \frac{1}{n} \sum_{j=1}^n z_j \odot A z_j,

    unbiased, with entry :math:`i` carrying variance
    :math:`\sum_{l \ne i} A_{il}^2 / n` (exact for a diagonal operator, since
    :math:`z_i^2 = 1`). Probes run in batches of :data:`PROBE_CHUNK` (a
    :func:`jax.lax.scan` over chunks, one :func:`jax.vmap` inside), so memory stays at one chunk
    whatever ``num_probes``. The operator's shift is included. Jit-compatible and vmappable
    over ``key``; gradients through it are not promised.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator`.
        key: PRNG key for the probes.
        num_probes: number of probes (operator products), ``>= 1``.

    Returns:
        A pytree with the structure, shapes and dtypes of ``op.like``.

    Raises:
        ValueError: ``num_probes`` out of range.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> op = LinearOperator(lambda v: {"w": 3.0 * v["w"]}, {"w": jnp.zeros(2)})
        >>> diagonal(op, jax.random.key(0), num_probes=4)["w"].tolist()
        [3.0, 3.0]

    References:
        Bekas, Kokiopoulou and Saad, *An estimator for the diagonal of a matrix*, Applied
        Numerical Mathematics 57(11-12), 2007.
    """
    num_probes = validation.check_positive_int(num_probes, "num_probes")
    return _diagonal(op, key, num_probes)


@functools.partial(jax.jit, static_argnums=2)
def _diagonal(op: LinearOperator, key: jax.Array, n: int) -> PyTree:
    op = op.linearize()

    def product(key: jax.Array) -> PyTree:
        z = rademacher_probe(key, op.like)
        return jax.tree_util.tree_map(jnp.multiply, z, op(z))

    def chunk_sum(keys: jax.Array) -> PyTree:
        return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), jax.vmap(product)(keys))

    keys = jax.random.split(key, n)
    chunk = min(n, PROBE_CHUNK)
    full = n // chunk
    chunked = keys[: full * chunk].reshape(full, chunk, *keys.shape[1:])

    def body(total: PyTree, ks: jax.Array) -> tuple[PyTree, None]:
        return tree_add(total, chunk_sum(ks)), None

    total, _ = jax.lax.scan(body, _zeros(op.like), chunked)
    if full * chunk < n:
        total = tree_add(total, chunk_sum(keys[full * chunk :]))
    return tree_scale(1.0 / n, total)
