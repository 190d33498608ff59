import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spectra import matrix_with_spectrum

import hesskit as hk
from hesskit.diagnostics import (
    directional_loss,
    eigen_directional_losses,
    step_check,
)

LAM = np.array([-0.5, 0.25, 1.0, 2.0, 4.0, 8.0])
A64 = matrix_with_spectrum(LAM, seed=2)
W, V = np.linalg.eigh(A64)
THETA0 = np.linspace(-1.0, 1.0, LAM.size)


def quad(p, a):
    return 0.5 * p @ (a @ p) + jnp.sum(p)


def _f(dtype):
    a = jnp.asarray(A64, dtype)
    return jax.tree_util.Partial(quad, a=a)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_quadratic_model_is_exact_and_alpha_star_is_inverse_eigenvalue(dtype):
    f = _f(dtype)
    p = jnp.asarray(THETA0, dtype)
    alphas = jnp.linspace(0.0, 2.0, 801, dtype=dtype)
    spacing = 2.0 / 800
    g = np.asarray(A64 @ THETA0 + 1.0)
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    for i in range(2, LAM.size):  # positive directions with 1/lambda inside the grid
        v = jnp.asarray(V[:, i], dtype)
        res = directional_loss(f, p, v, alphas, eigenvalue=W[i])
        assert res.losses.dtype == dtype and res.losses.shape == (801,)
        np.testing.assert_allclose(res.losses, res.model, rtol=rtol, atol=rtol * 10)
        assert abs(float(res.alpha_star) - 1 / W[i]) <= spacing / 2 + 1e-6
        np.testing.assert_allclose(float(res.slope), g @ V[:, i], rtol=rtol * 10)
        np.testing.assert_allclose(float(res.loss0), float(f(p)), rtol=rtol)
        expected_best = -0.5 * (g @ V[:, i]) ** 2 / W[i]
        np.testing.assert_allclose(float(res.best_decrease), expected_best, rtol=1e-3)
        assert float(res.inv_alpha_star) == pytest.approx(1 / float(res.alpha_star))
        # the default curvature is the Rayleigh quotient, equal to the eigenvalue here
        res2 = directional_loss(f, p, 3.0 * v, alphas)  # also: direction is normalized
        np.testing.assert_allclose(float(res2.curvature), W[i], rtol=rtol * 10)
        np.testing.assert_allclose(res2.losses, res.losses, rtol=rtol, atol=rtol * 10)


def test_negative_direction_on_a_quadratic_has_no_minimum_in_the_grid():
    f = _f(jnp.float64)
    alphas = jnp.linspace(0.0, 3.0, 61)
    res = directional_loss(f, jnp.asarray(THETA0), jnp.asarray(V[:, 0]), alphas)
    assert float(res.curvature) == pytest.approx(-0.5)
    assert float(res.alpha_star) == 3.0  # unbounded below: the last grid point wins
    assert bool(res.at_edge)
    # Reversed grid: the edge is the largest value, not the last entry.
    rev = directional_loss(f, jnp.asarray(THETA0), jnp.asarray(V[:, 0]), alphas[::-1])
    assert float(rev.alpha_star) == 3.0 and bool(rev.at_edge)
    np.testing.assert_allclose(res.losses, res.model, rtol=1e-12)


def test_eigen_directional_losses_on_eigsh_pairs():
    f = _f(jnp.float64)
    p = jnp.asarray(THETA0)
    eig = hk.eigsh(hk.hessian_operator(f, p), jax.random.key(0), k=3, which="LA")
    alphas = jnp.linspace(0.0, 1.0, 401)
    res = eigen_directional_losses(f, p, eig, alphas)
    assert res.losses.shape == (3, 401) and res.alphas.shape == (401,)
    np.testing.assert_array_equal(res.alphas, alphas)
    # Interior minimizers at 1/8, 1/4, 1/2 of a grid ending at 1: none at the edge.
    assert not np.any(res.at_edge)
    short = eigen_directional_losses(f, p, eig, jnp.linspace(0.0, 0.3, 31))
    # The grid ends at 0.3: 1/8 and 1/4 are inside, 1/2 runs off the end.
    np.testing.assert_array_equal(short.at_edge, [False, False, True])
    assert res.alpha_star.shape == res.loss0.shape == (3,)
    np.testing.assert_allclose(res.curvature, [8.0, 4.0, 2.0], rtol=1e-9)
    np.testing.assert_allclose(res.losses, res.model, rtol=1e-10)
    np.testing.assert_allclose(res.alpha_star, 1 / np.array([8.0, 4.0, 2.0]), atol=1.25e-3)
    # rows equal the single-direction function
    one = directional_loss(f, p, jax.tree.map(lambda x: x[1], eig.eigenvectors), alphas)
    np.testing.assert_allclose(res.losses[1], one.losses, rtol=1e-12)


