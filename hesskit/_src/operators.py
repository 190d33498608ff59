"""Curvature operators: Hessian-vector products and symmetric linear operators on pytrees.

The exact Hessian-vector product is forward-over-reverse (``jvp`` of ``grad``): one forward and
one backward pass carrying tangents, about twice the cost of a gradient. Operators built here are
pytrees whose array data (the parameters and the data arguments: ``hessian_operator(f, params,
*args)`` calls ``f(params, *args)``) are leaves and whose functions are static, so one operator
type passed to a jitted function compiles once and is reused for new parameters and new batches
of the same shapes.

For repeated products at one point, :meth:`LinearOperator.linearize` runs the forward and
backward pass once (``jax.linearize`` of the gradient) and keeps the residuals, so each further
product pays only for the tangent pass. hesskit's solvers call it at the start of their compiled
loops; ``benchmarks/hvp.py`` measures both strategies side by side.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from hesskit._src import krylov, validation
from hesskit._src.tree import tree_axpy, tree_dim, tree_norm

PyTree = Any

__all__ = [
    "LinearOperator",
    "fd_hvp",
    "ggn_operator",
    "hessian_operator",
    "hvp",
    "mean_hessian_operator",
    "restrict",
    "tree_mask_embed",
    "tree_mask_select",
]


def _as_struct(like: PyTree) -> PyTree:
    def to_struct(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    return jax.tree_util.tree_map(to_struct, like)


@jax.tree_util.register_pytree_node_class
class LinearOperator:
    r"""A symmetric linear operator :math:`v \mapsto (A + \sigma I) v` on pytrees.

    The operator is a pytree: a ``matvec`` given as a :class:`jax.tree_util.Partial` keeps its
    arrays as leaves (so a jitted function taking the operator compiles once per operator type
    and shape, not once per parameter value); any other callable is kept as static data and its
    captured arrays become compile-time constants. The shift :math:`\sigma` (damping) is a leaf,
    so changing it does not recompile.

    Args:
        matvec: a function ``v -> A v`` from a pytree shaped like ``like`` to one of the same
            structure, shapes and dtypes. ``A`` must be symmetric; hesskit's solvers rely on it.
        like: a pytree of arrays (or :class:`jax.ShapeDtypeStruct`) giving the structure,
            shapes and dtypes of the vectors. Plain arrays are valid pytrees.
        shift: the scalar :math:`\sigma` added to the diagonal.

    Examples:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
        >>> op = LinearOperator(lambda v: A @ v, jnp.zeros(2))
        >>> op(jnp.array([1.0, 0.0])).tolist()
        [2.0, 1.0]
        >>> op.shifted(1.0).to_dense().tolist()
        [[3.0, 1.0], [1.0, 4.0]]
    """

    def __init__(self, matvec: Callable[[PyTree], PyTree], like: PyTree, *, shift: Any = 0.0):
        if not callable(matvec):
            msg = f"matvec must be callable, got {type(matvec).__name__}."
            raise TypeError(msg)
        self._matvec = matvec
        self.like = _as_struct(like)
        self.shift = shift

    # -- pytree protocol ---------------------------------------------------------------------
    def tree_flatten(self):  # noqa: D102
        like_leaves, like_def = jax.tree_util.tree_flatten(self.like)
        static = (like_def, tuple(like_leaves))
        if isinstance(self._matvec, Partial):
            return (self._matvec, self.shift), (None, static)
        return (self.shift,), (self._matvec, static)

    @classmethod
    def tree_unflatten(cls, aux, children):  # noqa: D102
        static_matvec, (like_def, like_leaves) = aux
        obj = object.__new__(cls)
        if static_matvec is None:
            obj._matvec, obj.shift = children
        else:
            obj._matvec = static_matvec
            (obj.shift,) = children
        obj.like = jax.tree_util.tree_unflatten(like_def, list(like_leaves))
        return obj

    # -- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Total number of scalars in a vector (static)."""
        return tree_dim(self.like)

    @property
    def dtype(self) -> jnp.dtype:
        """The common floating dtype of the vectors' leaves."""
        return jnp.result_type(*[leaf.dtype for leaf in jax.tree_util.tree_leaves(self.like)])

    @property
    def matvec_fn(self) -> Callable[[PyTree], PyTree]:
        """The unshifted matvec ``v -> A v``."""
        return self._matvec

    @property
    def mode(self) -> str | None:
        """How products are differentiated (``"fwd-rev"``, ``"rev-rev"``, ``"fd"``), or None.

        ``"auto"`` is resolved when the operator is built, so this is the mode actually used;
        ``None`` for operators built from a plain matvec.
        """
        m = self._matvec
        if isinstance(m, Partial):
            mode = getattr(m.func, "mode", None)
            if isinstance(mode, str):
                return mode
            inner = m.keywords.get("op")
            if isinstance(inner, LinearOperator):
                return inner.mode
        return None

    # -- application --------------------------------------------------------------------------
    def matvec(self, v: PyTree) -> PyTree:
        r"""Apply the operator: :math:`(A + \sigma I) v`, checking ``v`` against ``like``."""
        validation.check_like(v, self.like, name="v", like_name="the operator's vectors")
        unshifted = isinstance(self.shift, int | float) and self.shift == 0.0
        if isinstance(self._matvec, Partial) and not _any_tracer((v, self._matvec, self.shift)):
            # Called eagerly: one compiled product per operator type and shapes instead of an
            # op-by-op jvp of grad (40-120x slower); the arrays are Partial leaves, so new
            # parameters or data of the same shapes reuse the executable.
            if unshifted:
                return _apply_jit(self._matvec, v)
            return _apply_shifted_jit(self._matvec, self.shift, v)
        out = self._matvec(v)
        if unshifted:
            return out
        return tree_axpy(self.shift, v, out)

    __call__ = matvec

    def matmat(self, vs: PyTree) -> PyTree:
        """Apply the operator to ``k`` vectors stacked along a leading axis (one ``vmap``)."""
        return jax.vmap(self.matvec)(vs)

    def shifted(self, sigma: Any) -> LinearOperator:
        r"""The operator :math:`A + (\sigma_{\text{old}} + \sigma) I`."""
        return self.__replace__(shift=self.shift + sigma)

    def __add__(self, sigma: Any) -> LinearOperator:
        if isinstance(sigma, LinearOperator):
            return NotImplemented
        return self.shifted(sigma)

    def __sub__(self, sigma: Any) -> LinearOperator:
        if isinstance(sigma, LinearOperator):
            return NotImplemented
        return self.shifted(-sigma)

    def __replace__(self, **changes: Any) -> LinearOperator:
        obj = object.__new__(type(self))
        obj._matvec = changes.get("matvec", self._matvec)
        obj.like = self.like
        obj.shift = changes.get("shift", self.shift)
        return obj

    def linearize(self) -> LinearOperator:
        """An equal operator that reuses the work that does not depend on the vector.

        For Hessian and GGN operators this runs the forward and backward pass once
        (``jax.linearize``) and keeps the residuals; each later product then pays only for the
        tangent pass. Other operators are returned unchanged. Call it inside a jitted function
        that applies the operator many times (hesskit's solvers do). For Hessian and GGN
        operators the result is a pytree too (``jax.linearize`` returns a
        :class:`~jax.tree_util.Partial` of its residuals), but a large one: pass the original
        operator, not the linearized one, across ``jit`` boundaries.
        """
        kernel = self._matvec.func if isinstance(self._matvec, Partial) else None
        if kernel is None or not hasattr(kernel, "linearize"):
            return self
        lin = kernel.linearize(*self._matvec.args, **self._matvec.keywords)
        return self.__replace__(matvec=lin)

    @property
    def args(self) -> tuple:
        """The data arguments bound to the operator (``()`` when it has none)."""
        m = self._matvec
        if isinstance(m, Partial):
            if "args" in m.keywords:
                return tuple(m.keywords["args"])
            inner = m.keywords.get("op")
            if isinstance(inner, LinearOperator):
                return inner.args
        return ()

    def aux(self) -> Any:
        """The auxiliary output of a ``has_aux=True`` loss at the operator's point and data.

        For ``hessian_operator(f, params, *args, has_aux=True)`` this is ``f(params, *args)[1]``
        (new BatchNorm statistics, logits, metrics), computed by one forward pass, compiled once
        per operator type when called eagerly. Products never compute it.

        Raises:
            TypeError: the operator was not built with ``has_aux=True``.

        Examples:
            >>> import jax.numpy as jnp
            >>> f = lambda p, x: (jnp.sum((p * x) ** 2), {"mean": jnp.mean(p * x)})
            >>> op = hessian_operator(f, jnp.ones(2), jnp.array([1.0, 3.0]), has_aux=True)
            >>> float(op.aux()["mean"]), op(jnp.ones(2)).tolist()
            (2.0, [2.0, 18.0])
        """
        m = self._matvec
        if isinstance(m, Partial):
            if getattr(m.func, "has_aux", False):
                if _any_tracer(m):
                    return m.func.aux(**m.keywords)
                return _aux_jit(m)
            inner = m.keywords.get("op")
            if isinstance(inner, LinearOperator):
                return inner.aux()
        msg = (
            "this operator's loss has no auxiliary output; build it with "
            "hessian_operator(f, params, *args, has_aux=True) where f returns (loss, aux)."
        )
        raise TypeError(msg)

    def with_args(self, *args: Any) -> LinearOperator:
        """The same operator (same function, parameters and shift) on new data arguments.

        The new arguments must have the structure, shapes and dtypes of the bound ones
        (:attr:`args`), which is what lets every compiled solver be reused; the check runs
        here, eagerly (also on tracers inside ``jit``), and names the first leaf that differs.
        For data of another shape build a new operator (``hessian_operator(f, params,
        *new_args)``): it is valid, and compiles its solvers once for the new shapes.

        Args:
            *args: the new data arguments, in the order the operator was built with (for
                :func:`mean_hessian_operator`: ``data, *args``).

        Returns:
            A :class:`LinearOperator` of the same type and treedef.

        Raises:
            TypeError: the operator has no data arguments (a plain matvec).
            ValueError: the number, structure, shapes or dtypes of ``args`` differ.

        Examples:
            >>> import jax.numpy as jnp
            >>> op = hessian_operator(lambda p, x: jnp.sum(x * p**2), jnp.ones(2), jnp.ones(2))
            >>> op.with_args(jnp.array([1.0, 3.0]))(jnp.ones(2)).tolist()
            [2.0, 6.0]
        """
        m = self._matvec
        if isinstance(m, Partial) and "args" in m.keywords and (m.keywords["args"] or not args):
            args = tuple(args)
            validation.check_args(args, tuple(m.keywords["args"]))
            new = Partial(m.func, *m.args, **{**m.keywords, "args": args})
            return self.__replace__(matvec=new)
        inner = m.keywords.get("op") if isinstance(m, Partial) else None
        if isinstance(inner, LinearOperator):
            new = Partial(m.func, *m.args, **{**m.keywords, "op": inner.with_args(*args)})
            return self.__replace__(matvec=new)
        msg = (
            "this operator has no data arguments to replace; build it with the data as "
            "arguments, e.g. hessian_operator(f, params, *args) with f(params, *args)."
        )
        raise TypeError(msg)

    def to_dense(self) -> jax.Array:
        """Materialize the ``dim x dim`` matrix (columns ``A e_j`` raveled); small problems only."""
        from jax.flatten_util import ravel_pytree

        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self.like)
        _, unravel = ravel_pytree(zeros)
        eye = jnp.eye(self.dim, dtype=self.dtype)

        def column(e: jax.Array) -> jax.Array:
            return ravel_pytree(self.matvec(unravel(e)))[0]

        return jax.vmap(column, out_axes=1)(eye)

    def __repr__(self) -> str:
        mode = self.mode
        extra = f", mode={mode!r}" if mode is not None else ""
        return f"LinearOperator(dim={self.dim}, dtype={self.dtype}, shift={self.shift!r}{extra})"


