"""Keras 3 files: the ``.keras`` archive (model + weights) and the weights-only ``.weights.h5``.

Writing builds the Keras reference (reference/keras_model.py) and lets Keras save it, so the file loads
back with ``keras.saving.load_model`` (this package installed: its layers are registered under
``convnextv2>``). Reading never runs Keras: ``config.json`` is parsed as JSON data and the weights are read
from the HDF5 file with h5py, so no deserialised code or config can execute, and TensorFlow is not imported.

The canonical metadata (config, preprocessing, source, info) rides in the archive as ``convnextv2.json``
(and as attributes of the ``convnextv2`` group of a ``.weights.h5``); tensors outside the model (``extras.*``)
ride beside it. Keras ignores both. The naming table and the layouts are the Keras reference's own
(``reference/keras_layout.py``), free of TensorFlow, so reading a file needs only h5py.

Deterministic: Keras stamps the weights entry with the current time and ``metadata.json`` with the save
date, so the archive is rewritten with fixed zip timestamps and without ``date_saved``; the HDF5 file Keras
writes is itself byte-stable. Same checkpoint, same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source, checkpoint_from_metadata
from convnextv2.converters.digests import lazy_sha256
from convnextv2.converters.format_contract import Format
from convnextv2.converters.publishing import scratch_file
from convnextv2.converters.safetensors_io import read_safetensors, write_safetensors
from convnextv2.converters.strict_json import parse_json_text
from convnextv2.converters.temp_folders import make_temp_folder, remove_folder
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, MissingDependencyError
from convnextv2.reference.keras_layout import KERAS_KEYS, PACKAGE
from convnextv2.reference.variants import ModelConfig, check_variant

NAME = "keras"


def unnamed_build(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> bool:
    """A .keras archive is built and read back unnamed (the reader knows it by content); a weights-only .h5
    cannot be, Keras saves those only under a .weights.h5 name."""
    return not (path.name.endswith(".h5") or path.name.endswith(".hdf5"))
CONFIG_ENTRY = "config.json"
METADATA_ENTRY = "metadata.json"
WEIGHTS_ENTRY = "model.weights.h5"
OUR_METADATA_ENTRY = "convnextv2.json"
OUR_EXTRAS_ENTRY = "convnextv2.extras.safetensors"
H5_GROUP = "convnextv2"  # in a .weights.h5: metadata as attributes, extras as datasets under extras/
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Refuse archives whose entries claim absurd sizes or ratios before extracting anything.
MAX_ENTRY_BYTES = 64 * 1024**3
MAX_COMPRESSION_RATIO = 200

# Keras stores a layer's variables by index (``vars/0``, ``vars/1``) under a group named after the snake-cased
# class; these are the variable names of each of the layer classes the reference uses, in creation order.
VARIABLE_ORDER: dict[str, tuple[str, ...]] = {
    "conv2d": ("kernel", "bias"),
    "depthwise_conv2d": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
    "head_dense": ("kernel", "bias"),
    "layer_norm": ("weight", "bias"),
    "grn": ("gamma", "beta"),
}


# ------------------------------------------------------------ sniffing

def sniff(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return False
    if head == HDF5_SIGNATURE:
        return _sniff_h5(path)
    try:
        # is_zipfile itself raises BadZipFile on some damaged end records (multi-disk claims), so it sits in here.
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {CONFIG_ENTRY, WEIGHTS_ENTRY} <= names:
                return False
            info = archive.getinfo(CONFIG_ENTRY)
            if info.file_size > 256 * 1024 * 1024:
                return False
            return f'"{PACKAGE}>GRN"'.encode() in archive.read(CONFIG_ENTRY)
    except Exception:  # noqa: BLE001 - a sniffer answers "not mine" for any damaged or foreign file
        return False


def _sniff_h5(path: Path) -> bool:
    try:
        import h5py
    except ImportError:
        return False
    try:
        with h5py.File(path, "r") as handle:
            return H5_GROUP in handle or any(name == "stem.conv" for name, _, _ in _layer_groups(handle))
    except Exception:  # noqa: BLE001 - as above
        return False


# ------------------------------------------------------------ reading

def _layer_groups(handle: Any) -> Iterator[tuple[str, str, Any]]:
    """(layer name, snake-cased class, vars group) of every layer Keras saved."""
    import h5py

    layers = handle.get("layers")
    if not isinstance(layers, h5py.Group):
        return
    for key in layers:
        group = layers[key]
        variables = group.get("vars") if isinstance(group, h5py.Group) else None
        if not isinstance(variables, h5py.Group):
            continue
        name = variables.attrs.get("name")
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        yield str(name) if name is not None else "", re.sub(r"_\d+$", "", key), variables


def _read_weights(handle: Any, where: str, config: ModelConfig | None) -> dict[str, np.ndarray]:
    """Canonical tensors from a Keras HDF5 weights file; shapes checked against ``config`` when known."""
    import h5py

    expected = schema.expected_shapes(config) if config is not None else None
    tensors: dict[str, np.ndarray] = {}
    for layer, kind, variables in _layer_groups(handle):
        datasets = sorted(variables, key=lambda k: int(k) if k.isdigit() else -1)
        if not datasets:
            continue
        if not layer:
            raise BadInputError(f"{where}: layer group {variables.name} has no layer name (saved by Keras < 3.?)")
        order = VARIABLE_ORDER.get(kind)
        if order is None or len(datasets) != len(order) or datasets != [str(i) for i in range(len(order))]:
            raise BadInputError(f"{where}: layer {layer!r} ({kind}) holds variables {datasets}, not a ConvNeXt V2 layer")
        for index, variable_name in enumerate(order):
            keras_path = f"{layer}/{variable_name}"
            found = KERAS_KEYS.to_canonical(keras_path)
            if found is None:
                raise BadInputError(f"{where}: Keras weight {keras_path} has no canonical name")
            name, rule = found
            dataset = variables[str(index)]
            bfloat16 = isinstance(dataset, h5py.Dataset) and _is_keras_bfloat16(dataset)
            if not isinstance(dataset, h5py.Dataset) or (dataset.dtype.kind not in "fiu" and not bfloat16):
                raise BadInputError(f"{where}: {keras_path} ({name}) is not a numeric array")
            found_shape = tuple(int(s) for s in dataset.shape)
            if expected is not None:
                if name not in expected:
                    raise BadInputError(f"{where}: unexpected tensor {name} (Keras {keras_path}, shape "
                                        f"{list(found_shape)}) for a {config.variant} model")  # type: ignore[union-attr]
                want = rule.transform.foreign_shape(expected[name])
                if found_shape != want:
                    raise BadInputError(
                        f"{where}: tensor {name} (Keras {keras_path}): expected shape {list(want)}, found "
                        f"{list(found_shape)} (canonical {list(expected[name])})")
            elif len(found_shape) != rule.transform.rank:
                raise BadInputError(f"{where}: tensor {name} (Keras {keras_path}): expected rank "
                                    f"{rule.transform.rank}, found shape {list(found_shape)}")
            if name in tensors:
                raise BadInputError(f"{where}: two layers are named {layer!r}")
            value = dataset[()]
            if bfloat16:
                import ml_dtypes

                value = value.view(ml_dtypes.bfloat16)
            tensors[name] = np.ascontiguousarray(rule.transform.to_canonical(value, f"{where}: {keras_path}"))
    return tensors


def _is_keras_bfloat16(dataset: Any) -> bool:
    # HDF5 has no bfloat16: Keras stores the raw 2-byte values and marks the dataset with a dtype attribute.
    marker = dataset.attrs.get("dtype")
    if isinstance(marker, bytes):
        marker = marker.decode("ascii", "replace")
    return marker == "bfloat16" and dataset.dtype.itemsize == 2


def _ordered(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    order = list(schema.expected_shapes(config))
    return {name: tensors[name] for name in order if name in tensors} | {
        name: tensors[name] for name in sorted(tensors) if name not in order}


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError(
            "reading Keras files needs h5py; install it with: pip install 'convnextv2-toolkit[tf]'") from None
    return h5py


def _parse_metadata(raw: Any, where: str) -> Checkpoint:
    """Our metadata entry -> a Checkpoint without tensors (config, preprocessing, source, info)."""
    meta = parse_json_text(raw, f"{where}: the convnextv2 metadata")
    if not isinstance(meta, dict) or meta.get("schema") != schema.SCHEMA_NAME:
        raise BadInputError(f"{where}: the convnextv2 metadata does not describe a {schema.SCHEMA_NAME} model")
    return checkpoint_from_metadata(meta, {}, where)


def _check_entry(info: zipfile.ZipInfo, where: str) -> None:
    if info.file_size > MAX_ENTRY_BYTES or (
            info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO):
        raise BadInputError(f"{where}: archive entry {info.filename} claims {info.file_size} bytes "
                            f"from {info.compress_size}; refusing it (zip bomb?)")


def _build_checkpoint(path: Path, tensors: dict[str, np.ndarray], meta: Checkpoint | None,
                      container: str, variant: str | None) -> Checkpoint:
    where = str(path)
    if meta is not None:
        # The source stays the origin of the weights, as a canonical file keeps it (this file is a carrier).
        ckpt, config = meta, meta.config
        ckpt.tensors = tensors
    else:
        config = schema.infer_config({k: v.shape for k, v in tensors.items()}, where)
        ckpt = Checkpoint(config=config, tensors=tensors, preprocessing=Preprocessing(),
                          source=Source(format=NAME, file_name=path.name, digest=lazy_sha256(path),
                                        layout={"container": container, "metadata": "none"}))
    ckpt.tensors = _ordered(ckpt.tensors, config)
    ckpt.validate(where)
    check_variant(config, variant, where)
    return ckpt


# What zipfile and h5py raise on damaged files; reported as bad input, not as a toolkit bug.
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError)


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    try:
        return _read(path, variant)
    except _DAMAGED as exc:
        raise BadInputError(f"{path}: damaged or unreadable Keras file: {exc}") from None


def _read(path: Path, variant: str | None) -> Checkpoint:
    h5py = _require_h5py()
    where = str(path)
    with open(path, "rb") as handle:
        is_h5 = handle.read(8) == HDF5_SIGNATURE
    if is_h5:
        with h5py.File(path, "r") as handle:
            meta: Checkpoint | None = None
            extras: dict[str, np.ndarray] = {}
            if H5_GROUP in handle:
                group = handle[H5_GROUP]
                if "metadata" in group.attrs:
                    meta = _parse_metadata(group.attrs["metadata"], where)
                extras = _read_h5_extras(group, where)
            tensors = _read_weights(handle, where, meta.config if meta else None)
        return _build_checkpoint(path, {**tensors, **extras}, meta, "weights.h5", variant)
    if not zipfile.is_zipfile(path):
        raise BadInputError(f"{where}: neither a .keras archive (zip) nor a Keras .weights.h5 (HDF5) file")
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="convnextv2-keras-") as tmp:
        names = set(archive.namelist())
        if WEIGHTS_ENTRY not in names:
            raise BadInputError(f"{where}: the archive has no {WEIGHTS_ENTRY} (entries: {sorted(names)[:8]})")
        meta = None
        if OUR_METADATA_ENTRY in names:
            _check_entry(archive.getinfo(OUR_METADATA_ENTRY), where)
            meta = _parse_metadata(archive.read(OUR_METADATA_ENTRY), where)
        config = meta.config if meta else None
        weights_info = archive.getinfo(WEIGHTS_ENTRY)
        _check_entry(weights_info, where)
        # h5py needs a seekable file; an extracted copy keeps reading at file speed for large models.
        weights_path = Path(tmp) / "weights.h5"
        with archive.open(weights_info) as src, open(weights_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
        with h5py.File(weights_path, "r") as handle:
            tensors = _read_weights(handle, f"{where}:{WEIGHTS_ENTRY}", config)
        if OUR_EXTRAS_ENTRY in names:
            info = archive.getinfo(OUR_EXTRAS_ENTRY)
            _check_entry(info, where)
            extras_path = Path(tmp) / "extras.safetensors"
            with archive.open(info) as src, open(extras_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
            extras, _ = read_safetensors(extras_path)
            tensors.update({k: np.array(v) for k, v in extras.items()})
    return _build_checkpoint(path, tensors, meta, "keras", variant)


def _read_h5_extras(group: Any, where: str) -> dict[str, np.ndarray]:
    import h5py

    extras: dict[str, np.ndarray] = {}
    holder = group.get("extras")
    if not isinstance(holder, h5py.Group):
        return extras
    for key in holder:
        dataset = holder[key]
        if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "fiub":
            raise BadInputError(f"{where}: extras entry {key} is not a numeric array")
        array = dataset[()]
        stored = dataset.attrs.get("dtype")
        if stored is not None:
            # bfloat16 and other dtypes HDF5 lacks are stored as raw unsigned integers of the same width.
            from convnextv2.converters.safetensors_io import dtype_from_code

            array = array.view(dtype_from_code(str(stored), where))
        extras[key] = np.ascontiguousarray(array)
    return extras


# ------------------------------------------------------------ writing

def _model_dtype(ckpt: Checkpoint, where: str) -> str:
    kinds = {str(v.dtype) for v in ckpt.model_tensors().values()}
    if len(kinds) != 1 or next(iter(kinds)) not in ("float16", "bfloat16", "float32", "float64"):
        raise BadInputError(f"{where}: Keras needs one float dtype for every weight, found {sorted(kinds)}; "
                            "convert the checkpoint to float32 first")
    return next(iter(kinds))


def file_metadata(ckpt: Checkpoint) -> str:
    meta = ckpt.metadata()
    meta.pop("format", None)  # "pt" is a safetensors convention for PyTorch layouts; this file is not one
    decoded: dict[str, Any] = {}
    for key, value in meta.items():
        decoded[key] = json.loads(value) if key in ("config", "preprocessing", "source", "info") else value
    return json.dumps(decoded, sort_keys=True, separators=(",", ":"))


def _zip_entry(name: str, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = compress_type
    info.create_system = 3  # unix, whatever the writer's platform
    info.external_attr = 0o644 << 16
    return info


def _rewrite_archive(keras_file: Path, out: Path, ckpt: Checkpoint, beside: Path) -> None:
    """Copy Keras' archive with fixed timestamps and no save date, adding our metadata and extras."""
    with zipfile.ZipFile(keras_file) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            entry = _zip_entry(info.filename, info.compress_type)
            if info.filename == METADATA_ENTRY:
                keras_meta = json.loads(src.read(info))
                keras_meta.pop("date_saved", None)
                dst.writestr(entry, json.dumps(keras_meta, sort_keys=True))
                continue
            with src.open(info) as reader, dst.open(entry, "w", force_zip64=True) as writer:
                shutil.copyfileobj(reader, writer, 16 * 1024 * 1024)
        dst.writestr(_zip_entry(OUR_METADATA_ENTRY, zipfile.ZIP_STORED), file_metadata(ckpt))
        extras = ckpt.extras()
        if extras:
            with scratch_file(beside) as extras_file:
                write_safetensors(extras_file, sorted(extras.items()))
                with open(extras_file, "rb") as reader, dst.open(
                        _zip_entry(OUR_EXTRAS_ENTRY, zipfile.ZIP_STORED), "w", force_zip64=True) as writer:
                    shutil.copyfileobj(reader, writer, 16 * 1024 * 1024)


