"""Property tests: hesskit's Hessian operator equals the analytic Hessian of random cubics."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import hesskit as hk


@jax.jit
def _dense_and_hvp(a, c, x, v):
    # f(x) = 1/2 x^T A x + sum c_i x_i^3 has H = A + diag(6 c x).
    def f(p):
        z = jnp.concatenate([p["u"], p["w"].reshape(-1)])
        return 0.5 * z @ a @ z + jnp.sum(c * z**3)

    params = {"u": x[:2], "w": x[2:].reshape(2, 2)}
    vec = {"u": v[:2], "w": v[2:].reshape(2, 2)}
    op = hk.hessian_operator(f, params)
    hv = op(vec)
    fd = hk.fd_hvp(f, params, vec)
    flat = lambda t: jnp.concatenate([t["u"], t["w"].reshape(-1)])  # noqa: E731
    return op.to_dense(), flat(hv), flat(fd)


floats = st.floats(-2.0, 2.0, allow_nan=False, width=64)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(floats, min_size=36, max_size=36),
    st.lists(floats, min_size=6, max_size=6),
    st.lists(floats, min_size=6, max_size=6),
    st.lists(floats, min_size=6, max_size=6),
)
def test_hessian_operator_matches_analytic_cubic(a, c, x, v):
    a = np.asarray(a).reshape(6, 6)
    a = a + a.T
    c, x, v = map(np.asarray, (c, x, v))
    dense, hv, fd = _dense_and_hvp(a, c, x, v)
    want = a + np.diag(6 * c * x)
    np.testing.assert_allclose(dense, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hv, want @ v, rtol=1e-12, atol=1e-12)
    # The cubic's third derivative is constant, so the central difference is exact up to
    # rounding: eps^(2/3) relative to the scale of the problem.
    scale = 1.0 + np.abs(want).sum() * (1.0 + np.abs(v).max())
    np.testing.assert_allclose(fd, want @ v, atol=1e-8 * scale)


def _least_squares(p, x):
    # mean over the chunk's examples of (x_i . p)^2 / 2 + a cubic term: H = X^T X / n + ...
    return 0.5 * jnp.mean((x @ p) ** 2) + jnp.mean(x[:, 0]) * jnp.sum(p**3)


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 13), st.integers(1, 16), st.booleans())
def test_ragged_chunks_weight_each_example_equally(n, chunk_size, linearize):
    x = jax.random.normal(jax.random.key(n), (n, 3), jnp.float64)
    p = jnp.asarray([0.3, -0.2, 0.5])
    op = hk.mean_hessian_operator(_least_squares, p, x, chunk_size=chunk_size, linearize=linearize)
    want = jax.hessian(lambda q: _least_squares(q, x))(p)
    np.testing.assert_allclose(op.to_dense(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.linearize().to_dense(), want, rtol=1e-12, atol=1e-12)
