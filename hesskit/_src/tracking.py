"""Follow the extreme eigenpairs of the Hessian during training, with warm starts."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src import validation
from hesskit._src.compare import eigenvector_overlaps
from hesskit._src.operators import LinearOperator, hessian_operator
from hesskit._src.thick_restart import EigResult, eigsh
from hesskit._src.tree import tree_random_sphere

PyTree = Any

__all__ = ["TrackRecord", "Tracker", "match_pairs"]

_MODES = ("BE", "LA", "SA", "LA+SA")


class TrackRecord(NamedTuple):
    r"""The extreme eigenpairs at one training step, matched to the previous record.

    Pairs are ordered bottom first, then top: the ``k_bottom`` smallest eigenvalues ascending
    (most negative first), then the ``k_top`` largest descending (largest first). Host-side
    fields are NumPy arrays.

    Attributes:
        step: the training step given to :meth:`Tracker.update`.
        eigenvalues: shape ``(k,)``, NumPy.
        eigenvectors: a pytree (device arrays) with a leading axis ``k``, or ``None`` once a
            newer record exists and the tracker was built with ``keep_eigenvectors=False``.
        residuals: :math:`\lVert Hv - \lambda v \rVert` per pair, NumPy ``(k,)``.
        converged: per pair, NumPy bool ``(k,)``.
        num_matvecs: Hessian-vector products spent at this step (all eigensolver runs).
        matched_to_previous: for each pair, the index of the previous record's pair with the
            largest :math:`|v_i^\top v^{\text{prev}}_j|` (greedy one-to-one matching), or ``-1``
            (first record, or no previous pair left).
        angles_to_previous: :math:`\arccos |v_i^\top v^{\text{prev}}_j|` for the matched pair,
            radians (``nan`` when unmatched).
        zero_crossings: the eigenvalue strictly changed sign against its matched predecessor.
        loss: the loss given to :meth:`Tracker.update` (``None`` if not given).
    """

    step: int
    eigenvalues: np.ndarray
    eigenvectors: PyTree | None
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    matched_to_previous: np.ndarray
    angles_to_previous: np.ndarray
    zero_crossings: np.ndarray
    loss: float | None


def match_pairs(overlaps: Any) -> np.ndarray:
    """Greedy one-to-one matching of new pairs to previous ones by largest ``|overlap|``.

    Repeatedly takes the largest remaining entry of ``|overlaps|`` and removes its row and
    column. Unlike an independent ``argmax`` per row, no previous pair is used twice; unlike
    the optimal assignment it needs no solver, and for nearly orthonormal sets (large overlaps
    are then unique per row and column) it gives the same answer.

    Args:
        overlaps: ``(k_new, k_prev)`` inner products (signs are ignored).

    Returns:
        ``(k_new,)`` integer indices into the previous pairs, ``-1`` where none is left.

    Examples:
        >>> match_pairs([[0.1, 0.99], [0.98, 0.2]]).tolist()
        [1, 0]
    """
    o = np.abs(np.asarray(overlaps, dtype=float))
    if o.ndim != 2:
        msg = f"overlaps must be a 2-d array, got shape {o.shape}."
        raise ValueError(msg)
    o = np.where(np.isfinite(o), o, -1.0)
    match = -np.ones(o.shape[0], dtype=int)
    for _ in range(min(o.shape)):
        i, j = np.unravel_index(np.argmax(o), o.shape)
        if o[i, j] < 0:
            break
        match[i] = j
        o[i, :] = -np.inf
        o[:, j] = -np.inf
    return match


def _sum_vectors(vectors: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), vectors)


def _concat(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y]), a, b)


def _take(vectors: PyTree, idx: np.ndarray) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[idx], vectors)


class Tracker:
    r"""Track the extreme Hessian eigenpairs between training steps, warm-starting each solve.

    Call :meth:`update` every few training steps (outside ``jit``) with the loss and the data
    as separate arguments, ``update(step, loss_fn, key, params=params, args=(batch,))``, or an
    operator built that way, ``hessian_operator(loss_fn, params, batch)``: the data are then
    leaves of the operator and each solve is compiled once, at the first update, and reused
    at every later checkpoint and batch of the same shapes (cold and warm starts alike). An
    operator made from a new closure per checkpoint, ``hessian_operator(lambda p: loss_fn(p,
    batch), params)``, still works but recompiles every solve. Each call runs
    :func:`hesskit.eigsh`,
    starting from the sum of the previous eigenvectors of the same end of the spectrum: while
    the Hessian changes slowly the new eigenvectors lie close to the span of the old ones and
    the solve converges in fewer products. New pairs are matched to the previous ones by the
    largest :math:`|v_i^\top v^{\text{prev}}_j|` (:func:`match_pairs`, on the host), which gives
    the rotation angle of each direction and flags eigenvalues that changed sign.

    Args:
        k: number of pairs. For ``which="BE"`` one run returns ``k // 2`` from the bottom and
            the rest from the top; ``"LA"``/``"SA"`` track one end; for ``"LA+SA"`` two runs
            are made, ``k`` pairs at each end, or ``k=(k_top, k_bottom)``.
        which: ``"BE"``, ``"LA"``, ``"SA"`` or ``"LA+SA"``.
        tol: the eigensolver's relative tolerance (default by dtype).
        max_matvecs: the eigensolver's budget per run.
        krylov_dim: the eigensolver's basis size.
        warm_start: start each solve from the previous eigenvectors (default ``True``).
        keep_eigenvectors: keep every record's eigenvectors in :attr:`history` (memory
            ``T * k * dim``); by default only the latest record keeps them.

    Attributes:
        history: the list of :class:`TrackRecord`, oldest first.
        k_top: number of top pairs per record.
        k_bottom: number of bottom pairs per record.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> def loss_fn(p, d):  # one function for every checkpoint: compiled once
        ...     return 0.5 * jnp.sum(d * p**2)
        >>> tracker = Tracker(k=2, which="BE")
        >>> for t in range(3):
        ...     d = jnp.linspace(-1.0, 2.0 + t, 30)   # the "batch" of this checkpoint
        ...     rec = tracker.update(t, loss_fn, jax.random.key(t), params=jnp.zeros(30),
        ...                          args=(d,))
        >>> steps, top, bottom, loss = tracker.as_arrays()
        >>> top[:, 0].round(3).tolist(), bottom[:, 0].round(3).tolist()
        ([2.0, 3.0, 4.0], [-1.0, -1.0, -1.0])
    """

    def __init__(
        self,
        k: int | tuple[int, int] = 5,
        which: str = "BE",
        *,
        tol: float | None = None,
        max_matvecs: int | None = None,
        krylov_dim: int | None = None,
        warm_start: bool = True,
        keep_eigenvectors: bool = False,
    ):
        validation.check_one_of(which, "which", _MODES)
        if isinstance(k, tuple):
            if which != "LA+SA" or len(k) != 2:
                msg = f"k=(k_top, k_bottom) is only valid with which='LA+SA', got k={k!r}."
                raise ValueError(msg)
            k_top = validation.check_positive_int(k[0], "k[0] (k_top)")
            k_bottom = validation.check_positive_int(k[1], "k[1] (k_bottom)")
        else:
            k = validation.check_positive_int(k, "k")
            if which == "BE":
                k_bottom, k_top = k // 2, k - k // 2
            elif which == "LA":
                k_top, k_bottom = k, 0
            elif which == "SA":
                k_top, k_bottom = 0, k
            else:
                k_top = k_bottom = k
        if tol is not None:
            validation.check_positive(tol, "tol")
        self.which = which
        self.k_top = k_top
        self.k_bottom = k_bottom
        self.tol = tol
        self.max_matvecs = max_matvecs
        self.krylov_dim = krylov_dim
        self.warm_start = bool(warm_start)
        self.keep_eigenvectors = bool(keep_eigenvectors)
        self.history: list[TrackRecord] = []
        self._prev_vectors: PyTree | None = None
        self._prev_values: np.ndarray | None = None
        self._like: Any = None

    @property
    def k(self) -> int:
        """Total number of pairs per record."""
        return self.k_top + self.k_bottom

    def _solve(self, op, key, k, which, v0) -> EigResult:
        return eigsh(
            op,
            key,
            k,
            which=which,
            tol=self.tol,
            max_matvecs=self.max_matvecs,
            krylov_dim=self.krylov_dim,
            v0=v0,
        )

    def _run(self, op: LinearOperator, key: jax.Array):
        """All eigensolver runs, returning values, vectors, residuals, converged, matvecs."""
        prev = self._prev_vectors if self.warm_start else None
        kb = self.k_bottom
        # Cold starts get an explicit random start vector too: ``v0=None`` and a pytree ``v0``
        # are different jit signatures, and the first warm update would compile eigsh again.
        key, k_cold = jax.random.split(key)
        cold = tree_random_sphere(k_cold, op.like)
        if self.which in ("BE", "LA", "SA"):
            v0 = cold if prev is None else _sum_vectors(prev)
            res = self._solve(op, key, self.k, self.which, v0)
            if self.which == "BE":
                # eigsh returns BE ascending: keep the bottom ascending, flip the top.
                order = np.concatenate([np.arange(kb), np.arange(self.k - 1, kb - 1, -1)])
                # _replace keeps any further diagnostic fields of EigResult as they are.
                res = res._replace(
                    eigenvalues=res.eigenvalues[order],
                    eigenvectors=_take(res.eigenvectors, order),
                    residuals=res.residuals[order],
                    converged=res.converged[order],
                )
            return (
                res.eigenvalues,
                res.eigenvectors,
                res.residuals,
                res.converged,
                int(res.num_matvecs),
            )
        key_top, key_bottom = jax.random.split(key)
        v0_top = v0_bottom = cold
        if prev is not None:
            v0_bottom = _sum_vectors(_take(prev, np.arange(kb)))
            v0_top = _sum_vectors(_take(prev, np.arange(kb, self.k)))
        bottom = self._solve(op, key_bottom, kb, "SA", v0_bottom)
        top = self._solve(op, key_top, self.k_top, "LA", v0_top)
        return (
            jnp.concatenate([bottom.eigenvalues, top.eigenvalues]),
            _concat(bottom.eigenvectors, top.eigenvectors),
            jnp.concatenate([bottom.residuals, top.residuals]),
            jnp.concatenate([bottom.converged, top.converged]),
            int(bottom.num_matvecs) + int(top.num_matvecs),
        )

    def update(
        self,
        step: int,
        op: LinearOperator | Any,
        key: jax.Array,
        loss: Any = None,
        *,
        params: PyTree = None,
        args: tuple = (),
    ) -> TrackRecord:
        """Compute the extreme pairs at a training step and match them to the last record's.

        Args:
            step: the training step (stored as given, used as the x-axis of the tracks).
            op: the loss function ``op(params, *args) -> scalar`` (with ``params=`` and
                ``args=``; its Hessian at ``params`` is tracked), or an operator such as
                ``hesskit.hessian_operator(loss_fn, params, batch)`` or
                ``hesskit.mean_hessian_operator(loss_fn, params, data, chunk_size=...)``; the
                same vector structure, shapes and dtypes at every update. Pass the same
                function object each time so that the solves compile once.
            key: PRNG key for the eigensolver's start vector (used for cold starts and random
                restarts).
            loss: optional loss value to store with the record.
            params: the parameters, when ``op`` is a loss function.
            args: the data arguments of the loss function (a tuple), when ``op`` is one.

        Returns:
            The new :class:`TrackRecord` (also appended to :attr:`history`).

        Raises:
            TypeError: ``op`` is neither a :class:`~hesskit.LinearOperator` nor a loss
                function given with ``params``; or ``params``/``args`` given with an operator.
            ValueError: the vectors differ from the previous update's, or ``k`` is too large
                for their dimension.
        """
        if not isinstance(op, LinearOperator):
            if not callable(op) or params is None:
                msg = (
                    "op must be a hesskit LinearOperator or a loss function given with params= "
                    f"(and args=), got {type(op).__name__}"
                    + ("" if params is not None or not callable(op) else " without params")
                    + "."
                )
                raise TypeError(msg)
            if not isinstance(args, tuple):
                msg = f"args must be a tuple of data arguments, got {type(args).__name__}."
                raise TypeError(msg)
            op = hessian_operator(op, params, *args)
        elif params is not None or args:
            msg = (
                "params= and args= go with a loss function; an operator already holds them "
                "(op.with_args(*args) binds new data)."
            )
            raise TypeError(msg)
        if self._like is not None:
            validation.check_like(
                op.like, self._like, name="op.like", like_name="the previous operator's vectors"
            )
        if self.k >= op.dim:
            msg = f"the tracker's k = {self.k} pairs must be below the operator's dim = {op.dim}."
            raise ValueError(msg)
        values, vectors, residuals, converged, matvecs = self._run(op, key)
        values = np.asarray(values)
        k = values.shape[0]
        if self._prev_vectors is None:
            match = -np.ones(k, dtype=int)
            angles = np.full(k, np.nan)
            crossings = np.zeros(k, dtype=bool)
        else:
            overlaps = np.abs(np.asarray(eigenvector_overlaps(vectors, self._prev_vectors)))
            match = match_pairs(overlaps)
            has = match >= 0
            safe = np.where(has, match, 0)
            best = overlaps[np.arange(k), safe]
            angles = np.where(has, np.arccos(np.clip(best, 0.0, 1.0)), np.nan)
            crossings = has & (values * self._prev_values[safe] < 0)
        if self.history and not self.keep_eigenvectors:
            self.history[-1] = self.history[-1]._replace(eigenvectors=None)
        record = TrackRecord(
            step=step,
            eigenvalues=values,
            eigenvectors=vectors,
            residuals=np.asarray(residuals),
            converged=np.asarray(converged),
            num_matvecs=matvecs,
            matched_to_previous=match,
            angles_to_previous=angles,
            zero_crossings=crossings,
            loss=None if loss is None else float(np.asarray(loss)),
        )
        self.history.append(record)
        self._prev_vectors = vectors
        self._prev_values = values
        self._like = op.like
        return record

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, Any]:
        """The history as arrays for :func:`hesskit.plots.plot_eigenvalue_tracks`.

        Columns are by rank (largest first for ``top``, most negative first for ``bottom``),
        not by matched identity.

        Returns:
            ``(steps, top, bottom, loss)``: ``steps`` of shape ``(T,)``, ``top`` ``(T, k_top)``
            (``None`` when no top pairs are tracked), ``bottom`` ``(T, k_bottom)`` (or
            ``None``), and ``loss`` ``(T,)`` with ``nan`` where no loss was given (``None`` if
            none was ever given).

        Raises:
            ValueError: the history is empty.
        """
        if not self.history:
            msg = "the tracker has no records yet; call update() first."
            raise ValueError(msg)
        steps = np.asarray([r.step for r in self.history])
        values = np.stack([r.eigenvalues for r in self.history])
        kb = self.k_bottom
        bottom = values[:, :kb] if kb else None
        top = values[:, kb:] if self.k_top else None
        losses = [r.loss for r in self.history]
        loss = None
        if any(x is not None for x in losses):
            loss = np.asarray([np.nan if x is None else x for x in losses], dtype=float)
        return steps, top, bottom, loss
