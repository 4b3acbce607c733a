"""Checkpoint formats and the mapping of each to and from the canonical schema.

``load(path)`` returns a :class:`Checkpoint`; ``save(ckpt, path, format=...)`` writes one. Each format
lives in its own module exposing ``NAME``, ``sniff(path)``, ``read(path, *, options...)`` and
``write(ckpt, path, *, options...)``, each declaring its options as keyword-only parameters; ``load`` and
``save`` refuse any other option by name. Modules import their framework only inside those functions.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
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
    return importlib.import_module(FORMAT_MODULES[name])


def available_formats() -> list[str]:
    """Every format, in auto-detection order (their modules import no framework until they read or write)."""
    return list(FORMAT_MODULES)


def readable(name: str) -> bool:
    """Whether format ``name`` can be read: a write-only format keeps ``read`` only to refuse with its reason
    (``READABLE = False`` in its module)."""
    return bool(getattr(format_module(name), "READABLE", True))


def declared_options(function: Callable[..., Any]) -> list[str]:
    """The keyword-only options a format's ``read`` or ``write`` declares, in declaration order."""
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]


def _check_options(function: Callable[..., Any], options: Mapping[str, Any], doing: str, name: str) -> None:
    # A misspelt option (emma=True) must not be silently ignored: every reader and writer declares its own.
    allowed = declared_options(function)
    for key in options:
        if key not in allowed:
            raise BadInputError(f"unknown option {key!r} for {doing} format {name!r}; expected one of: "
                                f"{', '.join(sorted(allowed)) or '(none)'}")


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
    _check_options(module.read, options, "reading", name)
    return module.read(path, **options)


def save(ckpt: Checkpoint, path: str | os.PathLike[str], format: str = "canonical", **options: Any) -> None:
    """Write ``ckpt`` atomically in ``format``; an existing destination needs ``overwrite=True``."""
    module = format_module(format)
    _check_options(module.write, options, "writing", format)
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
    "declared_options",
    "detect_format",
    "readable",
    "load",
    "save",
]
