r"""Adam's preconditioner against diagonal curvature: per-layer correlations and ratios.

Adam divides each coordinate by :math:`\sqrt{\hat v_t} + \epsilon`, with :math:`v_t` a running
mean of squared minibatch gradients, which is often read as a diagonal curvature estimate
(":math:`v_t \approx \operatorname{diag}(H)`", seed paper 002, section 6).
:func:`preconditioner_agreement` compares :math:`\sqrt{v_t}` leaf by leaf (or layer by layer)
with diagonals of curvature matrices given as pytrees (e.g. :math:`|\operatorname{diag} H|` from
:func:`hesskit.diagonal` on a Hessian operator, the GGN diagonal from the same on
:func:`hesskit.ggn_operator`, and the empirical Fisher diagonal from
:func:`empirical_fisher_diagonal`); :func:`adam_hessian_agreement` forms the three at a point
and compares them with the :math:`v_t` it finds in an optax state (:func:`adam_second_moment`).

Why these measures. Both sides span many decades, so agreement is measured on logs or ranks:
the Spearman rank correlation and the Pearson correlation of :math:`\log_{10}` values (both
unchanged by a per-layer scale and by a power: :math:`\sqrt v` and :math:`v` correlate alike
with a diagonal), the median :math:`\log_{10}` ratio (the scale), its median absolute deviation
(the scale-free disagreement, in decades, left after the best single scale per layer), and the
reduced-major-axis slope of :math:`\log\sqrt v` on :math:`\log|d|` (1: :math:`\sqrt v \propto
|d|`; 1/2: :math:`v \propto |d|`). Hutchinson diagonals are noisy (entry :math:`i` has variance
:math:`\sum_{l\ne i} H_{il}^2/n`), which lowers every correlation with them; given two
independent estimates, the correlation of one with the other (``reliability``) is the ceiling
against which a correlation with :math:`\sqrt v` should be read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "PreconditionerAgreement",
    "adam_hessian_agreement",
    "adam_second_moment",
    "empirical_fisher_diagonal",
    "preconditioner_agreement",
]

REFERENCES = ("|diag H|", "diag GGN", "empirical Fisher")


class PreconditionerAgreement(NamedTuple):
    r"""Per-group agreement of ``sqrt(nu)`` with each reference diagonal.

    A group is one leaf by default, or the leaves of one layer (``groups=``). Every
    per-group field is ``{reference: array (n_groups,)}``.

    Attributes:
        names: group names (leaf paths, ``jax.tree_util.keystr``, by default), in leaf order.
        sizes: number of entries per group.
        spearman: rank correlation of ``sqrt(nu)`` with the reference's absolute value over
            all the group's entries (``nan`` for a group of one entry or constant values).
        log_ratio: median of ``log10(sqrt(nu) / |reference|)`` over the entries where both
            are positive: the typical scale mismatch (0 means the same scale).
        overall_spearman: ``{reference: float}``, the rank correlation over all entries.
        pearson_log: Pearson correlation of ``log10 sqrt(nu)`` with ``log10 |reference|``
            over the entries where both are positive.
        spread: median absolute deviation of ``log10(sqrt(nu) / |reference|)`` about
            ``log_ratio``, in decades: the disagreement no per-group scale removes.
        log_slope: reduced-major-axis slope of ``log10 sqrt(nu)`` on ``log10 |reference|``
            (the sign of ``pearson_log`` times the ratio of their standard deviations): 1
            when ``sqrt(nu)`` is proportional to the reference, 0.5 when ``nu`` is.
        num_used: entries where both are positive (those the log measures use).
        reliability: Pearson correlation of the logs of two independent estimates of the
            reference (``replicates=``), ``nan`` for references given without them.
        overall_pearson_log: ``{reference: float}``, ``pearson_log`` over all entries.
        ceiling: :math:`\sqrt{2R/(1+R)}` for a positive ``reliability`` :math:`R`: the
            largest ``pearson_log`` any quantity with independent noise can reach against the
            mean of the two estimates (Spearman-Brown for the doubled probe count; the square
            root because a correlation with the truth is bounded by that of the estimate with
            it); ``nan`` without replicates.
    """

    names: list[str]
    sizes: list[int]
    spearman: dict[str, np.ndarray]
    log_ratio: dict[str, np.ndarray]
    overall_spearman: dict[str, float]
    pearson_log: dict[str, np.ndarray] | None = None
    spread: dict[str, np.ndarray] | None = None
    log_slope: dict[str, np.ndarray] | None = None
    num_used: dict[str, np.ndarray] | None = None
    reliability: dict[str, np.ndarray] | None = None
    overall_pearson_log: dict[str, float] | None = None
    ceiling: dict[str, np.ndarray] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain Python (lists and floats; ``nan`` stays ``nan``)."""
        out: dict[str, Any] = {"names": list(self.names), "sizes": [int(s) for s in self.sizes]}
        for field in self._fields[2:]:
            value = getattr(self, field)
            if value is not None:
                out[field] = {
                    k: (float(v) if np.ndim(v) == 0 else np.asarray(v, float).tolist())
                    for k, v in value.items()
                }
        return out


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(x.shape[0])
    r[order] = np.arange(x.shape[0])
    # Ties get their mean rank, so constant blocks do not fake a correlation.
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[0] < 2:
        return float("nan")
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return float("nan")
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[0] < 2:
        return float("nan")
    return _pearson(_ranks(a), _ranks(b))


