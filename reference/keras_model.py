"""ConvNeXt V2 in Keras 3 on the TensorFlow backend, NHWC inside.

Every parameterised layer is named after its canonical prefix (``stages.1.blocks.0.pwconv1``), so a
Keras weight path ``<layer name>/<variable name>`` maps to a canonical name through ``KERAS_KEYS``, whose
rules name each layout change between the canonical (PyTorch) layouts and Keras' (``reference.layouts``);
the table is in reference/keras_layout.py, which the file reader uses without TensorFlow.
Numerics follow the original definition and avoid other frameworks' differing defaults: GELU is written out as 0.5·x·(1+erf(x/√2)) (Keras' own exact GELU lowers to Erfc, which tf2onnx cannot convert),
LayerNorm is our own two-pass, biased-variance layer with eps 1e-6 (Keras' default eps is 1e-3), and GRN
is a vector L2 norm over H and W (``tf.norm(ord=2)`` over two axes would be the spectral norm).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import math
import os
import sys
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.features import BACKBONE_FEATURES, SPATIAL_FEATURES
from convnextv2.reference.keras_layout import KERAS_KEYS, PACKAGE, keras_paths
from convnextv2.reference.variants import GRN_EPS, LAYER_NORM_EPS, MLP_RATIO, NUM_STAGES, ModelConfig


class _RefuseJax(importlib.abc.MetaPathFinder):
    """TensorFlow's TFLite helpers run ``from jax import jit`` at import time (and cope with ImportError);
    refusing that one import keeps a TensorFlow-only process free of JAX's import time and memory."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "jax" or fullname.startswith("jax."):
            raise ImportError(f"{fullname} is not imported while TensorFlow loads for the Keras reference")
        return None


@contextlib.contextmanager
def _without_jax() -> Iterator[None]:
    if "jax" in sys.modules or "tensorflow" in sys.modules:
        yield  # already imported by the user: nothing to keep out
        return
    finder = _RefuseJax()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


os.environ.setdefault("KERAS_BACKEND", "tensorflow")
with _without_jax():
    import keras
    import tensorflow as tf
from keras import ops  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"the Keras reference needs the TensorFlow backend, but KERAS_BACKEND is {keras.backend.backend()!r}")

FEATURE_NAMES = BACKBONE_FEATURES
INPUT_NAME = "pixel_values"

# ------------------------------------------------------------ layers

@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(keras.layers.Layer):
    """LayerNorm over the last axis, two-pass biased variance (as torch's layer_norm)."""

    def __init__(self, epsilon: float = LAYER_NORM_EPS, **kwargs: Any):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape: Any) -> None:
        width = int(input_shape[-1])
        self.weight = self.add_weight(shape=(width,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(width,), initializer="zeros", name="bias")

    def call(self, x: Any) -> Any:
        mean = ops.mean(x, axis=-1, keepdims=True)
        centered = x - mean
        variance = ops.mean(ops.square(centered), axis=-1, keepdims=True)
        return centered * ops.rsqrt(variance + self.epsilon) * self.weight + self.bias

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=PACKAGE)
class GRN(keras.layers.Layer):
    """Global Response Normalization on NHWC input: per image and channel L2 norm over H and W."""

    def __init__(self, epsilon: float = GRN_EPS, **kwargs: Any):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape: Any) -> None:
        width = int(input_shape[-1])
        self.gamma = self.add_weight(shape=(width,), initializer="zeros", name="gamma")
        self.beta = self.add_weight(shape=(width,), initializer="zeros", name="beta")

    def call(self, x: Any) -> Any:
        # A vector norm of the flattened H*W per (image, channel); eps only in the denominator.
        global_response = ops.sqrt(ops.sum(ops.square(x), axis=(1, 2), keepdims=True))
        normalised = global_response / (ops.mean(global_response, axis=-1, keepdims=True) + self.epsilon)
        return self.gamma * (x * normalised) + self.beta + x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ExactGELU(keras.layers.Layer):
    """GELU in its erf form, spelled out so tf2onnx can convert it (Keras' exact GELU lowers to Erfc)."""

    def call(self, x: Any) -> Any:
        return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


@keras.saving.register_keras_serializable(package=PACKAGE)
class GlobalMean(keras.layers.Layer):
    """Mean over H and W of an NHWC map (the head's pooling)."""

    def call(self, x: Any) -> Any:
        return ops.mean(x, axis=(1, 2))


# Length of the float32 partial dot products HeadDense sums (see there).
HEAD_CHUNK = 16


