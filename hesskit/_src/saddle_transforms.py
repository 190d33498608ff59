"""optax transforms that escape saddle points: sphere noise, perturbed GD, negative curvature.

Every factory returns an :class:`optax.GradientTransformationExtraArgs` with a ``NamedTuple``
state that carries its PRNG key, accepts and ignores unknown keyword arguments, and takes
numeric hyperparameters that :func:`optax.inject_hyperparams` can turn into arrays.

The curvature transforms read the objective from ``value_fn``. Call ``update`` inside the
jitted training step, with the batch an argument of that step and ``value_fn`` made inside it
(``value_fn=lambda p: loss(p, batch)``): the batch is then a traced value, and the whole step,
Lanczos products included, compiles once and is reused for every new batch of the same shapes
(``tests/test_compile_once.py`` counts the loss's traces). A ``value_fn`` that closes over a
concrete batch outside ``jit`` bakes the batch in as a constant and retraces per batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hesskit._src import krylov
from hesskit._src.operators import hessian_operator
from hesskit._src.tree import (
    tree_dim,
    tree_matvec,
    tree_norm,
    tree_normalize,
    tree_random_sphere,
    tree_vdot,
)
from hesskit._src.tridiag import lanczos

PyTree = Any

__all__ = [
    "CurvatureMonitorState",
    "NegativeCurvatureState",
    "PerturbState",
    "SphereNoiseState",
    "add_sphere_noise",
    "monitor_curvature",
    "negative_curvature",
    "noisy_sgd",
    "perturb_near_saddle",
]


def _as_key(seed: Any) -> jax.Array:
    """An int seed (or integer array, as inject_hyperparams makes it) or a key, as a key."""
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if isinstance(seed, jax.Array) and seed.dtype == jnp.uint32 and seed.shape == (2,):
        return jax.random.wrap_key_data(seed)
    return jax.random.key(seed)


def _check_nonnegative(value: Any, name: str) -> None:
    # Hyperparameters may be arrays or tracers under inject_hyperparams: check concrete ones.
    if isinstance(value, int | float | np.floating | np.integer) and not value >= 0:
        msg = f"{name} must be >= 0, got {value!r}."
        raise ValueError(msg)


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and value < 1:
        msg = f"{name} must be a positive int, got {value!r}."
        raise ValueError(msg)


def _add(updates: PyTree, delta: PyTree, scale: Any) -> PyTree:
    return jax.tree_util.tree_map(
        lambda u, d: (u + scale * d.astype(jnp.float32)).astype(u.dtype), updates, delta
    )


class SphereNoiseState(NamedTuple):
    """State of :func:`add_sphere_noise`: the step count and the PRNG key."""

    count: jax.Array
    rng_key: jax.Array


def add_sphere_noise(radius: Any, seed: Any = 0) -> optax.GradientTransformationExtraArgs:
    r"""Add :math:`r\,u` with :math:`u` uniform on the unit sphere of the whole parameter space.

    One direction across all leaves (not a unit vector per leaf), fresh at every step: the
    perturbation of the noisy gradient method of Ge et al. (2015), which escapes strict saddles
    where plain gradient descent started exactly at the saddle never moves.

    Args:
        radius: :math:`r \ge 0`.
        seed: an int seed or a PRNG key.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`.

    References:
        Ge, Huang, Jin and Yuan, *Escaping from saddle points: online stochastic gradient for
        tensor decomposition*, COLT 2015.
    """
    _check_nonnegative(radius, "radius")

    def init_fn(params: PyTree) -> SphereNoiseState:
        del params
        return SphereNoiseState(jnp.zeros((), jnp.int32), _as_key(seed))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        key, sub = jax.random.split(state.rng_key)
        noise = tree_random_sphere(sub, jax.tree_util.tree_map(jnp.float32, updates))
        return _add(updates, noise, radius), SphereNoiseState(state.count + 1, key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def noisy_sgd(
    learning_rate: Any, radius: Any, seed: Any = 0
) -> optax.GradientTransformationExtraArgs:
    r"""Noisy gradient descent :math:`x \leftarrow x - \eta (g + r u)`, :math:`u` on the sphere.

    The noise is added to the gradient before the learning-rate scaling, as in Ge et al.
    (2015), so the parameter perturbation is :math:`\eta r u`.

    Args:
        learning_rate: :math:`\eta \ge 0` (a scalar or an optax schedule).
        radius: :math:`r \ge 0`.
        seed: an int seed or a PRNG key.

    Returns:
        ``optax.chain(add_sphere_noise(radius, seed), optax.scale_by_learning_rate(lr))``.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> opt = noisy_sgd(0.1, radius=0.01)
        >>> params = jnp.zeros(2)
        >>> updates, _ = opt.update(jnp.zeros(2), opt.init(params), params)
        >>> round(float(jnp.linalg.norm(updates)), 6)
        0.001
    """
    if not callable(learning_rate):
        _check_nonnegative(learning_rate, "learning_rate")
    return optax.chain(add_sphere_noise(radius, seed), optax.scale_by_learning_rate(learning_rate))


class PerturbState(NamedTuple):
    """State of :func:`perturb_near_saddle`."""

    count: jax.Array
    rng_key: jax.Array
    last_perturbation: jax.Array
    num_perturbations: jax.Array


def perturb_near_saddle(
    radius: Any, grad_threshold: Any, wait_steps: Any, seed: Any = 0
) -> optax.GradientTransformationExtraArgs:
    r"""Perturbed gradient descent: a ball-uniform kick when the gradient is small.

    When :math:`\lVert g \rVert \le` ``grad_threshold`` and no perturbation happened in the last
    ``wait_steps`` steps, add a sample uniform in the ball of radius :math:`r` (a direction
    uniform on the sphere times :math:`r U^{1/d}`, :math:`d` the number of parameters);
    otherwise pass the updates through. The incoming updates are read as the gradient, so put
    this transform first in a chain, before any scaling:
    ``optax.chain(perturb_near_saddle(...), optax.sgd(lr))``.

    Args:
        radius: :math:`r \ge 0`.
        grad_threshold: gradient norm at or below which a perturbation may happen (``>= 0``).
        wait_steps: minimum number of steps between perturbations (``>= 1``).
        seed: an int seed or a PRNG key.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose state records the last
        perturbation step and the number of perturbations.

    References:
        Jin, Ge, Netrapalli, Kakade and Jordan, *How to escape saddle points efficiently*,
        ICML 2017.
    """
    _check_nonnegative(radius, "radius")
    _check_nonnegative(grad_threshold, "grad_threshold")
    _check_positive_int(wait_steps, "wait_steps")

    def init_fn(params: PyTree) -> PerturbState:
        del params
        zero = jnp.zeros((), jnp.int32)
        return PerturbState(zero, _as_key(seed), zero, zero)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        key, k_dir, k_rad = jax.random.split(state.rng_key, 3)
        like = jax.tree_util.tree_map(jnp.float32, updates)
        direction = tree_random_sphere(k_dir, like)
        scale = radius * jax.random.uniform(k_rad) ** (1.0 / tree_dim(updates))
        waited = (state.num_perturbations == 0) | (
            state.count - state.last_perturbation >= wait_steps
        )
        kick = (tree_norm(like) <= grad_threshold) & waited
        new = _add(updates, direction, jnp.where(kick, scale, 0.0))
        return new, PerturbState(
            count=state.count + 1,
            rng_key=key,
            last_perturbation=jnp.where(kick, state.count, state.last_perturbation),
            num_perturbations=state.num_perturbations + kick.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _require_value_fn(value_fn: Any, params: Any, name: str) -> None:
    if value_fn is None or not callable(value_fn):
        msg = (
            f"{name} needs the objective: call update(updates, state, params, value_fn=f) "
            "with f(params) -> scalar loss (optax's name, as in its line searches)."
        )
        raise TypeError(msg)
    if params is None:
        msg = f"{name} needs params: call update(updates, state, params, value_fn=f)."
        raise TypeError(msg)


def _ritz_extremes(value_fn, params, key, v0, num_matvecs):
    """Smallest and largest Ritz pairs of a short Lanczos run warm-started at ``v0``.

    The products run in the parameters' dtypes and the Lanczos work in Krylov precision
    (float32 or wider), so the returned vectors are in Krylov precision.
    """
    op = hessian_operator(value_fn, params)
    m = min(num_matvecs, op.dim)
    # A warm start that is (nearly) an exact eigenvector makes the Krylov space invariant after
    # one step and hides every other direction; a small random admixture keeps it open.
    k_mix, key = jax.random.split(key)
    mix = tree_random_sphere(k_mix, krylov.krylov_like(op.like))
    v0 = jax.tree_util.tree_map(lambda a, b: a + 0.1 * b, tree_normalize(v0)[0], mix)
    res = lanczos(op, key, m, v0=krylov.cast_like(v0, op.like), loop="compiled")
    # Rows past an early breakdown are zero; push their diagonal entries out of the way so
    # that neither extreme Ritz value comes from them.
    valid = jnp.arange(m) < res.num_steps
    span = jnp.max(jnp.abs(res.alphas)) + 2 * jnp.max(jnp.abs(res.betas), initial=0.0) + 1.0
    alphas = jnp.where(valid, res.alphas, 0.0)
    tri = jnp.diag(alphas) + jnp.diag(res.betas, 1) + jnp.diag(res.betas, -1)
    theta, s = jnp.linalg.eigh(tri + jnp.diag(jnp.where(valid, 0.0, 3 * span)))
    low = jnp.argmin(theta)
    high = jnp.argmax(jnp.where(theta < 2 * span, theta, -jnp.inf))
    bottom, _ = tree_normalize(tree_matvec(res.basis, s[:, low]))
    top, _ = tree_normalize(tree_matvec(res.basis, s[:, high]))
    return theta[low], bottom, theta[high], top


class NegativeCurvatureState(NamedTuple):
    """State of :func:`negative_curvature`.

    ``eigenvalue`` and ``eigenvector`` hold the running estimate of the most negative eigenpair
    (``optax.tree_utils.tree_get(state, "eigenvalue")`` finds it inside any chain).
    """

    count: jax.Array
    rng_key: jax.Array
    eigenvalue: jax.Array
    eigenvector: PyTree


def negative_curvature(
    learning_rate: Any,
    *,
    num_matvecs: int = 10,
    every: int = 1,
    step: str = "unit",
    seed: Any = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Add a step along the most negative curvature direction while the curvature is negative.

    The method proposed by Alain et al. (2019, appendix E): keep a running estimate
    :math:`(\tilde\lambda, \tilde v)` of the most negative eigenpair of the Hessian and, while
    :math:`\tilde\lambda < 0`, add a step along :math:`\tilde v` with its own learning rate,
    signed so that it decreases the loss. Every ``every`` steps the estimate is refined by a
    Lanczos run of ``num_matvecs`` Hessian-vector products started from the previous
    eigenvector (its smallest Ritz pair): a warm-started Krylov space converges much faster per
    product than power iteration on :math:`cI - H`, which needs a bound :math:`c` and crawls
    when :math:`\lambda_{\min}` is small next to :math:`\lambda_{\max}` (the shape of network
    Hessians).

    The step is, with :math:`g` the raw gradient,

    * ``step="unit"`` (default): :math:`-\eta\,\operatorname{sign}(g^\top \tilde v)\,\tilde v`
      (sign 0 taken as +1), a fixed-length move that also leaves an exact saddle, where
      :math:`g = 0`;
    * ``step="gradient"``: :math:`-\eta\,(g^\top \tilde v)\,\tilde v`, the paper's form.

    The paper observes that the best step along negative-curvature directions is much larger
    than :math:`1/|\lambda|`, so :math:`\eta` is usually much larger than the main learning rate.

    It reads the objective from the extra argument ``value_fn`` (a function of the parameters,
    optax's name in its line searches), takes the raw gradient from ``grad=`` when given and
    otherwise computes it, and adds its step to the incoming updates, so it works alone or after
    another transform: ``optax.chain(optax.adam(1e-3), negative_curvature(0.1))``. It needs no
    keyword argument besides ``value_fn`` and ``grad``, which optax's line searches also take,
    so it chains with :func:`optax.scale_by_backtracking_linesearch` and
    :func:`optax.scale_by_zoom_linesearch` (they reject extra arguments that ``value_fn`` does
    not accept; pass none).

    Args:
        learning_rate: :math:`\eta \ge 0` for the negative-curvature step.
        num_matvecs: Hessian-vector products per refinement (capped at the dimension). It
            sizes the compiled program: keep it static under :func:`optax.inject_hyperparams`
            (``static_args=("num_matvecs",)``).
        every: refine every this many steps (``lax.cond`` skips the products in between).
        step: ``"unit"`` or ``"gradient"``, see above.
        seed: an int seed or a PRNG key.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params`` and
        ``value_fn`` (call it inside the jitted step that takes the batch, see the module
        documentation, so that it compiles once).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> loss = lambda p, batch: jnp.sum(batch * p**2)   # a saddle when batch has signs
        >>> opt = optax.chain(optax.sgd(0.1), negative_curvature(0.5, num_matvecs=2))
        >>> @jax.jit
        ... def step(p, state, batch):                      # the batch is traced: one compile
        ...     f = lambda q: loss(q, batch)
        ...     updates, state = opt.update(jax.grad(f)(p), state, p, value_fn=f)
        ...     return optax.apply_updates(p, updates), state
        >>> p = jnp.zeros(2)
        >>> p, state = step(p, opt.init(p), jnp.array([1.0, -1.0]))
        >>> round(float(optax.tree_utils.tree_get(state, "eigenvalue")), 4)
        -2.0

    References:
        Alain, Le Roux and Manzagol, *Negative eigenvalues of the Hessian in deep neural
        networks*, 2019 (arXiv:1902.02366).
    """
    _check_nonnegative(learning_rate, "learning_rate")
    _check_positive_int(num_matvecs, "num_matvecs")
    _check_positive_int(every, "every")
    if step not in ("unit", "gradient"):
        msg = f"step must be 'unit' or 'gradient', got {step!r}."
        raise ValueError(msg)

    def init_fn(params: PyTree) -> NegativeCurvatureState:
        key, sub = jax.random.split(_as_key(seed))
        vector = tree_random_sphere(sub, krylov.to_krylov(params))
        return NegativeCurvatureState(
            jnp.zeros((), jnp.int32), key, jnp.zeros((), jnp.float32), vector
        )

    def update_fn(updates, state, params=None, *, value_fn=None, grad=None, **extra_args):
        del extra_args
        _require_value_fn(value_fn, params, "negative_curvature")
        key, sub = jax.random.split(state.rng_key)

        def refine(_):
            lam, vec, _, _ = _ritz_extremes(value_fn, params, sub, state.eigenvector, num_matvecs)
            return lam.astype(jnp.float32), vec

        def keep(_):
            return state.eigenvalue, state.eigenvector

        lam, vec = jax.lax.cond(state.count % every == 0, refine, keep, None)
        g = krylov.to_krylov(jax.grad(value_fn)(params) if grad is None else grad)
        gv = tree_vdot(g, vec)
        if step == "unit":
            coeff = jnp.where(gv >= 0, 1.0, -1.0)
        else:
            coeff = gv
        scale = jnp.where(lam < 0, -learning_rate * coeff, 0.0)
        new_updates = _add(updates, vec, scale)
        return new_updates, NegativeCurvatureState(state.count + 1, key, lam, vec)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class CurvatureMonitorState(NamedTuple):
    """State of :func:`monitor_curvature`: the latest extreme eigenvalue estimates."""

    count: jax.Array
    rng_key: jax.Array
    lambda_max: jax.Array
    lambda_min: jax.Array
    top_vector: PyTree
    bottom_vector: PyTree


def monitor_curvature(
    every: int, *, num_matvecs: int = 10, seed: Any = 0
) -> optax.GradientTransformationExtraArgs:
    r"""Pass updates through; keep warm-started estimates of the extreme eigenvalues.

    Every ``every`` steps one Lanczos run of ``num_matvecs`` Hessian-vector products, started
    from the sum of the previous top and bottom Ritz vectors (they change slowly during
    training), gives both extreme Ritz values. A jitted training loop can read them from the state
    (``optax.tree_utils.tree_get(state, "lambda_max")``) and compare the sharpness with
    ``2 / learning_rate`` (the edge of stability) without leaving the device. Ritz values lie
    inside the spectrum, so ``lambda_max`` is a lower bound of the true one and ``lambda_min``
    an upper bound, both tightening as the warm start accumulates.

    Args:
        every: measure every this many steps (``>= 1``); in between the state is carried.
        num_matvecs: Hessian-vector products per measurement (``>= 2``, capped at the
            dimension); static under :func:`optax.inject_hyperparams`, as above.
        seed: an int seed or a PRNG key.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params`` and
        ``value_fn`` (call it inside the jitted step that takes the batch, see the module
        documentation, so that it compiles once).
    """
    _check_positive_int(every, "every")
    _check_positive_int(num_matvecs, "num_matvecs")
    if isinstance(num_matvecs, int | np.integer) and num_matvecs < 2:
        # One Lanczos step has a single Ritz value: lambda_max and lambda_min would coincide.
        msg = f"num_matvecs must be >= 2 to separate lambda_max from lambda_min, got {num_matvecs}."
        raise ValueError(msg)

    def init_fn(params: PyTree) -> CurvatureMonitorState:
        key, sub = jax.random.split(_as_key(seed))
        vector = tree_random_sphere(sub, krylov.to_krylov(params))
        nan = jnp.full((), jnp.nan, jnp.float32)
        return CurvatureMonitorState(jnp.zeros((), jnp.int32), key, nan, nan, vector, vector)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        _require_value_fn(value_fn, params, "monitor_curvature")
        key, sub = jax.random.split(state.rng_key)

        def measure(_):
            # Start from top + bottom: the Krylov space then contains both previous
            # directions and refines both ends at once.
            start = jax.tree_util.tree_map(jnp.add, state.top_vector, state.bottom_vector)
            low, bottom, high, top = _ritz_extremes(value_fn, params, sub, start, num_matvecs)
            return high.astype(jnp.float32), low.astype(jnp.float32), top, bottom

        def keep(_):
            return state.lambda_max, state.lambda_min, state.top_vector, state.bottom_vector

        hi, lo, top, bottom = jax.lax.cond(state.count % every == 0, measure, keep, None)
        return updates, CurvatureMonitorState(state.count + 1, key, hi, lo, top, bottom)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
