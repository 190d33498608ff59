"""What curvature does to optimization: gradient-descent rates, weight decay, a convex SVM.

Small closed-form analyses on eigenvalues (from :func:`hesskit.eigsh` or a dense ``eigh``):
per-direction contraction of gradient descent on a quadratic, the shift that L2
regularization (weight decay) applies to the spectrum and the condition number before and
after, and an L2-regularized hinge-loss SVM, a convex loss whose Hessian is known exactly
away from its kinks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src import validation

__all__ = [
    "GDRates",
    "RegularizedSpectrum",
    "condition_number",
    "gd_rates",
    "regularized_spectrum",
    "svm_hinge_loss",
]


def _float_array(x: Any, name: str) -> jax.Array:
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    if arr.ndim > 1:
        msg = f"{name} must be a scalar or one-dimensional, got shape {arr.shape}."
        raise ValueError(msg)
    if arr.size == 0:
        msg = f"{name} must hold at least one eigenvalue, got an empty array."
        raise ValueError(msg)
    return arr


def condition_number(eigenvalues: Any) -> jax.Array:
    r"""Condition number :math:`\max_i |\lambda_i| / \min_i |\lambda_i|` of a set of eigenvalues.

    For an indefinite or partially computed spectrum this is the ratio of the largest to the
    smallest *magnitude among the given values*. When the values are only the extremes of the
    spectrum (say LA(k) and SA(k) from :func:`hesskit.eigsh`), the eigenvalue of smallest
    magnitude is usually missing (it sits in the bulk), so the result is a **lower bound** on the
    true :math:`\kappa(H) = \lVert H \rVert \lVert H^{-1} \rVert`. It is ``inf`` when the
    smallest magnitude is zero. jit-compatible.

    Args:
        eigenvalues: shape ``(n,)`` (or a scalar).

    Returns:
        A scalar in the eigenvalues' floating dtype.

    Examples:
        >>> float(condition_number([-2.0, 0.5, 4.0]))
        8.0
    """
    lam = jnp.abs(_float_array(eigenvalues, "eigenvalues"))
    lo, hi = jnp.min(lam), jnp.max(lam)
    return jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1), jnp.inf).astype(lam.dtype)


class GDRates(NamedTuple):
    r"""Gradient descent on a quadratic, one eigen-direction at a time.

    With :math:`H = \sum_i \lambda_i v_i v_i^\top` and the minimizer :math:`\theta^*`, the error
    component :math:`e_i(t) = v_i^\top (\theta_t - \theta^*)` of gradient descent with step
    :math:`\eta` obeys :math:`e_i(t) = (1 - \eta \lambda_i)^t e_i(0)` exactly.

    Attributes:
        contraction: :math:`1 - \eta\lambda_i` per direction, shape ``(n,)``.
        iterations: steps needed to shrink :math:`|e_i|` by ``factor``:
            :math:`\lceil \log(\text{factor}) / -\log|1 - \eta\lambda_i| \rceil`; ``inf`` where
            :math:`|1 - \eta\lambda_i| \ge 1`, ``1`` where it is ``0``.
        stable: :math:`|1 - \eta\lambda_i| < 1` per direction (the component shrinks).
        all_stable: every direction is stable (scalar).
        rate: :math:`\max_i |1 - \eta\lambda_i|`, the linear rate of the slowest direction.
        max_stable_lr: :math:`2 / \max_i \lambda_i`, the step size beyond which the sharpest
            direction diverges (``inf`` if no eigenvalue is positive).
        best_lr: :math:`2 / (\lambda_{\min} + \lambda_{\max})`, the step that minimizes
            ``rate`` when all eigenvalues are positive (``nan`` otherwise).
    """

    contraction: jax.Array
    iterations: jax.Array
    stable: jax.Array
    all_stable: jax.Array
    rate: jax.Array
    max_stable_lr: jax.Array
    best_lr: jax.Array


def gd_rates(eigenvalues: Any, lr: Any, *, factor: float = 10.0) -> GDRates:
    r"""Per-direction convergence of gradient descent with step ``lr`` on a quadratic.

    On :math:`L(\theta) = \tfrac12 (\theta - \theta^*)^\top H (\theta - \theta^*)`, gradient
    descent :math:`\theta_{t+1} = \theta_t - \eta \nabla L` multiplies the error along the
    eigenvector :math:`v_i` by :math:`1 - \eta \lambda_i` at every step. Directions with
    :math:`0 < \eta\lambda_i < 2` shrink, the sharpest direction sets the largest usable step
    :math:`2 / \lambda_{\max}`, and the flattest sets the number of steps: with the best step
    the rate is :math:`(\kappa - 1)/(\kappa + 1)`. Negative eigenvalues give
    :math:`|1 - \eta\lambda_i| > 1`: gradient descent moves away along them (it escapes a
    saddle). For a non-quadratic loss this describes the local quadratic model only.
    jit-compatible in ``eigenvalues`` and ``lr``.

    Args:
        eigenvalues: Hessian eigenvalues :math:`\lambda_i`, shape ``(n,)`` or a scalar.
        lr: the step size :math:`\eta > 0`.
        factor: the error reduction that ``iterations`` counts (default 10: one digit).

    Returns:
        A :class:`GDRates`.

    Raises:
        ValueError: empty ``eigenvalues``, ``lr`` not a finite positive number, ``factor <= 1``.

    Examples:
        >>> r = gd_rates([0.1, 1.0], 1.0)
        >>> [round(float(c), 3) for c in r.contraction], bool(r.all_stable)
        ([0.9, 0.0], True)
        >>> [float(i) for i in r.iterations]
        [22.0, 1.0]
    """
    lam = _float_array(eigenvalues, "eigenvalues")
    validation.check_positive(lr, "lr")
    if not np.isfinite(factor) or factor <= 1:
        msg = f"factor must be a finite number > 1, got {factor!r}."
        raise ValueError(msg)
    lam1 = jnp.atleast_1d(lam)
    dtype = lam1.dtype
    lr = jnp.asarray(lr, dtype)
    c = 1 - lr * lam1
    a = jnp.abs(c)
    stable = a < 1
    safe = jnp.where(stable & (a > 0), a, 0.5)
    its = jnp.ceil(np.log(factor) / -jnp.log(safe))
    its = jnp.where(a == 0, 1.0, its)
    its = jnp.where(stable, its, jnp.inf).astype(dtype)
    top = jnp.max(lam1)
    bottom = jnp.min(lam1)
    max_lr = jnp.where(top > 0, 2 / jnp.where(top > 0, top, 1), jnp.inf).astype(dtype)
    best = jnp.where(bottom > 0, 2 / (bottom + top), jnp.nan).astype(dtype)
    shape = jnp.shape(lam)
    return GDRates(
        contraction=c.reshape(shape),
        iterations=its.reshape(shape),
        stable=stable.reshape(shape),
        all_stable=jnp.all(stable),
        rate=jnp.max(a),
        max_stable_lr=max_lr,
        best_lr=best,
    )


class RegularizedSpectrum(NamedTuple):
    r"""The spectrum of :math:`H + w I` next to that of :math:`H`.

    Attributes:
        eigenvalues: :math:`\lambda_i + w`, shape ``(n,)``.
        condition_before: :func:`condition_number` of the given eigenvalues.
        condition_after: :func:`condition_number` of the shifted ones.
        positive_definite: all shifted eigenvalues are ``> 0``.
    """

    eigenvalues: jax.Array
    condition_before: jax.Array
    condition_after: jax.Array
    positive_definite: jax.Array


def regularized_spectrum(eigenvalues: Any, weight_decay: Any) -> RegularizedSpectrum:
    r"""How an L2 penalty :math:`\tfrac{w}{2}\lVert\theta\rVert^2` shifts the Hessian spectrum.

    The penalty adds :math:`w I` to the Hessian, so every eigenvalue moves up by :math:`w` and
    the eigenvectors stay the same. Small eigenvalues gain the most relatively: the condition
    number :math:`\max|\lambda| / \min|\lambda|` drops, and a positive semidefinite (singular)
    Hessian becomes invertible. With negative eigenvalues the shift can pass through zero and
    make the condition number *worse* (an eigenvalue near :math:`-w` becomes near zero). The
    condition numbers follow :func:`condition_number`: over the given eigenvalues only, a lower
    bound when those are just the extremes. jit-compatible.

    Args:
        eigenvalues: eigenvalues of the unregularized Hessian, shape ``(n,)`` or a scalar.
        weight_decay: :math:`w \ge 0`.

    Returns:
        A :class:`RegularizedSpectrum`.

    Raises:
        ValueError: empty ``eigenvalues`` or a negative or non-finite ``weight_decay``.

    Examples:
        >>> r = regularized_spectrum([1e-4, 1.0, 10.0], 0.1)
        >>> round(float(r.condition_before)), round(float(r.condition_after), 1)
        (100000, 100.9)
    """
    lam = _float_array(eigenvalues, "eigenvalues")
    validation.check_nonnegative(weight_decay, "weight_decay")
    shifted = lam + jnp.asarray(weight_decay, lam.dtype)
    return RegularizedSpectrum(
        eigenvalues=shifted,
        condition_before=condition_number(lam),
        condition_after=condition_number(shifted),
        positive_definite=jnp.all(shifted > 0),
    )


def svm_hinge_loss(w: jax.Array, x: jax.Array, y: jax.Array, reg: Any) -> jax.Array:
    r"""The L2-regularized hinge loss of a linear SVM (no bias term).

    .. math::
        L(w) = \frac1n \sum_{i=1}^n \max(0,\, 1 - y_i\, x_i^\top w) + \frac{r}{2} \lVert w \rVert^2

    The hinge part is piecewise linear, so wherever no example sits exactly on its margin
    (:math:`y_i x_i^\top w \ne 1`) its Hessian is zero and :math:`\nabla^2 L = r I`: positive
    definite for :math:`r > 0`, and the loss is convex everywhere. Append a constant feature to
    ``x`` for a bias (it is then regularized too, which keeps the Hessian :math:`r I`).

    Args:
        w: weights, shape ``(d,)``.
        x: inputs, shape ``(n, d)``.
        y: labels in :math:`\{-1, +1\}`, shape ``(n,)``.
        reg: the regularization strength :math:`r` (a scalar, may be traced).

    Returns:
        The scalar loss in ``w``'s dtype.

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> float(svm_hinge_loss(jnp.zeros(2), x, jnp.array([1.0, -1.0]), 0.1))
        1.0
    """
    margins = y * (x @ w)
    hinge = jnp.mean(jnp.maximum(0.0, 1.0 - margins))
    return (hinge + 0.5 * reg * jnp.vdot(w, w)).astype(w.dtype)
