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
from hesskit._src.tree import tree_norm, tree_normalize, tree_random_sphere

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

    Builds an orthonormal Krylov basis of up to ``krylov_dim`` vectors (each new vector takes
    the three-term recurrence, then one Gram-Schmidt pass against the rows filled so far, and
    a second only when the first cancelled much of it), and checks the Ritz pairs of the
    projected matrix :math:`Q^\top A Q` every ``max(2, j / 8)`` steps, so a run stops within
    an eighth of the products it needed, whether or not the basis is full. When the basis is
    full it restarts by keeping the most wanted Ritz vectors plus a few extra (about half the
    free space) with the residual vector as the next direction (Wu and Simon 2000); the kept
    vectors are rotated in place, so the basis and its images ``A Q`` are the only two stacks
    held. A run stops when the true residuals of the wanted pairs (computed from the stored
    ``A Q``, no extra products) are at most ``tol * max|theta|``, when ``max_matvecs`` is
    spent, or when the residuals stop improving above ``tol`` (the tolerance is below what the
    products' precision reaches: ``status == 3``); the estimates
    :math:`|\beta_j s_{j,i}|` only decide when to look, so the stop rule and ``converged``
    always agree. The eigenvalues then err by about ``residual**2 / gap``: for small
    eigenvalues next to a large top end, pass a smaller ``tol`` for relative accuracy.

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
    vector in Krylov precision (``basis_dtype`` may store the two stacks narrower): 356
    vectors for SA(3) by default (:func:`hesskit._src.memory.eigsh_vectors`), 1.4 GB at 1M
    float32 parameters. The trade-off is products
    against memory: a smaller ``krylov_dim`` restarts sooner and takes more products (SA(3)
    on the digits MLP: 173-180 at the default 160; one unrestarted run needs 150-210).
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
            LA and LM and ``min(dim, max(2 k + 1, 160))`` for SA and BE, whose wanted values
            sit next to the Hessian's bulk: one unrestarted run of 150-170 products is what
            SA(3) takes on the 85k-parameter digits MLP, and the checks inside a cycle make
            unused rows cost memory only. The default shrinks to an explicit ``max_matvecs``
            and to half the free memory (see Memory). Must satisfy ``k < krylov_dim <= dim``.
        v0: optional start vector shaped like ``op.like`` (e.g. a previous eigenvector, to warm
            start); must be nonzero.
        verify: once everything has converged, go on from a fresh random direction orthogonal
            to the basis, keeping every row, so that a missed copy of a repeated extreme
            eigenvalue (which a single-vector Krylov space cannot see) shows up and is found.
            The fresh chain runs until its own extreme Ritz value at each wanted end has
            converged to ``tol`` (at most as many products as the solve took before it); a
            chain that finds a copy is followed by another (a triple eigenvalue needs two).
            On the 85k-parameter digits MLP it costs 5-45% more products (LA(10) 22 -> 23-29,
            SA(3) 180-217 -> 249, BE(6) 180-191 -> 247-258); on 400-dimensional spectra with
            a triple eigenvalue next to a bulk it found every copy in 72 of 72 solves, where
            a window of an eighth of the products missed one in 22. ``False`` skips it, as
            ARPACK and SciPy do. With ``return_eigenvectors=False`` there is no basis to be
            orthogonal to: independent runs from fresh random directions check the first
            (about twice the products; see :func:`hesskit._src.lanczos_values`).
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
    krylov.check_devices(op)
    validation.check_one_of(which, "which", WHICH)
    if max_matvecs is not None:
        max_matvecs = validation.check_positive_int(max_matvecs, "max_matvecs")
    if krylov_dim is None:
        krylov_dim = _default_krylov_dim(k, which, dim, max_matvecs, op.like)
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
        memory.eigsh_vectors(
            krylov_dim,
            k,
            return_eigenvectors=return_eigenvectors,
            block_rows=krylov.block_copy_rows(op.like, krylov_dim),
        ),
        op.like,
        f"eigsh(k={k}, krylov_dim={krylov_dim})",
        reduce="a smaller krylov_dim, basis_dtype=jnp.bfloat16 or return_eigenvectors=False",
    )
    tol = jnp.asarray(tol, krylov.krylov_dtype(op.like))
    loop = krylov.resolve_loop(loop, op, key, v0)
    if not return_eigenvectors:
        from hesskit._src.lanczos_values import eigvalsh_lanczos

        return eigvalsh_lanczos(op, key, v0, tol, k, which, max_matvecs, loop=loop, verify=verify)
    # The rounding floor of the residuals: the least precise of the products and the basis.
    dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(op.like)]
    dtypes += [] if basis_dtype is None else [basis_dtype]
    product_eps = max(float(jnp.finfo(d).eps) for d in dtypes)
    keep = krylov.num_kept(k, krylov_dim)
    cfg = _Config(k, which, krylov_dim, keep, max_matvecs, verify, basis_dtype, product_eps, dim)
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
    dim: int


