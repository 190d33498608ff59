import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hesskit as hk
from hesskit.diagnostics import empirical_fisher_diagonal, preconditioner_agreement


def test_agreement_ranks_and_ratios():
    rng = np.random.default_rng(0)
    h = {"a": jnp.asarray(rng.uniform(0.1, 5.0, (4, 3))), "b": jnp.asarray(rng.uniform(1, 2, 7))}
    # sqrt(nu) = 10 * |h| on leaf a (same ranks, one decade apart); reversed ranks on leaf b.
    nu = {"a": (10 * h["a"]) ** 2, "b": (1.0 / h["b"]) ** 2}
    res = preconditioner_agreement(nu, {"h": jax.tree.map(lambda x: -x, h)})  # sign ignored
    assert res.names == ["['a']", "['b']"] and res.sizes == [12, 7]
    np.testing.assert_allclose(res.spearman["h"], [1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(res.log_ratio["h"][0], 1.0, atol=1e-12)
    expected_b = np.median(np.log10(1.0 / np.asarray(h["b"]) ** 2))
    np.testing.assert_allclose(res.log_ratio["h"][1], expected_b, atol=1e-12)
    assert -1 < res.overall_spearman["h"] < 1
    # Ties: a constant reference leaf has no ranking, so no correlation.
    flat = preconditioner_agreement(nu, {"c": jax.tree.map(jnp.ones_like, h)})
    assert np.all(np.isnan(flat.spearman["c"]))
    with pytest.raises(ValueError, match="structure"):
        preconditioner_agreement(nu, {"bad": {"a": h["a"]}})
    with pytest.raises(ValueError, match="at least one"):
        preconditioner_agreement(nu, {})


def test_empirical_fisher_diagonal_matches_a_loop():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(13, 4)))
    y = jnp.asarray(rng.normal(size=13))
    w = {"w": jnp.asarray(rng.normal(size=4)), "b": jnp.asarray(0.3)}

    def loss(p, batch):
        bx, by = batch
        return jnp.mean((bx @ p["w"] + p["b"] - by) ** 2)

    ref = {"w": np.zeros(4), "b": 0.0}
    for i in range(13):
        g = jax.grad(loss)(w, (x[i : i + 1], y[i : i + 1]))
        ref["w"] += np.asarray(g["w"]) ** 2 / 13
        ref["b"] += float(g["b"]) ** 2 / 13
    got = empirical_fisher_diagonal(loss, w, (x, y), chunk_size=5)  # ragged last chunk
    np.testing.assert_allclose(got["w"], ref["w"], rtol=1e-10)
    np.testing.assert_allclose(got["b"], ref["b"], rtol=1e-10)
    with pytest.raises(ValueError, match="chunk_size"):
        empirical_fisher_diagonal(loss, w, (x, y), chunk_size=0)


def test_log_measures_on_constructed_inputs():
    # log10 sqrt(nu) = [0, 1, 2, 3] against log10 |d| = [0, 1, 3, 2]: Pearson r = 4/5 by hand
    # (deviations +-1.5, +-0.5; cross sum 4, squares 5), ranks the same, log ratios [0, 0, -1, 1]:
    # median 0, median absolute deviation 0.5.
    root = 10.0 ** np.array([0.0, 1.0, 2.0, 3.0])
    d = 10.0 ** np.array([0.0, 1.0, 3.0, 2.0])
    res = preconditioner_agreement({"w": jnp.asarray(root**2)}, {"d": {"w": jnp.asarray(d)}})
    np.testing.assert_allclose(res.pearson_log["d"], [0.8], atol=1e-12)
    np.testing.assert_allclose(res.spearman["d"], [0.8], atol=1e-12)
    np.testing.assert_allclose(res.log_ratio["d"], [0.0], atol=1e-12)
    np.testing.assert_allclose(res.spread["d"], [0.5], atol=1e-12)
    np.testing.assert_allclose(res.log_slope["d"], [1.0], atol=1e-12)  # equal log spreads
    assert res.num_used["d"].tolist() == [4]
    # nu = c |d| (Adam's v as the curvature itself): perfect correlations, slope 1/2, and a
    # ratio that is not constant, so a spread.
    rng = np.random.default_rng(2)
    h = rng.uniform(0.01, 100.0, 50)
    res = preconditioner_agreement({"w": jnp.asarray(3.0 * h)}, {"h": {"w": jnp.asarray(-h)}})
    np.testing.assert_allclose(res.pearson_log["h"], [1.0], atol=1e-12)
    np.testing.assert_allclose(res.log_slope["h"], [0.5], atol=1e-12)
    # sqrt(nu) = 10 |d| exactly: ratio one decade, no spread, slope 1.
    res = preconditioner_agreement({"w": jnp.asarray(100 * h**2)}, {"h": {"w": jnp.asarray(h)}})
    np.testing.assert_allclose(res.log_ratio["h"], [1.0], atol=1e-12)
    np.testing.assert_allclose(res.spread["h"], [0.0], atol=1e-12)
    np.testing.assert_allclose(res.log_slope["h"], [1.0], atol=1e-12)
    # Zeros are left out of the log measures (counted in num_used), kept in the ranks.
    z = np.concatenate([h, [0.0]])
    res = preconditioner_agreement({"w": jnp.asarray(z**2)}, {"h": {"w": jnp.asarray(z)}})
    assert res.num_used["h"].tolist() == [50]
    np.testing.assert_allclose(res.spearman["h"], [1.0], atol=1e-12)


