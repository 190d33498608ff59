"""Spectral density of a symmetric operator by stochastic Lanczos quadrature."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src import krylov, memory, validation
from hesskit._src.operators import LinearOperator
from hesskit._src.tridiag import _lanczos, _lanczos_host

PyTree = Any

__all__ = ["Density", "spectral_density"]

GRID_POINTS = 1000
"""Points of the default grid."""

GRID_PAD = 5.0
"""The default grid extends this many ``sigma`` beyond the extreme nodes."""


class Density(NamedTuple):
    """A smoothed spectral density and the quadrature rules behind it.

    Attributes:
        grid: the points :math:`x` where the density is evaluated, shape ``(g,)``.
        density: the smoothed density at ``grid``, shape ``(g,)``; integrates to 1 on ``grid``
            by the trapezoid rule.
        nodes: the Ritz values of each run, shape ``(num_runs, num_iters)``, ascending within a
            run. After an early Lanczos breakdown the unused slots repeat a valid node and carry
            zero weight.
        weights: the quadrature weights, same shape; non-negative, each run sums to 1.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array


def spectral_density(
    op: LinearOperator,
    key: jax.Array,
    *,
    num_runs: int = 10,
    num_iters: int = 80,
    grid: jax.typing.ArrayLike | None = None,
    sigma: float | None = None,
    batch_size: int = 1,
    loop: str = "auto",
) -> Density:
    r"""The eigenvalue density of :math:`A` by stochastic Lanczos quadrature (SLQ).

    For a unit vector :math:`v` uniform on the sphere, :math:`v^\top g(A) v` is an unbiased
    estimate of :math:`\tfrac{1}{d}\operatorname{tr} g(A) = \int g \, d\mu` with :math:`\mu`
    the empirical spectral measure :math:`\tfrac1d \sum_i \delta_{\lambda_i}`. ``num_iters``
    Lanczos steps from :math:`v` give the Gauss quadrature rule for that integral: nodes are
    the eigenvalues :math:`\theta_j` of the tridiagonal :math:`T` and weights
    :math:`\tau_j = (e_1^\top y_j)^2` the squared first components of its eigenvectors.
    Averaging ``num_runs`` independent runs (``batch_size`` at a time) and replacing each
    Dirac mass by a Gaussian of width :math:`\sigma` gives

    .. math::
        \phi_\sigma(x) = \frac{1}{R} \sum_{r=1}^{R} \sum_{j=1}^{m} \tau^{(r)}_j
            \frac{1}{\sigma\sqrt{2\pi}} \exp\!\Big(-\frac{(x - \theta^{(r)}_j)^2}{2\sigma^2}\Big).

    The density is then divided by its trapezoid integral over ``grid``, so it integrates to
    exactly 1 there (a user grid that cuts off mass therefore gives the density conditional on
    the grid's range). Lanczos runs with full reorthogonalization; if a run finds an invariant
    subspace early (a low-rank operator), the unused rows of :math:`T` are masked out and get
    zero weight. Gradients through this function are not promised.

    Defaults, as in PyHessian: ``sigma`` is the spread of the nodes over ``num_iters``,
    :math:`(\max_j \theta_j - \min_j \theta_j)/m` (or :math:`10^{-3}\max(1, |\theta|)` when all
    nodes coincide); the grid has 1000 points on
    :math:`[\min\theta - 5\sigma, \max\theta + 5\sigma]`.

    Memory: ``batch_size * (num_iters + LANCZOS_EXTRA)`` parameter-sized vectors
    (:func:`hesskit._src.memory.slq_vectors`, with ``LANCZOS_EXTRA = 6``), whatever
    ``num_runs``: runs go one batch after another (a :func:`jax.lax.map`), each run of a batch
    holding its own basis. The default ``batch_size=1`` runs them one at a time; on an
    accelerator a larger batch turns the products into batched ones at that memory cost. The
    results do not depend on ``batch_size`` beyond rounding. A request that cannot fit in the
    memory the backend reports raises before anything runs.

    Mixed precision: the Lanczos work and the quadrature run in float32 or wider
    (:func:`hesskit._src.krylov.krylov_dtype`), the products in the parameters' dtypes; for
    bfloat16 parameters the density, nodes and weights are float32.

    Read fractions of the spectrum (e.g. the share of negative eigenvalues) from the smoothed
    density, not from the raw nodes and weights: inside a dense cluster (a Hessian's bulk at
    zero) a single Gauss node stands for the whole cluster and its sign is arbitrary.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator` (linearized once per run).
        key: PRNG key; split into ``num_runs`` start vectors.
        num_runs: number of independent Lanczos runs, ``>= 1``.
        num_iters: Lanczos steps per run, ``1 <= num_iters <= dim``.
        grid: optional 1-D array of evaluation points (at least 2, increasing).
        sigma: optional Gaussian width, ``> 0``.
        batch_size: runs computed together (vmapped), ``>= 1``; larger values are clipped to
            ``num_runs``. Memory grows with it, not with ``num_runs``.
        loop: ``"auto"``, ``"compiled"`` or ``"host"`` as in :func:`hesskit.eigsh`; the host
            loop (chosen on CPU for products with convolutions) runs the runs one at a time,
            each step a compiled call, ignoring ``batch_size``.

    Returns:
        A :class:`Density`. Costs ``num_runs * num_iters`` products. If a run meets NaN/Inf,
        its nodes are NaN and so is the density (never a silently wrong curve).

    Raises:
        ValueError: ``num_runs``, ``num_iters``, ``batch_size``, ``sigma`` or ``grid`` out of
            range.
        InsufficientMemoryError: (a ``MemoryError``) the runs of one batch cannot fit.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> d = jnp.concatenate([jnp.full(20, -1.0), jnp.full(20, 2.0)])
        >>> op = LinearOperator(lambda v: d * v, jnp.zeros(40))
        >>> dens = spectral_density(op, jax.random.key(0), num_runs=4, num_iters=10)
        >>> mass_left = jnp.sum(dens.weights * (dens.nodes < 0.5)) / 4
        >>> round(float(jnp.trapezoid(dens.density, dens.grid)), 6), round(float(mass_left), 1)
        (1.0, 0.5)

    References:
        Golub and Meurant, *Matrices, moments and quadrature with applications*, 2010.
        Lin, Saad and Yang, *Approximating spectral densities of large matrices*, SIAM Review
        58(1), 2016.
        Ghorbani, Krishnan and Xiao, *An investigation into neural net optimization via Hessian
        eigenvalue density*, ICML 2019.
        Yao, Gholami, Keutzer and Mahoney, *PyHessian: neural networks through the lens of the
        Hessian*, IEEE Big Data 2020.
    """
    krylov.check_devices(op)
    num_runs = validation.check_positive_int(num_runs, "num_runs")
    num_iters = validation.check_positive_int(num_iters, "num_iters")
    if num_iters > op.dim:
        msg = f"num_iters must be <= the operator's dimension {op.dim}, got {num_iters}."
        raise ValueError(msg)
    batch_size = min(validation.check_positive_int(batch_size, "batch_size"), num_runs)
    if sigma is not None:
        validation.check_positive(sigma, "sigma")
    memory.check_fits(
        memory.slq_vectors(
            num_iters, batch_size, block_rows=krylov.block_copy_rows(op.like, num_iters)
        ),
        op.like,
        f"spectral_density(num_iters={num_iters}, batch_size={batch_size})",
        reduce="a smaller batch_size (1 runs one run at a time) or fewer num_iters",
    )
    dtype = krylov.krylov_dtype(op.like)
    if grid is not None:
        if not isinstance(grid, jax.core.Tracer):
            g = np.asarray(grid)
            if g.ndim != 1 or g.size < 2 or not np.all(np.isfinite(g)) or np.any(np.diff(g) <= 0):
                msg = (
                    "grid must be a 1-D array of at least 2 finite, strictly increasing points, "
                    f"got shape {g.shape}."
                )
                raise ValueError(msg)
        elif jnp.ndim(grid) != 1 or jnp.shape(grid)[0] < 2:
            msg = f"grid must be a 1-D array of at least 2 points, got shape {jnp.shape(grid)}."
            raise ValueError(msg)
        grid = jnp.asarray(grid, dtype)
    sigma = None if sigma is None else jnp.asarray(sigma, dtype)
    if krylov.resolve_loop(loop, op, key) == "host":
        return _slq_host(op, key, grid, sigma, num_runs, num_iters)
    return _slq(op, key, grid, sigma, num_runs, num_iters, batch_size)


