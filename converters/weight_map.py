"""Where an export stores each weight, found once per architecture, so that a second checkpoint's weights can be put
into an export built for the first (converters/templates.py), and proven to be there.

The map is established on a template built from a *probe* checkpoint: every canonical tensor element gets its own
float32 value (bit patterns counting up from 4096.0, so no two elements share one and none is a value a graph uses
for itself: 0.5, 1, eps, a shape). Each float32 word the export stores is then either a probe value, and so names
exactly one canonical element, or the export's own constant. A stored word in the probes' range that is not a
probe is a function of the weights (a folded product, a sum), which no substitution can reproduce: that template
is refused with the reason, and its runtime builds afresh. So is a template in which some canonical tensor is not
stored as a copy at all.

Each run of consecutive stored words that copies one tensor is a *constant* of the map: its place (file, byte
offset, word count), its tensor and the indices it takes from it, named as a layout (``as stored``, ``transposed
(2, 3, 1, 0)``, ``permuted``). :func:`substitute` writes a checkpoint's float32 weights through the map;
:func:`prove` reads the words back from the bytes and compares them with the checkpoint's under each constant's
layout, bit for bit, and names the first constant, tensor and element that differ.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Source
from convnextv2.reference import schema
from convnextv2.reference.errors import CheckFailedError

# 4096.0: probe values count up from here (2**31 - this leaves room for 980 M elements, beyond huge).
PROBE_BASE = 0x45800000
_ABS = np.uint32(0x7FFFFFFF)
_EXPONENT = np.uint32(0x7F800000)
MAP_FILE = "weight_map.npz"


class NotSubstitutable(Exception):
    """Why an export cannot take new weights by substitution (its runtime builds afresh)."""


def probe_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt``'s architecture (config, preprocessing) with every model tensor element a distinct float32."""
    shapes = schema.expected_shapes(ckpt.config)
    tensors: dict[str, np.ndarray] = {}
    start = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        words = np.arange(PROBE_BASE + start, PROBE_BASE + start + size, dtype=np.uint32)
        tensors[name] = words.view(np.float32).reshape(shape)
        start += size
    return Checkpoint(config=ckpt.config, tensors=tensors, preprocessing=ckpt.preprocessing,
                      source=Source(format="memory"))


def _tensor_table(ckpt: Checkpoint) -> tuple[list[str], list[tuple[int, ...]], np.ndarray]:
    shapes = schema.expected_shapes(ckpt.config)
    names = list(shapes)
    sizes = [int(np.prod(shapes[n])) for n in names]
    return names, [tuple(shapes[n]) for n in names], np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def flat_words(ckpt: Checkpoint) -> np.ndarray:
    """Every model tensor as float32 (the export's dtype; widening bf16/fp16 is exact), concatenated, as words."""
    return np.concatenate([np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
                           for v in ckpt.model_tensors().values()]).view(np.uint32)


@dataclasses.dataclass
class WeightMap:
    files: list[str]
    tensors: list[str]
    shapes: list[tuple[int, ...]]
    starts: np.ndarray  # each tensor's first element in the flat order (and the total, last)
    file_of: np.ndarray  # per constant: index into files
    offset: np.ndarray  # per constant: byte offset in its file
    count: np.ndarray  # per constant: words
    tensor_of: np.ndarray  # per constant: index into tensors
    layouts: list[str]  # per constant
    index: np.ndarray  # every constant's flat (global) element indices, concatenated

    def save(self, folder: Path) -> None:
        np.savez(folder / MAP_FILE, files=np.array(self.files), tensors=np.array(self.tensors),
                 shapes=np.array([",".join(map(str, s)) for s in self.shapes]), starts=self.starts,
                 file_of=self.file_of, offset=self.offset, count=self.count, tensor_of=self.tensor_of,
                 layouts=np.array(self.layouts), index=self.index)

    @classmethod
    def load(cls, folder: Path) -> WeightMap:
        with np.load(folder / MAP_FILE) as data:
            return cls(files=[str(f) for f in data["files"]], tensors=[str(t) for t in data["tensors"]],
                       shapes=[tuple(int(x) for x in s.split(",") if x) for s in data["shapes"]],
                       starts=data["starts"], file_of=data["file_of"], offset=data["offset"],
                       count=data["count"], tensor_of=data["tensor_of"],
                       layouts=[str(x) for x in data["layouts"]], index=data["index"])

    def describe(self, k: int) -> str:
        return (f"{self.files[int(self.file_of[k])]} at byte {int(self.offset[k])} holds "
                f"{self.tensors[int(self.tensor_of[k])]} {self.layouts[k]}")


def _layout(local: np.ndarray, shape: tuple[int, ...]) -> str:
    size = int(np.prod(shape))
    if len(local) != size:
        return f"(elements {int(local.min())}..{int(local.max())} of {size})"
    if np.array_equal(local, np.arange(size)):
        return "as stored"
    grid = np.arange(size).reshape(shape)
    for perm in itertools.permutations(range(len(shape))):
        if np.array_equal(grid.transpose(perm).reshape(-1), local):
            return f"transposed {perm}"
    return "permuted"


