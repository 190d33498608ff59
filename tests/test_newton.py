"""Curvature optimizers: Newton-CG, saddle-free Newton, the sharpness tracker, optax contract."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from spectra import matrix_with_spectrum
from test_saddle_transforms import first_below, params_of, run, saddle, tree_loss

import hesskit as hk
import hesskit.transforms as ht
from hesskit.examples import load_digits


def quadratic(n=20, seed=0):
    a = jnp.asarray(matrix_with_spectrum(np.geomspace(0.1, 10.0, n), seed=seed))
    b = jnp.asarray(np.random.default_rng(seed).normal(size=n))
    return a, b, lambda x: 0.5 * x @ a @ x - b @ x


def one_step(opt, x, f, **extra):
    updates, state = opt.update(jax.grad(f)(x), opt.init(x), x, value_fn=f, **extra)
    return optax.apply_updates(x, updates), state


# -- Newton-CG -------------------------------------------------------------------------------
def test_newton_cg_one_step_lands_on_the_quadratic_minimizer():
    a, b, f = quadratic()
    x0 = jnp.ones(20)
    x1, state = one_step(ht.newton_cg(1.0, damping=0.0, tol=1e-10, maxiter=60), x0, f)
    star = np.linalg.solve(a, b)
    # CG's tolerance is on the residual of the Newton system: ||A (x1 - x*)|| <= tol ||g||.
    assert np.linalg.norm(a @ (x1 - star)) <= 2e-10 * np.linalg.norm(jax.grad(f)(x0))
    assert int(state.cg_status) == hk.Status.CONVERGED
    # The Gauss-Newton matrix of a linear least-squares model is the Hessian: same step.
    x_mat = jnp.asarray(np.linalg.cholesky(np.asarray(a)).T)
    y = jnp.linalg.solve(x_mat.T, b)
    ggn = ht.newton_cg(1.0, damping=0.0, tol=1e-10, maxiter=60, curvature="ggn")
    x2, _ = one_step(
        ggn,
        x0,
        lambda p: 0.5 * jnp.sum((x_mat @ p - y) ** 2),
        model_fn=lambda p: x_mat @ p,
        output_loss_fn=lambda out: 0.5 * jnp.sum((out - y) ** 2),
    )
    np.testing.assert_allclose(x2, star, rtol=1e-7, atol=1e-8)


def test_solve_warm_start():
    a, b, _ = quadratic()
    op = hk.LinearOperator(lambda v: a @ v, jnp.zeros(20))
    cold = hk.solve(op, b, tol=1e-10)
    warm = hk.solve(op, b, tol=1e-10, x0=cold.x)
    assert bool(warm.converged) and int(warm.num_iters) <= 2 < int(cold.num_iters)


def test_newton_cg_adaptive_damping_on_rosenbrock():
    def rosen(p):
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    x, state, values = run(ht.newton_cg(1.0, maxiter=10), [-1.2, 1.0], 60, f=rosen)
    # Levenberg-Marquardt rejects every step that would raise the loss: monotone.
    assert np.all(np.diff(values) <= 1e-12)
    assert values[-1] < 1e-8
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-3)
    assert 0 < float(state.damping) < 1.0  # it started at 1 and fell once the model fit


def test_newton_cg_rejects_a_step_whose_model_predicts_an_increase():
    # lr = 3 overshoots a quadratic: the model predicts (and f shows) an increase of
    # (eta^2 / 2 - eta) g^T B^-1 g. Such a step must be rejected and the damping raised, not
    # taken as "noise" (the bug that let Newton-CG climb); then the damping grows until the
    # step is a descent one and the loss falls monotonically.
    a, b, f = quadratic()
    opt = ht.newton_cg(3.0, initial_damping=1e-6, tol=1e-10, maxiter=60)
    x0 = jnp.ones(20)
    x1, state = one_step(opt, x0, f)
    np.testing.assert_array_equal(x1, x0)
    assert float(state.damping) > 1e-6 and float(state.rho) < 0
    x, state, values = run(opt, np.ones(20), 40, f=f)
    assert np.all(np.diff(values) <= 1e-6 * abs(values[0]))
    assert values[-1] < values[0] - 1.0


# -- saddle-free Newton against Newton ---------------------------------------------------------
def test_saddle_free_newton_escapes_where_newton_converges_to_the_saddle():
    x0 = np.array([1e-3, 1e-3])
    x, state, values = run(ht.saddle_free_newton(1.0, num_matvecs=2, damping=0.1), x0, 30)
    assert values[-1] < -0.999
    np.testing.assert_allclose(np.abs(x), [0.0, np.sqrt(2.0)], atol=1e-4)
    np.testing.assert_allclose(state.ritz_min, 2.0, rtol=1e-3)  # H = diag(2, 4) there
    # Plain Newton (dense, exact) from the same point goes to the saddle at the origin.
    newton = jax.jit(lambda p: p - jnp.linalg.solve(jax.hessian(saddle)(p), jax.grad(saddle)(p)))
    p = jnp.asarray(x0)
    for _ in range(30):
        p = newton(p)
    assert float(jnp.max(jnp.abs(p))) < 1e-6 and float(saddle(p)) == pytest.approx(0.0)
    # Newton-CG with the Hessian leaves it too: CG's negative-curvature exit.
    _, state, nc = run(ht.newton_cg(1.0), x0, 40)
    assert nc[-1] < -0.99
    # y doubles per step (the step along y is -g_y / |H_yy|): -0.5 after 9 steps, where SGD
    # at lr 0.05 takes 71 (test_saddle_transforms).
    assert first_below(values, -0.5) <= 10


def test_saddle_free_newton_outer_part_scale():
    # One Lanczos step from g + v: g has a part outside the one-dimensional space; it gets a
    # gradient step of 1 / (max |theta| + damping).
    d = jnp.array([1.0, 4.0, -2.0])
    f = lambda x: 0.5 * jnp.sum(d * x**2)  # noqa: E731
    x = jnp.array([1.0, 1.0, 1.0])
    opt = ht.saddle_free_newton(1.0, num_matvecs=3, damping=0.0)
    x1, _ = one_step(opt, x, f)
    # A full space: the exact saddle-free step -g / |d|.
    np.testing.assert_allclose(x1, x - d * x / jnp.abs(d), atol=1e-5)


# -- the sharpness tracker ---------------------------------------------------------------------
def test_monitor_matches_fresh_eigsh_at_every_measurement():
    # A 64-16-10 tanh MLP (1,210 parameters) on 128 digits under SGD with momentum: the bottom
    # eigenvalue falls from -0.63 to -0.045 in 40 steps. At the same 2 products per step,
    # every=10, num_matvecs=20 misses lambda_min by 4.5% at step 40; every=20, 40 products
    # are within 1e-6.
    data = load_digits(128)
    x, y = data.x.reshape(128, -1), data.y
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(k1, (64, 16), jnp.float32) / 8,
        "b1": jnp.zeros(16, jnp.float32),
        "w2": jax.random.normal(k2, (16, 10), jnp.float32) / 4,
        "b2": jnp.zeros(10, jnp.float32),
    }

    def loss(p, x, y):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    every, steps = 20, 41
    opt = optax.chain(optax.sgd(0.1, momentum=0.9), ht.monitor_curvature(every, num_matvecs=40))

    @jax.jit
    def step(p, s, x, y):
        f = lambda q: loss(q, x, y)  # noqa: E731
        u, s = opt.update(jax.grad(f)(p), s, p, value_fn=f)
        return optax.apply_updates(p, u), s

    @jax.jit
    def fresh(p):
        # Both ends in one converged solve (the eigenvalues ascending: lambda_min first).
        op = hk.hessian_operator(loss, p, x, y)
        res = hk.eigsh(op, jax.random.key(1), k=2, which="BE", tol=1e-6, loop="compiled")
        first = jax.tree.map(lambda a: a[0], res.eigenvectors)
        return res.eigenvalues[1], res.eigenvalues[0], first

    state, prev = opt.init(params), None
    for t in range(steps):
        before = params
        params, state = step(params, state, x, y)
        if t % every:
            continue
        mon = state[1]
        hi, lo, vb = fresh(before)
        assert abs(float(mon.lambda_max) - float(hi)) <= 0.05 * abs(float(hi))
        assert abs(float(mon.lambda_min) - float(lo)) <= 0.05 * abs(float(lo))
        assert abs(float(hk.tree_vdot(mon.bottom_vector, vb))) > 0.9
        if prev is not None:  # sign-aligned with the previous measurement
            assert float(hk.tree_vdot(mon.top_vector, prev.top_vector)) >= 0
            assert float(hk.tree_vdot(mon.bottom_vector, prev.bottom_vector)) >= 0
        prev = mon
    # 2 per step amortized after the one-off warm-up of 2 x 40.
    assert int(state[1].num_matvecs) == 80 + 40 * ((steps - 1) // every)


def test_scale_by_sharpness_sets_one_over_lambda_max():
    a = matrix_with_spectrum(np.linspace(0.5, 8.0, 12), seed=1)
    f = lambda x: 0.5 * x @ jnp.asarray(a) @ x  # noqa: E731
    opt = ht.scale_by_sharpness(1.0, max_learning_rate=0.5, every=5, num_matvecs=12)
    x, state, values = run(opt, np.ones(12), 60, f=f, dtype=jnp.float64)
    np.testing.assert_allclose(state.learning_rate, 1 / 8.0, rtol=1e-6)
    assert values[-1] < 1e-3 * values[0]
    capped = ht.scale_by_sharpness(1.0, max_learning_rate=0.01, num_matvecs=12)
    _, state, _ = run(capped, np.ones(12), 2, f=f, dtype=jnp.float64)
    assert float(state.learning_rate) == pytest.approx(0.01)


# -- the optax contract ------------------------------------------------------------------------
def identity(p):
    return p


FACTORIES = {
    "saddle_free_newton": (lambda: ht.saddle_free_newton(0.5, num_matvecs=3), {}),
    "newton_cg": (lambda: ht.newton_cg(0.5, maxiter=4), {}),
    "newton_cg_ggn": (
        lambda: ht.newton_cg(0.5, damping=0.1, maxiter=4, warm_start=0.0, curvature="ggn"),
        {"model_fn": identity, "output_loss_fn": tree_loss},
    ),
    "adahessian": (lambda: ht.adahessian(0.1, update_every=2), {}),
    "scale_by_sharpness": (lambda: ht.scale_by_sharpness(1.0, max_learning_rate=0.1), {}),
}
INJECT = {
    "saddle_free_newton": (ht.saddle_free_newton, {"learning_rate": 0.5, "damping": 0.1}),
    "newton_cg": (ht.newton_cg, {"learning_rate": 0.5, "initial_damping": 1.0, "tol": 1e-3}),
    "newton_cg_ggn": (ht.newton_cg, {"learning_rate": 0.5, "damping": 0.1}),
    "adahessian": (ht.adahessian, {"learning_rate": 0.1, "b1": 0.9, "eps": 1e-4}),
    "scale_by_sharpness": (ht.scale_by_sharpness, {"c": 1.0, "max_learning_rate": 0.1}),
}
STATIC = {"newton_cg_ggn": {"curvature": "ggn"}}


def steps(opt, dtype, n=3, **extra):
    """``n`` jitted steps on ``tree_loss``, twice from the same start; the traces counted."""
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        g = jax.grad(tree_loss)(p)
        u, s = opt.update(g, s, p, value_fn=tree_loss, unknown_argument=1.0, **extra)
        return optax.apply_updates(p, u), s, u

    runs = []
    for _ in range(2):
        p = params_of(dtype)
        s = opt.init(p)
        for _ in range(n):
            p, s, u = step(p, s)
        runs.append((p, s, u))
    return runs, len(traces)


def finite(tree):
    return all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contract_jit_dtype_determinism(name, dtype):
    factory, extra = FACTORIES[name]
    ((p1, _, u1), (p2, _, u2)), traces = steps(factory(), dtype, **extra)
    assert traces == 1  # no recompile on later calls
    for leaf in jax.tree_util.tree_leaves((p1, u1)):
        assert leaf.dtype == dtype
    assert finite(p1) and finite(u1)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_contract_chain_multisteps_inject(name):
    factory, extra = FACTORIES[name]
    # In the middle of a chain (after clipping, before a scale), accumulated by MultiSteps.
    chain = optax.chain(optax.clip_by_global_norm(1.0), factory(), optax.scale(0.5))
    ((p, *_), _), _ = steps(optax.MultiSteps(chain, every_k_schedule=2), jnp.float32, 4, **extra)
    assert finite(p)
    fn, hparams = INJECT[name]
    static = {"num_matvecs", "maxiter", "num_probes", "curvature", "every"}
    static &= set(inspect.signature(fn).parameters)
    injected = optax.inject_hyperparams(fn, static_args=tuple(static))(
        **hparams, **STATIC.get(name, {})
    )
    ((p, state, _), _), _ = steps(injected, jnp.float32, **extra)
    assert set(hparams) <= set(state.hyperparams) and finite(p)


def test_bad_input():
    for call, match in (
        (lambda: ht.saddle_free_newton(-1.0), "learning_rate"),
        (lambda: ht.saddle_free_newton(1.0, damping=-1.0), "damping"),
        (lambda: ht.saddle_free_newton(1.0, num_matvecs=0), "num_matvecs"),
        (lambda: ht.newton_cg(1.0, curvature="fisher"), "curvature"),
        (lambda: ht.newton_cg(1.0, damping=-1.0), "damping"),
        (lambda: ht.newton_cg(1.0, initial_damping=0.0), "initial_damping"),
        (lambda: ht.newton_cg(1.0, maxiter=0), "maxiter"),
        (lambda: ht.newton_cg(1.0, tol=0.0), "tol"),
        (lambda: ht.newton_cg(1.0, warm_start=2.0), "warm_start"),
        (lambda: ht.adahessian(b2=1.0), "b2"),
        (lambda: ht.adahessian(hessian_power=2.0), "hessian_power"),
        (lambda: ht.adahessian(spatial_axes="middle"), "spatial_axes"),
        (lambda: ht.adahessian(update_every=0), "update_every"),
        (lambda: ht.scale_by_sharpness(-1.0, max_learning_rate=0.1), "c"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    x = jnp.ones(2)
    for opt in (ht.saddle_free_newton(1.0), ht.newton_cg(1.0), ht.adahessian()):
        with pytest.raises(TypeError, match="value_fn"):
            opt.update(x, opt.init(x), x)
    ggn = ht.newton_cg(1.0, curvature="ggn")
    with pytest.raises(TypeError, match="model_fn"):
        ggn.update(x, ggn.init(x), x, value_fn=jnp.sum)
