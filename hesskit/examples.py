"""Small models and the bundled digits data, for demos, benchmarks, notebooks and tests.

The digits data ship with scikit-learn (an optional dependency, in the ``demo`` extra): 1797
greyscale 8x8 images of handwritten digits. The models are flax nnx modules (:class:`MLP`,
:class:`CNN`, :class:`LeNet`); :func:`make_classifier` splits one the way hesskit wants it,

.. code-block:: python

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

so ``params`` (an ``nnx.State`` of float arrays) is what is differentiated and everything else
(``rest``: batch statistics, RNG state) stays out of it. The same architectures as flax linen
modules (:class:`LinenMLP`, :class:`LinenCNN`, :class:`LinenLeNet`, nested-dict parameters) are
kept for linen users and for ``make_classifier(..., api="linen")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

PyTree = Any

# flax >= 0.12 wants lists of submodules wrapped in nnx.List; older nnx took plain lists.
_ModuleList = getattr(nnx, "List", list)

__all__ = [
    "CNN",
    "MLP",
    "Dataset",
    "LeNet",
    "LinenCNN",
    "LinenLeNet",
    "LinenMLP",
    "NnxModel",
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


class LinenMLP(nn.Module):
    """A fully connected classifier on flattened inputs (flax linen)."""

    features: Sequence[int] = (32, 10)
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # noqa: D102
        x = x.reshape((x.shape[0], -1))
        for width in self.features[:-1]:
            x = self.activation(nn.Dense(width)(x))
        return nn.Dense(self.features[-1])(x)


class LinenCNN(nn.Module):
    """A LeNet-like ReLU convolutional classifier for 8x8 images (flax linen)."""

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


class LinenLeNet(nn.Module):
    """A LeNet-style ReLU CNN for 28x28 images, the size studied by Alain et al. (2019); linen.

    Two 5x5 convolutions (``SAME`` padding, ReLU, 2x2 average pooling) and two dense layers.
    The defaults (32 and 64 channels, a 1024-wide hidden layer, 10 classes) give 3,274,634
    parameters on 28x28x1 inputs, 98% of them in the first dense layer (3136 x 1024).
    Average pooling as in :class:`LinenCNN`, so the Hessian has no max-selection kinks.
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


