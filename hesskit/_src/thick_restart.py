"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src import krylov, memory, validation
from hesskit._src.krylov import default_tol
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import tree_normalize, tree_random_sphere

PyTree = Any

__all__ = ["EigResult", "default_tol", "eigsh"]

WHICH = ("LA", "SA", "BE", "LM")


class EigResult(NamedTuple):
    """Eigenpairs with their diagnostics.

    Attributes:
        eigenvalues: shape ``(k,)``, most extreme first (LA and LM descending, SA ascending, BE
            ascending); the Rayleigh quotients of ``eigenvectors``.
        eigenvectors: a pytree shaped like the operator's vectors (in Krylov precision: float32
            for bfloat16 parameters) with a leading axis ``k``; orthonormal. ``None`` when
            eigenvalues only were asked for.
        residuals: the true residual norms ``||A v_i - lambda_i v_i||``, computed from the
            operator's stored outputs ``A Q`` (no extra products), not from a recurrence; in the
            eigenvalues-only mode, the Lanczos estimates ``|beta_j s_{j,i}|``.
        converged: per pair, ``residual <= tol * max(|lambda|)``; False when the budget ran out
            or a NaN/Inf was met.
        num_matvecs: operator products spent.
        num_restarts: number of thick restarts performed.
        ok: False if a NaN or Inf was met (then nothing in the result is meaningful).
        status: how the run ended, an int32 code: ``0`` every pair converged, ``1`` the product
            budget ran out, ``2`` a NaN or Inf was met, ``3`` the tolerance is below what the
            products' precision can reach (the true residuals stopped improving above it:
            raise ``tol``; more products will not help). Defaults to ``0`` for results
            built by hand.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array
    ok: jax.Array
    status: jax.Array = 0  # type: ignore[assignment]  # results built by hand before it existed


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


def _default_krylov_dim(k: int, which: str, dim: int, max_matvecs: int | None) -> int:
    # The bottom of a Hessian spectrum sits next to a dense bulk near zero, where a larger
    # basis cuts the number of products two to three times (benchmarks/eigs.py).
    floor = 40 if which in ("SA", "BE") else 20
    m = min(dim, max(2 * k + 1, floor))
    if max_matvecs is not None:
        # A small budget shrinks the default basis rather than being refused.
        m = max(min(m, max_matvecs), min(k + 1, dim))
    return m


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
    return_eigenvectors: bool = True,
    loop: str = "auto",
    basis_dtype: Any = None,
) -> EigResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Builds an orthonormal Krylov basis of ``krylov_dim`` vectors (full reorthogonalization,
    twice, against the rows filled so far), takes the Ritz pairs of the projected matrix
    :math:`Q^\top A Q`, and restarts by keeping the most wanted Ritz vectors plus a few extra
    (about half the free space) with the residual vector as the next direction (Wu and Simon
    2000); the kept vectors are rotated in place, so the basis and its images ``A Q`` are the
    only two stacks held. A run stops when the true residuals of the wanted pairs (computed
    from the stored ``A Q``, no extra products) are at most ``tol * max|theta|``, when
    ``max_matvecs`` is spent, or when the residuals stop improving above ``tol`` (the
    tolerance is below what the products' precision reaches: ``status == 3``); the estimates
    :math:`|\beta_m s_{m,i}|` only decide when to look, so the stop rule and ``converged``
    always agree.

    ``which`` picks the end of the spectrum: ``"LA"`` (largest algebraic), ``"SA"`` (smallest
    algebraic, the most negative curvature), ``"BE"`` (``k // 2`` from the bottom and the rest
    from the top, in one run, as SciPy does) or ``"LM"`` (largest magnitude).

    Precision: the Krylov work (basis, projected matrix, Ritz extraction) runs in float32 or
    wider whatever the parameters' dtype, and each product in the parameters' own dtypes
    (bfloat16 weights stay bfloat16 in the Hessian-vector product). Products with the basis
    run at ``Precision.HIGHEST`` so GPUs and TPUs do not drop to TF32. The reported eigenvalues
    are the Rayleigh quotients of the returned vectors, which in float32 keeps small
    eigenvalues (a Hessian's negative end) accurate relative to themselves rather than only to
    ``max|lambda|``. Gradients through this function are not promised.

    Loop strategy: ``loop="compiled"`` runs everything in one :func:`jax.lax.while_loop` (no
    host round trip; the only choice inside a user's ``jit`` or ``vmap``). ``loop="host"``
    dispatches each product and each Lanczos step as a compiled call from Python (asynchronous,
    one device-to-host read per restart): XLA's CPU backend runs convolutions inside ``while``
    loops many times slower than outside (jax-ml/jax#12868), and this avoids the penalty.
    ``"auto"`` (default) picks ``"host"`` on CPU outside traced code and ``"compiled"``
    otherwise. Both do the same arithmetic and return the same result.

    Memory: ``2 * krylov_dim`` vectors (the basis and ``A Q``) plus a few (the residual, a
    product, ``k`` Ritz vectors at the end, a column block of the restart rotation), each
    vector in Krylov precision (``basis_dtype`` may store the two stacks narrower).
    ``return_eigenvectors=False`` holds a few vectors only, however many products it takes.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator` (its ``linearize()`` is used).
        key: PRNG key for the start vector (and for fresh directions after a breakdown).
        k: number of eigenpairs, ``1 <= k < dim``.
        which: ``"LA"``, ``"SA"``, ``"BE"`` or ``"LM"``.
        tol: relative residual tolerance; default by the least precise parameter leaf: 1e-10
            for float64, 1e-5 for float32, ``4 eps`` for narrower (about 3e-2 for bfloat16).
        max_matvecs: budget of operator products; default ``max(50 * krylov_dim, 2000)``.
        krylov_dim: basis size; default ``min(dim, max(2 k + 1, 20))`` (SciPy's ``ncv``) for
            LA and LM and ``min(dim, max(2 k + 1, 40))`` for SA and BE, whose wanted values
            sit next to the Hessian's bulk, capped by an explicit ``max_matvecs``. Must satisfy
            ``k < krylov_dim <= dim``.
        v0: optional start vector shaped like ``op.like`` (e.g. a previous eigenvector, to warm
            start); must be nonzero.
        verify: once everything has converged, restart once from a fresh random direction
            orthogonal to the kept vectors, so that a missed copy of a repeated extreme
            eigenvalue (which a single-vector Krylov space cannot see) is found. Costs one partial
            cycle, about ``(krylov_dim - k) / 2`` products, when nothing was missed; ``False``
            skips it, as ARPACK and SciPy do.
        return_eigenvectors: ``False`` (SciPy's name) runs Lanczos without a stored basis and
            returns ``eigenvectors=None`` (see :func:`hesskit._src.lanczos_values`).
        loop: ``"auto"``, ``"compiled"`` or ``"host"`` (see above).
        basis_dtype: store the basis and ``A Q`` in this dtype (e.g. ``jnp.bfloat16``, half
            the memory of float32) while all arithmetic stays in Krylov precision; ``None``
            stores them in Krylov precision. A narrower basis limits the attainable accuracy
            to about its ``eps`` (``benchmarks/eigs.py`` measures it), and the default ``tol``
            follows it.

    Returns:
        An :class:`EigResult`. Inside compiled code nothing can be raised, so how the run ended
        is in ``status`` and ``converged`` (and ``ok=False`` for NaN/Inf).

    Raises:
        ValueError: ``k``, ``krylov_dim``, ``max_matvecs``, ``tol``, ``which`` or ``loop`` out
            of range, or ``loop="host"`` inside traced code.
        InsufficientMemoryError: the vectors above cannot fit in the free device memory (or,
            on CPU, in the host's memory); the message names the bytes needed.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> d = jnp.linspace(-1.0, 10.0, 50)
        >>> op = LinearOperator(lambda v: d * v, jnp.zeros(50))
        >>> res = eigsh(op, jax.random.key(0), k=2, which="BE")
        >>> [round(float(x), 4) for x in res.eigenvalues], int(res.status)
        ([-1.0, 10.0], 0)

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
    if max_matvecs is not None:
        max_matvecs = validation.check_positive_int(max_matvecs, "max_matvecs")
    if krylov_dim is None:
        krylov_dim = _default_krylov_dim(k, which, dim, max_matvecs)
    krylov_dim = validation.check_positive_int(krylov_dim, "krylov_dim")
    if not k < krylov_dim <= dim:
        msg = f"krylov_dim must satisfy k = {k} < krylov_dim <= dim = {dim}, got {krylov_dim}."
        raise ValueError(msg)
    if max_matvecs is None:
        max_matvecs = max(50 * krylov_dim, 2000)
    if max_matvecs < krylov_dim:
        msg = f"max_matvecs must be >= krylov_dim = {krylov_dim}, got {max_matvecs}."
        raise ValueError(msg)
    if basis_dtype is not None:
        basis_dtype = jnp.dtype(basis_dtype)
        if not jnp.issubdtype(basis_dtype, jnp.floating):
            msg = f"basis_dtype must be a floating dtype, got {basis_dtype}."
            raise TypeError(msg)
    if tol is None:
        tol = default_tol(op.like)
        if basis_dtype is not None:
            tol = max(tol, default_tol(basis_dtype))
    validation.check_positive(tol, "tol")
    if v0 is not None:
        validation.check_like(v0, op.like, name="v0", like_name="the operator's vectors")
    for flag, name in ((verify, "verify"), (return_eigenvectors, "return_eigenvectors")):
        if not isinstance(flag, bool):
            msg = f"{name} must be a bool, got {flag!r}."
            raise TypeError(msg)
    memory.check_fits(
        memory.eigsh_vectors(krylov_dim, k, return_eigenvectors=return_eigenvectors),
        op.like,
        f"eigsh(k={k}, krylov_dim={krylov_dim})",
        reduce="a smaller krylov_dim, basis_dtype=jnp.bfloat16 or return_eigenvectors=False",
    )
    tol = jnp.asarray(tol, krylov.krylov_dtype(op.like))
    loop = krylov.resolve_loop(loop, op, key, v0)
    if not return_eigenvectors:
        from hesskit._src.lanczos_values import eigvalsh_lanczos

        return eigvalsh_lanczos(op, key, v0, tol, k, which, max_matvecs)
    # The rounding floor of the residuals: the least precise of the products and the basis.
    dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(op.like)]
    dtypes += [] if basis_dtype is None else [basis_dtype]
    product_eps = max(float(jnp.finfo(d).eps) for d in dtypes)
    keep = krylov.num_kept(k, krylov_dim)
    cfg = _Config(k, which, krylov_dim, keep, max_matvecs, verify, basis_dtype, product_eps)
    if loop == "compiled":
        return _eigsh_compiled(op, key, v0, tol, cfg)
    return _eigsh_host(op, key, v0, tol, cfg)


class _Config(NamedTuple):
    k: int
    which: str
    m: int
    keep: int
    max_matvecs: int
    verify: bool
    basis_dtype: Any
    product_eps: float


class _Run(NamedTuple):
    """The restart loop's state: the Krylov basis and the bookkeeping around it."""

    kry: krylov.KrylovState
    matvecs: jax.Array
    restarts: jax.Array
    verified: jax.Array
    done: jax.Array
    status: jax.Array
    best: jax.Array
    stalls: jax.Array


