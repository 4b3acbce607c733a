"""TensorFlow SavedModel export (write-only): a directory that plain ``tf.saved_model.load`` runs without
this package, Keras' custom layers or PyTorch.

Signature ``serving_default``: input ``pixel_values`` float32 NCHW ``[batch, 3, height, width]`` (height and
width any multiple of 32, batch dynamic), the layout every other export of this toolkit takes (ONNX, the
PyTorch reference); output ``logits`` ``[batch, num_classes]``, or ``pooled`` ``[batch, C3]`` for a headless
checkpoint. The graph transposes to NHWC itself, since the Keras reference is NHWC inside.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Format
from convnextv2.converters.format_limits import Change, dropped_extras
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.features import final_feature

NAME = "savedmodel"
SIGNATURE = "serving_default"
INPUT_NAME = "pixel_values"


def output_name(ckpt: Checkpoint) -> str:
    return final_feature(ckpt.config)


def sniff(path: Path) -> bool:
    # Recognised so that `inspect`/`convert` on a SavedModel say why it cannot be read, instead of
    # "unknown format".
    return path.is_dir() and (path / "saved_model.pb").is_file()


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    # variant is every reader's option; declared so the refusal below is what a caller passing it sees.
    raise BadInputError(
        f"{path}: reading TensorFlow SavedModels is not supported (a SavedModel is a traced graph: its "
        "variables carry no ConvNeXt V2 names to map back). Convert from the .keras archive or the canonical "
        "file it was exported from")


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    return dropped_extras(ckpt, "a SavedModel")


def write(ckpt: Checkpoint, path: Path) -> None:
    """The SavedModel folder at ``path`` (made if absent; converters.save makes it atomic)."""
    ckpt.validate(f"writing {path}")
    from convnextv2.reference.keras_model import build_keras, keras, tf

    model = build_keras(ckpt.config, ckpt.model_tensors(), dtype="float32")
    name = output_name(ckpt)

    def serve(pixel_values: Any) -> dict[str, Any]:
        return {name: model(tf.transpose(pixel_values, (0, 2, 3, 1)), training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve,
                         input_signature=[tf.TensorSpec((None, 3, None, None), tf.float32, name=INPUT_NAME)])
    _track_variables_in_name_order(archive)
    path.mkdir(exist_ok=True)
    archive.write_out(str(path), verbose=False)
    _canonicalise_function_names(path / "saved_model.pb")
    _write_content_fingerprint(path)


# Two exports of the same checkpoint are byte-identical (the determinism suite holds the line). Out of the box
# a SavedModel written twice differs in three places, each fixed below: the order of its variables, the
# values of TensorFlow's process-wide id counter baked into its graph, and the fingerprint's random uuid.

def _track_variables_in_name_order(archive: Any) -> None:
    # Keras lists the variables an endpoint uses in the traced function's capture order, which changes from
    # one trace of the same model to the next; that order becomes the checkpoint's `_all_variables/N` slots
    # (and so the bytes of `variables/`). Names are unique within a model, so sorting by them is a total order.
    collect = archive._filter_and_track_resources

    def collect_in_name_order() -> None:
        collect()
        tracked = archive._tf_trackable
        names = [variable.name for variable in tracked._all_variables]
        if len(set(names)) != len(names):
            raise RuntimeError(f"SavedModel export: variable names repeat, so their order is not fixed: {names}")
        tracked._all_variables = sorted(tracked._all_variables, key=lambda variable: variable.name)

    archive._filter_and_track_resources = collect_in_name_order


_UID_SUFFIX = re.compile(r"^(.*_)(\d+)$")
# The attribute TensorFlow records a captured input's unique id under, as a bare number ("6174").
_CAPTURE_ID = "_user_specified_name"


def _canonicalise_function_names(pb_path: Path) -> None:
    """Replace the values of TensorFlow's process-wide unique-id counter in ``saved_model.pb`` (the suffix of
    every traced function's name, ``__inference_serve_6456``, and the ids of captured inputs) by their rank
    in creation order, and sort the function library by name."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(pb_path.read_bytes())
    messages = list(_messages(saved))
    names = {f.signature.name for meta in saved.meta_graphs for f in meta.graph_def.library.function}
    names |= {g.function_name for meta in saved.meta_graphs for g in meta.graph_def.library.gradient}
    numbered = {name: m for name in names if (m := _UID_SUFFIX.match(name))}
    capture_ids = {m.s for m, key in messages if key == _CAPTURE_ID and m.s.isdigit()}
    uids = sorted({int(m.group(2)) for m in numbered.values()} | {int(s) for s in capture_ids})
    rank = {uid: str(index) for index, uid in enumerate(uids)}
    rename = {name: m.group(1) + rank[int(m.group(2))] for name, m in numbered.items()}
    if len(set(rename.values()) | (names - set(rename))) != len(names):
        raise RuntimeError(f"{pb_path}: renumbering the traced functions would merge two of them")
    for message, key in messages:
        if key == _CAPTURE_ID and message.s in capture_ids:
            message.s = rank[int(message.s)].encode()
        _rename_fields(message, rename)
    # Children before parents: renaming a map's keys copies its values, so they must be final by then.
    for message, _ in reversed(messages):
        _rename_map_keys(message, rename)
    for meta in saved.meta_graphs:
        library = meta.graph_def.library
        functions = sorted(library.function, key=lambda f: f.signature.name)
        del library.function[:]
        library.function.extend(functions)
    # deterministic=True writes map entries in key order rather than in insertion order.
    pb_path.write_bytes(saved.SerializeToString(deterministic=True))


