"""ONNX export of the Keras reference through tf2onnx (``--via tensorflow``; opset 18 at most)."""

from __future__ import annotations

import importlib.util
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.onnx.interface import INPUT_NAME, output_names, rename_io
from convnextv2.reference.errors import BadInputError, MissingDependencyError

MISSING_TF2ONNX = "--via tensorflow needs tf2onnx: pip install -c constraints.txt 'convnextv2-toolkit[onnx,tf]'"


def why_unavailable() -> str | None:
    """The reason this path cannot run in this install, or None when it can."""
    return MISSING_TF2ONNX if importlib.util.find_spec("tf2onnx") is None else None


def build(ckpt: Checkpoint, opset: int, dynamic_hw: bool, features: bool, fp16: bool, example_size: int) -> Any:
    reason = why_unavailable()
    if reason:
        raise MissingDependencyError(reason)
    if fp16:
        raise BadInputError("--fp16 is only available with --via torch")
    if features:
        raise BadInputError("--features is only available with --via torch")
    import tensorflow as tf
    import tf2onnx

    from convnextv2 import reference

    # A plain Dense classifier: the graph's head is one MatMul, as ONNX readers (ours included) expect; its
    # float32 error stays well inside the parity rule, which the export gate checks.
    model = reference.build(ckpt, "tensorflow", plain_head=True)
    name = output_names(ckpt, False)[0]
    hw = None if dynamic_hw else example_size

    # The Keras reference is NHWC inside; the exported graph still takes NCHW pixel_values like every other path.
    @tf.function(input_signature=[tf.TensorSpec((None, 3, hw, hw), tf.float32, name=INPUT_NAME)])
    def forward(pixel_values: Any) -> Any:
        out = model(tf.transpose(pixel_values, (0, 2, 3, 1)), training=False)
        return {name: tf.identity(out, name=name)}

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=forward.input_signature, opset=opset,
                                             output_path=None)
    return rename_io(proto, name)