def _log_measures(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float, int]:
    """Pearson of logs, median log ratio, its MAD and the RMA slope over positive pairs."""
    ok = (a > 0) & (b > 0) & np.isfinite(a) & np.isfinite(b)
    la, lb = np.log10(a[ok]), np.log10(b[ok])
    n = int(ok.sum())
    if n == 0:
        return (float("nan"),) * 4 + (0,)
    r = np.log10(a[ok] / b[ok])
    med = float(np.median(r))
    rho = _pearson(la, lb)
    slope = float(np.sign(rho) * la.std() / lb.std()) if np.isfinite(rho) else float("nan")
    return rho, med, float(np.median(np.abs(r - med))), slope, n


def _flat_abs(tree: PyTree) -> list[np.ndarray]:
    return [np.abs(np.asarray(x, np.float64).ravel()) for x in jax.tree_util.tree_leaves(tree)]


def _module_path(key: tuple) -> tuple:
    """A leaf's layer: its path without the trailing attributes (nnx's ``.value``) and name."""
    while key and isinstance(key[-1], jax.tree_util.GetAttrKey):
        key = key[:-1]
    # A kernel and its bias share the layer; a top-level leaf is its own layer.
    return key[:-1] if len(key) > 1 else key


def _group_index(paths: list[str], keys: list[tuple], groups: Any) -> tuple[list[str], list[int]]:
    """Group names in first-seen order and each leaf's group number."""
    if groups is None or groups == "leaf":
        labels = paths
    elif groups == "module":
        labels = [jax.tree_util.keystr(_module_path(k)) for k in keys]
    elif callable(groups):
        labels = [str(groups(p)) for p in paths]
    else:
        msg = f"groups must be None, 'leaf', 'module' or a callable, got {groups!r}."
        raise ValueError(msg)
    names = list(dict.fromkeys(labels))
    return names, [names.index(lab) for lab in labels]


