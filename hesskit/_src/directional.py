r"""The loss along a direction against its quadratic model, and the effect of one gradient step.

Along a unit direction :math:`v` the steepest-descent step restricted to :math:`v` is
:math:`\theta - \alpha (g^\top v) v`, and the second-order model of the loss there is

.. math::
    q(\alpha) = L(\theta) - \alpha (g^\top v)^2 + \tfrac12 \alpha^2 \lambda (g^\top v)^2,
    \qquad \lambda = v^\top H v.

For :math:`\lambda > 0` the model's minimizer is :math:`\alpha = 1/\lambda`; for
:math:`\lambda \le 0` the model decreases without bound while the real loss cannot. Alain, Le
Roux and Manzagol (2019) measure the real minimizer :math:`\alpha^*` along eigenvectors and find
that along negative-curvature directions it is far larger than :math:`1/|\lambda|` and that the
decrease available there is large (their figures 1-4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src import memory, validation
from hesskit._src.thick_restart import EigResult
from hesskit._src.tree import tree_axpy, tree_normalize, tree_vdot

PyTree = Any

__all__ = [
    "ALPHA_CHUNK",
    "DirectionalLoss",
    "StepCheck",
    "directional_loss",
    "eigen_directional_losses",
    "step_check",
]


class StepCheck(NamedTuple):
    r"""One gradient step :math:`\theta - \eta g`: the quadratic model's prediction and reality.

    Attributes:
        predicted: :math:`-\eta\, g^\top g + \tfrac{\eta^2}{2} g^\top H g`, the change of the
            second-order model.
        actual: :math:`L(\theta - \eta g) - L(\theta)`.
        g_curvature: :math:`g^\top H g / g^\top g`, the curvature along the gradient (``nan``
            for a zero gradient).
        grad_norm_sq: :math:`g^\top g`.
        critical_lr: :math:`2\, g^\top g / g^\top H g`, the step beyond which the model predicts
            an increase (``inf`` when :math:`g^\top H g \le 0`).
        increases: the model predicts an increase: ``lr > critical_lr``.
        poorly_conditioned: the model predicts an increase *and* the loss does increase
            (``actual > 0``): the curvature along the gradient, not higher-order terms, makes
            this step fail.
    """

    predicted: jax.Array
    actual: jax.Array
    g_curvature: jax.Array
    grad_norm_sq: jax.Array
    critical_lr: jax.Array
    increases: jax.Array
    poorly_conditioned: jax.Array


@functools.partial(jax.jit, static_argnums=0)
def _step_check(f: Callable, params: PyTree, lr: jax.Array) -> StepCheck:
    loss0, g = jax.value_and_grad(f)(params)
    dtype = loss0.dtype
    hg = jax.jvp(jax.grad(f), (params,), (g,))[1]
    gg = tree_vdot(g, g).astype(dtype)
    ghg = tree_vdot(g, hg).astype(dtype)
    lr = lr.astype(dtype)
    predicted = -lr * gg + 0.5 * lr**2 * ghg
    actual = f(tree_axpy(-lr, g, params)) - loss0
    curv = jnp.where(gg > 0, ghg / jnp.where(gg > 0, gg, 1), jnp.nan)
    critical = jnp.where(ghg > 0, 2 * gg / jnp.where(ghg > 0, ghg, 1), jnp.inf)
    increases = predicted > 0
    return StepCheck(
        predicted=predicted,
        actual=actual.astype(dtype),
        g_curvature=curv.astype(dtype),
        grad_norm_sq=gg,
        critical_lr=critical.astype(dtype),
        increases=increases,
        poorly_conditioned=increases & (actual > 0),
    )


def step_check(f: Callable[[PyTree], jax.Array], params: PyTree, lr: Any) -> StepCheck:
    r"""Does a gradient step of size ``lr`` decrease the loss? Model and reality side by side.

    The second-order change of the loss after :math:`\theta \to \theta - \eta g` is
    :math:`-\eta\, g^\top g + \tfrac{\eta^2}{2} g^\top H g`. The first term always helps; the
    second hurts when the gradient points into high curvature, and wins once
    :math:`\eta > 2 g^\top g / g^\top H g`: the Hessian is then *poorly conditioned* for this
    step and it increases the loss. Costs one gradient, one Hessian-vector product and one loss
    evaluation, compiled together.

    Args:
        f: scalar loss of the parameters.
        params: the point, a pytree of real floating arrays.
        lr: the step size :math:`\eta` (a positive scalar; may be traced).

    Returns:
        A :class:`StepCheck`.

    Raises:
        ValueError: non-scalar ``f`` or a non-positive ``lr``.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = lambda p: 0.5 * (p[0] ** 2 + 10.0 * p[1] ** 2)
        >>> chk = step_check(f, jnp.array([1.0, 1.0]), 0.25)
        >>> round(float(chk.predicted), 3), round(float(chk.actual), 3), bool(chk.increases)
        (6.031, 6.031, True)
    """
    validation.check_float_params(params)
    validation.check_scalar_fn(f, params)
    validation.check_positive(lr, "lr")
    return _step_check(f, params, jnp.asarray(lr))


class DirectionalLoss(NamedTuple):
    r"""The loss along :math:`\theta - \alpha (g^\top v) v` on a grid of step sizes.

    When produced by :func:`eigen_directional_losses` every field but ``alphas`` has an extra
    leading axis ``k`` (one row per eigenvector; ``loss0`` is then repeated ``k`` times); the
    grid is shared, so ``alphas`` stays ``(m,)``.

    Attributes:
        alphas: the step sizes :math:`\alpha`, shape ``(m,)``.
        losses: :math:`L(\theta - \alpha (g^\top v) v)`, shape ``(m,)``.
        model: the quadratic model
            :math:`L_0 - \alpha (g^\top v)^2 + \tfrac12 \alpha^2 \lambda (g^\top v)^2`.
        slope: :math:`g^\top v` (``v`` normalized to unit length).
        curvature: the :math:`\lambda` used by the model (the given eigenvalue, or
            :math:`v^\top H v`).
        loss0: :math:`L(\theta)`.
        alpha_star: the grid point with the lowest finite loss.
        best_decrease: ``min(losses) - loss0`` (``<= 0`` when the grid holds 0).
        inv_alpha_star: :math:`1/\alpha^*` (``inf`` when :math:`\alpha^* = 0`), to compare with
            :math:`\lambda` as in figure 4 of Alain et al. (2019).
        at_edge: :math:`\alpha^*` is the largest or the smallest grid point (and not 0): the
            true minimizer may lie beyond the grid, so ``alpha_star`` and ``best_decrease`` are
            only bounds. Late in training :math:`g^\top v` can be ~1e-7 and the optimum runs
            off any fixed grid; widen the grid where this is set.
    """

    alphas: jax.Array
    losses: jax.Array
    model: jax.Array
    slope: jax.Array
    curvature: jax.Array
    loss0: jax.Array
    alpha_star: jax.Array
    best_decrease: jax.Array
    inv_alpha_star: jax.Array
    at_edge: jax.Array


def _mean_loss(f: Callable, params: PyTree, chunks: PyTree | None) -> jax.Array:
    if chunks is None:
        return f(params)
    if jax.tree_util.tree_leaves(chunks)[0].shape[0] == 1:
        # A one-step map would stay a while loop (slow convolutions on XLA:CPU).
        return f(params, jax.tree_util.tree_map(lambda c: c[0], chunks))
    # One chunk at a time (lax.map is a scan): memory stays at one chunk's activations.
    return jnp.mean(jax.lax.map(lambda c: f(params, c), chunks))


ALPHA_CHUNK = 16
"""The default ``chunk_size``: grid points whose losses are evaluated together (one vmap)."""


def _grid_losses(loss_fn, params, v, scale, alphas, chunk: int) -> jax.Array:
    """``loss_fn(params - alpha * scale * v)`` on the grid, ``chunk`` points at a time.

    One loop over the grid in batches (:func:`hesskit._src.memory.map_in_batches`): each point of a
    batch is a shifted copy of the parameters with its own activations, so memory follows the
    chunk, not the grid.
    """

    def loss_at(a: jax.Array) -> jax.Array:
        return loss_fn(tree_axpy(-a * scale, v, params))

    return memory.map_in_batches(loss_at, alphas, chunk)


def _along(loss_fn, params, loss0, g, v, alphas, eigenvalue, chunk: int) -> DirectionalLoss:
    """The directional loss along ``v`` given the loss and gradient at ``params``."""
    dtype = loss0.dtype
    v, _ = tree_normalize(v)
    slope = tree_vdot(g, v).astype(dtype)
    if eigenvalue is None:
        hv = jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]
        lam = tree_vdot(v, hv).astype(dtype)
    else:
        lam = jnp.asarray(eigenvalue).astype(dtype)
    alphas = alphas.astype(dtype)
    losses = _grid_losses(loss_fn, params, v, slope, alphas, min(chunk, alphas.shape[0]))
    losses = losses.astype(dtype)
    model = loss0 - alphas * slope**2 + 0.5 * alphas**2 * lam * slope**2
    masked = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    i = jnp.argmin(masked)
    alpha_star = alphas[i]
    inv = jnp.where(alpha_star != 0, 1 / jnp.where(alpha_star != 0, alpha_star, 1), jnp.inf)
    # An unsorted grid is allowed, so the edges are the extreme values, not the end points.
    at_edge = (alpha_star != 0) & (
        (alpha_star == jnp.max(alphas)) | (alpha_star == jnp.min(alphas))
    )
    return DirectionalLoss(
        alphas=alphas,
        losses=losses,
        model=model.astype(dtype),
        slope=slope,
        curvature=lam,
        loss0=loss0,
        alpha_star=alpha_star,
        best_decrease=masked[i] - loss0,
        inv_alpha_star=inv.astype(dtype),
        at_edge=at_edge,
    )


@functools.partial(jax.jit, static_argnums=(0, 6))
def _directional_jit(f, params, v, alphas, eigenvalue, chunks, chunk: int):
    loss_fn = functools.partial(_mean_loss, f, chunks=chunks)
    loss0, g = jax.value_and_grad(loss_fn)(params)
    return _along(loss_fn, params, loss0, g, v, alphas, eigenvalue, chunk)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _eigen_directional_jit(f, params, vectors, values, alphas, chunks, chunk: int):
    loss_fn = functools.partial(_mean_loss, f, chunks=chunks)
    # One gradient for all directions; the directions then run one after another, so memory
    # is one direction's chunk of the grid, not k of them.
    loss0, g = jax.value_and_grad(loss_fn)(params)

    def one(pair: tuple) -> DirectionalLoss:
        v, lam = pair
        return _along(loss_fn, params, loss0, g, v, alphas, lam, chunk)

    res = jax.lax.map(one, (vectors, values))
    # The grid is shared: one copy, not k.
    return res._replace(alphas=alphas.astype(loss0.dtype))


def _check_alphas(alphas: Any) -> jax.Array:
    if isinstance(alphas, jax.core.Tracer):
        if jnp.ndim(alphas) != 1:
            msg = f"alphas must be one-dimensional, got shape {jnp.shape(alphas)}."
            raise ValueError(msg)
        return alphas
    arr = np.asarray(alphas)
    if arr.ndim != 1 or arr.size == 0:
        msg = f"alphas must be a non-empty one-dimensional grid, got shape {arr.shape}."
        raise ValueError(msg)
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        msg = "alphas must hold finite real numbers."
        raise ValueError(msg)
    return jnp.asarray(alphas)


def _check_chunk(chunk_size: Any, alphas: jax.Array, params: PyTree) -> int:
    chunk = min(validation.check_positive_int(chunk_size, "chunk_size"), jnp.shape(alphas)[0])
    memory.check_fits(
        memory.directional_vectors(chunk),
        params,
        f"directional losses (chunk_size={chunk})",
        reduce="a smaller chunk_size",
    )
    return chunk


def _check_f_chunks(f: Callable, params: PyTree, chunks: PyTree | None) -> None:
    validation.check_float_params(params)
    if chunks is None:
        validation.check_scalar_fn(f, params)
        return
    leaves = jax.tree_util.tree_leaves(chunks)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        msg = "chunks must be a pytree of arrays stacked along a leading (chunk) axis."
        raise ValueError(msg)
    if len({jnp.shape(x)[0] for x in leaves}) != 1:
        msg = "every leaf of chunks must have the same leading (chunk) size."
        raise ValueError(msg)
    first = jax.tree_util.tree_map(lambda x: x[0], chunks)
    validation.check_scalar_fn(f, params, first)


def directional_loss(
    f: Callable[..., jax.Array],
    params: PyTree,
    direction: PyTree,
    alphas: Any,
    *,
    eigenvalue: Any = None,
    chunks: PyTree | None = None,
    chunk_size: int = ALPHA_CHUNK,
) -> DirectionalLoss:
    r"""The loss along a direction on a whole grid of step sizes at once, with its model.

    Evaluates :math:`L(\theta - \alpha (g^\top v) v)` for every :math:`\alpha` in ``alphas``
    (compiled, ``chunk_size`` points at a time) next to the quadratic model
    :math:`L_0 - \alpha (g^\top v)^2 + \tfrac12 \alpha^2 \lambda (g^\top v)^2`, and reports the
    best grid point :math:`\alpha^*` and the decrease it gives. ``direction`` is normalized to
    unit length first (its sign does not matter: the step always goes downhill along it). For a
    quadratic loss and an eigenvector the model is exact and :math:`\alpha^* \approx 1/\lambda`
    to within the grid spacing. With ``chunks`` the loss is the mean of ``f(params, chunk)``
    over fixed chunks stacked on a leading axis, computed one chunk at a time (a
    :func:`jax.lax.map`), as the Hessian "over a fixed subset" of Alain et al. (2019, appendix
    D); the gradient and curvature are those of that mean.

    Memory: ``chunk_size + 6`` parameter-sized vectors
    (:func:`hesskit._src.memory.directional_vectors`: a chunk of shifted points, the point, its
    gradient, the direction and a Hessian-vector product), plus one loss evaluation's
    activations per point of a chunk, whatever the grid's length.

    Args:
        f: ``f(params) -> scalar``, or ``f(params, chunk) -> scalar`` when ``chunks`` is given.
        params: the point :math:`\theta`.
        direction: :math:`v`, shaped like ``params`` (nonzero).
        alphas: the step sizes, a non-empty one-dimensional array of finite values; include
            ``0`` so that ``best_decrease <= 0``.
        eigenvalue: :math:`\lambda` for the model (e.g. the eigenvalue of ``direction``);
            default :math:`v^\top H v`, one extra Hessian-vector product.
        chunks: optional data chunks stacked along a leading axis.
        chunk_size: grid points evaluated together (one ``vmap``), ``>= 1``; memory grows with
            it, the losses do not depend on it.

    Returns:
        A :class:`DirectionalLoss` whose fields feed
        :func:`hesskit.plots.plot_directional_loss` (``alphas``, ``losses``,
        ``eigenvalues=curvature``, ``slopes=slope``, ``loss0``).

    Raises:
        ValueError: empty, non-one-dimensional or non-finite ``alphas``; ``direction`` not
            shaped like ``params`` or zero; non-scalar ``f``; ``chunk_size`` out of range.
        InsufficientMemoryError: (a ``MemoryError``) one chunk of the grid cannot fit.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = lambda p: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * p**2)
        >>> res = directional_loss(f, jnp.ones(2), jnp.array([1.0, 0.0]), jnp.linspace(0, 1, 41))
        >>> float(res.alpha_star), float(res.slope), float(res.curvature)
        (0.25, 4.0, 4.0)

    References:
        Alain, Le Roux and Manzagol, *Negative eigenvalues of the Hessian in deep neural
        networks*, 2019, section 3 and figures 1-4.
    """
    _check_f_chunks(f, params, chunks)
    validation.check_like(direction, params, name="direction")
    alphas = _check_alphas(alphas)
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(direction)):
        if not any(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(direction)):
            msg = "direction is zero; give a nonzero direction."
            raise ValueError(msg)
    chunk = _check_chunk(chunk_size, alphas, params)
    return _directional_jit(f, params, direction, alphas, eigenvalue, chunks, chunk)


def eigen_directional_losses(
    f: Callable[..., jax.Array],
    params: PyTree,
    eig_result: EigResult,
    alphas: Any,
    *,
    chunks: PyTree | None = None,
    chunk_size: int = ALPHA_CHUNK,
) -> DirectionalLoss:
    r""":func:`directional_loss` along each eigenvector of an :class:`~hesskit.EigResult`.

    One compiled loop over the ``k`` eigenpairs (one gradient shared by all), each grid
    evaluated ``chunk_size`` points at a time; the model uses each pair's eigenvalue.
    Compare ``inv_alpha_star`` with ``eig_result.eigenvalues``: for a quadratic they agree
    (to the grid spacing), and along negative-curvature directions of real losses
    :math:`\alpha^*` is much larger than :math:`1/|\lambda|` (Alain et al., 2019, figure 4).

    Memory: ``chunk_size + 6`` parameter-sized vectors, as :func:`directional_loss`, whatever
    ``k`` and the grid's length (the eigenvectors themselves are the caller's).

    Args:
        f: ``f(params)`` or ``f(params, chunk)`` (with ``chunks``), a scalar loss.
        params: the point where ``eig_result`` was computed.
        eig_result: eigenpairs of the Hessian of ``f`` at ``params``, e.g. from
            :func:`hesskit.eigsh`.
        alphas: the shared grid of step sizes, shape ``(m,)``.
        chunks: optional data chunks stacked along a leading axis.
        chunk_size: grid points evaluated together, ``>= 1``.

    Returns:
        A :class:`DirectionalLoss` with a leading axis ``k`` on every field but ``alphas``
        (the shared grid, shape ``(m,)``): ``losses`` and ``model`` of shape ``(k, m)``, the
        rest of shape ``(k,)``; check ``at_edge`` before trusting ``alpha_star``. For
        :func:`hesskit.plots.plot_directional_loss` pass ``loss0=res.loss0[0]``, and for
        :func:`hesskit.plots.plot_step_sizes` pass ``eig_result.eigenvalues``,
        ``res.best_decrease`` and ``res.alpha_star``.

    Raises:
        ValueError: bad ``alphas`` or ``chunk_size``, or eigenvectors not shaped like
            ``params``.
        InsufficientMemoryError: (a ``MemoryError``) one chunk of the grid cannot fit.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from hesskit import hessian_operator, eigsh
        >>> d = jnp.linspace(1.0, 4.0, 8)
        >>> f = lambda p: 0.5 * jnp.sum(d * p**2)
        >>> eig = eigsh(hessian_operator(f, jnp.ones(8)), jax.random.key(0), k=2)
        >>> res = eigen_directional_losses(f, jnp.ones(8), eig, jnp.linspace(0, 1, 101))
        >>> res.losses.shape, [round(float(a), 2) for a in res.alpha_star]
        ((2, 101), [0.25, 0.28])
    """
    _check_f_chunks(f, params, chunks)
    alphas = _check_alphas(alphas)
    vectors = eig_result.eigenvectors
    values = jnp.asarray(eig_result.eigenvalues)
    if values.ndim != 1:
        msg = f"eig_result.eigenvalues must have shape (k,), got {values.shape}."
        raise ValueError(msg)
    leaves = jax.tree_util.tree_leaves(vectors)
    if any(jnp.ndim(leaf) == 0 for leaf in leaves):
        msg = "eig_result.eigenvectors must have a leading axis k on every leaf."
        raise ValueError(msg)
    first = jax.tree_util.tree_map(lambda x: x[0], vectors)
    validation.check_like(first, params, name="eig_result.eigenvectors[i]")
    for leaf in leaves:
        if jnp.shape(leaf)[0] != values.shape[0]:
            msg = (
                f"eig_result has {values.shape[0]} eigenvalues but an eigenvector leaf with "
                f"leading size {jnp.shape(leaf)[0]}."
            )
            raise ValueError(msg)
    chunk = _check_chunk(chunk_size, alphas, params)
    return _eigen_directional_jit(f, params, vectors, values, alphas, chunks, chunk)
