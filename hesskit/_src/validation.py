"""Eager checks that turn bad input into clear errors at trace time, never wrong numbers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _describe(x: Any) -> str:
    return f"{jnp.result_type(x)}{tuple(jnp.shape(x))}"


_NNX_SPLIT = "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)` (flax nnx)"
_EQX_PARTITION = "`params, static = eqx.partition(model, eqx.is_inexact_array)` (equinox)"
_FILTER_HINT = (
    f"pass only the trainable float leaves and keep the rest out of params, e.g. {_NNX_SPLIT} "
    f"or {_EQX_PARTITION}; hand the other leaves to f as data arguments, "
    "`hessian_operator(f, params, *args)`, or close over them."
)


def _is_rng_state(path: tuple, dtype: Any) -> bool:
    # nnx keeps each Rngs stream as a key and a uint32 counter under an ``rngs`` attribute (or
    # a module attribute named after the stream); both are state, never parameters.
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return "rngs" in names or ("count" in names and jnp.issubdtype(dtype, jnp.unsignedinteger))


def check_float_params(params: PyTree, name: str = "params") -> None:
    """Raise ``TypeError`` unless every leaf of ``params`` is a real floating array.

    The message names the first bad leaf and the filter that removes it: non-array leaves (an
    equinox model's activation functions), Python scalars (a learning rate or a flag that would
    otherwise silently become a weakly typed parameter), random-number state (an nnx ``Rngs``
    key and counter) and integer or complex arrays.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        msg = f"{name} has no array leaves; a curvature operator needs at least one parameter."
        raise ValueError(msg)
    for path, leaf in leaves:
        where = f"{name}{jax.tree_util.keystr(path)}"
        if isinstance(leaf, bool | int | float | complex):
            msg = (
                f"{where} is a Python {type(leaf).__name__} ({leaf!r}), not an array; hesskit "
                "rejects Python scalars as parameters because they are usually hyperparameters "
                "or flags. If it is a parameter, make it an array (jnp.asarray(x, "
                "jnp.float32)); otherwise keep it out of params (close over it, or pass it as a "
                f"data argument). For whole models: {_FILTER_HINT}"
            )
            raise TypeError(msg)
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            msg = (
                f"{where} is a {type(leaf).__name__} object, not an array: only arrays can be "
                f"differentiated; {_FILTER_HINT}"
            )
            raise TypeError(msg)
        if _is_rng_state(path, dtype):
            msg = (
                f"{where} ({dtype}) is random-number state (an nnx Rngs key or counter), not a "
                f"parameter: split it off with {_NNX_SPLIT} and pass `rest` (or a fixed dropout "
                "key) to f as a data argument, `hessian_operator(f, params, rest, ...)`."
            )
            raise TypeError(msg)
        if not jnp.issubdtype(dtype, jnp.floating):
            kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else "non-floating"
            if kind == "complex":
                hint = "split complex parameters into real and imaginary parts."
            else:
                # Integer leaves are almost always state (step counters, batch statistics,
                # indices) mixed into the trainable tree: filter them out rather than cast them.
                hint = _FILTER_HINT
            msg = (
                f"{where} has {kind} dtype {dtype}; hesskit differentiates real floating "
                f"parameters only: {hint}"
            )
            raise TypeError(msg)


def check_scalar_fn(
    f: Callable[..., Any], *args: Any, name: str = "f", has_aux: bool = False
) -> None:
    """Raise ``ValueError`` unless ``f(*args)`` returns a real floating scalar.

    With ``has_aux=True``, ``f`` must return a pair ``(scalar, aux)`` and only the first item is
    checked.
    """
    out = jax.eval_shape(f, *args)
    if has_aux:
        if not (isinstance(out, tuple | list) and len(out) == 2):
            msg = (
                f"{name} was declared has_aux=True, so it must return a pair (loss, aux), but "
                f"it returned {jax.tree_util.tree_structure(out)}."
            )
            raise ValueError(msg)
        out = out[0]
    elif isinstance(out, tuple) and len(out) == 2 and jax.tree_util.tree_leaves(out[1]):
        leaves0 = jax.tree_util.tree_leaves(out[0])
        if len(leaves0) == 1 and leaves0[0].shape == ():
            msg = (
                f"{name} returned a pair (scalar, ...): if the second item is auxiliary output "
                "(new BatchNorm statistics, metrics), pass has_aux=True."
            )
            raise ValueError(msg)
    leaves = jax.tree_util.tree_leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        shapes = [tuple(leaf.shape) for leaf in leaves]
        msg = (
            f"{name} must return a scalar loss (shape ()), but it returned output with shapes "
            f"{shapes}; reduce it first, e.g. with jnp.mean."
        )
        raise ValueError(msg)
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        msg = f"{name} must return a real floating scalar, got dtype {leaves[0].dtype}."
        raise TypeError(msg)