def saddle_toy(p):
    x, y = p["x"], p["y"]
    return x**2 - y**2 + y**4 / 4


def test_negative_curvature_step_is_much_longer_than_one_over_lambda():
    # Near the saddle of x^2 - y^2 + y^4/4 the negative direction's best step is set by the
    # quartic, far beyond the quadratic model's 1/|lambda| (Alain et al., 2019, on a toy).
    p = {"x": jnp.asarray(0.1), "y": jnp.asarray(0.05)}
    alphas = jnp.linspace(0.0, 30.0, 3001)
    neg = {"x": jnp.asarray(0.0), "y": jnp.asarray(1.0)}
    pos = {"x": jnp.asarray(1.0), "y": jnp.asarray(0.0)}
    rn = directional_loss(saddle_toy, p, neg, alphas)
    rp = directional_loss(saddle_toy, p, pos, alphas)
    lam = -2 + 3 * 0.05**2
    assert float(rn.curvature) == pytest.approx(lam)
    slope = -2 * 0.05 + 0.05**3
    expected = (np.sqrt(2.0) - 0.05) / abs(slope)  # y moves to the quartic's minimum sqrt(2)
    assert float(rn.alpha_star) == pytest.approx(expected, abs=0.01)
    assert float(rn.alpha_star) > 20 / abs(lam)
    assert float(rn.best_decrease) < float(rp.best_decrease) * 50  # far larger decrease
    assert float(rp.alpha_star) == pytest.approx(0.5, abs=0.01)  # quadratic along x


def chunk_loss(w, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ w) - y) ** 2)


def test_chunks_average_to_the_full_data_loss():
    kx, ky, kv = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (4, 8, 3), jnp.float64)
    y = jax.random.normal(ky, (4, 8), jnp.float64)
    w = jnp.array([0.3, -0.2, 0.5])
    v = jax.random.normal(kv, (3,), jnp.float64)
    alphas = jnp.linspace(-1.0, 1.0, 21)
    res = directional_loss(chunk_loss, w, v, alphas, chunks=(x, y))
    full = lambda w: chunk_loss(w, (x.reshape(32, 3), y.reshape(32)))  # noqa: E731
    ref = directional_loss(full, w, v, alphas)
    for name in ("losses", "model", "slope", "curvature", "loss0", "alpha_star"):
        np.testing.assert_allclose(getattr(res, name), getattr(ref, name), rtol=1e-10)


def test_under_jit_and_plot_inputs():
    f = _f(jnp.float64)
    p = jnp.asarray(THETA0)

    @jax.jit
    def run(p, v, alphas):
        return directional_loss(f, p, v, alphas, eigenvalue=2.0)

    res = run(p, jnp.asarray(V[:, 3]), jnp.linspace(0.0, 1.0, 11))
    assert float(res.curvature) == 2.0
    pytest.importorskip("matplotlib")
    from hesskit.plots import plot_directional_loss, plot_step_sizes

    eig = hk.eigsh(hk.hessian_operator(f, p), jax.random.key(0), k=2, which="BE")
    er = eigen_directional_losses(f, p, eig, jnp.linspace(0.0, 4.0, 41))
    fig = plot_directional_loss(
        er.alphas, er.losses, eigenvalues=er.curvature, slopes=er.slope, loss0=er.loss0[0]
    )
    assert len(fig.axes) == 2
    fig = plot_step_sizes(eig.eigenvalues, er.best_decrease, er.alpha_star)
    assert len(fig.axes) >= 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_step_check_on_a_quadratic(dtype):
    f = _f(dtype)
    p = jnp.asarray(THETA0, dtype)
    g = A64 @ THETA0 + 1.0
    gg, ghg = g @ g, g @ A64 @ g
    critical = 2 * gg / ghg
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    for lr, increases in ((0.5 * critical, False), (1.5 * critical, True)):
        chk = step_check(f, p, lr)
        expected = -lr * gg + 0.5 * lr**2 * ghg
        np.testing.assert_allclose(float(chk.predicted), expected, rtol=rtol)
        np.testing.assert_allclose(float(chk.actual), expected, rtol=rtol * 10)
        np.testing.assert_allclose(float(chk.g_curvature), ghg / gg, rtol=rtol)
        np.testing.assert_allclose(float(chk.grad_norm_sq), gg, rtol=rtol)
        np.testing.assert_allclose(float(chk.critical_lr), critical, rtol=rtol)
        assert bool(chk.increases) is increases
        assert bool(chk.poorly_conditioned) is increases
        assert chk.predicted.dtype == dtype