@keras.saving.register_keras_serializable(package=PACKAGE)
class HeadDense(keras.layers.Dense):
    """The classifier: a Dense whose C3-long dot products are summed as HEAD_CHUNK-long float32 partial
    products, then one float32 sum of the partials.

    A plain float32 GEMM through TensorFlow sums each dot product in one long chain; measured with the parity
    rule's inputs (fixture weights, seeds 0..2, batch 8, 224 px, atto..tiny), its logits error is 0.8x to 2.1x
    the PyTorch float32 error. Chunks of 16 bring it to the level float64 accumulation reached (0.2x to 1.1x
    against float64's 0.2x to 1.0x) with float32 operations only: a float64 op in the graph would follow it
    into every export, and TFLite has no float64 MatMul (the LiteRT converter refuses such a graph:
    ``'tf.MatMul' op is neither a custom op nor a flex op``). The padding to a multiple of HEAD_CHUNK adds
    exact zeros. Weights and the ``.keras`` layout are those of a plain Dense; float64 models use it as is.
    """

    def call(self, inputs: Any) -> Any:
        if self.compute_dtype != "float32":
            return super().call(inputs)
        width, classes = int(self.kernel.shape[0]), int(self.kernel.shape[1])
        pad = -width % HEAD_CHUNK
        kernel = self.kernel
        if pad:
            inputs = ops.pad(inputs, ((0, 0), (0, pad)))
            kernel = ops.pad(kernel, ((0, pad), (0, 0)))
        chunks = (width + pad) // HEAD_CHUNK
        # (B, n, 1, c) x (n, c, K) -> (B, n, 1, K): one short dot product per chunk, then the sum over chunks.
        partial = ops.matmul(ops.reshape(inputs, (-1, chunks, 1, HEAD_CHUNK)),
                             ops.reshape(kernel, (chunks, HEAD_CHUNK, classes)))
        return ops.sum(ops.reshape(partial, (-1, chunks, classes)), axis=1) + self.bias


# ------------------------------------------------------------ model

def _block(x: Any, prefix: str, width: int, dtype: str) -> Any:
    y = keras.layers.DepthwiseConv2D(7, padding="same", name=f"{prefix}.dwconv", dtype=dtype)(x)
    y = LayerNorm(name=f"{prefix}.norm", dtype=dtype)(y)
    y = keras.layers.Dense(MLP_RATIO * width, name=f"{prefix}.pwconv1", dtype=dtype)(y)
    y = ExactGELU(name=f"{prefix}.gelu", dtype=dtype)(y)
    y = GRN(name=f"{prefix}.grn", dtype=dtype)(y)
    y = keras.layers.Dense(width, name=f"{prefix}.pwconv2", dtype=dtype)(y)
    return keras.layers.Add(name=f"{prefix}.residual", dtype=dtype)([x, y])


def _graph(config: ModelConfig, dtype: str, plain_head: bool = False) -> tuple[Any, dict[str, Any]]:
    """The functional graph: NHWC input and every feature the parity harness compares."""
    dims = config.dims
    inputs = keras.Input(shape=(None, None, 3), dtype=dtype, name=INPUT_NAME)
    features: dict[str, Any] = {}
    x = keras.layers.Conv2D(dims[0], 4, strides=4, name="stem.conv", dtype=dtype)(inputs)
    x = LayerNorm(name="stem.norm", dtype=dtype)(x)
    features["stem"] = x
    for stage in range(NUM_STAGES):
        if stage > 0:
            x = LayerNorm(name=f"stages.{stage}.downsample.norm", dtype=dtype)(x)
            x = keras.layers.Conv2D(dims[stage], 2, strides=2, name=f"stages.{stage}.downsample.conv",
                                    dtype=dtype)(x)
        for block in range(config.depths[stage]):
            x = _block(x, f"stages.{stage}.blocks.{block}", dims[stage], dtype)
        features[f"stage{stage + 1}"] = x
    pooled = GlobalMean(name="head.pool", dtype=dtype)(x)
    if config.head_norm:
        pooled = LayerNorm(epsilon=config.head_norm_eps, name="head.norm", dtype=dtype)(pooled)
    features["pooled"] = pooled
    if config.num_classes > 0:
        head = keras.layers.Dense if plain_head else HeadDense
        features["logits"] = head(config.num_classes, name="head.fc", dtype=dtype)(pooled)
    return inputs, features


# Per-model companions kept outside the Keras object so they are never tracked or saved with it:
# the multi-output feature model and its compiled forward.
_FEATURE_MODELS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_COMPILED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def make_model(config: ModelConfig, dtype: str = "float32", plain_head: bool = False) -> keras.Model:
    """An uninitialised model: NHWC ``pixel_values`` in, logits (or pooled features when headless) out.

    ``plain_head``: the classifier is a plain Dense (one MatMul) instead of HeadDense's chunked sum, for graphs
    other tools parse (an ONNX graph's classifier is expected to be one GEMM); same weights, same paths."""
    inputs, features = _graph(config, dtype, plain_head)
    output = features["logits"] if "logits" in features else features["pooled"]
    model = keras.Model(inputs, output, name=f"convnextv2_{config.variant}")
    _FEATURE_MODELS[model] = keras.Model(inputs, features, name=f"convnextv2_{config.variant}_features")
    return model


def _weights_by_path(model: keras.Model) -> dict[str, Any]:
    return {variable.path: variable for variable in model.weights}