def _init(op: LinearOperator, key: jax.Array, v0: PyTree | None, cfg: _Config) -> _Run:
    key, start_key = jax.random.split(key)
    klike = krylov.krylov_like(op.like)
    start = tree_random_sphere(start_key, klike) if v0 is None else krylov.to_krylov(v0)
    q0, _ = tree_normalize(start)
    kry = krylov.init_state(q0, key, cfg.m, with_images=True, storage_dtype=cfg.basis_dtype)
    return _Run(
        kry=kry,
        matvecs=jnp.zeros((), jnp.int32),
        restarts=jnp.asarray(-1, jnp.int32),
        verified=jnp.asarray(not cfg.verify),
        done=jnp.asarray(False),
        status=jnp.asarray(krylov.MAX_MATVECS, jnp.int32),
        best=jnp.asarray(jnp.inf, kry.proj.dtype),
        stalls=jnp.zeros((), jnp.int32),
    )


def _worst_estimate(proj, beta, cfg: _Config) -> jax.Array:
    """The largest residual estimate ``|beta_m s_{m,i}|`` of a wanted pair over ``max|theta|``."""
    theta, s = krylov.ritz(proj)
    idx = _select(theta, cfg.which, cfg.k, cfg.k)
    est = jnp.abs(beta * s[cfg.m - 1, idx])
    scale = jnp.max(jnp.abs(theta))
    return jnp.max(est) / jnp.where(scale > 0, scale, 1.0)


