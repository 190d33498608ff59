"""The memory each solver holds, in parameter-sized vectors, and a check before a solve.

Every hesskit solver holds a number of vectors shaped like the parameters that depends only on
its static settings (``krylov_dim``, ``num_iters``, ``batch_size``, ``chunk_size``), not on the
number of products it spends. The functions here state that number, the same one each solver's
docstring gives under "Memory:", and the suite checks it against XLA's own accounting
(``jax.jit(...).lower(...).compile().memory_analysis()``, see ``tests/test_memory.py``).

A vector is counted at Krylov precision (:func:`hesskit._src.krylov.krylov_like`: float32 or
wider), since the bases and accumulators live there even when the parameters are bfloat16.
The counts leave out the operator's own memory (the parameters, the data and what one product
needs for activations), which the caller already holds or which does not scale with the
solver's settings.

:func:`check_fits` turns the count into bytes and raises before a solve that cannot fit,
against the free device memory where the backend reports it (GPU, TPU) and otherwise against
the host's physical memory (CPU): a clear error naming the bytes is better than an
out-of-memory crash halfway through a compiled loop. It counts the solver's vectors only, so it
catches the impossible requests, not every tight one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hesskit._src.krylov import krylov_like, num_kept

PyTree = Any

__all__ = [
    "EIGSH_EXTRA",
    "LANCZOS_EXTRA",
    "HUTCH_EXTRA",
    "DIRECTIONAL_EXTRA",
    "InsufficientMemoryError",
    "available_bytes",
    "check_fits",
    "diagonal_vectors",
    "directional_vectors",
    "eigsh_vectors",
    "hutchinson_vectors",
    "hutchpp_vectors",
    "lanczos_vectors",
    "map_in_batches",
    "slq_vectors",
    "vector_bytes",
]

EIGSH_EXTRA = 8
"""Vectors eigsh holds beyond its two stacks of ``krylov_dim``, the ``k`` Ritz vectors it forms
(twice: once to check the true residuals, once as the result) and the restart rotation's column
block: the current and next Lanczos vectors, a product and Gram-Schmidt temporaries."""

EIGSH_VALUES_EXTRA = 10
"""Vectors the eigenvalues-only eigsh holds whatever the number of products (three Lanczos
vectors, a product and temporaries)."""

LANCZOS_EXTRA = 6
"""Vectors one Lanczos run holds beyond its basis (the current vector, its product, the
Gram-Schmidt temporaries and the start vector)."""

HUTCH_EXTRA = 4
"""Vectors the trace and diagonal estimators hold beyond their stacks (an accumulator, the
reductions' temporaries)."""

DIRECTIONAL_EXTRA = 6
"""Vectors a directional loss holds beyond its chunk of shifted points (the point, its
gradient, the direction, a Hessian-vector product and its temporaries)."""


class InsufficientMemoryError(MemoryError, ValueError):
    """A solve needs more memory than the device (or host) has free.

    A :class:`MemoryError` (what it is) and a :class:`ValueError` (the settings asked for it),
    so either ``except`` catches it.
    """


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"{name} must be a positive int, got {value!r}."
        raise ValueError(msg)
    return int(value)


def eigsh_vectors(
    krylov_dim: int, k: int, *, return_eigenvectors: bool = True, block_rows: int = 0
) -> int:
    """Peak vectors of :func:`hesskit.eigsh`.

    ``2 * krylov_dim + 2 * ceil(keep / 8) + 2 * k + EIGSH_EXTRA`` with ``keep`` the Ritz
    vectors kept at a restart (about ``(krylov_dim + k) / 2``): two stacks of ``krylov_dim``
    vectors (the basis and its stored products, rotated in place at each restart, a column
    block of ``keep / 8`` rows of each at a time), the ``k`` Ritz vectors and their images,
    plus ``block_rows``: the rows of one Gram-Schmidt block read at a time on CPU (at most
    4 MiB, :func:`hesskit._src.krylov.block_copy_rows`). Without eigenvectors no basis is
    stored: :data:`EIGSH_VALUES_EXTRA` vectors whatever the
    number of products. Measured with ``memory_analysis()`` in ``tests/test_krylov.py``.
    """
    krylov_dim, k = _positive(krylov_dim, "krylov_dim"), _positive(k, "k")
    if k > krylov_dim:
        msg = f"k must be <= krylov_dim, got k={k}, krylov_dim={krylov_dim}."
        raise ValueError(msg)
    if not return_eigenvectors:
        return EIGSH_VALUES_EXTRA
    keep = num_kept(k, krylov_dim)
    return 2 * krylov_dim + 2 * (-(-keep // 8)) + 2 * k + EIGSH_EXTRA + int(block_rows)


def lanczos_vectors(num_iters: int, *, block_rows: int = 0) -> int:
    """Peak vectors of :func:`hesskit.lanczos`: its basis plus ``LANCZOS_EXTRA``.

    Plus ``block_rows``, the rows of one Gram-Schmidt block on CPU (see :func:`eigsh_vectors`).
    """
    return _positive(num_iters, "num_iters") + LANCZOS_EXTRA + int(block_rows)


def slq_vectors(num_iters: int, batch_size: int = 1, *, block_rows: int = 0) -> int:
    """Peak vectors of :func:`hesskit.spectral_density`: ``batch_size * lanczos_vectors``.

    Runs go one batch at a time, so the count does not depend on ``num_runs``; each run of a
    batch holds its own basis of ``num_iters`` vectors and Gram-Schmidt block (``block_rows``).
    """
    batch_size = _positive(batch_size, "batch_size")
    return batch_size * lanczos_vectors(num_iters, block_rows=block_rows)


def hutchinson_vectors(chunk_size: int) -> int:
    """Peak vectors of Hutchinson's trace: ``4 * chunk_size + HUTCH_EXTRA``.

    Per probe of a chunk: its random bits, the probe, its product and their elementwise
    product (XLA keeps each stage of a batch whole), whatever ``num_probes``. The products'
    own temporaries come on top, once per probe of a chunk (``vmap`` gives each its own
    activations): a chunk of 25 measured 258 vectors on a 1e5-parameter MLP over 512 digits
    and 88 at 1e6 (``benchmarks/scale.py``), so for small models with large batches a smaller
    ``chunk_size`` is what bounds the memory.
    """
    return 4 * _positive(chunk_size, "chunk_size") + HUTCH_EXTRA


def hutchpp_vectors(num_probes: int, chunk_size: int) -> int:
    """Peak vectors of Hutch++: ``k + 4 * chunk + HUTCH_EXTRA``, plus two measured surcharges.

    The orthonormal basis of the sketch's range (``k = num_probes // 3`` rows, built as the
    sketch is taken, so the sketch itself is never stored whole) plus one chunk of probes at
    the cost of :func:`hutchinson_vectors`, where ``chunk = min(chunk_size, max(k,
    num_probes - 2k))``. Two cases cost more (measured with ``memory_analysis()``):

    - the sketch fits in one chunk (``k <= chunk_size``): XLA inlines the one-trip loops and
      draws the next phase's probes alongside, ``+ 4 * chunk`` (180 instead of 100 vectors for
      60 probes in chunks of 20);
    - the chunk does not divide ``k`` or ``num_probes - 2k``: the ragged last chunk runs in a
      branch of its own, which may hold up to ``k`` more (78 instead of 55 for 99 probes in
      chunks of 5).

    A ``chunk_size`` below ``k`` that divides ``k`` and ``num_probes - 2k`` avoids both. As for
    :func:`hutchinson_vectors`, a chunk's products hold their own activations on top.
    """
    num_probes = _positive(num_probes, "num_probes")
    if num_probes < 3:
        msg = f"Hutch++ needs num_probes >= 3, got {num_probes}."
        raise ValueError(msg)
    k, m = num_probes // 3, num_probes - 2 * (num_probes // 3)
    chunk = min(_positive(chunk_size, "chunk_size"), max(k, m))
    ragged = k % min(chunk, k) != 0 or m % min(chunk, m) != 0
    one_chunk = k <= chunk
    return k + hutchinson_vectors(chunk) + (k if ragged else 0) + (4 * chunk if one_chunk else 0)


def diagonal_vectors(chunk_size: int) -> int:
    """Peak vectors of :func:`hesskit.diagonal`: ``4 * chunk_size + HUTCH_EXTRA``.

    As :func:`hutchinson_vectors`; the running sum is one of the extra vectors.
    """
    return hutchinson_vectors(chunk_size)


def directional_vectors(chunk_size: int) -> int:
    """Peak vectors of one directional loss: ``chunk_size + DIRECTIONAL_EXTRA``.

    One chunk of the ``alpha`` grid's shifted points at a time, whatever the grid's length
    (each point also needs the activations of one loss evaluation, not counted here).
    """
    return _positive(chunk_size, "chunk_size") + DIRECTIONAL_EXTRA


def vector_bytes(like: PyTree) -> int:
    """Bytes of one vector shaped like ``like`` at Krylov precision (float32 or wider)."""
    leaves = jax.tree_util.tree_leaves(krylov_like(like))
    return int(sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in leaves))


def _device_free_bytes() -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (a backend without the query: no device check)
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _host_bytes() -> int | None:
    # Total physical memory, not the "free" figure: free memory moves with the page cache, and
    # this check must never refuse a solve that could run. It catches the impossible requests.
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def available_bytes() -> tuple[int | None, str]:
    """The memory a solve may use and where the figure comes from.

    Accelerators report their allocator's limit and use (``memory_stats()``): the free device
    memory. Backends that do not (CPU) fall back to the host's total physical memory, where
    that is known; ``(None, ...)`` when neither is.
    """
    free = _device_free_bytes()
    if free is not None:
        return free, f"free on {jax.local_devices()[0].device_kind}"
    host = _host_bytes()
    if host is not None:
        return host, "of host memory"
    return None, "unknown"


def _fmt(num_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"


def check_fits(num_vectors: int, like: PyTree, what: str, *, reduce: str = "") -> int:
    """Raise before a solve whose vectors cannot fit; return the bytes it needs.

    Args:
        num_vectors: the solver's peak count (from the functions in this module).
        like: a pytree shaped like one vector (e.g. ``op.like``).
        what: the solver and its settings, for the message (e.g. ``"eigsh(krylov_dim=40)"``).
        reduce: how to need less, for the message (e.g. ``"a smaller krylov_dim"``).

    Returns:
        The bytes needed, ``num_vectors * vector_bytes(like)``.

    Raises:
        InsufficientMemoryError: (a ``MemoryError`` and a ``ValueError``) when the bytes needed
            exceed those available (:func:`available_bytes`). Nothing is checked where no
            figure is known.
    """
    per_vector = vector_bytes(like)
    needed = int(num_vectors) * per_vector
    available, source = available_bytes()
    if available is not None and needed > available:
        hint = f" To need less, use {reduce}." if reduce else ""
        msg = (
            f"{what} needs {needed:,} bytes ({_fmt(needed)}: {num_vectors} vectors of "
            f"{_fmt(per_vector)}) but only {available:,} bytes ({_fmt(available)}) are "
            f"available ({source}).{hint}"
        )
        raise InsufficientMemoryError(msg)
    return needed


def map_in_batches(fn, xs: PyTree, batch_size: int) -> PyTree:
    """``fn`` over the leading axis of ``xs``, ``batch_size`` at a time (vmapped within a batch).

    Used by SLQ's runs and the directional losses' grid. Like ``jax.lax.map(fn, xs,
    batch_size=...)``, with two differences measured on Lanczos runs: a batch of one calls
    ``fn`` unbatched (a size-1 vmap turns the basis's in-place row updates into copies: 94
    instead of 34 vectors for one 30-step run), and a ragged last batch runs inside the same
    loop, as the other branch of a ``lax.cond``, so that its buffers share memory with the
    full batches' (run after the loop, as ``lax.map`` does, they were held on top of them).
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    full, rest = divmod(n, batch_size)
    num_batches = full + (rest > 0)

    tmap = jax.tree_util.tree_map

    def batch(x: PyTree) -> PyTree:
        if jax.tree_util.tree_leaves(x)[0].shape[0] == 1:
            return tmap(lambda a: a[None], fn(tmap(lambda a: a[0], x)))
        return jax.vmap(fn)(x)

    if num_batches == 1:
        # A one-step map would stay a while loop in the compiled program, where XLA:CPU runs
        # convolutions far slower (jax-ml/jax#12868).
        return batch(xs)
    if rest == 0:
        stacked = jax.lax.map(batch, tmap(lambda a: a.reshape(full, batch_size, *a.shape[1:]), xs))
    else:
        # Pad with copies of the first entries; the ragged branch never evaluates them.
        def pad(a: jax.Array) -> jax.Array:
            a = jnp.concatenate([a, a[: num_batches * batch_size - n]])
            return a.reshape(num_batches, batch_size, *a.shape[1:])

        padded = tmap(pad, xs)
        like = jax.eval_shape(batch, tmap(lambda a: a[0], padded))

        def ragged(x: PyTree) -> PyTree:
            out = batch(tmap(lambda a: a[:rest], x))
            return jax.tree_util.tree_map(
                lambda o, s: jnp.zeros(s.shape, s.dtype).at[:rest].set(o), out, like
            )

        def step(ix):
            i, x = ix
            return jax.lax.cond(i < full, batch, ragged, x)

        stacked = jax.lax.map(step, (jnp.arange(num_batches), padded))
    flat = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), stacked)
    return jax.tree_util.tree_map(lambda a: a[:n], flat)
