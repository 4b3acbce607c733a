"""The record every checkpoint format registers: what it can do, as data (converters/formats.py lists them).

A format module builds its :class:`Format` once, at its bottom (``FORMAT = Format(...)``). Nothing probes a
module for optional attributes: what the record does not say, the defaults below say.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.reference.keymap import KeyTable

if TYPE_CHECKING:  # annotations only: format_limits builds the Change objects, this module only names them
    from convnextv2.converters.format_limits import Change


def no_companions(path: Path) -> tuple[str, ...]:
    return ()


def never(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> bool:
    return False


def always(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> bool:
    return True


def carries_everything(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    return []


def size_unknown(ckpt: Checkpoint, options: Mapping[str, Any]) -> int | None:
    return None


def tensor_bytes(ckpt: Checkpoint, options: Mapping[str, Any]) -> int:
    """The bytes of the checkpoint's tensors: the size of a file that stores them as they are."""
    return sum(int(a.size) * a.dtype.itemsize for _, a in ckpt.ordered_tensors())


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a format names a state dict's tensors, for finding a model inside a wrapper and for telling a user
    which naming an unreadable file is closest to (converters/wrapped.py, converters/families.py).

    ``anchors``: keys every state dict of this naming has (the first block's depthwise weight), by which a
    wrapper's prefix is found; ``tables``: the format's key tables, each layout it reads."""

    anchors: tuple[str, ...]
    tables: tuple[KeyTable, ...]


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint format.

    ``sniff(path)`` claims a file by content; ``read(path, *, options)`` and ``write(ckpt, path, *, options)``
    declare their options as keyword-only parameters. A write-only format (``readable=False``) keeps ``read``
    only to refuse with its reason. ``companions(dest)``: the bare names of the files the format may put
    beside its main file (ONNX ``.data``, IR ``.bin``, timm's sidecar JSON); they are published with it and,
    when replaced by an output without them, removed. ``unnamed_build``: whether the output is one file that
    its writer, its reader and the runtime that checks it open without its name, so it is built and checked in
    an unnamed file. ``unrepresentable``: every change the format forces on a checkpoint (format_limits).
    ``read_as(path, name)``: a reader whose result depends on the file's name, for a file read before it has
    it. ``runner``: the runner that runs a file of this format. ``gated``: the written file is an export whose
    function is proven by running it before it is published (converters.save runs the gate).

    A writer only writes: it fills the path (or folder) it is given, as safetensors' ``save_file`` does, and
    neither checks the destination nor publishes (converters.save does both). ``write_as(ckpt, target, dest,
    *, options)``: a writer that must know the name and place its output will be published as while it fills
    an unnamed ``target`` (a torch zip's archive name, a progress label, a scratch file on the destination's
    filesystem); ``write(ckpt, path)`` is then ``write_as(ckpt, path, path)``. ``output_bytes(ckpt, options)``:
    the output's size where it is known before writing, for the free-space check. ``naming``: how a format
    that stores a state dict names its tensors (None for graphs and archives).
    """

    name: str
    sniff: Callable[[Path], bool]
    read: Callable[..., Checkpoint]
    write: Callable[..., None]
    readable: bool = True
    companions: Callable[[Path], tuple[str, ...]] = no_companions
    unnamed_build: Callable[[Checkpoint, Path, Mapping[str, Any]], bool] = never
    unrepresentable: Callable[[Checkpoint, Path, Mapping[str, Any]], list[Change]] = carries_everything
    read_as: Callable[[Path, str], Checkpoint] | None = None
    runner: str | None = None
    gated: bool = False
    write_as: Callable[..., None] | None = None
    output_bytes: Callable[[Checkpoint, Mapping[str, Any]], int | None] = size_unknown
    naming: Naming | None = None


__all__ = ["Format", "Naming", "always", "carries_everything", "never", "no_companions", "size_unknown", "tensor_bytes"]