def load_canonical(model: keras.Model, config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> keras.Model:
    """Copy canonical tensors into the model (cast to its dtype), strictly: every path, every shape."""
    variables = _weights_by_path(model)
    expected = keras_paths(config)
    if set(variables) != set(expected):
        raise AssertionError(f"Keras model paths differ from the table: {sorted(set(variables) ^ set(expected))[:6]}")
    for path, (name, layout) in expected.items():
        if name not in tensors:
            raise BadInputError(f"missing tensor {name}")
        variable = variables[path]
        value = layout.to_foreign(np.asarray(tensors[name]))
        if tuple(value.shape) != tuple(variable.shape):
            raise BadInputError(f"tensor {name}: expected Keras shape {list(variable.shape)}, found {list(value.shape)}")
        variable.assign(value.astype(variable.dtype, copy=False))
    return model


def export_canonical(model: keras.Model) -> dict[str, np.ndarray]:
    """Canonical name -> numpy array in canonical layout (the model's dtype), in forward order."""
    out: dict[str, np.ndarray] = {}
    for variable in model.weights:
        found = KERAS_KEYS.to_canonical(variable.path)
        if found is None:
            raise BadInputError(f"Keras weight {variable.path} has no canonical name")
        name, rule = found
        out[name] = np.ascontiguousarray(rule.transform.to_canonical(np.asarray(variable.numpy()), variable.path))
    config = schema.infer_config({k: v.shape for k, v in out.items()}, "Keras model")
    config = config.with_(head_norm=any(v.path.startswith("head.norm/") for v in model.weights))
    return {name: out[name] for name in schema.expected_shapes(config)}


def build_keras(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype: str = "float32",
                plain_head: bool = False) -> keras.Model:
    # float16/bfloat16 only serve to write files in the checkpoint's own dtype; parity runs use 32/64.
    if dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise BadInputError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype!r}")
    model = make_model(config, dtype, plain_head)
    return load_canonical(model, config, tensors)


# ------------------------------------------------------------ running

def feature_model(model: keras.Model) -> keras.Model:
    """The multi-output twin of a model (shares its layers and weights). Models loaded from a ``.keras``
    file get one too: the features are found by the layer names the graph was built with."""
    if model not in _FEATURE_MODELS:
        names = [layer.name for layer in model.layers]
        last_block: dict[int, str] = {}
        for name in names:
            parts = name.split(".")
            if len(parts) == 5 and parts[0] == "stages" and parts[4] == "residual":
                last_block[int(parts[1])] = name  # layers are in graph order: the last one wins
        if "stem.norm" not in names or sorted(last_block) != list(range(NUM_STAGES)):
            raise BadInputError(f"run_features needs a ConvNeXt V2 model built by this package, not {model.name!r}")
        outputs = {"stem": model.get_layer("stem.norm").output}
        outputs.update({f"stage{s + 1}": model.get_layer(last_block[s]).output for s in range(NUM_STAGES)})
        outputs["pooled"] = model.get_layer("head.norm" if "head.norm" in names else "head.pool").output
        if "head.fc" in names:
            outputs["logits"] = model.get_layer("head.fc").output
        _FEATURE_MODELS[model] = keras.Model(model.inputs, outputs, name=f"{model.name}_features")
    return _FEATURE_MODELS[model]


def compiled_features(model: keras.Model) -> Any:
    """The feature forward as one TensorFlow graph function, traced once per model (batch, H, W dynamic).

    A graph is several times faster than eager Keras. XLA (``jit_compile=True``) keeps parity too but is
    about 4x slower on CPU (atto, batch 4 at 224: 0.52 s against 0.12 s; its depthwise 7x7 convolution is
    slow), so it is off.
    """
    if model not in _COMPILED:
        features = feature_model(model)
        dtype = model.inputs[0].dtype
        spec = tf.TensorSpec((None, None, None, 3), dtype, name=INPUT_NAME)

        @tf.function(input_signature=[spec], jit_compile=JIT_COMPILE, reduce_retracing=True)
        def forward(images_nhwc: Any) -> Any:
            return features(images_nhwc, training=False)

        _COMPILED[model] = forward
    return _COMPILED[model]


JIT_COMPILE = False


def check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected NCHW input with 3 channels, got shape {tuple(images.shape)}")
    if images.shape[2] % 32 or images.shape[3] % 32:
        raise ValueError(f"input height and width must be divisible by 32, got {tuple(images.shape[2:])}")


def run_features(model: keras.Model, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
    """Numpy NCHW in; numpy stem/stage1..stage4 (NCHW), pooled (B, C3), logits (B, K) when headed, out."""
    images = np.asarray(images_nchw)
    check_images(images)
    dtype = np.dtype(model.inputs[0].dtype)
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=dtype)
    outputs = compiled_features(model)(nhwc)
    result = {}
    for name, value in outputs.items():
        array = value.numpy()
        result[name] = np.ascontiguousarray(array.transpose(0, 3, 1, 2)) if name in SPATIAL_FEATURES else array
    return {name: result[name] for name in (*FEATURE_NAMES, "logits") if name in result}
