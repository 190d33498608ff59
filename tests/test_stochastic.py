"""Trace (Hutchinson, Hutch++) and diagonal estimators against dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from spectra import (
    SPECTRA,
    conv_operator,
    dense_operator,
    matrix_with_spectrum,
    pytree_operator,
)

import hesskit as hk
from hesskit._src import krylov, stochastic

DTYPES = [jnp.float64, jnp.float32]
KEYS = jax.random.split(jax.random.key(2024), 10)  # 10 keys everywhere: one compile per operator


@jax.jit
def _batched_traces(op, keys):
    # One compile per (operator type, method, budget) for all seeds: vmap over keys.
    hutch = jax.vmap(lambda k: hk.trace(op, k, num_probes=50, method="hutchinson"))(keys)
    hpp = jax.vmap(lambda k: hk.trace(op, k, num_probes=45, method="hutch++"))(keys)
    return hutch, hpp


def tiny_mlp_hessian(dtype):
    """The Hessian operator of a small tanh MLP's squared error (37 parameters)."""
    k = jax.random.split(jax.random.key(7), 4)
    params = {
        "w1": 0.7 * jax.random.normal(k[0], (3, 5), dtype),
        "b1": 0.1 * jnp.ones(5, dtype),
        "w2": 0.7 * jax.random.normal(k[1], (5, 3), dtype),
        "b2": jnp.zeros(3, dtype),
    }
    x = jax.random.normal(k[2], (16, 3), dtype)
    y = jax.random.normal(k[3], (16, 3), dtype)

    def loss(p):
        out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    return hk.hessian_operator(loss, params)


OPERATORS = {
    "paper-dense": lambda dt: dense_operator(matrix_with_spectrum(SPECTRA["paper"], 1), dt),
    "clustered-pytree": lambda dt: pytree_operator(
        matrix_with_spectrum(SPECTRA["clustered"], 2), dt
    ),
    "separated-pytree": lambda dt: pytree_operator(
        matrix_with_spectrum(SPECTRA["separated"], 3), dt
    ),
    "mlp-hessian": tiny_mlp_hessian,
}


# Compiles dominate the run time: float32 and float64 are both covered, without the full product.
CASES = [
    ("paper-dense", jnp.float64),
    ("clustered-pytree", jnp.float32),
    ("mlp-hessian", jnp.float32),
]


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_trace_within_four_standard_errors(name, dtype):
    op = OPERATORS[name](dtype)
    a = np.asarray(op.to_dense(), np.float64)
    exact = np.trace(a)
    hutch, hpp = _batched_traces(op, KEYS)
    for est, n in ((hutch, 50), (hpp, 45)):
        assert est.value.dtype == dtype and est.stderr.dtype == dtype
        np.testing.assert_array_equal(est.num_matvecs, n)
        err = np.abs(np.asarray(est.value, np.float64) - exact)
        # The stderr is estimated from the probes, so allow a rounding floor in float32.
        floor = 50 * np.finfo(dtype).eps * np.abs(a).sum()
        assert np.all(err <= 4 * np.asarray(est.stderr) + floor), (err, est.stderr)
    # Hutchinson's stderr must track the true spread, else "within 4 stderr" proves nothing:
    # the per-probe variance of z^T A z for Rademacher z is 2 (||A||_F^2 - sum_i A_ii^2).
    sd = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / 50)
    ratio = np.mean(np.asarray(hutch.stderr, np.float64)) / sd
    assert 0.6 < ratio < 1.5, ratio


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    rng = np.random.default_rng(5)
    # dim 60 like the "paper" case above: same operator shape, so no new compile.
    eigs = np.concatenate([[100.0, 60.0, 40.0, 25.0, 15.0, 10.0], rng.normal(0.0, 0.05, 54)])
    op = dense_operator(matrix_with_spectrum(eigs, 4), jnp.float64)
    exact = eigs.sum()
    keys = jax.random.split(jax.random.key(11), 10)
    hutch, hpp = _batched_traces(op, keys)
    err_h = np.mean(np.abs(np.asarray(hutch.value) - exact))
    err_pp = np.mean(np.abs(np.asarray(hpp.value) - exact))
    # With 15 sketch vectors the six large eigenvalues are deflated exactly and the remainder
    # has Frobenius norm ~0.4 instead of ~130: the gap is orders of magnitude, not a coin flip.
    assert err_pp < 0.05 * err_h, (err_pp, err_h)
    assert np.mean(np.asarray(hpp.stderr)) < 0.05 * np.mean(np.asarray(hutch.stderr))


def test_trace_exact_for_diagonal_operator_with_rademacher_probes():
    d = {"u": jnp.arange(1.0, 7.0), "v": jnp.array([[-2.0, 0.5], [3.0, 4.0]])}
    op = hk.LinearOperator(lambda v: jax.tree_util.tree_map(jnp.multiply, d, v), d, shift=0.5)
    est = hk.trace(op, jax.random.key(3), num_probes=9, method="hutchinson")
    np.testing.assert_allclose(est.value, 21.0 + 5.5 + 10 * 0.5, rtol=1e-12)
    np.testing.assert_allclose(est.stderr, 0.0, atol=1e-12)


