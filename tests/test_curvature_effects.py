import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spectra import matrix_with_spectrum, random_orthogonal

import hesskit as hk
from hesskit.diagnostics import condition_number, gd_rates, regularized_spectrum, svm_hinge_loss

LAM = np.array([0.05, 0.3, 1.0, 2.5, 4.0])


def _gd_errors(a, theta_star, theta0, lr, steps):
    f = lambda p: 0.5 * (p - theta_star) @ (a @ (p - theta_star))  # noqa: E731
    grad = jax.grad(f)

    def step(p, _):
        p = p - lr * grad(p)
        return p, p

    _, path = jax.lax.scan(step, theta0, None, length=steps)
    return jnp.concatenate([theta0[None], path]) - theta_star


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_gd_error_follows_contraction_per_eigendirection(dtype):
    q = random_orthogonal(LAM.size, seed=0)
    a = jnp.asarray((q * LAM) @ q.T, dtype)
    theta_star = jnp.asarray(np.linspace(-1, 1, LAM.size), dtype)
    theta0 = jnp.zeros(LAM.size, dtype)
    lr = 0.45  # 1 - lr * 4.0 = -0.8: the top direction oscillates but shrinks
    errors = np.asarray(_gd_errors(a, theta_star, theta0, lr, 30), np.float64)
    comps = errors @ q  # error along each eigenvector, shape (31, n)
    rates = gd_rates(jnp.asarray(LAM, dtype), lr)
    c = np.asarray(rates.contraction, np.float64)
    np.testing.assert_allclose(c, 1 - lr * LAM, rtol=1e-6)
    expected = comps[0] * c[None, :] ** np.arange(31)[:, None]
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(comps, expected, atol=tol)
    assert bool(rates.all_stable)
    assert float(rates.rate) == pytest.approx(np.abs(1 - lr * LAM).max(), rel=1e-6)
    # after `iterations` steps each component has shrunk tenfold, one step earlier it had not
    its = np.asarray(rates.iterations).astype(int)
    for i in range(LAM.size):
        if its[i] <= 30:
            assert abs(comps[its[i], i]) <= abs(comps[0, i]) / 10 * (1 + 1e-6)
            assert abs(comps[its[i] - 1, i]) > abs(comps[0, i]) / 10
    assert rates.contraction.dtype == dtype


def test_gd_rates_stability_and_best_step():
    r = gd_rates(LAM, 0.55)  # 2 / 4.0 = 0.5 < 0.55: the top direction diverges
    np.testing.assert_array_equal(r.stable, [True, True, True, True, False])
    assert not bool(r.all_stable)
    assert float(r.iterations[-1]) == np.inf
    assert float(r.max_stable_lr) == pytest.approx(0.5)
    assert float(r.best_lr) == pytest.approx(2 / (0.05 + 4.0))
    kappa = 4.0 / 0.05
    best = gd_rates(LAM, float(r.best_lr))
    assert float(best.rate) == pytest.approx((kappa - 1) / (kappa + 1))
    # a negative eigenvalue: gradient descent moves away along it at any step size
    neg = gd_rates([-0.5, 1.0], 0.1)
    np.testing.assert_array_equal(neg.stable, [False, True])
    assert float(neg.contraction[0]) == pytest.approx(1.05)
    assert np.isnan(float(neg.best_lr))
    assert float(gd_rates(-1.0, 0.1).max_stable_lr) == np.inf
    assert gd_rates(2.0, 0.5).iterations.shape == ()
    assert float(gd_rates(2.0, 0.5).iterations) == 1.0  # exact in one step
    assert float(gd_rates([1.0], 0.5, factor=1e3).iterations[0]) == 10.0  # 2^-10 < 1e-3
    jitted = jax.jit(gd_rates)(jnp.asarray(LAM), 0.1)
    np.testing.assert_allclose(jitted.contraction, 1 - 0.1 * LAM, rtol=1e-6)


