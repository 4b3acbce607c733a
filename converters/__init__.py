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

from convnextv2.converters.checkpoint import Checkpoint, FileIdentity, Preprocessing, Source
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
    "openvino": "convnextv2.converters.openvino",
    "litert": "convnextv2.converters.litert",
    "executorch": "convnextv2.converters.executorch",
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
    ckpt: Checkpoint = module.read(path, **options)
    ckpt.file = _identity(name, path, ckpt)
    return ckpt


def _identity(name: str, path: Path, ckpt: Checkpoint) -> FileIdentity:
    # The file's own digest, hashed when first asked for; a reader's pending digest of this very file is
    # shared, so a conversion that also records it as the source hashes the file once.
    pending = ckpt.source.pending_digest()
    if pending is not None and pending.path == path:
        return FileIdentity(name, str(path), pending)
    if path.is_dir():
        return FileIdentity(name, str(path))
    from convnextv2.converters.digests import lazy_sha256

    return FileIdentity(name, str(path), lazy_sha256(path))


def save(ckpt: Checkpoint, path: str | os.PathLike[str], format: str = "canonical", *, strict: bool = False,
         verify: bool = False, warn: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Write ``ckpt`` atomically in ``format``; an existing destination needs ``overwrite=True``.

    What ``format`` cannot carry of ``ckpt`` (converters.changes) is announced through ``warn`` (default:
    ``warnings.warn``) with the float64 logits difference it makes; ``strict=True`` refuses it instead
    (CheckFailedError, nothing written). A readable format is written beside the destination, read back and
    compared bit for bit with what was meant; with ``verify=True`` the source file (``ckpt.file``) and the
    output are also run, each by its own runtime, and judged by the parity rule. Only then is it published.
    Returns the summary: ``changes``, ``read_back``, ``verify``.
    """
    from convnextv2.converters import format_limits
    from convnextv2.converters import verify as verify_module
    from convnextv2.converters.atomic import check_destination

    module = format_module(format)
    _check_options(module.write, options, "writing", format)
    dest = Path(path)
    overwrite = bool(options.get("overwrite", False))
    check_destination(dest, overwrite)
    found = format_limits.unrepresentable(format, ckpt, dest, options)
    expected = format_limits.as_written(ckpt, found)
    summary: dict[str, Any] = {"changes": [c.to_json_dict() for c in found]}
    for change, record in zip(found, summary["changes"], strict=True):
        if change.functional:
            record["logits_difference"] = format_limits.logits_difference(ckpt, expected)
    if found:
        say = warn or _warn
        for record in summary["changes"]:
            figure = record.get("logits_difference")
            say(f"writing {dest}: {record['message']}" + (
                f"; float64 {figure['feature']} move by up to {figure['max_abs']:.3g} (max |{figure['feature']}| "
                f"{figure['max_abs_value']:.3g}) on the parity rule's seeded images" if figure else ""))
        if strict:
            raise CheckFailedError(f"{dest}: --strict: {len(found)} change(s) the {format} format forces: "
                                   + "; ".join(c.message for c in found) + "; nothing written")
    staged_options = {**options, "overwrite": False}
    # The writer is given what the target will hold (the eps it fixes, without the extras it drops), so that
    # its own metadata records the function it computes. A weights rounding the user asked for (fp16) is left
    # to the writer, whose check then still measures it against the source weights.
    to_write = format_limits.as_written(ckpt, [c for c in found if c.field != "weights"])
    if _unnamed_build(module, to_write, dest, options):
        # One file its reader knows by content: built and checked in an unnamed file, so a process killed
        # before publishing leaves nothing at all (converters/atomic.py).
        from convnextv2.converters.atomic import anonymous_output

        with (anonymous_output(dest, overwrite, stale_companions=_companions(format, dest)) as target,
              verify_module.named_as(target, dest)):
            module.write(to_write, dest, **staged_options)
            if readable(format):
                summary["read_back"], written = verify_module.read_back(expected, target, format, named=dest)
            else:
                summary["read_back"], written = {"status": "not readable"}, expected
            if verify:
                summary["verify"] = _functional(ckpt, target, format, written)
        return summary
    with verify_module.staged(dest) as work:
        staged = work / dest.name
        with verify_module.named_as(staged, dest):
            module.write(to_write, staged, **staged_options)
        if readable(format):
            summary["read_back"], written = verify_module.read_back(expected, staged, format)
        else:
            summary["read_back"] = {"status": "not readable"}
            written = expected
        if verify:
            summary["verify"] = _functional(ckpt, staged, format, written)
        verify_module.publish(work, dest, overwrite, _companions(format, dest))
    return summary


def _unnamed_build(module: Any, ckpt: Checkpoint, dest: Path, options: Mapping[str, Any]) -> bool:
    """A format module's ``UNNAMED_BUILD``: True when its output is one file that the writer, the reader (if
    any) and the runtime that checks it all open without needing its name, so it is built and checked unnamed,
    then linked into place; a predicate of the checkpoint, destination and options where that depends on them
    (ONNX: unless the weights go to a ``.data`` file the graph refers to by name; Keras: not a weights-only .h5)."""
    by_content = getattr(module, "UNNAMED_BUILD", False)
    return bool(by_content(ckpt, dest, dict(options)) if callable(by_content) else by_content)


def _functional(ckpt: Checkpoint, output: Path, format: str, written: Checkpoint) -> dict[str, Any]:
    from convnextv2.converters import verify as verify_module

    if ckpt.file is None:
        raise BadInputError("verify=True needs a checkpoint read with converters.load (it runs the source file)")
    source = Path(ckpt.file.path)
    size = verify_module.check_size(ckpt, source, ckpt.file.format)
    judge = verify_module.Judge(ckpt, size)
    result: dict[str, Any] = {"images": [int(judge.images.shape[0]), 3, size, size],
                              "referee_seconds": round(judge.seconds, 3),
                              "source": verify_module.run_and_judge(judge, source, ckpt.file.format, ckpt),
                              "output": verify_module.run_and_judge(judge, output, format, written)}
    result["passed"] = bool(result["source"]["passed"] and result["output"]["passed"])
    if not result["passed"]:
        failing = [f"{side} ({result[side]['runner']}): {result[side]['message']}"
                   for side in ("source", "output") if not result[side]["passed"]]
        raise CheckFailedError(f"--verify: {'; '.join(failing)}; nothing written")
    return result


def _companions(format: str, dest: Path) -> tuple[str, ...]:
    # Files a format may put beside its main file, so that replacing an output also removes a stale one.
    if format == "onnx":
        from convnextv2.converters.onnx.export import data_file_name

        return (data_file_name(dest),)
    return ()


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)


__all__ = [
    "BadInputError",
    "CheckFailedError",
    "Checkpoint",
    "ConvNeXtV2Error",
    "FORMAT_MODULES",
    "FileIdentity",
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
