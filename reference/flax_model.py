"""ConvNeXt V2 in Flax NNX (NHWC). Its NNX state paths map to canonical names through the one table
``convnextv2.reference.flax_layout.NNX_KEYS``, whose rules name each Flax<->canonical layout change.

Numerics follow the original definition (facebookresearch/ConvNeXt-V2), avoiding Flax/JAX defaults that differ:
- GELU is the exact erf form (``jax.nn.gelu`` defaults to the tanh approximation);
- every LayerNorm uses eps 1e-6 and the two-pass variance (``use_fast_variance=False``; Flax's default
  E[x²]-E[x]² loses digits in float32); the final norm's eps comes from ``config.head_norm_eps``;
- GRN's norm is a vector L2 norm over H and W per image and channel (``jnp.linalg.norm`` with ``ord=2``
  over two axes would be the spectral norm), eps only in the denominator;
- convolutions and dense layers run at ``Precision.HIGHEST`` so accelerators do not drop to TF32/bf16.

float64 needs JAX's x64 mode. Switching it on globally changes the default dtypes of every other JAX
user in the process, so a float64 model is built and run inside ``jax.enable_x64(True)`` (a thread-local
context) by ``build_flax``/``run_features``; calling a float64 model directly outside that context raises
instead of silently computing in float32. float32 models do not depend on the x64 setting.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convnextv2.reference import schema
from convnextv2.reference.features import BACKBONE_FEATURES
from convnextv2.reference.flax_layout import canonical_to_nnx, nnx_to_canonical
from convnextv2.reference.variants import GRN_EPS, IN_CHANNELS, LAYER_NORM_EPS, MLP_RATIO, NUM_STAGES, ModelConfig

FEATURE_NAMES = BACKBONE_FEATURES
HIGHEST = jax.lax.Precision.HIGHEST
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _layer_norm(width: int, dtype: Any, eps: float = LAYER_NORM_EPS) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype,
                         rngs=nnx.Rngs(0))


class GRN(nnx.Module):
    """Global Response Normalization on NHWC input; gamma/beta flat (4C,)."""

    def __init__(self, channels: int, dtype: Any, eps: float = GRN_EPS):
        self.gamma = nnx.Param(jnp.zeros((channels,), dtype))
        self.beta = nnx.Param(jnp.zeros((channels,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        gx = jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True))
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + self.eps)
        return self.gamma[...] * (x * nx) + self.beta[...] + x


class DepthwiseConv(nnx.Conv):
    """The blocks' 7x7 depthwise convolution as 49 shifted multiply-adds that XLA fuses into one loop.

    XLA's CPU convolution with ``feature_group_count == channels`` runs 25-30x slower than this (measured:
    tiny's first stage, 56x56x96, batch 1: 18.6 ms vs 0.6 ms), which made it most of the Flax reference's
    time. Each kernel row is summed first and the seven row sums added after: against a float64 referee that
    order measured 2.5-3x less error than both a 49-term running sum (what PyTorch's CPU kernel gives, bit
    for bit) and XLA's convolution. Parameters and NNX paths stay those of ``nnx.Conv`` (kernel (7, 7, 1, C)).
    """

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        kernel = self.kernel[...]
        bias = self.bias[...]  # type: ignore[index]  # the blocks' dwconv has a bias

        def one_image(image: jax.Array) -> jax.Array:
            size_h, size_w = kernel.shape[:2]
            height, width = image.shape[0], image.shape[1]
            padded = jnp.pad(image, ((size_h // 2, size_h // 2), (size_w // 2, size_w // 2), (0, 0)))

            def row_sum(row: int) -> jax.Array:
                rows = padded[row:row + height]
                total = rows[:, 0:width] * kernel[row, 0, 0]
                for col in range(1, size_w):
                    total = total + rows[:, col:col + width] * kernel[row, col, 0]
                return total

            total = row_sum(0)
            for row in range(1, size_h):
                total = total + row_sum(row)
            return total + bias

        # One image per loop step: over a whole batch XLA splits the 49 terms into separate fusions that each
        # materialise a full-size broadcast of the kernel (batch 8 of tiny: 300 ms of 800 in such fusions).
        return jax.lax.map(one_image, x)


class Block(nnx.Module):
    def __init__(self, width: int, dtype: Any, rngs: nnx.Rngs):
        hidden = MLP_RATIO * width
        self.dwconv = DepthwiseConv(width, width, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=width,
                                    dtype=dtype, param_dtype=dtype, precision=HIGHEST, rngs=rngs)
        self.norm = _layer_norm(width, dtype)
        self.pwconv1 = nnx.Linear(width, hidden, dtype=dtype, param_dtype=dtype, precision=HIGHEST, rngs=rngs)
        self.grn = GRN(hidden, dtype)
        self.pwconv2 = nnx.Linear(hidden, width, dtype=dtype, param_dtype=dtype, precision=HIGHEST, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.pwconv1(self.norm(self.dwconv(x)))
        y = jax.nn.gelu(y, approximate=False)
        return x + self.pwconv2(self.grn(y))


class Stem(nnx.Module):
    def __init__(self, width: int, dtype: Any, rngs: nnx.Rngs):
        self.conv = nnx.Conv(IN_CHANNELS, width, (4, 4), strides=4, padding="VALID", dtype=dtype,
                             param_dtype=dtype, precision=HIGHEST, rngs=rngs)
        self.norm = _layer_norm(width, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class Downsample(nnx.Module):
    def __init__(self, in_width: int, out_width: int, dtype: Any, rngs: nnx.Rngs):
        self.norm = _layer_norm(in_width, dtype)
        self.conv = nnx.Conv(in_width, out_width, (2, 2), strides=2, padding="VALID", dtype=dtype,
                             param_dtype=dtype, precision=HIGHEST, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.norm(x))


class Stage(nnx.Module):
    def __init__(self, in_width: int, width: int, depth: int, downsample: bool, dtype: Any, rngs: nnx.Rngs):
        self.downsample = Downsample(in_width, width, dtype, rngs) if downsample else None
        self.blocks = nnx.List([Block(width, dtype, rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class BlockedLinear(nnx.Linear):
    """A dense layer whose dot product is summed in blocks, still in the layer's dtype.

    With a plain XLA CPU dot, the classifier's C3-term dot products left the float32 logits of pico, tiny,
    base and large with 1.5-1.75x the error of PyTorch's float32 GEMM against the float64 referee (every
    stage was at or below PyTorch's). Summing 16 partial dots cuts that rounding error about 2-3x; the
    parameters and their NNX paths are those of ``nnx.Linear``.
    """

    blocks = 16

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        kernel = self.kernel[...]
        width = kernel.shape[0]
        blocks = next(b for b in (self.blocks, 8, 4, 2, 1) if width % b == 0)
        partial = jnp.einsum("...nk,nko->...no", x.reshape(*x.shape[:-1], blocks, width // blocks),
                             kernel.reshape(blocks, width // blocks, -1), precision=self.precision)
        return jnp.sum(partial, axis=-2) + self.bias[...]  # type: ignore[index]  # nnx.Linear: use_bias=True here


class Head(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        width = config.dims[-1]
        self.norm = _layer_norm(width, dtype, config.head_norm_eps) if config.head_norm else None
        self.fc = (BlockedLinear(width, config.num_classes, dtype=dtype, param_dtype=dtype, precision=HIGHEST,
                              rngs=rngs) if config.num_classes > 0 else None)


class ConvNeXtV2(nnx.Module):
    """Takes NHWC images; ``__call__`` gives logits (pooled features when headless)."""

    def __init__(self, config: ModelConfig, dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype_name = jnp.dtype(dtype).name
        dims = config.dims
        self.stem = Stem(dims[0], dtype, rngs)
        self.stages = nnx.List([
            Stage(dims[max(i - 1, 0)], dims[i], config.depths[i], i > 0, dtype, rngs) for i in range(NUM_STAGES)
        ])
        self.head = Head(config, dtype, rngs)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[3] != IN_CHANNELS:
            raise ValueError(f"expected NHWC input with {IN_CHANNELS} channels, got shape {tuple(x.shape)}")
        if x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"input height and width must be divisible by 32, got {tuple(x.shape[1:3])}")
        if self.dtype_name == "float64" and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]
            raise RuntimeError("a float64 Flax model must run under `with jax.enable_x64(True):` "
                               "(or through run_features), or JAX computes in float32")

    def pool(self, x: jax.Array) -> jax.Array:
        pooled = jnp.mean(x, axis=(1, 2))
        return self.head.norm(pooled) if self.head.norm is not None else pooled

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """stem, stage1..stage4 (NHWC), pooled, and logits when there is a head."""
        self._check_input(x)
        out: dict[str, jax.Array] = {}
        x = self.stem(x.astype(self.dtype_name))
        out["stem"] = x
        for index, stage in enumerate(self.stages):
            x = stage(x)
            out[f"stage{index + 1}"] = x
        out["pooled"] = self.pool(x)
        if self.head.fc is not None:
            out["logits"] = self.head.fc(out["pooled"])
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.features(x)
        return out.get("logits", out["pooled"])


@contextlib.contextmanager
def precision_scope(dtype_name: str) -> Iterator[None]:
    """x64 on for float64 work only, and only in this thread for the duration (see module docstring)."""
    if dtype_name == "float64":
        with jax.enable_x64(True):
            yield
    else:
        yield


def nnx_state_paths(model: ConvNeXtV2) -> dict[str, jax.Array]:
    """{dot-joined NNX path: parameter array} — the keys a Flax file holds."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(p) for p in path): variable[...] for path, variable in flat}


