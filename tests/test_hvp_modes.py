"""HVP modes: forward-over-reverse, reverse-over-reverse, finite differences, and "auto".

A loss with a ``jax.custom_vjp`` log-sum-exp cross-entropy, followed by a nonlinearity so that
its forward-mode tangent is really needed, is where forward mode fails: "auto" must pick
reverse-over-reverse and every exact mode must equal the dense ``jax.hessian`` (computed here by
reverse-over-reverse of the plain, non-custom loss).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from spectra import WIDE

import hesskit as hk


@jax.custom_vjp
def fused_lse(z):
    return jax.nn.logsumexp(z, axis=-1)


def _lse_fwd(z):
    return fused_lse(z), z


def _lse_bwd(z, g):
    return (g[..., None] * jax.nn.softmax(z, axis=-1),)


fused_lse.defvjp(_lse_fwd, _lse_bwd)


def make_loss(lse):
    def loss(p, batch):
        x, y = batch
        logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
        ce = lse(logits) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        # The square makes the gradient depend on the custom_vjp's output: its forward-mode
        # tangent is then needed by fwd-rev, which JAX refuses.
        return jnp.mean(ce) + 0.1 * jnp.mean(ce) ** 2

    return loss


LOSS = make_loss(fused_lse)
PLAIN = make_loss(lambda z: jax.nn.logsumexp(z, axis=-1))


def problem(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    p = {
        "w1": 0.8 * jax.random.normal(k[0], (4, 5), dtype),
        "w2": 0.8 * jax.random.normal(k[1], (5, 3), dtype),
    }
    batch = (jax.random.normal(k[2], (16, 4), dtype), jax.random.randint(k[3], (16,), 0, 3))
    return p, batch


def dense(loss, p, batch):
    flat, unravel = ravel_pytree(p)
    return np.asarray(jax.hessian(lambda z: loss(unravel(z), batch))(flat))


def tol(dtype):
    return 1e-4 if dtype == jnp.float32 else 1e-10


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_auto_falls_back_to_rev_rev_and_matches_dense(dtype):
    p, batch = problem(dtype)
    want = dense(PLAIN, p, batch)
    op = hk.hessian_operator(LOSS, p, batch)
    assert op.mode == "rev-rev" and "mode='rev-rev'" in repr(op)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(op.to_dense()), want, atol=tol(dtype) * scale)
    # Linearized products (what the solvers use) equal the plain ones.
    v = jax.tree_util.tree_map(jnp.ones_like, p)
    lin = jax.jit(lambda o, v: o.linearize()(v))(op, v)
    hv_want = want @ ravel_pytree(v)[0]
    vtol = tol(dtype) * np.abs(hv_want).max()
    np.testing.assert_allclose(ravel_pytree(lin)[0], hv_want, atol=vtol)
    # The plain loss keeps forward-over-reverse.
    assert hk.hessian_operator(PLAIN, p, batch).mode == "fwd-rev"
    # hvp picks the same mode.
    hv = hk.hvp(lambda q: LOSS(q, batch), p, v)
    np.testing.assert_allclose(ravel_pytree(hv)[0], hv_want, atol=vtol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_forced_modes_match_dense(dtype):
    p, batch = problem(dtype)
    want = dense(PLAIN, p, batch)
    scale = np.abs(want).max()
    for loss, mode in [(PLAIN, "fwd-rev"), (PLAIN, "rev-rev"), (LOSS, "rev-rev")]:
        got = hk.hessian_operator(loss, p, batch, mode=mode).to_dense()
        np.testing.assert_allclose(np.asarray(got), want, atol=tol(dtype) * scale)
    # fd: a looser tolerance, about eps^(2/3), still far below a wrong entry (scale ~1).
    fd_tol = 3e-3 if dtype == jnp.float32 else 1e-7
    op = hk.hessian_operator(LOSS, p, batch, mode="fd")
    assert op.mode == "fd"
    got = np.asarray(op.to_dense())
    np.testing.assert_allclose(got, want, atol=fd_tol * scale)
    res = hk.eigsh(op, jax.random.key(0), 2, which="LA")
    np.testing.assert_allclose(
        np.asarray(res.eigenvalues), np.linalg.eigvalsh(want)[::-1][:2], rtol=10 * fd_tol
    )


def test_forcing_fwd_rev_on_a_custom_vjp_is_a_clear_error():
    p, batch = problem(jnp.float32)
    with pytest.raises(TypeError, match=r"mode='fwd-rev'.*custom_vjp.*fused_lse.*rev-rev"):
        hk.hessian_operator(LOSS, p, batch, mode="fwd-rev")
    with pytest.raises(TypeError, match="custom_vjp"):
        hk.hvp(lambda q: LOSS(q, batch), p, p, mode="fwd-rev")
    with pytest.raises(ValueError, match="mode must be one of"):
        hk.hessian_operator(LOSS, p, batch, mode="forward")


class Counting:
    def __init__(self, loss):
        self.loss, self.traces = loss, 0

    def __call__(self, p, batch):
        self.traces += 1
        return self.loss(p, batch)


# auto (which resolves to rev-rev here) stays in make test; the forced modes only add compiles.
@pytest.mark.parametrize(
    "mode",
    [
        "auto",
        pytest.param("rev-rev", marks=pytest.mark.slow),
        pytest.param("fd", marks=pytest.mark.slow),
    ],
)
def test_modes_compile_once_for_new_data(mode):
    loss = Counting(LOSS)
    p, batch = problem(jnp.float64)
    hk.eigsh(hk.hessian_operator(loss, p, batch, mode=mode), jax.random.key(0), 2)
    first = loss.traces
    p1, b1 = problem(jnp.float64, seed=1)
    op = hk.hessian_operator(loss, p1, b1, mode=mode)
    res = hk.eigsh(op, jax.random.key(0), 2)
    assert loss.traces == first
    want = np.linalg.eigvalsh(dense(PLAIN, p1, b1))[::-1][:2]
    rtol = 1e-5 if mode == "fd" else 1e-8
    np.testing.assert_allclose(np.asarray(res.eigenvalues), want, rtol=rtol)


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.float64])
def test_ggn_modes_with_custom_vjp_loss(dtype):
    p, (x, y) = problem(dtype)

    def model(q, batch):
        return jnp.tanh(batch[0] @ q["w1"]) @ q["w2"]

    def out_loss(lse):
        def f(logits, batch):
            ce = lse(logits) - jnp.take_along_axis(logits, batch[1][:, None], axis=-1)[:, 0]
            return jnp.mean(ce) + 0.1 * jnp.mean(ce) ** 2

        return f

    flat, unravel = ravel_pytree(p)
    J = jax.jacrev(lambda z: model(unravel(z), (x, y)).reshape(-1))(flat)
    out = model(p, (x, y))
    plain = out_loss(lambda z: jax.nn.logsumexp(z, axis=-1))
    hl = jax.hessian(lambda o: plain(o.reshape(out.shape), (x, y)))(out.reshape(-1))
    want = np.asarray(J.T @ hl @ J)
    scale = np.abs(want).max()
    op = hk.ggn_operator(model, out_loss(fused_lse), p, (x, y))
    assert op.mode == "rev-rev"
    np.testing.assert_allclose(np.asarray(op.to_dense()), want, atol=tol(dtype) * scale)
    assert hk.ggn_operator(model, plain, p, (x, y)).mode == "fwd-rev"
    fd = hk.ggn_operator(model, out_loss(fused_lse), p, (x, y), mode="fd").to_dense()
    fd_tol = 3e-3 if dtype == jnp.float32 else 1e-7
    np.testing.assert_allclose(np.asarray(fd), want, atol=fd_tol * scale)
    with pytest.raises(TypeError, match="custom_vjp"):
        hk.ggn_operator(model, out_loss(fused_lse), p, (x, y), mode="fwd-rev")


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev", "fd"])
def test_hvp_has_aux_in_every_mode(mode):
    def f(p):
        return jnp.sum(jnp.tanh(p["w"]) ** 3), {"m": jnp.mean(p["w"])}

    p = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=WIDE)}
    v = {"w": jnp.arange(6.0, dtype=WIDE)}
    ref = jax.hessian(lambda q: f(q)[0])(p)["w"]["w"] @ v["w"]
    hv, aux = hk.hvp(f, p, v, has_aux=True, mode=mode)
    rtol = 1e-4 if mode == "fd" else (1e-10 if WIDE == jnp.float64 else 1e-5)
    np.testing.assert_allclose(hv["w"], ref, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(ref))))
    np.testing.assert_allclose(aux["m"], jnp.mean(p["w"]), atol=1e-7)


@pytest.mark.parametrize("linearize", [False, True])
def test_mean_operator_modes_with_custom_vjp_and_ragged_chunk(linearize):
    p, _ = problem(jnp.float64)
    k = jax.random.split(jax.random.key(3), 2)
    n, size = 19, 6  # chunks of 6, 6, 6 and a ragged 1
    x = jax.random.normal(k[0], (n, 4), jnp.float64)
    y = jax.random.randint(k[1], (n,), 0, 3)
    # The loss is not a plain mean over examples (its square term), so the reference is the
    # size-weighted sum of the chunks' own dense Hessians.
    want = sum(
        (min(s + size, n) - s) / n * dense(PLAIN, p, (x[s : s + size], y[s : s + size]))
        for s in range(0, n, size)
    )
    scale = np.abs(want).max()
    op = hk.mean_hessian_operator(LOSS, p, (x, y), chunk_size=size, linearize=linearize)
    assert op.mode == "rev-rev" and "mode='rev-rev'" in repr(op)
    np.testing.assert_allclose(np.asarray(op.to_dense()), want, atol=1e-10 * scale)
    # What the solvers apply: the linearized operator (all chunks' vjp residuals when kept).
    v = jax.tree_util.tree_map(jnp.ones_like, p)
    lin = jax.jit(lambda o, v: o.linearize()(v))(op, v)
    hv_want = want @ ravel_pytree(v)[0]
    np.testing.assert_allclose(ravel_pytree(lin)[0], hv_want, atol=1e-10 * np.abs(hv_want).max())
    plain = hk.mean_hessian_operator(PLAIN, p, (x, y), chunk_size=size, linearize=linearize)
    assert plain.mode == "fwd-rev"
    np.testing.assert_allclose(np.asarray(plain.to_dense()), want, atol=1e-10 * scale)
    fd = hk.mean_hessian_operator(LOSS, p, (x, y), chunk_size=size, linearize=linearize, mode="fd")
    assert fd.mode == "fd"
    np.testing.assert_allclose(np.asarray(fd.to_dense()), want, atol=1e-7 * scale)
    with pytest.raises(TypeError, match=r"mode='fwd-rev'.*custom_vjp.*fused_lse"):
        hk.mean_hessian_operator(LOSS, p, (x, y), chunk_size=size, mode="fwd-rev")
