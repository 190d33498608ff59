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


def check_float_params(params: PyTree, name: str = "params") -> None:
    """Raise ``TypeError`` unless every leaf of ``params`` is a real floating array."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        msg = f"{name} has no array leaves; a curvature operator needs at least one parameter."
        raise ValueError(msg)
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else "non-floating"
            if kind == "complex":
                hint = "split complex parameters into real and imaginary parts."
            else:
                # Integer leaves are almost always state (step counters, batch statistics,
                # indices) mixed into the trainable tree: filter them out rather than cast them.
                hint = (
                    "pass only the trainable float leaves and keep the rest out of params, e.g. "
                    "`params, rest = nnx.split(model, nnx.Param, ...)` (flax nnx) or "
                    "`params, static = eqx.partition(model, eqx.is_inexact_array)` (equinox); "
                    "hand the other leaves to f as data arguments, "
                    "`hessian_operator(f, params, *args)`, or close over them."
                )
            msg = (
                f"{name}{jax.tree_util.keystr(path)} has {kind} dtype {dtype}; hesskit "
                f"differentiates real floating parameters only: {hint}"
            )
            raise TypeError(msg)


def check_scalar_fn(f: Callable[..., Any], *args: Any, name: str = "f") -> None:
    """Raise ``ValueError`` unless ``f(*args)`` returns a real floating scalar."""
    out = jax.eval_shape(f, *args)
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
