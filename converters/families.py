"""Which model family and naming a state dict is closest to, for a refusal that helps, and the form a readable
checkpoint was found in, for ``inspect``.

A reader knows only its own naming. When its keys do not fit, it raises ``UnplacedKeysError`` with every key
and shape; ``explain`` then asks every naming in the registry (``Format.naming``: anchors and key tables) how
many of the file's keys it places, wherever its anchor says the model sits, and answers in one line:

- ConvNeXt V1 (a layer scale in every block, no GRN) is named as such, with the key that tells it apart: a V1
  file is not a malformed V2 one, and a user holding one needs to hear that rather than a list of keys;
- a V2 file with a few stray keys in the naming it was read as keeps its reader's message;
- anything else gets the closest naming, how much of the file it places, and its first unplaced keys.

Nothing here names a format: a format added to the registry with a ``naming`` is asked like the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convnextv2.converters import formats
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Naming
from convnextv2.converters.safetensors_io import sniff_header
from convnextv2.converters.wrapped import candidate_prefixes, wrapper_parent
from convnextv2.reference.errors import BadInputError, UnplacedKeysError

FAMILY = "ConvNeXt V2"
# How many keys a refusal lists: enough to recognise the file, short enough to read on one line.
SHOWN = 5
# How many of the prefixes a naming's anchor appears under are tried (shortest first): a file planting the anchor
# under thousands of prefixes must not make a refusal quadratic.
TRIED_PREFIXES = 8
# A key longer than this is cut in a message.
KEY_CHARS = 120


@dataclasses.dataclass(frozen=True)
class Fit:
    """How one naming fits a state dict: under which prefix, and which keys it places (file order).
    ``anchored``: whether the naming's anchor key is there (under ``prefix``)."""

    naming: str
    prefix: str
    placed: tuple[str, ...]
    unplaced: tuple[str, ...]
    anchored: bool


def namings() -> dict[str, Naming]:
    """Every registered format that names a state dict's tensors, in the registry's order."""
    found: dict[str, Naming] = {}
    for name in formats.available_formats():
        naming = formats.get(name).naming
        if naming is not None:
            found[name] = naming
    return found


def _places(naming: Naming, key: str) -> bool:
    return any(table.to_canonical(key) is not None for table in naming.tables)


def fit(keys: Sequence[str], name: str, naming: Naming) -> Fit:
    """The best fit of one naming: tried at every prefix its anchors appear under, and with none."""
    best: Fit | None = None
    anchored = candidate_prefixes(keys, naming.anchors)[:TRIED_PREFIXES]
    for prefix in [*anchored, ""]:
        # Parts of a model may sit beside its wrapper (a classifier's head.fc beside backbone.): a key is
        # also placed by the name it has under the wrapper's parent, as wrapped.unwrap's keep_outside reads it.
        parent = wrapper_parent(prefix)
        placed: list[str] = []
        unplaced: list[str] = []
        for key in keys:
            inside = (key.startswith(prefix) and _places(naming, key[len(prefix):])) or \
                (key.startswith(parent) and _places(naming, key[len(parent):]))
            (placed if inside else unplaced).append(key)
        if best is None or len(placed) > len(best.placed):
            best = Fit(name, prefix, tuple(placed), tuple(unplaced), prefix in anchored)
    assert best is not None
    return best


def closest(keys: Sequence[str]) -> Fit | None:
    """The naming that places the most of ``keys``, a naming whose anchor is there first (a classifier's
    ``head.fc`` alone says little); the registry's order breaks ties. None when no naming places any key."""
    fits = [fit(keys, name, naming) for name, naming in namings().items()]
    best = max(fits, key=lambda f: (f.anchored, len(f.placed)), default=None)
    return best if best is not None and best.placed else None


# ------------------------------------------------------------ ConvNeXt V1

def _is_grn(key: str) -> bool:
    return ".grn." in f".{key}."


