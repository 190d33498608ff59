"""Curvature operators against dense references (jax.hessian of the raveled loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from spectra import WIDE, WIDE_NAME

import hesskit as hk
from hesskit.examples import LinenCNN as CNN

# float32 HVPs of these O(1) losses are accurate to a few ulps of the largest entries; 2e-4 leaves
# room for summation order without hiding a wrong sign or a missing term (those are O(1) errors).
TOL = {jnp.float64: dict(rtol=1e-10, atol=1e-10), jnp.float32: dict(rtol=2e-4, atol=2e-4)}
DTYPES = [jnp.float64, jnp.float32]


def mlp_problem(dtype, n=24, seed=0):
    """A tanh MLP with nested dict/tuple params and a squared-error loss on random data."""
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "layers": (
            {"w": 0.5 * jax.random.normal(k[0], (4, 5), dtype), "b": 0.1 * jnp.ones(5, dtype)},
            {"w": 0.5 * jax.random.normal(k[1], (5, 3), dtype), "b": jnp.zeros(3, dtype)},
        ),
        "scale": jnp.asarray(1.3, dtype),
    }
    x = jax.random.normal(k[2], (n, 4), dtype)
    y = jax.random.normal(k[3], (n, 3), dtype)

    def model(p, x):
        h = jnp.tanh(x @ p["layers"][0]["w"] + p["layers"][0]["b"])
        return p["scale"] * (h @ p["layers"][1]["w"] + p["layers"][1]["b"])

    def loss(p, batch):
        xb, yb = batch
        return 0.5 * jnp.mean(jnp.sum((model(p, xb) - yb) ** 2, axis=-1))

    return params, (x, y), model, loss


def cnn_problem(dtype, n=6, seed=0):
    module = CNN(channels=(2, 3), hidden=4, num_classes=3)
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (n, 8, 8, 1), dtype)
    y = jax.random.randint(k[1], (n,), 0, 3)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), module.init(k[2], x))

    def loss(p):
        logits = module.apply(p, x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return params, loss


def dense_hessian(f, params):
    flat, unravel = ravel_pytree(params)
    return jax.jit(jax.hessian(lambda z: f(unravel(z))))(flat)


@jax.jit
def to_dense(op):
    # Compiled once per operator type: eager op-by-op vmaps of flax models are slow on CPU.
    return op.to_dense()


def random_like(key, params):
    return hk.tree_random_normal(key, params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hvp_matches_dense_hessian_mlp(dtype):
    params, batch, _, loss = mlp_problem(dtype)
    f = lambda p: loss(p, batch)  # noqa: E731
    H = dense_hessian(f, params)
    v = random_like(jax.random.key(1), params)
    got = ravel_pytree(hk.hvp(f, params, v))[0]
    want = H @ ravel_pytree(v)[0]
    np.testing.assert_allclose(got, want, **TOL[dtype])
    assert all(a.dtype == dtype for a in jax.tree_util.tree_leaves(hk.hvp(f, params, v)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hessian_operator_to_dense_cnn(dtype):
    params, f = cnn_problem(dtype)
    op = hk.hessian_operator(f, params)
    H = dense_hessian(f, params)
    assert op.dim == H.shape[0]
    assert op.dtype == dtype
    D = to_dense(op)
    np.testing.assert_allclose(D, H, **TOL[dtype])
    # Symmetry is a property of the true Hessian; forward-over-reverse keeps it to rounding.
    np.testing.assert_allclose(D, D.T, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_damping_linearize_jit_and_vmap(dtype):
    params, batch, _, loss = mlp_problem(dtype)
    f = lambda p: loss(p, batch)  # noqa: E731
    H = dense_hessian(f, params)
    op = hk.hessian_operator(f, params, damping=0.7)
    vs = hk.tree_stack([random_like(jax.random.key(i), params) for i in range(3)])
    flat_vs = jax.vmap(lambda v: ravel_pytree(v)[0])(vs)
    want = flat_vs @ (H + 0.7 * jnp.eye(H.shape[0], dtype=dtype)).T

    got_vmap = jax.vmap(lambda v: ravel_pytree(op(v))[0])(vs)
    np.testing.assert_allclose(got_vmap, want, **TOL[dtype])

    @jax.jit
    def apply_linearized(op, vs):
        lin = op.linearize()
        return jax.vmap(lambda v: ravel_pytree(lin(v))[0])(vs)

    np.testing.assert_allclose(apply_linearized(op, vs), want, **TOL[dtype])
    out = op.matmat(vs)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(vs)
    assert all(a.dtype == dtype for a in jax.tree_util.tree_leaves(out))


def test_operator_is_a_pytree_and_does_not_recompile_for_new_points():
    params, batch, _, loss = mlp_problem(WIDE)
    f = lambda p: loss(p, batch)  # noqa: E731
    traces = []

    @jax.jit
    def quad(op, v):
        traces.append(1)
        return hk.tree_vdot(v, op(v))

    v = random_like(jax.random.key(3), params)
    q1 = quad(hk.hessian_operator(f, params), v)
    shifted = jax.tree_util.tree_map(lambda a: a + 0.1, params)
    q2 = quad(hk.hessian_operator(f, shifted, damping=2.0), v)
    assert len(traces) == 1
    H2 = dense_hessian(f, shifted)
    vf = ravel_pytree(v)[0]
    np.testing.assert_allclose(q2, vf @ H2 @ vf + 2.0 * vf @ vf, rtol=TOL[WIDE]["rtol"])
    assert not np.isclose(q1, q2)


def test_linear_operator_on_plain_array_and_shift():
    A = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.0, -1.0, 1.0]])
    op = hk.LinearOperator(lambda v: A @ v, jnp.zeros(3))
    assert op.dim == 3
    np.testing.assert_allclose(op.to_dense(), A)
    np.testing.assert_allclose((op + 2.0).to_dense(), A + 2 * jnp.eye(3))
    np.testing.assert_allclose((op - 1.0).shifted(0.5).to_dense(), A - 0.5 * jnp.eye(3))
    leaves = jax.tree_util.tree_leaves(op + 2.0)
    assert len(leaves) == 1  # the shift is a leaf; the lambda is static
    out = jax.jit(lambda o, v: o(v))(op + 2.0, jnp.ones(3))
    np.testing.assert_allclose(out, (A + 2 * jnp.eye(3)) @ jnp.ones(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_hessian_operator_equals_full_batch(dtype):
    params, (x, y), _, loss = mlp_problem(dtype, n=24)
    full = dense_hessian(lambda p: loss(p, (x, y)), params)
    chunks = (x.reshape(4, 6, 4), y.reshape(4, 6, 3))
    op = hk.mean_hessian_operator(loss, params, chunks)
    np.testing.assert_allclose(to_dense(op), full, **TOL[dtype])
    # A list of chunks is stacked; damping adds to the diagonal.
    listed = [(x[i * 6 : (i + 1) * 6], y[i * 6 : (i + 1) * 6]) for i in range(4)]
    op2 = hk.mean_hessian_operator(loss, params, listed, damping=0.5)
    want = full + 0.5 * jnp.eye(full.shape[0], dtype=dtype)
    np.testing.assert_allclose(to_dense(op2), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ggn_matches_dense_jt_hl_j(dtype):
    params, (x, y), model, _ = mlp_problem(dtype)
    model_fn = lambda p: model(p, x)  # noqa: E731

    def out_loss(out):
        return jnp.mean(jax.nn.logsumexp(out, axis=-1) - jnp.sum(out * jax.nn.softmax(y), -1))

    flat, unravel = ravel_pytree(params)
    J = jax.jit(jax.jacfwd(lambda z: model_fn(unravel(z)).reshape(-1)))(flat)
    out = model_fn(params)
    HL = jax.jit(jax.hessian(lambda o: out_loss(o.reshape(out.shape))))(out.reshape(-1))
    want = J.T @ HL @ J
    op = hk.ggn_operator(model_fn, out_loss, params)
    np.testing.assert_allclose(to_dense(op), want, **TOL[dtype])
    lin = jax.jit(lambda o: o.linearize().to_dense())(op)
    np.testing.assert_allclose(lin, want, **TOL[dtype])
    # Convex output loss: the GGN is positive semidefinite even where the Hessian is not.
    if dtype == jnp.float64:
        assert np.linalg.eigvalsh(np.asarray(to_dense(op))).min() > -1e-10
        hess = dense_hessian(lambda p: out_loss(model_fn(p)), params)
        assert np.linalg.eigvalsh(np.asarray(hess)).min() < -1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_restrict_is_the_diagonal_block(dtype):
    params, batch, _, loss = mlp_problem(dtype)
    f = lambda p: loss(p, batch)  # noqa: E731
    H = dense_hessian(f, params)
    mask = {"layers": ({"w": False, "b": True}, {"w": True, "b": False}), "scale": True}
    # Index set of the block in the raveled order.
    flags, _ = ravel_pytree(jax.tree_util.tree_map(lambda m, p: jnp.full(p.shape, m), mask, params))
    idx = np.flatnonzero(np.asarray(flags))
    block = hk.restrict(hk.hessian_operator(f, params, damping=0.25), mask)
    assert block.dim == idx.size
    assert block.like["layers"][0]["w"] is None
    want = H[np.ix_(idx, idx)] + 0.25 * jnp.eye(idx.size, dtype=dtype)
    np.testing.assert_allclose(to_dense(block), want, **TOL[dtype])
    lin = jax.jit(lambda o: o.linearize().to_dense())(block)
    np.testing.assert_allclose(lin, want, **TOL[dtype])
    # A callable mask (as in optax.masked) selecting the weight matrices only.
    by_ndim = hk.restrict(
        hk.hessian_operator(f, params), lambda p: jax.tree_util.tree_map(lambda a: a.ndim == 2, p)
    )
    assert by_ndim.dim == 4 * 5 + 5 * 3
    # Embedding and selecting round-trip.
    v = random_like(jax.random.key(0), params)
    sel = hk.tree_mask_select(v, mask)
    back = hk.tree_mask_embed(sel, mask, params)
    np.testing.assert_allclose(back["layers"][1]["w"], v["layers"][1]["w"])
    assert not np.any(back["layers"][0]["w"])


def test_flax_params_as_they_are():
    params, f = cnn_problem(jnp.float32)
    assert "params" in params  # flax's own nesting, untouched
    v = random_like(jax.random.key(0), params)
    out = jax.jit(lambda p, v: hk.hessian_operator(f, p)(v))(params, v)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)


# -- finite differences -------------------------------------------------------------------------
def _fd_error(f, params, v, eps=None):
    exact = ravel_pytree(hk.hvp(f, params, v))[0]
    approx = ravel_pytree(hk.fd_hvp(f, params, v, eps=eps))[0]
    return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))


@pytest.mark.x64(reason="float32 rounding (eps/h) swamps the O(h^2) truncation error")
def test_fd_hvp_truncation_error_is_second_order():
    params, batch, _, loss = mlp_problem(jnp.float64)
    f = lambda p: loss(p, batch)  # noqa: E731
    v = random_like(jax.random.key(5), params)
    e1 = _fd_error(f, params, v, eps=1e-2)
    e2 = _fd_error(f, params, v, eps=5e-3)
    # Central differences: halving the step divides the truncation error by about 4.
    assert 3.0 < e1 / e2 < 5.0
    assert e1 < 1e-2


@pytest.mark.parametrize("dtype, bound", [(jnp.float64, 1e-8), (jnp.float32, 3e-3)])
def test_fd_hvp_default_step_error_bound(dtype, bound):
    params, batch, _, loss = mlp_problem(dtype)
    f = lambda p: loss(p, batch)  # noqa: E731
    v = random_like(jax.random.key(6), params)
    # eps_mach^(2/3) is 5e-11 (f64) and 2.4e-5 (f32); the bounds leave a margin for the constants.
    assert _fd_error(f, params, v) < bound
    out = hk.fd_hvp(f, params, v)
    assert all(a.dtype == dtype for a in jax.tree_util.tree_leaves(out))
    zero = hk.fd_hvp(f, params, hk.tree_zeros_like(params))
    assert all(not np.any(a) for a in jax.tree_util.tree_leaves(zero))


# -- bad input ----------------------------------------------------------------------------------
def test_non_scalar_function_is_rejected():
    with pytest.raises(ValueError, match="scalar"):
        hk.hvp(lambda p: p * 2.0, jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="scalar"):
        hk.hessian_operator(lambda p: p, jnp.ones(3))
    with pytest.raises(ValueError, match="scalar"):
        hk.ggn_operator(lambda p: p, lambda o: o, jnp.ones(3))


def test_mismatched_vectors_are_rejected():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    f = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 3)  # noqa: E731
    with pytest.raises(ValueError, match="structure"):
        hk.hvp(f, params, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="shapes and dtypes"):
        hk.hvp(f, params, {"a": jnp.ones(3), "b": jnp.ones(4)})
    with pytest.raises(ValueError, match="shapes and dtypes"):
        hk.hvp(f, params, {"a": jnp.ones(3, jnp.float16), "b": jnp.ones((2, 2))})
    op = hk.hessian_operator(f, params)
    with pytest.raises(ValueError, match="structure"):
        op([jnp.ones(3), jnp.ones((2, 2))])


def test_integer_and_complex_params_are_rejected():
    f = lambda p: jnp.sum(p**2).real  # noqa: E731
    with pytest.raises(TypeError, match="non-floating"):
        hk.hessian_operator(f, jnp.arange(3))
    # The leaf is named and the message says how to filter, not to cast.
    params = {"w": jnp.ones(2), "bn": {"count": jnp.zeros((), jnp.int32)}}
    with pytest.raises(TypeError, match=r"params\['bn'\]\['count'\] has non-floating") as err:
        hk.hessian_operator(lambda p: jnp.sum(p["w"] ** 2), params)
    assert "eqx.partition(model, eqx.is_inexact_array)" in str(err.value)
    assert "nnx.split(model, nnx.Param" in str(err.value)
    assert "cast" not in str(err.value)
    with pytest.raises(TypeError, match="complex"):
        hk.hvp(f, jnp.ones(3, jnp.complex64), jnp.ones(3, jnp.complex64))


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan")])
def test_non_positive_eps_is_rejected(eps):
    with pytest.raises(ValueError, match="eps"):
        hk.fd_hvp(lambda p: jnp.sum(p**2), jnp.ones(3), jnp.ones(3), eps=eps)


def test_bad_chunks_are_rejected():
    params, (x, y), _, loss = mlp_problem(WIDE)
    with pytest.raises(ValueError, match="same structure and shapes"):
        hk.mean_hessian_operator(loss, params, [(x[:6], y[:6]), (x[6:10], y[6:10])])
    with pytest.raises(ValueError, match="different leading"):
        hk.mean_hessian_operator(loss, params, (x.reshape(4, 6, 4), y.reshape(3, 8, 3)))
    with pytest.raises(ValueError, match="leading chunk axis"):
        hk.mean_hessian_operator(lambda p, c: loss(p, (x, y)) * c, params, jnp.asarray(1.0))
    with pytest.raises(ValueError, match="empty"):
        hk.mean_hessian_operator(loss, params, [])


def test_bad_masks_are_rejected():
    op = hk.hessian_operator(
        lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2), {"a": jnp.ones(2), "b": jnp.ones(2)}
    )
    with pytest.raises(ValueError, match="selects no parameters"):
        hk.restrict(op, {"a": False, "b": False})
    with pytest.raises(ValueError, match="structure"):
        hk.restrict(op, {"a": True})
    with pytest.raises(TypeError, match="Python bools"):
        hk.restrict(op, {"a": jnp.array(True), "b": False})


def test_negative_damping_is_rejected():
    with pytest.raises(ValueError, match="damping"):
        hk.hessian_operator(lambda p: jnp.sum(p**2), jnp.ones(2), damping=-1.0)


# -- data as operator arguments -------------------------------------------------------------------
def _dense_with_args(f, params, *args):
    return dense_hessian(lambda p: f(p, *args), params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hessian_operator_with_data_arguments(dtype):
    params, batch, _, loss = mlp_problem(dtype)
    op = hk.hessian_operator(loss, params, batch, damping=0.25)
    assert op.args == (batch,)
    H = _dense_with_args(loss, params, batch)
    eye = jnp.eye(H.shape[0], dtype=dtype)
    np.testing.assert_allclose(to_dense(op), H + 0.25 * eye, **TOL[dtype])
    lin = jax.jit(lambda o: o.linearize().to_dense())(op)
    np.testing.assert_allclose(lin, H + 0.25 * eye, **TOL[dtype])
    # The data are leaves: the same treedef for another batch, and with_args rebinds them.
    _, batch2, _, _ = mlp_problem(dtype, seed=1)
    op2 = op.with_args(batch2)
    assert jax.tree_util.tree_structure(op2) == jax.tree_util.tree_structure(op)
    H2 = _dense_with_args(loss, params, batch2)
    np.testing.assert_allclose(to_dense(op2), H2 + 0.25 * eye, **TOL[dtype])
    assert not np.allclose(H, H2)
    # Several arguments of any pytree kind, e.g. a mask next to the batch.
    mask = jnp.asarray([1.0] * 20 + [0.0] * 4, dtype)

    def masked(p, b, m):
        r = jnp.sum((p["scale"] * jnp.tanh(b[0] @ p["layers"][0]["w"]))[:, :3] - b[1], -1)
        return jnp.mean(m * r**2)

    got = to_dense(hk.hessian_operator(masked, params, batch, mask))
    np.testing.assert_allclose(got, _dense_with_args(masked, params, batch, mask), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ggn_operator_with_data_arguments(dtype):
    params, batch, model, _ = mlp_problem(dtype)

    def model_fn(p, b):
        return model(p, b[0])

    def out_loss(out, b):
        return 0.5 * jnp.mean(jnp.sum((out - b[1]) ** 2, -1))

    x, y = batch
    flat, unravel = ravel_pytree(params)
    J = jax.jacfwd(lambda z: model(unravel(z), x).reshape(-1))(flat)
    # squared error: H_L = I / n on the raveled outputs
    want = J.T @ J / x.shape[0]
    op = hk.ggn_operator(model_fn, out_loss, params, batch)
    np.testing.assert_allclose(to_dense(op), want, **TOL[dtype])
    lin = jax.jit(lambda o: o.linearize().to_dense())(op)
    np.testing.assert_allclose(lin, want, **TOL[dtype])
    _, batch2, _, _ = mlp_problem(dtype, seed=2)
    J2 = jax.jacfwd(lambda z: model(unravel(z), batch2[0]).reshape(-1))(flat)
    np.testing.assert_allclose(to_dense(op.with_args(batch2)), J2.T @ J2 / x.shape[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("linearize", [False, True])
def test_mean_hessian_operator_ragged_chunks(dtype, linearize):
    # 23 examples in chunks of 6: three full chunks and a ragged one of 5, weighted 6/23, 5/23.
    params, (x, y), _, loss = mlp_problem(dtype, n=23)
    full = _dense_with_args(loss, params, (x, y))
    op = hk.mean_hessian_operator(loss, params, (x, y), chunk_size=6, linearize=linearize)
    np.testing.assert_allclose(to_dense(op), full, **TOL[dtype])
    lin = jax.jit(lambda o: o.linearize().to_dense())(op)
    np.testing.assert_allclose(lin, full, **TOL[dtype])
    # Divisible sizes, one chunk larger than the data, and a chunk size of one.
    for size in (23, 40, 1):
        op = hk.mean_hessian_operator(loss, params, (x, y), chunk_size=size, linearize=linearize)
        np.testing.assert_allclose(to_dense(op), full, **TOL[dtype])


def test_mean_hessian_operator_extra_args_and_with_args():
    params, (x, y), _, loss = mlp_problem(WIDE, n=10)

    def weighted(p, chunk, w):
        return w * loss(p, chunk)

    w = jnp.asarray(3.0)
    op = hk.mean_hessian_operator(weighted, params, (x, y), w, chunk_size=4)
    tol = TOL[WIDE]
    np.testing.assert_allclose(to_dense(op), 3.0 * _dense_with_args(loss, params, (x, y)), **tol)
    assert len(op.args) == 2
    _, (x2, y2), _, _ = mlp_problem(WIDE, n=10, seed=3)
    op2 = op.with_args((x2, y2), jnp.asarray(0.5))
    np.testing.assert_allclose(to_dense(op2), 0.5 * _dense_with_args(loss, params, (x2, y2)), **tol)
    with pytest.raises(ValueError, match=rf"args\[0\]\[0\] is {WIDE_NAME}\(9, 4\)"):
        op.with_args((x2[:9], y2), w)


def test_with_args_rejects_changed_data_and_plain_operators():
    params, batch, _, loss = mlp_problem(WIDE)
    op = hk.hessian_operator(loss, params, batch)
    x, y = batch
    with pytest.raises(ValueError, match="1 data argument"):
        op.with_args(batch, batch)
    with pytest.raises(ValueError, match="structure"):
        op.with_args([x, y])
    with pytest.raises(ValueError, match=rf"args\[0\]\[1\] is {WIDE_NAME}\(23, 3\)"):
        op.with_args((x, y[:23]))
    with pytest.raises(ValueError, match=r"args\[0\]\[0\] is float16\(24, 4\)"):
        op.with_args((x.astype(jnp.float16), y))
    # Through a restriction, and refused where there are no data arguments.
    block = hk.restrict(op, lambda p: jax.tree_util.tree_map(lambda a: a.ndim == 2, p))
    assert block.with_args(batch).dim == block.dim
    with pytest.raises(TypeError, match="no data arguments"):
        hk.hessian_operator(lambda p: loss(p, batch), params).with_args(batch)
    with pytest.raises(TypeError, match="no data arguments"):
        hk.LinearOperator(lambda v: v, jnp.zeros(2)).with_args(jnp.ones(2))


def test_bad_chunk_size_and_data():
    params, (x, y), _, loss = mlp_problem(WIDE)
    with pytest.raises(ValueError, match="chunk_size"):
        hk.mean_hessian_operator(loss, params, (x, y), chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        hk.mean_hessian_operator(loss, params, (x, y), chunk_size=2.5)
    with pytest.raises(ValueError, match="different leading"):
        hk.mean_hessian_operator(loss, params, (x, y[:5]), chunk_size=4)
    with pytest.raises(ValueError, match="leading example axis"):
        hk.mean_hessian_operator(loss, params, (x, jnp.asarray(1.0)), chunk_size=4)


def _chunk_conv_loss(p, chunk):
    x, y = chunk
    h = jax.lax.conv_general_dilated(
        x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.mean((jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"] - y) ** 2)


@pytest.mark.parametrize("linearize", [False, True])
def test_mean_hessian_operator_leaves_no_loop_around_unrolled_chunks(linearize):
    # A scan of one step stays a while loop even with unroll=True, and XLA:CPU runs a
    # convolution inside one far slower (the 3.3M LeNet over one chunk: 39 s per product
    # against 0.7 s bare). One full chunk (with or without a ragged tail) is called directly.
    k = jax.random.split(jax.random.key(5), 4)
    params = {
        "k": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2), WIDE),
        "w": 0.3 * jax.random.normal(k[1], (2 * 4 * 4, 2), WIDE),
    }
    data = (jax.random.normal(k[2], (7, 4, 4, 1), WIDE), jax.random.normal(k[3], (7, 2), WIDE))
    want = _dense_with_args(_chunk_conv_loss, params, data)
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    for size in (7, 4, 3):  # one chunk; one and a tail; two and a tail
        op = hk.mean_hessian_operator(
            _chunk_conv_loss, params, data, chunk_size=size, unroll=True, linearize=linearize
        )
        hlo = jax.jit(lambda o, v: o.linearize().matvec(v)).lower(op, v).compile().as_text()
        assert "while" not in hlo, size
        np.testing.assert_allclose(to_dense(op), want, **TOL[WIDE])


def _kernel_unroll(op):
    # True == 1 in Python: return the value with its type, so "unrolled" and "rolled" differ.
    unroll = op._matvec.func.unroll
    return (type(unroll).__name__, unroll)


def test_mean_hessian_operator_unroll_auto_unrolls_convolutions_on_cpu():
    # A convolution inside the chunk scan runs many times slower on XLA:CPU (jax-ml/jax#12868),
    # so "auto" unrolls the chunks there; anything else keeps a rolled scan. Same numbers.
    k = jax.random.split(jax.random.key(2), 4)
    params = {
        "k": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2), WIDE),
        "w": 0.3 * jax.random.normal(k[1], (2 * 4 * 4, 2), WIDE),
    }
    data = (jax.random.normal(k[2], (7, 4, 4, 1), WIDE), jax.random.normal(k[3], (7, 2), WIDE))
    op = hk.mean_hessian_operator(_chunk_conv_loss, params, data, chunk_size=3)
    rolled = hk.mean_hessian_operator(_chunk_conv_loss, params, data, chunk_size=3, unroll=1)
    rolled_scan = ("int", 1)
    assert _kernel_unroll(op) == (("bool", True) if jax.default_backend() == "cpu" else rolled_scan)
    assert _kernel_unroll(rolled) == rolled_scan
    np.testing.assert_allclose(to_dense(op), to_dense(rolled), **TOL[WIDE])
    np.testing.assert_allclose(
        to_dense(op), _dense_with_args(_chunk_conv_loss, params, data), **TOL[WIDE]
    )
    mlp_params, (x, y), _, loss = mlp_problem(WIDE, n=10)
    mlp_op = hk.mean_hessian_operator(loss, mlp_params, (x, y), chunk_size=4)
    assert _kernel_unroll(mlp_op) == rolled_scan
    with pytest.raises(ValueError, match="unroll must be"):
        hk.mean_hessian_operator(loss, mlp_params, (x, y), chunk_size=4, unroll="yes")


def test_map_in_batches_of_one_batch_is_no_loop():
    # The batched map behind SLQ's runs and the directional grid: one batch (full or ragged)
    # is one call, the same values as several batches, and no while loop in the program.
    from hesskit._src.memory import map_in_batches

    xs = jnp.arange(12.0, dtype=WIDE).reshape(6, 2)

    def fn(x):
        return jnp.sin(x) * x.sum()

    want = jax.vmap(fn)(xs)
    for size in (6, 8, 4, 1):
        got = jax.jit(lambda x, size=size: map_in_batches(fn, x, size))(xs)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for size in (6, 8):
        hlo = jax.jit(lambda x, size=size: map_in_batches(fn, x, size)).lower(xs).compile()
        assert "while" not in hlo.as_text(), size
