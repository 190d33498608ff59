"""CG and MINRES against numpy.linalg.solve / lstsq on hard spectra and a network Hessian."""

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
from hesskit._src import linsolve

RNG = np.random.default_rng(0)
B = RNG.standard_normal(40)


def flat(x):
    return np.asarray(ravel_pytree(x)[0], np.float64)


def true_residual(a, x, b):
    return np.linalg.norm(b - a @ x)


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("make", [dense_operator, pytree_operator])
def test_spd_float64_matches_numpy(method, make):
    a = matrix_with_spectrum(SPECTRA["separated"], 1)
    op = make(a, jnp.float64).shifted(0.5)  # damping lives in the operator
    b = pytree_like(op, B)
    res = hk.solve(op, b, method=method, tol=1e-11)
    ref = np.linalg.solve(a + 0.5 * np.eye(40), B)
    assert bool(res.converged) and int(res.status) == linsolve.CONVERGED
    # cond = 10.5/1.5 = 7: a relative residual of 1e-11 bounds the error by 7e-11.
    np.testing.assert_allclose(flat(res.x), ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    # The reported residual is the true one (up to rounding in the order of the sums).
    np.testing.assert_allclose(
        res.residual_norm, true_residual(a + 0.5 * np.eye(40), flat(res.x), B), rtol=1e-3
    )
    assert float(res.residual_norm) <= 1e-11 * np.linalg.norm(B)
    assert 0 < int(res.num_iters) <= 40 + 5  # well conditioned: about dim steps at most
    assert jax.tree_util.tree_structure(res.x) == jax.tree_util.tree_structure(op.like)


def pytree_like(op, v, dtype=None):
    _, unravel = ravel_pytree(
        jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), op.like)
    )
    return unravel(jnp.asarray(v, dtype or op.dtype))


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_spd_float32(method):
    a = matrix_with_spectrum(SPECTRA["separated"], 1)
    op = pytree_operator(a, jnp.float32)
    b = pytree_like(op, B)
    res = hk.solve(op, b, method=method, tol=1e-5)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(res.x))
    assert res.residual_norm.dtype == jnp.float32
    assert bool(res.converged), res
    # The returned residual is the true one (recomputed in float32, so up to ~eps ||A|| ||x||),
    # and a relative residual of 1e-5 with cond 10 bounds the error by 1e-4.
    ref = np.linalg.solve(a, B)
    x = flat(res.x)
    np.testing.assert_allclose(res.residual_norm, true_residual(a, x, B), rtol=0.05, atol=1e-5)
    assert np.linalg.norm(x - ref) <= 1e-4 * np.linalg.norm(ref)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_ill_conditioned_spd_float64_converges_within_budget(method):
    eigs = np.geomspace(1e-4, 1.0, 40)  # condition 1e4
    a = matrix_with_spectrum(eigs, 2)
    res = hk.solve(dense_operator(a), jnp.asarray(B), method=method, tol=1e-8)
    assert bool(res.converged) and int(res.num_iters) <= 400
    ref = np.linalg.solve(a, B)
    assert np.linalg.norm(flat(res.x) - ref) <= 1e4 * 1e-8 * 10 * np.linalg.norm(ref)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_condition_1e6_in_float32_reports_failure_honestly(method):
    # Rounding in float32 (eps ~ 6e-8) times condition 1e6 puts the attainable relative
    # residual far above 1e-6: the solver must not claim convergence.
    a = matrix_with_spectrum(SPECTRA["ill_conditioned"], 3)
    res = hk.solve(dense_operator(a, jnp.float32), jnp.asarray(B, jnp.float32), method=method)
    assert not bool(res.converged)
    assert int(res.status) in (linsolve.MAX_ITERS, linsolve.STAGNATED, linsolve.SINGULAR)
    assert int(res.num_iters) <= 400
    x = flat(res.x)
    np.testing.assert_allclose(res.residual_norm, true_residual(a, x, B), rtol=1e-2)
    assert float(res.residual_norm) > 1e-6 * np.linalg.norm(B)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_minres_indefinite_and_cg_flags_negative_curvature(dtype):
    eigs = np.concatenate([np.linspace(-4.0, -0.5, 10), np.linspace(0.5, 6.0, 30)])
    a = matrix_with_spectrum(eigs, 4)
    op, b = pytree_operator(a, dtype), None
    b = pytree_like(op, B)
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    res = hk.solve(op, b, method="minres", tol=tol)
    assert bool(res.converged), res.status
    ref = np.linalg.solve(a, B)
    # cond = 12: the error is at most 12 * tol relative (plus float32 rounding of the check).
    assert np.linalg.norm(flat(res.x) - ref) <= 20 * tol * np.linalg.norm(ref)
    cg = hk.solve(op, b, method="cg", tol=tol)
    assert not bool(cg.converged) and int(cg.status) == linsolve.NEGATIVE_CURVATURE
    assert int(cg.num_iters) < 40


