"""Models from flax nnx, equinox and flax linen, as docs/guides/frameworks.md shows them.

Each framework's parameters go in as they are (an nnx ``State``, an equinox model filtered to
its float arrays, a linen variables dict); leaves that are not parameters (an nnx RNG counter,
an equinox activation function, a Python scalar) are rejected with a message that names the
leaf and the filter to use.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import hesskit as hk

WIDE = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
RTOL = 1e-10 if WIDE == jnp.float64 else 2e-4
X = jax.random.normal(jax.random.key(0), (8, 3), WIDE)
Y = jax.random.normal(jax.random.key(1), (8, 2), WIDE)


def check_against_dense(loss, params):
    flat, unravel = ravel_pytree(params)
    dense = jax.hessian(lambda z: loss(unravel(z)))(flat)
    np.testing.assert_allclose(hk.hessian_operator(loss, params).to_dense(), dense, rtol=RTOL)


def test_nnx_param_split():
    model = nnx.Sequential(
        nnx.Linear(3, 4, param_dtype=WIDE, rngs=nnx.Rngs(0)),
        jnp.tanh,
        nnx.Linear(4, 2, param_dtype=WIDE, rngs=nnx.Rngs(1)),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, rest, x, y):
        return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

    check_against_dense(lambda p: loss(p, rest, X, Y), params)
    op = hk.hessian_operator(loss, params, rest, X, Y)
    assert op.dim == 3 * 4 + 4 + 4 * 2 + 2


def test_nnx_whole_state_with_rngs_names_the_split():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.lin(x))

    graphdef, state = nnx.split(Net(nnx.Rngs(0, dropout=1)))
    with pytest.raises(TypeError, match="random-number state") as err:
        hk.hessian_operator(lambda s: jnp.sum(nnx.merge(graphdef, s)(X) ** 2), state)
    msg = str(err.value)
    assert "params['drop']['rngs']" in msg
    assert "nnx.split(model, nnx.Param, ...)" in msg
    assert "cast" not in msg


def test_equinox_partition():
    model = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.key(0))
    model = jax.tree.map(lambda a: a.astype(WIDE) if eqx.is_inexact_array(a) else a, model)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, x, y):
        m = eqx.combine(p, static)
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    check_against_dense(lambda p: loss(p, X, Y), params)
    # Unpartitioned, the activation functions are leaves: named, with the filter to use.
    with pytest.raises(TypeError, match="not an array") as err:
        hk.hessian_operator(loss, model, X, Y)
    assert "eqx.partition(model, eqx.is_inexact_array)" in str(err.value)


def test_python_scalar_leaves_are_rejected():
    params = {"w": jnp.ones(3, WIDE), "scale": 2.0}
    f = lambda p: p["scale"] * jnp.sum(p["w"] ** 2)  # noqa: E731
    with pytest.raises(TypeError, match=r"params\['scale'\] is a Python float \(2.0\)"):
        hk.hessian_operator(f, params)
    with pytest.raises(TypeError, match="jnp.asarray"):
        hk.hvp(f, params, params)
    # As an array it is a parameter like any other.
    params["scale"] = jnp.asarray(2.0, WIDE)
    check_against_dense(f, params)
