"""AdaHessian (Yao et al. 2021): Adam with a Hutchinson estimate of diag(H) in place of g ⊙ g.

The diagonal comes from :func:`hesskit.diagonal` (Rademacher probes, one product each), so the
estimator exists once in hesskit. The transform reads the objective from ``value_fn`` like the
other curvature transforms (:mod:`hesskit._src.saddle_transforms` explains the calling
convention that compiles a jitted step once).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hesskit._src import krylov
from hesskit._src.operators import hessian_operator
from hesskit._src.saddle_transforms import (
    _as_key,
    _check_nonnegative,
    _check_positive_int,
    _require_value_fn,
)
from hesskit._src.stochastic import diagonal

PyTree = Any

__all__ = ["AdaHessianState", "adahessian", "spatial_average"]

SPATIAL_AXES = ("leading", "trailing", None)


class AdaHessianState(NamedTuple):
    r"""State of :func:`adahessian`.

    Attributes:
        count: steps taken.
        rng_key: PRNG key of the Rademacher probes.
        mu: the first moment of the gradient (float32 or wider, shaped like the params).
        nu: the moving average of the squared (spatially averaged, absolute) diagonal.
        hessian_count: diagonal estimates taken so far (the bias correction of ``nu``).
        diagonal: the last estimate of :math:`|\operatorname{diag} H|` after averaging.
    """

    count: jax.Array
    rng_key: jax.Array
    mu: PyTree
    nu: PyTree
    hessian_count: jax.Array
    diagonal: PyTree


def spatial_average(tree: PyTree, axes: str | None = "leading") -> PyTree:
    """Average each convolution kernel over its spatial axes, keeping its shape.

    A leaf with three or more axes is read as a convolution kernel: ``"leading"`` averages over
    all axes but the last two (flax's ``(..spatial.., in, out)`` layout), ``"trailing"`` over all
    but the first two (PyTorch's and equinox's ``(out, in, ..spatial..)``); ``None`` returns
    ``tree`` unchanged. Leaves of fewer axes (dense kernels, biases) are left as they are.

    Args:
        tree: a pytree of arrays.
        axes: ``"leading"``, ``"trailing"`` or ``None``.

    Returns:
        A pytree like ``tree``.

    Examples:
        >>> import jax.numpy as jnp
        >>> k = jnp.arange(8.0).reshape(2, 2, 1, 2)             # 2x2 kernel, 1 -> 2 channels
        >>> spatial_average(k)[:, :, 0, 0].tolist()
        [[3.0, 3.0], [3.0, 3.0]]
    """
    if axes not in SPATIAL_AXES:
        msg = f"spatial_axes must be one of {SPATIAL_AXES}, got {axes!r}."
        raise ValueError(msg)
    if axes is None:
        return tree

    def leaf(a: jax.Array) -> jax.Array:
        if a.ndim < 3:
            return a
        dims = tuple(range(a.ndim - 2)) if axes == "leading" else tuple(range(2, a.ndim))
        return jnp.broadcast_to(jnp.mean(a, axis=dims, keepdims=True), a.shape)

    return jax.tree_util.tree_map(leaf, tree)


def adahessian(
    learning_rate: Any = 0.15,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-4,
    weight_decay: Any = 0.0,
    hessian_power: Any = 1.0,
    update_every: int = 1,
    num_probes: int = 1,
    spatial_axes: str | None = "leading",
    seed: Any = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaHessian: Adam whose second moment is the squared Hutchinson diagonal of the Hessian.

    Yao, Gholami, Shen, Mustafa, Keutzer and Mahoney (2021). With :math:`z` Rademacher,
    :math:`D = |z \odot Hz|` (one product per probe, :func:`hesskit.diagonal`), averaged over
    the spatial axes of convolution kernels (:func:`spatial_average`: the kernel's Hessian
    diagonal is noisy entry by entry, smooth over a kernel), and

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_s = \beta_2 v_{s-1} + (1-\beta_2) D_s^2,

    .. math::
        u_t = -\eta \left( \frac{m_t / (1-\beta_1^t)}
              {\left(\sqrt{v_s / (1-\beta_2^s)}\right)^k + \epsilon} + w\,\theta_t \right),

    :math:`k` the Hessian power, :math:`w` decoupled weight decay as in the paper's code. The
    diagonal is estimated every ``update_every`` steps (the paper's delayed Hessian update);
    :math:`s` counts the estimates, so ``nu`` is an average of fresh estimates only and its
    bias correction counts them. Defaults are the paper's (and its reference code's):
    :math:`\eta = 0.15`, :math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-4}`,
    :math:`k = 1`, one probe per estimate.

    The incoming updates are read as the gradient (put it first in a chain). Cost: one
    Hessian-vector product per probe every ``update_every`` steps (about two gradients each).

    Args:
        learning_rate: :math:`\eta \ge 0` (a number, or an array under
            :func:`optax.inject_hyperparams`).
        b1: :math:`\beta_1 \in [0, 1)`.
        b2: :math:`\beta_2 \in [0, 1)`.
        eps: :math:`\epsilon \ge 0`.
        weight_decay: :math:`w \ge 0`.
        hessian_power: :math:`k \in [0, 1]` (0 is SGD with momentum, 1 the Newton-like scale).
        update_every: estimate the diagonal every this many steps (``>= 1``).
        num_probes: Rademacher probes per estimate (``>= 1``; static).
        spatial_axes: ``"leading"`` (flax kernels), ``"trailing"`` (PyTorch layout) or
            ``None`` (no averaging), see :func:`spatial_average`.
        seed: an int seed or a PRNG key.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`; ``update(grads, state, params,
        value_fn=f)``.

    References:
        Yao, Gholami, Shen, Mustafa, Keutzer and Mahoney, *ADAHESSIAN: an adaptive second
        order optimizer for machine learning*, AAAI 2021.
    """
    for name, value in (
        ("learning_rate", learning_rate),
        ("eps", eps),
        ("weight_decay", weight_decay),
        ("hessian_power", hessian_power),
    ):
        _check_nonnegative(value, name)
    for name, value in (("b1", b1), ("b2", b2)):
        if isinstance(value, int | float) and not 0 <= value < 1:
            msg = f"{name} must be in [0, 1), got {value!r}."
            raise ValueError(msg)
    if isinstance(hessian_power, int | float) and hessian_power > 1:
        msg = f"hessian_power must be in [0, 1], got {hessian_power!r}."
        raise ValueError(msg)
    _check_positive_int(update_every, "update_every")
    _check_positive_int(num_probes, "num_probes")
    if spatial_axes not in SPATIAL_AXES:
        msg = f"spatial_axes must be one of {SPATIAL_AXES}, got {spatial_axes!r}."
        raise ValueError(msg)

    def init_fn(params: PyTree) -> AdaHessianState:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, krylov.to_krylov(params))
        zero = jnp.zeros((), jnp.int32)
        return AdaHessianState(zero, _as_key(seed), zeros, zeros, zero, zeros)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        _require_value_fn(value_fn, params, "adahessian")
        key, sub = jax.random.split(state.rng_key)

        def estimate(_):
            op = hessian_operator(value_fn, params)
            d = krylov.to_krylov(diagonal(op, sub, num_probes=int(num_probes)))
            d = spatial_average(jax.tree_util.tree_map(jnp.abs, d), spatial_axes)
            nu = jax.tree_util.tree_map(lambda v, x: b2 * v + (1 - b2) * x * x, state.nu, d)
            return nu, state.hessian_count + 1, d

        def keep(_):
            return state.nu, state.hessian_count, state.diagonal

        fresh = state.count % update_every == 0
        nu, hcount, d = jax.lax.cond(fresh, estimate, keep, None)
        g = krylov.to_krylov(updates)
        mu = jax.tree_util.tree_map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, g)
        count = state.count + 1
        dtype = krylov.krylov_dtype(mu)
        c1 = 1 - b1 ** count.astype(dtype)
        c2 = 1 - b2 ** hcount.astype(dtype)

        def step(m, v, u, p):
            denom = jnp.sqrt(v / c2) ** hessian_power + eps
            delta = m / c1 / denom + weight_decay * p.astype(m.dtype)
            return (-learning_rate * delta).astype(u.dtype)

        new_updates = jax.tree_util.tree_map(step, mu, nu, updates, params)
        return new_updates, AdaHessianState(count, key, mu, nu, hcount, d)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
