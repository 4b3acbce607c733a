"""The Keras reference's weight names and layouts, free of TensorFlow.

Every parameterised layer of ``reference/keras_model.py`` is named after its canonical prefix, so a Keras
weight path ``<layer name>/<variable name>`` maps to a canonical name through ``KERAS_KEYS``; each rule names
its layout change (``reference.layouts``). The Keras reference and the Keras file reader
(``converters/keras.py``, which needs only h5py) both use this one table.
"""

from __future__ import annotations

from convnextv2.reference import schema
from convnextv2.reference.keymap import KeyTable, Rule
from convnextv2.reference.layouts import CONV_HWIO, DENSE_TRANSPOSE, KERAS_DEPTHWISE, VECTOR, Layout
from convnextv2.reference.variants import ModelConfig

PACKAGE = "convnextv2"  # Keras registration package: config.json names our layers "convnextv2>GRN" etc.

# Keras weight path (layer name / variable name) <-> canonical name.
KERAS_KEYS = KeyTable([
    Rule("stem.conv/kernel", "stem.conv.weight", CONV_HWIO),
    Rule("stem.conv/bias", "stem.conv.bias", VECTOR),
    Rule("stem.norm/{p}", "stem.norm.{p}", VECTOR),
    Rule("stages.{i}.downsample.norm/{p}", "stages.{i}.downsample.norm.{p}", VECTOR),
    Rule("stages.{i}.downsample.conv/kernel", "stages.{i}.downsample.conv.weight", CONV_HWIO),
    Rule("stages.{i}.downsample.conv/bias", "stages.{i}.downsample.conv.bias", VECTOR),
    Rule("stages.{s}.blocks.{b}.dwconv/kernel", "stages.{s}.blocks.{b}.dwconv.weight", KERAS_DEPTHWISE),
    Rule("stages.{s}.blocks.{b}.pwconv1/kernel", "stages.{s}.blocks.{b}.pwconv1.weight", DENSE_TRANSPOSE),
    Rule("stages.{s}.blocks.{b}.pwconv2/kernel", "stages.{s}.blocks.{b}.pwconv2.weight", DENSE_TRANSPOSE),
    Rule("stages.{s}.blocks.{b}.{p}/bias", "stages.{s}.blocks.{b}.{p}.bias", VECTOR),
    Rule("stages.{s}.blocks.{b}.norm/weight", "stages.{s}.blocks.{b}.norm.weight", VECTOR),
    Rule("stages.{s}.blocks.{b}.grn/{p}", "stages.{s}.blocks.{b}.grn.{p}", VECTOR),
    Rule("head.norm/{p}", "head.norm.{p}", VECTOR),
    Rule("head.fc/kernel", "head.fc.weight", DENSE_TRANSPOSE),
    Rule("head.fc/bias", "head.fc.bias", VECTOR),
])


def keras_paths(config: ModelConfig) -> dict[str, tuple[str, Layout]]:
    """Keras weight path -> (canonical name, layout), in canonical forward order."""
    paths = {}
    for name in schema.expected_shapes(config):
        found = KERAS_KEYS.to_foreign(name)
        if found is None:  # pragma: no cover - the table covers the schema (tested)
            raise AssertionError(f"no Keras path for canonical tensor {name}")
        paths[found[0]] = (name, found[1].transform)
    return paths