def test_minres_on_the_paper_spectrum():
    # A few large positive, a bulk at 1e-3, a few small negative: the Hessian-shaped system.
    a = matrix_with_spectrum(SPECTRA["paper"], 1)
    b = RNG.standard_normal(60)
    res = hk.solve(dense_operator(a), jnp.asarray(b), method="minres", tol=1e-8)
    assert bool(res.converged)
    np.testing.assert_allclose(flat(res.x), np.linalg.solve(a, b), rtol=1e-4, atol=1e-4)


def test_minres_singular_inconsistent_gives_least_squares():
    a = matrix_with_spectrum(SPECTRA["near_singular"], 5)  # 20 exact zeros
    res = hk.solve(dense_operator(a), jnp.asarray(B), method="minres")
    assert not bool(res.converged) and int(res.status) == linsolve.SINGULAR
    lstsq = np.linalg.lstsq(a, B, rcond=1e-10)[0]
    # The least-squares residual is the part of b in the null space; MINRES reaches it.
    np.testing.assert_allclose(res.residual_norm, true_residual(a, lstsq, B), rtol=1e-6)
    np.testing.assert_allclose(a @ flat(res.x), a @ lstsq, atol=1e-6)


def test_consistent_singular_system_converges():
    a = matrix_with_spectrum(SPECTRA["near_singular"], 5)
    b = a @ B  # in the range
    for method in ("cg", "minres"):
        res = hk.solve(dense_operator(a), jnp.asarray(b), method=method, tol=1e-10)
        assert bool(res.converged), (method, res.status)
        np.testing.assert_allclose(a @ flat(res.x), b, atol=1e-8 * np.linalg.norm(b))


def mlp_hessian(dtype, damping):
    k = jax.random.split(jax.random.key(3), 4)
    params = {
        "w1": 0.7 * jax.random.normal(k[0], (3, 5), dtype),
        "b1": 0.1 * jnp.ones(5, dtype),
        "w2": 0.7 * jax.random.normal(k[1], (5, 2), dtype),
    }
    x = jax.random.normal(k[2], (16, 3), dtype)
    y = jax.random.normal(k[3], (16, 2), dtype)

    def loss(p):
        out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    return hk.hessian_operator(loss, params, damping=damping), params


def test_damped_network_hessian_jit_and_vmap_over_right_hand_sides():
    op, params = mlp_hessian(jnp.float64, damping=0.1)
    h = np.asarray(op.to_dense())  # includes the damping
    rhs = jax.vmap(lambda k: hk.tree_random_normal(k, params))(
        jax.random.split(jax.random.key(0), 3)
    )

    @jax.jit
    def batched(op, rhs):
        return jax.vmap(lambda b: hk.solve(op, b, method="minres", tol=1e-10))(rhs)

    res = batched(op, rhs)
    assert res.converged.shape == (3,) and bool(np.all(res.converged))
    xs = jax.vmap(lambda t: ravel_pytree(t)[0])(res.x)
    bs = jax.vmap(lambda t: ravel_pytree(t)[0])(rhs)
    ref = np.linalg.solve(h, np.asarray(bs).T).T
    cond = np.linalg.cond(h)
    np.testing.assert_allclose(xs, ref, atol=10 * cond * 1e-10 * np.abs(ref).max())


