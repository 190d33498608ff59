"""Small models and the bundled digits data, for demos, benchmarks, notebooks and tests.

The digits data ship with scikit-learn (an optional dependency, in the ``demo`` extra): 1797
greyscale 8x8 images of handwritten digits. The models are flax.linen modules, so their
parameters are nested dicts exactly as flax makes them; hesskit uses them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

__all__ = [
    "CNN",
    "MLP",
    "Dataset",
    "LeNet",
    "load_digits",
    "make_classifier",
    "make_loss",
    "resize_images",
]


class Dataset(NamedTuple):
    """Images ``x`` of shape ``(n, h, w, 1)`` (8x8 unless resized) in [0, 1], labels ``y``."""

    x: jax.Array
    y: jax.Array


def load_digits(
    n: int | None = None, *, seed: int = 0, dtype: Any = jnp.float32, size: int | None = None
) -> Dataset:
    """The bundled scikit-learn digits, shuffled with ``seed`` and truncated to ``n`` examples.

    Args:
        n: number of examples to keep (all 1797 when ``None``).
        seed: shuffling seed (NumPy), so subsets are reproducible.
        dtype: floating dtype of the images.
        size: resize the images to ``size x size`` (bilinear, :func:`resize_images`), e.g. 28
            for the MNIST-sized input of :class:`LeNet`; ``None`` keeps 8x8.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(n, 8, 8, 1)`` (``(n, size, size, 1)`` when
        resized) and ``y`` of shape ``(n,)``.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        msg = "load_digits needs scikit-learn: pip install 'hesskit[demo]'."
        raise ImportError(msg) from err
    data = _sk_load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    if n is not None:
        if not 0 < n <= len(order):
            msg = f"n must be in [1, {len(order)}], got {n}."
            raise ValueError(msg)
        order = order[:n]
    x = (data.images[order] / 16.0).astype(np.float32)[..., None]
    out = Dataset(jnp.asarray(x, dtype), jnp.asarray(data.target[order], jnp.int32))
    return out if size is None else resize_images(out, size)


def resize_images(data: Dataset, size: int) -> Dataset:
    """``data`` with its images resized to ``size x size`` (bilinear, :func:`jax.image.resize`).

    Args:
        data: a :class:`Dataset` with ``x`` of shape ``(n, h, w, c)``.
        size: the new height and width, ``>= 1``.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(n, size, size, c)`` in the same dtype and the
        same labels.

    Examples:
        >>> import jax.numpy as jnp
        >>> small = Dataset(jnp.ones((2, 8, 8, 1)), jnp.zeros(2, jnp.int32))
        >>> resize_images(small, 28).x.shape
        (2, 28, 28, 1)
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        msg = f"size must be a positive int, got {size!r}."
        raise ValueError(msg)
    n, _, _, c = data.x.shape
    x = jax.image.resize(data.x, (n, int(size), int(size), c), method="bilinear")
    return Dataset(x.astype(data.x.dtype), data.y)


class MLP(nn.Module):
    """A fully connected classifier on flattened inputs."""

    features: Sequence[int] = (32, 10)
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # noqa: D102
        x = x.reshape((x.shape[0], -1))
        for width in self.features[:-1]:
            x = self.activation(nn.Dense(width)(x))
        return nn.Dense(self.features[-1])(x)


class CNN(nn.Module):
    """A LeNet-like ReLU convolutional classifier for 8x8 images (as in Alain et al. 2019)."""

    channels: Sequence[int] = (8, 16)
    hidden: int = 32
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # noqa: D102
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class LeNet(nn.Module):
    """A LeNet-style ReLU CNN for 28x28 images, the size studied by Alain et al. (2019).

    Two 5x5 convolutions (``SAME`` padding, ReLU, 2x2 average pooling) and two dense layers.
    The defaults (32 and 64 channels, a 1024-wide hidden layer, 10 classes) give 3,274,634
    parameters on 28x28x1 inputs, 98% of them in the first dense layer (3136 x 1024).
    Average pooling as in :class:`CNN`, so the Hessian has no max-selection kinks.
    """

    channels: Sequence[int] = (32, 64)
    hidden: int = 1024
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # noqa: D102
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (5, 5))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def make_classifier(
    name: str, *, key: jax.Array, sample: jax.Array, dtype: Any = jnp.float32
) -> tuple[nn.Module, PyTree]:
    """Build a named model and its initial parameters.

    Args:
        name: ``"mlp"`` (64-32-10 tanh), ``"mlp-large"`` (64-256-256-10 tanh, about 85k
            parameters), ``"cnn"`` (two ReLU conv layers, LeNet-like), ``"linear"``, or
            ``"lenet"`` (:class:`LeNet`, 3,274,634 parameters on 28x28 inputs: pass
            ``sample`` from ``load_digits(size=28)``).
        key: initialisation key.
        sample: a batch of inputs used to infer shapes.
        dtype: parameter dtype.

    Returns:
        ``(module, params)``.
    """
    models: dict[str, nn.Module] = {
        "mlp": MLP((32, 10)),
        "mlp-large": MLP((256, 256, 10)),
        "cnn": CNN(),
        "linear": MLP((10,)),
        "lenet": LeNet(),
    }
    if name not in models:
        msg = f"unknown model {name!r}; choose one of {sorted(models)}."
        raise ValueError(msg)
    module = models[name]
    params = module.init(key, sample.astype(dtype))
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    return module, params


def make_loss(module: nn.Module) -> Callable[[PyTree, Dataset], jax.Array]:
    """Mean softmax cross-entropy ``loss(params, batch)`` of ``module`` on a :class:`Dataset`."""

    def loss(params: PyTree, batch: Dataset) -> jax.Array:
        logits = module.apply(params, batch.x.astype(jax.tree_util.tree_leaves(params)[0].dtype))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

    return loss
