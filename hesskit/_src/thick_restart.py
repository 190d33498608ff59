"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos in one compiled loop."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src import validation
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import (
    tree_matvec,
    tree_norm,
    tree_normalize,
    tree_random_sphere,
    tree_rmatvec,
    tree_sub,
    tree_vdot,
)

PyTree = Any

__all__ = ["EigResult", "eigsh"]

WHICH = ("LA", "SA", "BE", "LM")


class EigResult(NamedTuple):
    """Eigenpairs with their diagnostics.

    Attributes:
        eigenvalues: shape ``(k,)``, most extreme first (LA and LM descending, SA ascending, BE
            ascending); the Rayleigh quotients of ``eigenvectors``.
        eigenvectors: a pytree shaped like the operator's vectors with a leading axis ``k``;
            orthonormal.
        residuals: the true residual norms ``||A v_i - lambda_i v_i||``, computed from the
            operator's stored outputs ``A Q`` (no extra products), not from a recurrence.
        converged: per pair, ``residual <= tol * max(|lambda|)``; False when the budget ran out
            or a NaN/Inf was met.
        num_matvecs: operator products spent.
        num_restarts: number of thick restarts performed.
        ok: False if a NaN or Inf was met (then nothing in the result is meaningful).
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array
    ok: jax.Array


def default_tol(dtype: Any) -> float:
    """The default relative residual tolerance: 1e-5 in float32, 1e-10 in float64."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return 1e-10
    if dtype == jnp.float32:
        return 1e-5
    return float(np.sqrt(np.finfo(dtype).eps))


def _select(theta: jax.Array, which: str, count: int, k: int) -> jax.Array:
    """Indices (into ascending ``theta``) of the ``count`` most wanted Ritz values, best first."""
    m = theta.shape[0]
    if which == "LA":
        return jnp.arange(m - 1, m - 1 - count, -1)
    if which == "SA":
        return jnp.arange(count)
    if which == "LM":
        return jnp.argsort(-jnp.abs(theta))[:count]
    # BE: k//2 from the bottom and the rest from the top; extra kept vectors split alike.
    low = k // 2 + (count - k) // 2
    high = count - low
    return jnp.concatenate([jnp.arange(low), jnp.arange(m - high, m)])


def _order(values: jax.Array, which: str) -> jax.Array:
    if which == "LA":
        return jnp.argsort(-values)
    if which == "LM":
        return jnp.argsort(-jnp.abs(values))
    return jnp.argsort(values)