def _quadrature(alphas: jax.Array, betas: jax.Array, num_steps: jax.Array):
    """Gauss rule (nodes ascending, weights) of one Lanczos run, masking rows past a breakdown."""
    m = alphas.shape[0]
    valid = jnp.arange(m) < num_steps
    # Park the unused diagonal entries well outside the valid block's Gershgorin interval: the
    # block is decoupled (zero betas), so its eigenvectors cannot mix with the valid ones.
    bound = jnp.max(jnp.abs(alphas)) + 2 * jnp.max(jnp.abs(betas), initial=0.0)
    diag = jnp.where(valid, alphas, 2 * bound + 1)
    t = jnp.diag(diag) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    theta, vecs = krylov.ritz(t)
    on_valid = jnp.sum(jnp.where(valid[:, None], vecs**2, 0.0), axis=0) > 0.5
    weights = jnp.where(on_valid, vecs[0] ** 2, 0.0)
    weights = weights / jnp.sum(weights)
    # Unused slots repeat a valid node (zero weight) so that ranges and plots stay sensible.
    filler = jnp.min(jnp.where(on_valid, theta, jnp.inf))
    nodes = jnp.where(on_valid, theta, filler)
    order = jnp.argsort(nodes)
    return nodes[order], weights[order]


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _slq(op, key, grid, sigma, num_runs: int, num_iters: int, batch_size: int) -> Density:
    # Linearize once, outside the map over runs: every run then pays only for tangent passes.
    # Linearizing an already linearized operator returns it unchanged.
    lin = op.linearize()

    def run(k: jax.Array):
        # Only the small tridiagonal leaves a run: its basis dies with it, so the map holds
        # one batch of bases, not num_runs of them.
        res = _lanczos(lin, k, None, num_iters)
        return res.alphas, res.betas, res.num_steps, res.ok

    keys = jax.random.split(key, num_runs)
    runs = memory.map_in_batches(run, keys, batch_size)
    return _density(*runs, grid, sigma, num_iters)


