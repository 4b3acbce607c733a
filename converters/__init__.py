"""Checkpoint formats and the mapping of each to and from the canonical schema.

``load(path)`` returns a :class:`Checkpoint`; ``save(ckpt, path, format=...)`` writes one (converters/saving.py:
the one publisher). Each format lives in its own module, which builds its record (``FORMAT``,
converters/format_contract.py); the registry (converters/formats.py) lists them in detection order. A
format's ``read`` and ``write`` declare their options as keyword-only parameters; ``load`` and ``save`` refuse
any other option by name. Modules import their framework only inside those functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint, FileIdentity, Preprocessing, Source
from convnextv2.converters.digests import lazy_sha256
from convnextv2.converters.formats import (
    MODULES,
    available_formats,
    check_options,
    declared_options,
    detect_format,
    format_module,
    readable,
)
from convnextv2.converters.formats import get as get_format
from convnextv2.converters.saving import GateOptions, save
from convnextv2.converters.state_files import skipped_text
from convnextv2.converters.wrapped import left_behind_text
from convnextv2.reference.errors import (
    BadInputError,
    CheckFailedError,
    ConvNeXtV2Error,
    MissingDependencyError,
    SchemaError,
    UnplacedKeysError,
    UnsafeCheckpointError,
)


def load(path: str | os.PathLike[str], format: str = "auto", **options: Any) -> Checkpoint:
    """Read any supported checkpoint into canonical tensors (memory-mapped where the format allows)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path} does not exist")
    try:
        name = detect_format(path) if format == "auto" else format
    except BadInputError as exc:
        # A file no format claims may still be a state dict whose names can be read (a safetensors file): say
        # which family and naming it is closest to (ConvNeXt V1 saved as safetensors, another model entirely).
        from convnextv2.converters.families import explain_unclaimed

        raise explain_unclaimed(path, exc) from None
    record = get_format(name)
    check_options(record.read, options, "reading", name)
    try:
        ckpt: Checkpoint = record.read(path, **options)
    except UnplacedKeysError as exc:
        # A reader knows only its own naming; which family and naming the keys are closest to is asked here,
        # where every format is known (the V1 refusal, the nearest naming's first unplaced keys).
        from convnextv2.converters.families import explain

        raise explain(exc) from None
    ckpt.file = _identity(name, path, ckpt)
    ckpt.notes = _what_was_left_out(path, ckpt)
    return ckpt


def _what_was_left_out(path: Path, ckpt: Checkpoint) -> list[str]:
    # Only a reader's record of this very file: a canonical file converted from a wrapped source carries that
    # record along, but reading it leaves nothing out.
    pending = ckpt.source.pending_digest()
    if pending is None or pending.path != path:
        return []
    notes = []
    behind = ckpt.source.layout.get("left_behind")
    if behind:
        notes.append(f"read the ConvNeXt V2 under {ckpt.source.layout.get('prefix')!r}; left behind "
                     f"{sum(behind.values())} tensor(s) of the wider model: {left_behind_text(behind)}")
    if ckpt.info.get("skipped"):
        notes.append(f"skipped beside the weights: {skipped_text(ckpt.info['skipped'])}")
    return notes


def _identity(name: str, path: Path, ckpt: Checkpoint) -> FileIdentity:
    # The file's own digest, hashed when first asked for; a reader's pending digest of this very file is
    # shared, so a conversion that also records it as the source hashes the file once.
    pending = ckpt.source.pending_digest()
    if pending is not None and pending.path == path:
        return FileIdentity(name, str(path), pending)
    if path.is_dir():
        return FileIdentity(name, str(path))
    return FileIdentity(name, str(path), lazy_sha256(path))


__all__ = [
    "BadInputError",
    "CheckFailedError",
    "Checkpoint",
    "ConvNeXtV2Error",
    "FileIdentity",
    "GateOptions",
    "MODULES",
    "MissingDependencyError",
    "Preprocessing",
    "SchemaError",
    "Source",
    "UnsafeCheckpointError",
    "available_formats",
    "declared_options",
    "detect_format",
    "format_module",
    "get_format",
    "load",
    "readable",
    "save",
]