class MLP(nnx.Module):
    """A fully connected classifier on flattened inputs (flax nnx).

    Args:
        in_features: the flattened input size (64 for 8x8 digits).
        features: the widths of the layers, the last one the number of classes.
        activation: the hidden layers' nonlinearity.
        dtype: the parameters' dtype.
        rngs: initialisation keys.
    """

    def __init__(
        self,
        in_features: int,
        features: Sequence[int] = (32, 10),
        *,
        activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        widths = (in_features, *features)
        self.layers = _ModuleList(
            [
                nnx.Linear(a, b, param_dtype=dtype, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:  # noqa: D102
        x = x.reshape((x.shape[0], -1))
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class _ConvNet(nnx.Module):
    """ReLU convolutions (``SAME`` padding, 2x2 average pooling), then two dense layers."""

    def __init__(
        self,
        size: int,
        channels: Sequence[int],
        hidden: int,
        num_classes: int,
        kernel: int,
        *,
        in_channels: int = 1,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        chans = (in_channels, *channels)
        self.convs = _ModuleList(
            [
                nnx.Conv(a, b, (kernel, kernel), param_dtype=dtype, rngs=rngs)
                for a, b in zip(chans[:-1], chans[1:], strict=True)
            ]
        )
        for _ in channels:
            size //= 2
        self.hidden = nnx.Linear(size * size * chans[-1], hidden, param_dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # noqa: D102
        for conv in self.convs:
            x = nnx.avg_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return self.out(nnx.relu(self.hidden(x)))


class CNN(_ConvNet):
    """A LeNet-like ReLU convolutional classifier for 8x8 images (flax nnx; Alain et al. 2019).

    Two 3x3 convolutions (8 and 16 channels) with 2x2 average pooling, a 32-wide dense layer and
    10 classes: 3,658 parameters on 8x8x1 digits, as :class:`LinenCNN`.
    """

    def __init__(
        self,
        size: int = 8,
        channels: Sequence[int] = (8, 16),
        hidden: int = 32,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            size, channels, hidden, num_classes, 3, in_channels=in_channels, dtype=dtype, rngs=rngs
        )


class LeNet(_ConvNet):
    """A LeNet-style ReLU CNN for 28x28 images, the size studied by Alain et al. (2019); nnx.

    Two 5x5 convolutions (32 and 64 channels) and a 1024-wide hidden layer: 3,274,634
    parameters on 28x28x1 inputs, as :class:`LinenLeNet`.
    """

    def __init__(
        self,
        size: int = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 1024,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            size, channels, hidden, num_classes, 5, in_channels=in_channels, dtype=dtype, rngs=rngs
        )


@dataclasses.dataclass(frozen=True)
class NnxModel:
    """An nnx model without its parameters, which hesskit differentiates separately.

    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` keeps ``graphdef`` and
    ``rest`` here and hands ``params`` to hesskit.

    ``apply(params, x)`` merges them back and calls the model, the same call as a linen module's
    ``module.apply(params, x)``, so :func:`make_loss` serves both.

    Args:
        graphdef: the model's structure (``nnx.split``'s first output).
        rest: every variable that is not an ``nnx.Param`` (empty for the models here).
    """

    graphdef: Any
    rest: Any

    @classmethod
    def split(cls, model: nnx.Module) -> tuple[NnxModel, PyTree]:
        """``(NnxModel, params)`` from a live nnx module."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, rest), params

    def merge(self, params: PyTree) -> nnx.Module:
        """The nnx module with these parameters."""
        return nnx.merge(self.graphdef, params, self.rest)

    def apply(self, params: PyTree, x: jax.Array) -> jax.Array:
        """The model's output on ``x`` with parameters ``params``."""
        return self.merge(params)(x)


def make_classifier(
    name: str, *, key: jax.Array, sample: jax.Array, dtype: Any = jnp.float32, api: str = "nnx"
) -> tuple[NnxModel | nn.Module, PyTree]:
    """Build a named model and its initial parameters.

    Args:
        name: ``"mlp"`` (64-32-10 tanh), ``"mlp-large"`` (64-256-256-10 tanh, about 85k
            parameters), ``"cnn"`` (two ReLU conv layers, LeNet-like), ``"linear"``, or
            ``"lenet"`` (:class:`LeNet`, 3,274,634 parameters on 28x28 inputs: pass
            ``sample`` from ``load_digits(size=28)``).
        key: initialisation key.
        sample: a batch of inputs used to infer shapes.
        dtype: parameter dtype.
        api: ``"nnx"`` (default): the model is an :class:`NnxModel` and ``params`` the
            ``nnx.State`` of its ``nnx.Param`` variables; ``"linen"``: a linen module and its
            variables dict (``{"params": ...}``).

    Returns:
        ``(model, params)``; ``model.apply(params, x)`` gives the logits in both APIs.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.ones((1, 8, 8, 1))
        >>> model, params = make_classifier("mlp", key=jax.random.key(0), sample=x)
        >>> model.apply(params, jnp.ones((2, 8, 8, 1))).shape
        (2, 10)
    """
    widths = {"mlp": (32, 10), "mlp-large": (256, 256, 10), "linear": (10,)}
    names = sorted([*widths, "cnn", "lenet"])
    if name not in names:
        msg = f"unknown model {name!r}; choose one of {names}."
        raise ValueError(msg)
    if api == "linen":
        linen: dict[str, nn.Module] = {k: LinenMLP(w) for k, w in widths.items()}
        module = {**linen, "cnn": LinenCNN(), "lenet": LinenLeNet()}[name]
        params = module.init(key, sample.astype(dtype))
        return module, jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    if api != "nnx":
        msg = f"api must be 'nnx' or 'linen', got {api!r}."
        raise ValueError(msg)
    rngs = nnx.Rngs(params=key)
    if name in widths:
        model = MLP(int(np.prod(sample.shape[1:])), widths[name], dtype=dtype, rngs=rngs)
    else:
        cls = CNN if name == "cnn" else LeNet
        model = cls(sample.shape[1], in_channels=sample.shape[-1], dtype=dtype, rngs=rngs)
    return NnxModel.split(model)


def make_loss(module: NnxModel | nn.Module) -> Callable[[PyTree, Dataset], jax.Array]:
    """Mean softmax cross-entropy ``loss(params, batch)`` of a model on a :class:`Dataset`.

    ``module`` is anything with ``apply(params, x)``: an :class:`NnxModel` or a linen module.
    """

    def loss(params: PyTree, batch: Dataset) -> jax.Array:
        logits = module.apply(params, batch.x.astype(jax.tree_util.tree_leaves(params)[0].dtype))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

    return loss
