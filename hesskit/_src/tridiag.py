"""Lanczos tridiagonalization of a symmetric operator on pytrees, in one compiled loop."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hesskit._src import validation
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import (
    tree_matvec,
    tree_normalize,
    tree_random_sphere,
    tree_rmatvec,
    tree_scale,
    tree_sub,
    tree_vdot,
)

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


def _orthogonalize(basis: PyTree, w: PyTree) -> PyTree:
    # Two passes of classical Gram-Schmidt ("twice is enough", Giraud et al. 2005) keep the basis
    # orthonormal to working precision in float32; each pass is one product with the basis.
    for _ in range(2):
        w = tree_sub(w, tree_matvec(basis, tree_rmatvec(basis, w)))
    return w


def lanczos(
    op: LinearOperator, key: jax.Array, num_iters: int, *, v0: PyTree | None = None
) -> LanczosResult:
    r"""Symmetric Lanczos with full reorthogonalization: :math:`Q A Q^\top = T` (tridiagonal).

    Runs ``num_iters`` steps inside one :func:`jax.lax.fori_loop`, reorthogonalizing every new
    vector against the whole basis twice (one batched product with the basis per pass, no
    inner loop). If the Krylov space becomes invariant early (``beta`` below
    ``dim * eps * ||T||``), the remaining steps are skipped and ``num_steps`` says how many are
    valid. Gradients through this function are not promised.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator`.
        key: PRNG key for the start vector (uniform on the unit sphere) when ``v0`` is None.
        num_iters: number of Lanczos steps (matrix-vector products), ``1 <= num_iters <= dim``.
        v0: optional start vector shaped like ``op.like`` (normalized here; must be nonzero).

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
    num_iters = validation.check_positive_int(num_iters, "num_iters")
    if num_iters > op.dim:
        msg = f"num_iters must be <= the operator's dimension {op.dim}, got {num_iters}."
        raise ValueError(msg)
    if v0 is not None:
        validation.check_like(v0, op.like, name="v0", like_name="the operator's vectors")
    return _lanczos(op, key, v0, num_iters)


@jax.jit(static_argnums=3)
def _lanczos(op: LinearOperator, key: jax.Array, v0: PyTree | None, m: int) -> LanczosResult:
    op = op.linearize()
    dtype = op.dtype
    start = tree_random_sphere(key, op.like) if v0 is None else v0
    q0, _ = tree_normalize(start)
    basis = jax.tree_util.tree_map(lambda a: jnp.zeros((m, *a.shape), a.dtype), q0)
    eps = jnp.finfo(dtype).eps

    class Carry(NamedTuple):
        basis: PyTree
        q: PyTree
        alphas: jax.Array
        betas: jax.Array
        scale: jax.Array
        alive: jax.Array
        num_steps: jax.Array
        ok: jax.Array

    def body(j: jax.Array, c: Carry) -> Carry:
        basis = jax.tree_util.tree_map(lambda b, x: b.at[j].set(x), c.basis, c.q)
        w = op(c.q)
        alpha = tree_vdot(c.q, w)
        w = _orthogonalize(basis, w)
        w, beta = tree_normalize(w)
        scale = jnp.maximum(c.scale, jnp.abs(alpha) + beta)
        finite = jnp.isfinite(alpha) & jnp.isfinite(beta)
        # An invariant subspace: the next vector would be rounding noise, so stop filling.
        stop = beta <= m * eps * scale
        alive = c.alive & finite
        q_next = tree_scale(jnp.where(alive & ~stop, 1.0, 0.0).astype(dtype), w)
        return Carry(
            basis=basis,
            q=q_next,
            alphas=c.alphas.at[j].set(jnp.where(c.alive, alpha, 0.0)),
            betas=c.betas.at[j].set(jnp.where(alive & ~stop, beta, 0.0)),
            scale=scale,
            alive=alive & ~stop,
            num_steps=c.num_steps + c.alive.astype(jnp.int32),
            ok=c.ok & (finite | ~c.alive),
        )

    init = Carry(
        basis=basis,
        q=q0,
        alphas=jnp.zeros(m, dtype),
        betas=jnp.zeros(m, dtype),
        scale=jnp.zeros((), dtype),
        alive=jnp.asarray(True),
        num_steps=jnp.zeros((), jnp.int32),
        ok=jnp.asarray(True),
    )
    out = jax.lax.fori_loop(0, m, body, init)
    return LanczosResult(
        alphas=out.alphas,
        betas=out.betas[: m - 1],
        basis=out.basis,
        beta_last=out.betas[m - 1],
        num_steps=out.num_steps,
        ok=out.ok,
    )
