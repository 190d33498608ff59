"""The byte-level Transformer of hesskit.examples: its size, its loss, its exact Hessian.

The Hessian-vector products are checked against ``jax.hessian`` of the flattened parameters on
a micro configuration (a few hundred parameters, every component of the full model: embeddings,
causal attention, LayerNorm, the GELU MLP, tied and untied outputs), and the loss is checked to
trace once across batches, as it must for a solver to reuse its compiled program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hesskit as hk
from hesskit.examples import (
    TransformerConfig,
    load_stdlib_corpus,
    make_lm_loss,
    make_transformer,
    sample_windows,
)

# conftest turns x64 on unless HESSKIT_TEST_X64=0; the dense check then runs in float64.
X64 = jax.config.read("jax_enable_x64")


def micro(dtype=jnp.float32, **overrides):
    # Odd sizes (vocab 11, context 5) so a transposed or mis-reshaped axis cannot line up.
    shape = {"vocab_size": 11, "context": 5, "width": 8, "heads": 2, "layers": 1, "mlp_ratio": 2}
    return TransformerConfig(**{**shape, **overrides}, dtype=dtype, param_dtype=dtype)


def random_batch(key, cfg, batch=3):
    return jax.random.randint(key, (batch, cfg.context + 1), 0, cfg.vocab_size, jnp.int32)


def test_gpt2_small_parameter_count_without_allocation():
    for vocab, count in [(256, 86_039_040), (50257, 124_439_808)]:
        cfg = TransformerConfig.gpt2_small(vocab_size=vocab)
        _, params = make_transformer(cfg, abstract=True)
        leaves = jax.tree.leaves(params)
        assert all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
        assert sum(int(np.prod(a.shape)) for a in leaves) == count == cfg.num_params()
    untied = TransformerConfig.gpt2_small(tied_embeddings=False)
    _, params = make_transformer(untied, abstract=True)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    assert n == untied.num_params() == 86_039_040 + 256 * 768


def test_tiny_loss_is_finite_and_near_uniform_at_initialization():
    cfg = TransformerConfig.tiny()
    model, params = make_transformer(cfg, key=jax.random.key(0))
    assert hk.tree_dim(params) == cfg.num_params() == 35_712
    tokens = load_stdlib_corpus(1 << 14)
    batch = sample_windows(tokens, jax.random.key(1), 4, cfg.context)
    assert batch.shape == (4, cfg.context + 1) and batch.dtype == jnp.int32
    # jit: an eager call would compile every primitive of the model on its own.
    value = float(jax.jit(make_lm_loss(model))(params, batch))
    # Small initial weights give near-uniform predictions over 256 bytes.
    assert np.isfinite(value) and abs(value - np.log(256)) < 0.1
    bf16 = cfg.bf16()
    model16, params16 = make_transformer(bf16, key=jax.random.key(0))
    assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    value16 = jax.jit(make_lm_loss(model16))(params16, batch)
    assert value16.dtype == jnp.float32 and abs(float(value16) - value) < 0.05


@pytest.mark.parametrize("tied", [True, False])
def test_hvp_matches_the_dense_hessian(tied):
    dtype = jnp.float64 if X64 else jnp.float32
    cfg = micro(dtype, tied_embeddings=tied)
    model, params = make_transformer(cfg, key=jax.random.key(0))
    # Larger weights than the 0.02 initialization, so attention is far from uniform and every
    # second-order term (softmax, LayerNorm, GELU) is visible in the Hessian.
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params = jax.tree.map(
        lambda a: a + 0.5 * jax.random.normal(next(keys), a.shape, a.dtype), params
    )
    loss = make_lm_loss(model)
    batch = random_batch(jax.random.key(2), cfg)
    flat, unravel = ravel_pytree(params)
    assert flat.size == cfg.num_params() and flat.dtype == dtype
    dense = np.asarray(jax.jit(jax.hessian(lambda z: loss(unravel(z), batch)))(flat))
    op = hk.hessian_operator(loss, params, batch)
    assert op.mode == "fwd-rev"
    v = jax.random.normal(jax.random.key(3), flat.shape, dtype)
    got = np.asarray(ravel_pytree(op(unravel(v)))[0])
    want = dense @ np.asarray(v)
    # jax.nn.dot_product_attention runs its softmax in float32 whatever the inputs' dtype, so a
    # float64 model matches a float64 reference to about float32's eps (measured 1.5e-7), not
    # 1e-12; a wrong term in the product would be off by O(1).
    tol = 1e-6 if X64 else 2e-4
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)
    assert np.linalg.norm(want) > 1e-2  # the check is not vacuous


def test_a_new_batch_does_not_retrace_the_loss():
    cfg = micro()
    model, params = make_transformer(cfg, key=jax.random.key(0))
    base = make_lm_loss(model)
    traces = []

    def loss(p, batch):
        traces.append(1)
        return base(p, batch)

    v = hk.tree_random_sphere(jax.random.key(1), params)
    product = jax.jit(lambda op, v: op(v))
    b0, b1 = random_batch(jax.random.key(2), cfg), random_batch(jax.random.key(3), cfg)
    h0 = product(hk.hessian_operator(loss, params, b0), v)
    first = len(traces)
    assert first > 0
    op1 = hk.hessian_operator(loss, params, b1)
    h1 = product(op1, v)
    h1_again = product(hk.hessian_operator(loss, params, b0).with_args(b1), v)
    assert len(traces) == first
    # The batch is data, not a constant: the second product is the second batch's.
    assert not np.allclose(ravel_pytree(h0)[0], ravel_pytree(h1)[0])
    np.testing.assert_array_equal(ravel_pytree(h1)[0], ravel_pytree(h1_again)[0])


def test_the_corpus_is_deterministic_and_capped():
    a = load_stdlib_corpus(5000)
    b = load_stdlib_corpus(5000)
    assert a.dtype == np.uint8 and a.shape == (5000,)
    np.testing.assert_array_equal(a, b)
    # A larger cap extends the same stream: the order does not depend on the cap.
    np.testing.assert_array_equal(load_stdlib_corpus(20_000)[:5000], a)
    assert len(np.unique(a)) > 20  # source text, not zeros
    w1 = sample_windows(a, jax.random.key(0), 3, 16)
    np.testing.assert_array_equal(w1, sample_windows(a, jax.random.key(0), 3, 16))
    # Each window is a contiguous slice of the corpus.
    for row in np.asarray(w1):
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(a, 17) == row, 1))
        assert starts.size >= 1


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="divide"):
        TransformerConfig(width=10, heads=3)
    with pytest.raises(ValueError, match="layers"):
        TransformerConfig(layers=0)
    with pytest.raises(ValueError, match="key"):
        make_transformer(TransformerConfig.tiny())
    model, params = make_transformer(micro(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="context"):
        model.apply(params, jnp.zeros((1, 6), jnp.int32))
    with pytest.raises(ValueError, match="max_bytes"):
        load_stdlib_corpus(0)