def layer_scale_key(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first per-block layer scale: a block's own 1-D parameter of C values beside its depthwise conv
    (C, 1, k, k). Told by shape and place, not by name, so every naming's (gamma, layer_scale_parameter) is seen;
    V2 blocks have no parameter of their own (GRN's gamma sits in its own module)."""
    channels: dict[str, int] = {}
    for key, shape in shapes.items():
        if len(shape) == 4 and shape[1] == 1 and shape[2] > 1 and key.count(".") >= 2:
            channels[key.rsplit(".", 2)[0]] = shape[0]
    for key, shape in shapes.items():
        block, _, own = key.rpartition(".")
        if len(shape) == 1 and own not in ("weight", "bias") and channels.get(block) == shape[0]:
            return key
    return None


def v1_evidence(shapes: Mapping[str, tuple[int, ...]], best: Fit | None) -> str | None:
    """What shows a state dict is ConvNeXt V1, or None: GRN is in every V2 block, so a ConvNeXt without any GRN
    is V1, told by its layer scale, or (a V1 built without one) by a naming placing every key but finding no GRN."""
    if any(_is_grn(key) for key in shapes):
        return None
    scale = layer_scale_key(shapes)
    if scale is not None:
        return f"per-block layer scale {_key_text(scale)!r}, no GRN"
    if best is not None and best.anchored and not best.unplaced:
        return "no layer scale and no GRN in any block"
    return None


# ------------------------------------------------------------ the refusal

def _key_text(key: str) -> str:
    # One line whatever the file names its tensors: unprintable names quoted, long ones cut.
    text = key if key.isprintable() else repr(key)
    return text if len(text) <= KEY_CHARS else text[:KEY_CHARS] + "..."


def _shown(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    listed = ", ".join(f"{_key_text(key)} {list(shapes.get(key, ()))}" for key in keys[:SHOWN])
    return listed + (f" (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def explain(error: UnplacedKeysError) -> BadInputError:
    """One line for a state dict its reader could not place: ConvNeXt V1 named as such, a V2 file's few stray
    keys as its reader said them, otherwise the closest naming and the first keys it leaves unplaced."""
    shapes = {str(k): tuple(int(d) for d in v) for k, v in error.keys.items()}
    keys = list(shapes)
    best = closest(keys)
    evidence = v1_evidence(shapes, best)
    if evidence is not None:
        naming = f"{best.naming} naming: " if best is not None and best.anchored else ""
        return BadInputError(f"{error.where}: this is a ConvNeXt V1 checkpoint ({naming}{evidence}); "
                             f"this toolkit reads ConvNeXt V2 only")
    if best is None:
        return BadInputError(f"{error.where}: no ConvNeXt keys in any naming this toolkit reads "
                             f"({', '.join(namings())}); first keys: {_shown(keys, shapes)}")
    if best.naming == error.naming and len(error.unplaced) <= SHOWN and str(error).isprintable():
        # A V2 file with a couple of stray keys: its reader's message already names them, and its layout.
        return BadInputError(str(error))
    return BadInputError(f"{error.where}: not a ConvNeXt V2 checkpoint in any naming this toolkit reads; closest: "
                         f"{best.naming} ({len(best.placed)} of {len(keys)} tensors placed); first unplaced: "
                         f"{_shown(best.unplaced, shapes)}")


def explain_unclaimed(path: Path, error: BadInputError) -> BadInputError:
    """A file no format claims: where its tensor names and shapes can be read without loading anything (a
    safetensors header), the answer ``explain`` gives a state dict no reader placed; otherwise ``error``."""
    found = sniff_header(path)
    if found is None:
        return error
    shapes = {str(k): tuple(v["shape"]) for k, v in sorted(found[0].items())
              if k != "__metadata__" and isinstance(v, Mapping) and isinstance(v.get("shape"), list)}
    if not shapes:
        return error
    return explain(UnplacedKeysError(str(path), "", shapes, list(shapes), str(error)))


# ------------------------------------------------------------ what inspect says of a readable checkpoint

def form(ckpt: Checkpoint) -> dict[str, Any]:
    """The form a checkpoint was read in: its family, its naming (the file's format, where that format names a
    state dict's tensors), the wrapper prefix it sat under and what was left outside it, and the entries
    skipped beside the weights. The last three are the source's (``Source.layout``, ``info``): of the file
    itself where it is its own source, of what it was converted from otherwise."""
    file_format = ckpt.file.format if ckpt.file is not None else ckpt.source.format
    naming = file_format if file_format in formats.available_formats() and \
        formats.get(file_format).naming is not None else None
    layout = ckpt.source.layout
    return {
        "family": FAMILY,
        "naming": naming,
        "prefix": layout.get("prefix"),
        "left_behind": dict(layout.get("left_behind") or {}),
        "skipped": dict(ckpt.info.get("skipped") or {}),
    }


__all__ = ["FAMILY", "Fit", "closest", "explain", "explain_unclaimed", "fit", "form", "layer_scale_key", "namings",
           "v1_evidence"]