class _Run(NamedTuple):
    """The solver's state: the Krylov basis and the bookkeeping around it."""

    kry: krylov.KrylovState
    filled: jax.Array  # rows of the basis filled so far
    matvecs: jax.Array
    restarts: jax.Array
    verified: jax.Array  # the verification window is over (or was not asked for)
    pending: jax.Array  # a verification direction is to be injected before the next steps
    verify_end: jax.Array  # product count at which the verification window ends, -1 before
    fresh_start: jax.Array  # first row of the window's fresh chain; -1 once a restart merged it
    windows: jax.Array  # verification windows that found a missed copy
    repair: jax.Array  # the next direction is to be the worst wanted pair's residual
    repairs: jax.Array
    done: jax.Array
    status: jax.Array
    best: jax.Array
    best_at: jax.Array
    fails: jax.Array


def _init(op: LinearOperator, key: jax.Array, v0: PyTree | None, cfg: _Config) -> _Run:
    key, start_key = jax.random.split(key)
    klike = krylov.krylov_like(krylov.vector_like(op))
    start = tree_random_sphere(start_key, klike) if v0 is None else krylov.to_krylov(v0)
    q0, _ = tree_normalize(start)
    kry = krylov.init_state(q0, key, cfg.m, with_images=True, storage_dtype=cfg.basis_dtype)
    zero = jnp.zeros((), jnp.int32)
    return _Run(
        kry=kry,
        filled=zero,
        matvecs=zero,
        restarts=zero,
        verified=jnp.asarray(not cfg.verify),
        pending=jnp.asarray(False),
        verify_end=jnp.asarray(-1, jnp.int32),
        fresh_start=zero,
        windows=zero,
        repair=jnp.asarray(False),
        repairs=zero,
        done=jnp.asarray(False),
        status=jnp.asarray(krylov.MAX_MATVECS, jnp.int32),
        best=jnp.asarray(jnp.inf, kry.proj.dtype),
        best_at=zero,
        fails=zero,
    )


def _ritz_sizes(m: int) -> list[int]:
    # Few sizes: each is one more eigh to compile.
    return sorted({b for b in (32, 128, 512) if b < m} | {m})


