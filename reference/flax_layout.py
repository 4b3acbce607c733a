"""The Flax reference's NNX state paths and layouts, free of JAX.

Keys are the NNX state paths of ``reference.flax_model.ConvNeXtV2`` joined with dots
(``stages.0.blocks.0.dwconv.kernel``); ``NNX_KEYS`` maps them to canonical names and names each tensor's
layout change (``reference.layouts``: conv kernels HWIO, the depthwise kernel (7, 7, 1, C), dense kernels
(in, out), vectors unchanged). The Flax reference and the Flax file format (``converters/flax.py``) both use
this one table, so writing or reading a Flax file never needs JAX.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, SchemaError
from convnextv2.reference.keymap import KeyTable, Rule
from convnextv2.reference.layouts import CONV_HWIO, DENSE_TRANSPOSE, FLAX_DEPTHWISE, VECTOR
from convnextv2.reference.variants import ModelConfig

# NNX state path (dot-joined) <-> canonical name, with the layout change.
NNX_KEYS = KeyTable([
    Rule("stem.conv.kernel", "stem.conv.weight", CONV_HWIO),
    Rule("stem.conv.bias", "stem.conv.bias", VECTOR),
    Rule("stem.norm.scale", "stem.norm.weight", VECTOR),
    Rule("stem.norm.bias", "stem.norm.bias", VECTOR),
    Rule("stages.{i}.downsample.norm.scale", "stages.{i}.downsample.norm.weight", VECTOR),
    Rule("stages.{i}.downsample.norm.bias", "stages.{i}.downsample.norm.bias", VECTOR),
    Rule("stages.{i}.downsample.conv.kernel", "stages.{i}.downsample.conv.weight", CONV_HWIO),
    Rule("stages.{i}.downsample.conv.bias", "stages.{i}.downsample.conv.bias", VECTOR),
    Rule("stages.{s}.blocks.{b}.dwconv.kernel", "stages.{s}.blocks.{b}.dwconv.weight", FLAX_DEPTHWISE),
    Rule("stages.{s}.blocks.{b}.dwconv.bias", "stages.{s}.blocks.{b}.dwconv.bias", VECTOR),
    Rule("stages.{s}.blocks.{b}.norm.scale", "stages.{s}.blocks.{b}.norm.weight", VECTOR),
    Rule("stages.{s}.blocks.{b}.norm.bias", "stages.{s}.blocks.{b}.norm.bias", VECTOR),
    Rule("stages.{s}.blocks.{b}.pwconv1.kernel", "stages.{s}.blocks.{b}.pwconv1.weight", DENSE_TRANSPOSE),
    Rule("stages.{s}.blocks.{b}.pwconv1.bias", "stages.{s}.blocks.{b}.pwconv1.bias", VECTOR),
    Rule("stages.{s}.blocks.{b}.grn.gamma", "stages.{s}.blocks.{b}.grn.gamma", VECTOR),
    Rule("stages.{s}.blocks.{b}.grn.beta", "stages.{s}.blocks.{b}.grn.beta", VECTOR),
    Rule("stages.{s}.blocks.{b}.pwconv2.kernel", "stages.{s}.blocks.{b}.pwconv2.weight", DENSE_TRANSPOSE),
    Rule("stages.{s}.blocks.{b}.pwconv2.bias", "stages.{s}.blocks.{b}.pwconv2.bias", VECTOR),
    Rule("head.norm.scale", "head.norm.weight", VECTOR),
    Rule("head.norm.bias", "head.norm.bias", VECTOR),
    Rule("head.fc.kernel", "head.fc.weight", DENSE_TRANSPOSE),
    Rule("head.fc.bias", "head.fc.bias", VECTOR),
])

# The model is sized from this kernel when a state carries no config.
STEM_KERNEL = "stem.conv.kernel"


def normalize_key(key: str) -> str:
    """Accept the separators users pick when flattening an NNX state ('.' or '/'), and a trailing '.value'."""
    key = key.replace("/", ".")
    return key[: -len(".value")] if key.endswith(".value") else key


def canonical_to_nnx(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical model tensors (no extras) -> {dot-joined NNX path: Flax-layout array}, order kept."""
    flat: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        mapped = NNX_KEYS.to_foreign(name)
        if mapped is None:
            raise BadInputError(f"tensor {name} has no place in the Flax NNX state")
        key, rule = mapped
        flat[key] = rule.transform.to_foreign(array)
    return flat


def nnx_to_canonical(
    flat: Mapping[str, np.ndarray], where: str, config: ModelConfig | None = None
) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """{NNX path: Flax-layout array} -> (canonical tensors in forward order plus extras, config).

    Every shape is checked in Flax terms before anything is transposed, so an error names the file's own
    key with its expected and found Flax shape. Without ``config`` the size is read from the shapes.
    """
    mapped: dict[str, tuple[str, Rule, np.ndarray]] = {}
    extras: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for raw_key, array in flat.items():
        key = normalize_key(raw_key)
        if key.startswith(schema.EXTRAS_PREFIX):
            extras[key] = array
            continue
        found = NNX_KEYS.to_canonical(key)
        if found is None:
            unknown.append(f"{raw_key} {list(array.shape)}")
            continue
        name, rule = found
        if name in mapped:
            raise BadInputError(f"{where}: tensor {raw_key} appears twice (as {mapped[name][0]} too)")
        mapped[name] = (raw_key, rule, array)
    if unknown:
        raise BadInputError(
            f"{where}: {len(unknown)} key(s) are not paths of a ConvNeXt V2 NNX state: {', '.join(unknown[:10])}"
        )
    if config is None:
        # Size the model from the tensors of the right rank; the others are reported against it below.
        canonical_shapes = {
            name: rule.transform.canonical_shape(array.shape, f"{where}: {raw_key}")
            for name, (raw_key, rule, array) in mapped.items()
            if array.ndim == rule.transform.rank
        }
        if "stem.conv.weight" not in canonical_shapes:
            stem = mapped.get("stem.conv.weight")
            found = f", found {stem[0]} with shape {list(stem[2].shape)}" if stem else ""
            raise BadInputError(f"{where}: the model is sized from {STEM_KERNEL}, a (4, 4, 3, C0) kernel{found}")
        config = schema.infer_config(canonical_shapes, where)
    problems: list[str] = []
    expected = schema.expected_shapes(config)
    for name, shape in expected.items():
        key, rule = NNX_KEYS.to_foreign(name)  # type: ignore[misc]
        flax_shape = rule.transform.foreign_shape(shape)
        if name not in mapped:
            problems.append(f"missing tensor {key}: expected shape {list(flax_shape)}")
        elif tuple(mapped[name][2].shape) != flax_shape:
            raw_key, _, array = mapped[name]
            problems.append(f"tensor {raw_key}: expected shape {list(flax_shape)}, found {list(array.shape)}")
    for name, (raw_key, _, array) in mapped.items():
        if name not in expected:
            problems.append(f"unexpected tensor {raw_key} (shape {list(array.shape)}) for a {config.variant} model")
    if problems:
        raise SchemaError(where, problems)
    tensors = {
        name: mapped[name][1].transform.to_canonical(mapped[name][2], f"{where}: {mapped[name][0]}")
        for name in expected
    }
    tensors.update(sorted(extras.items()))
    return tensors, config