# -- Hessian-vector products --------------------------------------------------------------------
def _any_tracer(tree: PyTree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@jax.jit
def _apply_jit(matvec: Partial, v: PyTree) -> PyTree:
    return matvec(v)


@jax.jit
def _apply_shifted_jit(matvec: Partial, shift: Any, v: PyTree) -> PyTree:
    return tree_axpy(shift, v, matvec(v))


@jax.jit
def _aux_jit(matvec: Partial) -> Any:
    return matvec.func.aux(**matvec.keywords)


def _validate_f_params(f: Callable, params: PyTree, *args: Any, name: str = "f", **kw) -> None:
    validation.check_float_params(params)
    validation.check_scalar_fn(f, params, *args, name=name, **kw)


MODES = ("auto", "fwd-rev", "rev-rev", "fd")

# Resolved "auto" modes, per function and per argument shapes: probing traces the product once,
# and repeating that for every operator built on the same loss would retrace it each time.
_MODE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _struct_key(tree: PyTree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(jnp.shape(x)), getattr(x, "dtype", None)) for x in leaves)


def _custom_vjp_names(fn: Callable, *primals: Any) -> list[str]:
    # custom_vjp calls keep their function's source location in the debug info of their jaxpr.
    names: list[str] = []

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "custom_vjp_call":
                info = getattr(eqn.params["call_jaxpr"].jaxpr, "debug_info", None)
                names.append(getattr(info, "func_src_info", None) or "a custom_vjp function")
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    try:
        walk(jax.make_jaxpr(fn)(*primals).jaxpr)
    except Exception:  # noqa: BLE001 - naming is best effort; the caller raises anyway
        pass
    return names


