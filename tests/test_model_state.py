"""Hessians of models with state: BatchNorm statistics, dropout keys, losses with aux output.

The pattern under test (documented in docs/guides/frameworks.md): split an nnx model into its
parameters and the rest, ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``, and pass
everything that is not differentiated (the BatchNorm statistics, the batch, a dropout key) as
data arguments of the operator, so a new batch or key reuses the compiled products.

* eval mode: the running statistics in ``rest`` are fixed data; the Hessian is that of the
  network with those statistics frozen;
* train mode: the statistics are recomputed from each batch inside the loss, so the Hessian
  includes their dependence on the parameters; the loss returns the updated running statistics
  as auxiliary output (``has_aux=True``), which the products ignore and ``op.aux()`` returns;
* dropout: a fixed key passed as an argument fixes the mask, so the loss is one deterministic
  function and its Hessian is well defined; a new key is a new argument, not a new function.

Every product is checked against ``jax.hessian`` of the same loss on a 26-parameter model.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import hesskit as hk

# flax >= 0.11 reuses the state's Variables in nnx.merge unless copy=True; older nnx always made
# new ones and has no such argument. The library's lower bound is flax 0.10, so both are tested.
if "copy" in inspect.signature(nnx.merge).parameters:
    merge_fresh = functools.partial(nnx.merge, copy=True)
else:
    merge_fresh = nnx.merge

# Float64 where x64 is on (the default of the suite), float32 where it is off.
WIDE = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
RTOL = 1e-10 if WIDE == jnp.float64 else 2e-4


class Net(nnx.Module):
    """Linear -> BatchNorm -> tanh -> Dropout -> Linear, with the dropout key as an argument."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x, *, train: bool, key=None):
        h = jnp.tanh(self.bn(self.l1(x), use_running_average=not train))
        if train:
            h = self.drop(h, deterministic=False, rngs=nnx.Rngs(dropout=key))
        return self.l2(h)


def setup(dtype=WIDE):
    graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    # Non-trivial running statistics, so eval mode differs from train mode. Mapped over the
    # leaves: nnx's ways of assigning into a variable differ between the flax versions tested.
    stats = {"mean": jnp.linspace(-0.2, 0.3, 4), "var": jnp.linspace(0.5, 1.5, 4)}

    def with_stats(path, a):
        names = [getattr(k, "key", None) for k in path]
        return next((stats[n] for n in names if n in stats), a).astype(dtype)

    rest = jax.tree_util.tree_map_with_path(with_stats, rest)
    return graphdef, params, rest


def leaf(variable):
    """The array of an nnx variable (a ``Variable`` or an older ``VariableState``)."""
    return jax.tree.leaves(variable)[0]


def batch_at(seed, dtype=WIDE):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (16, 3), dtype), jax.random.normal(k2, (16, 2), dtype)


def dense_hvp(loss, params, v):
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda z: loss(unravel(z)))(flat)
    return unravel(h @ ravel_pytree(v)[0]), h


def assert_tree_close(a, b, rtol=RTOL, atol=RTOL / 100):
    np.testing.assert_allclose(ravel_pytree(a)[0], ravel_pytree(b)[0], rtol=rtol, atol=atol)


GRAPHDEF, _, _ = setup()


def eval_loss(params, rest, batch):
    x, y = batch
    model = nnx.merge(GRAPHDEF, params, rest)
    return 0.5 * jnp.mean(jnp.sum((model(x, train=False) - y) ** 2, axis=-1))


class TrainLoss:
    """Train-mode loss returning the updated running statistics; counts its traces."""

    def __init__(self):
        self.traces = 0

    def __call__(self, params, rest, batch, key):
        self.traces += 1
        x, y = batch
        # Train-mode BatchNorm writes its statistics: copy=True makes fresh Variables in the
        # current trace (writing to ones made outside it raises flax's TraceContextError).
        model = merge_fresh(GRAPHDEF, params, rest)
        out = model(x, train=True, key=key)
        new_rest = nnx.split(model, nnx.Param, ...)[2]
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1)), new_rest