def _estimates_converged(proj, beta, tol, cfg: _Config) -> jax.Array:
    return _worst_estimate(proj, beta, cfg) <= tol


def _begin_cycle(run: _Run, cfg: _Config, tol: jax.Array) -> _Run:
    """Compress the basis to the kept Ritz vectors and choose the next start direction."""
    kry = run.kry
    first_cycle = run.restarts < 0
    theta, s = krylov.ritz(kry.proj)
    kept_idx = _select(theta, cfg.which, cfg.keep, cfg.k)
    coeffs = s[:, kept_idx].T  # (keep, m)
    basis = krylov.rotate_rows(kry.basis, coeffs)
    images = krylov.rotate_rows(kry.images, coeffs)
    dtype = kry.proj.dtype
    diag = jnp.where(first_cycle, 0.0, theta[kept_idx]).astype(dtype)
    ar = jnp.arange(cfg.keep)
    proj = jnp.zeros((cfg.m, cfg.m), dtype).at[ar, ar].set(diag)
    # A single-vector Krylov space holds only the part of a repeated eigenvalue's eigenspace
    # present in the start vector. Once everything looks converged, restart once from a fresh
    # random direction orthogonal to the kept vectors: a missed copy of a repeated (or
    # numerically invisible) extreme eigenvalue then shows up as a new, unconverged wanted
    # pair and the iteration goes on.
    converged = _estimates_converged(kry.proj, kry.beta, tol, cfg)
    verify_now = ~first_cycle & converged & ~run.verified
    key, sub = jax.random.split(kry.key)
    start = jax.lax.cond(
        verify_now,
        lambda _: krylov.random_orthogonal(sub, basis, filled=cfg.keep, like=kry.q),
        lambda _: kry.q,
        None,
    )
    # On the first cycle nothing is kept: the rotation above acted on zeros.
    kry = kry._replace(basis=basis, images=images, proj=proj, q=start, key=key)
    return run._replace(kry=kry, verified=run.verified | verify_now)


