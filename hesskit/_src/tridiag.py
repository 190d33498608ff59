"""Lanczos tridiagonalization of a symmetric operator on pytrees, in one compiled loop."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hesskit._src import krylov, validation
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import tree_normalize, tree_random_sphere

PyTree = Any

__all__ = ["LanczosResult", "lanczos"]


class LanczosResult(NamedTuple):
    """Outcome of :func:`lanczos`.

    Attributes:
        alphas: the diagonal of the tridiagonal matrix ``T``, shape ``(num_iters,)``.
        betas: its off-diagonal, shape ``(num_iters - 1,)``.
        basis: the Lanczos vectors as a pytree with a leading axis ``num_iters`` (orthonormal
            rows; rows past an early breakdown are zero).
        beta_last: the norm of the residual after the last step, so that
            ``A Q^T = Q^T T + beta_last q_next e_m^T``.
        num_steps: the number of valid steps (``num_iters`` unless an invariant subspace was
            found earlier: then the remaining ``alphas``/``betas`` are zero).
        ok: False if a NaN or Inf was met (the entries from then on are meaningless).
    """

    alphas: jax.Array
    betas: jax.Array
    basis: PyTree
    beta_last: jax.Array
    num_steps: jax.Array
    ok: jax.Array


def lanczos(
    op: LinearOperator,
    key: jax.Array,
    num_iters: int,
    *,
    v0: PyTree | None = None,
    loop: str = "auto",
) -> LanczosResult:
    r"""Symmetric Lanczos with full reorthogonalization: :math:`Q A Q^\top = T` (tridiagonal).

    Runs ``num_iters`` steps inside one :func:`jax.lax.fori_loop`, reorthogonalizing every new
    vector twice against the rows filled so far (one batched product with the basis per pass,
    no inner loop; the step is :func:`hesskit._src.krylov.lanczos_step`, shared with
    :func:`hesskit.eigsh`). If the Krylov space becomes invariant early (``beta`` below
    ``dim * eps * ||T||``), the remaining steps are skipped and ``num_steps`` says how many are
    valid. The basis and ``T`` are in Krylov precision (float32 or wider; products run in the
    operator's dtypes). Memory: the basis (``num_iters`` vectors) plus a few vectors.
    Gradients through this function are not promised.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator`.
        key: PRNG key for the start vector (uniform on the unit sphere) when ``v0`` is None.
        num_iters: number of Lanczos steps (matrix-vector products), ``1 <= num_iters <= dim``.
        v0: optional start vector shaped like ``op.like`` (normalized here; must be nonzero).
        loop: ``"auto"``, ``"compiled"`` (one ``fori_loop``) or ``"host"`` (each step a
            compiled call dispatched from Python), as in :func:`hesskit.eigsh`: ``"auto"``
            avoids XLA:CPU's slow convolutions inside loops. Both give the same result.

    Returns:
        A :class:`LanczosResult`. The Ritz values are the eigenvalues of ``T``; stochastic
        Lanczos quadrature uses the squared first components of its eigenvectors.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> op = LinearOperator(lambda v: jnp.arange(1.0, 5.0) * v, jnp.zeros(4))
        >>> res = lanczos(op, jax.random.key(0), 4)
        >>> T = jnp.diag(res.alphas) + jnp.diag(res.betas, 1) + jnp.diag(res.betas, -1)
        >>> [round(float(x), 4) for x in jnp.linalg.eigvalsh(T)]
        [1.0, 2.0, 3.0, 4.0]

    References:
        Lanczos, *An iteration method for the solution of the eigenvalue problem of linear
        differential and integral operators*, J. Res. Nat. Bur. Standards 45, 1950.
    """
    krylov.check_devices(op)
    num_iters = validation.check_positive_int(num_iters, "num_iters")
    if num_iters > op.dim:
        msg = f"num_iters must be <= the operator's dimension {op.dim}, got {num_iters}."
        raise ValueError(msg)
    if v0 is not None:
        validation.check_like(v0, op.like, name="v0", like_name="the operator's vectors")
    if krylov.resolve_loop(loop, op, key, v0) == "host":
        return _lanczos_host(op, key, v0, num_iters)
    return _lanczos(op, key, v0, num_iters)


class _Carry(NamedTuple):
    kry: krylov.KrylovState
    alphas: jax.Array
    betas: jax.Array
    num_steps: jax.Array


def _start(op: LinearOperator, key: jax.Array, v0: PyTree | None, m: int) -> _Carry:
    klike = krylov.krylov_like(krylov.vector_like(op))
    start = tree_random_sphere(key, klike) if v0 is None else krylov.to_krylov(v0)
    q0, _ = tree_normalize(start)
    kry = krylov.init_state(q0, key, m, with_images=False)
    dtype = kry.proj.dtype
    return _Carry(kry, jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.zeros((), jnp.int32))


def _step(apply, j: jax.Array, c: _Carry) -> _Carry:
    alive = c.kry.alive
    kry = krylov.lanczos_step(c.kry, apply(c.kry.q), j, restart_on_breakdown=False)
    # Steps after a breakdown multiply the zero vector: their entries stay zero.
    alphas = c.alphas.at[j].set(jnp.where(alive, kry.proj[j, j], 0.0))
    betas = c.betas.at[j].set(jnp.where(kry.alive, kry.beta, 0.0))
    return _Carry(kry, alphas, betas, c.num_steps + alive.astype(jnp.int32))


def _result(c: _Carry) -> LanczosResult:
    m = c.alphas.shape[0]
    return LanczosResult(
        alphas=c.alphas,
        betas=c.betas[: m - 1],
        basis=krylov.unflatten_rows(c.kry.basis, c.kry.q),
        beta_last=c.betas[m - 1],
        num_steps=c.num_steps,
        ok=c.kry.ok,
    )


# functools.partial, not jax.jit(static_argnums=...): the decorator-factory form needs jax >= 0.8.1.
@functools.partial(jax.jit, static_argnums=3)
def _lanczos(op: LinearOperator, key: jax.Array, v0: PyTree | None, m: int) -> LanczosResult:
    apply = krylov.product(op.linearize())
    out = jax.lax.fori_loop(0, m, lambda j, c: _step(apply, j, c), _start(op, key, v0, m))
    return _result(out)


_start_jit = jax.jit(_start, static_argnums=3)


@functools.partial(jax.jit, donate_argnums=2)
def _host_step(op: LinearOperator, j: jax.Array, c: _Carry) -> _Carry:
    return _step(krylov.product(op), j, c)


def _lanczos_host(op: LinearOperator, key, v0, m: int) -> LanczosResult:
    lin = krylov.linearized(op)
    c = _start_jit(op, key, v0, m)
    for j in range(m):
        c = _host_step(lin, jnp.asarray(j, jnp.int32), c)
    return _result(c)
