"""Stochastic Lanczos quadrature against numpy.linalg.eigh spectra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spectra import SPECTRA, dense_operator, matrix_with_spectrum, pytree_operator

import hesskit as hk

RUNS, ITERS = 8, 20


def check_rule(dens, num_runs=RUNS, num_iters=ITERS, dtype=jnp.float64):
    assert dens.nodes.shape == dens.weights.shape == (num_runs, num_iters)
    assert dens.density.dtype == dens.grid.dtype == dens.nodes.dtype == dtype
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(np.sum(dens.weights, axis=1), 1.0, atol=tol)
    assert np.all(np.asarray(dens.weights) >= 0) and np.all(np.asarray(dens.density) >= 0)
    assert np.all(np.diff(np.asarray(dens.nodes), axis=1) >= 0)
    np.testing.assert_allclose(jnp.trapezoid(dens.density, dens.grid), 1.0, rtol=tol)


def mean_tolerance(eigs, num_runs):
    # For v uniform on the unit sphere, Var(v^T A v) = 2 Var(lambda) / (d + 2).
    d = eigs.size
    return 4 * np.sqrt(2 * np.var(eigs) / (d + 2) / num_runs)


@pytest.mark.parametrize(
    ("name", "make", "dtype"),
    [
        ("paper", pytree_operator, jnp.float64),
        ("paper", pytree_operator, jnp.float32),
        ("clustered", dense_operator, jnp.float64),
    ],
)
def test_density_is_normalized_and_has_the_right_mean(name, make, dtype):
    eigs = SPECTRA[name]
    op = make(matrix_with_spectrum(eigs, 3), dtype)
    dens = hk.spectral_density(op, jax.random.key(0), num_runs=RUNS, num_iters=ITERS)
    check_rule(dens, dtype=dtype)
    mean = float(np.mean(np.sum(np.asarray(dens.nodes * dens.weights, np.float64), axis=1)))
    assert abs(mean - eigs.mean()) <= mean_tolerance(eigs, RUNS), (mean, eigs.mean())
    # The extreme Ritz values converge first: they bracket the spectrum and reach its ends.
    span = eigs.max() - eigs.min()
    assert np.min(dens.nodes) >= eigs.min() - 1e-4 * span
    assert np.max(dens.nodes) <= eigs.max() + 1e-4 * span
    np.testing.assert_allclose(np.max(dens.nodes), eigs.max(), rtol=1e-3)
    np.testing.assert_allclose(np.min(dens.nodes), eigs.min(), atol=1e-3 * span)


def test_mass_placement_matches_the_eigh_histogram():
    rng = np.random.default_rng(0)
    centers, counts = np.array([-2.0, 1.0, 5.0]), np.array([10, 20, 10])
    eigs = np.concatenate(
        [c + 0.01 * rng.standard_normal(n) for c, n in zip(centers, counts, strict=True)]
    )
    a = matrix_with_spectrum(eigs, 5)
    ref, _ = np.histogram(np.linalg.eigvalsh(a), bins=[-3, -1, 3, 6])
    dens = hk.spectral_density(dense_operator(a), jax.random.key(4), num_runs=RUNS, num_iters=ITERS)
    check_rule(dens)
    grid, phi = np.asarray(dens.grid), np.asarray(dens.density)
    for (lo, hi), expected in zip([(-3, -1), (-1, 3), (3, 6)], ref / eigs.size, strict=True):
        inside = (grid >= lo) & (grid <= hi)
        mass = jnp.trapezoid(phi[inside], grid[inside])
        node_mass = np.mean(np.sum(np.asarray(dens.weights) * inside_of(dens.nodes, lo, hi), 1))
        # Per run a cluster's weight is v^T P v with std sqrt(2 p (1 - p) / d) ~ 0.1; over
        # 8 runs ~0.035, so 0.12 is 3.5 standard deviations and far from a misplaced cluster.
        assert abs(mass - expected) < 0.12, (lo, hi, mass, expected)
        assert abs(node_mass - expected) < 0.12
    # Nothing between the clusters (the broadening is narrow: spread / num_iters = 0.35).
    gap = (grid > -1.0) & (grid < -0.3)
    assert np.max(phi[gap]) < 0.02 * np.max(phi)


def inside_of(nodes, lo, hi):
    nodes = np.asarray(nodes)
    return (nodes >= lo) & (nodes <= hi)


def test_low_rank_operator_masks_rows_after_breakdown():
    eigs = np.concatenate([[3.0, 2.0, 1.0], np.zeros(37)])
    op = dense_operator(matrix_with_spectrum(eigs, 2))
    dens = hk.spectral_density(op, jax.random.key(1), num_runs=RUNS, num_iters=ITERS)
    check_rule(dens)
    nodes, weights = np.asarray(dens.nodes), np.asarray(dens.weights)
    # The Krylov space has dimension at most 4 (+1 for a rounding-level vector): the other
    # slots must carry exactly zero weight, and the valid nodes are the eigenvalues.
    assert np.all(np.sum(weights > 0, axis=1) <= 5)
    live = nodes[weights > 1e-12]
    assert np.all(np.min(np.abs(live[:, None] - np.array([0.0, 1.0, 2.0, 3.0])), axis=1) < 1e-8)
    zero_mass = np.mean(np.sum(weights * (np.abs(nodes) < 0.5), axis=1))
    assert abs(zero_mass - 37 / 40) < 0.1
    assert np.all(np.isfinite(np.asarray(dens.density)))


def tiny_mlp_hessian(dtype):
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


def test_network_hessian_density():
    op = tiny_mlp_hessian(jnp.float64)
    eigs = np.linalg.eigvalsh(np.asarray(op.to_dense()))
    dens = hk.spectral_density(op, jax.random.key(2), num_runs=RUNS, num_iters=ITERS)
    check_rule(dens)
    mean = np.mean(np.sum(np.asarray(dens.nodes * dens.weights), axis=1))
    assert abs(mean - eigs.mean()) <= mean_tolerance(eigs, RUNS)
    np.testing.assert_allclose(np.max(dens.nodes), eigs.max(), rtol=1e-6)
    np.testing.assert_allclose(np.min(dens.nodes), eigs.min(), atol=1e-6 * np.abs(eigs).max())


def test_user_grid_sigma_jit_and_vmap_over_keys():
    eigs = SPECTRA["separated"]
    op = dense_operator(matrix_with_spectrum(eigs, 1), jnp.float32)
    grid = jnp.linspace(-2.0, 13.0, 301)

    @jax.jit
    def run(op, keys):
        return jax.vmap(
            lambda k: hk.spectral_density(op, k, num_runs=4, num_iters=ITERS, grid=grid, sigma=0.5)
        )(keys)

    dens = run(op, jax.random.split(jax.random.key(0), 3))
    assert dens.density.shape == (3, 301) and dens.nodes.shape == (3, 4, ITERS)
    assert dens.density.dtype == jnp.float32
    np.testing.assert_allclose(jax.vmap(jnp.trapezoid)(dens.density, dens.grid), 1.0, rtol=1e-5)
    # The broadened exact spectral measure with the same width. Pooling the 3 x 4 runs, the L1
    # distance is ~0.08; the same curve shifted by one width (0.5) is already at ~0.17.
    x = np.asarray(grid, np.float64)
    z = (x[:, None] - eigs) / 0.5
    exact = np.mean(np.exp(-0.5 * z**2), axis=1) / (0.5 * np.sqrt(2 * np.pi))
    pooled = np.mean(np.asarray(dens.density, np.float64), axis=0)
    assert jnp.trapezoid(np.abs(pooled - exact), x) < 0.12
    # Different keys, different runs.
    assert not np.allclose(dens.nodes[0], dens.nodes[1])


def test_nan_operator_gives_nan_density():
    a = np.eye(10)
    a[3, 3] = np.nan
    dens = hk.spectral_density(dense_operator(a), jax.random.key(0), num_runs=2, num_iters=5)
    assert np.all(np.isnan(np.asarray(dens.density)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_runs=0), "num_runs must be >= 1"),
        (dict(num_iters=0), "num_iters must be >= 1"),
        (dict(num_iters=11), "num_iters must be <= the operator's dimension 10"),
        (dict(sigma=0.0), "sigma must be a finite positive number"),
        (dict(sigma=-1.0), "sigma must be a finite positive number"),
        (dict(grid=np.zeros((3, 2))), "grid must be a 1-D array"),
        (dict(grid=np.array([1.0, 0.0])), "strictly increasing"),
    ],
)
def test_bad_input(kwargs, match):
    op = dense_operator(np.eye(10))
    with pytest.raises(ValueError, match=match):
        hk.spectral_density(op, jax.random.key(0), **{"num_iters": 5, **kwargs})


def test_batch_size_does_not_change_the_runs():
    # Runs one at a time (the default), in ragged batches of 3 and all at once: the same keys
    # give the same runs, to rounding.
    op = pytree_operator(matrix_with_spectrum(SPECTRA["clustered"], 4), jnp.float64)
    key = jax.random.key(6)
    base = hk.spectral_density(op, key, num_runs=7, num_iters=10, batch_size=1)
    for batch in (3, 50):  # 50 is clipped to num_runs
        other = hk.spectral_density(op, key, num_runs=7, num_iters=10, batch_size=batch)
        np.testing.assert_allclose(other.nodes, base.nodes, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(other.weights, base.weights, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(other.density, base.density, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        hk.spectral_density(op, key, num_runs=2, num_iters=5, batch_size=0)