def _ritz_block(proj: jax.Array, filled: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
    """:func:`_ritz_filled` computed with an ``eigh`` of size ``b >= filled``."""
    m = proj.shape[0]
    sub = proj[:b, :b]
    valid = jnp.arange(b) < filled
    big = 2.0 * jnp.sqrt(jnp.sum(sub * sub)) + 1.0
    sub = jnp.where(valid[:, None] & valid[None, :], sub, 0.0)
    sub = sub + jnp.diag(jnp.where(valid, 0.0, big)).astype(sub.dtype)
    theta, s = krylov.ritz(sub)
    s = jnp.where(valid[:, None], s, 0.0).astype(s.dtype)
    theta = jnp.concatenate([theta, jnp.full((m - b,), big, theta.dtype)])
    s = jnp.zeros((m, m), s.dtype).at[:b, :b].set(s)
    return theta, s


def _ritz_filled(proj: jax.Array, filled: Any) -> tuple[jax.Array, jax.Array]:
    """Ritz pairs of the leading ``filled x filled`` block of ``Q^T A Q``, padded to ``m``.

    The values come first in ascending order (``theta[:filled]``), then placeholders above all
    of them; each coefficient vector is zero past ``filled``. ``eigh`` runs on the smallest of
    a few static sizes that holds the filled rows, so an early check in a large basis is
    cheap; under ``vmap`` the size that holds the fullest member serves the whole batch.
    """
    sizes = _ritz_sizes(proj.shape[0])
    filled = jnp.asarray(filled, jnp.int32)
    # The first size that holds the rows, counted without a constant array of the sizes.
    index = sum((krylov.batch_max(filled) > b).astype(jnp.int32) for b in sizes[:-1])
    branches = [functools.partial(_ritz_block, b=b) for b in sizes]
    return jax.lax.switch(index, branches, proj, filled)


def _select(theta: jax.Array, which: str, count: int, k: int, filled: Any) -> jax.Array:
    """Indices of the ``count`` most wanted Ritz values, best first.

    ``theta`` is ascending in its first ``filled`` entries (see :func:`_ritz_filled`).
    """
    m = theta.shape[0]
    if which == "LA":
        return filled - 1 - jnp.arange(count)
    if which == "SA":
        return jnp.arange(count)
    if which == "LM":
        key = jnp.where(jnp.arange(m) < filled, -jnp.abs(theta), jnp.inf)
        return jnp.argsort(key)[:count]
    # BE: k//2 from the bottom and the rest from the top; extra kept vectors split alike.
    low = k // 2 + (count - k) // 2
    high = count - low
    return jnp.concatenate([jnp.arange(low), filled - high + jnp.arange(high)])


def _order(values: jax.Array, which: str) -> jax.Array:
    if which == "LA":
        return jnp.argsort(-values)
    if which == "LM":
        return jnp.argsort(-jnp.abs(values))
    return jnp.argsort(values)


def _scale(theta: jax.Array, filled: Any) -> jax.Array:
    scale = jnp.max(jnp.where(jnp.arange(theta.shape[0]) < filled, jnp.abs(theta), 0.0))
    return jnp.where(scale > 0, scale, 1.0)


def _default_krylov_dim(k: int, which: str, dim: int, max_matvecs: int | None, like: PyTree) -> int:
    # The bottom of a Hessian spectrum sits next to a dense bulk near zero: one unrestarted
    # Lanczos run of 150-170 steps is what SA(3) takes on the 85k-parameter digits MLP
    # (benchmarks/eigs.py), and every restart before that costs products. With the checks
    # inside a cycle, a large basis costs only its memory until it is used.
    floor = 160 if which in ("SA", "BE") else 20
    m = min(dim, max(2 * k + 1, floor))
    if max_matvecs is not None:
        # A small budget shrinks the default basis rather than being refused.
        m = max(min(m, max_matvecs), min(k + 1, dim))
    # ...and so does memory: at most half of what is free (the rest is the user's).
    available, _ = memory.available_bytes()
    if available is not None:
        per_vector = memory.vector_bytes(like)
        while m > min(2 * k + 1, dim) and (
            memory.eigsh_vectors(m, k) * per_vector > available // 2
        ):
            m = max(min(2 * k + 1, dim), int(m * 0.8))
    return m


def _fresh_chain(
    run: _Run, theta: jax.Array, s: jax.Array, tol: jax.Array, cfg: _Config
) -> tuple[jax.Array, jax.Array]:
    """Whether the verification's fresh chain has settled, and whether it found a missed copy.

    The fresh chain (rows ``fresh_start .. filled - 1``) is Lanczos on the operator deflated by
    the earlier basis; its extreme Ritz value at each wanted end moves outward, towards the
    deflated operator's extreme eigenvalue. It is read off the Ritz pairs of the whole basis
    (no second eigendecomposition): the chain's pairs are those with most of their weight on
    its rows. A missed copy of a wanted eigenvalue is the deflated extreme: the chain's pair
    then enters the wanted set (``found``). Otherwise the chain has looked far enough once its
    extreme pair has converged to ``tol``. A chain merged by a restart counts as settled.
    """
    kry, filled, start = run.kry, run.filled, run.fresh_start
    m = theta.shape[0]
    rows = jnp.arange(m)
    on_chain = (rows >= start) & (rows < filled)
    weight = jnp.sum(jnp.where(on_chain[:, None], s * s, 0.0), axis=0)
    chain = (rows < filled) & (weight > 0.5)
    estimate = _estimates(theta, s, kry.beta, filled)
    ends = []  # (the chain's extreme pair, whether it is among the wanted)
    low = {"SA": cfg.k, "BE": cfg.k // 2}.get(cfg.which, 0)
    high = {"LA": cfg.k, "BE": cfg.k - cfg.k // 2}.get(cfg.which, 0)
    if low:
        i = jnp.argmin(jnp.where(chain, rows, m))
        ends.append((i, i < low))
    if high:
        i = jnp.argmax(jnp.where(chain, rows, -1))
        ends.append((i, i >= filled - high))
    if cfg.which == "LM":
        magnitude = jnp.where(rows < filled, jnp.abs(theta), -jnp.inf)
        i = jnp.argmax(jnp.where(chain, magnitude, -jnp.inf))
        rank = jnp.sum(magnitude > magnitude[i])
        ends.append((i, rank < cfg.k))
    settled = jnp.all(jnp.stack([estimate[i] <= tol for i, _ in ends]))
    found = jnp.any(jnp.stack([wanted for _, wanted in ends]))
    merged = (start < 0) | ~jnp.any(chain)
    return merged | settled | found, ~merged & found


def _estimates(theta, s, beta, filled) -> jax.Array:
    """Every Ritz pair's residual estimate ``|beta s_{last,i}|`` over ``max|theta|``."""
    last = jnp.maximum(filled - 1, 0)
    return jnp.abs(beta * s[last]) / _scale(theta, filled)


def _worst_estimate(theta, s, beta, filled, cfg: _Config) -> jax.Array:
    """The largest residual estimate of a wanted pair (see :func:`_estimates`)."""
    idx = _select(theta, cfg.which, cfg.k, cfg.k, filled)
    return jnp.max(_estimates(theta, s, beta, filled)[idx])


def _restart(run: _Run, cfg: _Config) -> _Run:
    """Compress the full basis to the kept Ritz vectors and choose the next direction."""
    kry = run.kry
    theta, s = krylov.ritz(kry.proj)
    kept_idx = _select(theta, cfg.which, cfg.keep, cfg.k, cfg.m)
    coeffs = s[:, kept_idx].T  # (keep, m)
    basis = krylov.rotate_rows(kry.basis, coeffs)
    images = krylov.rotate_rows(kry.images, coeffs)
    dtype = kry.proj.dtype
    ar = jnp.arange(cfg.keep)
    proj = jnp.zeros((cfg.m, cfg.m), dtype).at[ar, ar].set(theta[kept_idx].astype(dtype))
    key, sub = jax.random.split(kry.key)
    start = jax.lax.cond(
        run.pending,
        lambda _: krylov.random_orthogonal(sub, basis, filled=cfg.keep, like=kry.q),
        lambda _: kry.q,
        None,
    )
    kry = kry._replace(
        basis=basis,
        images=images,
        proj=proj,
        q=start,
        key=key,
        chain_start=jnp.asarray(cfg.keep, jnp.int32),
    )
    return run._replace(
        kry=kry,
        filled=jnp.asarray(cfg.keep, jnp.int32),
        restarts=run.restarts + 1,
        pending=jnp.asarray(False),
        # Injected here, the fresh chain starts after the kept rows; a restart inside a window
        # merges the chain into the kept Ritz vectors, and the window ends at the next check.
        fresh_start=jnp.where(run.pending, cfg.keep, -1).astype(jnp.int32),
    )


def _inject(run: _Run, cfg: _Config) -> _Run:
    """Continue the basis from a fresh random direction orthogonal to the filled rows.

    A single-vector Krylov space holds only the part of a repeated eigenvalue's eigenspace
    present in the start vector. Once everything looks converged, the run goes on from a
    fresh direction, with every filled row kept, until that chain has settled (see
    :func:`_fresh_chain`): a missed copy of a repeated (or numerically invisible) extreme
    eigenvalue then shows up as a new, unconverged wanted pair and the iteration goes on.
    """
    kry = run.kry
    key, sub = jax.random.split(kry.key)
    j = run.filled
    start = krylov.random_orthogonal(sub, kry.basis, filled=j, like=kry.q)
    kry = _continue_from(kry, j, start, key)
    return run._replace(kry=kry, pending=jnp.asarray(False), fresh_start=j.astype(jnp.int32))


def _continue_from(kry: krylov.KrylovState, j: jax.Array, start: PyTree, key: jax.Array):
    """The basis continued at row ``j`` from ``start`` (unit, orthogonal to the filled rows)."""
    # The new direction has no coupling to the last row.
    proj = kry.proj.at[j, j - 1].set(0.0).at[j - 1, j].set(0.0)
    return kry._replace(
        q=start,
        key=key,
        proj=proj,
        beta=jnp.zeros_like(kry.beta),
        chain_start=jnp.asarray(j, jnp.int32),
    )


def _repair(run: _Run, cfg: _Config) -> _Run:
    """Continue the basis from the residual of the worst wanted pair.

    A verification window replaces the residual direction of the pairs found before it by a
    fresh one; their true residuals then stay where they were while the estimates (which see
    only the current direction) pass. The residual ``A y - theta y`` of the worst pair,
    orthogonal to the basis, gives that direction back without a product.
    """
    kry, j = run.kry, run.filled
    theta, s = _ritz_filled(kry.proj, j)
    idx = _select(theta, cfg.which, cfg.k, cfg.k, j)
    residuals = krylov.ritz_residuals(kry, s[:, idx].T, theta[idx])
    worst = jnp.argmax(jax.vmap(tree_norm)(residuals))
    r = jax.tree_util.tree_map(lambda x: x[worst], residuals)
    r, _ = krylov.orthogonalize(kry.basis, r, filled=j)
    r, norm = tree_normalize(r)
    key, sub = jax.random.split(kry.key)
    noise = 4 * jnp.finfo(kry.proj.dtype).eps * kry.scale
    start = jax.lax.cond(
        norm > noise,
        lambda _: r,
        lambda _: krylov.random_orthogonal(sub, kry.basis, filled=j, like=kry.q),
        None,
    )
    kry = _continue_from(kry, j, start, key)
    return run._replace(kry=kry, repair=jnp.asarray(False), repairs=run.repairs + 1)


def _prepare(run: _Run, cfg: _Config) -> _Run:
    """Before a segment of steps: restart a full basis, inject a pending verification."""
    repair = run.repair & ~run.pending
    run = krylov.cond_any(run.filled >= cfg.m, lambda r: _restart(r, cfg), lambda r: r, run)
    run = krylov.cond_any(run.pending, lambda r: _inject(r, cfg), lambda r: r, run)
    return krylov.cond_any(repair, lambda r: _repair(r, cfg), lambda r: r, run)


def _segment_end(filled, matvecs, verify_end, cfg: _Config, xp: Any = jnp):
    """The row after which the next convergence check runs.

    Checks come every ``max(2, filled / 8)`` steps (an eighth more products at most than the
    basis needed), at the end of the verification window, before the budget runs out and
    when the basis is full; never before ``k + 2`` rows, the fewest that can be checked.
    """
    stop = xp.maximum(filled + xp.maximum(2, filled // 8), min(cfg.k + 2, cfg.m))
    stop = xp.minimum(stop, cfg.m)
    stop = xp.minimum(stop, filled + (cfg.max_matvecs - matvecs))
    in_window = (verify_end >= 0) & (matvecs < verify_end)
    return xp.where(in_window, xp.minimum(stop, filled + (verify_end - matvecs)), stop)


def _wanted_pairs(kry: krylov.KrylovState, theta, s, filled, cfg: _Config):
    idx = _select(theta, cfg.which, cfg.k, cfg.k, filled)
    idx = idx[_order(theta[idx], cfg.which)]
    values, vectors, residuals = krylov.ritz_pairs(kry, s[:, idx].T, theta[idx])
    # Refinement can swap two values of a cluster: restore the promised order.
    order = _order(values, cfg.which)
    vectors = jax.tree_util.tree_map(lambda x: x[order], vectors)
    return values[order], vectors, residuals[order], _scale(theta, filled)


def _check(run: _Run, cfg: _Config, tol: jax.Array) -> _Run:
    """After a segment: decide, on true residuals, whether to verify, go on or stop."""
    kry = run.kry
    filled = run.filled
    theta, s = _ritz_filled(kry.proj, filled)
    estimate = _worst_estimate(theta, s, kry.beta, filled, cfg)
    injected = run.verify_end >= 0
    in_window = injected & (run.matvecs < run.verify_end)
    # The window ends early once its fresh chain has settled or found a missed copy.
    settled, found = _fresh_chain(run, theta, s, tol, cfg)
    settled, found = settled & in_window, found & in_window
    in_window = in_window & ~settled
    # A basis spanning the whole space holds the exact pairs: nothing is left to find.
    whole = filled >= cfg.dim
    # Before the verification the estimates decide when to look at the true residuals; after
    # it they miss the dropped residual direction, so every check looks.
    looks = (filled > cfg.k) & ((~in_window & (injected | (estimate <= tol))) | whole)

    def true_check(_):
        _, _, residuals, scale = _wanted_pairs(kry, theta, s, filled, cfg)
        return jnp.max(residuals) / scale

    worst = krylov.cond_any(looks, true_check, lambda _: estimate, None)
    passed = looks & (worst <= tol)
    # A window that found a copy is followed by another once the copy has converged (a
    # triple eigenvalue needs two), at most k in all.
    again = found & (run.windows + 1 < cfg.k)
    verified = run.verified | (injected & ~in_window & ~again) | whole
    start_verify = passed & ~verified & (~injected | again)
    # The window may last as many products as the solve has taken so far (at least two): a
    # copy converges in the fresh chain about as fast as its first copy did.
    window = jnp.maximum(2, run.matvecs)
    verify_end = jnp.where(settled, run.matvecs, run.verify_end)
    verify_end = jnp.where(again, -1, verify_end)
    verify_end = jnp.where(
        start_verify, jnp.minimum(run.matvecs + window, cfg.max_matvecs), verify_end
    )
    converged = passed & verified
    # Rounding in the products puts a floor under the residuals. Below about 100 eps of the
    # least precise leaf, a residual that stops improving (less than 10% better than the best
    # seen for three cycles' worth of products, or true residuals above tol twice while the
    # estimates pass) is at that floor: more products cannot reach tol, and the run says so.
    improved = worst < 0.9 * run.best
    best_at = jnp.where(improved, run.matvecs, run.best_at)
    near_floor = worst <= 100 * cfg.product_eps
    # After a window, estimates that pass while true residuals do not mean the residual
    # direction was dropped (not a rounding floor): it is given back, a few times at most.
    stale = looks & ~passed & (estimate <= tol)
    repair = stale & (injected | (run.windows > 0)) & ~in_window & (run.repairs < cfg.k + 2)
    fails = run.fails + jnp.where(stale & ~repair, 1, 0)
    stalled = near_floor & (run.matvecs - best_at >= 3 * (cfg.m - cfg.keep))
    floor = (stalled | (fails >= 2) | whole) & ~converged
    budget = run.matvecs >= cfg.max_matvecs
    ok = kry.ok
    status = jnp.select(
        [~ok, converged, floor, budget],
        [krylov.NONFINITE, krylov.CONVERGED, krylov.PRECISION_FLOOR, krylov.MAX_MATVECS],
        krylov.MAX_MATVECS,
    ).astype(jnp.int32)
    return run._replace(
        verified=verified,
        pending=start_verify & ~budget,
        verify_end=verify_end.astype(jnp.int32),
        windows=(run.windows + found).astype(jnp.int32),
        repair=repair & ~converged,
        done=~ok | converged | floor | budget,
        status=status,
        best=jnp.minimum(run.best, worst),
        best_at=best_at.astype(jnp.int32),
        fails=fails.astype(jnp.int32),
    )


def _finish(run: _Run, cfg: _Config, tol: jax.Array) -> EigResult:
    theta, s = _ritz_filled(run.kry.proj, run.filled)
    values, vectors, residuals, scale = _wanted_pairs(run.kry, theta, s, run.filled, cfg)
    ok = run.kry.ok & jnp.all(jnp.isfinite(values)) & jnp.all(jnp.isfinite(residuals))
    ok = ok & (run.filled > cfg.k)
    converged = (residuals <= tol * scale) & ok
    status = jnp.where(ok, run.status, krylov.NONFINITE).astype(jnp.int32)
    status = jnp.where(jnp.all(converged), krylov.CONVERGED, status).astype(jnp.int32)
    return EigResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        converged=converged,
        num_matvecs=run.matvecs,
        num_restarts=run.restarts,
        ok=ok,
        status=status,
    )


def _advance(run: _Run, stop: Any) -> _Run:
    return run._replace(filled=stop, matvecs=run.matvecs + (stop - run.filled))


# -- Compiled driver: the whole solve in one while loop. --------------------------------------
@functools.partial(jax.jit, static_argnums=4)
def _eigsh_compiled(op, key, v0, tol, cfg: _Config) -> EigResult:
    apply = krylov.product(op.linearize())

    def body(run: _Run) -> _Run:
        run = _prepare(run, cfg)
        stop = _segment_end(run.filled, run.matvecs, run.verify_end, cfg).astype(jnp.int32)

        def step(j, kry):
            return krylov.lanczos_step(kry, apply(kry.q), j)

        kry = jax.lax.fori_loop(run.filled, stop, step, run.kry)
        return _check(_advance(run._replace(kry=kry), stop), cfg, tol)

    run = jax.lax.while_loop(lambda r: ~r.done, body, _init(op, key, v0, cfg))
    return _finish(run, cfg, tol)


# -- Host driver: compiled pieces dispatched from Python, one read per check. ------------------
# The Krylov state is donated: each step writes one row of the two stacks in place instead of
# copying them (which would double the memory and the traffic per step).
@functools.partial(jax.jit, donate_argnums=1)
def _host_step(op: LinearOperator, kry: krylov.KrylovState, j: jax.Array) -> krylov.KrylovState:
    return krylov.lanczos_step(kry, krylov.product(op)(kry.q), j)


_init_jit = jax.jit(_init, static_argnums=3)
_prepare_jit = jax.jit(_prepare, static_argnums=1, donate_argnums=0)
_advance_check_jit = jax.jit(
    lambda run, stop, cfg, tol: _check(_advance(run, stop), cfg, tol),
    static_argnums=2,
    donate_argnums=0,
)
_finish_jit = jax.jit(_finish, static_argnums=1)


def _eigsh_host(op, key, v0, tol, cfg: _Config) -> EigResult:
    lin = krylov.linearized(op)
    run = _init_jit(op, key, v0, cfg)
    filled, matvecs, verify_end = 0, 0, -1
    while True:
        run = _prepare_jit(run, cfg)
        if filled >= cfg.m:
            filled = cfg.keep
        stop = int(_segment_end(filled, matvecs, verify_end, cfg, xp=np))
        kry = run.kry
        for j in range(filled, stop):
            kry = _host_step(lin, kry, jnp.asarray(j, jnp.int32))
        run = _advance_check_jit(run._replace(kry=kry), jnp.asarray(stop, jnp.int32), cfg, tol)
        done, matvecs, verify_end = jax.device_get((run.done, run.matvecs, run.verify_end))
        filled, matvecs, verify_end = stop, int(matvecs), int(verify_end)
        if bool(done):
            break
    return _finish_jit(run, cfg, tol)
