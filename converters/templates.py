"""Export templates: each runtime's export built once per ARCHITECTURE, a checkpoint's weights put in afterwards.

An export's structure (the ONNX graph, the OpenVINO IR, the LiteRT flatbuffer, the ExecuTorch program with its
XNNPACK delegate) depends on the config, the input size, the precision, the export options, the toolkit and the
frameworks, never on the weights' values. So a template is built from the probe checkpoint of that architecture
(converters/weight_map.py: every weight element a distinct value) and kept in the cache (converters/entry_cache.py,
under kind ``template-<runtime>``, keyed by exactly those and never by the weights), with the map of where it
stores each weight. A checkpoint's export is then the template's bytes with its weights written through the map,
proven before use (every stored weight read back equals the checkpoint's, bit for bit, under its layout) and then
judged by the parity rule like any other export.

Where a runtime cannot take new weights exactly (float16 weights: 65,536 values cannot tell the elements apart; a
stored constant computed from several weights; no persistent cache to keep a template in), :func:`substituted`
returns the reason and the caller builds afresh, saying so (``built afresh: <why>``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from convnextv2.converters import cache_integrity
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.weight_map import MAP_FILE, NotSubstitutable, WeightMap, establish, probe_checkpoint, prove
from convnextv2.converters.weight_map import substitute as write_weights

REASON_FILE = "afresh.txt"
TEMPLATE = "template + weights"
Ranges = list[tuple[str, int, int]]


def afresh(reason: str) -> str:
    return f"built afresh: {reason}"


def architecture(ckpt: Checkpoint) -> dict[str, Any]:
    """What an export's structure is made from, of the checkpoint: its config and preprocessing (never weights)."""
    return {"config": ckpt.config.to_json_dict(), "preprocessing": ckpt.preprocessing.to_json_dict()}


def substituted(cache: Any, kind: str, ckpt: Checkpoint, options: Mapping[str, Any],
                build: Callable[[Checkpoint, Path], None], locate: Callable[[Path], tuple[dict[str, bytes], Ranges]]
                ) -> dict[str, bytearray] | str:
    """The files of ``kind``'s template for ``ckpt``'s architecture (``build(probe, folder)`` writes them;
    ``locate(folder)`` finds its float32 constants) with ``ckpt``'s weights written in and proven; or the reason
    it must be built afresh. ``cache``: an entry cache (converters/entry_cache.py); templates are kept only in a
    persistent one (``--no-cache`` keeps nothing)."""
    if cache is None or not getattr(cache, "enabled", False) or not getattr(cache, "persistent", False):
        return "no persistent cache to keep a template in"

    def make(folder: Path) -> None:
        probe = probe_checkpoint(ckpt)
        build(probe, folder)
        files, ranges = locate(folder)
        try:
            establish(probe, files, ranges).save(folder)
        except NotSubstitutable as exc:
            (folder / REASON_FILE).write_text(str(exc) + "\n", encoding="utf-8")

    parts = {"architecture": architecture(ckpt), **options}
    # Two processes of one run (the matrix's pytest workers, parity's workers) with two checkpoints of one
    # architecture: the second exports its own rather than idle while the first builds the template (a minute
    # for ExecuTorch); the template serves every checkpoint after.
    if cache.being_built(f"template-{kind}", parts):
        return "its template is being built by another process right now"
    with cache.folder(f"template-{kind}", parts, make) as folder:
        if (folder / REASON_FILE).is_file():
            return (folder / REASON_FILE).read_text(encoding="utf-8").strip()
        wmap = WeightMap.load(folder)
        skip = {MAP_FILE, cache_integrity.RECORD}
        files = {p.name: bytearray(p.read_bytes()) for p in sorted(folder.iterdir()) if p.name not in skip}
    write_weights(files, wmap, ckpt)
    prove(files, wmap, ckpt, f"{kind} export of {ckpt.config.variant} from its template")
    return files


# ------------------------------------------------------------------------------------- where each format's weights are


def onnx_ranges(data: bytes) -> Ranges:
    """Every float32 initializer's raw bytes in a serialized graph (found by content: each probe tensor's bytes are
    unique in the file)."""
    import onnx

    proto = onnx.ModelProto.FromString(data)
    ranges: Ranges = []
    position = 0
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.raw_data) < 8:
            continue
        raw = bytes(init.raw_data)
        # Serialized in order: each search starts where the last one ended, so the file is scanned once. Its
        # first 64 bytes are probe values found nowhere else; the whole of it is then compared.
        offset = data.find(raw[:64], position)
        if offset < 0 or data[offset:offset + len(raw)] != raw:
            offset = data.find(raw)
        if offset >= 0:
            ranges.append(("model.onnx", offset, len(raw)))
            position = offset + len(raw)
    return ranges


def openvino_ranges(xml: bytes) -> Ranges:
    """Every f32 Const of an IR: its place in the .bin."""
    import xml.etree.ElementTree as ET

    ranges: Ranges = []
    for layer in ET.fromstring(xml).iter("layer"):
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None and data.get("element_type") == "f32":
            ranges.append(("model.bin", int(data.get("offset", 0)), int(data.get("size", 0))))
    return ranges


def executorch_ranges(data: bytes) -> Ranges:
    """The .pte's named data segments (the XNNPACK delegate's weights) and its constant segment (the weights of
    operators left to the portable kernels), from the program's flatbuffer and extended header."""
    from flatbuffers import table

    if data[8:12] != b"eh00":
        return []
    base = struct.unpack_from("<Q", data, 24)[0]
    program = table.Table(bytearray(data[:struct.unpack_from("<Q", data, 16)[0]]), 0)
    program.Pos = struct.unpack_from("<I", program.Bytes, 0)[0]

    def vector(slot: int) -> list[int]:
        o = program.Offset(4 + 2 * slot)
        if not o:
            return []
        start = program.Vector(o)
        return [program.Indirect(start + 4 * i) for i in range(program.VectorLen(o))]

    segments = []
    for pos in vector(4):
        seg = table.Table(program.Bytes, pos)
        segments.append(tuple(struct.unpack_from("<Q", program.Bytes, seg.Pos + seg.Offset(4 + 2 * f))[0]
                              if seg.Offset(4 + 2 * f) else 0 for f in (0, 1)))
    wanted = set()
    for pos in vector(7):  # named_data: (key, segment_index)
        entry = table.Table(program.Bytes, pos)
        o = entry.Offset(6)
        wanted.add(struct.unpack_from("<I", program.Bytes, entry.Pos + o)[0] if o else 0)
    o = program.Offset(14)  # constant_segment
    if o:
        sub = table.Table(program.Bytes, program.Indirect(program.Pos + o))
        so = sub.Offset(4)
        index = struct.unpack_from("<I", program.Bytes, sub.Pos + so)[0] if so else 0
        if index < len(segments):
            wanted.add(index)
    return [("model.pte", base + segments[i][0], segments[i][1] - segments[i][1] % 4)
            for i in sorted(wanted) if i < len(segments)]


def onnx_located(folder: Path) -> tuple[dict[str, bytes], Ranges]:
    data = (folder / "model.onnx").read_bytes()
    return {"model.onnx": data}, onnx_ranges(data)


def openvino_located(folder: Path) -> tuple[dict[str, bytes], Ranges]:
    return {"model.bin": (folder / "model.bin").read_bytes()}, openvino_ranges((folder / "model.xml").read_bytes())


def executorch_located(folder: Path) -> tuple[dict[str, bytes], Ranges]:
    data = (folder / "model.pte").read_bytes()
    return {"model.pte": data}, executorch_ranges(data)
