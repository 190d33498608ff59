"""Power iteration for one extreme eigenpair, with a shift to reach the other end."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hesskit._src import krylov, validation
from hesskit._src.operators import LinearOperator
from hesskit._src.thick_restart import EigResult
from hesskit._src.tree import (
    tree_axpy,
    tree_norm,
    tree_normalize,
    tree_random_sphere,
    tree_stack,
    tree_vdot,
)

PyTree = Any

__all__ = ["power_iteration"]


def power_iteration(
    op: LinearOperator,
    key: jax.Array,
    *,
    num_iters: int = 100,
    tol: float = 1e-4,
    shift: Any = 0.0,
    v0: PyTree | None = None,
    loop: str = "auto",
) -> EigResult:
    r"""Power iteration on :math:`A - \sigma I`: the pair of largest :math:`|\lambda - \sigma|`.

    Iterates :math:`v \leftarrow (A - \sigma I) v / \lVert (A - \sigma I) v \rVert` in a
    :func:`jax.lax.while_loop`, one product per step, and stops when the residual
    :math:`\lVert A v - \lambda v \rVert \le \text{tol}\, |\lambda|` with the Rayleigh quotient
    :math:`\lambda = v^\top A v`. With ``shift=0`` it finds the largest-magnitude eigenvalue;
    with ``shift`` at (or above) :math:`\lambda_{\max}` it finds the most negative one. The
    reported eigenvalue is always that of ``op`` itself (the shift is added back). Convergence
    is linear with ratio :math:`|\lambda_2 - \sigma| / |\lambda_1 - \sigma|`: prefer
    :func:`eigsh` when the gap is small. Gradients through this function are not promised.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator`.
        key: PRNG key for the start vector when ``v0`` is None.
        num_iters: maximum number of products (``>= 1``).
        tol: relative residual tolerance (``> 0``).
        shift: :math:`\sigma`.
        v0: optional nonzero start vector shaped like ``op.like`` (e.g. a previous estimate).
        loop: ``"auto"``, ``"compiled"`` or ``"host"`` as in :func:`hesskit.eigsh` (the host
            loop dispatches each step from Python and reads the stop flag every 8 steps; the
            steps after the stop are no-ops, so both give the same result).

    Returns:
        An :class:`EigResult` with ``k = 1`` (``num_restarts`` is 0).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> d = jnp.array([-3.0, 1.0, 2.0, 10.0])
        >>> op = LinearOperator(lambda v: d * v, jnp.zeros(4))
        >>> top = power_iteration(op, jax.random.key(0), num_iters=500, tol=1e-6)
        >>> low = power_iteration(op, jax.random.key(0), num_iters=500, tol=1e-6, shift=10.0)
        >>> round(float(top.eigenvalues[0]), 3), round(float(low.eigenvalues[0]), 3)
        (10.0, -3.0)
    """
    krylov.check_devices(op)
    num_iters = validation.check_positive_int(num_iters, "num_iters")
    validation.check_positive(tol, "tol")
    if v0 is not None:
        validation.check_like(v0, op.like, name="v0", like_name="the operator's vectors")
    dtype = krylov.krylov_dtype(op.like)
    args = (jnp.asarray(tol, dtype), jnp.asarray(shift, dtype))
    if krylov.resolve_loop(loop, op, key, v0) == "host":
        lin = krylov.linearized(op)
        st = _power_start(lin, key, v0)
        # The stop flag is read after every step: a device-to-host read of one boolean costs
        # far less than the product, and the step holds no lax.cond (XLA:CPU runs a
        # convolution inside a conditional as slowly as inside a loop: 68 against 12-16 ms
        # per digits-CNN product).
        while bool(_power_continue(st, args[0], num_iters)):
            st = _power_step(lin, st, args[1])
        return _power_result(st, args[0])
    return _power(op, key, v0, *args, num_iters)


class _State(NamedTuple):
    v: PyTree
    av: PyTree
    lam: jax.Array
    res: jax.Array
    it: jax.Array


def _measure(apply, v) -> tuple[PyTree, jax.Array, jax.Array]:
    av = apply(v)
    lam = tree_vdot(v, av)
    res = tree_norm(tree_axpy(-lam, v, av))
    return av, lam, res


def _start(op, key, v0) -> _State:
    klike = krylov.krylov_like(krylov.vector_like(op))
    start = tree_random_sphere(key, klike) if v0 is None else krylov.to_krylov(v0)
    v, _ = tree_normalize(start)
    av, lam, res = _measure(krylov.product(op), v)
    return _State(v, av, lam, res, jnp.ones((), jnp.int32))


def _continue(st: _State, tol, num_iters: int) -> jax.Array:
    small = st.res <= tol * jnp.abs(st.lam)
    return (st.it < num_iters) & ~small & jnp.isfinite(st.res)


def _advance(apply, st: _State, shift) -> _State:
    v, _ = tree_normalize(tree_axpy(-shift, st.v, st.av))
    av, lam, res = _measure(apply, v)
    return _State(v, av, lam, res, st.it + 1)


def _power_result(final: _State, tol) -> EigResult:
    ok = jnp.isfinite(final.lam) & jnp.isfinite(final.res)
    converged = (final.res <= tol * jnp.abs(final.lam)) & ok
    status = jnp.select(
        [~ok, converged], [krylov.NONFINITE, krylov.CONVERGED], krylov.MAX_MATVECS
    ).astype(jnp.int32)
    return EigResult(
        eigenvalues=final.lam[None],
        eigenvectors=tree_stack([final.v]),
        residuals=final.res[None],
        converged=converged[None],
        num_matvecs=final.it,
        num_restarts=jnp.zeros((), jnp.int32),
        ok=ok,
        status=status,
    )


_power_start = jax.jit(_start)
_power_continue = jax.jit(_continue, static_argnums=2)


@functools.partial(jax.jit, donate_argnums=1)
def _power_step(op, st: _State, shift) -> _State:
    return _advance(krylov.product(op), st, shift)


@functools.partial(jax.jit, static_argnums=5)
def _power(op, key, v0, tol, shift, num_iters) -> EigResult:
    lin = op.linearize()
    apply = krylov.product(lin)
    final = jax.lax.while_loop(
        lambda st: _continue(st, tol, num_iters),
        lambda st: _advance(apply, st, shift),
        _start(lin, key, v0),
    )
    return _power_result(final, tol)
