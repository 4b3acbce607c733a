"""The interface every exported ONNX file has, whichever exporter wrote it (docs/onnx.md).

Input ``pixel_values`` (batch, 3, H, W) float32 NCHW; output ``logits`` (batch, K) float32, or ``pooled``
(batch, C3) for a headless model; ``--features`` adds ``stem``, ``stage1``..``stage4`` (NCHW) and ``pooled``.
"""

from __future__ import annotations

from typing import Any

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.reference.features import BACKBONE_FEATURES, final_feature

INPUT_NAME = "pixel_values"
# Every stage and the pooled features, then the logits of a classifier.
FEATURE_OUTPUTS = BACKBONE_FEATURES
# Spatial sizes must be multiples of the total stride.
STRIDE = 32


def output_names(ckpt: Checkpoint, features: bool) -> list[str]:
    final = final_feature(ckpt.config)
    if not features:
        return [final]
    names = list(FEATURE_OUTPUTS)
    if final == "logits":
        names.append("logits")
    return names


def rename_io(proto: Any, output: str) -> Any:
    """tf2onnx and jax2onnx name the input and output their own way (``pixel_values:0``); give the file the
    documented names."""
    renames = {proto.graph.input[0].name: INPUT_NAME, proto.graph.output[0].name: output}
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.name = renames.get(value.name, value.name)
    return proto
