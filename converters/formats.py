"""The format registry: every checkpoint format's record (converters/format_contract.py), in detection order.

A format module is imported only when its record is asked for; format modules import no framework until they
read or write, and none imports this registry back.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from convnextv2.converters.format_contract import Format
from convnextv2.reference.errors import BadInputError

# format name -> module. Order matters for auto-detection: the most specific sniffers first.
MODULES: dict[str, str] = {
    "canonical": "convnextv2.converters.canonical",
    # hf, timm and mmpretrain peek at key names and claim only their own torch zips; original takes every other one.
    "hf": "convnextv2.converters.hf",
    "timm": "convnextv2.converters.timm",
    "mmpretrain": "convnextv2.converters.mmpretrain",
    "original": "convnextv2.converters.original",
    "keras": "convnextv2.converters.keras",
    "flax": "convnextv2.converters.flax",
    "savedmodel": "convnextv2.converters.savedmodel",
    "onnx": "convnextv2.converters.onnx",
    "openvino": "convnextv2.converters.openvino",
    "litert": "convnextv2.converters.litert",
    "executorch": "convnextv2.converters.executorch",
}


def register(name: str, module: str) -> None:
    """Add a format (its module builds ``FORMAT``), detected after those registered before it."""
    if name in MODULES:
        raise ValueError(f"format {name!r} is already registered")
    MODULES[name] = module


def available_formats() -> list[str]:
    """Every format, in auto-detection order."""
    return list(MODULES)


def format_module(name: str) -> ModuleType:
    if name not in MODULES:
        raise BadInputError(f"unknown format {name!r}; expected one of {', '.join(available_formats())}")
    return importlib.import_module(MODULES[name])


def get(name: str) -> Format:
    """The record of format ``name``."""
    record: Format = format_module(name).FORMAT
    return record


def readable(name: str) -> bool:
    """Whether format ``name`` can be read (a write-only format's reader only refuses, with its reason)."""
    return get(name).readable


def declared_options(function: Callable[..., Any]) -> list[str]:
    """The keyword-only options a format's ``read`` or ``write`` declares, in declaration order."""
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]


def check_options(function: Callable[..., Any], options: Mapping[str, Any], doing: str, name: str,
                  also: tuple[str, ...] = ()) -> None:
    """Refuse an option ``function`` does not declare; ``also``: the caller's own options, named in the refusal."""
    # A misspelt option (emma=True) must not be silently ignored: every reader and writer declares its own.
    allowed = declared_options(function) + list(also)
    for key in options:
        if key not in allowed:
            raise BadInputError(f"unknown option {key!r} for {doing} format {name!r}; expected one of: "
                                f"{', '.join(sorted(allowed)) or '(none)'}")


def detect_format(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path} does not exist")
    for name in available_formats():
        if get(name).sniff(path):
            return name
    kind = "directory" if path.is_dir() else "file"
    raise BadInputError(
        f"{path}: cannot tell which checkpoint format this {kind} is; pass --from with one of {', '.join(available_formats())}"
    )


__all__ = ["MODULES", "Format", "available_formats", "check_options", "declared_options", "detect_format",
           "format_module", "get", "readable", "register"]
