"""LiteRT (TensorFlow Lite) export (write-only): one ``.tflite`` flatbuffer, made from the Keras reference by
``tf.lite.TFLiteConverter`` with builtin operators only, so plain ``ai_edge_litert`` (or ``tf.lite``) runs it
without this package, TensorFlow's Flex delegate or custom ops.

Signature ``serving_default``: input ``pixel_values`` float32 NCHW ``[batch, 3, S, S]`` (S the checkpoint's
input size; batch dynamic: the signature runner resizes it), output ``logits`` ``[batch, num_classes]``
(``pooled`` for a headless checkpoint). The graph transposes to NHWC itself, like the SavedModel export.

Metadata: the flatbuffer's own place for it, a ``Model.metadata`` entry named ``convnextv2`` whose buffer holds
UTF-8 JSON: the canonical metadata (config, preprocessing, source, ...; each value the JSON text a canonical
safetensors file carries) and how the file was exported. docs/deploy.md shows how to read it with the schema
module ai-edge-litert ships.

``fp16=True`` stores the weights as float16 (half the file); LiteRT's CPU kernels dequantize them at load and
compute in float32, so only the weight rounding is reduced precision.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import mmap
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Format, always
from convnextv2.converters.format_limits import Change, dropped_extras
from convnextv2.reference.errors import BadInputError, CheckFailedError, MissingDependencyError
from convnextv2.reference.features import final_feature

NAME = "litert"

SUFFIX = ".tflite"
SIGNATURE = "serving_default"
INPUT_NAME = "pixel_values"
METADATA_NAME = "convnextv2"
_IDENTIFIER = b"TFL3"
# Weights past this size are stored after the flatbuffer (which cannot pass 2 GB), not inside it.
BUFFER_OFFSET_BYTES = 1_800_000_000


def why_unavailable() -> str | None:
    if importlib.util.find_spec("tensorflow") is None:
        return "the LiteRT export converts the Keras reference: pip install 'convnextv2-toolkit[tf,litert]'"
    return None


def interpreter_name() -> str:
    """The LiteRT interpreter this install runs: ai-edge-litert when installed, else TensorFlow's tf.lite."""
    if importlib.util.find_spec("ai_edge_litert") is not None:
        return "ai_edge_litert"
    if importlib.util.find_spec("tensorflow") is not None:
        return "tf.lite"
    raise MissingDependencyError("running a .tflite file needs ai-edge-litert (or TensorFlow): pip install "
                                 "'convnextv2-toolkit[litert]'")


def sniff(path: Path) -> bool:
    # Recognised so that `inspect`/`convert` on a .tflite say why it cannot be read, instead of "unknown format".
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(8)[4:8] == _IDENTIFIER


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    # variant is every reader's option; declared so the refusal below is what a caller passing it sees.
    raise BadInputError(
        f"{path}: reading LiteRT (.tflite) files is not supported (a .tflite file is a compiled graph: its "
        "buffers carry no ConvNeXt V2 names to map back). Convert from the checkpoint it was exported from")


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    return dropped_extras(ckpt, "a LiteRT model")


def write(ckpt: Checkpoint, path: Path, *, features: bool = False, fp16: bool = False, size: int | None = None) -> None:
    """The ``.tflite`` for ``ckpt`` at ``path``, converted at image size ``size`` (default: the checkpoint's
    input size); written, not checked: converters.save runs it in LiteRT against the float64 referee (float32
    rule; float16 rule with ``fp16``) before it publishes it. ``features`` adds the ``stem``, ``stage1``..``stage4``
    and ``pooled`` outputs (the parity harness compares them)."""
    write_with(ckpt, path, None, features=features, fp16=fp16, size=size)


def write_with(ckpt: Checkpoint, path: Path, cache: Any, *, features: bool = False, fp16: bool = False,
               size: int | None = None) -> str:
    """:func:`write`, through the architecture's template in ``cache`` when it has one (converters/templates.py);
    returns how the file was built."""
    reason = why_unavailable()
    if reason:
        raise MissingDependencyError(reason)
    ckpt.validate(f"exporting {path}")
    size = int(size or ckpt.preprocessing.input_size)
    how, flatbuffer = "built", None
    if cache is not None:
        from convnextv2.converters import templates

        why = "float16 weights (65,536 values cannot give every weight its own probe value)" if fp16 else None
        if why is None:
            files = templates.substituted(
                cache, "litert", ckpt, {"features": features, "size": size},
                lambda probe, folder: (folder / "model.tflite").write_bytes(convert(probe, size, features=features)),
                template_located)
            if isinstance(files, str):
                why = files
            else:
                flatbuffer, how = bytes(files["model.tflite"]), templates.TEMPLATE
        if why is not None:
            how = templates.afresh(why)
    if flatbuffer is None:
        flatbuffer = convert(ckpt, size, features=features, fp16=fp16)
    head, weights_after = with_metadata(flatbuffer, _metadata(ckpt, features, fp16, size))
    del flatbuffer
    with open(path, "wb") as out:
        out.write(head)
        out.write(weights_after)
    del head, weights_after
    gc.collect()
    return how


