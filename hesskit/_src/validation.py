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
            msg = (
                f"{name}{jax.tree_util.keystr(path)} has {kind} dtype {dtype}; hesskit "
                "differentiates real floating parameters only (cast integer parameters to a "
                "float dtype, split complex ones into real and imaginary parts)."
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