def _has_custom_lin(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_lin":
            return True
        if any(_has_custom_lin(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)):
            return True
    return False


def _forward_error(fwd_fn: Callable, primals: tuple) -> str | None:
    """The error forward mode raises on ``fwd_fn(*primals)``, or None when it works.

    JAX raises "can't apply forward-mode autodiff (jvp) to a custom_vjp function" only when the
    tangent of a custom_vjp (a ``custom_lin`` equation of the traced product) survives dead-code
    elimination, i.e. while lowering, not while tracing. Tracing the product on abstract
    arguments costs about half of lowering it (40 against 80 ms for the digits MLP and CNN), so
    the probe traces, and lowers only when a ``custom_lin`` appears: the rare custom_vjp loss
    pays the lowering, which then tells whether that tangent is really needed.
    """
    structs = _as_struct(primals)
    try:
        jaxpr = jax.make_jaxpr(fwd_fn)(*structs).jaxpr
        if not _has_custom_lin(jaxpr):
            return None
        jax.jit(fwd_fn).lower(*structs)
    except (TypeError, NotImplementedError) as err:
        # The message only: an exception would keep its traceback's frames alive in the cache.
        return f"{type(err).__name__}: {err}"
    return None


def _fwd_rev_probe(loss: Callable) -> Callable:
    return lambda p, v, args: jax.jvp(jax.grad(lambda q: loss(q, *args)), (p,), (v,))[1]


def _ggn_probe(model_fn: Callable, output_loss_fn: Callable) -> Callable:
    def probe(p, v, args):
        out, jv = jax.jvp(lambda q: model_fn(q, *args), (p,), (v,))
        return jax.jvp(jax.grad(lambda o: output_loss_fn(o, *args)), (out,), (jv,))[1]

    return probe


def _resolve_mode(
    mode: str,
    owner: Callable,
    key: tuple,
    probe: Callable,
    params: PyTree,
    args: tuple,
    name_fn: Callable | None = None,
) -> str:
    """``"auto"`` becomes ``"fwd-rev"`` or ``"rev-rev"``; a forced ``"fwd-rev"`` is checked."""
    validation.check_one_of(mode, "mode", MODES)
    if mode in ("rev-rev", "fd"):
        return mode
    cache_key = (key, _struct_key((params, args)))
    try:
        table = _MODE_CACHE.setdefault(owner, {})
    except TypeError:
        table = {}
    if cache_key not in table:
        table[cache_key] = _forward_error(probe, (params, params, args))
    err = table[cache_key]
    if err is None:
        return "fwd-rev"
    if mode == "auto":
        return "rev-rev"
    names = name_fn() if name_fn is not None else []
    where = f" (custom_vjp: {', '.join(sorted(set(names)))})" if names else ""
    msg = (
        f"mode='fwd-rev' needs forward-mode autodiff (jvp) of the gradient, which JAX cannot "
        f"apply to this function{where}: {err} Use mode='rev-rev' (reverse-over-reverse, "
        "exact) or mode='auto', which picks it when forward mode fails."
    )
    raise TypeError(msg)


def _rev_rev(grad_fn: Callable, params: PyTree, v: PyTree) -> PyTree:
    # The Hessian is symmetric, so the vjp of the gradient (H^T v) is the product H v.
    return jax.vjp(grad_fn, params)[1](v)[0]


def _fd_step(params: PyTree, v: PyTree, eps: Any) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    vnorm = tree_norm(v)
    if eps is None:
        cbrt_eps = float(np.cbrt(np.finfo(dtype).eps))
        safe = jnp.where(vnorm > 0, vnorm, 1.0)
        h = cbrt_eps * (1.0 + tree_norm(params)) / safe
    else:
        h = jnp.asarray(eps, dtype)
    return h, jnp.where(vnorm > 0, 0.5 / h, 0.0)


def _central_difference(fn: Callable, params: PyTree, v: PyTree, eps: Any = None) -> PyTree:
    h, scale = _fd_step(params, v, eps)
    plus, minus = fn(tree_axpy(h, v, params)), fn(tree_axpy(-h, v, params))
    return jax.tree_util.tree_map(lambda a, b: ((a - b) * scale).astype(a.dtype), plus, minus)


def _product(mode: str, grad_fn: Callable, params: PyTree, v: PyTree) -> PyTree:
    if mode == "fwd-rev":
        return jax.jvp(grad_fn, (params,), (v,))[1]
    if mode == "rev-rev":
        return _rev_rev(grad_fn, params, v)
    return _central_difference(grad_fn, params, v)


def _hvp_impl(f: Callable, params: PyTree, v: PyTree, has_aux: bool, mode: str) -> PyTree:
    # Validation runs here, at trace time: once per compile for the cached eager path.
    validation.check_scalar_fn(f, params, has_aux=has_aux)
    validation.check_like(v, params)
    loss = _loss_only(f) if has_aux else f
    mode = _resolve_mode(
        mode,
        f,
        ("hvp", has_aux),
        _fwd_rev_probe(loss),
        params,
        (),
        lambda: _custom_vjp_names(loss, params),
    )
    if not has_aux:
        return _product(mode, jax.grad(loss), params, v)
    # aux comes out of the product's own forward pass; only finite differences need another.
    grad_aux = jax.grad(f, has_aux=True)
    if mode == "fwd-rev":
        _, hv, aux = jax.jvp(grad_aux, (params,), (v,), has_aux=True)
        return hv, aux
    if mode == "rev-rev":
        _, pullback, aux = jax.vjp(grad_aux, params, has_aux=True)
        return pullback(v)[0], aux
    return _product(mode, jax.grad(loss), params, v), f(params)[1]


# Eager hvp calls go through one jitted implementation per function, held in a weak-keyed
# table so that a closure over a batch (and its compiled executable, which embeds the batch as a
# constant) is freed with the closure instead of living in a global cache. Bound methods are
# made afresh on every attribute access, so they are keyed on their instance and function.
_HVP_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_hvp(f: Callable, has_aux: bool, mode: str) -> Callable | None:
    if inspect.ismethod(f):
        owner, key = f.__self__, (f.__func__, has_aux, mode)

        def deref(ref: weakref.ref) -> Callable:
            return f.__func__.__get__(ref())

    else:
        owner, key = f, (None, has_aux, mode)

        def deref(ref: weakref.ref) -> Callable:
            return ref()

    try:
        table = _HVP_CACHE.setdefault(owner, {})
    except TypeError:  # not weakly referenceable or not hashable: run uncached
        return None
    if key not in table:
        ref = weakref.ref(owner)
        table[key] = jax.jit(lambda p, v: _hvp_impl(deref(ref), p, v, has_aux, mode))
    return table[key]


def hvp(
    f: Callable[[PyTree], Any],
    params: PyTree,
    v: PyTree,
    *,
    has_aux: bool = False,
    mode: str = "auto",
) -> PyTree:
    r"""Hessian-vector product :math:`\nabla^2 f(\theta)\, v` by forward-over-reverse.

    Computed as ``jax.jvp(jax.grad(f), (params,), (v,))[1]``: one forward and one backward pass
    carrying tangents, about twice the cost of a gradient, exact to rounding.

    Called eagerly (outside ``jit``), the product is compiled once per function and per
    structure, shapes and dtypes of ``params`` (validation included, at trace time) and the
    executable is reused for new values, so repeated eager calls cost about what a jitted call
    does (``benchmarks/hvp.py`` measures both). The compiled program lives as long as ``f``
    does; a new closure per call (``lambda p: loss(p, batch)`` made inside a loop) compiles
    anew each time, so close over data once or use :func:`hessian_operator` with the data as
    arguments. Inside a traced function the product is traced inline.

    Args:
        f: a scalar function of the parameters; with ``has_aux=True``, a function returning
            ``(scalar, aux)`` as for :func:`jax.grad`.
        params: the point :math:`\theta`, a pytree of real floating arrays.
        v: the vector, a pytree with the structure, shapes and dtypes of ``params``.
        has_aux: ``f`` returns ``(loss, aux)``; ``aux`` is not differentiated.
        mode: how the product is differentiated (see :func:`hessian_operator`): ``"auto"``
            (forward-over-reverse, or reverse-over-reverse where forward mode fails, e.g. a
            ``jax.custom_vjp`` inside the loss), ``"fwd-rev"``, ``"rev-rev"`` or ``"fd"``.

    Returns:
        :math:`H v` with the structure and dtypes of ``params``; with ``has_aux=True``, the
        pair ``(Hv, aux)``.

    Raises:
        ValueError: ``f`` is not scalar, or ``v`` does not match ``params``.
        TypeError: ``params`` has integer, complex, non-array or Python-scalar leaves.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = lambda p: jnp.sum(p["w"] ** 3)
        >>> hvp(f, {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([1.0, 1.0])})["w"].tolist()
        [6.0, 12.0]
        >>> g = lambda p: (jnp.sum(p ** 2), p.mean())
        >>> hv, aux = hvp(g, jnp.array([1.0, 2.0]), jnp.ones(2), has_aux=True)
        >>> hv.tolist(), float(aux)
        ([2.0, 2.0], 1.5)

    References:
        Pearlmutter, *Fast exact multiplication by the Hessian*, Neural Computation 1994.
    """
    has_aux = bool(has_aux)
    validation.check_float_params(params)
    validation.check_one_of(mode, "mode", MODES)
    if not _any_tracer((params, v)):
        cached = _cached_hvp(f, has_aux, mode)
        if cached is not None:
            return cached(params, v)
    return _hvp_impl(f, params, v, has_aux, mode)


def fd_hvp(
    f: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree, *, eps: float | None = None
) -> PyTree:
    r"""Central finite-difference Hessian-vector product from two gradients.

    .. math::
        H v \approx \frac{\nabla f(\theta + h v) - \nabla f(\theta - h v)}{2 h}

    Costs two gradients and no forward-mode pass, which helps where a model has no ``jvp`` rule.

    Error: the truncation term is at most :math:`\tfrac{h^2}{6} M_3 \lVert v\rVert^3` (with
    :math:`M_3` a bound on the third derivative along the segment) and rounding adds about
    :math:`\epsilon_{\text{mach}} \lVert \nabla f \rVert / h`. The default step balances the two:
    :math:`h = \epsilon_{\text{mach}}^{1/3} (1 + \lVert\theta\rVert) / \lVert v \rVert`, giving a
    relative error of order :math:`\epsilon_{\text{mach}}^{2/3}` (about ``1e-5`` in float32,
    ``1e-11`` in float64) on smooth losses. Prefer :func:`hvp` when ``jvp`` works: it is exact.

    Args:
        f: a scalar function of the parameters.
        params: the point, a pytree of real floating arrays.
        v: the direction, shaped like ``params``.
        eps: the step :math:`h`; chosen automatically as above when ``None``. Must be positive.

    Returns:
        The approximation of :math:`H v`, shaped like ``params``. A zero ``v`` gives zeros.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = lambda p: jnp.sum(p ** 3)
        >>> out = fd_hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
        >>> [round(float(x), 2) for x in out]
        [6.0, 12.0]
    """
    _validate_f_params(f, params)
    validation.check_like(v, params)
    if eps is not None:
        validation.check_positive(eps, "eps")
    return _central_difference(jax.grad(f), params, v, eps)


# -- Operator kernels: hashable static functions whose arrays travel as Partial leaves. --------
# Every kernel is called as ``kernel(v, params=..., args=...)``: the parameters and the data
# arguments are Partial keywords, hence pytree leaves of the operator, so an operator on a new
# batch of the same shapes reuses every compiled solver, and nothing is baked in as a constant.
def _bind(f: Callable, args: tuple) -> Callable[[PyTree], Any]:
    return lambda p: f(p, *args)


def _loss_only(f: Callable) -> Callable:
    return lambda *a: f(*a)[0]


@dataclasses.dataclass(frozen=True)
class _HessianKernel:
    f: Callable
    has_aux: bool = False
    mode: str = "fwd-rev"

    def _loss(self, args: tuple) -> Callable[[PyTree], jax.Array]:
        # The auxiliary output is dropped before differentiation, so products never pay for
        # more than what the loss needs (XLA removes the unused aux computation).
        return _bind(_loss_only(self.f) if self.has_aux else self.f, args)

    def __call__(self, v: PyTree, params: PyTree, args: tuple = ()) -> PyTree:
        return _product(self.mode, jax.grad(self._loss(args)), params, v)

    def linearize(self, params: PyTree, args: tuple = ()) -> Callable[[PyTree], PyTree]:
        grad = jax.grad(self._loss(args))
        if self.mode == "fwd-rev":
            # jax.linearize returns a Partial holding the residuals: the result is a pytree too.
            return jax.linearize(grad, params)[1]
        if self.mode == "rev-rev":
            # The vjp of the gradient keeps the forward and backward residuals; each product is
            # then one reverse pass through the backward pass.
            return Partial(_first, jax.vjp(grad, params)[1])
        # Finite differences share nothing between products.
        return Partial(self, params=params, args=args)

    def aux(self, params: PyTree, args: tuple = ()) -> Any:
        return self.f(params, *args)[1]


@dataclasses.dataclass(frozen=True)
class _MeanHessianKernel:
    """The Hessian of a weighted mean of chunk losses; ``args = (data, *extra)``.

    ``chunk_size=None``: ``data`` is stacked along a leading chunk axis of ``C`` equal chunks,
    each weighted ``1/C``. Otherwise ``data`` has a leading example axis of ``N``: ``N // s``
    full chunks of ``s`` examples (a scan, weight ``s/N`` each) and a ragged tail of ``N mod s``
    examples (one more call, weight ``(N mod s)/N``).
    """

    loss_fn: Callable
    chunk_size: int | None = None
    linearize_chunks: bool = False
    unroll: int | bool = 1
    mode: str = "fwd-rev"

    def _split(self, data: PyTree):
        n = jax.tree_util.tree_leaves(data)[0].shape[0]
        if self.chunk_size is None:
            return data, 1.0 / n, None, 0.0
        size = self.chunk_size
        num_full = n // size
        cut = num_full * size
        full = tail = None
        if num_full:
            full = jax.tree_util.tree_map(
                lambda x: x[:cut].reshape((num_full, size) + x.shape[1:]), data
            )
        if cut < n:
            tail = jax.tree_util.tree_map(lambda x: x[cut:], data)
        return full, size / n, tail, (n - cut) / n

    def _mean_grad(self, args: tuple) -> Callable[[PyTree], PyTree]:
        data, *extra = args
        full, w_full, tail, w_tail = self._split(data)
        grad = jax.grad(self.loss_fn)

        def scaled(tree: PyTree, w: float) -> PyTree:
            return jax.tree_util.tree_map(lambda t: (t * w).astype(t.dtype), tree)

        def mean_grad(p: PyTree) -> PyTree:
            total = None
            if full is not None:

                def body(acc: PyTree, chunk: PyTree) -> tuple[PyTree, None]:
                    return jax.tree_util.tree_map(jnp.add, acc, grad(p, chunk, *extra)), None

                if jax.tree_util.tree_leaves(full)[0].shape[0] == 1:
                    # A scan of one step stays a while loop in the compiled program even
                    # with unroll=True (jax 0.10), and XLA:CPU runs a convolution in a loop
                    # far slower (the 3.3M LeNet over one chunk of 449 digits: 39 s per
                    # product against 0.7 s for a bare HVP; jax-ml/jax#12868).
                    only = jax.tree_util.tree_map(lambda x: x[0], full)
                    total = scaled(grad(p, only, *extra), w_full)
                else:
                    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
                    total = scaled(jax.lax.scan(body, zeros, full, unroll=self.unroll)[0], w_full)
            if tail is not None:
                g_tail = scaled(grad(p, tail, *extra), w_tail)
                total = g_tail if total is None else jax.tree_util.tree_map(jnp.add, total, g_tail)
            return total

        return mean_grad

    def __call__(self, v: PyTree, params: PyTree, args: tuple) -> PyTree:
        # Any derivative of a scan is a scan of derivatives: one chunk's forward and backward
        # pass (and, for rev-rev, its reverse pass) at a time.
        return _product(self.mode, self._mean_grad(args), params, v)

    def linearize(self, params: PyTree, args: tuple) -> Callable[[PyTree], PyTree]:
        if not self.linearize_chunks or self.mode == "fd":
            return Partial(self, params=params, args=args)
        # Partial evaluation of the scan stacks every chunk's residuals (memory: all chunks'
        # activations); each later product is a tangent-only (or cotangent-only) scan over them.
        if self.mode == "fwd-rev":
            return jax.linearize(self._mean_grad(args), params)[1]
        return Partial(_first, jax.vjp(self._mean_grad(args), params)[1])


def _first(fn: Callable, v: PyTree) -> PyTree:
    return fn(v)[0]


def _ggn_apply(v: PyTree, jvp: Callable, hess_out: Callable, vjp: Callable) -> PyTree:
    return vjp(hess_out(jvp(v)))[0]


def _transpose_vjp(vjp: Callable, out_like: PyTree) -> Callable[[PyTree], PyTree]:
    # J v without forward mode: u -> J^T u is linear, so the vjp of it at any u is J v
    # ("vjp of vjp"); it needs only reverse mode through the model.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, out_like)
    return Partial(_first, jax.vjp(Partial(_first, vjp), zeros)[1])


@dataclasses.dataclass(frozen=True)
class _GGNKernel:
    model_fn: Callable
    output_loss_fn: Callable
    mode: str = "fwd-rev"

    def __call__(self, v: PyTree, params: PyTree, args: tuple = ()) -> PyTree:
        return self.linearize(params, args)(v)

    def linearize(self, params: PyTree, args: tuple = ()) -> Callable[[PyTree], PyTree]:
        model = _bind(self.model_fn, args)
        out_grad = jax.grad(_bind(self.output_loss_fn, args))
        outputs, vjp = jax.vjp(model, params)
        if self.mode == "fwd-rev":
            jvp = jax.linearize(model, params)[1]
            hess_out = jax.linearize(out_grad, outputs)[1]
        elif self.mode == "rev-rev":
            jvp = _transpose_vjp(vjp, outputs)
            hess_out = Partial(_first, jax.vjp(out_grad, outputs)[1])
        else:

            def jvp(v: PyTree) -> PyTree:
                return _central_difference(model, params, v)

            def hess_out(u: PyTree) -> PyTree:
                return _central_difference(out_grad, outputs, u)

        # jax.vjp and jax.linearize return Partials: the linearized operator stays a pytree.
        return Partial(_ggn_apply, jvp=jvp, hess_out=hess_out, vjp=vjp)


def hessian_operator(
    f: Callable[..., Any],
    params: PyTree,
    *args: Any,
    damping: Any = 0.0,
    has_aux: bool = False,
    mode: str = "auto",
) -> LinearOperator:
    r"""The operator :math:`v \mapsto (\nabla^2_\theta f(\theta, \text{args}) + \delta I) v`.

    ``f(params, *args)`` is differentiated in ``params`` only; the data arguments (a batch, a
    dropout key, a mask: any pytrees of arrays) are held fixed. They are leaves of the
    operator, as the parameters are, so a jitted solver given an operator for a new batch of
    the same shapes and dtypes is reused without retracing, and the data never become
    compile-time constants. Pass the same ``f`` object each time (a module-level function or
    one made once): a new closure per batch, ``hessian_operator(lambda p: loss(p, batch),
    params)``, still works but is a new static function, so every solve on it recompiles.

    Each product is exact (forward-over-reverse). The operator's ``linearize()`` shares the
    forward and backward pass between products at the same point; hesskit's solvers use it, and
    ``benchmarks/hvp.py`` reports the saving (on CPU the linearized product costs about 1.5
    gradients against about 2 for a fresh ``jvp`` of ``grad``).

    Args:
        f: ``f(params, *args) -> scalar`` (with no ``args``, a function of the parameters).
        params: the point, a pytree of real floating arrays (flax/equinox params as they are).
        *args: data arguments passed to ``f`` after ``params``, not differentiated.
            :meth:`LinearOperator.with_args` binds new ones of the same shapes. They are
            traced inside the solvers, so Python-level options (a ``train=False`` flag that
            ``f`` branches on) belong in ``f`` itself, e.g. ``functools.partial(f,
            train=False)`` made once.
        damping: :math:`\delta`, added to the diagonal (a leaf: changing it does not recompile).
        has_aux: ``f`` returns ``(loss, aux)`` (as for :func:`jax.grad`), e.g. a model's
            updated BatchNorm statistics; products differentiate the loss only and
            :meth:`LinearOperator.aux` evaluates ``aux`` at the operator's point and data.
        mode: how each product is differentiated; the operator's :attr:`LinearOperator.mode`
            says which one was chosen.

            * ``"fwd-rev"``: forward-over-reverse, ``jvp`` of ``grad`` (Pearlmutter): exact,
              about two gradients per product (1.5 linearized).
            * ``"rev-rev"``: reverse-over-reverse, ``vjp`` of ``grad`` (the Hessian is
              symmetric): exact, needs only reverse mode, so it works through
              ``jax.custom_vjp`` functions (fused cross-entropies, attention kernels) whose
              forward mode JAX refuses; it keeps more residuals and costs more per product.
            * ``"auto"`` (default): ``"fwd-rev"`` where JAX can lower it, else ``"rev-rev"``.
              The check traces one product on abstract arguments (and lowers it only when a
              ``custom_vjp`` shows up in it), once per function and argument shapes (cached).
            * ``"fd"``: the central difference :math:`(\nabla f(\theta + h v) - \nabla
              f(\theta - h v)) / 2h` with :math:`h = \epsilon^{1/3} (1 + \lVert\theta\rVert)
              / \lVert v\rVert`: two gradients, no second-order autodiff at all. Error:
              truncation :math:`\tfrac{h^2}{6} M_3 \lVert v\rVert^3` plus rounding about
              :math:`\epsilon \lVert\nabla f\rVert / h`, of relative order
              :math:`\epsilon^{2/3}` (about ``1e-5`` in float32, ``1e-11`` in float64) on
              smooth losses; see :func:`fd_hvp`.

    Returns:
        A :class:`LinearOperator` on pytrees shaped like ``params``.

    Raises:
        TypeError: a non-floating leaf in ``params`` (the message says how to filter them).
        ValueError: ``f(params, *args)`` is not a scalar, or a negative ``damping``.
        TypeError: ``mode="fwd-rev"`` on a function forward mode cannot differentiate (the
            message names the custom_vjp functions found).

    Examples:
        >>> import jax.numpy as jnp
        >>> op = hessian_operator(lambda p: jnp.sum(p ** 2), jnp.ones(3), damping=1.0)
        >>> op(jnp.array([1.0, 0.0, 0.0])).tolist()
        [3.0, 0.0, 0.0]
        >>> loss = lambda p, x: jnp.sum((p * x) ** 2)
        >>> op = hessian_operator(loss, jnp.ones(2), jnp.array([1.0, 2.0]))
        >>> op(jnp.ones(2)).tolist(), op.with_args(jnp.array([3.0, 0.0]))(jnp.ones(2)).tolist()
        ([2.0, 8.0], [18.0, 0.0])
    """
    _validate_f_params(f, params, *args, has_aux=bool(has_aux))
    validation.check_nonnegative(damping, "damping")
    loss = _loss_only(f) if has_aux else f
    mode = _resolve_mode(
        mode,
        f,
        ("hessian", bool(has_aux)),
        _fwd_rev_probe(loss),
        params,
        tuple(args),
        lambda: _custom_vjp_names(lambda p: loss(p, *args), params),
    )
    kernel = Partial(_HessianKernel(f, bool(has_aux), mode), params=params, args=tuple(args))
    return LinearOperator(kernel, params, shift=damping)


def _stack_chunks(batches: Any) -> PyTree:
    if isinstance(batches, list):
        if not batches:
            msg = "batches is an empty list; give at least one chunk."
            raise ValueError(msg)
        defs = {jax.tree_util.tree_structure(c) for c in batches}
        shapes = {tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(c)) for c in batches}
        if len(defs) != 1 or len(shapes) != 1:
            msg = (
                "the chunks in batches must all have the same structure and shapes (equal-sized "
                f"chunks), got shapes {sorted(shapes)}; for a data set whose size is not a "
                "multiple of the chunk size pass it unchunked with chunk_size=... (the last "
                "chunk is then weighted by its size)."
            )
            raise ValueError(msg)
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batches)
    _leading_size(batches, "batches", "chunk")
    return batches


