"""Peak memory of the solvers against the documented formulas, the fit check, and bfloat16.

Memory is read from XLA's own accounting of the compiled program
(``jax.jit(fn).lower(...).compile().memory_analysis()``) on a diagonal operator of dimension
100,000, the cheapest operator to compile at a size where parameter-sized vectors dominate
every other buffer. The operator's diagonal is a leaf (a ``Partial`` argument), so it counts as
an argument, not as a temporary.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import hesskit as hk
from hesskit._src import krylov, memory
from hesskit.diagnostics import directional_loss, eigen_directional_losses


class _Pairs(NamedTuple):
    eigenvalues: jax.Array
    eigenvectors: jax.Array


DIM = 100_000
# Scalars and small arrays (keys, tridiagonals, the 1000-point grid, Gram-Schmidt
# coefficients) on top of the vectors: well under one vector.
SLACK = 1.0


@pytest.fixture(scope="module")
def big_op():
    d = jnp.linspace(-1.0, 3.0, DIM, dtype=jnp.float32)
    return hk.LinearOperator(Partial(jnp.multiply, d), d)


def temp_vectors(fn, *args) -> float:
    """Temporaries plus outputs of the compiled ``fn``, in vectors of the operator's size."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    per_vector = memory.vector_bytes(jax.ShapeDtypeStruct((DIM,), jnp.float32))
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / per_vector


def test_slq_memory_does_not_grow_with_num_runs(big_op):
    key = jax.random.key(0)

    def slq(runs, batch):
        return lambda op, k: hk.spectral_density(
            op, k, num_runs=runs, num_iters=30, batch_size=batch
        )

    one = temp_vectors(slq(1, 1), big_op, key)
    eight = temp_vectors(slq(8, 1), big_op, key)
    assert eight <= one + SLACK + 2, (one, eight)
    block = krylov.block_copy_rows(big_op.like, 30)
    assert eight <= memory.slq_vectors(30, 1, block_rows=block) + SLACK, eight
    # A batch of 3 over 7 runs has a ragged last batch: still three bases at a time.
    batched = temp_vectors(slq(7, 3), big_op, key)
    assert batched <= memory.slq_vectors(30, 3, block_rows=block) + SLACK, batched
    assert batched > 2 * memory.lanczos_vectors(30) - 12  # the batch really is vmapped


@pytest.mark.parametrize(("num_probes", "chunk"), [(90, 5), (99, 5), (60, 20)])
def test_hutchpp_memory_is_basis_plus_a_chunk(big_op, num_probes, chunk):
    used = temp_vectors(
        lambda op, k: hk.trace(op, k, num_probes=num_probes, chunk_size=chunk),
        big_op,
        jax.random.key(0),
    )
    assert used <= memory.hutchpp_vectors(num_probes, chunk) + SLACK, used
    # It does hold its basis: the formula is not loose by a whole basis where none is ragged.
    assert used >= num_probes // 3


def test_hutchinson_and_diagonal_memory_does_not_grow_with_num_probes(big_op):
    key = jax.random.key(0)
    for method in ("hutchinson", "diagonal"):

        def run(n, method=method):
            if method == "diagonal":
                return lambda op, k: hk.diagonal(op, k, num_probes=n, chunk_size=5)
            return lambda op, k: hk.trace(op, k, num_probes=n, chunk_size=5, method=method)

        small, large = temp_vectors(run(10), big_op, key), temp_vectors(run(100), big_op, key)
        assert large <= small + SLACK, (method, small, large)
        assert large <= memory.hutchinson_vectors(5) + SLACK, (method, large)


