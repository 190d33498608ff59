"""Small models and the bundled digits data, for demos, benchmarks, notebooks and tests.

Two families: image classifiers on the digits data, and a decoder-only byte-level language
model (:class:`Transformer`, :class:`TransformerConfig`, from a few 10k parameters to the size
of GPT-2 small) on a corpus every machine has, the Python standard library's own source
(:func:`load_stdlib_corpus`).

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
import math
import os
import pathlib
import sysconfig
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
    "Transformer",
    "TransformerConfig",
    "load_digits",
    "load_stdlib_corpus",
    "make_classifier",
    "make_lm_loss",
    "make_loss",
    "make_transformer",
    "resize_images",
    "sample_windows",
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


# -- A byte-level language model -------------------------------------------------------------

# Directories under the stdlib path that are not the standard library: installed packages
# (a Docker image's site-packages sits inside it) and bytecode caches.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


def load_stdlib_corpus(max_bytes: int | None = 1 << 22) -> np.ndarray:
    """The Python standard library's own source files as one array of byte tokens.

    Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (installed packages in
    ``site-packages`` or ``dist-packages`` excluded), sorted by path relative to that folder,
    read as bytes and concatenated. Each byte is one token in ``[0, 256)``, so no tokenizer and
    no download is needed; the order, and therefore the array, depends only on the Python
    installation (the same on every machine with the same Python version).

    Args:
        max_bytes: stop after this many bytes (the last file is cut); ``None`` reads everything
            (tens of MB).

    Returns:
        A ``uint8`` NumPy array of shape ``(n,)`` with ``0 < n <= max_bytes``.

    Raises:
        ValueError: ``max_bytes`` is not a positive int.
        FileNotFoundError: no source file could be read (a Python shipped without its ``.py``
            sources).

    Examples:
        >>> tokens = load_stdlib_corpus(1000)
        >>> tokens.dtype, tokens.shape
        (dtype('uint8'), (1000,))
    """
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int | np.integer) or max_bytes < 1
    ):
        msg = f"max_bytes must be a positive int or None, got {max_bytes!r}."
        raise ValueError(msg)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _NOT_STDLIB]
        files += [pathlib.Path(folder, name) for name in names if name.endswith(".py")]
    # os.walk's order is the file system's; sorting makes the corpus a function of the files.
    files.sort(key=lambda f: f.relative_to(root).as_posix())
    chunks, total = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:  # an unreadable file (permissions, a dangling link) is skipped
            continue
        if max_bytes is not None:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if total == 0:
        msg = f"no readable *.py files under {root}."
        raise FileNotFoundError(msg)
    return np.frombuffer(b"".join(chunks), np.uint8).copy()


def sample_windows(tokens: jax.typing.ArrayLike, key: jax.Array, batch: int, context: int):
    r"""``batch`` random windows of ``context + 1`` consecutive tokens, as ``int32``.

    Window ``b`` is ``tokens[s_b : s_b + context + 1]`` with ``s_b`` uniform on
    ``[0, n - context - 1]``; :func:`make_lm_loss` predicts ``w[:, 1:]`` from ``w[:, :-1]``.

    Args:
        tokens: a 1-d array of token ids (:func:`load_stdlib_corpus`), longer than
            ``context + 1``. Pass a ``jax.Array`` to keep it on the device between calls.
        key: the ``jax.random`` key choosing the starts.
        batch: number of windows.
        context: tokens the model sees per window.

    Returns:
        An ``int32`` array of shape ``(batch, context + 1)``.

    Examples:
        >>> import jax, numpy as np
        >>> sample_windows(np.arange(100), jax.random.key(0), 2, 7).shape
        (2, 8)
    """
    tokens = jnp.asarray(tokens)
    n = tokens.shape[0]
    if tokens.ndim != 1 or n < context + 1:
        msg = f"tokens must be 1-d with more than context = {context} entries, got {tokens.shape}."
        raise ValueError(msg)
    starts = jax.random.randint(key, (batch, 1), 0, n - context)
    return tokens[starts + jnp.arange(context + 1)].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    r"""The shape and precision of a :class:`Transformer` (GPT-2's architecture).

    The parameter count (:meth:`num_params`) with vocabulary :math:`V`, context :math:`C`,
    width :math:`d`, MLP ratio :math:`m` and :math:`L` layers, embeddings tied, is

    .. math::

        V d + C d + L \left( (4 + 2m) d^2 + (9 + m) d \right) + 2 d

    (token and position embeddings; per layer two LayerNorms, the fused query-key-value and
    output projections and the MLP, all with biases; the final LayerNorm); untied embeddings
    add an output matrix of :math:`V d`.

    Args:
        vocab_size: number of token ids; 256 for bytes.
        context: the longest sequence the model accepts (the position table's size).
        width: the residual stream's width :math:`d`.
        heads: attention heads; must divide ``width``.
        layers: transformer blocks.
        mlp_ratio: the MLP's hidden width over ``width``.
        dtype: the activations' (computation) dtype; ``jnp.bfloat16`` for mixed precision.
        param_dtype: the parameters' dtype, which is also the dtype of the Hessian's products.
        tied_embeddings: the output layer is the token embedding's transpose (GPT-2), or a
            separate bias-free matrix.
        attention: ``implementation`` of :func:`jax.nn.dot_product_attention`. The default
            ``"xla"`` is plain ``jnp`` and differentiable to any order; ``"cudnn"`` (GPU, 16-bit
            dtypes) wraps fused kernels in a ``custom_vjp`` that forward-over-reverse cannot
            differentiate; ``None`` lets JAX choose. Either way the attention softmax runs in
            float32 (JAX's choice), also for float64 models.

    Examples:
        >>> TransformerConfig.gpt2_small().num_params()
        86039040
        >>> TransformerConfig.gpt2_small(vocab_size=50257).num_params()
        124439808
    """

    vocab_size: int = 256
    context: int = 64
    width: int = 32
    heads: int = 2
    layers: int = 2
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    tied_embeddings: bool = True
    attention: str | None = "xla"

    def __post_init__(self):
        for name in ("vocab_size", "context", "width", "heads", "layers", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                msg = f"{name} must be a positive int, got {value!r}."
                raise ValueError(msg)
        if self.width % self.heads:
            msg = f"heads = {self.heads} must divide width = {self.width}."
            raise ValueError(msg)
        if self.attention not in (None, "xla", "cudnn"):
            msg = f"attention must be None, 'xla' or 'cudnn', got {self.attention!r}."
            raise ValueError(msg)

    @classmethod
    def tiny(cls, **overrides: Any) -> TransformerConfig:
        """Two layers of width 32, two heads, context 64: 35,712 parameters, CPU-friendly."""
        return cls(**{"context": 64, "width": 32, "heads": 2, "layers": 2, **overrides})

    @classmethod
    def gpt2_small(cls, vocab_size: int = 256, **overrides: Any) -> TransformerConfig:
        """GPT-2 small: 12 layers, 12 heads, width 768, context 1024, tied embeddings.

        With the 256 byte tokens this is 86,039,040 parameters; with GPT-2's own vocabulary
        (``vocab_size=50257``) it is GPT-2's 124,439,808.
        """
        shape = {"context": 1024, "width": 768, "heads": 12, "layers": 12, "mlp_ratio": 4}
        return cls(vocab_size=vocab_size, **{**shape, **overrides})

    def bf16(self, params: bool = True) -> TransformerConfig:
        """This configuration in bfloat16: activations, and parameters unless ``params=False``."""
        pdt = jnp.bfloat16 if params else self.param_dtype
        return dataclasses.replace(self, dtype=jnp.bfloat16, param_dtype=pdt)

    def num_params(self) -> int:
        """The exact parameter count (the formula above)."""
        d, m, ln = self.width, self.mlp_ratio, 2 * self.width
        block = 2 * ln + (3 * d * d + 3 * d) + (d * d + d) + (d * m * d + m * d) + (m * d * d + d)
        out = 0 if self.tied_embeddings else self.vocab_size * d
        return (self.vocab_size + self.context) * d + self.layers * block + ln + out


class _Block(nnx.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, hidden = config.width, config.mlp_ratio * config.width
        precision = {"dtype": config.dtype, "param_dtype": config.param_dtype}
        init = nnx.initializers.normal(0.02)
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 L), so the stream's
        # variance at initialization does not grow with depth.
        residual_init = nnx.initializers.normal(0.02 / math.sqrt(2 * config.layers))
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, **precision, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, kernel_init=init, **precision, rngs=rngs)
        self.proj = nnx.Linear(d, d, kernel_init=residual_init, **precision, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, **precision, rngs=rngs)
        self.fc = nnx.Linear(d, hidden, kernel_init=init, **precision, rngs=rngs)
        self.out = nnx.Linear(hidden, d, kernel_init=residual_init, **precision, rngs=rngs)
        self.heads = config.heads
        self.attention = config.attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        shape = (b, t, self.heads, d // self.heads)
        y = jax.nn.dot_product_attention(
            q.reshape(shape),
            k.reshape(shape),
            v.reshape(shape),
            is_causal=True,
            implementation=self.attention,
        )
        x = x + self.proj(y.reshape(b, t, d))
        # GPT-2's tanh approximation of GELU.
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x)), approximate=True))


class Transformer(nnx.Module):
    """A decoder-only (causal) language model with GPT-2's architecture (flax nnx).

    Learned token and position embeddings, ``config.layers`` pre-LayerNorm blocks (causal
    multi-head attention by :func:`jax.nn.dot_product_attention`, a GELU MLP), a final
    LayerNorm and the output layer: the token embedding's transpose when
    ``config.tied_embeddings`` (the default, as GPT-2), else a separate matrix. No dropout, so
    the model is a pure function of its parameters and the tokens.

    Args:
        config: the :class:`TransformerConfig`.
        rngs: initialisation keys.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        precision = {"dtype": config.dtype, "param_dtype": config.param_dtype}
        init = nnx.initializers.normal(0.02)
        d = config.width
        self.config = config
        self.wte = nnx.Embed(config.vocab_size, d, embedding_init=init, **precision, rngs=rngs)
        self.wpe = nnx.Embed(config.context, d, embedding_init=init, **precision, rngs=rngs)
        self.blocks = _ModuleList([_Block(config, rngs=rngs) for _ in range(config.layers)])
        self.ln_f = nnx.LayerNorm(d, epsilon=1e-5, **precision, rngs=rngs)
        # One assignment: nnx fixes an attribute's kind (static or data) when it is first set.
        head = None
        if not config.tied_embeddings:
            head = nnx.Linear(
                d, config.vocab_size, use_bias=False, kernel_init=init, **precision, rngs=rngs
            )
        self.head = head

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(batch, time, vocab_size)`` of integer ``tokens`` ``(batch, time)``."""
        t = tokens.shape[-1]
        if t > self.config.context:
            msg = f"sequence length {t} exceeds the context {self.config.context}."
            raise ValueError(msg)
        x = self.wte(tokens) + self.wpe(jnp.arange(t))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.wte.attend(x) if self.head is None else self.head(x)


def make_transformer(
    config: TransformerConfig, *, key: jax.Array | None = None, abstract: bool = False
) -> tuple[NnxModel, PyTree]:
    """A :class:`Transformer` split the hesskit way: ``(model, params)``.

    Args:
        config: the :class:`TransformerConfig`.
        key: initialisation key; required unless ``abstract``.
        abstract: build with :func:`flax.nnx.eval_shape`: ``params`` are
            :class:`jax.ShapeDtypeStruct` leaves and nothing is allocated (to count the
            parameters of GPT-2 small, or to lower and compile its HVP, without its memory).

    Returns:
        ``(model, params)`` as :func:`make_classifier` returns them: ``model`` an
        :class:`NnxModel` whose ``apply(params, tokens)`` gives the logits, ``params`` the
        ``nnx.State`` of the ``nnx.Param`` variables.

    Examples:
        >>> import jax
        >>> import hesskit as hk
        >>> model, params = make_transformer(TransformerConfig.tiny(), key=jax.random.key(0))
        >>> hk.tree_dim(params)
        35712
    """
    if abstract:
        module = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    else:
        if key is None:
            msg = "make_transformer needs an explicit key (or abstract=True)."
            raise ValueError(msg)
        module = Transformer(config, rngs=nnx.Rngs(params=key))
    return NnxModel.split(module)


def make_lm_loss(model: NnxModel) -> Callable[[PyTree, jax.Array], jax.Array]:
    r"""Mean next-token cross-entropy ``loss(params, batch)`` of a language model.

    For a batch of windows :math:`w` of shape ``(B, T + 1)`` (:func:`sample_windows`),

    .. math::

        \ell(\theta) = -\frac{1}{B T} \sum_{b, t} \log \operatorname{softmax}
        \big(f_\theta(w_{b, <t+1})_t\big)_{w_{b, t+1}}

    in nats per token (divide by :math:`\ln 2` for bits per byte). The logits are cast to at
    least float32 before the softmax, so bfloat16 models still get a float32 loss. The batch is
    an argument, so ``hk.hessian_operator(loss, params, batch)`` keeps it as an operator leaf
    and a new batch of the same shape reuses every compiled solver.

    Args:
        model: an :class:`NnxModel` from :func:`make_transformer`.

    Returns:
        The loss function.

    Examples:
        >>> import jax
        >>> model, params = make_transformer(TransformerConfig.tiny(), key=jax.random.key(0))
        >>> batch = sample_windows(load_stdlib_corpus(10_000), jax.random.key(1), 2, 16)
        >>> float(make_lm_loss(model)(params, batch)) > 0
        True
    """

    def loss(params: PyTree, batch: jax.Array) -> jax.Array:
        logits = model.apply(params, batch[:, :-1])
        # Up to float32 at least (bfloat16 log-softmax loses digits), never down from float64.
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    return loss