def _leading_size(data: PyTree, name: str, axis: str) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(data)
    if not leaves:
        msg = f"{name} has no array leaves."
        raise ValueError(msg)
    sizes = set()
    for path, leaf in leaves:
        if jnp.ndim(leaf) == 0:
            msg = (
                f"{name}{jax.tree_util.keystr(path)} is a scalar; every leaf needs a leading "
                f"{axis} axis"
                + (
                    " (stack equal-sized chunks along axis 0)."
                    if axis == "chunk"
                    else " (examples along axis 0)."
                )
            )
            raise ValueError(msg)
        sizes.add(jnp.shape(leaf)[0])
    if len(sizes) != 1:
        msg = (
            f"the leaves of {name} have different leading ({axis}) sizes {sorted(sizes)}; every "
            f"leaf must have the same number of {axis}s along axis 0."
        )
        raise ValueError(msg)
    return sizes.pop()


def mean_hessian_operator(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    data: PyTree,
    *args: Any,
    chunk_size: int | None = None,
    damping: Any = 0.0,
    linearize: bool = False,
    unroll: int | bool | str = "auto",
    mode: str = "auto",
) -> LinearOperator:
    r"""The Hessian of the mean loss over a data set, evaluated one chunk at a time.

    .. math::
        H = \sum_{c} \frac{n_c}{N}\, \nabla^2_\theta\, \ell(\theta, B_c, \text{args})

    where ``loss_fn(params, chunk, *args)`` is the *mean* loss over the ``n_c`` examples of one
    chunk and :math:`N = \sum_c n_c`: exactly the Hessian of the mean loss over all ``N``
    examples. This is the Hessian "over a fixed subset of the training set" of Alain et al.
    (2019, appendix D). The data must stay fixed across products for Krylov solvers to be
    valid. The chunks are given in one of two ways:

    * ``chunk_size=s``: ``data`` is the whole set with a leading example axis of ``N`` on
      every leaf; it is cut into ``N // s`` chunks of ``s`` (a :func:`jax.lax.scan`, or one
      direct call when there is one: a one-step scan would stay a loop) and, when
      ``s`` does not divide ``N``, one ragged last chunk of ``N mod s`` examples (one more
      call, so ``loss_fn`` is traced for both shapes), each weighted by its size.
    * ``chunk_size=None``: ``data`` is already chunked, stacked along a leading axis of ``C``
      equal chunks (or a Python list of equal-shaped chunks, stacked here); each weighs
      ``1/C``.

    The data and ``args`` (passed whole to every chunk: a dropout key, a mask) are leaves of
    the operator, so solvers compile once for all data sets of the same shapes.

    Memory and cost per product, the two modes:

    * ``linearize=False`` (default): every product runs each chunk's forward and backward pass
      again (``jvp`` of the gradient, inside the scan), so it holds one chunk's activations at
      a time, whatever the size of the data set; about 2-2.5 gradients' work per product.
    * ``linearize=True``: the solvers' ``linearize()`` runs the forward and backward pass of
      every chunk once (``jax.linearize`` of the scan) and keeps all their residuals, memory
      of the order of the activations of the *whole* data set (on the 1,797 digits: 1.9 MB for
      the 2.4k-parameter MLP, 21 MB for the 85k one, 60-200x the parameters); each product is
      then a tangent pass only, about 1.2-1.9 gradients' work. Use it when those residuals fit.

    Measured on the digits MLPs (1,797 examples, ``chunk_size=600``, float32, CPU): XLA's cost
    model counts 1.8-2.5 gradients of FLOPs per default product against 1.2-1.9 per
    linearized one (plus 0.5-0.7 once); wall time on the 85k MLP was 41-66 ms against 28-49
    ms per product (a gradient 12 ms, a shared 2-core machine), while on the 2.4k MLP, too
    small to be compute-bound, the two took the same 0.7-0.8 ms.

    Args:
        loss_fn: ``loss_fn(params, chunk, *args) -> scalar`` mean loss over one chunk.
        params: the point.
        data: the whole data set (with ``chunk_size``) or the stacked chunks (without).
        *args: further data arguments passed unchunked to every call of ``loss_fn``.
        chunk_size: examples per chunk; ``None`` when ``data`` is already chunked.
        damping: added to the diagonal.
        linearize: keep every chunk's residuals for cheaper repeated products (see above).
        unroll: the chunk scan's ``unroll`` (:func:`jax.lax.scan`: an int or ``True`` for
            all chunks), or ``"auto"`` (default): every chunk unrolled on CPU when the loss
            holds a convolution, which XLA:CPU runs many times slower inside a loop
            (jax-ml/jax#12868), and ``1`` (a rolled scan) otherwise. Compile time grows with
            each unrolled chunk. Measured on the 3.3M-parameter LeNet over 1,797 digits in
            chunks of 600 (2 + a ragged 597, CPU, 2026-12-02): 7.9 s per product unrolled,
            114 s rolled, against 5.9 s for one unchunked jitted HVP.
        mode: how each chunk's product is differentiated, as in :func:`hessian_operator`:
            ``"fwd-rev"`` (``jvp`` of the chunked mean gradient), ``"rev-rev"`` (its ``vjp``,
            for losses with a ``jax.custom_vjp``), ``"fd"`` (central difference of the chunked
            mean gradient: two gradient scans per product; ``linearize`` has nothing to keep
            and is ignored) or ``"auto"`` (default: ``"fwd-rev"`` where JAX can lower it on
            one chunk, else ``"rev-rev"``). :attr:`LinearOperator.mode` shows the choice.
            With ``linearize=True`` and ``"rev-rev"`` the kept residuals are those of the
            gradient's ``vjp``, about the same memory as the forward-mode ones.

    Returns:
        A :class:`LinearOperator` on pytrees shaped like ``params``; its data arguments are
        ``(data, *args)`` (:meth:`LinearOperator.with_args` binds new ones of the same shapes).

    Raises:
        ValueError: chunks of unequal size, leaves without a leading axis or with different
            leading sizes, a bad ``chunk_size``, or a non-scalar loss.
        TypeError: ``mode="fwd-rev"`` on a loss forward mode cannot differentiate.

    Examples:
        >>> import jax.numpy as jnp
        >>> loss = lambda p, x: jnp.mean((x * p) ** 2)    # Hessian 2 mean(x^2)
        >>> x = jnp.arange(1.0, 8.0)                       # 7 examples: chunks of 3, 3 and 1
        >>> op = mean_hessian_operator(loss, jnp.ones(()), x, chunk_size=3)
        >>> round(float(op(jnp.ones(()))), 4), round(float(2 * jnp.mean(x ** 2)), 4)
        (40.0, 40.0)

    References:
        Alain, Le Roux and Manzagol, *Negative eigenvalues of the Hessian in deep neural
        networks*, 2019 (arXiv:1902.02366).
    """
    if chunk_size is None:
        data = _stack_chunks(data)
        first = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), data)
    else:
        chunk_size = validation.check_positive_int(chunk_size, "chunk_size")
        n = _leading_size(data, "data", "example")
        size = min(chunk_size, n)
        first = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((size,) + x.shape[1:], x.dtype), data
        )
    _validate_f_params(loss_fn, params, first, *args, name="loss_fn")
    validation.check_nonnegative(damping, "damping")
    # One chunk decides: the scan differentiates the same loss on every chunk.
    mode = _resolve_mode(
        mode,
        loss_fn,
        ("mean",),
        _fwd_rev_probe(loss_fn),
        params,
        (first, *args),
        lambda: _custom_vjp_names(lambda p, d: loss_fn(p, d, *args), params, first),
    )
    if unroll == "auto":
        one = (params, first, *args)
        unroll = True if krylov.loop_penalized_fn(loss_fn, *one) else 1
    elif not isinstance(unroll, int | np.integer):
        msg = f"unroll must be an int, a bool or 'auto', got {unroll!r}."
        raise ValueError(msg)
    kernel = _MeanHessianKernel(loss_fn, chunk_size, bool(linearize), unroll, mode)
    return LinearOperator(Partial(kernel, params=params, args=(data, *args)), params, shift=damping)