def _wanted_pairs(kry: krylov.KrylovState, cfg: _Config):
    theta, s = krylov.ritz(kry.proj)
    idx = _select(theta, cfg.which, cfg.k, cfg.k)
    idx = idx[_order(theta[idx], cfg.which)]
    values, vectors, residuals = krylov.ritz_pairs(kry, s[:, idx].T, theta[idx])
    # Refinement can swap two values of a cluster: restore the promised order.
    order = _order(values, cfg.which)
    vectors = jax.tree_util.tree_map(lambda x: x[order], vectors)
    return values[order], vectors, residuals[order], jnp.max(jnp.abs(theta))


def _end_cycle(run: _Run, cfg: _Config, tol: jax.Array, first: Any) -> _Run:
    """Account for the cycle's products and decide, on true residuals, whether to stop."""
    kry = run.kry
    matvecs = run.matvecs + (cfg.m - first)
    estimate = _worst_estimate(kry.proj, kry.beta, cfg)
    looks_done = (estimate <= tol) & run.verified

    def true_check(_):
        _, _, residuals, scale = _wanted_pairs(kry, cfg)
        return jnp.max(residuals) / jnp.where(scale > 0, scale, 1.0)

    # The relative residual of the worst wanted pair: the true one once the estimates pass.
    worst = jax.lax.cond(looks_done, true_check, lambda _: estimate, None)
    converged = looks_done & (worst <= tol)
    # Rounding in the products puts a floor under the residuals. Below about 100 eps of the
    # least precise leaf, a residual that stops improving (less than 10% better than the best
    # seen for three cycles, or true residuals above tol twice while the estimates pass) is at
    # that floor: more products cannot reach tol, and the run says so.
    improved = worst < 0.9 * run.best
    near_floor = worst <= 100 * cfg.product_eps
    stalls = jnp.where(improved | ~near_floor, 0, run.stalls + 1)
    stalls = stalls + jnp.where(looks_done & ~converged, 1, 0)
    floor = (stalls >= 3) & ~converged
    budget = matvecs + (cfg.m - cfg.keep) > cfg.max_matvecs
    ok = kry.ok
    status = jnp.select(
        [~ok, converged, floor, budget],
        [krylov.NONFINITE, krylov.CONVERGED, krylov.PRECISION_FLOOR, krylov.MAX_MATVECS],
        krylov.MAX_MATVECS,
    ).astype(jnp.int32)
    return run._replace(
        matvecs=matvecs,
        restarts=run.restarts + 1,
        done=~ok | converged | floor | budget,
        status=status,
        best=jnp.minimum(run.best, worst),
        stalls=stalls.astype(jnp.int32),
    )