def _slq_host(op, key, grid, sigma, num_runs: int, num_iters: int) -> Density:
    # One run after another, each a host-dispatched Lanczos (no convolution inside a loop).
    runs = [_lanczos_host(op, k, None, num_iters) for k in jax.random.split(key, num_runs)]
    stacked = [jnp.stack([getattr(r, name) for r in runs]) for name in _RUN_FIELDS]
    return _density_jit(*stacked, grid, sigma, num_iters)


_RUN_FIELDS = ("alphas", "betas", "num_steps", "ok")


def _density(alphas, betas, num_steps, ok, grid, sigma, num_iters: int) -> Density:
    num_runs = alphas.shape[0]
    dtype = alphas.dtype
    nodes, weights = jax.vmap(_quadrature)(alphas, betas.astype(dtype), num_steps)
    bad = ~ok[:, None]
    nodes = jnp.where(bad, jnp.nan, nodes)
    weights = jnp.where(bad, jnp.nan, weights)
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:
        spread = hi - lo
        fallback = 1e-3 * jnp.maximum(1.0, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
        sigma = jnp.where(spread > 0, spread / num_iters, fallback)
    if grid is None:
        grid = jnp.linspace(lo - GRID_PAD * sigma, hi + GRID_PAD * sigma, GRID_POINTS)
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / sigma
    gauss = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi).astype(z.dtype))
    density = gauss @ weights.reshape(-1) / num_runs
    density = density / jnp.trapezoid(density, grid)
    return Density(grid=grid, density=density, nodes=nodes, weights=weights)


_density_jit = jax.jit(_density, static_argnums=6)
