"""ONNX export: the PyTorch reference through ``torch.onnx`` (default, ``onnx_via_torch``), the Keras reference
through tf2onnx (``onnx_via_tensorflow``), the Flax reference through jax2onnx (``onnx_via_flax``). This module
picks the exporter, attaches the metadata and saves the file and its ``.data`` file; converters.save publishes
them only once the export gate (converters/runners/gates.py: onnx.checker, then onnxruntime at the full
optimisation level against the float64 PyTorch referee) has passed.

Interface of every exported file: ``onnx_interface`` (docs/onnx.md). ``metadata_props`` carry the canonical
metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.digests import sha256_of
from convnextv2.converters.format_limits import Change, dropped_extras
from convnextv2.converters.onnx import via_flax as onnx_via_flax
from convnextv2.converters.onnx import via_tensorflow as onnx_via_tensorflow
from convnextv2.converters.onnx import via_torch as onnx_via_torch
from convnextv2.converters.onnx.interface import INPUT_NAME, STRIDE
from convnextv2.reference.errors import BadInputError, MissingDependencyError

# Measured (docs/onnx.md): at opset 20 GELU is the Gelu op, which onnxruntime 1.32 fuses with the preceding
# bias into BiasGelu at ORT_ENABLE_ALL; the opset-18 Erf pattern the exporter writes is not fused (291 against
# 231 nodes after optimisation for atto) and runs ~15% slower. tf2onnx 1.17 stops at opset 18.
DEFAULT_OPSET = {"torch": 20, "tensorflow": 18, "flax": 20}
MIN_OPSET = 18
MAX_OPSET = 20
# protobuf refuses messages of 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
PRODUCER_NAME = "convnextv2-toolkit"


def data_file_name(path: Path) -> str:
    return path.name + ".data"


# --------------------------------------------------------------------------------------------- exporters

# Each exporter has ``build(ckpt, opset, dynamic_hw, features, fp16, example_size) -> ModelProto`` and
# ``why_unavailable()``; each imports its framework only inside ``build``.
EXPORTERS: dict[str, ModuleType] = {"torch": onnx_via_torch, "tensorflow": onnx_via_tensorflow, "flax": onnx_via_flax}
VIAS = tuple(EXPORTERS)


def _exporter(via: str) -> ModuleType:
    if via not in EXPORTERS:
        raise BadInputError(f"unknown export path {via!r}; expected one of {', '.join(VIAS)}")
    return EXPORTERS[via]


def why_unavailable(via: str) -> str | None:
    """The reason an export path cannot run in this install, or None when it can."""
    if via not in EXPORTERS:
        return f"unknown export path {via!r}; expected one of {', '.join(VIAS)}"
    reason: str | None = EXPORTERS[via].why_unavailable()
    return reason


# --------------------------------------------------------------------------------------- file writing


def _finish_proto(proto: Any, ckpt: Checkpoint, via: str, opset: int, fp16: bool, features: bool,
                  dynamic_hw: bool, source_sha256: str) -> None:
    """Strip what makes bytes depend on the machine (stack traces, local paths) and attach the metadata."""
    for node in proto.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    proto.graph.doc_string = ""
    proto.doc_string = "ConvNeXt V2 exported by convnextv2-toolkit; metadata_props hold the canonical metadata"
    proto.producer_name = PRODUCER_NAME
    from importlib.metadata import PackageNotFoundError, version

    try:
        proto.producer_version = version("convnextv2-toolkit")
    except PackageNotFoundError:
        proto.producer_version = "unknown"
    meta = {k: v for k, v in ckpt.metadata().items() if k != "format"}
    meta["source_sha256"] = source_sha256
    meta["export"] = json.dumps({"via": via, "opset": opset, "fp16": fp16, "features": features,
                                 "dynamic_hw": dynamic_hw, "input": INPUT_NAME, "layout": "NCHW",
                                 "outputs": [o.name for o in proto.graph.output]}, sort_keys=True, separators=(",", ":"))
    del proto.metadata_props[:]
    for key in sorted(meta):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, meta[key]


def _save_proto(proto: Any, target: Path, external: bool) -> None:
    import onnx

    if not external:
        target.write_bytes(proto.SerializeToString(deterministic=True))
        return
    onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file_name(target), size_threshold=1024, convert_attribute=False)


def graph_weight_bytes(ckpt: Checkpoint, fp16: bool) -> int:
    # The graph holds float32 weights (float16 with --fp16) whatever the checkpoint's dtype.
    return ckpt.parameter_count * (2 if fp16 else 4)


def writes_external_data(ckpt: Checkpoint, fp16: bool = False, external_data: bool | None = None) -> bool:
    """Whether the export puts its weights in a ``.data`` file beside the graph (asked for, or past 2 GB)."""
    if external_data is not None:
        return bool(external_data)
    return graph_weight_bytes(ckpt, fp16) > EXTERNAL_DATA_THRESHOLD


def unnamed_build(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> bool:
    """A self-contained graph is one file the reader knows by content; one with a ``.data`` file is not (the
    graph names its data file)."""
    return not writes_external_data(ckpt, bool(options.get("fp16")), options.get("external_data"))


def companions(path: Path) -> tuple[str, ...]:
    return (data_file_name(path),)


def _kept_in_float32(name: str) -> bool:
    # The float16 export runs LayerNorm and GRN in float32 with their own weights (torch_model.Float32Norm).
    return any(part in ("norm", "grn") for part in name.split("."))


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    """What an ONNX export cannot hold: the extras; with ``fp16``, the float16 rounding of every weight but the
    norms' (the read-back's expectation, and the change converters.save announces)."""
    found = dropped_extras(ckpt, "an ONNX graph")
    if options.get("fp16"):
        rounded = {name: np.asarray(value).astype(np.float16).astype(np.float32)
                   for name, value in ckpt.model_tensors().items() if not _kept_in_float32(name)}
        found.append(Change("weights", "weights rounded to float16 (fp16 export)", ckpt.dtype, "float16",
                            functional=True, values=rounded))
    return found


def checked_opset(via: str, opset: int | None) -> int:
    """The opset an export through ``via`` uses (its default when None); BadInputError when it cannot."""
    _exporter(via)
    opset = DEFAULT_OPSET[via] if opset is None else int(opset)
    if via == "tensorflow" and opset > 18:
        raise BadInputError(f"--via tensorflow: tf2onnx 1.17 exports up to opset 18, not {opset}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadInputError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}: below 18 ReduceL2 (GRN) cannot "
                            "be exported; 20 is the newest opset the exporters and onnxruntime 1.32 agree on")
    return opset


def output_bytes(ckpt: Checkpoint, options: Mapping[str, Any]) -> int:
    return graph_weight_bytes(ckpt, bool(options.get("fp16")))


def write(ckpt: Checkpoint, path: Path, *, via: str = "torch", opset: int | None = None, dynamic_hw: bool = False,
          features: bool = False, fp16: bool = False, external_data: bool | None = None, size: int | None = None,
          source_path: str | os.PathLike[str] | None = None) -> None:
    """Export ``ckpt`` to ``path``: :func:`write_with` without a template cache (built afresh)."""
    write_with(ckpt, path, None, via=via, opset=opset, dynamic_hw=dynamic_hw, features=features, fp16=fp16,
               external_data=external_data, size=size, source_path=source_path)


def write_with(ckpt: Checkpoint, path: Path, cache: Any, *, via: str = "torch", opset: int | None = None,
               dynamic_hw: bool = False, features: bool = False, fp16: bool = False,
               external_data: bool | None = None, size: int | None = None,
               source_path: str | os.PathLike[str] | None = None) -> str:
    """Export ``ckpt`` to ``path`` (its ``.data`` file beside it when the weights go there: asked for, or past
    2 GB), traced at image size ``size`` (default: the checkpoint's input size). Written, not checked:
    converters.save puts the graph through onnx.checker and onnxruntime (ORT_ENABLE_ALL) against the float64
    referee before it publishes it. ``source_path``: the file exported from, whose sha256 the metadata records
    (default: the source the checkpoint records)."""
    exporter = _exporter(via)
    opset = checked_opset(via, opset)
    reason = why_unavailable(via)
    if reason:
        raise MissingDependencyError(reason)
    ckpt.validate(f"exporting {path}")
    size = int(size or ckpt.preprocessing.input_size)
    if size % STRIDE:
        raise BadInputError(f"check size {size} is not a multiple of {STRIDE}")
    # The file the user exported from when we have it; else the source the checkpoint records.
    source_sha256 = sha256_of(source_path) if source_path else (ckpt.source.sha256 or "")
    weight_bytes = graph_weight_bytes(ckpt, fp16)
    if external_data is False and weight_bytes > EXTERNAL_DATA_THRESHOLD:
        raise BadInputError(f"--no-external-data: the model holds {weight_bytes / 1e9:.2f} GB of weights and a "
                            "protobuf file stops at 2 GB; let the weights go to the .data file")
    external = writes_external_data(ckpt, fp16, external_data)
    how, proto = "built", None
    if cache is not None:
        # With a template cache (converters/templates.py): the graph of this architecture built once, the weights
        # written into it and proven; the metadata is then this checkpoint's, as a fresh export's.
        from convnextv2.converters import templates

        reason = ("float16 weights (65,536 values cannot give every weight its own probe value)" if fp16 else
                  "the weights go to a .data file (a graph past 2 GB)" if external else None)
        if reason is None:
            options = {"via": via, "opset": opset, "dynamic_hw": dynamic_hw, "features": features, "size": size}
            files = templates.substituted(cache, "onnx", ckpt, options, lambda probe, folder: _build_template(
                exporter, probe, folder, options), lambda folder: templates.onnx_located(folder))
            if isinstance(files, str):
                reason = files
            else:
                import onnx

                proto, how = onnx.ModelProto.FromString(bytes(files["model.onnx"])), templates.TEMPLATE
        if reason is not None:
            how = templates.afresh(reason)
    if proto is None:
        proto = exporter.build(ckpt, opset, dynamic_hw, features, fp16, size)
    _finish_proto(proto, ckpt, via, opset, fp16, features, dynamic_hw, source_sha256)
    _save_proto(proto, path, external)
    return how


def _build_template(exporter: ModuleType, probe: Checkpoint, folder: Path, options: Mapping[str, Any]) -> None:
    proto = exporter.build(probe, options["opset"], options["dynamic_hw"], options["features"], False,
                           options["size"])
    _finish_proto(proto, probe, options["via"], options["opset"], False, options["features"], options["dynamic_hw"], "")
    (folder / "model.onnx").write_bytes(proto.SerializeToString(deterministic=True))