def eigsh(
    op: LinearOperator,
    key: jax.Array,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float | None = None,
    max_matvecs: int | None = None,
    krylov_dim: int | None = None,
    v0: PyTree | None = None,
    verify: bool = True,
) -> EigResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Builds an orthonormal Krylov basis of ``krylov_dim`` vectors (full reorthogonalization,
    twice), takes the Ritz pairs of the projected matrix :math:`Q^\top A Q`, and restarts by
    keeping the most wanted Ritz vectors plus a few extra (about half the free space) with the
    residual vector as the next direction (Wu and Simon 2000), all inside one
    :func:`jax.lax.while_loop`. It stops when every wanted pair's residual estimate
    :math:`|\beta_m s_{m,i}|` is at most ``tol * max|theta|`` or when ``max_matvecs`` is spent;
    the reported residuals are then computed from the stored products :math:`A Q` (no extra
    products) and ``converged`` is decided on them.

    ``which`` picks the end of the spectrum: ``"LA"`` (largest algebraic), ``"SA"`` (smallest
    algebraic, the most negative curvature), ``"BE"`` (``k // 2`` from the bottom and the rest
    from the top, in one run, as SciPy does) or ``"LM"`` (largest magnitude). Small dense work
    runs in the operator's dtype (products with the basis at ``Precision.HIGHEST``, so GPUs and
    TPUs do not drop to TF32 or bfloat16); with twice-repeated Gram-Schmidt the basis stays
    orthonormal in float32. The reported eigenvalues are the Rayleigh quotients of the returned
    vectors, not the raw Ritz values: in float32 this keeps small eigenvalues (a Hessian's
    negative end) accurate relative to themselves rather than only to ``max|lambda|``.
    Gradients through this function are not promised.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator` (its ``linearize()`` is used).
        key: PRNG key for the start vector (and for fresh directions after a breakdown).
        k: number of eigenpairs, ``1 <= k < dim``.
        which: ``"LA"``, ``"SA"``, ``"BE"`` or ``"LM"``.
        tol: relative residual tolerance; default 1e-5 for float32, 1e-10 for float64.
        max_matvecs: budget of operator products; default ``max(50 * krylov_dim, 2000)``.
        krylov_dim: basis size; default ``min(dim, max(2 k + 1, 20))`` (SciPy's ``ncv``) for
            LA and LM and ``min(dim, max(2 k + 1, 40))`` for SA and BE, whose wanted values
            sit next to the Hessian's bulk. Memory is two stacks of ``krylov_dim`` vectors
            (the basis and its images under the operator). Must satisfy
            ``k < krylov_dim <= dim``.
        v0: optional start vector shaped like ``op.like`` (e.g. a previous eigenvector, to warm
            start); must be nonzero.
        verify: once everything has converged, restart once from a fresh random direction
            orthogonal to the kept vectors, so that a missed copy of a repeated extreme
            eigenvalue (which a single-vector Krylov space cannot see) is found. Costs one partial
            cycle, about ``(krylov_dim - k) / 2`` products, when nothing was missed (6 of 33 for
            LA(10) in ``benchmarks/eigs.py``); ``False`` skips it, as ARPACK and SciPy do, for
            callers who know the wanted eigenvalues are simple or track them step after step.

    Returns:
        An :class:`EigResult`. Inside compiled code nothing can be raised, so a run that hits
        its budget or meets NaN/Inf returns ``converged=False`` (and ``ok=False`` for NaN/Inf).

    Raises:
        ValueError: ``k``, ``krylov_dim``, ``max_matvecs``, ``tol`` or ``which`` out of range.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> d = jnp.linspace(-1.0, 10.0, 50)
        >>> op = LinearOperator(lambda v: d * v, jnp.zeros(50))
        >>> res = eigsh(op, jax.random.key(0), k=2, which="BE")
        >>> [round(float(x), 4) for x in res.eigenvalues], bool(res.converged.all())
        ([-1.0, 10.0], True)

    References:
        Wu and Simon, *Thick-restart Lanczos method for large symmetric eigenvalue problems*,
        SIAM J. Matrix Anal. Appl. 22(2), 2000.
    """
    dim = op.dim
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < dim:
        msg = f"k must be an int with 1 <= k < dim = {dim}, got {k!r}."
        raise ValueError(msg)
    k = int(k)
    validation.check_one_of(which, "which", WHICH)
    if krylov_dim is None:
        # The bottom of a Hessian spectrum sits next to a dense bulk near zero, where a larger
        # basis cuts the number of products two to three times (benchmarks/eigs.py).
        floor = 40 if which in ("SA", "BE") else 20
        krylov_dim = min(dim, max(2 * k + 1, floor))
    krylov_dim = validation.check_positive_int(krylov_dim, "krylov_dim")
    if not k < krylov_dim <= dim:
        msg = f"krylov_dim must satisfy k = {k} < krylov_dim <= dim = {dim}, got {krylov_dim}."
        raise ValueError(msg)
    if max_matvecs is None:
        max_matvecs = max(50 * krylov_dim, 2000)
    max_matvecs = validation.check_positive_int(max_matvecs, "max_matvecs")
    if max_matvecs < krylov_dim:
        msg = f"max_matvecs must be >= krylov_dim = {krylov_dim}, got {max_matvecs}."
        raise ValueError(msg)
    if tol is None:
        tol = default_tol(op.dtype)
    validation.check_positive(tol, "tol")
    if v0 is not None:
        validation.check_like(v0, op.like, name="v0", like_name="the operator's vectors")
    if not isinstance(verify, bool):
        msg = f"verify must be a bool, got {verify!r}."
        raise TypeError(msg)
    return _eigsh(
        op, key, v0, jnp.asarray(tol, op.dtype), k, which, krylov_dim, max_matvecs, verify
    )


def _num_kept(k: int, m: int) -> int:
    # Keep the wanted pairs plus about half of the remaining space (TRLan's rule of thumb):
    # more kept vectors speed convergence of the wanted ones, fewer leave room for new ones.
    return min(m - 1, k + max(1, (m - k) // 2))


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _eigsh(
    op: LinearOperator,
    key: jax.Array,
    v0: PyTree | None,
    tol: jax.Array,
    k: int,
    which: str,
    m: int,
    max_matvecs: int,
    verify: bool,
) -> EigResult:
    op = op.linearize()
    dtype = op.dtype
    eps = jnp.finfo(dtype).eps
    keep = _num_kept(k, m)
    key, start_key = jax.random.split(key)
    start = tree_random_sphere(start_key, op.like) if v0 is None else v0
    q0, _ = tree_normalize(start)
    zeros_basis = jax.tree_util.tree_map(lambda a: jnp.zeros((m, *a.shape), a.dtype), q0)

    class State(NamedTuple):
        basis: PyTree
        images: PyTree
        proj: jax.Array
        residual: PyTree
        beta_m: jax.Array
        key: jax.Array
        scale: jax.Array
        matvecs: jax.Array
        restarts: jax.Array
        verified: jax.Array
        done: jax.Array
        ok: jax.Array

    def extend(basis, images, proj, q, first, key, scale):
        """Fill basis rows ``first .. m-1`` and the projected matrix ``Q^T A Q``.

        Returns the normalized residual after the last step and its norm ``beta_m``.
        """

        def body(j, carry):
            basis, images, proj, q, key, scale, ok, beta_last = carry
            basis = jax.tree_util.tree_map(lambda b, x: b.at[j].set(x), basis, q)
            w = op(q)
            # Keeping A q_j costs one more basis of memory and saves k products at the end:
            # the true residuals ||A y - theta y|| come from A Q s without new products.
            images = jax.tree_util.tree_map(lambda b, x: b.at[j].set(x), images, w)
            # Column j of Q^T A Q, accumulated over both Gram-Schmidt passes: it holds alpha,
            # beta and, right after a restart, the coupling to the kept Ritz vectors.
            h1 = tree_rmatvec(basis, w)
            w = tree_sub(w, tree_matvec(basis, h1))
            h2 = tree_rmatvec(basis, w)
            w = tree_sub(w, tree_matvec(basis, h2))
            h = h1 + h2
            w, beta = tree_normalize(w)
            ok = ok & jnp.all(jnp.isfinite(h)) & jnp.isfinite(beta)
            scale = jnp.maximum(scale, jnp.max(jnp.abs(h)) + beta)
            # Breakdown (invariant subspace): continue with a fresh random direction
            # orthogonal to the basis, with zero coupling, as ARPACK does.
            breakdown = beta <= m * eps * scale
            key, sub = jax.random.split(key)

            def fresh_direction(_):
                fresh = tree_random_sphere(sub, op.like)
                for _ in range(2):
                    fresh = tree_sub(fresh, tree_matvec(basis, tree_rmatvec(basis, fresh)))
                return tree_normalize(fresh)[0]

            q_next = jax.lax.cond(breakdown, fresh_direction, lambda _: w, None)
            beta = jnp.where(breakdown, 0.0, beta).astype(dtype)
            idx = jnp.arange(m)
            new_col = jnp.where(idx <= j, h, 0.0)
            new_col = jnp.where(idx == j + 1, beta, new_col).astype(dtype)
            proj = proj.at[:, j].set(new_col).at[j, :].set(new_col)
            return basis, images, proj, q_next, key, scale, ok, beta

        init = (basis, images, proj, q, key, scale, jnp.asarray(True), jnp.zeros((), dtype))
        return jax.lax.fori_loop(first, m, body, init)

    def ritz(proj):
        theta, s = jnp.linalg.eigh(proj)
        return theta, s

    def converged_estimates(theta, s, beta_m, scale_theta):
        idx = _select(theta, which, k, k)
        est = jnp.abs(beta_m * s[m - 1, idx])
        # Stop at half the tolerance: the estimate omits the (tiny) coupling left by the
        # verification restart, and the reported residuals are recomputed against ``tol``.
        return est <= 0.9 * tol * scale_theta, idx

    # The first cycle is a restart with nothing kept: one traced copy of the extension loop
    # (and of the model's HVP) serves every cycle, which halves compile time.
    init = State(
        basis=zeros_basis,
        images=zeros_basis,
        proj=jnp.zeros((m, m), dtype),
        residual=q0,
        beta_m=jnp.zeros((), dtype),
        key=key,
        scale=jnp.zeros((), dtype),
        matvecs=jnp.zeros((), jnp.int32),
        restarts=jnp.asarray(-1, jnp.int32),
        verified=jnp.asarray(not verify),
        done=jnp.asarray(False),
        ok=jnp.asarray(True),
    )

    def all_converged(st: State) -> jax.Array:
        theta, s = ritz(st.proj)
        conv, _ = converged_estimates(theta, s, st.beta_m, jnp.max(jnp.abs(theta)))
        return jnp.all(conv)

    def is_done(st: State) -> jax.Array:
        out_of_budget = st.matvecs + (m - keep) > max_matvecs
        return (all_converged(st) & st.verified) | out_of_budget | ~st.ok

    def cond(st: State) -> jax.Array:
        return ~st.done

    def body(st: State) -> State:
        first_cycle = st.restarts < 0
        theta, s = ritz(st.proj)
        kept_idx = _select(theta, which, keep, k)
        coeffs = s[:, kept_idx]  # (m, keep)

        def compress(stack):
            kept = tree_matvec(stack, coeffs.T)
            return jax.tree_util.tree_map(lambda z, kv: z.at[:keep].set(kv), zeros_basis, kept)

        basis = compress(st.basis)
        images = compress(st.images)
        diag = jnp.where(first_cycle, 0.0, theta[kept_idx]).astype(dtype)
        proj = jnp.zeros((m, m), dtype).at[jnp.arange(keep), jnp.arange(keep)].set(diag)
        # A single-vector Krylov space holds only the part of a repeated eigenvalue's
        # eigenspace present in the start vector. Once everything looks converged, restart
        # once from a fresh random direction orthogonal to the kept vectors: a missed copy of
        # a repeated (or numerically invisible) extreme eigenvalue then shows up as a new,
        # unconverged wanted pair and the iteration goes on.
        verify_now = ~first_cycle & all_converged(st) & ~st.verified
        key, sub = jax.random.split(st.key)

        def fresh_direction(_):
            fresh = tree_random_sphere(sub, op.like)
            for _ in range(2):
                fresh = tree_sub(fresh, tree_matvec(basis, tree_rmatvec(basis, fresh)))
            return tree_normalize(fresh)[0]

        start = jax.lax.cond(verify_now, fresh_direction, lambda _: st.residual, None)
        first = jnp.where(first_cycle, 0, keep)
        basis, images, proj, q, key, scale, ok, beta_m = extend(
            basis, images, proj, start, first, key, st.scale
        )
        new = State(
            basis=basis,
            images=images,
            proj=proj,
            residual=q,
            beta_m=beta_m,
            key=key,
            scale=scale,
            matvecs=st.matvecs + (m - first),
            restarts=st.restarts + 1,
            verified=st.verified | verify_now,
            done=jnp.asarray(False),
            ok=st.ok & ok,
        )
        return new._replace(done=is_done(new))

    final = jax.lax.while_loop(cond, body, init)

    theta, s = ritz(final.proj)
    idx = _select(theta, which, k, k)
    order = _order(theta[idx], which)
    idx = idx[order]

    vectors = tree_matvec(final.basis, s[:, idx].T)
    av = tree_matvec(final.images, s[:, idx].T)
    # Ritz values come from the projected matrix, whose entries carry rounding errors of order
    # eps * ||A||: in float32 that swamps small eigenvalues next to a large top end (a Hessian's
    # negative ones). The Rayleigh quotient of each Ritz vector errs only by eps * |lambda| plus
    # the squared residual over the gap; it is taken as theta + y^T (A y - theta y) / y^T y so
    # the small correction, not the whole quotient, carries the rounding (no extra products).
    theta_k = theta[idx]

    def refine(a, v, lam):
        r = tree_sub(a, jax.tree_util.tree_map(lambda x: (lam * x).astype(x.dtype), v))
        shift = tree_vdot(v, r) / tree_vdot(v, v)
        r = tree_sub(r, jax.tree_util.tree_map(lambda x: (shift * x).astype(x.dtype), v))
        return lam + shift, tree_norm(r)

    values, residuals = jax.vmap(refine)(av, vectors, theta_k)
    # Refinement can swap two values of a cluster: restore the promised order.
    order = _order(values, which)
    values, residuals = values[order], residuals[order]
    vectors = jax.tree_util.tree_map(lambda x: x[order], vectors)
    scale_theta = jnp.max(jnp.abs(theta))
    ok = final.ok & jnp.all(jnp.isfinite(values)) & jnp.all(jnp.isfinite(residuals))
    converged = (residuals <= tol * scale_theta) & ok
    return EigResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        converged=converged,
        num_matvecs=final.matvecs,
        num_restarts=jnp.maximum(final.restarts, 0),
        ok=ok,
    )
