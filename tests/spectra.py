"""Matrices with prescribed spectra and small models, shared by the test files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import hesskit as hk

# The widest float dtype of the current x64 setting (the suite also runs with x64 off, see
# conftest.py): tests whose point is not float64 itself use it for their reference problems.
WIDE = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
WIDE_NAME = jnp.dtype(WIDE).name


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal matrix (float64, NumPy)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def matrix_with_spectrum(eigenvalues, seed: int = 0) -> np.ndarray:
    """The symmetric matrix ``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    q = random_orthogonal(lam.size, seed)
    a = (q * lam) @ q.T
    return 0.5 * (a + a.T)


def _dense_matvec(v, m):
    return m @ v


def _to_tree(v):
    return {"a": v[:3], "b": {"c": v[3:].reshape(-1, 1)}}


def _from_tree(t):
    return jnp.concatenate([t["a"], t["b"]["c"].reshape(-1)])


def _tree_matvec(t, m):
    return _to_tree(m @ _from_tree(t))


# Module-level matvecs: operators of one shape share a treedef, so jitted solvers compile once.
def dense_operator(a, dtype=WIDE) -> hk.LinearOperator:
    """A LinearOperator on flat vectors from a dense matrix (the matrix is a Partial leaf)."""
    a = jnp.asarray(a, dtype)
    return hk.LinearOperator(
        jax.tree_util.Partial(_dense_matvec, m=a), jnp.zeros(a.shape[0], dtype)
    )


def pytree_operator(a, dtype=WIDE) -> hk.LinearOperator:
    """The same matrix acting on a dict pytree ``{"a": v[:3], "b": {"c": v[3:, None]}}``."""
    a = jnp.asarray(a, dtype)
    return hk.LinearOperator(
        jax.tree_util.Partial(_tree_matvec, m=a), _to_tree(jnp.zeros(a.shape[0], dtype))
    )


SPECTRA = {
    # well separated
    "separated": np.linspace(1.0, 10.0, 40),
    # clustered and repeated eigenvalues at the top
    "clustered": np.concatenate([[5.0, 5.0, 5.0, 4.999, 4.998], np.linspace(-1.0, 1.0, 35)]),
    # the paper's shape: a few large positive, a huge bulk near zero, a few small negative
    "paper": np.concatenate(
        [
            [20.0, 12.0, 8.0, 5.0],
            np.random.default_rng(1).normal(0, 1e-3, 52),
            [-0.3, -0.2, -0.12, -0.05],
        ]
    ),
    # condition number 1e6, positive definite
    "ill_conditioned": np.geomspace(1e-6, 1.0, 40),
    # near-singular: many exact zeros
    "near_singular": np.concatenate([np.zeros(20), np.linspace(0.5, 3.0, 20)]),
}


def _conv_loss(p, x, y):
    h = jax.lax.conv_general_dilated(
        x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.mean((jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"] - y) ** 2)


def conv_operator(damping: float = 0.0) -> hk.LinearOperator:
    """The Hessian of a tiny float64 conv net: ``loop="auto"`` picks the host loop on CPU."""
    k = jax.random.split(jax.random.key(5), 4)
    params = {
        "k": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2), jnp.float64),
        "w": 0.3 * jax.random.normal(k[1], (2 * 4 * 4, 2), jnp.float64),
    }
    x = jax.random.normal(k[2], (6, 4, 4, 1), jnp.float64)
    y = jax.random.normal(k[3], (6, 2), jnp.float64)
    return hk.hessian_operator(_conv_loss, params, x, y, damping=damping)
