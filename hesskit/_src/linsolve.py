"""Hessian-free linear solves: conjugate gradient and MINRES on pytrees.

A solve runs in one compiled loop, or (``loop="host"``, what ``"auto"`` picks on CPU for
products with a convolution) one compiled iteration per call from Python.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hesskit._src import validation
from hesskit._src.krylov import check_devices, linearized, resolve_loop
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import tree_axpy, tree_norm, tree_scale, tree_sub, tree_vdot

PyTree = Any

__all__ = [
    "CONVERGED",
    "MAX_ITERS",
    "NEGATIVE_CURVATURE",
    "NONFINITE",
    "SINGULAR",
    "STAGNATED",
    "SolveResult",
    "solve",
]

METHODS = ("cg", "minres")

CONVERGED = 0
"""``status``: the true residual meets ``tol``."""
MAX_ITERS = 1
"""``status``: the budget ``max_iters`` was spent first."""
NEGATIVE_CURVATURE = 2
"""``status`` (CG only): a direction with ``p^T A p <= 0`` was met: ``A`` is not definite."""
NONFINITE = 3
"""``status``: a NaN or Inf appeared (in ``b`` or in a product)."""
STAGNATED = 4
"""``status``: a restart from the true residual made no progress (the rounding floor)."""
SINGULAR = 5
"""``status`` (MINRES): the system is inconsistent to working precision (``b`` has a part
outside the range of a singular ``A``); ``x`` is a least-squares solution, ``||A r||`` is small."""

_RUNNING = -1
MAX_ITERS_CAP = 1000
"""Cap of the default ``max_iters = min(10 * dim, MAX_ITERS_CAP)``."""


class SolveResult(NamedTuple):
    r"""Outcome of :func:`solve`.

    Attributes:
        x: the approximate solution, a pytree shaped like ``b``.
        residual_norm: the true residual :math:`\lVert b - A x\rVert` of the returned ``x``,
            recomputed with one extra product after the loop (not the recursive estimate).
        num_iters: operator products spent inside the loop (the final check adds one more).
        converged: ``residual_norm <= tol * ||b||`` and everything stayed finite.
        status: ``0`` converged, ``1`` budget spent, ``2`` negative curvature (CG: ``p^T A p <=
            0``), ``3`` NaN/Inf met, ``4`` stagnated at the rounding floor (a restart from the
            true residual did not halve it), ``5`` singular inconsistent system (MINRES). Also
            named as constants in ``hesskit._src.linsolve`` (``CONVERGED``, ``MAX_ITERS``, ...).
        direction: CG's last search direction :math:`p` (at ``status=2`` the direction with
            :math:`p^\top A p \le 0` that stopped it, which truncated-Newton methods use as a
            negative-curvature step); MINRES's last Lanczos vector. Shaped like ``b``.
    """

    x: PyTree
    residual_norm: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    status: jax.Array
    direction: PyTree


def solve(
    op: LinearOperator,
    b: PyTree,
    *,
    method: str = "cg",
    tol: float = 1e-6,
    max_iters: int | None = None,
    x0: PyTree | None = None,
    loop: str = "auto",
) -> SolveResult:
    r"""Solve :math:`(A + \delta I)\, x = b` by CG or MINRES, with products only.

    The damping :math:`\delta` is the operator's ``shift`` (e.g. ``hessian_operator(...,
    damping=delta)``). ``"cg"`` is the conjugate gradient method (Hestenes and Stiefel 1952)
    for symmetric positive definite systems; it stops as soon as a search direction has
    non-positive curvature :math:`p^\top A p \le 0` and returns the iterate reached so far with
    ``status=2`` and ``converged=False`` (the truncated-Newton convention of Nocedal and Wright,
    Algorithm 7.1; when this happens at the first step the returned ``x`` is zero and a
    Newton-CG caller should fall back to the steepest-descent direction ``b``). ``"minres"``
    (Paige and Saunders 1975) minimizes :math:`\lVert b - Ax\rVert` over the Krylov space and
    handles symmetric indefinite systems.

    Both run one product per iteration, in one :func:`jax.lax.while_loop` or from the host
    (``loop``, below). The recursive
    residual drifts from the true one in finite precision, so when it first meets the
    tolerance the next iteration spends its product on the true residual :math:`b - Ax`
    instead: if that meets the tolerance the solve has converged, otherwise the method restarts
    from it (residual replacement), and a restart that does not halve the true residual stops
    with ``status=4``. The returned ``residual_norm`` is always recomputed from ``x``. Nothing
    can be raised inside compiled code, so budget exhaustion and NaN/Inf come back as
    ``converged=False`` with a ``status``. Gradients through this function are not promised.

    Loop strategy, as in :func:`hesskit.eigsh`: ``loop="compiled"`` runs the whole solve in one
    :func:`jax.lax.while_loop` (the only choice inside a user's ``jit`` or ``vmap``);
    ``loop="host"`` dispatches each iteration (its product and the recurrence, the state
    donated so it is updated in place) as one compiled call from Python and reads the stop
    flag (two scalars) after each. XLA's CPU backend runs convolutions inside ``while`` loops
    many times slower than outside (jax-ml/jax#12868), so ``"auto"`` (default) picks
    ``"host"`` on CPU, outside traced code, when the product contains a convolution, and
    ``"compiled"`` otherwise. Both do the same arithmetic and return the same result.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator` (linearized once).
        b: the right-hand side, shaped like ``op.like`` (same structure, shapes and dtypes).
        method: ``"cg"`` or ``"minres"``.
        tol: relative tolerance, ``> 0``: stop when :math:`\lVert b - Ax\rVert \le
            \text{tol}\,\lVert b\rVert`. In float32 values below about ``1e-6 * cond(A)``
            are below the rounding floor and end with ``status=4``.
        max_iters: the budget of products in the loop, ``>= 1``; default
            ``min(10 * dim, 1000)`` (exact arithmetic needs at most ``dim``; the slack covers
            rounding, the cap keeps a network-sized default bounded).
        x0: an optional start, shaped like ``b`` (default zero). The solve then starts from
            the residual ``b - A x0`` (one more product, counted in ``num_iters``); a warm
            start from the previous solution is what truncated-Newton methods do (Martens
            2010). On negative curvature at the first step the returned ``x`` is ``x0``.
        loop: ``"auto"``, ``"compiled"`` or ``"host"`` (see above).

    Returns:
        A :class:`SolveResult`.

    Raises:
        ValueError: ``b`` does not match the operator, ``method``, ``tol``, ``max_iters`` or
            ``loop`` out of range, or ``loop="host"`` inside traced code.

    Examples:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> op = LinearOperator(lambda v: A @ v, jnp.zeros(2), shift=1.0)
        >>> res = solve(op, jnp.array([1.0, 2.0]))
        >>> [round(float(t), 5) for t in res.x], bool(res.converged), int(res.status)
        ([0.10526, 0.47368], True, 0)

    References:
        Hestenes and Stiefel, *Methods of conjugate gradients for solving linear systems*, J.
        Res. Nat. Bur. Standards 49(6), 1952.
        Paige and Saunders, *Solution of sparse indefinite systems of linear equations*, SIAM
        J. Numer. Anal. 12(4), 1975.
        Nocedal and Wright, *Numerical Optimization*, 2nd ed., Springer 2006, chapter 7.
    """
    check_devices(op)
    method = validation.check_one_of(method, "method", METHODS)
    validation.check_positive(tol, "tol")
    if max_iters is None:
        max_iters = min(10 * op.dim, MAX_ITERS_CAP)
    max_iters = validation.check_positive_int(max_iters, "max_iters")
    validation.check_like(b, op.like, name="b", like_name="the operator's vectors")
    if x0 is not None:
        validation.check_like(x0, op.like, name="x0", like_name="the operator's vectors")
    tol = jnp.asarray(tol, op.dtype)
    if resolve_loop(loop, op, b, x0) == "host":
        return _solve_host(op, b, tol, method, max_iters, x0)
    return _solve(op, b, tol, method, max_iters, x0)


def _where(flag: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, c: jnp.where(flag, a, c), x, y)


def _scalars_finite(*xs: jax.Array) -> jax.Array:
    out = jnp.asarray(True)
    for x in xs:
        out = out & jnp.isfinite(x)
    return out


class _CG(NamedTuple):
    x: PyTree
    r: PyTree
    p: PyTree
    rs: jax.Array
    scale: jax.Array


class _MINRES(NamedTuple):
    x: PyTree
    r1: PyTree
    r2: PyTree
    w: PyTree
    w2: PyTree
    oldb: jax.Array
    beta: jax.Array
    dbar: jax.Array
    epsln: jax.Array
    phibar: jax.Array
    cs: jax.Array
    sn: jax.Array
    scale: jax.Array


# ``scale`` estimates ||A|| from below (largest Rayleigh quotient / Lanczos column seen); it
# survives restarts and sets the "zero to working precision" thresholds.
def _cg_start(x: PyTree, r: PyTree, rnorm: jax.Array, scale: jax.Array) -> _CG:
    return _CG(x=x, r=r, p=r, rs=rnorm**2, scale=scale)


def _cg_step(
    s: _CG, ap: PyTree, tol: jax.Array, tol_abs: jax.Array
) -> tuple[_CG, jax.Array, jax.Array]:
    curv = tree_vdot(s.p, ap)
    pp = tree_vdot(s.p, s.p)
    scale = jnp.maximum(s.scale, jnp.abs(curv) / jnp.where(pp > 0, pp, 1.0))
    # Curvature at the rounding level of ||A|| ||p||^2 counts as non-positive: dividing by it
    # would throw the iterate arbitrarily far (singular positive semi-definite systems).
    positive = curv > 10 * jnp.finfo(curv.dtype).eps * scale * pp
    alpha = jnp.where(positive, s.rs / jnp.where(positive, curv, 1.0), 0.0)
    x = tree_axpy(alpha, s.p, s.x)
    r = tree_axpy(-alpha, ap, s.r)
    rs = tree_vdot(r, r)
    beta = rs / jnp.where(s.rs > 0, s.rs, 1.0)
    new = _CG(x=x, r=r, p=tree_axpy(beta, s.p, r), rs=rs, scale=scale)
    status = jnp.where(positive, _RUNNING, NEGATIVE_CURVATURE)
    status = jnp.where(_scalars_finite(curv, rs), status, NONFINITE)
    # On negative curvature keep the previous iterate (truncated Newton).
    new = _where(positive, new, s._replace(scale=scale))
    return new, jnp.sqrt(rs), status


def _minres_start(x: PyTree, r: PyTree, rnorm: jax.Array, scale: jax.Array) -> _MINRES:
    zero = jnp.zeros_like(rnorm)
    zeros = tree_scale(0.0, r)
    return _MINRES(
        x=x, r1=r, r2=r, w=zeros, w2=zeros, oldb=zero, beta=rnorm, dbar=zero, epsln=zero,
        phibar=rnorm, cs=-jnp.ones_like(rnorm), sn=zero, scale=scale,
    )  # fmt: skip


def _minres_direction(s: _MINRES) -> PyTree:
    return tree_scale(1.0 / jnp.where(s.beta > 0, s.beta, 1.0), s.r2)


def _minres_step(
    s: _MINRES, av: PyTree, tol: jax.Array, tol_abs: jax.Array
) -> tuple[_MINRES, jax.Array, jax.Array]:
    # Paige and Saunders' recurrences without preconditioner (variable names as in their
    # paper and SciPy's port): Lanczos step, then a Givens rotation of the new column of T.
    v = _minres_direction(s)
    y = tree_axpy(-s.beta / jnp.where(s.oldb > 0, s.oldb, 1.0), s.r1, av)
    y = _where(s.oldb > 0, y, av)
    alfa = tree_vdot(v, y)
    y = tree_axpy(-alfa / jnp.where(s.beta > 0, s.beta, 1.0), s.r2, y)
    beta = tree_norm(y)
    delta = s.cs * s.dbar + s.sn * alfa
    gbar = s.sn * s.dbar - s.cs * alfa
    epsln = s.sn * beta
    dbar = -s.cs * beta
    # ||A r|| / ||r|| of the current iterate; near zero with a residual that will not shrink,
    # x already solves the least-squares problem and more steps only inflate it along the
    # null space (Paige and Saunders' second stopping test, at tolerance max(tol, eps^(2/3))).
    root = jnp.hypot(gbar, dbar)
    scale = jnp.maximum(s.scale, jnp.sqrt(alfa**2 + beta**2 + s.beta**2))
    gamma = jnp.hypot(gbar, beta)
    # gamma ~ 0 means the Krylov space is invariant (beta ~ 0) and T is singular on it
    # (gbar ~ 0): b has a part outside the range of A and the update would be unbounded.
    singular = gamma <= 10 * jnp.finfo(gamma.dtype).eps * scale
    gamma = jnp.where(singular, 1.0, gamma)
    cs, sn = gbar / gamma, beta / gamma
    phi, phibar = cs * s.phibar, sn * s.phibar
    w = tree_scale(
        1.0 / gamma, tree_sub(tree_sub(v, tree_scale(s.epsln, s.w2)), tree_scale(delta, s.w))
    )
    new = _MINRES(
        x=tree_axpy(phi, w, s.x), r1=s.r2, r2=y, w=w, w2=s.w, oldb=s.beta, beta=beta, dbar=dbar,
        epsln=epsln, phibar=phibar, cs=cs, sn=sn, scale=scale,
    )  # fmt: skip
    new = _where(singular, s, new)
    ls_tol = jnp.maximum(tol, jnp.finfo(root.dtype).eps ** (2 / 3))
    least_squares = (root <= ls_tol * scale) & (jnp.abs(phibar) > tol_abs)
    status = jnp.where(singular | least_squares, SINGULAR, _RUNNING)
    status = jnp.where(_scalars_finite(alfa, beta, phibar), status, NONFINITE)
    # beta == 0: the Krylov space is invariant; verify (and restart) rather than divide by 0.
    estimate = jnp.where(beta > 0, jnp.abs(phibar), 0.0)
    return new, estimate, status


_METHODS = {
    "cg": (_cg_start, _cg_step, lambda s: s.p),
    "minres": (_minres_start, _minres_step, _minres_direction),
}


class _Loop(NamedTuple):
    state: Any
    verify: jax.Array
    last_true: jax.Array
    status: jax.Array
    k: jax.Array


def _init(op, b: PyTree, tol: jax.Array, method: str, x0=None) -> tuple[_Loop, jax.Array]:
    """The loop's start and the absolute tolerance ``tol * ||b||``."""
    start = _METHODS[method][0]
    bnorm = tree_norm(b)
    tol_abs = tol * bnorm
    if x0 is None:
        x0 = jax.tree_util.tree_map(jnp.zeros_like, b)
        r0, k0 = b, 0
    else:
        x0 = jax.tree_util.tree_map(lambda x, y: x.astype(y.dtype), x0, b)
        r0, k0 = tree_sub(b, op(x0)), 1
    r0norm = tree_norm(r0)
    status0 = jnp.where(r0norm <= tol_abs, CONVERGED, _RUNNING)
    status0 = jnp.where(jnp.isfinite(bnorm) & jnp.isfinite(r0norm), status0, NONFINITE)
    init = _Loop(
        state=start(x0, r0, r0norm, jnp.zeros_like(bnorm)),
        verify=jnp.asarray(False),
        last_true=r0norm,
        status=status0,
        k=jnp.full((), k0, jnp.int32),
    )
    return init, tol_abs


def _running(c: _Loop, max_iters: int) -> jax.Array:
    return (c.status == _RUNNING) & (c.k < max_iters)


def _iterate(op, b: PyTree, tol: jax.Array, tol_abs: jax.Array, method: str, c: _Loop) -> _Loop:
    """One iteration, one product: on the true residual when verifying, else the method's."""
    start, step, direction = _METHODS[method]
    u = _where(c.verify, c.state.x, direction(c.state))
    au = op(u)

    r_true = tree_sub(b, au)
    true_norm = tree_norm(r_true)
    v_status = jnp.where(true_norm <= tol_abs, CONVERGED, _RUNNING)
    v_status = jnp.where(true_norm > 0.5 * c.last_true, STAGNATED, v_status)
    v_status = jnp.where(true_norm <= tol_abs, CONVERGED, v_status)
    v_status = jnp.where(jnp.isfinite(true_norm), v_status, NONFINITE)
    restarted = start(c.state.x, r_true, true_norm, c.state.scale)

    stepped, estimate, s_status = step(c.state, au, tol, tol_abs)
    return _Loop(
        state=_where(c.verify, restarted, stepped),
        verify=~c.verify & (estimate <= tol_abs),
        last_true=jnp.where(c.verify, true_norm, c.last_true),
        status=jnp.where(c.verify, v_status, s_status),
        k=c.k + 1,
    )


def _finish(op, b: PyTree, tol_abs: jax.Array, method: str, out: _Loop) -> SolveResult:
    direction = _METHODS[method][2]
    x = out.state.x
    residual = tree_norm(tree_sub(b, op(x)))
    ok = jnp.isfinite(residual) & (out.status != NONFINITE)
    converged = ok & (residual <= tol_abs) & (out.status != NEGATIVE_CURVATURE)
    converged = converged & (out.status != SINGULAR)
    status = jnp.where(out.status == _RUNNING, MAX_ITERS, out.status)
    status = jnp.where(converged, CONVERGED, status)
    status = jnp.where(ok, status, NONFINITE)
    return SolveResult(
        x=x,
        residual_norm=residual,
        num_iters=out.k,
        converged=converged,
        status=status,
        direction=direction(out.state),
    )


@functools.partial(jax.jit, static_argnums=(3, 4))
def _solve(op: LinearOperator, b: PyTree, tol: jax.Array, method: str, max_iters: int, x0=None):
    op = op.linearize()
    init, tol_abs = _init(op, b, tol, method, x0)
    out = jax.lax.while_loop(
        lambda c: _running(c, max_iters),
        lambda c: _iterate(op, b, tol, tol_abs, method, c),
        init,
    )
    return _finish(op, b, tol_abs, method, out)


# -- Host driver: one compiled iteration per call from Python, the stop flag read after each. --
@functools.partial(jax.jit, static_argnums=3)
def _init_host(op, b: PyTree, tol: jax.Array, method: str, x0=None) -> tuple[_Loop, jax.Array]:
    # jit hands back an input that is returned unchanged (b as the first residual, x0 as the
    # first iterate) as the caller's own buffer; the steps donate the state, so copy it first.
    return jax.tree_util.tree_map(jnp.copy, _init(op, b, tol, method, x0))


# No lax.cond around the iteration (which would make later calls no-ops and let the flag be read
# less often): XLA:CPU slows a convolution inside a conditional as it does inside a loop
# (measured on the digits CNN: 68 ms per product in a cond, 12-16 ms outside).
_step_host = jax.jit(_iterate, static_argnums=4, donate_argnums=5)
_finish_host = jax.jit(_finish, static_argnums=3)


def _solve_host(op: LinearOperator, b: PyTree, tol: jax.Array, method: str, max_iters: int, x0):
    lin = linearized(op)
    c, tol_abs = _init_host(lin, b, tol, method, x0)
    while True:
        # One read of two scalars per product: the while loop's own condition.
        status, k = jax.device_get((c.status, c.k))
        if int(status) != _RUNNING or int(k) >= max_iters:
            break
        c = _step_host(lin, b, tol, tol_abs, method, c)
    return _finish_host(lin, b, tol_abs, method, c)
