import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spectra import dense_operator, pytree_operator, random_orthogonal

import hesskit as hk
from hesskit.diagnostics import Tracker, match_pairs

N = 40
Q = random_orthogonal(N, seed=0)
BULK = np.linspace(0.5, 4.0, N - 4)


def _op(top, bottom, dtype=jnp.float64, tree=False):
    """Fixed eigenvectors Q: columns 0..1 carry ``top``, columns 2..3 carry ``bottom``."""
    lam = np.concatenate([top, bottom, BULK])
    a = (Q * lam) @ Q.T
    a = 0.5 * (a + a.T)
    return (pytree_operator if tree else dense_operator)(a, dtype)


def _vec(vectors, i):
    return np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(vectors)])


def test_match_pairs_greedy():
    np.testing.assert_array_equal(match_pairs(np.eye(3)[[2, 0, 1]]), [2, 0, 1])
    # greedy: the largest entry is taken first, then the best remaining one
    np.testing.assert_array_equal(match_pairs([[0.9, 0.8], [0.85, 0.1]]), [0, 1])
    np.testing.assert_array_equal(match_pairs([[0.1], [0.9], [0.2]]), [-1, 0, -1])
    np.testing.assert_array_equal(match_pairs(-np.eye(2)), [0, 1])
    with pytest.raises(ValueError, match="2-d"):
        match_pairs(np.ones(3))


def test_matches_permuted_eigenvectors_and_flags_a_zero_crossing():
    tracker = Tracker(k=4, which="LA+SA", keep_eigenvectors=True)
    tracker_k = (tracker.k_top, tracker.k_bottom)
    assert tracker_k == (4, 4)
    tracker = Tracker(k=(2, 2), which="LA+SA", keep_eigenvectors=True)
    r0 = tracker.update(0, _op([10.0, 8.0], [-0.3, -0.1]), jax.random.key(0), loss=2.0)
    np.testing.assert_allclose(r0.eigenvalues, [-0.3, -0.1, 10.0, 8.0], atol=1e-8)
    np.testing.assert_array_equal(r0.matched_to_previous, -1)
    assert not r0.zero_crossings.any() and np.isnan(r0.angles_to_previous).all()
    # the two top eigenvalues swap ranks; Q[:, 3]'s eigenvalue crosses zero (-0.1 -> 0.2)
    r1 = tracker.update(1, _op([7.0, 9.0], [-0.25, 0.2]), jax.random.key(1), loss=1.0)
    np.testing.assert_allclose(r1.eigenvalues, [-0.25, 0.2, 9.0, 7.0], atol=1e-8)
    np.testing.assert_array_equal(r1.matched_to_previous, [0, 1, 3, 2])
    np.testing.assert_array_equal(r1.zero_crossings, [False, True, False, False])
    np.testing.assert_allclose(r1.angles_to_previous, 0.0, atol=1e-6)
    # the eigenvectors are Q's columns (up to sign)
    for i, col in enumerate([2, 3, 1, 0]):
        assert abs(_vec(r1.eigenvectors, i) @ Q[:, col]) == pytest.approx(1.0, abs=1e-8)
    assert r1.converged.all() and r1.num_matvecs > 0
    steps, top, bottom, loss = tracker.as_arrays()
    np.testing.assert_array_equal(steps, [0, 1])
    np.testing.assert_allclose(top, [[10.0, 8.0], [9.0, 7.0]], atol=1e-8)
    np.testing.assert_allclose(bottom, [[-0.3, -0.1], [-0.25, 0.2]], atol=1e-8)
    np.testing.assert_allclose(loss, [2.0, 1.0])
    assert tracker.history[0].eigenvectors is not None  # keep_eigenvectors=True


