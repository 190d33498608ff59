r"""Extreme eigenvalues without eigenvectors: Lanczos with no stored basis.

The mode behind ``eigsh(..., return_eigenvectors=False)``. It runs the plain three-term Lanczos
recurrence with no reorthogonalization, so it holds three parameter-sized vectors however many
products it takes, and removes the spurious copies ("ghosts") that the loss of orthogonality
creates in the tridiagonal matrix by the test of Cullum and Willoughby.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hesskit._src import krylov, validation
from hesskit._src.operators import LinearOperator
from hesskit._src.tree import tree_normalize, tree_random_sphere, tree_vdot

if TYPE_CHECKING:
    from hesskit._src.thick_restart import EigResult

PyTree = Any

__all__ = ["eigvalsh_lanczos"]

WHICH = ("LA", "SA", "BE", "LM")

DEFAULT_CHECK_EVERY = 16
"""Products between two Ritz analyses of the tridiagonal matrix (see ``eigvalsh_lanczos``)."""

_STOL_FACTOR = 32.0  # Cullum-Willoughby tolerance, in eps * ||T|| of the tridiagonal work
_MULTOL_FACTOR = 64.0  # copies of one eigenvalue, in eps * ||T|| of the vectors
_BLOCK = 16  # Sturm-sequence steps per iteration of the sequential loop (unrolled).


def _num_candidates(wanted: int) -> int:
    # Ritz values examined per round at one end: the wanted ones plus room for ghosts and
    # copies; more rounds follow when copies of converged values fill a round.
    # A multiple of 8, the batch of the inverse-iteration solves (no remainder to compile).
    return 8 * ((2 * wanted + 16 + 7) // 8)


def _make_result(**fields: Any) -> EigResult:
    # Imported here so that thick_restart (eigsh) can import this module at its top.
    from hesskit._src.thick_restart import EigResult

    # ``status`` joins EigResult as its last field; until it does, leave it out.
    if "status" not in EigResult._fields:
        fields.pop("status")
    return EigResult(**fields)


class _Ritz(NamedTuple):
    values: jax.Array  # (k,), in the order eigsh returns them; NaN in empty slots
    estimates: jax.Array  # (k,) |beta_j s_{j,i}|; inf in empty slots
    filled: jax.Array  # (k,) a good (non-spurious) Ritz value is in the slot
    scale: jax.Array  # max |theta| over the whole of T_j
    trusted: jax.Array  # (k,) no undecided value lies between the slot and its end


def _sturm_counts(
    alphas: jax.Array, beta_sq: jax.Array, start: int, stop: jax.Array, x: jax.Array
) -> jax.Array:
    """Eigenvalues below ``x`` of the tridiagonal block on rows ``start .. stop - 1``.

    The LDL^T pivot recurrence ``q_i = a_i - x - b_{i-1}^2 / q_{i-1}`` counts negative pivots
    (Sylvester's inertia), vectorized over every entry of ``x``; tiny pivots are pushed to
    ``-pivmin`` as in LAPACK's ``dlaebz``. Only the active rows are visited, so a check at step
    ``j`` costs ``j`` sequential steps whatever the buffer length.
    """
    dtype = alphas.dtype
    n = alphas.shape[0]
    tiny = jnp.finfo(dtype).tiny
    pivmin = tiny * jnp.maximum(1.0, jnp.max(beta_sq))
    # Pad so that every unrolled block can read its rows; padded rows are masked below.
    pad = _BLOCK + 1
    a = jnp.concatenate([alphas, jnp.zeros(pad, dtype)])
    # bsq[i] couples rows i - 1 and i; at the first row the previous pivot is +inf, so the
    # coupling term vanishes whatever bsq holds there.
    bsq = jnp.concatenate([jnp.zeros(1, dtype), beta_sq, jnp.zeros(pad, dtype)])[: n + pad]

    def block(carry):
        i0, q, count = carry
        a_blk = jax.lax.dynamic_slice(a, (i0,), (_BLOCK,))
        b_blk = jax.lax.dynamic_slice(bsq, (i0,), (_BLOCK,))
        for u in range(_BLOCK):
            active = i0 + u < stop
            new_q = a_blk[u] - x - b_blk[u] / q
            neg = new_q <= pivmin
            new_q = jnp.where(neg, jnp.minimum(new_q, -pivmin), new_q)
            q = jnp.where(active, new_q, q)
            count = jnp.where(active & neg, count + 1, count)
        return i0 + _BLOCK, q, count

    init = (
        jnp.asarray(start, jnp.int32),
        jnp.full(x.shape, jnp.inf, dtype),
        jnp.zeros(x.shape, jnp.int32),
    )
    _, _, count = jax.lax.while_loop(lambda c: c[0] < stop, block, init)
    return count


def _bisect(
    alphas: jax.Array,
    beta_sq: jax.Array,
    j: jax.Array,
    targets: jax.Array,
    lower: jax.Array,
    upper: jax.Array,
) -> jax.Array:
    """Eigenvalues number ``targets`` (ascending, 0-based) of T_j by parallel bisection."""
    dtype = alphas.dtype
    eps = jnp.finfo(dtype).eps
    abs_tol = 2 * eps * jnp.maximum(jnp.abs(lower), jnp.abs(upper))
    lower = jnp.broadcast_to(lower, targets.shape)
    upper = jnp.broadcast_to(upper, targets.shape)
    # Halving the Gershgorin interval down to eps * ||T|| takes at most mantissa + 2 steps.
    max_iters = jnp.finfo(dtype).nmant + 3

    def cond(c):
        it, lo, hi = c
        return (it < max_iters) & (jnp.max(hi - lo) > abs_tol)

    def body(c):
        it, lo, hi = c
        mid = 0.5 * (lo + hi)
        below = _sturm_counts(alphas, beta_sq, 0, j, mid)
        lo = jnp.where(below <= targets, mid, lo)
        hi = jnp.where(below > targets, mid, hi)
        return it + 1, lo, hi

    _, lo, hi = jax.lax.while_loop(cond, body, (jnp.asarray(0), lower, upper))
    return 0.5 * (lo + hi)


def _last_components(
    alphas: jax.Array, betas: jax.Array, j: jax.Array, theta: jax.Array, shift: jax.Array
) -> jax.Array:
    """``|s_{j,i}|``: last components of T_j's unit eigenvectors at ``theta``, by inverse iteration.

    Two tridiagonal solves ``(T_j - theta_i I) y = b`` per value (LAPACK ``gtsv`` on CPU, one
    batched call), on the full buffer with the rows past ``j`` decoupled as identity rows. The
    shift is nudged by ``shift`` (a few eps * ||T||) so that an eigenvalue that bisection
    found to the last bit cannot make a pivot exactly zero.
    """
    dtype = alphas.dtype
    n = alphas.shape[0]
    idx = jnp.arange(n)
    inside = idx < j
    off = jnp.where(idx < j - 1, betas, 0.0).astype(dtype)  # off[i] couples rows i and i + 1
    du = jnp.broadcast_to(off, (theta.shape[0], n))
    dl = jnp.broadcast_to(jnp.concatenate([jnp.zeros(1, dtype), off[:-1]]), (theta.shape[0], n))
    diag = jnp.where(inside[None, :], alphas[None, :] - (theta + shift)[:, None], 1.0)
    # A fixed, generic right-hand side: no eigenvector of T_j is orthogonal to it in practice.
    y = jnp.where(inside, 1.0 + 0.5 * jnp.sin(1.0 + idx.astype(dtype)), 0.0).astype(dtype)
    y = jnp.broadcast_to(y, (theta.shape[0], n))
    for _ in range(2):
        y = jax.lax.linalg.tridiagonal_solve(dl, diag, du, y[..., None])[..., 0]
        y = y / jnp.max(jnp.abs(y), axis=1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
    last = jnp.abs(jnp.take(y, j - 1, axis=1))
    # A non-finite solve (an exactly singular pivot despite the nudge) proves nothing: report
    # the pair as unconverged rather than as converged.
    return jnp.where(jnp.isfinite(last), last, 1.0)


class _End(NamedTuple):
    values: jax.Array  # (w,) good values, most extreme first; NaN in empty slots
    estimates: jax.Array  # (w,) residual estimates; inf in empty slots
    count: jax.Array  # number of filled slots
    next_index: jax.Array  # the first index (counted from this end) not examined
    claimed: jax.Array  # the lowest index (from this end) in a group that filled a slot
    trusted: jax.Array  # slots from this one on have an undecided value before them


def _top_end(
    a: jax.Array,
    betas: jax.Array,
    j: jax.Array,
    wanted: int,
    limit: jax.Array,
    tols: tuple[jax.Array, jax.Array, jax.Array],
    bounds: tuple[jax.Array, jax.Array],
    resolved: bool,
) -> _End:
    """The ``wanted`` largest good Ritz values of T_j, examined from the top down.

    Candidates come in rounds of ``_num_candidates(wanted)`` consecutive indices (one parallel
    bisection each). A candidate starts a new group when it lies below the previous group,
    whose extent ``[theta - multol, theta]`` is read from one Sturm count, so that however
    many copies of a converged value pile up, the next round starts under them. The bottom end
    is the top end of ``-T_j``. ``limit`` is the lowest index this end may examine.

    Unless the tridiagonal work is ``resolved`` (float64), a value the ghost test rejects
    while its estimate has not converged is undecided: float32 bisection cannot tell a ghost
    (which matches T^_j to far below float32's eps) from a good value whose eigenvector has a
    small first component (which misses T^_j by about that component squared times a gap,
    measured at 1e-5 to 1e-4 of ||T|| on clustered ends). One farther than ``multol`` from
    every good value (ghosts form next to converged values, and end as their copies) marks the
    slots after it as untrusted, so that the run goes on until it converges or becomes a copy.
    """
    stol, multol, reach = tols
    lower, upper = bounds
    dtype = a.dtype
    n = a.shape[0]
    c = _num_candidates(wanted)
    idx = jnp.arange(n)
    b = jnp.where(idx < j - 1, betas, 0.0).astype(dtype)
    beta_sq = b * b
    beta_j = jnp.abs(betas[jnp.maximum(j - 1, 0)])
    eps_t = jnp.finfo(dtype).eps
    nudge = 4 * eps_t * jnp.maximum(jnp.abs(lower), jnp.abs(upper))
    limit = jnp.maximum(limit, 0)

    def round_(st: _End) -> _End:
        targets = st.next_index - jnp.arange(c)
        valid = targets >= limit
        theta = _bisect(a, beta_sq, j, jnp.clip(targets, 0, jnp.maximum(j - 1, 0)), lower, upper)
        points = jnp.concatenate([theta - multol, theta - stol, theta + stol])
        below = _sturm_counts(a, beta_sq, 0, j, points[:c])
        hat = _sturm_counts(a, beta_sq, 1, j, points[c:])
        near_hat = (hat[c:] - hat[:c]) > 0
        # Inverse iteration in batches: a (c, n) solve would grow with the buffer length.
        last = jax.lax.map(
            lambda th: _last_components(a, betas, j, th, nudge), theta[:, None], batch_size=8
        )[:, 0]
        est = jnp.where(valid, beta_j * last, jnp.inf)

        def start_groups(floor, x):
            t, lo, ok = x
            starts = ok & (t < floor)
            return jnp.where(starts, lo, floor), starts

        floor, starts = jax.lax.scan(start_groups, st.next_index + 1, (targets, below, valid))
        group = jnp.cumsum(starts) - 1
        gid = jnp.where(valid & (group >= 0), group, c)  # c: dropped
        size = (
            targets + 1 - below
        )  # values in [theta - multol, theta], members beyond the round too
        best_e = jax.ops.segment_min(est, gid, num_segments=c + 1)[:c]
        is_best = valid & (est <= best_e[jnp.clip(gid, 0, c - 1)])
        pos = jnp.where(is_best, jnp.arange(c), c)
        best_at = jax.ops.segment_min(pos, gid, num_segments=c + 1)[:c]
        best_v = theta[jnp.clip(best_at, 0, c - 1)]
        # Group data indexed by group number: the representative is the group's first member.
        rep_at = jax.ops.segment_min(jnp.where(starts, jnp.arange(c), c), gid, num_segments=c + 1)
        rep_at = jnp.clip(rep_at[:c], 0, c - 1)
        exists = jnp.arange(c) < jnp.sum(starts)
        multiple = size[rep_at] > 1
        # A group of copies spans an invariant subspace of T_j to within its width; a unit
        # vector in it has zero last component, so its estimate is at most multol.
        group_e = jnp.where(multiple, jnp.minimum(best_e, multol), best_e)
        # Cullum-Willoughby: numerically multiple values are good (one copy is kept); a simple
        # one is spurious if T^_j (T_j less its first row and column) shares it. A converged
        # simple value is kept whatever the test says: by Paige's theorem a small estimate
        # means an eigenvalue of A is near, and near a dense bulk in low precision the test can
        # no longer tell a good value from a ghost.
        good = exists & (multiple | ~near_hat[rep_at] | (group_e <= reach))
        slot = jnp.where(good, st.count + jnp.cumsum(good) - 1, wanted)
        if resolved:
            trusted = st.trusted
        else:
            known = jnp.concatenate([jnp.where(good, best_v, jnp.nan), st.values])
            gap = jnp.min(
                jnp.abs(best_v[:, None] - known[None, :]),
                axis=1,
                initial=jnp.inf,
                where=~jnp.isnan(known)[None, :],
            )
            before = st.count + jnp.cumsum(good) - good
            undecided = exists & ~good & (gap > multol) & (before < wanted)
            trusted = jnp.minimum(st.trusted, jnp.min(jnp.where(undecided, before, wanted)))
        # The other end may examine everything below the groups that filled slots here.
        lowest = jnp.where(slot < wanted, below[rep_at], st.claimed)
        claimed = jnp.minimum(st.claimed, jnp.min(lowest)).astype(jnp.int32)
        values = st.values.at[slot].set(best_v, mode="drop")
        estimates = st.estimates.at[slot].set(group_e, mode="drop")
        count = jnp.minimum(st.count + jnp.sum(good), wanted).astype(jnp.int32)
        next_index = jnp.minimum(floor - 1, st.next_index - c).astype(jnp.int32)
        return _End(values, estimates, count, next_index, claimed, trusted.astype(jnp.int32))

    def more(st: _End) -> jax.Array:
        return (st.count < wanted) & (st.next_index >= limit)

    init = _End(
        values=jnp.full(wanted, jnp.nan, dtype),
        estimates=jnp.full(wanted, jnp.inf, dtype),
        count=jnp.zeros((), jnp.int32),
        next_index=(j - 1).astype(jnp.int32),
        claimed=j.astype(jnp.int32),
        trusted=jnp.asarray(wanted, jnp.int32),
    )
    return jax.lax.while_loop(more, round_, init)


def _ritz(
    alphas: jax.Array,
    betas: jax.Array,
    j: jax.Array,
    which: str,
    k: int,
    copy_eps: float,
    reach_rel: jax.Array,
) -> _Ritz:
    """The wanted good Ritz values of T_j with their residual estimates (Cullum-Willoughby)."""
    dtype = alphas.dtype
    eps_t = jnp.finfo(dtype).eps
    n = alphas.shape[0]
    idx = jnp.arange(n)
    inside = idx < j
    a = jnp.where(inside, alphas, 0.0).astype(dtype)
    absb = jnp.abs(jnp.where(idx < j - 1, betas, 0.0))
    radius = absb + jnp.concatenate([jnp.zeros(1, dtype), absb[:-1]])
    lower = jnp.min(jnp.where(inside, a - radius, jnp.inf))
    upper = jnp.max(jnp.where(inside, a + radius, -jnp.inf))
    norm = jnp.maximum(jnp.abs(lower), jnp.abs(upper))
    slack = 4 * eps_t * norm + jnp.finfo(dtype).tiny
    lower, upper = lower - slack, upper + slack
    ends = _bisect(
        a, absb * absb, j, jnp.stack([jnp.zeros_like(j), jnp.maximum(j - 1, 0)]), lower, upper
    )
    scale = jnp.max(jnp.abs(ends))
    # Ghosts match T^_j to the precision of this small work (they agree to many more digits
    # than that); copies of a converged value agree only to the precision of the vectors
    # and the products (``copy_eps``).
    stol = _STOL_FACTOR * eps_t * norm
    multol = copy_eps * norm
    tols = (stol, multol, reach_rel * scale)
    low = {"LA": 0, "SA": k, "BE": k // 2, "LM": k}[which]
    high = {"LA": k, "SA": 0, "BE": k - k // 2, "LM": k}[which]
    zero = jnp.zeros((), jnp.int32)
    resolved = jnp.finfo(dtype).eps < 1e-10
    if low:
        bottom = _top_end(-a, betas, j, low, zero, tols, (-upper, -lower), resolved)
        bottom = bottom._replace(values=-bottom.values)
        # The top end stays above the groups the bottom end reported (the ends meet when j
        # is small), so that no eigenvalue of T_j is reported twice.
        top_limit = j - bottom.claimed
    else:
        top_limit = zero
    if high:
        top = _top_end(a, betas, j, high, top_limit, tols, (lower, upper), resolved)
    if which == "LA":
        values, estimates, count = top.values, top.estimates, top.count
        filled = jnp.arange(k) < count
        trusted = jnp.arange(k) < top.trusted
    elif which == "SA":
        values, estimates = bottom.values, bottom.estimates
        filled = jnp.arange(k) < bottom.count
        trusted = jnp.arange(k) < bottom.trusted
    elif which == "BE":
        # Ascending: the bottom values as found, then the top ones reversed.
        values = jnp.concatenate([bottom.values, top.values[::-1]])
        estimates = jnp.concatenate([bottom.estimates, top.estimates[::-1]])
        filled = jnp.concatenate(
            [jnp.arange(low) < bottom.count, (jnp.arange(high) < top.count)[::-1]]
        )
        trusted = jnp.concatenate(
            [jnp.arange(low) < bottom.trusted, (jnp.arange(high) < top.trusted)[::-1]]
        )
    else:  # LM: the k largest in magnitude among both ends' good values.
        both_v = jnp.concatenate([bottom.values, top.values])
        both_e = jnp.concatenate([bottom.estimates, top.estimates])
        both_f = jnp.concatenate([jnp.arange(k) < bottom.count, jnp.arange(k) < top.count])
        both_t = jnp.concatenate([jnp.arange(k) < bottom.trusted, jnp.arange(k) < top.trusted])
        order = jnp.argsort(jnp.where(both_f, -jnp.abs(both_v), jnp.inf))[:k]
        values, estimates, filled = both_v[order], both_e[order], both_f[order]
        trusted = both_t[order]
    values = jnp.where(filled, values, jnp.nan)
    estimates = jnp.where(filled, estimates, jnp.inf)
    return _Ritz(values=values, estimates=estimates, filled=filled, scale=scale, trusted=trusted)


def eigvalsh_lanczos(
    op: LinearOperator,
    key: jax.Array,
    v0: PyTree | None = None,
    tol: float | jax.Array | None = None,
    k: int = 6,
    which: str = "LA",
    max_matvecs: int = 2000,
    check_every: int = DEFAULT_CHECK_EVERY,
    loop: str = "auto",
    verify: bool = True,
) -> EigResult:
    r"""The ``k`` extreme eigenvalues of a symmetric operator by Lanczos with no stored basis.

    Runs the plain three-term recurrence (Paige's ordering, no reorthogonalization)

    .. math::
        \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},
        \qquad T_j = \operatorname{tridiag}(\beta_{1:j-1}, \alpha_{1:j}, \beta_{1:j-1}),

    holding three vectors in Krylov precision (float32 or wider; each product runs in the
    operator's own dtypes, so bfloat16 parameters stay bfloat16 in the HVP) and the scalars
    :math:`\alpha, \beta` in buffers of length ``max_matvecs``: the memory is the same for 20
    products or 20,000 (``memory_analysis()`` of a 100k-dimensional float32 operator: 5.0
    vectors of temporaries at ``max_matvecs=200``, 5.1 at 2000, the product's own included).
    Every ``check_every`` products the wanted Ritz values of :math:`T_j` are
    computed by bisection on Sturm counts (only the wanted end is examined, in rounds that skip
    over the copies of converged values) and filtered.

    Without reorthogonalization the Lanczos vectors lose orthogonality as soon as a Ritz value
    converges (Paige 1971, 1980), and :math:`T_j` grows extra eigenvalues: further copies of
    converged ones and transient "ghosts" migrating towards them. They are removed by the
    Cullum-Willoughby test: eigenvalues of :math:`T_j` equal to within ``multol`` (64 eps of the
    vectors, or 4 eps of a narrower product dtype such as bfloat16, times :math:`\|T_j\|`;
    float32 copies of one value were measured to spread over up to 23 eps in a run of 290
    products, so a narrower window reports copies as distinct values) are copies, and one is
    kept; a simple eigenvalue that is also
    an eigenvalue of :math:`\hat T_j` (:math:`T_j` less its first row and column) to within
    ``stol`` (32 eps of the tridiagonal work times :math:`\|T_j\|`) is spurious and dropped. A
    simple value whose residual estimate has converged is kept whatever the test says: by
    Paige's theorem a small estimate places an eigenvalue of ``A`` within it, while near a dense
    bulk in float32 the test alone could drop a good value. The tridiagonal work runs in float64
    whenever x64 is enabled (a few thousand scalars), which keeps ghosts (they match
    :math:`\hat T_j` to 1e-11 of :math:`\|T_j\|` or closer) apart from good values (which miss
    it by about :math:`s_{1,i}^2` times their gap, :math:`s_{1,i}` the first component of the
    eigenvector: 1e-5 of :math:`\|T_j\|` for a value 0.04 from its neighbours with
    :math:`s_{1,i} = 2 \cdot 10^{-3}`). With x64 off float32 cannot tell the two apart, so a
    simple value the test rejects before its estimate has converged is undecided, and while one
    lies at the wanted end farther than the copy tolerance ``multol`` from every good value
    (ghosts form next to converged values and end as their copies), the values past it are not
    converged and the run goes on, for at most as many products again as it took to look
    settled (a ghost can stay undecided: the 3.3M LeNet's LA(10) held one between two
    converged values until its cap of 1,200 products, against 176 without the rule). Dropping
    such values instead made 7 of 16 float32 SA(3)
    runs on a clustered negative end (four values 0.04-0.07 apart under a top end of 120) stop
    without one of them, and 1 of 3 on the 85k-parameter digits MLP of ``benchmarks/eigs.py``
    (whose three most negative eigenvalues are 3.4e-5 of :math:`\|A\|` apart: relative error
    4.2e-3, ``converged=True``); with this rule 0 of 16 and 0 of 8 did, at 225 products on
    average against 213 on the first, 432-688 against 512-624 on the second. A window of
    ``2 tol max|theta|`` plus ``multol`` instead still let 3 of 12 runs miss on a spectrum
    shaped like the MLP's.

    Convergence is judged from the Ritz residual estimates :math:`|\beta_j s_{j,i}|`
    (:math:`s_{j,i}` the last component of :math:`T_j`'s unit eigenvector, by two steps of
    inverse iteration on the tridiagonal matrix): a value is converged when its estimate is at
    most ``tol * max|theta|``, ``theta`` over all of :math:`T_j`. These are estimates, not true
    residuals: no vectors are kept, so :math:`\|A y - \theta y\|` cannot be formed, and they
    omit the rounding in the recurrence, which bounds the attainable accuracy near
    ``eps * ||A||`` of the products. A group of copies is estimated at no more than ``multol``
    (some unit vector in the copies' span has a zero last component).

    A start vector with little along an eigenvector (a warm start from an earlier eigenvector,
    or chance) can let the other values converge before that eigenvalue has a Ritz value, and
    then nothing in :math:`T_j` shows it is missing. With ``verify`` (the default) the run is
    followed by independent runs from fresh random directions until one adds no converged value
    at the wanted end: their values merge with the first run's, two values closer than the sum
    of their residual estimates plus ``multol`` counting as one eigenvalue seen twice. Each
    check may take twice the first run's products and at most ``k`` checks run, within
    ``max_matvecs`` in all; a solve costs about twice the products of a single run (SA(3) on
    the clustered end above: 438 on average against 224, and with a start poor in -11.61 the
    single run returns -11.68, -11.57, -11.51 as converged, the checked one -11.68, -11.61,
    -11.57).

    Known limit: a single start vector sees one direction per eigenspace, and without a basis
    there is nothing to deflate against, so an eigenvalue repeated exactly is reported once (as
    one converged value), and the next slots hold the next distinct values; likewise distinct
    eigenvalues closer than ``multol`` (7.6e-6 of :math:`\|A\|` in float32; copies were
    measured 23 eps apart, so the window cannot be much narrower) count as one.
    Accuracy is that of the Ritz values, about eps of the products times :math:`\|A\|`
    (:func:`~hesskit.eigsh` refines its values by Rayleigh quotients, which this mode cannot
    form), so in float32 small eigenvalues next to a large top end are accurate relative to
    :math:`\|A\|`, not to themselves. When fewer than
    ``k`` good values exist at the wanted end (an invariant subspace smaller than ``k``, or a
    budget spent before enough appear), the remaining slots hold ``NaN`` with residual ``inf``
    and ``converged=False``.

    Args:
        op: a symmetric :class:`~hesskit.LinearOperator` (its ``linearize()`` is used).
        key: PRNG key for the start vector, uniform on the unit sphere, when ``v0`` is None.
        v0: optional nonzero start vector shaped like ``op.like`` (a zero one gives ``ok=False``).
        tol: relative tolerance on the residual estimates; default
            :func:`hesskit._src.krylov.default_tol` of the least precise leaf (1e-5 float32,
            1e-10 float64, 4 eps narrower). Below that leaf's eps it cannot be met honestly:
            the run stops at eps and reports ``status=PRECISION_FLOOR``.
        k: number of eigenvalues, ``1 <= k < dim``.
        which: ``"LA"`` (largest, descending), ``"SA"`` (smallest, ascending), ``"BE"``
            (``k // 2`` from the bottom and the rest from the top, ascending) or ``"LM"``
            (largest magnitude, descending by magnitude).
        max_matvecs: the budget of products (static; the length of the scalar buffers).
        check_every: products between two Ritz analyses (static). A run overshoots its
            stopping point by about ``check_every / 2`` products, and a check costs (measured
            on 2 busy CPU cores) 3-6 ms for SA(3) at 100-600 steps and 11-30 ms for LA(10)
            (whose top end piles up copies), against 2.8 ms per product of the 85k-parameter
            benchmark MLP; on that MLP single runs of SA(3) took 600 / 624 / 672 products at 8 /
            16 / 32.
            The default 16 keeps checks near 10% of the products' time there and negligible
            for models whose product costs more than a check, where overshoot dominates.
        loop: ``"auto"``, ``"compiled"`` or ``"host"``, as in :func:`~hesskit.eigsh`: ``"host"``
            dispatches one jitted step per product and one jitted analysis per check from
            Python, since XLA:CPU runs convolutions inside ``while`` loops many times slower
            (jax-ml/jax#12868); ``"auto"`` picks it on CPU outside traced code for such
            products, and the single compiled loop otherwise.
        verify: follow a converged run by independent checking runs (see above); ``False``
            returns the single run's values, at about half the products.

    Returns:
        An :class:`~hesskit._src.thick_restart.EigResult` with ``eigenvectors=None``,
        ``residuals`` the estimates above, ``num_restarts=0``, and ``status`` (when the result
        has that field): ``CONVERGED``; ``MAX_MATVECS`` when the budget ran out (in the first
        run; a check cut short by the budget keeps the values found, converged), or when the
        Krylov space became invariant (``beta ~ 0``) with fewer than ``k`` converged values,
        since more products could not add any; ``NONFINITE`` (with ``ok=False``) after a NaN or
        Inf; ``PRECISION_FLOOR`` when ``tol`` is below the products' eps.

    Raises:
        ValueError: ``k``, ``which``, ``max_matvecs``, ``check_every`` or ``tol`` out of range,
            ``v0`` not shaped like the operator's vectors, or ``loop="host"`` inside traced
            code.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from hesskit import LinearOperator
        >>> d = jnp.linspace(-1.0, 10.0, 200)
        >>> op = LinearOperator(lambda v: d * v, jnp.zeros(200))
        >>> res = eigvalsh_lanczos(op, jax.random.key(0), k=2, which="BE")
        >>> [round(float(x), 4) for x in res.eigenvalues], bool(res.converged.all())
        ([-1.0, 10.0], True)
        >>> res.eigenvectors is None
        True

    References:
        Paige, *The computation of eigenvalues and eigenvectors of very large sparse
        matrices*, PhD thesis, University of London, 1971.

        Paige, *Accuracy and effectiveness of the Lanczos algorithm for the symmetric
        eigenproblem*, Linear Algebra Appl. 34, 1980.

        Cullum and Willoughby, *Lanczos Algorithms for Large Symmetric Eigenvalue
        Computations*, Vol. 1: Theory, Birkhauser, 1985.
    """
    dim = op.dim
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < dim:
        msg = f"k must be an int with 1 <= k < dim = {dim}, got {k!r}."
        raise ValueError(msg)
    krylov.check_devices(op)
    validation.check_one_of(which, "which", WHICH)
    max_matvecs = validation.check_positive_int(max_matvecs, "max_matvecs", minimum=2)
    check_every = validation.check_positive_int(check_every, "check_every")
    if tol is None:
        tol = krylov.default_tol(op.like)
    validation.check_positive(tol, "tol")
    if v0 is not None:
        validation.check_like(v0, op.like, name="v0", like_name="the operator's vectors")
    tol = jnp.asarray(tol, krylov.krylov_dtype(op.like))
    cfg = _config(op, k, which, max_matvecs, check_every, verify)
    if krylov.resolve_loop(loop, op, key, v0) == "compiled":
        return _eigvalsh_compiled(op, key, v0, tol, cfg)
    return _eigvalsh_host(op, key, v0, tol, cfg)


def _tridiagonal_dtype(dtype: Any) -> jnp.dtype:
    # The tridiagonal work is a few thousand scalars: do it in float64 whenever JAX allows
    # (x64 on), so that the ghost test resolves separations far below the vectors' eps.
    return jnp.promote_types(dtype, jax.dtypes.canonicalize_dtype(jnp.float64))


def _precision_floor(like: PyTree) -> float:
    # A product computed in the least precise leaf's dtype errs by about eps * ||A||, so no
    # tolerance below that eps is met by the true residual, whatever the estimates say.
    leaves = jax.tree_util.tree_leaves(like)
    return max(float(jnp.finfo(jnp.result_type(x)).eps) for x in leaves)


class _Config(NamedTuple):
    k: int
    which: str
    n: int  # max_matvecs: the length of the scalar buffers
    check_every: int
    copy_eps: float
    floor: float
    verify: bool


class _State(NamedTuple):
    q_prev: PyTree
    q: PyTree
    alphas: jax.Array
    betas: jax.Array
    steps: jax.Array
    scale: jax.Array
    ok: jax.Array
    breakdown: jax.Array
    ritz: _Ritz
    done: jax.Array
    limit: jax.Array  # the products this run may take (the rest of the budget)
    settled_at: jax.Array  # products when all slots first looked converged, undecided aside


def _config(
    op: LinearOperator, k: int, which: str, max_matvecs: int, check_every: int, verify: bool
):
    eps = jnp.finfo(krylov.krylov_dtype(op.like)).eps
    floor = _precision_floor(op.like)
    # Copies of one eigenvalue: 64 eps of the vectors (measured spread of 30 float32 copies:
    # 8 eps ||A||), or 4 eps of a narrower product dtype (bfloat16 copies spread by about
    # 0.15 of its eps), the default tolerance there.
    copy_eps = max(_MULTOL_FACTOR * float(eps), 4 * floor)
    return _Config(int(k), which, max_matvecs, check_every, copy_eps, floor, verify)


def _random_start(op: LinearOperator, key: jax.Array) -> PyTree:
    return tree_random_sphere(key, krylov.krylov_like(krylov.vector_like(op)))


def _empty_ritz(cfg: _Config, tdtype: Any) -> _Ritz:
    return _Ritz(
        values=jnp.full(cfg.k, jnp.nan, tdtype),
        estimates=jnp.full(cfg.k, jnp.inf, tdtype),
        filled=jnp.zeros(cfg.k, bool),
        scale=jnp.zeros((), tdtype),
        trusted=jnp.ones(cfg.k, bool),
    )


def _init(op: LinearOperator, start: PyTree, cfg: _Config, limit: jax.Array) -> _State:
    dtype = krylov.krylov_dtype(op.like)
    tdtype = _tridiagonal_dtype(dtype)
    q0, norm0 = tree_normalize(krylov.to_krylov(start))
    empty = _empty_ritz(cfg, tdtype)
    return _State(
        q_prev=jax.tree_util.tree_map(jnp.zeros_like, q0),
        q=q0,
        alphas=jnp.zeros(cfg.n, tdtype),
        betas=jnp.zeros(cfg.n, tdtype),
        steps=jnp.zeros((), jnp.int32),
        scale=jnp.zeros((), tdtype),
        ok=jnp.isfinite(norm0) & (norm0 > 0),
        breakdown=jnp.asarray(False),
        ritz=empty,
        done=jnp.asarray(False),
        limit=jnp.asarray(limit, jnp.int32),
        settled_at=jnp.asarray(-1, jnp.int32),
    )


def _step(op: LinearOperator, st: _State) -> _State:
    """One product of the three-term recurrence (``op`` already linearized)."""
    dtype = krylov.krylov_dtype(op.like)
    tdtype = st.alphas.dtype
    eps = jnp.finfo(dtype).eps
    j = st.steps
    beta_prev = jnp.where(j > 0, st.betas[jnp.maximum(j - 1, 0)], 0.0).astype(dtype)
    w = krylov.product(op)(st.q)
    # Paige's ordering (A2): subtract the previous vector before taking alpha, the
    # variant whose loss of orthogonality his analysis bounds.
    w = jax.tree_util.tree_map(lambda x, p: x - (beta_prev * p).astype(x.dtype), w, st.q_prev)
    alpha = tree_vdot(st.q, w)
    w = jax.tree_util.tree_map(lambda x, q: x - (alpha * q).astype(x.dtype), w, st.q)
    w, beta = tree_normalize(w)
    finite = jnp.isfinite(alpha) & jnp.isfinite(beta)
    scale = jnp.maximum(st.scale, (jnp.abs(alpha) + beta + beta_prev).astype(tdtype))
    # An invariant subspace: the Ritz values of T_j are exact eigenvalues, and the next
    # vector would be rounding noise that (with no basis to orthogonalize against)
    # could only repeat them.
    breakdown = beta <= 32 * eps * scale
    return st._replace(
        q_prev=st.q,
        q=w,
        alphas=st.alphas.at[j].set(alpha.astype(tdtype)),
        betas=st.betas.at[j].set(jnp.where(breakdown, 0.0, beta).astype(tdtype)),
        steps=j + 1,
        scale=scale,
        ok=st.ok & finite,
        breakdown=breakdown,
    )


def _active(st: _State, stop: jax.Array) -> jax.Array:
    return (st.steps < stop) & st.ok & ~st.breakdown


def _analyse(st: _State, tol: jax.Array, cfg: _Config) -> _State:
    reach_rel = jnp.maximum(tol, cfg.floor).astype(st.alphas.dtype)
    ritz = _ritz(st.alphas, st.betas, st.steps, cfg.which, cfg.k, cfg.copy_eps, reach_rel)
    reach = reach_rel * ritz.scale
    looks = jnp.all(ritz.filled & (ritz.estimates <= reach))
    settled_at = jnp.where(looks & (st.settled_at < 0), st.steps, st.settled_at)
    # An undecided value holds the run open for as many products again as it took to look
    # settled: a good value with a small first component converges within that (0.05x more
    # on the clustered ends measured), while a ghost that stays undecided (the 3.3M LeNet's
    # LA(10) kept one between two converged values for 1,000 products) is then let go.
    released = looks & (settled_at >= 0) & (st.steps >= 2 * settled_at)
    ritz = ritz._replace(trusted=ritz.trusted | released)
    settled = jnp.all(ritz.filled & (ritz.estimates <= reach) & ritz.trusted)
    done = settled | (st.steps >= st.limit) | st.breakdown | ~st.ok
    return st._replace(ritz=ritz, done=done, settled_at=settled_at.astype(jnp.int32))


def _usable(ritz: _Ritz, tol: jax.Array, cfg: _Config) -> jax.Array:
    reach = jnp.maximum(tol, cfg.floor).astype(ritz.scale.dtype) * ritz.scale
    return ritz.filled & (ritz.estimates <= reach) & ritz.trusted


def _merge_end(old, new, new_ok, copy_tol, order_key):
    """The most wanted of ``old``'s values and ``new``'s converged ones that ``old`` lacks."""
    (old_v, old_e, old_f), (new_v, new_e) = old, new
    count = old_v.shape[0]
    sep = new_e[:, None] + old_e[None, :] + copy_tol
    same = jnp.abs(new_v[:, None] - old_v[None, :]) <= sep
    fresh = new_ok & ~jnp.any(same & old_f[None, :], axis=1)
    v = jnp.concatenate([old_v, new_v])
    e = jnp.concatenate([old_e, new_e])
    f = jnp.concatenate([old_f, fresh])
    order = jnp.argsort(jnp.where(f, order_key(v), jnp.inf))[:count]
    from_new = order >= count
    v, e, f = v[order], e[order], f[order]
    v = jnp.where(f, v, jnp.nan)
    e = jnp.where(f, e, jnp.inf)
    return v, e, f, jnp.any(f & from_new)


def _merge(old: _Ritz, new: _Ritz, tol: jax.Array, cfg: _Config) -> tuple[_Ritz, jax.Array]:
    """Adds to ``old`` the converged values of an independent run that it missed.

    Two values closer than the sum of their residual estimates plus the copy tolerance are one
    eigenvalue seen twice (each lies within its estimate of it, and copies within the copy
    tolerance); any other converged value of ``new`` at the wanted end is an eigenvalue ``old``
    did not see. Returns the merged values and whether any of them came from ``new``.
    """
    scale = jnp.maximum(old.scale, new.scale)
    sep = cfg.copy_eps * scale
    new_ok = _usable(new._replace(scale=scale), tol, cfg)

    def end(sl, order_key):
        old_end = (old.values[sl], old.estimates[sl], old.filled[sl])
        return _merge_end(old_end, (new.values[sl], new.estimates[sl]), new_ok[sl], sep, order_key)

    whole = slice(None)
    if cfg.which == "LA":
        pieces = [end(whole, lambda v: -v)]
    elif cfg.which == "SA":
        pieces = [end(whole, lambda v: v)]
    elif cfg.which == "LM":
        pieces = [end(whole, lambda v: -jnp.abs(v))]
    else:  # BE: the bottom values ascending, then the top ones ascending (most extreme last).
        low = cfg.k // 2
        v, e, f, changed = end(slice(low, None), lambda v: -v)  # most extreme first
        pieces = [(v[::-1], e[::-1], f[::-1], changed)]
        if low:
            pieces.insert(0, end(slice(0, low), lambda v: v))
    values, estimates, filled = (jnp.concatenate([p[i] for p in pieces]) for i in range(3))
    changed = jnp.any(jnp.stack([p[3] for p in pieces]))
    merged = _Ritz(
        values=values,
        estimates=estimates,
        filled=filled,
        scale=scale,
        trusted=jnp.ones_like(filled),
    )
    return merged, changed


def _finish(ritz: _Ritz, ok: jax.Array, steps: jax.Array, tol: jax.Array, cfg: _Config):
    dtype = tol.dtype
    ok = ok & jnp.all(jnp.where(ritz.filled, jnp.isfinite(ritz.values), True))
    reachable = tol >= cfg.floor
    converged = ritz.filled & (ritz.estimates <= tol * ritz.scale) & reachable & ok & ritz.trusted
    floored = ritz.filled & (ritz.estimates <= cfg.floor * ritz.scale) & ritz.trusted
    status = jnp.where(
        ~ok,
        krylov.NONFINITE,
        jnp.where(
            jnp.all(converged),
            krylov.CONVERGED,
            jnp.where(~reachable & jnp.all(floored), krylov.PRECISION_FLOOR, krylov.MAX_MATVECS),
        ),
    ).astype(jnp.int32)
    return _make_result(
        eigenvalues=ritz.values.astype(dtype),
        eigenvectors=None,
        residuals=ritz.estimates.astype(dtype),
        converged=converged,
        num_matvecs=jnp.asarray(steps, jnp.int32),
        num_restarts=jnp.zeros((), jnp.int32),
        ok=ok,
        status=status,
    )


class _Rounds(NamedTuple):
    ritz: _Ritz  # the values found so far, merged over the runs
    used: jax.Array  # products taken by all runs
    first: jax.Array  # products of the first run
    ok: jax.Array
    again: jax.Array  # the last run was the first, or added a value: run another
    round: jax.Array


def _run_limit(rnd, used, first, cfg: _Config, xp: Any = jnp):
    # The first run may take the whole budget; a checking run twice the first run's products
    # (a start vector poor in the missed direction is not what it needs), never more than the
    # budget left. ``xp=np`` for the host loop's Python ints.
    return xp.where(rnd == 0, cfg.n, xp.minimum(cfg.n - used, 2 * first))


def _more_rounds(rounds: _Rounds, cfg: _Config) -> jax.Array:
    limit = rounds.round == 0 if not cfg.verify else rounds.round <= cfg.k
    return rounds.again & rounds.ok & (rounds.used < cfg.n) & limit


def _next_round(rounds: _Rounds, run: _State, tol: jax.Array, cfg: _Config) -> _Rounds:
    first = rounds.round == 0
    merged, changed = _merge(rounds.ritz, run.ritz, tol, cfg)
    ok = rounds.ok & run.ok
    # A NaN in a checking run leaves the values found so far, with ok=False.
    ritz = jax.tree_util.tree_map(
        lambda a, b, c: jnp.where(first, a, jnp.where(run.ok, b, c)), run.ritz, merged, rounds.ritz
    )
    again = jnp.where(first, jnp.all(_usable(run.ritz, tol, cfg)), changed)
    return _Rounds(
        ritz=ritz,
        used=rounds.used + run.steps,
        first=jnp.where(first, run.steps, rounds.first),
        ok=ok,
        again=again,
        round=rounds.round + 1,
    )


def _no_rounds(op: LinearOperator, cfg: _Config) -> _Rounds:
    tdtype = _tridiagonal_dtype(krylov.krylov_dtype(op.like))
    zero = jnp.zeros((), jnp.int32)
    return _Rounds(
        ritz=_empty_ritz(cfg, tdtype),
        used=zero,
        first=zero,
        ok=jnp.asarray(True),
        again=jnp.asarray(True),
        round=zero,
    )


def _round_start(op: LinearOperator, key: jax.Array, v0: PyTree | None, r: jax.Array):
    # The first run starts from v0 (or from ``key``, as a single run would); each checking
    # run from its own independent random direction.
    fresh = _random_start(op, jax.random.fold_in(key, r))
    if v0 is None:
        return jax.lax.cond(r == 0, lambda: _random_start(op, key), lambda: fresh)
    return optax.tree_utils.tree_where(r == 0, v0, fresh)


@functools.partial(jax.jit, static_argnums=4)
def _eigvalsh_compiled(op, key, v0, tol, cfg: _Config) -> EigResult:
    op = op.linearize()

    def cycle(st: _State) -> _State:
        stop = jnp.minimum(st.steps + cfg.check_every, st.limit)
        st = jax.lax.while_loop(lambda s: _active(s, stop), lambda s: _step(op, s), st)
        return _analyse(st, tol, cfg)

    def one_round(rounds: _Rounds) -> _Rounds:
        limit = _run_limit(rounds.round, rounds.used, rounds.first, cfg)
        st = _init(op, _round_start(op, key, v0, rounds.round), cfg, limit)
        run = jax.lax.while_loop(lambda s: ~s.done, cycle, st)
        return _next_round(rounds, run, tol, cfg)

    rounds = jax.lax.while_loop(lambda r: _more_rounds(r, cfg), one_round, _no_rounds(op, cfg))
    return _finish(rounds.ritz, rounds.ok, rounds.used, tol, cfg)


# The host loop's pieces: each compiles once per operator structure and configuration. The
# state is donated, so a step updates the three vectors in place.
_init_jit = jax.jit(_init, static_argnums=2)
_analyse_jit = jax.jit(_analyse, static_argnums=2, donate_argnums=0)
_finish_jit = jax.jit(_finish, static_argnums=4)
_round_start_jit = jax.jit(_round_start)
_next_round_jit = jax.jit(_next_round, static_argnums=3)


@functools.partial(jax.jit, donate_argnums=1)
def _host_step(op: LinearOperator, st: _State, stop: jax.Array) -> _State:
    # After a breakdown or a NaN the compiled loop stops stepping; here the check comes only
    # at the end of a cycle, so the step keeps the state as it was instead.
    new = _step(op, st)
    keep = _active(st, stop)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, st)


def _eigvalsh_host(op, key, v0, tol, cfg: _Config) -> EigResult:
    lin = krylov.linearized(op)
    rounds = _no_rounds(op, cfg)
    used, first = 0, 0
    while bool(jax.device_get(_more_rounds(rounds, cfg))):
        r = int(rounds.round)
        limit = int(_run_limit(r, used, first, cfg, xp=np))
        start = _round_start_jit(op, key, v0, jnp.asarray(r, jnp.int32))
        st = _init_jit(op, start, cfg, jnp.asarray(limit, jnp.int32))
        steps = 0
        while True:
            stop = min(steps + cfg.check_every, limit)
            stop_arr = jnp.asarray(stop, jnp.int32)
            for _ in range(stop - steps):
                st = _host_step(lin, st, stop_arr)
            st = _analyse_jit(st, tol, cfg)
            done, steps = jax.device_get((st.done, st.steps))
            steps = int(steps)
            if bool(done):
                break
        rounds = _next_round_jit(rounds, st, tol, cfg)
        used, first = used + steps, first if r else steps
    return _finish_jit(rounds.ritz, rounds.ok, rounds.used, tol, cfg)