def build_flax(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype: str = "float32") -> ConvNeXtV2:
    """The Flax model with canonical ``tensors`` (cast to ``dtype``); strict on names and shapes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_tensors = {k: v for k, v in tensors.items() if not k.startswith(schema.EXTRAS_PREFIX)}
    schema.validate({k: v.shape for k, v in model_tensors.items()}, config, "building the Flax model")
    flat = canonical_to_nnx(model_tensors)
    with precision_scope(dtype):
        # Shapes only: random initialisation of a large model would cost more than loading it.
        abstract = nnx.eval_shape(lambda: ConvNeXtV2(config, DTYPES[dtype]))
        graphdef, state = nnx.split(abstract)
        expected = {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}
        if expected != set(flat):
            raise AssertionError(f"Flax module paths and NNX_KEYS disagree: {sorted(expected ^ set(flat))[:10]}")
        for path, variable in nnx.to_flat_state(state):
            variable.set_value(jnp.asarray(np.asarray(flat[".".join(str(p) for p in path)], dtype=dtype)))
        return nnx.merge(graphdef, state)


def export_canonical(model: ConvNeXtV2) -> dict[str, np.ndarray]:
    flat = {key: np.array(value) for key, value in nnx_state_paths(model).items()}
    tensors, _ = nnx_to_canonical(flat, "Flax model", model.config)
    return {name: np.ascontiguousarray(array) for name, array in tensors.items()}


# One compiled forward per live model; JAX caches the executable per input shape and dtype inside it.
_COMPILED: weakref.WeakKeyDictionary[ConvNeXtV2, Callable[..., Any]] = weakref.WeakKeyDictionary()


def _compiled_forward(model: ConvNeXtV2) -> Callable[..., Any]:
    forward = _COMPILED.get(model)
    if forward is None:
        graphdef = nnx.graphdef(model)

        def run(state: nnx.State, images_nchw: jax.Array) -> dict[str, jax.Array]:
            out = nnx.merge(graphdef, state).features(jnp.transpose(images_nchw, (0, 2, 3, 1)))
            # The harness compares NCHW maps on every framework.
            return {k: jnp.transpose(v, (0, 3, 1, 2)) if v.ndim == 4 else v for k, v in out.items()}

        forward = jax.jit(run)
        _COMPILED[model] = forward
    return forward


def run_features(model: ConvNeXtV2, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
    """numpy NCHW in, numpy features out (stem/stage1..stage4 NCHW, pooled, logits), in the model's dtype."""
    forward = _compiled_forward(model)
    with precision_scope(model.dtype_name):
        # The state is taken afresh each call so weights changed after the first run are honoured.
        images = jnp.asarray(np.asarray(images_nchw, dtype=model.dtype_name))
        out = forward(nnx.state(model), images)
        return {name: np.array(value) for name, value in out.items()}
