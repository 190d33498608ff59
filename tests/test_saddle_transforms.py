"""optax transforms: saddle escapes, negative-curvature estimates, and the optax contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from spectra import matrix_with_spectrum

import hesskit.transforms as ht


def saddle(p):
    # A strict saddle at the origin; minima at (0, +-sqrt 2) with value -1.
    return p[0] ** 2 - p[1] ** 2 + p[1] ** 4 / 4


def run(opt, x0, steps, f=saddle, extra=True, dtype=jnp.float32):
    x = jnp.asarray(x0, dtype)
    state = opt.init(x)

    @jax.jit
    def step(x, state):
        g = jax.grad(f)(x)
        kwargs = {"value_fn": f} if extra else {}
        updates, state = opt.update(g, state, x, **kwargs)
        return optax.apply_updates(x, updates), state

    values = []
    for _ in range(steps):
        x, state = step(x, state)
        values.append(float(f(x)))
    return x, state, np.asarray(values)


def first_below(values, level):
    hits = np.flatnonzero(values < level)
    return int(hits[0]) if hits.size else None


def test_sgd_stays_at_the_saddle_and_noise_escapes():
    _, _, sgd = run(optax.sgd(0.05), [0.0, 0.0], 300, extra=False)
    assert np.all(sgd == 0.0)
    _, _, noisy = run(ht.noisy_sgd(0.05, radius=0.1, seed=1), [0.0, 0.0], 300, extra=False)
    assert noisy[-1] < -0.99
    chain = optax.chain(ht.perturb_near_saddle(0.1, 1e-3, 20, seed=2), optax.sgd(0.05))
    _, state, perturbed = run(chain, [0.0, 0.0], 300, extra=False)
    assert perturbed[-1] < -0.99
    # Kicks happen only where the gradient is small (the saddle, then the minimum), at most
    # once every wait_steps steps.
    assert 1 <= int(state[0].num_perturbations) <= 300 // 20 + 1


def test_negative_curvature_escapes_much_faster_than_sgd():
    x0 = [1e-3, 1e-3]
    _, _, sgd = run(optax.sgd(0.05), x0, 300, extra=False)
    _, state, nc = run(optax.chain(optax.sgd(0.05), ht.negative_curvature(0.1)), x0, 300)
    t_sgd, t_nc = first_below(sgd, -0.5), first_below(nc, -0.5)
    assert t_sgd is not None and t_nc is not None
    assert 3 * t_nc < t_sgd
    assert nc[-1] < -0.99
    # Converged to the minimum: the curvature estimate is positive there (H = diag(2, 4)).
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "eigenvalue"), 2.0, rtol=1e-3)


@pytest.mark.parametrize("step", ["unit", "gradient"])
def test_negative_curvature_leaves_an_exact_saddle_only_in_unit_mode(step):
    _, _, values = run(
        optax.chain(optax.sgd(0.05), ht.negative_curvature(0.1, step=step)), [0.0, 0.0], 100
    )
    if step == "unit":
        assert values[-1] < -0.99
    else:
        # The paper's -(g^T v) v step vanishes where g = 0.
        assert np.all(values == 0.0)


def test_estimate_converges_to_the_most_negative_eigenpair():
    lam = np.concatenate([[-0.7, -0.2], np.linspace(0.1, 5.0, 28)])
    a = matrix_with_spectrum(lam, seed=4)
    ev, evec = np.linalg.eigh(a)
    f = lambda x: 0.5 * x @ jnp.asarray(a, jnp.float32) @ x  # noqa: E731
    opt = ht.negative_curvature(0.0, num_matvecs=6, seed=3)  # lr 0: only the estimate moves
    x = jnp.ones(30, jnp.float32)
    state = opt.init(x)
    update = jax.jit(lambda s: opt.update(jnp.zeros(30, jnp.float32), s, x, value_fn=f)[1])
    for _ in range(8):
        state = update(state)
    np.testing.assert_allclose(state.eigenvalue, ev[0], rtol=1e-4)
    assert abs(abs(float(jnp.dot(state.eigenvector, evec[:, 0]))) - 1) < 1e-4


def test_monitor_tracks_both_ends_and_passes_updates():
    a = matrix_with_spectrum(np.linspace(-1.0, 3.0, 20), seed=0)
    f = lambda x: 0.5 * x @ jnp.asarray(a, jnp.float32) @ x  # noqa: E731
    opt = ht.monitor_curvature(every=2, num_matvecs=8)
    x = jnp.ones(20, jnp.float32)
    state = opt.init(x)
    g = jnp.arange(20.0, dtype=jnp.float32)
    update = jax.jit(lambda s: opt.update(g, s, x, value_fn=f))
    for _ in range(12):
        out, state = update(state)
        np.testing.assert_array_equal(out, g)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "lambda_max"), 3.0, rtol=1e-3)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "lambda_min"), -1.0, rtol=1e-3)


def test_deep_linear_network_at_zero_escapes_where_adam_stalls():
    # y = W2 W1 x with both weights zero: the gradient is exactly zero (a saddle).
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = x @ jax.random.normal(jax.random.key(1), (4, 3))

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((x @ p["w1"] @ p["w2"] - y) ** 2, axis=1))

    p0 = {"w1": jnp.zeros((4, 5)), "w2": jnp.zeros((5, 3))}

    def train(opt, steps=300):
        p, s = p0, opt.init(p0)

        @jax.jit
        def step(p, s):
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p, value_fn=loss)
            return optax.apply_updates(p, u), s

        for _ in range(steps):
            p, s = step(p, s)
        return float(loss(p))

    start = float(loss(p0))
    assert train(optax.adam(1e-2)) == pytest.approx(start)
    assert (
        train(optax.chain(ht.perturb_near_saddle(0.05, 1e-4, 50), optax.adam(1e-2))) < 0.1 * start
    )
    assert train(optax.chain(optax.adam(1e-2), ht.negative_curvature(0.05))) < 0.1 * start
    assert train(ht.noisy_sgd(0.05, 0.05)) < 0.1 * start


# -- the optax contract ------------------------------------------------------------------------
FACTORIES = {
    "add_sphere_noise": lambda: ht.add_sphere_noise(0.1, seed=0),
    "noisy_sgd": lambda: ht.noisy_sgd(0.1, 0.1, seed=0),
    "perturb_near_saddle": lambda: ht.perturb_near_saddle(0.1, 1.0, 3, seed=0),
    "negative_curvature": lambda: ht.negative_curvature(0.1, num_matvecs=3, seed=0),
    "monitor_curvature": lambda: ht.monitor_curvature(2, num_matvecs=3, seed=0),
}
INJECT = {
    "add_sphere_noise": (ht.add_sphere_noise, {"radius": 0.1}),
    "noisy_sgd": (ht.noisy_sgd, {"learning_rate": 0.1, "radius": 0.1}),
    "perturb_near_saddle": (
        ht.perturb_near_saddle,
        {"radius": 0.1, "grad_threshold": 1.0, "wait_steps": 3},
    ),
    "negative_curvature": (ht.negative_curvature, {"learning_rate": 0.1}),
    "monitor_curvature": (ht.monitor_curvature, {"every": 2}),
}


def tree_loss(p):
    return jnp.sum(p["a"].astype(jnp.float32) ** 2) - jnp.sum(jnp.cos(p["b"].astype(jnp.float32)))


def params_of(dtype):
    return {"a": jnp.linspace(-1, 1, 6, dtype=dtype).reshape(2, 3), "b": jnp.ones(4, dtype)}


def apply_steps(opt, dtype, steps=3, **extra):
    p = params_of(dtype)
    s = opt.init(p)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        g = jax.grad(tree_loss)(p)
        u, s = opt.update(g, s, p, value_fn=tree_loss, unknown_argument=1.0, **extra)
        return optax.apply_updates(p, u), s, u

    for _ in range(steps):
        p, s, u = step(p, s)
    return p, s, u, len(traces)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contract_jit_dtype_extra_args_determinism(name, dtype):
    p1, _, u1, traces = apply_steps(FACTORIES[name](), dtype)
    assert traces == 1  # no recompile on later calls
    for leaf in jax.tree_util.tree_leaves((p1, u1)):
        assert leaf.dtype == dtype
    p2, *_ = apply_steps(FACTORIES[name](), dtype)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_contract_chain_positions_multisteps_and_inject(name):
    for opt in (
        optax.chain(FACTORIES[name](), optax.sgd(0.1)),
        optax.chain(optax.adam(0.1), FACTORIES[name]()),
        optax.chain(optax.clip_by_global_norm(1.0), FACTORIES[name](), optax.scale(-0.1)),
    ):
        p, *_ = apply_steps(opt, jnp.float32)
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(p))
    multi = optax.MultiSteps(optax.chain(FACTORIES[name](), optax.sgd(0.1)), every_k_schedule=2)
    p, *_ = apply_steps(multi, jnp.float32, steps=4)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(p))
    factory, hparams = INJECT[name]
    # Krylov sizes shape the compiled program, so they stay static (as optax's own integer
    # structure arguments do).
    static = ("num_matvecs",) if name in ("negative_curvature", "monitor_curvature") else ()
    injected = optax.inject_hyperparams(factory, static_args=static)(**hparams)
    p, state, *_ = apply_steps(injected, jnp.float32)
    assert set(hparams) <= set(state.hyperparams)


def test_chains_with_optax_line_search():
    # The line search rejects extra arguments value_fn does not take; negative_curvature needs
    # none besides value_fn and grad, which the line search also reads.
    opt = optax.chain(
        optax.sgd(1.0),
        ht.negative_curvature(0.1),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=10),
    )
    x = jnp.asarray([1e-3, 1e-3], jnp.float32)
    state = opt.init(x)
    for _ in range(40):
        value, grad = jax.value_and_grad(saddle)(x)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=saddle)
        x = optax.apply_updates(x, updates)
    assert float(saddle(x)) < -0.99


def test_bad_input():
    with pytest.raises(ValueError, match="radius"):
        ht.add_sphere_noise(-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        ht.noisy_sgd(-0.1, 0.1)
    with pytest.raises(ValueError, match="wait_steps"):
        ht.perturb_near_saddle(0.1, 0.1, 0)
    with pytest.raises(ValueError, match="learning_rate"):
        ht.negative_curvature(-1.0)
    with pytest.raises(ValueError, match="step"):
        ht.negative_curvature(0.1, step="newton")
    with pytest.raises(ValueError, match="num_matvecs must be >= 2"):
        ht.monitor_curvature(1, num_matvecs=1)
    with pytest.raises(ValueError, match="every"):
        ht.monitor_curvature(0)
    opt = ht.negative_curvature(0.1)
    x = jnp.ones(2)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(x, opt.init(x), x)
    mon = ht.monitor_curvature(1)
    with pytest.raises(TypeError, match="value_fn"):
        mon.update(x, mon.init(x), x)
