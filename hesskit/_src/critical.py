"""Second-order test at a point: gradient norm, extreme curvature and a classification."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hesskit._src import validation
from hesskit._src.curvature_effects import condition_number
from hesskit._src.operators import LinearOperator, hessian_operator
from hesskit._src.thick_restart import default_tol, eigsh
from hesskit._src.tree import tree_norm

PyTree = Any

__all__ = ["CLASSES", "CriticalPointReport", "classify", "critical_point_report"]

CLASSES = (
    "local minimum",
    "local maximum",
    "strict saddle",
    "degenerate",
    "not critical",
    "undetermined",
)

# Relative margin on the damping, so that H + damping I is safely (not barely) definite.
_DAMPING_MARGIN = 0.01


class CriticalPointReport(NamedTuple):
    r"""What the first and second derivatives say about a point.

    All fields but ``classification`` are JAX arrays (scalars unless noted).

    Attributes:
        classification: one of :data:`CLASSES` (a Python ``str``), see :func:`classify`.
        loss: :math:`f(\theta)`.
        grad_norm: :math:`\lVert \nabla f(\theta) \rVert` over all leaves.
        lambda_min: the smallest computed Hessian eigenvalue.
        lambda_max: the largest computed Hessian eigenvalue.
        residual_min: :math:`\lVert H v - \lambda_{\min} v \rVert` of the smallest pair.
        residual_max: the same for the largest pair.
        converged_min: whether the smallest pair met the eigensolver's tolerance.
        converged_max: whether the largest pair met it.
        eigenvalues: the ``2 k`` computed eigenvalues, ascending (``k`` from each end).
        eigenvectors: their eigenvectors, a pytree shaped like ``params`` with a leading axis
            ``2 k``.
        residuals: their residual norms, shape ``(2 k,)``.
        condition_number: :math:`\max|\lambda| / \min|\lambda|` over the computed eigenvalues;
            for an indefinite Hessian, or whenever the eigenvalue of smallest magnitude is not
            among the computed extremes, a *lower bound* on the true condition number; ``inf``
            when :math:`\lambda_{\min}` is numerically zero (see :func:`classify`).
        max_stable_lr: :math:`2 / \lambda_{\max}`, the largest gradient-descent step that does
            not diverge along the sharpest direction of the local quadratic model (``inf`` if
            :math:`\lambda_{\max} \le 0`).
        damping: the :math:`\delta` that makes :math:`H + \delta I` positive definite:
            :math:`\max(0, r_{\min} - \lambda_{\min}) (1 + 0.01) + \max(\sqrt{\epsilon}\,s,
            \text{tiny})`, where :math:`r_{\min}` is the residual of the smallest pair (the
            true smallest eigenvalue lies within it of the computed one), :math:`s =
            \max(|\lambda_{\min}|, |\lambda_{\max}|)` and :math:`\epsilon` the dtype's machine
            epsilon. Valid when the smallest pair has converged.
        num_matvecs: Hessian-vector products spent by the eigensolver.
        grad_tol: the gradient tolerance used.
        curvature_tol: the curvature tolerance used.
    """

    classification: str
    loss: jax.Array
    grad_norm: jax.Array
    lambda_min: jax.Array
    lambda_max: jax.Array
    residual_min: jax.Array
    residual_max: jax.Array
    converged_min: jax.Array
    converged_max: jax.Array
    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array
    condition_number: jax.Array
    max_stable_lr: jax.Array
    damping: jax.Array
    num_matvecs: jax.Array
    grad_tol: float
    curvature_tol: float


def classify(
    grad_norm: Any,
    lambda_min: Any,
    lambda_max: Any,
    converged: Any,
    grad_tol: float = 1e-3,
    curvature_tol: float = 1e-6,
    *,
    residual_min: Any = 0.0,
    residual_max: Any = 0.0,
) -> str:
    r"""Classify a point from its gradient norm and extreme Hessian eigenvalues.

    The rules, in order:

    1. ``"not critical"`` if ``grad_norm > grad_tol`` (an absolute tolerance on
       :math:`\lVert\nabla f\rVert`); the curvature is then not consulted.
    2. ``"undetermined"`` if the eigenpairs did not all converge or are not finite.
    3. An eigenvalue counts as zero when :math:`|\lambda| \le \text{curvature\_tol} \cdot s + r`,
       with :math:`s = \max(|\lambda_{\min}|, |\lambda_{\max}|)` (so ``curvature_tol`` is
       *relative*) and :math:`r` its residual norm (a computed eigenvalue lies within its
       residual of a true one, so a smaller value cannot be told from zero). Then
       ``"local minimum"`` if :math:`\lambda_{\min} > 0` (strictly, not zero), ``"local
       maximum"`` if :math:`\lambda_{\max} < 0`, ``"strict saddle"`` if
       :math:`\lambda_{\min} < 0 < \lambda_{\max}`, and ``"degenerate"`` otherwise: an extreme
       eigenvalue is zero and the second-order test cannot decide (e.g. :math:`x^4 + y^2` at
       the origin; with :math:`\lambda_{\min} < 0` a descent direction still exists).

    Args:
        grad_norm: :math:`\lVert\nabla f\rVert`.
        lambda_min: smallest Hessian eigenvalue.
        lambda_max: largest Hessian eigenvalue.
        converged: whether both eigenpairs converged (a bool or boolean array, all must hold).
        grad_tol: absolute tolerance on the gradient norm.
        curvature_tol: relative tolerance below which an eigenvalue counts as zero.
        residual_min: residual norm of the smallest pair (widens its zero band).
        residual_max: residual norm of the largest pair.

    Returns:
        One of :data:`CLASSES`.

    Examples:
        >>> classify(0.0, 1.0, 3.0, True)
        'local minimum'
        >>> classify(0.0, -2.0, 2.0, True)
        'strict saddle'
        >>> classify(0.0, 0.0, 2.0, True)
        'degenerate'
        >>> classify(0.5, 1.0, 3.0, True)
        'not critical'
    """
    validation.check_positive(grad_tol, "grad_tol")
    validation.check_nonnegative(curvature_tol, "curvature_tol")
    g = float(np.asarray(grad_norm))
    lo, hi = float(np.asarray(lambda_min)), float(np.asarray(lambda_max))
    r_lo, r_hi = float(np.asarray(residual_min)), float(np.asarray(residual_max))
    if not g <= grad_tol:
        # NaN gradients land here as well: such a point is not shown to be critical.
        return "not critical"
    if not bool(np.all(np.asarray(converged))) or not np.isfinite([lo, hi, r_lo, r_hi]).all():
        return "undetermined"
    scale = max(abs(lo), abs(hi))
    lo_zero = abs(lo) <= curvature_tol * scale + r_lo
    hi_zero = abs(hi) <= curvature_tol * scale + r_hi
    if lo > 0 and not lo_zero:
        return "local minimum"
    if hi < 0 and not hi_zero:
        return "local maximum"
    if lo < 0 and not lo_zero and hi > 0 and not hi_zero:
        return "strict saddle"
    return "degenerate"


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad_norm(f: Callable, params: PyTree, args: tuple) -> tuple[jax.Array, jax.Array]:
    # The data are a traced argument, not a closure: one compile for every batch of a shape.
    value, grad = jax.value_and_grad(f)(params, *args)
    return value, tree_norm(grad)


@functools.partial(jax.jit, static_argnums=1)
def _dense_extremes(op: LinearOperator, k: int):
    """Eigenpairs from a dense ``eigh``, for operators too small for the Krylov solver."""
    a = op.to_dense()
    a = 0.5 * (a + a.T)
    values, vectors = jnp.linalg.eigh(a)
    n = values.shape[0]
    idx = jnp.concatenate([jnp.arange(k), jnp.arange(n - k, n)])
    values, vectors = values[idx], vectors[:, idx]
    residuals = jnp.linalg.norm(a @ vectors - vectors * values, axis=0)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), op.like)
    _, unravel = ravel_pytree(zeros)
    return values, jax.vmap(unravel, in_axes=1)(vectors), residuals


@jax.jit
def _derived(values: jax.Array, residuals: jax.Array):
    dtype = values.dtype
    lo, hi = values[0], values[-1]
    scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    eps = jnp.finfo(dtype).eps
    cond = condition_number(values)
    max_lr = jnp.where(hi > 0, 2 / jnp.where(hi > 0, hi, 1), jnp.inf).astype(dtype)
    shortfall = jnp.maximum(0.0, residuals[0] - lo)
    tiny = jnp.maximum(jnp.sqrt(eps) * scale, jnp.finfo(dtype).tiny)
    damping = (shortfall * (1 + _DAMPING_MARGIN) + tiny).astype(dtype)
    return cond, max_lr, damping


def critical_point_report(
    f: Callable[..., jax.Array],
    params: PyTree,
    key: jax.Array,
    *args: Any,
    k: int = 1,
    grad_tol: float = 1e-3,
    curvature_tol: float = 1e-6,
    tol: float | None = None,
    max_matvecs: int | None = None,
    krylov_dim: int | None = None,
) -> CriticalPointReport:
    r"""Second-order analysis of ``f`` at ``params``: is it a minimum, a maximum or a saddle?

    Computes the loss and the gradient norm, then the ``k`` smallest and ``k`` largest Hessian
    eigenpairs in one :func:`hesskit.eigsh` run (``which="BE"``, ``2 k`` pairs), and derives:
    the classification (rules in :func:`classify`), a condition number over the computed
    eigenvalues (a lower bound for an indefinite Hessian, see
    :attr:`CriticalPointReport.condition_number`), the largest stable gradient-descent step
    :math:`2/\lambda_{\max}`, and the damping that makes :math:`H + \delta I` positive
    definite. When ``2 k`` is not below the dimension (tiny problems such as a function of two
    variables) the Hessian is formed densely and ``eigh`` is used instead (then ``tol`` and
    ``max_matvecs`` and ``krylov_dim`` are not used and ``num_matvecs`` counts the ``dim``
    columns).

    The numerical work (gradient, eigensolver) is compiled; the classification is decided in
    Python from the concrete results, so this function itself is not traceable. Use
    :func:`classify` on arrays you computed elsewhere. Gradients through it are not promised.
    With the data passed as ``args`` (not closed over) and the same ``f`` each time, reports
    at new points or on new batches of the same shapes reuse the compiled gradient and
    eigensolver.

    Args:
        f: scalar loss ``f(params, *args)``.
        params: the point, a pytree of real floating arrays.
        key: PRNG key for the eigensolver's start vector.
        *args: data arguments of ``f`` (a batch, ...), held fixed; see
            :func:`hesskit.hessian_operator`.
        k: eigenpairs computed at each end of the spectrum, ``2 k <= dim``.
        grad_tol: absolute tolerance on :math:`\lVert\nabla f\rVert` for a critical point.
        curvature_tol: relative tolerance below which an eigenvalue counts as zero.
        tol: the eigensolver's relative residual tolerance (default by dtype, see
            :func:`hesskit.eigsh`).
        max_matvecs: the eigensolver's budget of Hessian-vector products; if it runs out the
            pairs are not converged and the classification is ``"undetermined"``.
        krylov_dim: the eigensolver's basis size (default: :func:`hesskit.eigsh`'s).

    Returns:
        A :class:`CriticalPointReport` (tolerances included).

    Raises:
        ValueError: ``k`` out of range, bad tolerances, non-scalar ``f``.
        TypeError: non-floating ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda p: p[0] ** 2 - p[1] ** 2
        >>> rep = critical_point_report(f, jnp.zeros(2), jax.random.key(0))
        >>> rep.classification, float(rep.lambda_min), float(rep.lambda_max)
        ('strict saddle', -2.0, 2.0)
        >>> float(rep.max_stable_lr)
        1.0
        >>> g = lambda p, c: jnp.sum(c * p**2)      # data as an argument
        >>> critical_point_report(g, jnp.zeros(2), jax.random.key(0), jnp.array([1.0, -1.0]))[0]
        'strict saddle'

    References:
        Nocedal and Wright, *Numerical Optimization*, 2nd ed., theorems 2.3-2.4 (second-order
        conditions), 2006. Ge, Huang, Jin and Yuan, *Escaping from saddle points*, COLT 2015
        (strict saddles).
    """
    op = hessian_operator(f, params, *args)
    dim = op.dim
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 or 2 * k > dim:
        msg = f"k must be an int with 1 <= k and 2 k <= dim = {dim}, got {k!r}."
        raise ValueError(msg)
    k = int(k)
    validation.check_positive(grad_tol, "grad_tol")
    validation.check_nonnegative(curvature_tol, "curvature_tol")
    if tol is not None:
        validation.check_positive(tol, "tol")
    loss, grad_norm = _value_and_grad_norm(f, params, tuple(args))
    if 2 * k < dim:
        res = eigsh(
            op,
            key,
            2 * k,
            which="BE",
            tol=tol,
            max_matvecs=max_matvecs,
            krylov_dim=krylov_dim,
        )
        values, vectors, residuals = res.eigenvalues, res.eigenvectors, res.residuals
        converged, num_matvecs = res.converged, res.num_matvecs
    else:
        values, vectors, residuals = _dense_extremes(op, k)
        rel = default_tol(op.dtype) if tol is None else tol
        scale = jnp.max(jnp.abs(values))
        converged = (residuals <= rel * scale) | (residuals <= jnp.finfo(op.dtype).eps * dim)
        num_matvecs = jnp.asarray(dim, jnp.int32)
    cond, max_lr, damping = _derived(values, residuals)
    label = classify(
        grad_norm,
        values[0],
        values[-1],
        np.asarray([converged[0], converged[-1]]),
        grad_tol,
        curvature_tol,
        residual_min=residuals[0],
        residual_max=residuals[-1],
    )
    return CriticalPointReport(
        classification=label,
        loss=loss,
        grad_norm=grad_norm,
        lambda_min=values[0],
        lambda_max=values[-1],
        residual_min=residuals[0],
        residual_max=residuals[-1],
        converged_min=converged[0],
        converged_max=converged[-1],
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        condition_number=cond,
        max_stable_lr=max_lr,
        damping=damping,
        num_matvecs=num_matvecs,
        grad_tol=grad_tol,
        curvature_tol=curvature_tol,
    )
