"""Checkpoint formats and the mapping of each to and from the canonical schema.

``load(path)`` returns a :class:`Checkpoint`; ``save(ckpt, path, format=...)`` writes one. Each format
lives in its own module exposing ``NAME``, ``sniff(path)``, ``read(path, **options)`` and
``write(ckpt, path, **options)``; modules import their framework only inside those functions.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source
from convnextv2.reference.errors import (
    BadInputError,
    CheckFailedError,
    ConvNeXtV2Error,
    MissingDependencyError,
    SchemaError,
    UnsafeCheckpointError,
)

# format name -> module. Order matters for auto-detection: the most specific sniffers first.
FORMAT_MODULES: dict[str, str] = {
    "canonical": "convnextv2.converters.canonical",
    # hf and timm peek at key names and claim only their own torch zips; original takes every other one.
    "hf": "convnextv2.converters.hf",
    "timm": "convnextv2.converters.timm",
    "original": "convnextv2.converters.original",
    "keras": "convnextv2.converters.keras",
    "flax": "convnextv2.converters.flax",
    "savedmodel": "convnextv2.converters.savedmodel",
    "onnx": "convnextv2.converters.onnx",
}


def format_module(name: str) -> ModuleType:
    if name not in FORMAT_MODULES:
        raise BadInputError(f"unknown format {name!r}; expected one of {', '.join(available_formats())}")
    try:
        return importlib.import_module(FORMAT_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == FORMAT_MODULES[name]:
            raise BadInputError(f"format {name!r} is not implemented in this version") from None
        raise


def available_formats() -> list[str]:
    """Formats whose converter module exists in this install (importing none of their frameworks)."""
    names = []
    for name, module in FORMAT_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def detect_format(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path} does not exist")
    for name in available_formats():
        module = format_module(name)
        if module.sniff(path):
            return name
    kind = "directory" if path.is_dir() else "file"
    raise BadInputError(
        f"{path}: cannot tell which checkpoint format this {kind} is; pass --from with one of {', '.join(available_formats())}"
    )


def load(path: str | os.PathLike[str], format: str = "auto", **options: Any) -> Checkpoint:
    """Read any supported checkpoint into canonical tensors (memory-mapped where the format allows)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path} does not exist")
    name = detect_format(path) if format == "auto" else format
    module = format_module(name)
    if not hasattr(module, "read"):
        raise BadInputError(f"format {name!r} can only be written, not read")
    return module.read(path, **options)


def save(ckpt: Checkpoint, path: str | os.PathLike[str], format: str = "canonical", **options: Any) -> None:
    """Write ``ckpt`` atomically in ``format``; an existing destination needs ``overwrite=True``."""
    module = format_module(format)
    if not hasattr(module, "write"):
        raise BadInputError(f"format {format!r} can only be read, not written")
    module.write(ckpt, Path(path), **options)


__all__ = [
    "BadInputError",
    "CheckFailedError",
    "Checkpoint",
    "ConvNeXtV2Error",
    "FORMAT_MODULES",
    "MissingDependencyError",
    "Preprocessing",
    "SchemaError",
    "Source",
    "UnsafeCheckpointError",
    "available_formats",
    "detect_format",
    "load",
    "save",
]
