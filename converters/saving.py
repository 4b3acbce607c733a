"""``converters.save``: the one way a checkpoint becomes a published output.

The flow: check the destination once; announce what the format cannot hold (its record's
``unrepresentable``); build the output unnamed (a format whose file is known by content) or in one staging
folder beside the destination; let the format's writer fill it; read it back bit for bit (readable formats,
converters/read_back.py); with ``verify``, run source and output and judge both; publish the main file with
its declared companions (converters/publishing.py). A failure at any step publishes nothing.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from convnextv2.converters import format_limits, formats, publishing
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Format
from convnextv2.converters.fs_faults import check_destination
from convnextv2.converters.read_back import read_back
from convnextv2.converters.runners.gates import verify_conversion
from convnextv2.reference.errors import BadInputError, CheckFailedError, ConvNeXtV2Error, SchemaError


def save(ckpt: Checkpoint, path: str | os.PathLike[str], format: str = "canonical", *, overwrite: bool = False,
         strict: bool = False, verify: bool = False, warn: Callable[[str], None] | None = None,
         **options: Any) -> dict[str, Any]:
    """Write ``ckpt`` atomically in ``format``; an existing destination needs ``overwrite=True``.

    What ``format`` cannot carry of ``ckpt`` (converters/format_limits.py) is announced through ``warn``
    (default: ``warnings.warn``) with the float64 logits difference it makes; ``strict=True`` refuses it
    instead (CheckFailedError, nothing written). A readable format is written beside the destination, read
    back and compared bit for bit with what was meant; with ``verify=True`` the source file (``ckpt.file``)
    and the output are also run, each by its own runtime, and judged by the parity rule. Only then is it
    published. Returns the summary: ``changes``, ``read_back``, ``verify``.
    """
    record = formats.get(format)
    formats.check_options(record.write, {**options, "overwrite": overwrite}, "writing", format)
    dest = Path(path)
    check_destination(dest, overwrite)
    found = record.unrepresentable(ckpt, dest, options)
    expected = format_limits.as_written(ckpt, found)
    summary: dict[str, Any] = {"changes": _announce(ckpt, dest, format, found, expected, strict, warn)}
    # The writer is given what the target will hold (the eps it fixes, without the extras it drops), so that
    # its own metadata records the function it computes. A weights rounding the user asked for (fp16) is left
    # to the writer, whose check then still measures it against the source weights.
    to_write = format_limits.as_written(ckpt, [c for c in found if c.field != "weights"])
    written_options = {**options, "overwrite": False}
    companions = record.companions(dest)
    if record.unnamed_build(to_write, dest, options):
        # One file its reader knows by content: built and checked in an unnamed file, so a process killed
        # before publishing leaves nothing at all.
        with (publishing.anonymous_output(dest, overwrite, stale_companions=companions) as target,
              named_as(target, dest)):
            record.write(to_write, dest, **written_options)
            _check(summary, ckpt, expected, target, record, verify, named=dest)
        return summary
    with publishing.staging_folder(dest) as work:
        staged = work / dest.name
        with named_as(staged, dest):
            record.write(to_write, staged, **written_options)
        _check(summary, ckpt, expected, staged, record, verify)
        publishing.publish_staged(work, dest, overwrite, companions)
    return summary


def _announce(ckpt: Checkpoint, dest: Path, format: str, found: list[format_limits.Change], expected: Checkpoint,
              strict: bool, warn: Callable[[str], None] | None) -> list[dict[str, Any]]:
    records = [c.to_json_dict() for c in found]
    for change, record in zip(found, records, strict=True):
        if change.functional:
            record["logits_difference"] = format_limits.logits_difference(ckpt, expected)
    if found:
        say = warn or _warn
        for record in records:
            figure = record.get("logits_difference")
            say(f"writing {dest}: {record['message']}" + (
                f"; float64 {figure['feature']} move by up to {figure['max_abs']:.3g} (max |{figure['feature']}| "
                f"{figure['max_abs_value']:.3g}) on the parity rule's seeded images" if figure else ""))
        if strict:
            raise CheckFailedError(f"{dest}: --strict: {len(found)} change(s) the {format} format forces: "
                                   + "; ".join(c.message for c in found) + "; nothing written")
    return records


def _check(summary: dict[str, Any], ckpt: Checkpoint, expected: Checkpoint, output: Path, record: Format,
           verify: bool, named: Path | None = None) -> None:
    if record.readable:
        summary["read_back"], written = read_back(expected, output, record, named=named)
    else:
        summary["read_back"], written = {"status": "not readable"}, expected
    if verify:
        summary["verify"] = _functional(ckpt, output, record.name, written)


def _functional(ckpt: Checkpoint, output: Path, format: str, written: Checkpoint) -> dict[str, Any]:
    if ckpt.file is None:
        raise BadInputError("verify=True needs a checkpoint read with converters.load (it runs the source file)")
    return verify_conversion(ckpt, Path(ckpt.file.path), ckpt.file.format, output, format, written)


@contextlib.contextmanager
def named_as(staged_path: Path, dest: Path) -> Iterator[None]:
    """Around a writer working on ``staged_path``: its warnings and errors name ``dest``, the path the user gave
    (the staging folder is an implementation detail). Warnings pass through the filters as usual; only their
    text is rewritten on the way out."""

    def renamed(text: str) -> str:
        return text.replace(str(staged_path), str(dest))

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            text = str(message)
            if str(staged_path) in text:
                message = category(renamed(text)) if isinstance(message, Warning) else renamed(text)
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield
        except ConvNeXtV2Error as exc:
            if type(exc) is SchemaError or str(staged_path) not in str(exc):
                raise
            try:
                replacement = type(exc)(renamed(str(exc)))
            except TypeError:
                raise exc from None
            raise replacement from None


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


__all__ = ["named_as", "save"]
