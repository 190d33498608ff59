"""Solvers compile once for new parameters and new batches of the same shapes.

Each test counts the traces of the user's loss function (a Python counter inside it runs once
per trace, never when compiled code runs) across calls with new data: a second call on a new
batch must not trace the loss again. Results are checked against the dense Hessian of the new
batch, so the data cannot have been baked in as constants either.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hesskit as hk

KEY = jax.random.key(0)


class CountingLoss:
    """A tiny tanh-MLP regression loss ``loss(params, batch)`` that counts its traces."""

    def __init__(self):
        self.traces = 0

    def __call__(self, p, batch):
        self.traces += 1
        x, y = batch
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return 0.5 * jnp.mean(jnp.sum((h @ p["w2"] - y) ** 2, axis=-1))


def params_at(seed, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(100 + seed))
    return {
        "w1": 0.7 * jax.random.normal(k1, (3, 6), dtype),
        "b1": jnp.full(6, 0.1, dtype),
        "w2": 0.7 * jax.random.normal(k2, (6, 2), dtype),
    }


def batch_at(seed, n=20, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, 3), dtype), jax.random.normal(k2, (n, 2), dtype)


def dense_eigvalsh(loss, params, batch):
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda z: loss(unravel(z), batch))(flat)
    return np.linalg.eigvalsh(np.asarray(h))


def test_eigsh_on_a_new_batch_does_not_retrace():
    loss = CountingLoss()
    hk.eigsh(hk.hessian_operator(loss, params_at(0), batch_at(0)), KEY, 2, which="LA")
    first = loss.traces
    assert first > 0
    p1, b1 = params_at(1), batch_at(1)
    res = hk.eigsh(hk.hessian_operator(loss, p1, b1), KEY, 2, which="LA")
    # with_args on an existing operator gives the same operator type: no new trace either.
    res2 = hk.eigsh(hk.hessian_operator(loss, p1, b1).with_args(batch_at(2)), KEY, 2)
    assert loss.traces == first
    # The same holds for the other solvers (here Hutch++), each compiled once.
    est = hk.trace(hk.hessian_operator(loss, p1, b1), KEY, num_probes=12)
    traced = loss.traces
    est2 = hk.trace(hk.hessian_operator(loss, params_at(2), batch_at(2)), KEY, num_probes=12)
    assert loss.traces == traced
    assert float(est.value) != float(est2.value)
    exact = dense_eigvalsh(loss, p1, b1)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), exact[::-1][:2], rtol=1e-8)
    exact2 = dense_eigvalsh(loss, p1, batch_at(2))
    np.testing.assert_allclose(np.asarray(res2.eigenvalues), exact2[::-1][:2], rtol=1e-8)


def test_a_closure_per_batch_does_retrace():
    # The documented pitfall, kept as a contrast: a new lambda is a new static function.
    loss = CountingLoss()
    for seed in range(2):
        batch = batch_at(seed)
        hk.eigsh(hk.hessian_operator(lambda p, b=batch: loss(p, b), params_at(seed)), KEY, 2)
        if seed == 0:
            first = loss.traces
    assert loss.traces > first


@pytest.mark.parametrize("linearize", [False, True])
def test_mean_hessian_operator_on_new_data_does_not_retrace(linearize):
    loss = CountingLoss()

    def solve(seed):
        # 23 examples in chunks of 7: three full chunks and a ragged one of 2.
        op = hk.mean_hessian_operator(
            loss, params_at(seed), batch_at(seed, n=23), chunk_size=7, linearize=linearize
        )
        return hk.eigsh(op, KEY, 2, which="LA")

    solve(0)
    first = loss.traces
    res = solve(1)
    assert loss.traces == first
    exact = dense_eigvalsh(loss, params_at(1), batch_at(1, n=23))
    np.testing.assert_allclose(np.asarray(res.eigenvalues), exact[::-1][:2], rtol=1e-8)


@pytest.mark.parametrize("form", ["loss", "operator"])
@pytest.mark.parametrize("which", ["BE", "LA+SA"])
def test_tracker_compiles_once_over_checkpoints(form, which):
    loss = CountingLoss()
    tracker = hk.Tracker(k=2, which=which)
    counts = []
    for t in range(3):
        params, batch = params_at(t), batch_at(t)
        if form == "loss":
            tracker.update(t, loss, jax.random.key(t), params=params, args=(batch,))
        else:
            tracker.update(t, hk.hessian_operator(loss, params, batch), jax.random.key(t))
        counts.append(loss.traces)
    # The first (cold) update compiles; the warm-started ones reuse it.
    assert counts[0] > 0 and counts[2] == counts[0]
    rec = tracker.history[-1]
    exact = dense_eigvalsh(loss, params_at(2), batch_at(2))
    k_bottom = tracker.k_bottom
    want = np.concatenate([exact[:k_bottom], exact[::-1][: tracker.k_top]])
    np.testing.assert_allclose(rec.eigenvalues, want, rtol=1e-7, atol=1e-9)


def test_critical_point_report_compiles_once():
    loss = CountingLoss()
    hk.critical_point_report(loss, params_at(0), KEY, batch_at(0))
    first = loss.traces
    rep = hk.critical_point_report(loss, params_at(1), KEY, batch_at(1))
    assert loss.traces == first
    exact = dense_eigvalsh(loss, params_at(1), batch_at(1))
    np.testing.assert_allclose(float(rep.lambda_max), exact[-1], rtol=1e-8)
    np.testing.assert_allclose(float(rep.lambda_min), exact[0], rtol=1e-6, atol=1e-9)
    assert float(rep.loss) == pytest.approx(float(loss(params_at(1), batch_at(1))))


@pytest.mark.parametrize("name", ["negative_curvature", "monitor_curvature"])
def test_transforms_compile_once_under_jit_with_new_batches(name):
    loss = CountingLoss()
    if name == "negative_curvature":
        extra = hk.negative_curvature(0.01, num_matvecs=6)
    else:
        extra = hk.monitor_curvature(1, num_matvecs=6)
    opt = optax.chain(optax.sgd(0.05), extra)

    @jax.jit
    def step(params, state, batch):
        # The batch is an argument of the jitted step, and value_fn is made inside it.
        def value_fn(p):
            return loss(p, batch)

        grads = jax.grad(value_fn)(params)
        updates, state = opt.update(grads, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    params = params_at(0)
    state = opt.init(params)
    counts = []
    for t in range(4):
        params, state = step(params, state, batch_at(t))
        counts.append(loss.traces)
    assert counts[0] > 0 and counts[-1] == counts[0]
    lam = optax.tree_utils.tree_get(
        state, "eigenvalue" if name == "negative_curvature" else "lambda_max"
    )
    assert np.isfinite(float(lam))


def test_tracker_compiles_once_on_a_cnn():
    # Convolutions take eigsh's other loop strategy on CPU (host-dispatched steps): it must be
    # compiled once across checkpoints as well.
    from hesskit.examples import LinenCNN as CNN

    module = CNN(channels=(2, 3), hidden=4, num_classes=3)
    traces = [0]

    def loss(p, batch):
        traces[0] += 1
        x, y = batch
        logp = jax.nn.log_softmax(module.apply(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def batch(seed):
        k1, k2 = jax.random.split(jax.random.key(seed))
        return jax.random.normal(k1, (6, 8, 8, 1)), jax.random.randint(k2, (6,), 0, 3)

    params = module.init(jax.random.key(0), batch(0)[0])
    tracker = hk.Tracker(k=2, which="BE", max_matvecs=200)
    counts = []
    for t in range(3):
        tracker.update(t, loss, jax.random.key(t), params=params, args=(batch(t),))
        counts.append(traces[0])
    assert counts[0] > 0 and counts[2] == counts[0]


def test_eager_hvp_and_product_trace_once():
    # Eager calls go through one compiled program per function and shapes: the second call
    # with new values (same shapes) neither re-traces the loss for validation nor runs op by op.
    loss = CountingLoss()
    batch = batch_at(0)
    f = lambda p: loss(p, batch)  # noqa: E731
    p0, p1 = params_at(0), params_at(1)
    hk.hvp(f, p0, p0)
    traced = loss.traces
    assert traced > 0
    hv = hk.hvp(f, p1, p0)
    assert loss.traces == traced
    flat, unravel = ravel_pytree(p1)
    h = jax.hessian(lambda z: loss(unravel(z), batch))(flat)
    np.testing.assert_allclose(ravel_pytree(hv)[0], h @ ravel_pytree(p0)[0], rtol=1e-10)
    # An operator's eager product: built on a new batch, the first product compiles once and
    # operators on further batches of the same shapes reuse it.
    hk.hessian_operator(loss, p0, batch)(p0)
    traced = loss.traces
    hv = hk.hessian_operator(loss, p1, batch_at(1))(p0)
    hk.hessian_operator(loss, p1, batch_at(2), damping=0.5)(p0)
    hk.hessian_operator(loss, p1, batch_at(2), damping=0.25)(p0)
    assert loss.traces == traced + 1  # the damped product is one more program
    h = jax.hessian(lambda z: loss(unravel(z), batch_at(1)))(flat)
    np.testing.assert_allclose(ravel_pytree(hv)[0], h @ ravel_pytree(p0)[0], rtol=1e-10)