def test_step_check_non_quadratic():
    p = {"x": jnp.asarray(0.3), "y": jnp.asarray(0.2)}
    # the model is second-order accurate: the gap shrinks like lr^3
    gaps = []
    for lr in (1e-2, 1e-3):
        chk = step_check(saddle_toy, p, lr)
        gaps.append(abs(float(chk.actual - chk.predicted)))
        assert not bool(chk.increases)
    assert gaps[1] < gaps[0] * 2e-3
    # along the gradient the curvature is mixed; a large step increases the loss
    big = step_check(saddle_toy, p, 5.0)
    assert float(big.actual) > 0


def test_step_check_negative_curvature_never_predicts_increase():
    p = {"x": jnp.asarray(0.0), "y": jnp.asarray(0.1)}  # gradient along y, negative curvature
    chk = step_check(saddle_toy, p, 100.0)
    assert float(chk.g_curvature) < 0
    assert float(chk.critical_lr) == np.inf
    assert not bool(chk.increases) and not bool(chk.poorly_conditioned)


def test_bad_input():
    f = _f(jnp.float64)
    p = jnp.asarray(THETA0)
    v = jnp.asarray(V[:, 0])
    with pytest.raises(ValueError, match="non-empty"):
        directional_loss(f, p, v, jnp.zeros((0,)))
    with pytest.raises(ValueError, match="non-empty"):
        directional_loss(f, p, v, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        directional_loss(f, p, v, jnp.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="finite"):
        directional_loss(f, p, v, [0.0, np.inf])
    with pytest.raises(ValueError, match="zero"):
        directional_loss(f, p, jnp.zeros_like(v), jnp.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="direction"):
        directional_loss(f, p, {"a": v}, jnp.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="direction"):
        directional_loss(f, p, v[:3], jnp.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="lr"):
        step_check(f, p, 0.0)
    with pytest.raises(ValueError, match="lr"):
        step_check(f, p, np.nan)
    eig = hk.EigResult(jnp.ones(2), {"w": jnp.ones((2, 6))}, jnp.zeros(2), None, 0, 0, True)
    with pytest.raises(ValueError, match="eigenvectors"):
        eigen_directional_losses(f, p, eig, jnp.linspace(0, 1, 3))
    eig = hk.EigResult(jnp.ones(3), jnp.ones((2, 6)), jnp.zeros(2), None, 0, 0, True)
    with pytest.raises(ValueError, match="leading size"):
        eigen_directional_losses(f, p, eig, jnp.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="chunk"):
        directional_loss(chunk_loss, jnp.zeros(3), jnp.ones(3), [0.0], chunks=(jnp.ones(3), 1.0))


def test_chunk_size_does_not_change_the_losses():
    # A grid of 23 points one at a time, in ragged chunks of 5 and all at once.
    f = _f(jnp.float64)
    p, v = jnp.asarray(THETA0), jnp.asarray(V[:, 2])
    alphas = jnp.linspace(-0.5, 2.0, 23)
    base = directional_loss(f, p, v, alphas, chunk_size=23)
    for chunk in (1, 5, 100):
        res = directional_loss(f, p, v, alphas, chunk_size=chunk)
        np.testing.assert_allclose(res.losses, base.losses, rtol=1e-11)
        assert float(res.alpha_star) == float(base.alpha_star)
    vectors = jnp.asarray(V[:, 1:4].T)
    eig = hk.EigResult._make([None] * len(hk.EigResult._fields))._replace(
        eigenvalues=jnp.asarray(W[1:4]), eigenvectors=vectors
    )
    res = eigen_directional_losses(f, p, eig, alphas, chunk_size=5)
    for i in range(3):
        one = directional_loss(f, p, vectors[i], alphas, eigenvalue=W[1 + i])
        np.testing.assert_allclose(res.losses[i], one.losses, rtol=1e-11)
        np.testing.assert_allclose(res.model[i], one.model, rtol=1e-11)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        directional_loss(f, p, v, alphas, chunk_size=0)