def test_groups_replicates_and_ceiling():
    rng = np.random.default_rng(3)
    h = {
        "conv": {"kernel": jnp.asarray(rng.uniform(0.1, 9, (3, 3))), "bias": jnp.ones(3)},
        "out": jnp.asarray(rng.uniform(0.1, 9, 5)),
    }
    nu = jax.tree.map(lambda x: x**2, h)
    res = preconditioner_agreement(nu, {"h": h}, groups="module")
    assert res.names == ["['conv']", "['out']"] and res.sizes == [12, 5]
    np.testing.assert_allclose(res.log_slope["h"], [1.0, 1.0], atol=1e-12)
    assert np.all(np.isnan(res.reliability["h"])) and np.all(np.isnan(res.ceiling["h"]))
    one = preconditioner_agreement(nu, {"h": h}, groups=lambda path: "all")
    assert one.names == ["all"] and one.sizes == [17]
    assert one.spearman["h"][0] == pytest.approx(one.overall_spearman["h"])
    # Replicates with log correlation 0.8 (the constructed pair above, tiled into each leaf):
    # ceiling sqrt(2 * 0.8 / 1.8).
    a = 10.0 ** np.array([0.0, 1.0, 2.0, 3.0])
    b = 10.0 ** np.array([0.0, 1.0, 3.0, 2.0])
    nu2 = {"x": jnp.asarray(a**2)}
    rep = ({"x": jnp.asarray(a)}, {"x": jnp.asarray(b)})
    res = preconditioner_agreement(nu2, {"d": rep[0]}, replicates={"d": rep})
    np.testing.assert_allclose(res.reliability["d"], [0.8], atol=1e-12)
    np.testing.assert_allclose(res.ceiling["d"], [np.sqrt(1.6 / 1.8)], atol=1e-12)
    with pytest.raises(ValueError, match="replicate"):
        preconditioner_agreement(nu2, {"d": rep[0]}, replicates={"d": (rep[0], {"y": 1.0})})
    with pytest.raises(ValueError, match="groups"):
        preconditioner_agreement(nu2, {"d": rep[0]}, groups="layer")
    d = res.to_dict()
    assert d["names"] == ["['x']"] and d["pearson_log"]["d"] == pytest.approx([1.0])


def test_adam_second_moment_finds_the_state_and_corrects_bias():
    import optax

    p = {"w": jnp.array([1.0, 2.0])}
    grads = [jnp.array([0.1, -0.2]), jnp.array([0.3, 0.0]), jnp.array([-0.5, 0.4])]
    b2 = 0.95
    v = np.zeros(2)
    opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-3, b2=b2))
    s = opt.init(p)
    for g in grads:
        v = b2 * v + (1 - b2) * np.asarray(g) ** 2
        _, s = opt.update({"w": g}, s, p)
    vhat = v / (1 - b2**3)
    np.testing.assert_allclose(hk.adam_second_moment(s, b2=b2)["w"], vhat, rtol=1e-5)
    np.testing.assert_allclose(hk.adam_second_moment(s, b2=None)["w"], v, rtol=1e-5)
    # inject_hyperparams carries b2: it wins over the argument's default.
    inj = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, b2=b2)
    si = inj.init(p)
    for g in grads:
        _, si = inj.update({"w": g}, si, p)
    np.testing.assert_allclose(hk.adam_second_moment(si)["w"], vhat, rtol=1e-5)
    chained = optax.chain(optax.clip(1.0), inj)
    sc = chained.init(p)
    for g in grads:
        _, sc = chained.update({"w": g}, sc, p)
    np.testing.assert_allclose(hk.adam_second_moment(sc)["w"], vhat, rtol=1e-5)
    with pytest.raises(ValueError, match="no optax.ScaleByAdamState.*ScaleByRmsState"):
        hk.adam_second_moment(optax.rmsprop(1e-3).init(p))
    with pytest.raises(ValueError, match="2 ScaleByAdamStates"):
        hk.adam_second_moment(optax.chain(optax.adam(1.0), optax.adam(1.0)).init(p))
    with pytest.raises(ValueError, match="no step"):
        hk.adam_second_moment(optax.adam(1e-3).init(p))


def _tiny_problem():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(24, 3)))
    y = jnp.asarray(rng.integers(0, 3, 24))
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 4))),
        "w2": jnp.asarray(rng.normal(size=(4, 3))),
    }

    def model_fn(p, batch):
        bx, _ = batch
        return jnp.tanh(bx @ p["w1"]) @ p["w2"]

    def output_loss(logits, batch):
        import optax

        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    def loss(p, batch):
        return output_loss(model_fn(p, batch), batch)

    return params, (x, y), model_fn, output_loss, loss


