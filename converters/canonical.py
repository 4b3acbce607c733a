"""The canonical checkpoint: one safetensors file, canonical names, metadata describing the model."""

from __future__ import annotations

from pathlib import Path

from convnextv2.converters.checkpoint import Checkpoint, checkpoint_from_metadata
from convnextv2.converters.digests import deferred_digests
from convnextv2.converters.format_contract import Format, always, tensor_bytes
from convnextv2.converters.progress import byte_progress
from convnextv2.converters.safetensors_io import read_safetensors, sniff_header, write_safetensors
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.variants import check_variant

NAME = "canonical"


def sniff(path: Path) -> bool:
    found = sniff_header(path)
    return found is not None and found[1].get("schema") == schema.SCHEMA_NAME


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    tensors, meta = read_safetensors(path)
    if meta.get("schema") != schema.SCHEMA_NAME:
        raise BadInputError(f"{path}: not a canonical ConvNeXt V2 file (metadata schema={meta.get('schema')!r})")
    ckpt = checkpoint_from_metadata(meta, tensors, str(path))
    ckpt.validate(str(path))
    check_variant(ckpt.config, variant, str(path))
    return ckpt


def write(ckpt: Checkpoint, path: Path) -> None:
    """The canonical file at ``path`` (written in place; converters.save makes it atomic)."""
    write_as(ckpt, path, path)


def write_as(ckpt: Checkpoint, path: Path, dest: Path) -> None:
    # dest: the name the progress bar shows while ``path`` is unnamed.
    ckpt.validate(f"writing {dest}")
    items = ckpt.ordered_tensors()
    total = sum(int(a.size) * a.dtype.itemsize for _, a in items)
    with deferred_digests():  # the source digest is computed while the tensors stream
        metadata = ckpt.metadata()
    with byte_progress(total, f"writing {dest.name}") as bar:
        write_safetensors(path, items, metadata, progress=bar)


# One safetensors file whose reader needs nothing but its bytes: conversions build and check it unnamed.
FORMAT = Format(NAME, sniff, read, write, unnamed_build=always, runner="torch", write_as=write_as,
                output_bytes=tensor_bytes)