def test_eval_mode_hessian_holds_the_statistics_fixed():
    _, params, rest = setup()
    batch = batch_at(0)
    v = hk.tree_random_normal(jax.random.key(1), params)
    op = hk.hessian_operator(eval_loss, params, rest, batch)
    expected, _ = dense_hvp(lambda p: eval_loss(p, rest, batch), params, v)
    assert_tree_close(op(v), expected)
    # The statistics are data: other statistics give another Hessian, with no new operator.
    moved = jax.tree.map(lambda a: 2.0 * a + 0.1, rest)
    other, _ = dense_hvp(lambda p: eval_loss(p, moved, batch), params, v)
    assert_tree_close(op.with_args(moved, batch)(v), other)
    assert not np.allclose(ravel_pytree(other)[0], ravel_pytree(expected)[0])


def test_train_mode_hessian_with_dropout_key_and_aux_statistics():
    _, params, rest = setup()
    loss = TrainLoss()
    batch, key = batch_at(0), jax.random.key(7)
    v = hk.tree_random_normal(jax.random.key(1), params)
    op = hk.hessian_operator(loss, params, rest, batch, key, has_aux=True)
    expected, h = dense_hvp(lambda p: loss(p, rest, batch, key)[0], params, v)
    assert_tree_close(op(v), expected)
    # The batch statistics depend on the parameters: the train-mode Hessian is not the
    # eval-mode one, even with the statistics of this very batch.
    _, h_eval = dense_hvp(lambda p: eval_loss(p, rest, batch), params, v)
    assert not np.allclose(h, h_eval)
    # aux: the running statistics after one momentum update toward this batch's moments.
    new_rest = op.aux()
    x = batch[0]
    pre = x @ leaf(params["l1"]["kernel"]) + leaf(params["l1"]["bias"])
    np.testing.assert_allclose(
        leaf(new_rest["bn"]["mean"]),
        0.9 * leaf(rest["bn"]["mean"]) + 0.1 * pre.mean(0),
        rtol=RTOL,
    )
    # The same key gives the same mask (the same Hessian); another key another mask.
    assert_tree_close(op.with_args(rest, batch, jax.random.key(7))(v), expected)
    other_key, _ = dense_hvp(lambda p: loss(p, rest, batch, jax.random.key(8))[0], params, v)
    assert not np.allclose(ravel_pytree(other_key)[0], ravel_pytree(expected)[0])
    # A new batch and key of the same shapes: no new trace of the loss, in products or aux.
    traces = loss.traces
    op2 = op.with_args(rest, batch_at(1), jax.random.key(8))
    hv2 = op2(v)
    op2.aux()
    assert loss.traces == traces
    want2, _ = dense_hvp(lambda p: loss(p, rest, batch_at(1), jax.random.key(8))[0], params, v)
    assert_tree_close(hv2, want2)


def test_eigsh_on_a_has_aux_operator_matches_dense():
    _, params, rest = setup()
    batch, key = batch_at(2), jax.random.key(3)
    op = hk.hessian_operator(TrainLoss(), params, rest, batch, key, has_aux=True)
    res = hk.eigsh(op, jax.random.key(0), 2, which="LA")
    _, h = dense_hvp(lambda p: TrainLoss()(p, rest, batch, key)[0], params, params)
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(h)[::-1][:2], rtol=100 * RTOL)


def test_hvp_has_aux_returns_the_aux_output():
    _, params, rest = setup()
    batch, key = batch_at(0), jax.random.key(7)
    loss = TrainLoss()
    v = hk.tree_random_normal(jax.random.key(1), params)
    hv, aux = hk.hvp(lambda p: loss(p, rest, batch, key), params, v, has_aux=True)
    expected, _ = dense_hvp(lambda p: loss(p, rest, batch, key)[0], params, v)
    assert_tree_close(hv, expected)
    assert_tree_close(aux, hk.hessian_operator(loss, params, rest, batch, key, has_aux=True).aux())


def test_aux_misuse_is_reported():
    _, params, rest = setup()
    batch, key = batch_at(0), jax.random.key(7)
    with pytest.raises(ValueError, match="has_aux=True"):
        hk.hessian_operator(TrainLoss(), params, rest, batch, key)
    with pytest.raises(ValueError, match=r"pair \(loss, aux\)"):
        hk.hessian_operator(eval_loss, params, rest, batch, has_aux=True)
    with pytest.raises(TypeError, match="no auxiliary output"):
        hk.hessian_operator(eval_loss, params, rest, batch).aux()