def test_hutchpp_exact_when_sketch_covers_the_range():
    # Rank 4 < k = 6 sketch vectors: Q spans the range, the deflated remainder is zero, even
    # though A S is rank deficient (QR must still return an orthonormal Q).
    a = matrix_with_spectrum(np.concatenate([[5.0, 3.0, -2.0, 1.0], np.zeros(26)]), 8)
    est = hk.trace(dense_operator(a), jax.random.key(0), num_probes=18)
    np.testing.assert_allclose(est.value, 7.0, atol=1e-10)
    assert float(est.stderr) < 1e-10


def test_trace_jit_vmap_and_budget_one():
    op = pytree_operator(matrix_with_spectrum(SPECTRA["separated"], 0), jnp.float32)
    f = jax.jit(lambda op, k: hk.trace(op, k, num_probes=6))
    a, b = f(op, jax.random.key(0)), hk.trace(op, jax.random.key(0), num_probes=6)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-6)
    one = hk.trace(op, jax.random.key(0), num_probes=1, method="hutchinson")
    assert np.isinf(one.stderr) and np.isfinite(one.value)
    three = hk.trace(op, jax.random.key(0), num_probes=3)  # one remainder probe: no spread
    assert np.isinf(three.stderr)


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_diagonal_of_mlp_hessian(dtype):
    op = tiny_mlp_hessian(dtype)
    a = np.asarray(op.to_dense(), np.float64)
    n = 260
    est = hk.diagonal(op, jax.random.key(1), num_probes=n)
    assert jax.tree_util.tree_structure(est) == jax.tree_util.tree_structure(op.like)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(est))
    flat = np.asarray(ravel_pytree(est)[0], np.float64)
    # Entry i has standard deviation sqrt(sum_{l != i} A_il^2 / n).
    sd = np.sqrt((np.sum(a**2, axis=1) - np.diag(a) ** 2) / n)
    assert np.all(np.abs(flat - np.diag(a)) <= 5 * sd + 1e-5 * np.abs(a).max())
    # ...and it is an estimate, not the truth: a bug returning diag(A) exactly would be odd.
    assert np.max(np.abs(flat - np.diag(a))) > 0.1 * np.max(sd)


def test_diagonal_chunks_equal_the_plain_average():
    # 60 probes = two chunks of 25 plus a remainder of 10: every probe counted exactly once.
    a = matrix_with_spectrum(SPECTRA["clustered"], 6)
    op = pytree_operator(a, jnp.float64)
    key, n = jax.random.key(9), 60
    est = ravel_pytree(hk.diagonal(op, key, num_probes=n))[0]
    zs = jax.vmap(lambda k: ravel_pytree(hk.tree_random_rademacher(k, op.like))[0])(
        jax.random.split(key, n)
    )
    zs = np.asarray(zs)
    expected = np.mean(zs * (zs @ a), axis=0)
    np.testing.assert_allclose(est, expected, rtol=1e-12, atol=1e-12)


def test_diagonal_exact_for_diagonal_operator_and_vmap_over_keys():
    d = {"u": jnp.arange(1.0, 7.0, dtype=jnp.float32), "v": jnp.array([[-2.0], [0.5]], jnp.float32)}
    op = hk.LinearOperator(lambda v: jax.tree_util.tree_map(jnp.multiply, d, v), d, shift=1.0)
    out = jax.vmap(lambda k: hk.diagonal(op, k, num_probes=25))(
        jax.random.split(jax.random.key(0), 3)
    )
    for key in ("u", "v"):
        np.testing.assert_allclose(out[key], np.broadcast_to(d[key] + 1.0, out[key].shape))
        assert out[key].dtype == jnp.float32


def test_block_operator_trace():
    op = tiny_mlp_hessian(jnp.float64)
    mask = {"w1": True, "b1": False, "w2": True, "b2": False}
    block = hk.restrict(op, mask)
    exact = np.trace(np.asarray(block.to_dense()))
    est = hk.trace(block, jax.random.key(0), num_probes=block.dim)  # k = dim/3 sketch
    assert abs(float(est.value) - exact) <= 4 * float(est.stderr) + 1e-8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_probes=0), "num_probes must be >= 3"),
        (dict(num_probes=2), "num_probes must be >= 3"),
        (dict(num_probes=0, method="hutchinson"), "num_probes must be >= 1"),
        (dict(method="girard"), "method must be one of"),
    ],
)
def test_trace_bad_input(kwargs, match):
    op = dense_operator(np.eye(4))
    with pytest.raises(ValueError, match=match):
        hk.trace(op, jax.random.key(0), **kwargs)


def test_diagonal_bad_input():
    op = dense_operator(np.eye(4))
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        hk.diagonal(op, jax.random.key(0), num_probes=-3)
    with pytest.raises(TypeError, match="num_probes"):
        hk.diagonal(op, jax.random.key(0), num_probes=2.0)


