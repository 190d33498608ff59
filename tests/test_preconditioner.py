import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