def _annotate_weights_h5(weights_file: Path, ckpt: Checkpoint) -> None:
    import h5py

    from convnextv2.converters.safetensors_io import code_from_dtype

    with h5py.File(weights_file, "r+") as handle:
        group = handle.create_group(H5_GROUP)
        group.attrs["metadata"] = file_metadata(ckpt)
        extras = ckpt.extras()
        if extras:
            holder = group.create_group("extras")
            for name, array in sorted(extras.items()):
                array = np.ascontiguousarray(array)
                try:
                    h5py.h5t.py_create(array.dtype)
                    native = array.dtype.kind in "fiub"
                except TypeError:
                    native = False
                if native:
                    holder.create_dataset(name, data=array, track_times=False)
                else:
                    dataset = holder.create_dataset(name, data=array.view(f"u{array.dtype.itemsize}"),
                                                    track_times=False)
                    dataset.attrs["dtype"] = code_from_dtype(array.dtype)


def write(ckpt: Checkpoint, path: Path) -> None:
    """The ``.keras`` archive (or, for a name ending in ``.h5``, the weights-only file) at ``path``, written in
    place; converters.save makes it atomic."""
    write_as(ckpt, path, path)


def write_as(ckpt: Checkpoint, path: Path, dest: Path) -> None:
    """``dest``: where the output will be published, for scratch files on its filesystem while ``path`` is an
    unnamed file."""
    where = f"writing {dest}"
    ckpt.validate(where)
    dtype = _model_dtype(ckpt, where)
    from convnextv2.reference.keras_model import build_keras

    if dest.name.endswith(".h5") or dest.name.endswith(".hdf5"):
        # Keras saves weights only under a name ending in .weights.h5, so this file is made under that name in
        # a marked temporary folder beside the output (after a SIGKILL the next write removes it), then renamed
        # onto it.
        scratch = make_temp_folder(path)
        try:
            model = build_keras(ckpt.config, ckpt.model_tensors(), dtype=dtype)
            weights_file = scratch / "model.weights.h5"
            model.save_weights(weights_file)
            _annotate_weights_h5(weights_file, ckpt)
            os.replace(weights_file, path)
        finally:
            remove_folder(scratch)
        return
    # Keras's archive goes to an unnamed scratch file beside the destination and ours (deterministic, with our
    # metadata) to the output, so a killed conversion into an unnamed output leaves nothing.
    with scratch_file(dest) as keras_file:
        model = build_keras(ckpt.config, ckpt.model_tensors(), dtype=dtype)
        with open(keras_file, "w+b") as handle:
            _save_archive(model, handle, dest)
        _rewrite_archive(keras_file, path, ckpt, dest)


def _save_archive(model: Any, handle: Any, beside: Path) -> None:
    # keras.saving.save_model takes only names ending in .keras; the function behind it (Keras 3's saving_lib)
    # writes the same archive into an open file, which an unnamed file needs.
    try:
        from keras.src.saving import saving_lib
    except ImportError:
        saving_lib = None
    if saving_lib is not None and hasattr(saving_lib, "save_model"):
        saving_lib.save_model(model, handle)
        return
    scratch = make_temp_folder(beside)  # a Keras without it: by name, in a marked folder
    try:
        model.save(scratch / "model.keras")
        with open(scratch / "model.keras", "rb") as saved:
            shutil.copyfileobj(saved, handle, 16 * 1024 * 1024)
    finally:
        remove_folder(scratch)


FORMAT = Format(NAME, sniff, read, write, unnamed_build=unnamed_build, runner="tensorflow", write_as=write_as)
