"""Pytree linear algebra helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from spectra import WIDE

import hesskit as hk

# Exact up to rounding in the widest dtype the x64 setting allows.
RTOL = 1e-12 if WIDE == jnp.float64 else 1e-5


def make_tree(dtype=WIDE, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "a": jax.random.normal(k[0], (3, 4), dtype),
        "b": (jax.random.normal(k[1], (5,), dtype), jax.random.normal(k[2], (), dtype)),
    }


def flat(t):
    return np.asarray(ravel_pytree(t)[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_vdot_norm_axpy_match_flat(dtype):
    x, y = make_tree(dtype, 0), make_tree(dtype, 1)
    np.testing.assert_allclose(hk.tree_vdot(x, y), flat(x) @ flat(y), rtol=1e-5)
    np.testing.assert_allclose(hk.tree_norm(x), np.linalg.norm(flat(x)), rtol=1e-6)
    np.testing.assert_allclose(flat(hk.tree_axpy(2.5, x, y)), 2.5 * flat(x) + flat(y), rtol=1e-6)
    np.testing.assert_allclose(flat(hk.tree_sub(x, y)), flat(x) - flat(y))
    np.testing.assert_allclose(flat(hk.tree_add(x, y)), flat(x) + flat(y))
    np.testing.assert_allclose(flat(hk.tree_scale(-3.0, x)), -3.0 * flat(x), rtol=1e-6)
    for leaf in jax.tree_util.tree_leaves(hk.tree_axpy(2.5, x, y)):
        assert leaf.dtype == dtype
    unit, norm = hk.tree_normalize(x)
    np.testing.assert_allclose(hk.tree_norm(unit), 1.0, rtol=1e-6)
    zero, znorm = hk.tree_normalize(hk.tree_zeros_like(x))
    assert float(znorm) == 0.0 and not np.any(np.isnan(flat(zero)))
    assert hk.tree_dim(x) == 12 + 5 + 1


def test_probes():
    like = make_tree(jnp.float32)
    key = jax.random.key(0)
    r = flat(hk.tree_random_rademacher(key, like))
    assert set(np.unique(r)) <= {-1.0, 1.0}
    s = hk.tree_random_sphere(key, like)
    np.testing.assert_allclose(hk.tree_norm(s), 1.0, rtol=1e-6)
    # One direction over the whole space: a single leaf does not have unit norm on its own.
    assert abs(float(jnp.linalg.norm(s["a"])) - 1.0) > 1e-3
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(s))
    # Distinct leaves get distinct keys (no repeated streams across leaves of equal shape).
    g = hk.tree_random_normal(key, {"u": jnp.zeros(50), "v": jnp.zeros(50)})
    assert not np.allclose(g["u"], g["v"])
    # Gaussian moments over many draws.
    draws = jax.jit(jax.vmap(lambda k: ravel_pytree(hk.tree_random_normal(k, like))[0]))(
        jax.random.split(key, 4000)
    )
    assert abs(float(draws.mean())) < 0.02
    assert abs(float(draws.var()) - 1.0) < 0.03
    # Sphere samples are uniform: the mean of many is near zero, second moment is I/d.
    sph = jax.jit(jax.vmap(lambda k: ravel_pytree(hk.tree_random_sphere(k, like))[0]))(
        jax.random.split(key, 4000)
    )
    d = sph.shape[1]
    np.testing.assert_allclose(np.mean(sph**2, axis=0), 1.0 / d, atol=0.02)


def test_stack_unstack_and_basis_products():
    trees = [make_tree(WIDE, i) for i in range(4)]
    stacked = hk.tree_stack(trees)
    assert stacked["a"].shape == (4, 3, 4)
    back = hk.tree_unstack(stacked)
    for t, u in zip(trees, back, strict=True):
        np.testing.assert_array_equal(flat(t), flat(u))
    Q = np.stack([flat(t) for t in trees])
    x = make_tree(WIDE, 9)
    np.testing.assert_allclose(hk.tree_rmatvec(stacked, x), Q @ flat(x), rtol=RTOL)
    c = jnp.arange(4.0)
    np.testing.assert_allclose(flat(hk.tree_matvec(stacked, c)), Q.T @ np.arange(4.0), rtol=RTOL)
    with pytest.raises(ValueError, match="at least one"):
        hk.tree_stack([])


def test_helpers_under_jit_and_vmap():
    x = make_tree(WIDE)
    keys = jax.random.split(jax.random.key(1), 5)
    norms = jax.jit(jax.vmap(lambda k: hk.tree_norm(hk.tree_random_sphere(k, x))))(keys)
    np.testing.assert_allclose(norms, 1.0, rtol=RTOL)