def test_reference_diagonals_match_dense():
    from jax.flatten_util import ravel_pytree

    from hesskit._src.preconditioner import _reference_diagonals

    params, data, model_fn, output_loss, loss = _tiny_problem()
    flat, unravel = ravel_pytree(params)
    h = np.asarray(jax.hessian(lambda f: loss(unravel(f), data))(flat), np.float64)
    jac = np.asarray(jax.jacobian(lambda f: model_fn(unravel(f), data).ravel())(flat), np.float64)
    logits = model_fn(params, data)
    h_l = jax.hessian(lambda z: output_loss(z.reshape(logits.shape), data))(logits.ravel())
    ggn = jac.T @ np.asarray(h_l, np.float64) @ jac
    probes = 4000
    refs, reps = _reference_diagonals(
        loss, params, data, jax.random.key(0), model_fn, output_loss, probes, 8, 7, 100
    )
    for name, dense in (("|diag H|", h), ("diag GGN", ggn)):
        est = np.asarray(ravel_pytree(refs[name])[0], np.float64)
        # Hutchinson with Rademacher probes: entry i has variance sum_{l != i} A_il^2 / n.
        sd = np.sqrt((np.sum(dense**2, axis=1) - np.diag(dense) ** 2) / probes)
        assert np.all(np.abs(est - np.diag(dense)) <= 5 * sd + 1e-6), name
        half = [np.asarray(ravel_pytree(r)[0]) for r in reps[name]]
        np.testing.assert_allclose(0.5 * (half[0] + half[1]), est, rtol=1e-6, atol=1e-9)
        assert not np.allclose(half[0], half[1])  # independent probes
    # The empirical Fisher and the expected squared minibatch gradient, from per-example loops.
    n, b = 24, 8
    per = np.stack(
        [
            ravel_pytree(jax.grad(loss)(params, (data[0][i : i + 1], data[1][i : i + 1])))[0]
            for i in range(n)
        ]
    ).astype(np.float64)
    fisher = np.mean(per**2, axis=0)
    np.testing.assert_allclose(ravel_pytree(refs["empirical Fisher"])[0], fisher, rtol=1e-5)
    g = per.mean(axis=0)
    expected = g**2 + (fisher - g**2) * (n - b) / (b * (n - 1))
    np.testing.assert_allclose(ravel_pytree(refs["sqrt E[g_B^2]"])[0] ** 2, expected, rtol=1e-4)


def test_expected_minibatch_square_is_exact_by_enumeration():
    # For n = 5 examples and batches of 2 distinct ones, average g_B^2 over all 10 batches.
    import itertools

    from jax.flatten_util import ravel_pytree

    from hesskit._src.preconditioner import _reference_diagonals

    params, data, model_fn, output_loss, loss = _tiny_problem()
    small = jax.tree.map(lambda a: a[:5], data)
    refs, _ = _reference_diagonals(loss, params, small, jax.random.key(1), None, None, 2, 2, 5, 1)
    sq = []
    for ix in itertools.combinations(range(5), 2):
        batch = jax.tree.map(lambda a, ix=ix: a[np.asarray(ix)], small)
        sq.append(np.asarray(ravel_pytree(jax.grad(loss)(params, batch))[0]) ** 2)
    np.testing.assert_allclose(
        ravel_pytree(refs["sqrt E[g_B^2]"])[0] ** 2, np.mean(sq, axis=0), rtol=1e-4
    )


def test_adam_hessian_agreement_end_to_end():
    import optax

    params, data, model_fn, output_loss, loss = _tiny_problem()
    opt = optax.adam(1e-2)
    state = opt.init(params)
    for i in range(5):
        batch = jax.tree.map(lambda a, i=i: a[4 * i : 4 * i + 8], data)
        updates, state = opt.update(jax.grad(loss)(params, batch), state, params)
        params = optax.apply_updates(params, updates)
    res = hk.adam_hessian_agreement(
        loss, params, state, data, jax.random.key(2), model_fn=model_fn,
        output_loss_fn=output_loss, num_probes=40, batch_size=8,
    )  # fmt: skip
    assert set(res.spearman) == {"|diag H|", "diag GGN", "empirical Fisher", "sqrt E[g_B^2]"}
    assert res.names == ["['w1']", "['w2']"]
    assert np.all(np.isfinite(res.reliability["|diag H|"]))
    assert np.all(np.isnan(res.reliability["empirical Fisher"]))
    for bad, match in (
        (dict(num_probes=3), "even"),
        (dict(model_fn=model_fn), "go together"),
        (dict(batch_size=100), "batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            hk.adam_hessian_agreement(loss, params, state, data, jax.random.key(0), **bad)
    with pytest.raises(ValueError, match="ScaleByAdamState"):
        hk.adam_hessian_agreement(
            loss, params, optax.sgd(0.1).init(params), data, jax.random.key(0)
        )