def establish(probe: Checkpoint, files: Mapping[str, bytes | bytearray | memoryview],
              ranges: Sequence[tuple[str, int, int]]) -> WeightMap:
    """The map of a template built from ``probe``: ``ranges`` are the (file, byte offset, bytes) of every float32
    constant the export stores. NotSubstitutable when a stored constant is a function of the weights or a tensor
    is not stored as a copy."""
    names, shapes, starts = _tensor_table(probe)
    total = int(starts[-1])
    order = list(files)
    constants: list[tuple[int, int, int, int, str]] = []
    pieces: list[np.ndarray] = []
    seen = np.zeros(total, dtype=bool)
    for file, offset, nbytes in ranges:
        words = np.frombuffer(files[file], dtype="<u4", count=nbytes // 4, offset=offset)
        shifted = words.astype(np.int64) - PROBE_BASE
        is_probe = (shifted >= 0) & (shifted < total)
        magnitude = words & _ABS
        weightlike = (magnitude >= PROBE_BASE) & ((words & _EXPONENT) != _EXPONENT) & (magnitude != 0x7F7FFFFF)
        derived = weightlike & ~is_probe
        if derived.any():
            raise NotSubstitutable(f"a constant in {file} at byte {offset} is computed from the weights, not a copy "
                                   "of one")
        positions = np.flatnonzero(is_probe)
        if not len(positions):
            continue
        values = shifted[positions]
        tensor = np.searchsorted(starts, values, side="right") - 1
        # Runs: consecutive stored words copying one tensor.
        breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(tensor) != 0)) + 1
        for run_positions, run_values, run_tensor in zip(np.split(positions, breaks), np.split(values, breaks),
                                                         np.split(tensor, breaks), strict=True):
            t = int(run_tensor[0])
            constants.append((order.index(file), offset + 4 * int(run_positions[0]), len(run_positions), t,
                              _layout(run_values - starts[t], shapes[t])))
            pieces.append(run_values)
            seen[run_values] = True
    if not seen.all():
        missing = int(np.searchsorted(starts, int(np.flatnonzero(~seen)[0]), side="right") - 1)
        raise NotSubstitutable(f"{names[missing]} is not stored as a copy (folded into another constant)")
    columns = list(zip(*constants, strict=True))
    return WeightMap(files=order, tensors=names, shapes=shapes, starts=starts,
                     file_of=np.array(columns[0], dtype=np.int64), offset=np.array(columns[1], dtype=np.int64),
                     count=np.array(columns[2], dtype=np.int64), tensor_of=np.array(columns[3], dtype=np.int64),
                     layouts=list(columns[4]),
                     index=np.concatenate(pieces).astype(np.int32 if total < 2**31 else np.int64))


def _check_architecture(wmap: WeightMap, ckpt: Checkpoint) -> None:
    names, shapes, _ = _tensor_table(ckpt)
    if names != wmap.tensors or shapes != wmap.shapes:
        raise CheckFailedError("the export template's weight map is for another architecture")


def substitute(files: Mapping[str, bytearray], wmap: WeightMap, ckpt: Checkpoint,
               words: np.ndarray | None = None) -> None:
    """Write ``ckpt``'s weights into the template's bytes (``files``, changed in place) through the map."""
    _check_architecture(wmap, ckpt)
    gathered = (flat_words(ckpt) if words is None else words)[wmap.index]
    ends = np.cumsum(wmap.count)
    for k in range(len(wmap.count)):
        start, offset = int(ends[k] - wmap.count[k]), int(wmap.offset[k])
        view = memoryview(files[wmap.files[int(wmap.file_of[k])]])
        view[offset:offset + 4 * int(wmap.count[k])] = gathered[start:int(ends[k])].tobytes()


def prove(files: Mapping[str, bytes | bytearray | memoryview], wmap: WeightMap, ckpt: Checkpoint,
          where: str) -> None:
    """Every constant of the map read back from ``files`` equals ``ckpt``'s tensor under the constant's layout, bit
    for bit; else CheckFailedError naming the constant, the tensor and the first element that differs."""
    _check_architecture(wmap, ckpt)
    expected_all = flat_words(ckpt)[wmap.index]
    ends = np.cumsum(wmap.count)
    for k in range(len(wmap.count)):
        start, end = int(ends[k] - wmap.count[k]), int(ends[k])
        stored = np.frombuffer(files[wmap.files[int(wmap.file_of[k])]], dtype="<u4", count=end - start,
                               offset=int(wmap.offset[k]))
        expected = expected_all[start:end]
        wrong = np.flatnonzero(stored != expected)
        if len(wrong):
            first = int(wrong[0])
            t = int(wmap.tensor_of[k])
            element = np.unravel_index(int(wmap.index[start + first] - wmap.starts[t]), wmap.shapes[t])
            raise CheckFailedError(
                f"{where}: weights substituted wrongly, caught before any runtime ran it: {wmap.describe(k)}, but "
                f"{len(wrong)} of {end - start} elements differ (first: {wmap.tensors[t]}"
                f"[{', '.join(str(int(i)) for i in element)}] stored "
                f"{float(stored[first:first + 1].view(np.float32)[0])!r}, checkpoint "
                f"{float(expected[first:first + 1].view(np.float32)[0])!r})")
