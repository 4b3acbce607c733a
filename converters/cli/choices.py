"""The names the commands offer as choices, taken from the format registry (converters/formats.py), the
fixture writer (``fixtures.make.FIXTURE_FORMATS``) and the original reader (``converters.original.LAYOUTS``), so
a format added there appears in every command without a second list to keep in step.

The lists are read the first time a command parses or prints its options: finding out which format module reads
and which writes imports all of them (about a second), which ``convnextv2 variants`` should not pay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import click

from convnextv2.converters import formats


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose names come from ``names()``, called when click first needs them."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names
        super().__init__([])

    @property  # type: ignore[override]
    def choices(self) -> Sequence[Any]:
        return tuple(self._names())

    @choices.setter
    def choices(self, _: Sequence[Any]) -> None:
        # click.Choice.__init__ assigns the list it was given; the registry is the only source here.
        pass


@functools.cache
def _readable() -> dict[str, bool]:
    # Format modules import their framework only inside read/write, so importing them is cheap enough once.
    return {name: formats.readable(name) for name in formats.available_formats()}


def readable_formats() -> list[str]:
    """``auto`` (detect by content) and every installed format with a reader, in the registry's order."""
    return ["auto", *(name for name, read in _readable().items() if read)]


def writable_formats() -> list[str]:
    """Every format (each has a writer), in the registry's order."""
    return formats.available_formats()


def fixture_formats() -> list[str]:
    from convnextv2.fixtures.make import FIXTURE_FORMATS

    return list(FIXTURE_FORMATS)


def original_layouts() -> list[str]:
    from convnextv2.converters.original import LAYOUTS

    return list(LAYOUTS)


FROM = RegistryChoice(readable_formats)
TO = RegistryChoice(writable_formats)
FIXTURE = RegistryChoice(fixture_formats)
ORIGINAL_LAYOUT = RegistryChoice(original_layouts)


def prefix_option(command: Any) -> Any:
    """--prefix: where the model sits in a bigger model's state dict."""
    return click.option(
        "--prefix", default=None, metavar="PREFIX",
        help="Where the ConvNeXt V2 sits in a bigger model's state dict (backbone., visual.trunk., module.), "
             "when the file holds several (default: found by its keys).")(command)


def read_options(ema: bool = False, revision: str | None = None, prefix: str | None = None) -> dict[str, Any]:
    """The reader options a command was given, and only those: a format whose reader does not declare one then
    refuses it by name instead of ignoring it."""
    given: dict[str, Any] = {"ema": True} if ema else {}
    if revision is not None:
        given["revision"] = revision
    if prefix is not None:
        given["prefix"] = prefix
    return given


def say_notes(ckpt: Any) -> None:
    """What reading the source left out (converters.load's ``Checkpoint.notes``), on stderr: never silently."""
    for note in ckpt.notes:
        click.echo(f"note: {note}", err=True)
