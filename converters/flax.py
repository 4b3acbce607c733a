"""Flax NNX checkpoints: a safetensors file of the model's NNX state (format ``flax``), both directions.

Keys are the NNX state paths of ``convnextv2.reference.flax_model.ConvNeXtV2`` joined with dots
(``stages.0.blocks.0.dwconv.kernel``), tensors in Flax layouts (conv kernels HWIO, dense kernels (in, out),
LayerNorm ``scale``). A Flax user loads the file with ``safetensors.flax.load_file`` and
``nnx.State.from_flat_path`` without this package (docs/flax.md). The canonical metadata (config,
preprocessing, source, info) rides in the safetensors ``__metadata__``, so reading recovers the full
checkpoint; a user's own NNX state saved with the same paths but no metadata is read too, sized from shapes.

This module is numpy-only: the NNX key table and its layouts are the Flax reference's own
(``reference/flax_layout.py``, free of JAX), so writing or reading a Flax file never needs JAX.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint, Source, checkpoint_from_metadata
from convnextv2.converters.digests import deferred_digests, lazy_sha256
from convnextv2.converters.format_contract import Format, always, tensor_bytes
from convnextv2.converters.progress import byte_progress
from convnextv2.converters.safetensors_io import read_safetensors, sniff_header, write_safetensors
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.flax_layout import STEM_KERNEL, canonical_to_nnx, nnx_to_canonical, normalize_key
from convnextv2.reference.variants import check_variant

NAME = "flax"

# Our files say what they are in the metadata; the canonical sniffer keys on ``schema``, which we never write.
MARKER_KEY = "convnextv2_layout"
MARKER_VALUE = "flax-nnx-state"
LAYOUT_VERSION_KEY = "convnextv2_layout_version"
LAYOUT_VERSION = "1"

_BLOCK_KERNEL = re.compile(r"^stages\.\d+\.blocks\.\d+\.dwconv\.kernel$")


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
    return STEM_KERNEL in keys and any(_BLOCK_KERNEL.match(k) for k in keys)


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
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
            source=Source(format=NAME, file_name=path.name, digest=lazy_sha256(path),
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


def write(ckpt: Checkpoint, path: Path) -> None:
    """The Flax safetensors file at ``path`` (written in place; converters.save makes it atomic)."""
    write_as(ckpt, path, path)


def write_as(ckpt: Checkpoint, path: Path, dest: Path) -> None:
    # dest: the name the progress bar shows while ``path`` is unnamed.
    ckpt.validate(f"writing {dest}")
    items = list(canonical_to_nnx(ckpt.model_tensors()).items())
    # Extras (e.g. an FCMAE decoder) are kept verbatim so nothing is lost on the way through Flax.
    items += sorted(ckpt.extras().items())
    total = sum(int(a.size) * a.dtype.itemsize for _, a in items)
    with deferred_digests():  # as canonical.write: the source digest is computed while the tensors stream
        metadata = file_metadata(ckpt)
    with byte_progress(total, f"writing {dest.name}") as bar:
        write_safetensors(path, items, metadata, progress=bar)


# One safetensors file whose reader needs nothing but its bytes: conversions build and check it unnamed.
FORMAT = Format(NAME, sniff, read, write, unnamed_build=always, runner="flax", write_as=write_as,
                output_bytes=tensor_bytes)
