"""ONNX export of the Flax reference through jax2onnx (``--via flax``)."""

from __future__ import annotations

import importlib.util
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.onnx.interface import output_names, rename_io
from convnextv2.reference.errors import BadInputError, MissingDependencyError

# Why the Flax path is not available in the pinned set (docs/onnx.md).
JAX2ONNX_CONFLICT = (
    "--via flax needs jax2onnx, which is not installed: jax2onnx 0.17.1 (the release that exports Flax NNX) "
    "requires orbax-checkpoint<0.11.37, while the pinned flax 0.12.8 environment uses orbax-checkpoint 0.12.8; "
    "installing it would downgrade a Flax dependency, so the toolkit does not declare it. Export with --via torch "
    "(same weights, same numbers) or install jax2onnx in a separate environment"
)


def why_unavailable() -> str | None:
    """The reason this path cannot run in this install, or None when it can."""
    return JAX2ONNX_CONFLICT if importlib.util.find_spec("jax2onnx") is None else None


def build(ckpt: Checkpoint, opset: int, dynamic_hw: bool, features: bool, fp16: bool, example_size: int) -> Any:
    reason = why_unavailable()
    if reason:
        raise MissingDependencyError(reason)
    if fp16 or features:
        raise BadInputError("--fp16 and --features are only available with --via torch")
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    from convnextv2 import reference

    model = reference.build(ckpt, "flax")
    name = output_names(ckpt, False)[0]

    def forward(pixel_values: Any) -> Any:
        return model(jnp.transpose(pixel_values, (0, 2, 3, 1)))

    hw: Any = "H" if dynamic_hw else example_size
    proto = to_onnx(forward, [("B", 3, hw, "W" if dynamic_hw else example_size)], opset=opset)
    return rename_io(proto, name)
