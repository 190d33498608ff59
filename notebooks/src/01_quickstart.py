# %% [markdown]
# # hesskit quickstart
#
# hesskit works on the Hessian of a loss without ever forming it: every tool takes a
# `LinearOperator`, a function $v \mapsto Hv$ on pytrees shaped like the parameters. This notebook
# builds one for a small flax model on the bundled digits, then asks it for its extreme
# eigenpairs, its trace, its spectral density and what kind of critical point the parameters
# are near.

# %%
import jax
import jax.numpy as jnp
import numpy as np

import hesskit as hk
from hesskit.examples import load_digits, make_classifier, make_loss

data = load_digits(256)
module, params = make_classifier("mlp", key=jax.random.key(0), sample=data.x[:1])
loss_fn = make_loss(module)
print("parameters:", hk.tree_dim(params), "as a pytree:", jax.tree_util.tree_map(jnp.shape, params))

# %% [markdown]
# ## Operators
#
# `hessian_operator(f, params)` is the Hessian of `f` at `params`; applying it costs about two
# gradients (forward-over-reverse). The vectors are pytrees like `params`. For a model this small
# we can check one product against the dense Hessian from `jax.hessian`.

# %%
f = lambda p: loss_fn(p, data)  # noqa: E731
op = hk.hessian_operator(f, params)
v = hk.tree_random_normal(jax.random.key(1), params)
hv = op(v)
dense = op.to_dense()  # (2410, 2410): fine here, never for a real network
flat_v = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(v)])
flat_hv = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(hv)])
print(
    "|Hv - dense @ v| / |Hv| =",
    float(jnp.linalg.norm(flat_hv - dense @ flat_v) / jnp.linalg.norm(flat_hv)),
)
exact = np.linalg.eigvalsh(np.asarray(dense, np.float64))
print(f"dense spectrum: lambda_max={exact[-1]:.4f}, lambda_min={exact[0]:.4f}")