def convert(ckpt: Checkpoint, size: int, *, features: bool = False, fp16: bool = False) -> bytes:
    """The flatbuffer, through a SavedModel of the Keras reference (the converter freezes its variables)."""
    from convnextv2.reference.keras_model import SPATIAL_FEATURES, build_keras, feature_model, keras, tf

    model = build_keras(ckpt.config, ckpt.model_tensors(), dtype="float32")
    final = final_feature(ckpt.config)
    outputs = feature_model(model) if features else model

    def serve(pixel_values: Any) -> dict[str, Any]:
        result = outputs(tf.transpose(pixel_values, (0, 2, 3, 1)), training=False)
        if not features:
            return {final: result}
        return {name: tf.transpose(value, (0, 3, 1, 2)) if name in SPATIAL_FEATURES else value
                for name, value in result.items()}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve,
                         input_signature=[tf.TensorSpec((None, 3, size, size), tf.float32, name=INPUT_NAME)])
    with tempfile.TemporaryDirectory(prefix="convnextv2-litert-") as tmp:
        archive.write_out(tmp, verbose=False)
        del archive
        gc.collect()
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
        # Builtins only: a graph that needed TensorFlow ops (Flex) would convert but not run in plain LiteRT.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if fp16:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        if ckpt.parameter_count * (2 if fp16 else 4) > BUFFER_OFFSET_BYTES:
            # A flatbuffer stops at 2 GB. TensorFlow 2.21's (private) switch stores the weights after it, each
            # buffer holding its offset in the file; LiteRT runs such files.
            converter._experimental_use_buffer_offset = True
        try:
            return bytes(converter.convert())
        except Exception as exc:  # the converter raises its own ConverterError with MLIR diagnostics
            raise CheckFailedError("TFLiteConverter cannot convert the Keras reference to builtin ops: "
                                   + converter_error(str(exc))) from exc


def converter_error(text: str) -> str:
    """The converter's first diagnostic without its MLIR location (``error: loc(...): 'tf.MatMul' op is
    neither a custom op nor a flex op`` -> the part after the location)."""
    lines = [line for line in text.splitlines() if "error:" in line] or [text.strip().splitlines()[0] if text.strip() else text]
    message = lines[0].split("error:", 1)[-1].strip()
    if message.startswith("loc("):
        depth = 0
        for index, char in enumerate(message):
            depth += char == "("
            depth -= char == ")"
            if depth == 0 and char == ")":
                message = message[index + 1:].lstrip(": ").strip()
                break
    return message


def _metadata(ckpt: Checkpoint, features: bool, fp16: bool, size: int) -> bytes:
    meta: dict[str, Any] = {k: v for k, v in ckpt.metadata().items() if k != "format"}
    meta["export"] = json.dumps({"from": "keras", "features": features, "weights": "float16" if fp16 else "float32",
                                 "input": INPUT_NAME, "layout": "NCHW", "image_size": size,
                                 "signature": SIGNATURE}, sort_keys=True, separators=(",", ":"))
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _schema() -> Any:
    # The TFLite flatbuffer schema, generated for Python; both packages ship the same one.
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def weight_ranges(data: bytes) -> list[tuple[str, int, int]]:
    """Every FLOAT32 tensor's buffer in a .tflite flatbuffer (file, byte offset, bytes): where a template's
    weights are (converters/templates.py)."""
    schema = _schema()
    model = schema.Model.GetRootAs(data, 0)
    indices = set()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            if tensor.Type() == schema.TensorType.FLOAT32 and tensor.Buffer() > 0:
                indices.add(tensor.Buffer())
    ranges: list[tuple[str, int, int]] = []
    for index in sorted(indices):
        buffer = model.Buffers(index)
        if buffer.Offset() > 1:
            ranges.append(("model.tflite", int(buffer.Offset()), int(buffer.Size())))
        elif buffer.DataLength():
            ranges.append(("model.tflite", buffer._tab.Vector(buffer._tab.Offset(4)), buffer.DataLength()))
    return ranges