def test_be_mode_on_pytrees_in_float32_and_the_plot_inputs():
    tracker = Tracker(k=2, which="BE")
    assert (tracker.k_top, tracker.k_bottom) == (1, 1)
    for t, (lo, hi) in enumerate([(-0.4, 9.0), (-0.2, 9.5), (0.1, 10.0)]):
        op = _op([hi, 5.0], [lo, 0.3], jnp.float32, tree=True)
        rec = tracker.update(10 * t, op, jax.random.key(t))
    np.testing.assert_allclose(rec.eigenvalues, [0.1, 10.0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(rec.matched_to_previous, [0, 1])
    np.testing.assert_array_equal(rec.zero_crossings, [True, False])
    assert tracker.history[0].eigenvectors is None  # only the latest record keeps vectors
    assert rec.eigenvectors["a"].shape == (2, 3)
    steps, top, bottom, loss = tracker.as_arrays()
    assert top.shape == (3, 1) and bottom.shape == (3, 1) and loss is None
    np.testing.assert_allclose(top[:, 0], [9.0, 9.5, 10.0], rtol=1e-5)
    np.testing.assert_allclose(bottom[:, 0], [-0.4, -0.2, 0.1], rtol=1e-3, atol=1e-5)
    pytest.importorskip("matplotlib")
    from hesskit.plots import plot_eigenvalue_tracks

    fig = plot_eigenvalue_tracks(steps, top, bottom)
    assert fig.axes[0].get_yscale() == "log"


def test_warm_start_reduces_matvecs_on_a_slowly_changing_operator():
    n = 150
    rng = np.random.default_rng(0)
    lam = np.concatenate([[10.0, 9.7, 9.4], np.linspace(-1.0, 9.0, n - 6), [-1.3, -1.2, -1.1]])
    q = random_orthogonal(n, seed=5)
    a = (q * lam) @ q.T
    e = rng.standard_normal((n, n))
    e = (e + e.T) / np.sqrt(n)
    counts = {}
    for warm in (False, True):
        tracker = Tracker(k=4, which="BE", tol=1e-8, warm_start=warm)
        for t in range(4):
            tracker.update(t, dense_operator(a + 2e-3 * t * e), jax.random.key(t))
        counts[warm] = [r.num_matvecs for r in tracker.history]
        assert all(r.converged.all() for r in tracker.history)
        assert all(np.nanmax(r.angles_to_previous) < 0.05 for r in tracker.history[1:])
    # the first solve is cold in both; later warm solves need clearly fewer products
    assert counts[True][0] == counts[False][0]
    assert sum(counts[True][1:]) < 0.9 * sum(counts[False][1:])


def test_bad_input():
    with pytest.raises(ValueError, match="which"):
        Tracker(k=2, which="XX")
    with pytest.raises(ValueError, match="LA\\+SA"):
        Tracker(k=(2, 2), which="BE")
    with pytest.raises(TypeError, match="k"):
        Tracker(k=2.5)
    with pytest.raises(ValueError, match="k"):
        Tracker(k=0)
    tracker = Tracker(k=3, which="LA")
    with pytest.raises(ValueError, match="no records"):
        tracker.as_arrays()
    with pytest.raises(TypeError, match="LinearOperator"):
        tracker.update(0, np.eye(4), jax.random.key(0))
    small = dense_operator(np.diag([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="below the operator's dim"):
        tracker.update(0, small, jax.random.key(0))
    tracker.update(0, _op([3.0, 2.0], [0.1, 0.2]), jax.random.key(0))
    with pytest.raises(ValueError, match="previous operator"):
        tracker.update(1, _op([3.0, 2.0], [0.1, 0.2], tree=True), jax.random.key(1))
    with pytest.raises(ValueError, match="previous operator"):
        tracker.update(1, _op([3.0, 2.0], [0.1, 0.2], jnp.float32), jax.random.key(1))


def test_loss_function_form_and_its_bad_input():
    def loss_fn(p, d):
        return 0.5 * jnp.sum(d * p**2) + jnp.sum(p**3) / 6

    d = jnp.linspace(-1.0, 3.0, 20)
    params = jnp.linspace(-0.2, 0.2, 20)
    tracker = Tracker(k=2, which="BE")
    rec = tracker.update(0, loss_fn, jax.random.key(0), params=params, args=(d,))
    exact = np.sort(np.asarray(d + params))  # H = diag(d + p)
    np.testing.assert_allclose(rec.eigenvalues, [exact[0], exact[-1]], rtol=1e-8)
    with pytest.raises(TypeError, match="without params"):
        tracker.update(1, loss_fn, jax.random.key(1), args=(d,))
    with pytest.raises(TypeError, match="tuple"):
        tracker.update(1, loss_fn, jax.random.key(1), params=params, args=d)
    op = hk.hessian_operator(loss_fn, params, d)
    with pytest.raises(TypeError, match="with_args"):
        tracker.update(1, op, jax.random.key(1), args=(d,))
    # New data bound to the same operator (same shapes, so the solve is reused).
    rec = tracker.update(1, op.with_args(2 * d), jax.random.key(1))
    exact = np.sort(np.asarray(2 * d + params))
    np.testing.assert_allclose(rec.eigenvalues, [exact[0], exact[-1]], rtol=1e-8)