def test_regularized_spectrum_matches_eigsh_of_the_penalized_loss():
    n = 30
    lam = np.concatenate([[1e-4, 1e-3], np.linspace(0.01, 1.0, n - 3), [20.0]])
    a = jnp.asarray(matrix_with_spectrum(lam, seed=1))
    wd = 0.05

    def loss(p):
        return 0.5 * p["w"] @ (a @ p["w"]) + jnp.sin(p["s"]) * 0.0

    def penalized(p):
        sq = sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
        return loss(p) + 0.5 * wd * sq

    p = {"w": jnp.ones(n), "s": jnp.zeros(())}
    key = jax.random.key(0)
    # BE with k=4: the two smallest and the two largest, ascending; keep 2 + the top one
    before = hk.eigsh(hk.hessian_operator(loss, p), key, k=4, which="BE").eigenvalues[
        jnp.array([0, 1, 3])
    ]
    after = hk.eigsh(hk.hessian_operator(penalized, p), key, k=4, which="BE").eigenvalues
    after = after[jnp.array([0, 1, 3])]
    # the extra scalar leaf has zero curvature: the loss is singular, the penalized one is not
    np.testing.assert_allclose(before, [0.0, 1e-4, 20.0], atol=1e-9)
    reg = regularized_spectrum(before, wd)
    np.testing.assert_allclose(reg.eigenvalues, after, rtol=1e-9)
    assert float(reg.condition_before) > 1e8  # ~0 eigenvalue: (numerically) singular
    assert float(reg.condition_after) == pytest.approx(20.05 / 0.05, rel=1e-6)
    assert bool(reg.positive_definite)
    exact = regularized_spectrum(lam, wd)
    assert float(exact.condition_before) == pytest.approx(20.0 / 1e-4)
    assert float(exact.condition_after) == pytest.approx(20.05 / (1e-4 + 0.05))


def test_regularization_can_worsen_conditioning_with_negative_eigenvalues():
    r = regularized_spectrum([-0.1, 1.0], 0.1)
    assert float(r.condition_before) == pytest.approx(10.0)
    assert float(r.condition_after) == np.inf
    assert not bool(r.positive_definite)
    assert float(condition_number([0.0, 1.0])) == np.inf
    assert float(condition_number(3.0)) == 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_svm_hessian_is_reg_identity_and_convex(dtype):
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (64, 12), dtype)
    y = jnp.where(x[:, 0] + 0.3 * x[:, 1] > 0, 1.0, -1.0).astype(dtype)
    w = 0.5 * jax.random.normal(kw, (12,), dtype)
    reg = 0.1
    margins = np.asarray(y * (x @ w))
    assert np.min(np.abs(margins - 1)) > 1e-3  # away from the kinks
    assert np.any(margins < 1) and np.any(margins > 1)  # both hinge pieces are active
    f = lambda v: svm_hinge_loss(v, x, y, reg)  # noqa: E731
    h = np.asarray(jax.hessian(f)(w), np.float64)
    np.testing.assert_allclose(h, reg * np.eye(12), atol=1e-6)
    dense = np.linalg.eigvalsh(h)
    assert dense.min() > 0
    res = hk.eigsh(hk.hessian_operator(f, w), jax.random.key(0), k=2, which="SA")
    np.testing.assert_allclose(res.eigenvalues, reg, rtol=1e-5)
    assert bool(res.converged.all())
    if dtype == jnp.float64:
        rep = hk.critical_point_report(f, w, jax.random.key(1))
        assert rep.classification == "not critical"  # a random w is not the optimum
        assert float(rep.lambda_min) == pytest.approx(reg, rel=1e-8)
        assert float(rep.condition_number) == pytest.approx(1.0, rel=1e-6)
    # convex along a random segment: the midpoint lies below the chord
    v = jax.random.normal(jax.random.key(4), (12,), dtype)
    ends = float(f(w - v)) + float(f(w + v))
    assert float(f(w)) <= 0.5 * ends + 1e-6
    # value: mean hinge plus the penalty
    expected = np.mean(np.maximum(0, 1 - margins)) + 0.5 * reg * float(w @ w)
    assert float(f(w)) == pytest.approx(expected, rel=1e-5)
    assert f(w).dtype == dtype


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        gd_rates([], 0.1)
    with pytest.raises(ValueError, match="lr"):
        gd_rates([1.0], 0.0)
    with pytest.raises(ValueError, match="lr"):
        gd_rates([1.0], np.inf)
    with pytest.raises(ValueError, match="factor"):
        gd_rates([1.0], 0.1, factor=1.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        gd_rates(np.ones((2, 2)), 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        regularized_spectrum([1.0], -0.1)
    with pytest.raises(ValueError, match="empty"):
        regularized_spectrum([], 0.1)
    with pytest.raises(ValueError, match="empty"):
        condition_number([])
