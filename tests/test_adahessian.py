"""AdaHessian: the Hutchinson diagonal, spatial averaging, the update rule, delayed estimates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from spectra import matrix_with_spectrum

import hesskit.transforms as ht


def test_diagonal_estimate_within_hutchinson_error():
    a = matrix_with_spectrum(np.linspace(-1.0, 4.0, 30), seed=2)
    f = lambda x: 0.5 * x @ jnp.asarray(a) @ x  # noqa: E731
    n = 64
    opt = ht.adahessian(num_probes=n, spatial_axes=None)
    x = jnp.ones(30)
    _, state = opt.update(jax.grad(f)(x), opt.init(x), x, value_fn=f)
    # Entry i of the mean of n probes z * Az has variance sum_{l != i} A_il^2 / n.
    sigma = np.sqrt((np.sum(a**2, axis=1) - np.diag(a) ** 2) / n)
    err = np.abs(np.asarray(state.diagonal) - np.abs(np.diag(a)))
    assert np.all(err <= 4.5 * sigma)
    assert np.mean(err <= 2 * sigma) > 0.85


def test_update_rule_on_a_diagonal_quadratic():
    # Rademacher probes are exact on a diagonal Hessian: D = |d| at every step.
    d = jnp.array([4.0, 1.0, 0.25])
    f = lambda x: 0.5 * jnp.sum(d * x**2)  # noqa: E731
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-4
    opt = ht.adahessian(lr, b1=b1, b2=b2, eps=eps)
    x = jnp.ones(3)
    state = opt.init(x)
    m = v = np.zeros(3)
    ref = np.ones(3)
    for t in range(1, 4):
        g = d * ref
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * np.asarray(d) ** 2
        ref = ref - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        u, state = opt.update(jax.grad(f)(x), state, x, value_fn=f)
        x = optax.apply_updates(x, u)
    np.testing.assert_allclose(x, ref, rtol=1e-6)


def test_spatial_average_and_delayed_estimates():
    def f(p):
        return jnp.sum(jnp.sin(p["conv"]) * 3.0) + jnp.sum(p["dense"] ** 4)

    params = {"conv": jnp.linspace(0.0, 1.0, 36).reshape(3, 3, 2, 2), "dense": jnp.ones((2, 2))}
    opt = ht.adahessian(update_every=3)
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(jax.grad(f)(p), s, p, value_fn=f))
    counts = []
    for _ in range(7):
        _, state = step(params, state)
        counts.append(int(state.hessian_count))
    assert counts == [1, 1, 1, 2, 2, 2, 3]
    # Both Hessians are diagonal: the estimate is exact, averaged over the 3x3 kernel window.
    exact = np.abs(-3.0 * np.sin(np.asarray(params["conv"])))
    np.testing.assert_allclose(
        state.diagonal["conv"], np.broadcast_to(exact.mean((0, 1)), exact.shape), rtol=1e-6
    )
    np.testing.assert_allclose(state.diagonal["dense"], 12.0 * np.ones((2, 2)), rtol=1e-6)
    trailing = ht.spatial_average({"k": jnp.asarray(exact)}, "trailing")["k"]
    np.testing.assert_allclose(trailing[0, 0], np.full((2, 2), exact[0, 0].mean()), rtol=1e-6)