def preconditioner_agreement(
    nu: PyTree,
    references: dict[str, PyTree],
    *,
    replicates: dict[str, tuple[PyTree, PyTree]] | None = None,
    groups: str | Callable[[str], str] | None = None,
) -> PreconditionerAgreement:
    r"""Compare Adam's :math:`\sqrt{v_t}` with diagonal curvature estimates, group by group.

    For each group of entries (a leaf, or a layer) and reference diagonal :math:`d`: the
    Spearman rank correlation of :math:`\sqrt{v}` with :math:`|d|` and the Pearson correlation
    of their :math:`\log_{10}` (does Adam rank the coordinates as the curvature does?), the
    median :math:`\log_{10}(\sqrt{v}/|d|)` (how far apart are the scales?), its median
    absolute deviation (scale-free disagreement, decades) and the log-log slope. Runs on the
    host (NumPy, float64).

    Args:
        nu: Adam's second-moment pytree (:func:`adam_second_moment`), shaped like the
            parameters.
        references: name to diagonal pytree with ``nu``'s structure, e.g.
            ``{"|diag H|": ..., "diag GGN": ..., "empirical Fisher": ...}``.
        replicates: optional name to two independent estimates of that reference (e.g.
            Hutchinson diagonals from disjoint probes), for the ``reliability`` field.
        groups: ``None`` or ``"leaf"`` (one group per leaf), ``"module"`` (leaves that share
            their path up to the last key, e.g. a layer's kernel and bias), or a function of
            the leaf path string returning its group name.

    Returns:
        A :class:`PreconditionerAgreement`.

    Raises:
        ValueError: a reference or replicate whose structure or shapes differ from ``nu``'s,
            no references, or an unknown ``groups``.

    Examples:
        >>> import jax.numpy as jnp
        >>> nu = {"w": jnp.array([1.0, 4.0, 9.0])}
        >>> res = preconditioner_agreement(nu, {"h": {"w": jnp.array([1.0, 2.0, 3.0])}})
        >>> float(res.spearman["h"][0]), float(res.log_ratio["h"][0])
        (1.0, 0.0)
        >>> round(float(res.pearson_log["h"][0]), 9), round(float(res.log_slope["h"][0]), 9)
        (1.0, 1.0)
    """
    if not references:
        msg = "references must name at least one diagonal."
        raise ValueError(msg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nu)
    keys = [p for p, _ in flat]
    paths = [jax.tree_util.keystr(p) for p in keys]
    shapes = [np.shape(x) for _, x in flat]
    names, gid = _group_index(paths, keys, groups)
    gid_arr = np.asarray(gid)

    def grouped(leaves: list[np.ndarray]) -> list[np.ndarray]:
        return [
            np.concatenate([x for x, g in zip(leaves, gid, strict=True) if g == i])
            for i in range(len(names))
        ]

    def check(tree: PyTree, what: str) -> list[np.ndarray]:
        leaves, rdef = jax.tree_util.tree_flatten(tree)
        if rdef != treedef or [np.shape(x) for x in leaves] != shapes:
            msg = f"{what} must have nu's pytree structure and leaf shapes."
            raise ValueError(msg)
        return _flat_abs(tree)

    roots_leaf = [np.sqrt(np.maximum(np.asarray(x, np.float64).ravel(), 0)) for _, x in flat]
    roots = grouped(roots_leaf)
    all_roots = np.concatenate(roots_leaf)
    fields: dict[str, dict] = {
        f: {}
        for f in ("spearman", "log_ratio", "overall_spearman", "pearson_log", "spread")
        + ("log_slope", "num_used", "reliability", "overall_pearson_log", "ceiling")
    }
    replicates = replicates or {}
    for key, ref in references.items():
        refs_leaf = check(ref, f"reference {key!r}")
        refs = grouped(refs_leaf)
        per = [_log_measures(a, b) for a, b in zip(roots, refs, strict=True)]
        fields["spearman"][key] = np.array(
            [_spearman(a, b) for a, b in zip(roots, refs, strict=True)]
        )
        for j, f in enumerate(("pearson_log", "log_ratio", "spread", "log_slope")):
            fields[f][key] = np.array([m[j] for m in per])
        fields["num_used"][key] = np.array([m[4] for m in per])
        all_refs = np.concatenate(refs_leaf)
        fields["overall_spearman"][key] = _spearman(all_roots, all_refs)
        fields["overall_pearson_log"][key] = _log_measures(all_roots, all_refs)[0]
        rel = np.full(len(names), np.nan)
        if key in replicates:
            first, second = replicates[key]
            pa = grouped(check(first, f"replicate of {key!r}"))
            pb = grouped(check(second, f"replicate of {key!r}"))
            rel = np.array([_log_measures(a, b)[0] for a, b in zip(pa, pb, strict=True)])
        fields["reliability"][key] = rel
        with np.errstate(invalid="ignore"):
            fields["ceiling"][key] = np.where(rel > 0, np.sqrt(2 * rel / (1 + rel)), np.nan)
    sizes = [
        int(np.sum([np.prod(shapes[i], dtype=int) for i in np.flatnonzero(gid_arr == g)]))
        for g in range(len(names))
    ]
    return PreconditionerAgreement(names=names, sizes=sizes, **fields)