def _finish(run: _Run, cfg: _Config, tol: jax.Array) -> EigResult:
    values, vectors, residuals, scale = _wanted_pairs(run.kry, cfg)
    ok = run.kry.ok & jnp.all(jnp.isfinite(values)) & jnp.all(jnp.isfinite(residuals))
    converged = (residuals <= tol * scale) & ok
    status = jnp.where(ok, run.status, krylov.NONFINITE).astype(jnp.int32)
    status = jnp.where(jnp.all(converged), krylov.CONVERGED, status).astype(jnp.int32)
    return EigResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        converged=converged,
        num_matvecs=run.matvecs,
        num_restarts=jnp.maximum(run.restarts, 0),
        ok=ok,
        status=status,
    )


# -- Compiled driver: the whole solve in one while loop. --------------------------------------
@functools.partial(jax.jit, static_argnums=4)
def _eigsh_compiled(op, key, v0, tol, cfg: _Config) -> EigResult:
    apply = krylov.product(op.linearize())

    def body(run: _Run) -> _Run:
        first = jnp.where(run.restarts < 0, 0, cfg.keep)
        run = _begin_cycle(run, cfg, tol)

        def step(j, kry):
            return krylov.lanczos_step(kry, apply(kry.q), j)

        kry = jax.lax.fori_loop(first, cfg.m, step, run.kry)
        return _end_cycle(run._replace(kry=kry), cfg, tol, first)

    run = jax.lax.while_loop(lambda r: ~r.done, body, _init(op, key, v0, cfg))
    return _finish(run, cfg, tol)


# -- Host driver: compiled pieces dispatched from Python, one read per restart. ----------------
# The Krylov state is donated: each step writes one row of the two stacks in place instead of
# copying them (which would double the memory and the traffic per step).
@functools.partial(jax.jit, donate_argnums=1)
def _host_step(op: LinearOperator, kry: krylov.KrylovState, j: jax.Array) -> krylov.KrylovState:
    return krylov.lanczos_step(kry, krylov.product(op)(kry.q), j)


_init_jit = jax.jit(_init, static_argnums=3)
_begin_jit = jax.jit(_begin_cycle, static_argnums=1, donate_argnums=0)
_end_jit = jax.jit(_end_cycle, static_argnums=(1, 3), donate_argnums=0)
_finish_jit = jax.jit(_finish, static_argnums=1)


def _eigsh_host(op, key, v0, tol, cfg: _Config) -> EigResult:
    lin = krylov.linearized(op)
    run = _init_jit(op, key, v0, cfg)
    first = 0
    while True:
        run = _begin_jit(run, cfg, tol)
        kry = run.kry
        for j in range(first, cfg.m):
            kry = _host_step(lin, kry, jnp.asarray(j, jnp.int32))
        run = _end_jit(run._replace(kry=kry), cfg, tol, first)
        first = cfg.keep
        if bool(run.done):
            break
    return _finish_jit(run, cfg, tol)
