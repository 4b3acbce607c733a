"""TensorFlow SavedModel export (write-only): a directory that plain ``tf.saved_model.load`` runs without
this package, Keras' custom layers or PyTorch.

Signature ``serving_default``: input ``pixel_values`` float32 NCHW ``[batch, 3, height, width]`` (height and
width any multiple of 32, batch dynamic), the layout every other export of this toolkit takes (ONNX, the
PyTorch reference); output ``logits`` ``[batch, num_classes]``, or ``pooled`` ``[batch, C3]`` for a headless
checkpoint. The graph transposes to NHWC itself, since the Keras reference is NHWC inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convnextv2.converters.atomic import atomic_directory
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.reference.errors import BadInputError

NAME = "savedmodel"
SIGNATURE = "serving_default"
INPUT_NAME = "pixel_values"


def output_name(ckpt: Checkpoint) -> str:
    return "logits" if ckpt.config.num_classes > 0 else "pooled"


def sniff(path: Path) -> bool:
    # Recognised so that `inspect`/`convert` on a SavedModel say why it cannot be read, instead of
    # "unknown format".
    return path.is_dir() and (path / "saved_model.pb").is_file()


def read(path: Path, **_: Any) -> Checkpoint:
    raise BadInputError(
        f"{path}: reading TensorFlow SavedModels is not supported (a SavedModel is a traced graph: its "
        "variables carry no ConvNeXt V2 names to map back). Convert from the .keras archive or the canonical "
        "file it was exported from")


def write(ckpt: Checkpoint, path: Path, *, overwrite: bool = False, **_: Any) -> None:
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
    with atomic_directory(path, overwrite) as tmp:
        archive.write_out(str(tmp), verbose=False)