def adam_second_moment(opt_state: Any, *, b2: float | None = 0.999) -> PyTree:
    r"""Adam's second moment :math:`\hat v_t` from an optax state, bias-corrected.

    Finds the one ``optax.ScaleByAdamState`` anywhere in ``opt_state`` (a chain,
    ``inject_hyperparams``, ``MultiSteps``, ...) and returns its ``nu`` divided by
    :math:`1 - \beta_2^t` (``t`` its ``count``), the :math:`\hat v_t` Adam's update divides by.
    The correction is one scalar, so it moves the ratios, not the correlations.

    Args:
        opt_state: an optax optimizer state (a pytree).
        b2: Adam's :math:`\beta_2` for the bias correction; ``None`` returns ``nu`` as stored.
            The ``b2`` of an ``inject_hyperparams`` state (anywhere in ``opt_state``) is used
            when there is one.

    Returns:
        The pytree :math:`\hat v_t`, shaped like the parameters.

    Raises:
        ValueError: no ``ScaleByAdamState`` in ``opt_state`` (RMSProp, SGD, ...), more than
            one, or one that has taken no step.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
        >>> p = {"w": jnp.ones(2)}
        >>> _, s = opt.update({"w": jnp.array([0.1, -0.2])}, opt.init(p), p)
        >>> [round(float(v), 6) for v in adam_second_moment(s)["w"]]  # g**2 after one step
        [0.01, 0.04]
    """
    import optax

    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    if len(found) != 1:
        kinds = sorted(
            {
                type(x).__name__
                for x in jax.tree_util.tree_leaves(
                    opt_state, is_leaf=lambda x: isinstance(x, tuple) and hasattr(x, "_fields")
                )
                if hasattr(x, "_fields")
            }
        )
        what = "no optax.ScaleByAdamState" if not found else f"{len(found)} ScaleByAdamStates"
        msg = (
            f"opt_state holds {what} (states found: {', '.join(kinds) or 'none'}); pass the "
            "state of an optimizer with exactly one Adam transform (optax.adam, adamw, "
            "scale_by_adam)."
        )
        raise ValueError(msg)
    (adam,) = found
    # inject_hyperparams keeps Adam's b2 in the state (possibly inside a chain): it is the
    # value the update used, so it wins over the argument.
    has_hyper = lambda x: isinstance(getattr(x, "hyperparams", None), dict)  # noqa: E731
    hypers = [
        x.hyperparams["b2"]
        for x in jax.tree_util.tree_leaves(opt_state, is_leaf=has_hyper)
        if has_hyper(x) and "b2" in x.hyperparams
    ]
    if b2 is not None and len(hypers) == 1:
        b2 = float(hypers[0])
    nu = adam.nu
    if b2 is None:
        return nu
    count = int(adam.count)
    if count < 1:
        msg = "the Adam state has taken no step yet (count = 0): its nu is zero."
        raise ValueError(msg)
    correction = 1.0 - float(b2) ** count
    return jax.tree_util.tree_map(lambda v: v / jnp.asarray(correction, v.dtype), nu)