def ggn_operator(
    model_fn: Callable[..., PyTree],
    output_loss_fn: Callable[..., jax.Array],
    params: PyTree,
    *args: Any,
    damping: Any = 0.0,
    mode: str = "auto",
) -> LinearOperator:
    r"""The generalized Gauss-Newton operator :math:`J^\top H_L J + \delta I`.

    :math:`J` is the Jacobian of ``model_fn`` at ``params`` and :math:`H_L` the Hessian of
    ``output_loss_fn`` at the model's outputs. It drops the terms of the Hessian that involve
    the model's second derivatives, so it is positive semidefinite whenever the output loss is
    convex (squared error, softmax cross-entropy): the safe alternative to the Hessian for
    damped Newton steps and trust regions.

    Data convention: both functions receive *all* the data arguments, ``model_fn(params,
    *args)`` and ``output_loss_fn(outputs, *args)``, so one batch serves both (the model reads
    the inputs, the loss the targets). The arguments are operator leaves, as in
    :func:`hessian_operator`. Without ``args`` they are ``model_fn(params)`` and
    ``output_loss_fn(outputs)`` (close over the data).

    Args:
        model_fn: ``model_fn(params, *args) -> outputs`` (any pytree of arrays).
        output_loss_fn: ``output_loss_fn(outputs, *args) -> scalar``.
        params: the point.
        *args: data arguments given to both functions, not differentiated.
        damping: :math:`\delta`, added to the diagonal.
        mode: how :math:`J v` and :math:`H_L u` are formed (:math:`J^\top w` is always one
            ``vjp``). ``"fwd-rev"``: ``jvp`` of the model and ``jvp`` of the output loss's
            gradient. ``"rev-rev"``: reverse mode only, for models or losses with a
            ``jax.custom_vjp``: :math:`J v` is the vjp of the linear map :math:`u \mapsto
            J^\top u` ("vjp of vjp", one more reverse pass) and :math:`H_L u` the vjp of the
            loss gradient. ``"fd"``: central differences of the model outputs and of the
            output-loss gradient, with the step and error bound of :func:`hessian_operator`.
            ``"auto"`` (default) is ``"fwd-rev"`` when JAX can lower both forward products,
            else ``"rev-rev"``; :attr:`LinearOperator.mode` shows the choice.

    Returns:
        A :class:`LinearOperator` on pytrees shaped like ``params``.

    Examples:
        >>> import jax.numpy as jnp
        >>> model = lambda p, batch: batch[0] @ p                    # linear model
        >>> sq = lambda out, batch: 0.5 * jnp.sum((out - batch[1]) ** 2)
        >>> x, y = jnp.eye(2) * 2.0, jnp.zeros(2)
        >>> ggn_operator(model, sq, jnp.ones(2), (x, y)).to_dense().tolist()   # X^T X
        [[4.0, 0.0], [0.0, 4.0]]

    References:
        Schraudolph, *Fast curvature matrix-vector products for second-order gradient descent*,
        Neural Computation 2002.
    """
    validation.check_float_params(params)
    outputs = jax.eval_shape(model_fn, params, *args)
    validation.check_scalar_fn(output_loss_fn, outputs, *args, name="output_loss_fn")
    validation.check_nonnegative(damping, "damping")
    mode = _resolve_mode(
        mode,
        model_fn,
        ("ggn", output_loss_fn),
        _ggn_probe(model_fn, output_loss_fn),
        params,
        tuple(args),
        lambda: _custom_vjp_names(lambda p: output_loss_fn(model_fn(p, *args), *args), params),
    )
    kernel = Partial(_GGNKernel(model_fn, output_loss_fn, mode), params=params, args=tuple(args))
    return LinearOperator(kernel, params, shift=damping)


