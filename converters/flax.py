"""Flax NNX checkpoints: a safetensors file of the model's NNX state (format ``flax``), both directions.

Keys are the NNX state paths of ``convnextv2.reference.flax_model.ConvNeXtV2`` joined with dots
(``stages.0.blocks.0.dwconv.kernel``), tensors in Flax layouts (conv kernels HWIO, dense kernels (in, out),
LayerNorm ``scale``). A Flax user loads the file with ``safetensors.flax.load_file`` and
``nnx.State.from_flat_path`` without this package (docs/flax.md). The canonical metadata (config,
preprocessing, source, info) rides in the safetensors ``__metadata__``, so reading recovers the full
checkpoint; a user's own NNX state saved with the same paths but no metadata is read too, sized from shapes.

This module is numpy-only: the NNX key table and the Flax<->canonical layout transposes live here, once,
and the Flax reference model imports them, so writing or reading a Flax file never needs JAX.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.atomic import atomic_file
from convnextv2.converters.checkpoint import Checkpoint, Source, checkpoint_from_metadata, deferred_digests, lazy_sha256
from convnextv2.reference.errors import BadInputError, SchemaError
from convnextv2.converters.keymap import KeyTable, Rule
from convnextv2.converters.progress import byte_progress
from convnextv2.converters.safetensors_io import read_safetensors, sniff_header, write_safetensors
from convnextv2.reference import schema
from convnextv2.reference.variants import ModelConfig, check_variant

NAME = "flax"
SUFFIXES = (".safetensors",)

# Our files say what they are in the metadata; the canonical sniffer keys on ``schema``, which we never write.
MARKER_KEY = "convnextv2_layout"
MARKER_VALUE = "flax-nnx-state"
LAYOUT_VERSION_KEY = "convnextv2_layout_version"
LAYOUT_VERSION = "1"

# NNX state path (dot-joined) <-> canonical name. The transform names the layout change (see below).
NNX_KEYS = KeyTable([
    Rule("stem.conv.kernel", "stem.conv.weight", transform="conv"),
    Rule("stem.conv.bias", "stem.conv.bias"),
    Rule("stem.norm.scale", "stem.norm.weight"),
    Rule("stem.norm.bias", "stem.norm.bias"),
    Rule("stages.{i}.downsample.norm.scale", "stages.{i}.downsample.norm.weight"),
    Rule("stages.{i}.downsample.norm.bias", "stages.{i}.downsample.norm.bias"),
    Rule("stages.{i}.downsample.conv.kernel", "stages.{i}.downsample.conv.weight", transform="conv"),
    Rule("stages.{i}.downsample.conv.bias", "stages.{i}.downsample.conv.bias"),
    Rule("stages.{s}.blocks.{b}.dwconv.kernel", "stages.{s}.blocks.{b}.dwconv.weight", transform="conv"),
    Rule("stages.{s}.blocks.{b}.dwconv.bias", "stages.{s}.blocks.{b}.dwconv.bias"),
    Rule("stages.{s}.blocks.{b}.norm.scale", "stages.{s}.blocks.{b}.norm.weight"),
    Rule("stages.{s}.blocks.{b}.norm.bias", "stages.{s}.blocks.{b}.norm.bias"),
    Rule("stages.{s}.blocks.{b}.pwconv1.kernel", "stages.{s}.blocks.{b}.pwconv1.weight", transform="linear"),
    Rule("stages.{s}.blocks.{b}.pwconv1.bias", "stages.{s}.blocks.{b}.pwconv1.bias"),
    Rule("stages.{s}.blocks.{b}.grn.gamma", "stages.{s}.blocks.{b}.grn.gamma"),
    Rule("stages.{s}.blocks.{b}.grn.beta", "stages.{s}.blocks.{b}.grn.beta"),
    Rule("stages.{s}.blocks.{b}.pwconv2.kernel", "stages.{s}.blocks.{b}.pwconv2.weight", transform="linear"),
    Rule("stages.{s}.blocks.{b}.pwconv2.bias", "stages.{s}.blocks.{b}.pwconv2.bias"),
    Rule("head.norm.scale", "head.norm.weight"),
    Rule("head.norm.bias", "head.norm.bias"),
    Rule("head.fc.kernel", "head.fc.weight", transform="linear"),
    Rule("head.fc.bias", "head.fc.bias"),
])

_STEM_KERNEL = "stem.conv.kernel"
_BLOCK_KERNEL = re.compile(r"^stages\.\d+\.blocks\.\d+\.dwconv\.kernel$")


# ------------------------------------------------------------ layout transposes (the one place)
# canonical conv (out, in, kh, kw) and depthwise (C, 1, 7, 7) <-> Flax HWIO (kh, kw, in, out) / (7, 7, 1, C);
# canonical linear (out, in) <-> Flax dense kernel (in, out). Everything else is the same vector.
_TO_FLAX_AXES = {"conv": (2, 3, 1, 0), "linear": (1, 0)}
_TO_CANONICAL_AXES = {"conv": (3, 2, 0, 1), "linear": (1, 0)}


def to_flax_array(array: np.ndarray, transform: str | None) -> np.ndarray:
    return array if transform is None else array.transpose(_TO_FLAX_AXES[transform])


def to_canonical_array(array: np.ndarray, transform: str | None) -> np.ndarray:
    return array if transform is None else array.transpose(_TO_CANONICAL_AXES[transform])


def _permute_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in axes)


def to_flax_shape(shape: tuple[int, ...], transform: str | None) -> tuple[int, ...]:
    return tuple(shape) if transform is None else _permute_shape(tuple(shape), _TO_FLAX_AXES[transform])


def _expected_rank(transform: str | None) -> int:
    return 1 if transform is None else len(_TO_FLAX_AXES[transform])


# ------------------------------------------------------------ name mapping shared with the Flax reference

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
        flat[key] = to_flax_array(array, rule.transform)
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
            name: tuple(array.shape[a] for a in _TO_CANONICAL_AXES[rule.transform]) if rule.transform else array.shape
            for name, (_, rule, array) in mapped.items()
            if array.ndim == _expected_rank(rule.transform)
        }
        if "stem.conv.weight" not in canonical_shapes:
            stem = mapped.get("stem.conv.weight")
            found = f", found {stem[0]} with shape {list(stem[2].shape)}" if stem else ""
            raise BadInputError(f"{where}: the model is sized from {_STEM_KERNEL}, a (4, 4, 3, C0) kernel{found}")
        config = schema.infer_config(canonical_shapes, where)
    problems: list[str] = []
    expected = schema.expected_shapes(config)
    for name, shape in expected.items():
        key, rule = NNX_KEYS.to_foreign(name)  # type: ignore[misc]
        flax_shape = to_flax_shape(shape, rule.transform)
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
    tensors = {name: to_canonical_array(mapped[name][2], mapped[name][1].transform) for name in expected}
    tensors.update(sorted(extras.items()))
    return tensors, config


# ------------------------------------------------------------ reading

def _is_ours(meta: Mapping[str, Any]) -> bool:
    return meta.get(MARKER_KEY) == MARKER_VALUE


def sniff(path: Path) -> bool:
    found = sniff_header(path)
    if found is None:
        return False
    header, meta = found
    if meta.get("schema") == schema.SCHEMA_NAME:
        return False
    if _is_ours(meta):
        return True
    # A user's own NNX state: NNX parameter names (kernel, scale) under our module paths. timm
    # (stem.0.weight), HF (convnextv2.embeddings...) and canonical (stem.conv.weight) keys never match.
    keys = {normalize_key(k) for k in header if k != "__metadata__"}
    return _STEM_KERNEL in keys and any(_BLOCK_KERNEL.match(k) for k in keys)


def read(path: Path, *, variant: str | None = None, **_: Any) -> Checkpoint:
    where = str(path)
    flat, meta = read_safetensors(path)
    if meta.get("schema") == schema.SCHEMA_NAME:
        raise BadInputError(f"{path}: this is a canonical file, not a Flax NNX state; use --from canonical")
    if _is_ours(meta):
        if meta.get(LAYOUT_VERSION_KEY) != LAYOUT_VERSION:
            raise BadInputError(
                f"{path}: Flax layout version {meta.get(LAYOUT_VERSION_KEY)!r} is not supported "
                f"(supports {LAYOUT_VERSION}); upgrade convnextv2"
            )
        # The toolkit's one metadata parser; the source stays the origin of the weights, as a canonical
        # file keeps it (the Flax file is only a carrier).
        ckpt = checkpoint_from_metadata(meta, {}, where)
        ckpt.tensors, _ = nnx_to_canonical(flat, where, ckpt.config)
    else:
        tensors, config = nnx_to_canonical(flat, where)
        ckpt = Checkpoint(
            config=config,
            tensors=tensors,
            source=Source(format=NAME, file_name=path.name, sha256=lazy_sha256(path),  # type: ignore[arg-type]
                          layout={"layout": MARKER_VALUE, "metadata": "none"}),
        )
    ckpt.validate(where)
    check_variant(ckpt.config, variant, where)
    return ckpt


# ------------------------------------------------------------ writing

def file_metadata(ckpt: Checkpoint) -> dict[str, str]:
    meta = ckpt.metadata()
    # Without "schema" the canonical reader does not claim the file; "format" follows the safetensors
    # convention of naming the framework whose layout the tensors are in.
    del meta["schema"]
    meta["format"] = NAME
    meta[MARKER_KEY] = MARKER_VALUE
    meta[LAYOUT_VERSION_KEY] = LAYOUT_VERSION
    return meta


def write(ckpt: Checkpoint, path: Path, *, overwrite: bool = False, **_: Any) -> None:
    ckpt.validate(f"writing {path}")
    items = list(canonical_to_nnx(ckpt.model_tensors()).items())
    # Extras (e.g. an FCMAE decoder) are kept verbatim so nothing is lost on the way through Flax.
    items += sorted(ckpt.extras().items())
    total = sum(int(a.size) * a.dtype.itemsize for _, a in items)
    with deferred_digests():  # as canonical.write: the source digest is computed while the tensors stream
        metadata = file_metadata(ckpt)
    with atomic_file(path, overwrite) as tmp, byte_progress(total, f"writing {path.name}") as bar:
        write_safetensors(tmp, items, metadata, progress=bar)