def test_nonfinite_input_is_reported():
    a = matrix_with_spectrum(SPECTRA["separated"], 1)
    op = dense_operator(a)
    bad_b = jnp.asarray(B).at[3].set(jnp.nan)
    for method in ("cg", "minres"):
        res = hk.solve(op, bad_b, method=method)
        assert not bool(res.converged) and int(res.status) == linsolve.NONFINITE
        a_nan = a.copy()
        a_nan[2, 2] = np.inf
        res = hk.solve(dense_operator(a_nan), jnp.asarray(B), method=method)
        assert not bool(res.converged) and int(res.status) == linsolve.NONFINITE


def test_zero_rhs_and_budget():
    op = dense_operator(matrix_with_spectrum(SPECTRA["ill_conditioned"], 1))
    res = hk.solve(op, jnp.zeros(40))
    assert bool(res.converged) and int(res.num_iters) == 0
    np.testing.assert_array_equal(res.x, 0.0)
    res = hk.solve(op, jnp.asarray(B), max_iters=7)
    assert int(res.num_iters) == 7 and int(res.status) == linsolve.MAX_ITERS
    assert not bool(res.converged)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(method="gmres"), ValueError, "method must be one of"),
        (dict(tol=0.0), ValueError, "tol must be a finite positive number"),
        (dict(tol=-1e-3), ValueError, "tol must be a finite positive number"),
        (dict(max_iters=0), ValueError, "max_iters must be >= 1"),
        (dict(max_iters=3.5), TypeError, "max_iters must be a Python int"),
    ],
)
def test_bad_input(kwargs, error, match):
    op = dense_operator(np.eye(4))
    with pytest.raises(error, match=match):
        hk.solve(op, jnp.ones(4), **kwargs)


def test_mismatched_rhs_is_rejected():
    op = dense_operator(np.eye(4))
    with pytest.raises(ValueError, match="b"):
        hk.solve(op, jnp.ones(5))
    with pytest.raises(ValueError, match="float32"):
        hk.solve(op, jnp.ones(4, jnp.float32))


# -- Loop strategies (as eigsh's): one compiled iteration per host call against one while loop --
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_host_and_compiled_loops_give_the_same_solve(method):
    # The Hessian's spectrum is about [-5, 7.7]: damping 6 makes it definite, 0.1 does not.
    op = conv_operator(damping=6.0)
    b = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), op.like)
    x0 = jax.tree_util.tree_map(lambda a: 0.1 * a, b)
    cases = [(op, {}, True), (op, {"x0": x0}, True), (op, {"max_iters": 5}, False)]
    if method == "cg":
        cases.append((conv_operator(damping=0.1), {}, False))  # stops on negative curvature
    for o, kw, converges in cases:
        host = hk.solve(o, b, method=method, tol=1e-10, loop="host", **kw)
        comp = hk.solve(o, b, method=method, tol=1e-10, loop="compiled", **kw)
        assert int(host.num_iters) == int(comp.num_iters)
        assert int(host.status) == int(comp.status)
        assert bool(host.converged) == bool(comp.converged) == converges
        np.testing.assert_allclose(flat(host.x), flat(comp.x), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(host.residual_norm, comp.residual_norm, rtol=1e-6, atol=1e-15)
        if converges:
            want = np.linalg.solve(np.asarray(o.to_dense()), flat(b))
            np.testing.assert_allclose(flat(host.x), want, rtol=1e-7)
    # The caller's arrays survive the host loop's donated state (b is its first residual).
    assert np.isfinite(flat(b)).all() and np.isfinite(flat(x0)).all()


def test_auto_loop_is_host_eagerly_on_cpu_compiled_under_jit(monkeypatch):
    op = conv_operator(damping=6.0)
    b = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), op.like)
    calls = []
    real = linsolve._solve_host
    monkeypatch.setattr(linsolve, "_solve_host", lambda *a: calls.append(1) or real(*a))
    eager = hk.solve(op, b, tol=1e-10)
    assert bool(calls) == (jax.default_backend() == "cpu")
    calls.clear()
    jitted = jax.jit(lambda o, b: hk.solve(o, b, tol=1e-10).x)(op, b)
    assert not calls  # inside the user's jit, auto ran the compiled while loop
    np.testing.assert_allclose(flat(jitted), flat(eager.x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match='loop="host" cannot run inside jit'):
        jax.jit(lambda o, b: hk.solve(o, b, loop="host").x)(op, b)
    with pytest.raises(ValueError, match="loop must be one of"):
        hk.solve(op, b, loop="python")