# -- Block (per-layer) restriction ----------------------------------------------------------------
def _mask_flags(mask: Any, like: PyTree) -> tuple[bool, ...]:
    if callable(mask):
        mask = mask(like)
    like_def = jax.tree_util.tree_structure(like)
    try:
        flags = like_def.flatten_up_to(mask)
    except (ValueError, TypeError) as err:
        msg = f"mask must be a pytree of bools with the structure of the parameters: {err}"
        raise ValueError(msg) from None
    out = []
    for flag in flags:
        if not isinstance(flag, bool | np.bool_):
            msg = f"mask leaves must be Python bools (static), got {type(flag).__name__}."
            raise TypeError(msg)
        out.append(bool(flag))
    if not any(out):
        msg = "mask selects no parameters; at least one leaf must be True."
        raise ValueError(msg)
    return tuple(out)


def tree_mask_select(tree: PyTree, mask: Any) -> PyTree:
    """Keep the leaves of ``tree`` where ``mask`` is True; the others become ``None``.

    This is how vectors of a block operator (see :func:`restrict`) look.
    """
    flags = _mask_flags(mask, tree)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [x if m else None for x, m in zip(leaves, flags, strict=True)]
    )


def tree_mask_embed(block: PyTree, mask: Any, like: PyTree) -> PyTree:
    """Inverse of :func:`tree_mask_select`: ``block`` back in a full pytree, zeros elsewhere."""
    like = _as_struct(like)
    flags = _mask_flags(mask, like)
    like_leaves, treedef = jax.tree_util.tree_flatten(like)
    block_leaves = iter(jax.tree_util.tree_leaves(block))
    full = [
        next(block_leaves) if m else jnp.zeros(s.shape, s.dtype)
        for s, m in zip(like_leaves, flags, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, full)


@dataclasses.dataclass(frozen=True)
class _RestrictKernel:
    flags: tuple[bool, ...]

    def __call__(self, v: PyTree, op: LinearOperator) -> PyTree:
        full = tree_mask_embed(v, self.flags_tree(op), op.like)
        return tree_mask_select(op(full), self.flags_tree(op))

    def flags_tree(self, op: LinearOperator) -> PyTree:
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(op.like), self.flags)

    def linearize(self, op: LinearOperator) -> Callable[[PyTree], PyTree]:
        lin = op.linearize()
        mask = self.flags_tree(op)
        return lambda v: tree_mask_select(lin(tree_mask_embed(v, mask, op.like)), mask)


