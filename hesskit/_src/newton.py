"""Second-order optax transforms: saddle-free Newton in a Krylov space and Hessian-free Newton-CG.

Both read the objective from the ``value_fn`` extra argument, as :func:`negative_curvature`
does (see :mod:`hesskit._src.saddle_transforms` for the calling convention that makes a jitted
step compile once), and read the incoming updates as the gradient: put them first in a chain,
or after transforms that keep the gradient's meaning (clipping). Their Krylov work runs in
float32 or wider whatever the parameters' dtype (:mod:`hesskit._src.krylov`); the products run
in the parameters' dtypes and the returned updates are cast back to them.

Neither holds a second copy of a numerical kernel: the Krylov space of
:func:`saddle_free_newton` is :func:`hesskit.lanczos` (compiled loop), the linear solve of
:func:`newton_cg` is :func:`hesskit.solve` (CG with its negative-curvature stop, warm-started
with ``x0``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import Partial

from hesskit._src import krylov, linsolve
from hesskit._src.operators import LinearOperator, ggn_operator, hessian_operator
from hesskit._src.saddle_transforms import (
    _as_key,
    _check_nonnegative,
    _check_positive_int,
    _require_value_fn,
    ritz_decomposition,
)
from hesskit._src.tree import (
    tree_axpy,
    tree_matvec,
    tree_normalize,
    tree_random_sphere,
    tree_rmatvec,
    tree_scale,
    tree_sub,
    tree_vdot,
)
from hesskit._src.tridiag import lanczos

PyTree = Any

__all__ = [
    "NewtonCGState",
    "SaddleFreeNewtonState",
    "newton_cg",
    "saddle_free_newton",
]

CURVATURES = ("hessian", "ggn")

# Levenberg-Marquardt adaptation of Martens (2010, section 4.1).
_DROP, _BOOST = 2.0 / 3.0, 3.0 / 2.0
_LOW_RHO, _HIGH_RHO = 0.25, 0.75
_MIN_DAMPING, _MAX_DAMPING = 1e-8, 1e8


def _to_updates(direction: PyTree, like: PyTree, scale: Any) -> PyTree:
    return jax.tree_util.tree_map(lambda d, u: (scale * d).astype(u.dtype), direction, like)


def _where(flag: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), x, y)


# -- saddle-free Newton ------------------------------------------------------------------------
class SaddleFreeNewtonState(NamedTuple):
    """State of :func:`saddle_free_newton`.

    ``ritz_min`` and ``ritz_max`` are the extreme Ritz values of the last step's Krylov space
    (estimates of the Hessian's extreme eigenvalues, inside the spectrum); ``ritz_vector`` is
    the Ritz vector of ``ritz_min``, which starts the next step's space.
    """

    count: jax.Array
    rng_key: jax.Array
    ritz_min: jax.Array
    ritz_max: jax.Array
    ritz_vector: PyTree


def saddle_free_newton(
    learning_rate: Any = 1.0,
    *,
    num_matvecs: int = 10,
    damping: Any = 1e-1,
    seed: Any = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Saddle-free Newton (Dauphin et al. 2014) in a Krylov space: divide by :math:`|\lambda|`.

    Newton's step :math:`-H^{-1} g` moves *towards* a saddle along its negative-curvature
    directions; dividing by :math:`|\lambda|` instead keeps the Newton step length and turns
    those directions downhill. Each step runs ``num_matvecs`` Lanczos steps
    (:func:`hesskit.lanczos`, compiled loop) started from
    :math:`\hat g + \tilde v`, the normalized gradient plus the previous step's most negative
    Ritz vector (so the space keeps a negative direction the gradient barely touches), giving
    an orthonormal basis :math:`V` of Ritz vectors and their values :math:`\Lambda`. With
    :math:`g_\perp = g - VV^\top g`, the part of the gradient outside the space, the update is

    .. math::
        u = -\eta \left[ V (|\Lambda| + \delta I)^{-1} V^\top g
            + \frac{g_\perp}{\max_i |\Lambda_i| + \delta} \right].

    The scale of the outer part is a gradient step of length :math:`1/\lVert H\rVert` (the
    largest Ritz magnitude bounds :math:`\lVert H\rVert` from below): the curvature there is
    unknown, and the step that is safe for the largest curvature is the conservative choice.
    :math:`\delta` (``damping``) bounds the step along near-zero curvature by
    :math:`\lVert g\rVert/\delta`; it is absolute, in the units of the Hessian's eigenvalues.

    Cost: ``num_matvecs`` Hessian-vector products per step and a basis of ``num_matvecs``
    parameter-sized vectors, on top of the gradient. At an exact critical point (:math:`g = 0`)
    the step is zero, as every gradient-scaled method's is: chain a perturbation
    (:func:`hesskit.perturb_near_saddle`) or :func:`hesskit.negative_curvature` to leave it.

    Args:
        learning_rate: :math:`\eta \ge 0` (1 is the saddle-free Newton step).
        num_matvecs: Lanczos steps (Hessian-vector products) per update, ``>= 1`` (capped at the
            dimension); it sizes the compiled program, so keep it static under
            :func:`optax.inject_hyperparams` (``static_args=("num_matvecs",)``).
        damping: :math:`\delta \ge 0`.
        seed: an int seed or a PRNG key (the first step's warm-start vector).

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`; ``update(grads, state, params,
        value_fn=f)`` reads the incoming updates as the gradient of ``f`` at ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> f = lambda p: p[0] ** 2 - p[1] ** 2 + p[1] ** 4 / 4   # a saddle at the origin
        >>> opt = saddle_free_newton(1.0, num_matvecs=2, damping=0.0)
        >>> p = jnp.array([1e-3, 1e-3])
        >>> u, _ = opt.update(jax.grad(f)(p), opt.init(p), p, value_fn=f)
        >>> [round(float(x), 6) for x in p + u]                    # Newton would go to 0
        [0.0, 0.002]

    References:
        Dauphin, Pascanu, Gulcehre, Cho, Ganguli and Bengio, *Identifying and attacking the
        saddle point problem in high-dimensional non-convex optimization*, NeurIPS 2014.
    """
    _check_nonnegative(learning_rate, "learning_rate")
    _check_nonnegative(damping, "damping")
    _check_positive_int(num_matvecs, "num_matvecs")

    def init_fn(params: PyTree) -> SaddleFreeNewtonState:
        key, sub = jax.random.split(_as_key(seed))
        vector = tree_random_sphere(sub, krylov.to_krylov(params))
        nan = jnp.full((), jnp.nan, jnp.float32)
        return SaddleFreeNewtonState(jnp.zeros((), jnp.int32), key, nan, nan, vector)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        _require_value_fn(value_fn, params, "saddle_free_newton")
        key, sub = jax.random.split(state.rng_key)
        op = hessian_operator(value_fn, params)
        g = krylov.to_krylov(updates)
        g_hat, _ = tree_normalize(g)
        start = jax.tree_util.tree_map(jnp.add, g_hat, state.ritz_vector)
        m = min(int(num_matvecs), op.dim)
        res = lanczos(op, sub, m, v0=krylov.cast_like(start, op.like), loop="compiled")
        theta, s, valid = ritz_decomposition(res)
        coeffs = tree_rmatvec(res.basis, g)  # Q g: g in the Lanczos basis
        abs_theta = jnp.where(valid, jnp.abs(theta), 0.0)
        scaled = jnp.where(valid, (s.T @ coeffs) / (abs_theta + damping), 0.0)
        inside = tree_matvec(res.basis, s @ scaled)
        outside = tree_sub(g, tree_matvec(res.basis, coeffs))
        top = jnp.max(abs_theta)
        # Without damping and a zero Krylov space (g = 0 and a breakdown) there is no scale:
        # the outer part is then zero as well.
        scale = top + damping
        outer = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
        direction = tree_axpy(outer, outside, inside)
        low = jnp.argmin(theta)
        vec, _ = tree_normalize(tree_matvec(res.basis, s[:, low]))
        new_updates = _to_updates(direction, updates, -learning_rate)
        new_state = SaddleFreeNewtonState(
            count=state.count + 1,
            rng_key=key,
            ritz_min=theta[low].astype(jnp.float32),
            ritz_max=jnp.max(jnp.where(valid, theta, -jnp.inf)).astype(jnp.float32),
            ritz_vector=vec,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- Newton-CG (Hessian-free) ------------------------------------------------------------------
class NewtonCGState(NamedTuple):
    r"""State of :func:`newton_cg`.

    Attributes:
        count: steps taken.
        damping: the Levenberg-Marquardt :math:`\lambda` used by the next step (fixed or
            adapted).
        direction: the last CG solution :math:`d` (Krylov precision), the next warm start.
        rho: the last reduction ratio (actual over predicted decrease; NaN when damping is
            fixed, since it is then not computed).
        num_cg_iters: products spent by the last CG solve.
        cg_status: the last solve's :attr:`hesskit.SolveResult.status` (2: negative curvature).
    """

    count: jax.Array
    damping: jax.Array
    direction: PyTree
    rho: jax.Array
    num_cg_iters: jax.Array
    cg_status: jax.Array


def _krylov_matvec(op: LinearOperator, q: PyTree) -> PyTree:
    return krylov.product(op)(q)


def newton_cg(
    learning_rate: Any = 1.0,
    *,
    damping: Any = None,
    initial_damping: Any = 1.0,
    maxiter: int = 50,
    tol: float = 1e-3,
    warm_start: Any = 0.95,
    curvature: str = "hessian",
) -> optax.GradientTransformationExtraArgs:
    r"""Hessian-free truncated Newton (Martens 2010): CG on :math:`(B + \lambda I) d = -g`.

    :math:`B` is the Hessian (``curvature="hessian"``) or the generalized Gauss-Newton matrix
    :math:`J^\top H_L J` (``"ggn"``, positive semidefinite for convex output losses, the choice
    of Martens 2010). Each step runs :func:`hesskit.solve`'s CG, at most ``maxiter`` products,
    warm-started from ``warm_start`` times the previous solution, and returns
    :math:`u = \eta\, d`.

    * **Negative curvature.** When CG meets a search direction :math:`p` with
      :math:`p^\top (B + \lambda I) p \le 0` it stops (Nocedal and Wright, Algorithm 7.1) and
      the step is the iterate reached so far plus a move along :math:`p`, signed downhill and
      of length :math:`|\kappa|`, :math:`\kappa = \hat p^\top B \hat p` its curvature (the
      negative-curvature step of Royer, O'Neill and Wright 2020; one more product). Any
      direction that is not downhill (:math:`g^\top d \ge 0`, possible after a warm start)
      is replaced by the gradient step :math:`-g / \max(\lambda, 1)`.
    * **Damping.** With ``damping`` a number, :math:`\lambda` is fixed. With ``damping=None``
      (default) it starts at ``initial_damping`` and follows Levenberg-Marquardt on the
      reduction ratio :math:`\rho = (f(\theta + u) - f(\theta)) / (g^\top u + \tfrac12
      u^\top B u)` of the update actually returned: :math:`\lambda \leftarrow \tfrac32
      \lambda` when :math:`\rho < \tfrac14`, :math:`\tfrac23 \lambda` when :math:`\rho >
      \tfrac34` (Martens 2010, section 4.1), within :math:`[10^{-8}, 10^8]`; an update that
      raises the loss (:math:`\rho < 0`) is rejected (zero), as Levenberg-Marquardt does, and so
      is one whose model predicts an increase (with :math:`\eta > 2`, or along negative
      curvature); a predicted change below the rounding level of :math:`f` leaves both alone. This
      costs one more product (:math:`Bu`) and one loss evaluation per step.

    Cost per step: the CG products (at most ``maxiter``, plus one for the warm start and one
    for CG's final true residual), one product for :math:`Bu` and a loss evaluation when the
    damping adapts, one more product at a negative-curvature stop. A product is about two
    gradients (``benchmarks/hvp.py``).

    The incoming updates are read as the gradient :math:`g`. ``value_fn`` is the objective;
    for ``"ggn"`` the extra arguments ``model_fn`` (``params -> outputs``) and
    ``output_loss_fn`` (``outputs -> scalar``) define :math:`B` (made inside the jitted step,
    like ``value_fn``), and ``value_fn`` defaults to their composition.

    Args:
        learning_rate: :math:`\eta \ge 0` (1 is the Newton step; the damping adapts to it).
        damping: a fixed :math:`\lambda \ge 0`, or ``None`` to adapt it.
        initial_damping: the first :math:`\lambda` when it adapts (``> 0``; Martens: 45 for
            his autoencoders, small problems want less).
        maxiter: CG's budget of products per step, ``>= 1`` (static: it sizes nothing but is
            a Python int in the solver).
        tol: CG's relative residual tolerance, ``> 0``.
        warm_start: the factor on the previous direction that starts CG, in ``[0, 1]``
            (Martens: 0.95); ``0`` starts from zero and saves the start's product.
        curvature: ``"hessian"`` or ``"ggn"``.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
        ValueError: a hyperparameter out of range (at construction) or, for ``"ggn"``, a
            missing ``model_fn``/``output_loss_fn`` (a ``TypeError`` at the first update).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> a = jnp.array([[3.0, 1.0], [1.0, 2.0]]); b = jnp.array([1.0, -1.0])
        >>> f = lambda x: 0.5 * x @ a @ x - b @ x                  # minimum at a^-1 b
        >>> opt = newton_cg(1.0, damping=0.0, tol=1e-6)
        >>> x = jnp.zeros(2)
        >>> u, _ = opt.update(jax.grad(f)(x), opt.init(x), x, value_fn=f)
        >>> [round(float(t), 4) for t in x + u]
        [0.6, -0.8]

    References:
        Martens, *Deep learning via Hessian-free optimization*, ICML 2010.
        Nocedal and Wright, *Numerical Optimization*, 2nd ed., Springer 2006, chapter 7.
        Royer, O'Neill and Wright, *A Newton-CG algorithm with complexity guarantees for smooth
        unconstrained optimization*, Math. Program. 180, 2020.
    """
    _check_nonnegative(learning_rate, "learning_rate")
    adaptive = damping is None
    if not adaptive:
        _check_nonnegative(damping, "damping")
    _check_nonnegative(initial_damping, "initial_damping")
    if isinstance(initial_damping, int | float) and initial_damping == 0:
        msg = "initial_damping must be > 0 (multiplicative adaptation cannot leave 0)."
        raise ValueError(msg)
    _check_positive_int(maxiter, "maxiter")
    if isinstance(tol, int | float) and not tol > 0:
        msg = f"tol must be > 0, got {tol!r}."
        raise ValueError(msg)
    if isinstance(warm_start, int | float) and not 0 <= warm_start <= 1:
        msg = f"warm_start must be in [0, 1], got {warm_start!r}."
        raise ValueError(msg)
    if curvature not in CURVATURES:
        msg = f"curvature must be one of {CURVATURES}, got {curvature!r}."
        raise ValueError(msg)
    use_x0 = not (isinstance(warm_start, int | float) and warm_start == 0)

    def init_fn(params: PyTree) -> NewtonCGState:
        start = initial_damping if adaptive else damping
        return NewtonCGState(
            count=jnp.zeros((), jnp.int32),
            damping=jnp.asarray(start, jnp.float32),
            direction=jax.tree_util.tree_map(jnp.zeros_like, krylov.to_krylov(params)),
            rho=jnp.full((), jnp.nan, jnp.float32),
            num_cg_iters=jnp.zeros((), jnp.int32),
            cg_status=jnp.zeros((), jnp.int32),
        )

    def curvature_operator(params, value_fn, model_fn, output_loss_fn):
        if curvature == "hessian":
            return hessian_operator(value_fn, params)
        return ggn_operator(model_fn, output_loss_fn, params)

    def update_fn(
        updates,
        state,
        params=None,
        *,
        value_fn=None,
        model_fn=None,
        output_loss_fn=None,
        **extra_args,
    ):
        del extra_args
        if curvature == "ggn":
            if not (callable(model_fn) and callable(output_loss_fn)):
                msg = (
                    'newton_cg(curvature="ggn") needs model_fn (params -> outputs) and '
                    "output_loss_fn (outputs -> scalar): call update(grads, state, params, "
                    "model_fn=..., output_loss_fn=...)."
                )
                raise TypeError(msg)
            if value_fn is None:

                def value_fn(p):
                    return output_loss_fn(model_fn(p))

        _require_value_fn(value_fn, params, "newton_cg")
        lam = state.damping if adaptive else jnp.asarray(damping, jnp.float32)
        base = curvature_operator(params, value_fn, model_fn, output_loss_fn).linearize()
        klike = krylov.krylov_like(base.like)
        kdtype = krylov.krylov_dtype(klike)
        # CG runs in Krylov precision on the damped operator; the products in the params' dtypes.
        op = LinearOperator(Partial(_krylov_matvec, base), klike, shift=lam.astype(kdtype))
        bop = LinearOperator(Partial(_krylov_matvec, base), klike)
        g = krylov.cast_like(updates, klike)
        b = tree_scale(-1.0, g)
        x0 = tree_scale(warm_start, state.direction) if use_x0 else None
        res = linsolve.solve(op, b, tol=tol, max_iters=int(maxiter), x0=x0)
        d = res.x
        negative = res.status == linsolve.NEGATIVE_CURVATURE

        def curvature_step(_):
            p_hat, _ = tree_normalize(res.direction)
            kappa = tree_vdot(p_hat, bop(p_hat))
            sign = jnp.where(tree_vdot(g, p_hat) > 0, -1.0, 1.0)
            return tree_axpy(sign * jnp.abs(kappa), p_hat, d)

        d = jax.lax.cond(negative, curvature_step, lambda _: d, None)
        gd = tree_vdot(g, d)
        fallback = tree_scale(-1.0 / jnp.maximum(lam, 1.0).astype(kdtype), g)
        descent = (gd < 0) & jnp.isfinite(gd)
        d = _where(descent, d, fallback)
        step = jnp.asarray(learning_rate, kdtype)
        u = tree_scale(step, d)
        if adaptive:
            f0 = value_fn(params)
            trial = optax.apply_updates(params, krylov.cast_like(u, params))
            actual = (value_fn(trial) - f0).astype(kdtype)
            predicted = tree_vdot(g, u) + 0.5 * tree_vdot(u, bop(u))
            ok = predicted < 0
            rho = jnp.where(ok, actual / jnp.where(ok, predicted, -1.0), -jnp.inf)
            rho = jnp.where(jnp.isfinite(actual), rho, -jnp.inf)
            new_lam = jnp.where(rho < _LOW_RHO, lam * _BOOST, lam)
            new_lam = jnp.where(rho > _HIGH_RHO, lam * _DROP, new_lam)
            # A predicted change at the rounding level of f (at a minimum) says nothing about
            # the model: keep the damping, and the step unless it raised f past that level.
            # A predicted increase is no such thing: it is rejected and boosts the damping
            # (accepting it let a learning rate above 2 climb, and lr >= 0.1 on an indefinite
            # Hessian diverge).
            level = 100 * jnp.finfo(kdtype).eps * jnp.abs(f0).astype(kdtype)
            noise = jnp.abs(predicted) <= level
            new_lam = jnp.clip(jnp.where(noise, lam, new_lam), _MIN_DAMPING, _MAX_DAMPING)
            accept = (rho >= 0) | (noise & (actual <= level))
            # A where, not a product with 0: a rejected step may hold infs.
            u = _where(accept, u, jax.tree_util.tree_map(jnp.zeros_like, u))
        else:
            rho = jnp.full((), jnp.nan, jnp.float32)
            new_lam = lam
        new_state = NewtonCGState(
            count=state.count + 1,
            damping=new_lam.astype(jnp.float32),
            direction=d,
            rho=rho.astype(jnp.float32),
            num_cg_iters=res.num_iters.astype(jnp.int32),
            cg_status=res.status.astype(jnp.int32),
        )
        return _to_updates(u, updates, 1.0), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