def _messages(message: Any, key: Any = None) -> Iterator[tuple[Any, Any]]:
    """Every message nested in ``message`` (itself first), each with the map key it sits under (or None)."""
    yield message, key
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type == field.TYPE_MESSAGE:
                for item_key, item in value.items():
                    yield from _messages(item, item_key)
        else:
            for item in (value if field.is_repeated else [value]):
                yield from _messages(item)


def _rename_fields(message: Any, rename: dict[str, str]) -> None:
    # Function names are referenced from node attributes, the object graph and the signatures alike, as
    # string fields (NameAttrList.name) and, in a few attributes, as bytes.
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_BYTES):
            continue
        as_bytes = field.type == field.TYPE_BYTES

        def renamed(item: Any, as_bytes: bool = as_bytes) -> Any:
            text = item.decode("utf-8", "replace") if as_bytes else item
            if text not in rename:
                return item
            return rename[text].encode() if as_bytes else rename[text]

        if field.is_repeated:
            value[:] = [renamed(item) for item in value]
        else:
            setattr(message, field.name, renamed(value))


def _rename_map_keys(message: Any, rename: dict[str, str]) -> None:
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE or not field.message_type.GetOptions().map_entry:
            continue
        if field.message_type.fields_by_name["key"].type != field.TYPE_STRING or not set(value) & set(rename):
            continue
        value_is_message = field.message_type.fields_by_name["value"].type == field.TYPE_MESSAGE
        entries = []
        for key in list(value):
            item = value[key]
            if value_is_message:
                copy = type(item)()
                copy.CopyFrom(item)
                item = copy
            entries.append((rename.get(key, key), item))
        value.clear()
        for key, item in entries:
            if value_is_message:
                value[key].CopyFrom(item)
            else:
                value[key] = item


def _write_content_fingerprint(directory: Path) -> None:
    """Recompute ``fingerprint.pb`` for the rewritten graph, with a uuid derived from the export's content
    hashes instead of a random one: identical exports are the same model, and say so."""
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    fingerprint = fingerprint_pb2.FingerprintDef()
    fingerprint.ParseFromString(fingerprinting.CreateFingerprintDef(str(directory)))
    fingerprint.ClearField("uuid")
    # The remaining fields hash saved_model.pb, the graph, the signatures, the object graph and variables/.
    digest = hashlib.sha256(fingerprint.SerializeToString(deterministic=True)).digest()
    fingerprint.uuid = str(int.from_bytes(digest[:16], "big"))
    (directory / "fingerprint.pb").write_bytes(fingerprint.SerializeToString(deterministic=True))


# read() exists only to refuse with a reason; the command line does not offer --from savedmodel.
FORMAT = Format(NAME, sniff, read, write, readable=False, unrepresentable=unrepresentable,
                runner="tensorflow-savedmodel")