def test_directional_memory_does_not_grow_with_the_grid():
    d = jnp.linspace(-1.0, 3.0, DIM, dtype=jnp.float32)
    f = Partial(lambda p, d: 0.5 * jnp.sum(d * p**2) + jnp.sum(p), d=d)
    p, v = jnp.ones(DIM, jnp.float32), jnp.ones(DIM, jnp.float32)

    def grid(m):
        return lambda f, p, v: directional_loss(f, p, v, jnp.linspace(0, 1, m), chunk_size=8)

    short, long = temp_vectors(grid(8), f, p, v), temp_vectors(grid(61), f, p, v)
    assert long <= short + SLACK + 1, (short, long)
    assert long <= memory.directional_vectors(8) + SLACK, long
    # eigen_directional_losses reads only these two fields of an EigResult.
    eig = _Pairs(eigenvalues=jnp.ones(3, jnp.float32), eigenvectors=jnp.stack([v, -v, 2 * v]))
    used = temp_vectors(
        lambda f, p, e: eigen_directional_losses(f, p, e, jnp.linspace(0, 1, 40), chunk_size=8),
        f,
        p,
        eig,
    )
    # The directions run one after another: one chunk of the grid, not three.
    assert used <= memory.directional_vectors(8) + SLACK, used


# -- the fit check -------------------------------------------------------------------------------
def test_formulas():
    keep = 10 + (40 - 10) // 2
    assert memory.eigsh_vectors(40, 10) == 2 * 40 + 2 * -(-keep // 8) + 2 * 10 + memory.EIGSH_EXTRA
    assert memory.eigsh_vectors(40, 10, return_eigenvectors=False) == memory.EIGSH_VALUES_EXTRA
    assert memory.lanczos_vectors(30) == 30 + memory.LANCZOS_EXTRA
    assert memory.slq_vectors(30, 4) == 4 * memory.lanczos_vectors(30)
    assert memory.hutchinson_vectors(5) == 20 + memory.HUTCH_EXTRA
    assert memory.hutchpp_vectors(90, 5) == 30 + memory.hutchinson_vectors(5)
    assert memory.directional_vectors(8) == 8 + memory.DIRECTIONAL_EXTRA
    like = {"w": jax.ShapeDtypeStruct((10, 10), jnp.bfloat16), "b": jnp.zeros(5, jnp.float64)}
    assert memory.vector_bytes(like) == 100 * 4 + 5 * 8  # bfloat16 counts at float32
    with pytest.raises(ValueError, match="k must be <= krylov_dim"):
        memory.eigsh_vectors(5, 6)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        memory.hutchinson_vectors(0)


def test_check_fits_raises_with_the_bytes_and_the_remedy(monkeypatch):
    like = jnp.zeros(1000, jnp.float32)
    assert memory.check_fits(10, like, "x") == 40_000  # this host has far more
    monkeypatch.setattr(memory, "available_bytes", lambda: (100_000, "free on test device"))
    with pytest.raises(MemoryError, match=r"needs 400,000 bytes .* only 100,000 bytes") as info:
        memory.check_fits(100, like, "eigsh(krylov_dim=97)", reduce="a smaller krylov_dim")
    assert "free on test device" in str(info.value) and "a smaller krylov_dim" in str(info.value)
    assert isinstance(info.value, ValueError)
    # The solvers check before they run: the message names the setting to lower.
    op = hk.LinearOperator(lambda v: 2.0 * v, like)
    with pytest.raises(MemoryError, match="batch_size"):
        hk.spectral_density(op, jax.random.key(0), num_runs=4, num_iters=30, batch_size=4)
    with pytest.raises(MemoryError, match="chunk_size"):
        hk.trace(op, jax.random.key(0), num_probes=99)
    with pytest.raises(MemoryError, match="chunk_size"):
        hk.diagonal(op, jax.random.key(0), num_probes=99)
    f = lambda p: jnp.sum(p**2)  # noqa: E731
    with pytest.raises(MemoryError, match="chunk_size"):
        directional_loss(f, like, like + 1, jnp.linspace(0, 1, 30), chunk_size=30)


def test_available_bytes_reads_the_device_then_the_host(monkeypatch):
    class Device:
        device_kind = "fake accelerator"

        def memory_stats(self):
            return {"bytes_limit": 1000, "bytes_in_use": 300}

    monkeypatch.setattr(memory.jax, "local_devices", lambda: [Device()])
    assert memory.available_bytes() == (700, "free on fake accelerator")
    Device.memory_stats = lambda self: None  # CPU: no allocator statistics
    free, source = memory.available_bytes()
    assert source == "of host memory" and free > 2**20


# -- bfloat16 parameters ---------------------------------------------------------------------
def mlp_loss(dtype):
    """A small tanh MLP's squared error and its parameters in ``dtype`` (37 parameters)."""
    k = jax.random.split(jax.random.key(7), 4)
    params = {
        "w1": 0.7 * jax.random.normal(k[0], (3, 5)),
        "b1": 0.1 * jnp.ones(5),
        "w2": 0.7 * jax.random.normal(k[1], (5, 3)),
        "b2": jnp.zeros(3),
    }
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    x = jax.random.normal(k[2], (16, 3)).astype(dtype)
    y = jax.random.normal(k[3], (16, 3)).astype(dtype)

    def loss(p):
        out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    return loss, params


def bf16_and_f32_operators():
    loss16, p16 = mlp_loss(jnp.bfloat16)
    # The same (bfloat16-rounded) point and data, evaluated in float32.
    loss32, _ = mlp_loss(jnp.float32)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p16)
    return hk.hessian_operator(loss16, p16), hk.hessian_operator(loss32, p32)