def empirical_fisher_diagonal(
    loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, data: Any, *, chunk_size: int = 64
) -> PyTree:
    r"""The empirical Fisher diagonal :math:`\frac1n \sum_i g_i \odot g_i` of per-example gradients.

    Args:
        loss_fn: ``loss_fn(params, batch)``, a mean loss over a batch whose leaves have a
            leading example axis.
        params: the point.
        data: the examples (a pytree of arrays with a leading axis ``n``).
        chunk_size: examples whose gradients are formed together (one vmap), ``>= 1``.

    Returns:
        A pytree shaped like ``params``.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = lambda w, b: jnp.mean((b @ w) ** 2)
        >>> d = empirical_fisher_diagonal(f, jnp.array([1.0, 0.0]), jnp.eye(2))
        >>> [float(v) for v in d]  # per-example gradients (2, 0) and (0, 0)
        [2.0, 0.0]
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        msg = f"chunk_size must be a positive int, got {chunk_size!r}."
        raise ValueError(msg)
    n = int(jax.tree_util.tree_leaves(data)[0].shape[0])
    total = None
    for s in range(0, n, chunk_size):
        part = _fisher_chunk_sum(
            loss_fn, params, jax.tree_util.tree_map(lambda a, s=s: a[s : s + chunk_size], data)
        )
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
    return jax.tree_util.tree_map(lambda x: x / n, total)


# Module level with the loss static: jit's cache then reuses one compilation per loss function
# across calls (a new jitted closure per call would recompile at every checkpoint of a run).
@functools.partial(jax.jit, static_argnums=0)
def _fisher_chunk_sum(loss_fn, p, batch):
    one = lambda ex: jax.grad(loss_fn)(p, jax.tree_util.tree_map(lambda a: a[None], ex))  # noqa: E731
    g = jax.vmap(one)(batch)
    return jax.tree_util.tree_map(lambda x: jnp.sum(x * x, axis=0), g)


def adam_hessian_agreement(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    opt_state: Any,
    data: Any,
    key: jax.Array,
    *,
    model_fn: Callable[[PyTree, Any], PyTree] | None = None,
    output_loss_fn: Callable[[PyTree, Any], jax.Array] | None = None,
    num_probes: int = 100,
    b2: float | None = 0.999,
    groups: str | Callable[[str], str] | None = None,
    batch_size: int | None = None,
    chunk_size: int = 64,
    probe_chunk: int = 25,
) -> PreconditionerAgreement:
    r"""Adam's :math:`\sqrt{\hat v_t}` against the Hessian, GGN and empirical Fisher diagonals.

    At ``params``: :math:`|\operatorname{diag} H|` of ``loss_fn(params, data)`` and the GGN
    diagonal of ``output_loss_fn(model_fn(params, data), data)`` by Hutchinson
    (:func:`hesskit.diagonal`, ``num_probes`` products each, run as two independent halves
    whose agreement is the ``reliability``), the empirical Fisher diagonal
    (:func:`empirical_fisher_diagonal`), and :func:`preconditioner_agreement` of each with the
    :math:`\hat v_t` of ``opt_state`` (:func:`adam_second_moment`). Call it at checkpoints
    along training (the operators take the data as leaves, so the Hutchinson solves compile
    once for a given loss and data shape).

    Args:
        loss_fn: ``loss_fn(params, batch)``, the mean loss over a batch.
        params: the point (the parameters Adam's state belongs to).
        opt_state: the optax state holding one ``ScaleByAdamState``.
        data: the batch the curvature is measured on (leading example axis).
        key: PRNG key for the Hutchinson probes.
        model_fn: ``model_fn(params, batch) -> outputs``, for the GGN (skipped when ``None``).
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar``, for the GGN.
        num_probes: Hutchinson products per diagonal (even, ``>= 2``).
        b2: Adam's :math:`\beta_2`, for the bias correction (:func:`adam_second_moment`).
        groups: as in :func:`preconditioner_agreement`.
        batch_size: Adam's minibatch size ``B``; when given, adds the reference
            ``"sqrt E[g_B^2]"``, the root of the expected squared minibatch gradient at this
            point, :math:`g^2 + (F_e - g^2)\,(n - B) / (B (n - 1))` for batches of ``B``
            distinct examples out of ``n`` (:math:`g` the full gradient, :math:`F_e` the
            empirical Fisher diagonal): what :math:`\sqrt{\hat v_t}` would equal if the
            gradients had stayed as they are now over Adam's averaging window.
        chunk_size: examples per vmap in the empirical Fisher.
        probe_chunk: probes per batched product in the Hutchinson diagonals.

    Returns:
        A :class:`PreconditionerAgreement` with references ``"|diag H|"``, ``"diag GGN"``
        (when ``model_fn`` is given), ``"empirical Fisher"`` and ``"sqrt E[g_B^2]"`` (when
        ``batch_size`` is given).

    Raises:
        ValueError: ``opt_state`` without an Adam state, ``num_probes`` odd or below 2, or
            only one of ``model_fn`` and ``output_loss_fn``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> x = jax.random.normal(jax.random.key(0), (32, 3))
        >>> loss = lambda p, b: jnp.mean((b @ p["w"]) ** 2)
        >>> p, opt = {"w": jnp.ones(3)}, optax.adam(1e-2)
        >>> _, s = opt.update(jax.grad(loss)(p, x), opt.init(p), p)
        >>> res = adam_hessian_agreement(loss, p, s, x, jax.random.key(1), num_probes=8)
        >>> sorted(res.spearman)
        ['empirical Fisher', '|diag H|']
    """
    if (
        isinstance(num_probes, bool)
        or not isinstance(num_probes, int)
        or num_probes < 2
        or num_probes % 2
    ):
        msg = f"num_probes must be an even int >= 2 (two independent halves), got {num_probes!r}."
        raise ValueError(msg)
    if (model_fn is None) != (output_loss_fn is None):
        msg = "model_fn and output_loss_fn go together (both for the GGN, or neither)."
        raise ValueError(msg)
    if batch_size is not None:
        n = int(jax.tree_util.tree_leaves(data)[0].shape[0])
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or not 1 <= batch_size <= n
        ):
            msg = (
                f"batch_size must be an int in [1, {n}] (the examples in data), got {batch_size!r}."
            )
            raise ValueError(msg)
    nu = adam_second_moment(opt_state, b2=b2)
    refs, reps = _reference_diagonals(
        loss_fn, params, data, key, model_fn, output_loss_fn, num_probes, batch_size,
        chunk_size, probe_chunk,
    )  # fmt: skip
    return preconditioner_agreement(nu, refs, replicates=reps, groups=groups)


@functools.partial(jax.jit, static_argnums=0)
def _full_grad(loss_fn, params, data):
    return jax.grad(loss_fn)(params, data)


def _reference_diagonals(
    loss_fn, params, data, key, model_fn, output_loss_fn, num_probes, batch_size, chunk_size,
    probe_chunk,
) -> tuple[dict[str, PyTree], dict[str, tuple[PyTree, PyTree]]]:  # fmt: skip
    """The reference diagonals of :func:`adam_hessian_agreement` and the Hutchinson halves."""
    from hesskit._src.operators import ggn_operator, hessian_operator
    from hesskit._src.stochastic import diagonal

    half = num_probes // 2
    ops = {"|diag H|": hessian_operator(loss_fn, params, data)}
    if model_fn is not None:
        ops["diag GGN"] = ggn_operator(model_fn, output_loss_fn, params, data)
    refs, reps = {}, {}
    for i, (name, op) in enumerate(ops.items()):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        chunk = min(probe_chunk, half)
        d1 = diagonal(op, k1, num_probes=half, chunk_size=chunk)
        d2 = diagonal(op, k2, num_probes=half, chunk_size=chunk)
        refs[name] = jax.tree_util.tree_map(lambda a, b: 0.5 * (a + b), d1, d2)
        reps[name] = (d1, d2)
    fisher = empirical_fisher_diagonal(loss_fn, params, data, chunk_size=chunk_size)
    refs["empirical Fisher"] = fisher
    if batch_size is not None:
        n = int(jax.tree_util.tree_leaves(data)[0].shape[0])
        g = _full_grad(loss_fn, params, data)
        # The variance of a mean of B distinct examples out of n, without replacement.
        shrink = (n - batch_size) / (batch_size * max(n - 1, 1))
        refs["sqrt E[g_B^2]"] = jax.tree_util.tree_map(
            lambda gi, fi: jnp.sqrt(jnp.maximum(gi * gi + (fi - gi * gi) * shrink, 0)), g, fisher
        )
    return refs, reps
