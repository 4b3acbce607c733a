"""``converters.save``: the one way a checkpoint becomes a published output.

The flow: check the destination once; announce what the format cannot hold (its record's
``unrepresentable``); build the output unnamed (a format whose file is known by content) or in one staging
folder beside the destination; let the format's writer fill it (writers only write); run the export gate of a
gated format (converters/runners/gates.py); read it back bit for bit (readable formats,
converters/read_back.py); with ``verify``, run source and output and judge both; publish the main file with
its declared companions (converters/publishing.py). A failure at any step publishes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from convnextv2.converters import format_limits, formats, publishing
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.digests import LateHeaders, headers_written_late
from convnextv2.converters.format_contract import Format
from convnextv2.converters.fs_faults import check_destination
from convnextv2.converters.read_back import read_back
from convnextv2.converters.runners.gates import check_output, gate_summary, verify_conversion
from convnextv2.reference.errors import BadInputError, CheckFailedError, ConvNeXtV2Error, SchemaError

# How a refusal names each gated export: "{dest}: {this} fails parity, nothing written: {reason}".
GATE_REFUSALS = {"onnx": "exported graph", "openvino": "OpenVINO IR", "litert": "LiteRT file",
                 "executorch": "ExecuTorch program"}


@dataclasses.dataclass(frozen=True)
class GateOptions:
    """The export gate's own settings: how many seeded images it runs, and the precision whose parity rule
    judges them (default: float16 for an export whose weights are rounded to float16, the ``fp16`` write option,
    else float32). The image size is the export's own (its ``size`` write option): a gated export is traced at
    one size and checked at it."""

    batch: int = 4
    precision: str | None = None


DEFAULT_GATE = GateOptions()


def gate_announcement(format: str, dest: Path) -> str:
    """The progress line said before the gate of a ``format`` export to ``dest`` runs."""
    if format == "onnx":
        return f"checking {dest.name}: onnx.checker, then onnxruntime (ORT_ENABLE_ALL) vs the float64 referee"
    if format == "litert":
        from convnextv2.converters.litert import interpreter_name

        return f"checking {dest.name} in {interpreter_name()} vs the float64 referee"
    if format == "openvino":
        return f"checking {dest.name} in OpenVINO (INFERENCE_PRECISION_HINT=f32) vs the float64 referee"
    return f"checking {dest.name} in the ExecuTorch runtime vs the float64 referee"


def save(ckpt: Checkpoint, path: str | os.PathLike[str], format: str = "canonical", *, overwrite: bool = False,
         strict: bool = False, verify: bool = False, warn: Callable[[str], None] | None = None,
         gate: GateOptions = DEFAULT_GATE, log: Callable[[str], None] | None = None, templates: Any = None,
         **options: Any) -> dict[str, Any]:
    """Write ``ckpt`` atomically in ``format``; an existing destination needs ``overwrite=True``.

    What ``format`` cannot carry of ``ckpt`` (converters/format_limits.py) is announced through ``warn``
    (default: ``warnings.warn``) with the float64 logits difference it makes; ``strict=True`` refuses it
    instead (CheckFailedError, nothing written). An export whose format is gated (ONNX, OpenVINO, LiteRT,
    ExecuTorch) is run by its runtime against the float64 referee first (``gate``: the batch and precision of
    that check; the image size is the export's own, its ``size`` option) and refused (CheckFailedError) when it
    fails the parity rule. A readable format is written beside the destination, read back and compared bit for
    bit with what was meant; with ``verify=True`` the source file (``ckpt.file``) and the output are also run,
    each by its own runtime, and judged by the parity rule. Only then is it published. ``log``: progress lines
    for a person. ``templates``: an entry cache (converters/entry_cache.py) whose export templates an ONNX,
    OpenVINO, LiteRT or ExecuTorch export is built from (converters/templates.py; the output is the file a fresh
    build writes). Returns the summary: ``changes``, ``check`` (gated formats), ``read_back``, ``verify``,
    ``built`` (how an export was built: from its template, or afresh and why).
    """
    record = formats.get(format)
    formats.check_options(record.write, options, "writing", format, also=("overwrite",))
    dest = Path(path)
    check_destination(dest, overwrite)
    ckpt.validate(f"{'exporting' if record.gated else 'writing'} {dest}")
    found = record.unrepresentable(ckpt, dest, options)
    expected = format_limits.as_written(ckpt, found)
    summary: dict[str, Any] = {"changes": _announce(ckpt, dest, format, found, expected, strict, warn)}
    # The writer is given what the target will hold (the eps it fixes, without the extras it drops), so that
    # its own metadata records the function it computes. A weights rounding the user asked for (fp16) is left
    # to the writer, and the export gate still measures it against the source weights.
    to_write = format_limits.as_written(ckpt, [c for c in found if c.field != "weights"])
    output = _Output(record, to_write, dest, options, gate, log, templates, summary)
    companions = record.companions(dest)
    expected_bytes = record.output_bytes(to_write, options)
    if record.unnamed_build(to_write, dest, options):
        # One file its reader knows by content: built and checked in an unnamed file, so a process killed
        # before publishing leaves nothing at all.
        with (publishing.atomic_file(dest, overwrite, expected_bytes=expected_bytes,
                                     stale_companions=companions) as target,
              named_as(target, dest), headers_written_late() as late):
            output.write(target)
            output.check(summary, target)
            _check(summary, ckpt, expected, target, record, verify, late, named=dest)
        return summary
    if not overwrite:  # a companion written beside the destination is refused before the work, as the main file
        for name in companions:
            if (dest.parent / name).exists():
                raise BadInputError(f"{dest.parent / name} already exists; pass --overwrite to replace it")
    with publishing.staging_folder(dest, expected_bytes=expected_bytes) as work:
        staged = work / dest.name
        with headers_written_late() as late:
            with named_as(staged, dest):
                output.write(staged)
            output.check(summary, staged)
            _check(summary, ckpt, expected, staged, record, verify, late)
        publishing.publish_staged(work, dest, overwrite, companions)
    return summary


# The exports built through a template cache when one is given: format -> its module's ``write_with``.
_TEMPLATED = {"onnx": "onnx.export", "openvino": "openvino", "litert": "litert", "executorch": "executorch"}


@dataclasses.dataclass(frozen=True)
class _Output:
    """What one save writes: the checkpoint as the target holds it, where it goes, the writer's options and
    the export gate's."""

    record: Format
    ckpt: Checkpoint
    dest: Path
    options: dict[str, Any]
    gate: GateOptions
    log: Callable[[str], None] | None
    templates: Any = None
    summary: dict[str, Any] | None = None

    def write(self, target: Path) -> None:
        if self.templates is not None and self.record.name in _TEMPLATED:
            import importlib

            module = importlib.import_module(f"convnextv2.converters.{_TEMPLATED[self.record.name]}")
            built = module.write_with(self.ckpt, target, self.templates, **self.options)
            if self.summary is not None:
                self.summary["built"] = built
        elif self.record.write_as is not None:
            self.record.write_as(self.ckpt, target, self.dest, **self.options)
        else:
            self.record.write(self.ckpt, target, **self.options)

    def check(self, summary: dict[str, Any], target: Path) -> None:
        """The export gate of a gated format: the written file run by its runtime against the float64 referee
        at the export's image size; nothing is published when it fails."""
        if not self.record.gated:
            return
        name = self.record.name
        precision = self.gate.precision or ("float16" if self.options.get("fp16") else "float32")
        size = int(self.options.get("size") or self.ckpt.preprocessing.input_size)
        if self.log is not None:
            self.log(gate_announcement(name, self.dest))
        verdict = check_output(self.ckpt, target, name, size=size, batch=self.gate.batch, precision=precision)
        if not verdict.passed:
            raise CheckFailedError(f"{self.dest}: {GATE_REFUSALS[name]} fails parity, nothing written: "
                                   f"{verdict.reason}")
        summary["check"] = gate_summary(verdict)


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
           verify: bool, late: LateHeaders, named: Path | None = None) -> None:
    # The source digest the writer hashes while it streams is still running: the read-back starts on the other
    # core and takes both once the digest is done; the digest goes into the header after it (read back there).
    if record.readable:
        summary["read_back"], written = read_back(expected, output, record, named=named, second_thread_after=late.wait)
    else:
        summary["read_back"], written = {"status": "not readable"}, expected
    late.finish()
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
            if str(staged_path) not in str(exc):
                raise
            if isinstance(exc, SchemaError):
                raise SchemaError(renamed(exc.where), exc.problems) from None
            try:
                replacement = type(exc)(renamed(str(exc)))
            except TypeError:
                raise exc from None
            raise replacement from None


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


__all__ = ["GATE_REFUSALS", "GateOptions", "gate_announcement", "named_as", "save"]