def check_like(v: PyTree, like: PyTree, *, name: str = "v", like_name: str = "params") -> None:
    """Raise ``ValueError`` unless ``v`` has the structure, shapes and dtypes of ``like``."""
    v_def = jax.tree_util.tree_structure(v)
    l_def = jax.tree_util.tree_structure(like)
    if v_def != l_def:
        msg = (
            f"{name} must have the pytree structure of {like_name}.\n"
            f"  {name}: {v_def}\n  {like_name}: {l_def}"
        )
        raise ValueError(msg)
    v_leaves = jax.tree_util.tree_leaves_with_path(v)
    for (path, a), b in zip(v_leaves, jax.tree_util.tree_leaves(like), strict=True):
        if tuple(jnp.shape(a)) != tuple(b.shape) or jnp.result_type(a) != jnp.dtype(b.dtype):
            msg = (
                f"{name}{jax.tree_util.keystr(path)} is {_describe(a)} but {like_name} has "
                f"{jnp.dtype(b.dtype)}{tuple(b.shape)} there; shapes and dtypes must match exactly."
            )
            raise ValueError(msg)


def check_positive(value: Any, name: str) -> None:
    """Raise ``ValueError`` if a concrete ``value`` is not strictly positive (or is NaN)."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if arr.size != 1 or not np.isfinite(arr) or not arr > 0:
        msg = f"{name} must be a finite positive number, got {value!r}."
        raise ValueError(msg)


def check_nonnegative(value: Any, name: str) -> None:
    """Raise ``ValueError`` if a concrete ``value`` is negative or not finite."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if arr.size != 1 or not np.isfinite(arr) or arr < 0:
        msg = f"{name} must be a finite non-negative number, got {value!r}."
        raise ValueError(msg)


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, raising ``ValueError`` unless it is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        msg = f"{name} must be a Python int >= {minimum}, got {value!r}."
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}."
        raise ValueError(msg)
    return int(value)


def check_one_of(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        msg = f"{name} must be one of {allowed}, got {value!r}."
        raise ValueError(msg)
    return value


def _leaf_struct(x: Any) -> tuple[tuple[int, ...], Any]:
    # Typed PRNG keys have an extended dtype that jnp.dtype() cannot interpret: compare dtypes
    # as objects instead.
    dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
    return tuple(jnp.shape(x)), dtype


def check_args(args: tuple, expected: tuple, *, name: str = "args") -> None:
    """Raise ``ValueError`` unless ``args`` match ``expected`` in structure, shapes and dtypes.

    Used when new data are bound to an existing operator: a compiled solver is reused only for
    data of the same structure, shapes and dtypes, and a silent retrace (or a wrong broadcast
    inside the loss) is worse than an error naming the leaf.
    """
    if len(args) != len(expected):
        msg = (
            f"the operator was built with {len(expected)} data argument(s) but {len(args)} were "
            "given; pass the same number, in the same order."
        )
        raise ValueError(msg)
    a_def = jax.tree_util.tree_structure(args)
    e_def = jax.tree_util.tree_structure(expected)
    if a_def != e_def:
        msg = (
            f"{name} must have the pytree structure of the operator's data arguments.\n"
            f"  given:    {a_def}\n  expected: {e_def}"
        )
        raise ValueError(msg)
    paths = jax.tree_util.tree_leaves_with_path(args)
    for (path, a), b in zip(paths, jax.tree_util.tree_leaves(expected), strict=True):
        (a_shape, a_dtype), (b_shape, b_dtype) = _leaf_struct(a), _leaf_struct(b)
        if a_shape != b_shape or a_dtype != b_dtype:
            msg = (
                f"{name}{jax.tree_util.keystr(path)} is {a_dtype}{a_shape} but the operator's "
                f"data have {b_dtype}{b_shape} there; shapes and dtypes must match exactly (build "
                "a new operator for data of another shape: it compiles its solvers anew)."
            )
            raise ValueError(msg)