def test_chunk_size_does_not_change_the_estimates():
    # One chunk, ragged chunks and chunks of one: the same probes, the same estimate (to
    # rounding); Hutch++'s basis is built the same way whatever the chunking.
    op = pytree_operator(matrix_with_spectrum(SPECTRA["clustered"], 6), jnp.float64)
    key = jax.random.key(12)
    for method, chunks in (("hutch++", (1, 7)), ("hutchinson", (7,))):
        base = hk.trace(op, key, num_probes=40, method=method, chunk_size=40)
        for chunk in chunks:
            other = hk.trace(op, key, num_probes=40, method=method, chunk_size=chunk)
            np.testing.assert_allclose(other.value, base.value, rtol=1e-10)
            np.testing.assert_allclose(other.stderr, base.stderr, rtol=1e-8)
    base = ravel_pytree(hk.diagonal(op, key, num_probes=30, chunk_size=30))[0]
    other = ravel_pytree(hk.diagonal(op, key, num_probes=30, chunk_size=4))[0]
    np.testing.assert_allclose(other, base, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        hk.trace(op, key, num_probes=9, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        hk.diagonal(op, key, num_probes=9, chunk_size=0)


def test_hutchpp_basis_is_orthonormal_or_zero():
    # The projector behind the deflation: rows orthonormal, dependent images left as zero.
    from hesskit._src.stochastic import _orthonormal_rows

    rng = np.random.default_rng(3)
    y = rng.standard_normal((6, 20))
    y[3] = y[0] - 2 * y[1]  # in the span of the rows before it
    basis = _orthonormal_rows(jnp.zeros((6, 20)), jnp.asarray(y), jnp.arange(6))
    q = np.asarray(basis)
    assert np.allclose(q[3], 0.0)
    live = np.delete(q, 3, axis=0)
    np.testing.assert_allclose(live @ live.T, np.eye(5), atol=1e-12)
    # Same span as the images.
    proj = q.T @ q
    np.testing.assert_allclose(proj @ y.T, y.T, atol=1e-10)


# -- Loop strategies (as eigsh's): host-dispatched chunks against one compiled scan -------------
def test_host_and_compiled_loops_give_the_same_estimates():
    op = conv_operator()
    assert krylov.loop_penalized(op) == (jax.default_backend() == "cpu")
    key = jax.random.key(4)
    # Ragged chunks everywhere: 7 probes in chunks of 3; Hutch++ with 20 probes (k = 6) in 4s.
    for kw in [{"method": "hutchinson", "num_probes": 7}, {"method": "hutch++", "num_probes": 20}]:
        chunk = 3 if kw["method"] == "hutchinson" else 4
        host = hk.trace(op, key, chunk_size=chunk, loop="host", **kw)
        comp = hk.trace(op, key, chunk_size=chunk, loop="compiled", **kw)
        np.testing.assert_allclose(host.value, comp.value, rtol=1e-12)
        np.testing.assert_allclose(host.stderr, comp.stderr, rtol=1e-10)
        assert int(host.num_matvecs) == int(comp.num_matvecs) == kw["num_probes"]
    d_host = hk.diagonal(op, key, num_probes=7, chunk_size=3, loop="host")
    d_comp = hk.diagonal(op, key, num_probes=7, chunk_size=3, loop="compiled")
    for name in ("k", "w"):
        np.testing.assert_allclose(d_host[name], d_comp[name], rtol=1e-12, atol=1e-14)
    # The estimate is still the estimate: exact trace of the dense Hessian within its error.
    want = np.trace(np.asarray(op.to_dense()))
    est = hk.trace(op, key, num_probes=30, loop="host")
    assert abs(float(est.value) - want) < 6 * float(est.stderr) + 1e-9 * abs(want)


def test_auto_loop_is_host_eagerly_on_cpu_compiled_under_jit(monkeypatch):
    op = conv_operator()
    key = jax.random.key(1)
    calls = []
    real = stochastic._host_body
    monkeypatch.setattr(stochastic, "_host_body", lambda body: calls.append(body) or real(body))
    eager = hk.trace(op, key, num_probes=6, method="hutchinson")
    eager_diag = hk.diagonal(op, key, num_probes=6)
    assert bool(calls) == (jax.default_backend() == "cpu")
    calls.clear()
    jitted = jax.jit(lambda o, k: hk.trace(o, k, num_probes=6, method="hutchinson").value)
    jitted_diag = jax.jit(lambda o, k: hk.diagonal(o, k, num_probes=6))
    np.testing.assert_allclose(jitted(op, key), eager.value, rtol=1e-12)
    np.testing.assert_allclose(jitted_diag(op, key)["w"], eager_diag["w"], rtol=1e-12, atol=1e-14)
    assert not calls  # inside the user's jit, auto ran the compiled scan
    with pytest.raises(ValueError, match='loop="host" cannot run inside jit'):
        jax.jit(lambda o, k: hk.trace(o, k, num_probes=6, loop="host").value)(op, key)
    with pytest.raises(ValueError, match='loop="host" cannot run inside jit'):
        jax.jit(lambda o, k: hk.diagonal(o, k, num_probes=6, loop="host"))(op, key)
    with pytest.raises(ValueError, match="loop must be one of"):
        hk.trace(op, key, num_probes=6, loop="python")