def template_located(folder: Path) -> tuple[dict[str, bytes], list[tuple[str, int, int]]]:
    data = (folder / "model.tflite").read_bytes()
    return {"model.tflite": data}, weight_ranges(data)


def _data_start(model: Any) -> int | None:
    """Where the weights begin in a file whose buffers are stored after the flatbuffer (see BUFFER_OFFSET_BYTES),
    or None when every buffer is inside it."""
    offsets = [model.Buffers(i).Offset() for i in range(model.BuffersLength())]
    stored_after = [o for o in offsets if o > 1]  # 0 and 1 are the schema's "no offset" values
    return min(stored_after) if stored_after else None


def with_metadata(flatbuffer: bytes, payload: bytes) -> tuple[bytes, memoryview]:
    """``flatbuffer`` with a ``convnextv2`` metadata entry holding ``payload`` (replacing an earlier one), as the
    file's two parts: the flatbuffer, and the weights stored after it (empty when they are inside it)."""
    import flatbuffers

    schema = _schema()
    start = _data_start(schema.Model.GetRootAs(flatbuffer, 0))
    # Only the flatbuffer itself is repacked; weights stored after it stay where they are in memory.
    head = memoryview(flatbuffer)[:start] if start is not None else memoryview(flatbuffer)
    model = schema.ModelT.InitFromPackedBuf(bytearray(head), 0)
    model.metadata = [m for m in (model.metadata or []) if _text(m.name) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    old_offsets = [b.offset for b in model.buffers]

    def pack(shift: int) -> bytes:
        for held, old in zip(model.buffers, old_offsets, strict=True):
            if old > 1:
                held.offset = old + shift
        builder = flatbuffers.Builder(len(head) + len(payload) + 4096)
        builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
        return bytes(builder.Output())

    if start is None:
        return pack(0), memoryview(b"")
    # The offsets count from the start of the file, so the weights move by the flatbuffer's growth, rounded
    # up to 64 bytes to keep every buffer's alignment; the offsets' own size does not depend on their values.
    shift = -(-(len(pack(0)) - start) // 64) * 64
    packed = pack(shift)
    if len(packed) > start + shift:
        raise AssertionError("the repacked flatbuffer overlaps the weights stored after it")
    return packed + b"\0" * (start + shift - len(packed)), memoryview(flatbuffer)[start:]


def read_metadata(path_or_bytes: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """The ``convnextv2`` metadata of a .tflite file (what docs/deploy.md shows a user doing by hand)."""
    if isinstance(path_or_bytes, bytes):
        return _metadata_entry(path_or_bytes)
    # Mapped, not read: past 2 GB the weights follow the flatbuffer in the same file.
    with open(path_or_bytes, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _metadata_entry(data)


def _metadata_entry(data: Any) -> dict[str, Any]:
    model = _schema().Model.GetRootAs(data, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if _text(entry.Name()) == METADATA_NAME:
            return dict(json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8")))
    raise BadInputError(f"no {METADATA_NAME!r} metadata in this .tflite file")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value or "")


# ------------------------------------------------------------------ running

def interpreter(path_or_bytes: str | os.PathLike[str] | bytes, threads: int | None = None) -> Any:
    """A LiteRT interpreter on the file (ai-edge-litert when installed, else tf.lite)."""
    if interpreter_name() == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter
    else:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    source = ({"model_content": path_or_bytes} if isinstance(path_or_bytes, bytes)
              else {"model_path": str(path_or_bytes)})
    return Interpreter(**source, num_threads=threads)


def run(interp: Any, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
    runner = interp.get_signature_runner(SIGNATURE)
    outputs = runner(**{INPUT_NAME: np.ascontiguousarray(images_nchw, dtype=np.float32)})
    return {name: np.array(value, dtype=np.float32, copy=True) for name, value in outputs.items()}


# One file that the runtime checking it opens by content: conversions build it unnamed. read() exists only to
# refuse with a reason; the command line does not offer --from litert.
FORMAT = Format(NAME, sniff, read, write, readable=False, unnamed_build=always, unrepresentable=unrepresentable,
                runner="litert", gated=True)