@jax.jit
def _estimates(op, key):
    # One compile per dtype. Chunks of 5 divide both Hutch++ phases (10 probes each).
    hpp = hk.trace(op, key, num_probes=30, chunk_size=5)
    return hpp, hk.diagonal(op, key, num_probes=20, chunk_size=5)


def test_bfloat16_hutchpp_and_diagonal_agree_with_float32():
    op16, op32 = bf16_and_f32_operators()
    dense = np.asarray(op32.to_dense(), np.float64)
    scale = float(np.abs(np.linalg.eigvalsh(dense)).sum())
    (e16, d16), (e32, d32) = (
        _estimates(op16, jax.random.key(0)),
        _estimates(op32, jax.random.key(0)),
    )
    assert e16.value.dtype == jnp.float32 and np.isfinite(float(e16.value))
    # Same probes, products rounded to bfloat16 (eps 7.8e-3): the estimates differ by a few
    # bfloat16 roundings of the spectrum's scale, not by the estimator's spread.
    assert abs(float(e16.value) - float(e32.value)) <= 4e-2 * scale, (e16, e32)
    assert abs(float(e16.value) - np.trace(dense)) <= 4 * float(e16.stderr) + 4e-2 * scale
    for name in d16:
        assert d16[name].dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(d16[name], np.float32), d32[name], atol=4e-2 * float(np.abs(d32[name]).max())
        )


def test_bfloat16_slq_agrees_with_float32():
    op16, op32 = bf16_and_f32_operators()
    eigs = np.linalg.eigvalsh(np.asarray(op32.to_dense(), np.float64))
    d16 = hk.spectral_density(op16, jax.random.key(3), num_runs=3, num_iters=12)
    d32 = hk.spectral_density(op32, jax.random.key(3), num_runs=3, num_iters=12)
    assert d16.density.dtype == d16.nodes.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(d16.density)))
    np.testing.assert_allclose(np.sum(np.asarray(d16.weights), axis=1), 1.0, atol=1e-5)
    span = eigs.max() - eigs.min()
    # The extreme Ritz values converge first; bfloat16 products move them by ~eps * span.
    assert abs(float(np.max(d16.nodes)) - eigs.max()) <= 3e-2 * span
    assert abs(float(np.min(d16.nodes)) - eigs.min()) <= 3e-2 * span
    mean16 = np.sum(np.asarray(d16.nodes * d16.weights), axis=1)
    mean32 = np.sum(np.asarray(d32.nodes * d32.weights), axis=1)
    np.testing.assert_allclose(mean16, mean32, atol=3e-2 * span)