def restrict(op: LinearOperator, mask: Any) -> LinearOperator:
    r"""Restrict ``op`` to a block of parameters chosen by an optax-style boolean mask.

    The block operator is :math:`P^\top A P` where :math:`P` embeds the selected leaves into a
    full vector with zeros elsewhere (the other parameters are held fixed). Its vectors are
    pytrees with the parameters' structure in which unselected leaves are ``None`` (see
    :func:`tree_mask_select` / :func:`tree_mask_embed`), so ``dim`` counts only the block and
    eigensolvers work on it directly: ``eigsh(restrict(op, mask), ...)`` gives a layer's
    eigenpairs.

    Args:
        op: any operator on the full parameters.
        mask: a pytree of Python bools with the parameters' structure (True = in the block), or
            a function ``params -> mask`` as in :func:`optax.masked`.

    Returns:
        The block :class:`LinearOperator`; the original operator's shift carries over.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = lambda p: jnp.sum(p["a"] ** 2) * jnp.sum(p["b"] ** 2)
        >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
        >>> block = restrict(hessian_operator(f, params), {"a": True, "b": False})
        >>> block.dim
        2
    """
    flags = _mask_flags(mask, op.like)
    base = op.__replace__(shift=0.0)
    like = tree_mask_select(
        op.like, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(op.like), flags)
    )
    return LinearOperator(Partial(_RestrictKernel(flags), op=base), like, shift=op.shift)
