"""OpenVINO IR export (write-only): ``model.xml`` + ``model.bin``, made from this toolkit's ONNX export and
loadable by plain ``openvino.Core().read_model`` without this package.

Interface: input ``pixel_values`` float32 NCHW ``[batch, 3, S, S]`` (S the checkpoint's input size, batch
dynamic), output ``logits`` ``[batch, num_classes]`` (``pooled`` for a headless checkpoint); weights stay
float32 in the ``.bin`` (``compress_to_fp16=False``: OpenVINO's default would halve them). The canonical
metadata (config, preprocessing, source, ...) is in the model's ``rt_info`` under ``convnextv2``, one string
per key, each the same JSON text a canonical safetensors file carries.

Precision is the trap of this runtime: on a CPU with bfloat16 units (AVX512-BF16, AMX) the CPU plugin's
default compile runs the model in bfloat16, about 10^4 times the float32 error, without a word. The hint
cannot be stored in the file (an ``rt_info`` ``runtime_options/INFERENCE_PRECISION_HINT`` is not honoured by
the CPU plugin), so every compile here passes ``INFERENCE_PRECISION_HINT`` explicitly and reads back the
precision the plugin settled on (docs/deploy.md says what a user must do).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Format
from convnextv2.converters.format_limits import Change, dropped_extras
from convnextv2.reference.errors import BadInputError, MissingDependencyError

NAME = "openvino"
SUFFIX = ".xml"
INPUT_NAME = "pixel_values"
RT_INFO_SECTION = "convnextv2"
# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values.
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_OV_TYPE_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}
# The ONNX graph the IR is converted from: opset 20 (GELU as one op), the default of export-onnx.
ONNX_OPSET = 20


def bin_name(path: Path) -> str:
    """The weights file OpenVINO writes and reads beside ``model.xml``: ``model.bin``."""
    return path.with_suffix(".bin").name


def why_unavailable() -> str | None:
    missing = [m for m in ("openvino", "torch", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"the OpenVINO export needs {', '.join(missing)}: pip install "
                "'convnextv2-toolkit[openvino,torch,onnx]'")
    return None


def sniff(path: Path) -> bool:
    # Recognised so that `inspect`/`convert` on an IR say why it cannot be read, instead of "unknown format".
    if not (path.is_file() and path.suffix.lower() == SUFFIX):
        return False
    with open(path, "rb") as handle:
        head = handle.read(512)
    return b"<net " in head


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    # variant is every reader's option; declared so the refusal below is what a caller passing it sees.
    raise BadInputError(
        f"{path}: reading OpenVINO IR is not supported (an IR is a compiled graph: its constants carry no "
        "ConvNeXt V2 names to map back). Convert from the checkpoint it was exported from")


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    return dropped_extras(ckpt, "an OpenVINO IR")


def write(ckpt: Checkpoint, path: Path, *, features: bool = False, size: int | None = None) -> None:
    """The IR for ``ckpt`` at ``path`` (``NAME.xml``; ``NAME.bin`` beside it), converted from the ONNX export at
    image size ``size`` (default: the checkpoint's input size); written, not checked: converters.save runs it in
    OpenVINO at float32 against the float64 referee before it publishes it. ``features`` adds the ``stem``,
    ``stage1``..``stage4`` and ``pooled`` outputs (the parity harness compares them)."""
    write_with(ckpt, path, None, features=features, size=size)


def write_with(ckpt: Checkpoint, path: Path, cache: Any, *, features: bool = False, size: int | None = None) -> str:
    """:func:`write`, its ONNX export through the architecture's template in ``cache`` (converters/templates.py):
    the IR is converted from that graph as from a fresh one, so it is the same file. Returns how the ONNX graph
    it was converted from was built."""
    if path.suffix.lower() != SUFFIX:
        raise BadInputError(f"{path}: an OpenVINO IR is written as NAME.xml (and NAME.bin beside it)")
    reason = why_unavailable()
    if reason:
        raise MissingDependencyError(reason)
    ckpt.validate(f"exporting {path}")
    size = int(size or ckpt.preprocessing.input_size)
    with tempfile.TemporaryDirectory(prefix="convnextv2-openvino-") as tmp:
        from convnextv2.converters.onnx import export as onnx_export

        onnx_path = Path(tmp) / "model.onnx"
        how = onnx_export.write_with(ckpt, onnx_path, cache, size=size, features=features, opset=ONNX_OPSET)
        model = ir_model(ckpt, onnx_path, features, size)
    save_ir(model, path)
    return how


def write_ir_template(ckpt: Checkpoint, folder: Path, cache: Any, *, features: bool, size: int,
                      afresh: Callable[[], None]) -> str:
    """The IR of ``ckpt`` as ``folder``/model.xml and model.bin for the parity harness: the architecture's IR
    template with these weights written into its .bin and proven (no conversion), or built afresh. Its rt_info
    metadata is the template's (the parity IR is never handed to a user; :func:`write_with` is what convert
    uses). ``afresh`` writes it without a template. Returns how it was built."""
    from convnextv2.converters import templates

    files = templates.substituted(
        cache, "openvino", ckpt, {"features": features, "size": size},
        # Converted from the probe's ONNX graph, itself from the ONNX template the onnxruntime runner shares: the
        # probe is not exported twice.
        lambda probe, target: write_with(probe, target / "model.xml", cache, features=features, size=size),
        templates.openvino_located)
    if isinstance(files, str):
        afresh()
        return templates.afresh(files)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return templates.TEMPLATE


def save_ir(model: Any, path: Path) -> None:
    """``NAME.xml`` and ``NAME.bin``, the weights kept float32 (OpenVINO's default would halve them)."""
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)


def ir_model(ckpt: Checkpoint, onnx_path: Path, features: bool, size: int) -> Any:
    """The OpenVINO model converted from the ONNX export at ``onnx_path``, its generated names made
    deterministic and the canonical metadata attached; not yet checked or saved."""
    import onnx
    import openvino as ov

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    # Every name in the ONNX graph: the names OpenVINO keeps.
    names = {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    names |= {t.name for t in graph.initializer} | {v.name for v in list(graph.input) + list(graph.output)}
    model = ov.convert_model(str(onnx_path))
    _canonicalise(model, names)
    _attach_metadata(model, ckpt, features, size)
    return model


def write_from_onnx(ckpt: Checkpoint, onnx_path: Path, target: Path, *, features: bool, size: int) -> None:
    """The IR :func:`write` writes (``target``: NAME.xml, and NAME.bin), converted from an ONNX export already
    made (the parity harness shares one export between onnxruntime and OpenVINO)."""
    save_ir(ir_model(ckpt, onnx_path, features, size), target)


_GENERATED_NAME = re.compile(r"[A-Z][A-Za-z0-9]*_\d+")


def _canonicalise(model: Any, graph_names: set[str]) -> None:
    """Make the IR's bytes a function of the graph alone. OpenVINO names every node it creates after a
    process-wide instance counter (``Constant_24518``; a folded constant inherits the name of the node it
    replaced, ``Reshape_19629``), so the same model converted twice, or after another model in the same
    process, is written with other names. Such a name (``Type_N``, not a name of the ONNX graph) is replaced
    by the type and the rank of its first node in topological order; the suffix OpenVINO appends to a node
    it splits (``/WithoutBiases``) is kept."""
    renamed: dict[str, str] = {}
    for index, op in enumerate(model.get_ordered_ops()):
        head, sep, tail = op.get_friendly_name().partition("/")
        if head in graph_names or not _GENERATED_NAME.fullmatch(head):
            continue
        if head not in renamed:
            renamed[head] = f"{head.rsplit('_', 1)[0]}_{index}"
        op.set_friendly_name(renamed[head] + sep + tail)
    model.set_friendly_name("convnextv2")
    info = model.get_rt_info()
    # The conversion record (the temporary ONNX file's name) and the ONNX file's own metadata_props, which
    # OpenVINO copies under "framework": the IR carries the canonical metadata once, in its own section.
    for section in ("conversion_parameters", "framework"):
        if section in list(info.keys()):
            del info[section]


def _attach_metadata(model: Any, ckpt: Checkpoint, features: bool, size: int) -> None:
    import openvino as ov

    meta = {k: v for k, v in ckpt.metadata().items() if k != "format"}
    meta["export"] = json.dumps({"from": "onnx", "opset": ONNX_OPSET, "features": features, "input": INPUT_NAME,
                                 "layout": "NCHW", "image_size": size, "weights": "float32",
                                 "outputs": [output.get_any_name() for output in model.outputs],
                                 "precision_hint": "pass INFERENCE_PRECISION_HINT=f32 to compile_model: the CPU "
                                                   "plugin's default on bfloat16 hardware is bfloat16"},
                                sort_keys=True, separators=(",", ":"))
    for key in sorted(meta):
        model.set_rt_info(meta[key], [RT_INFO_SECTION, key])
    model.inputs[0].get_node().set_layout(ov.Layout("NCHW"))


# ------------------------------------------------------------------ running

def compile_ir(path: str | os.PathLike[str], precision: str | None = "float32", threads: int = 0) -> tuple[Any, str]:
    """Compile the IR on the CPU with ``precision`` as INFERENCE_PRECISION_HINT (None: the plugin's default);
    returns the compiled model and the precision the plugin reports it runs at."""
    try:
        import openvino as ov
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("running an OpenVINO IR needs openvino: pip install "
                                     "'convnextv2-toolkit[openvino]'") from exc
    config: dict[str, Any] = {}
    if precision is not None:
        if precision not in PRECISION_HINTS:
            raise BadInputError(f"OpenVINO precision must be one of {', '.join(PRECISION_HINTS)}, got {precision!r}")
        config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    return compiled, precision_of(compiled)


def precision_of(compiled: Any) -> str:
    """The precision a compiled model runs at, as the plugin reports it (``float32``, ``bfloat16``, ...)."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = value.to_string() if hasattr(value, "to_string") else str(value)
    return _OV_TYPE_NAMES.get(name, name)


def run(compiled: Any, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
    request = compiled.create_infer_request()
    request.infer({INPUT_NAME: np.ascontiguousarray(images_nchw, dtype=np.float32)})
    return {output.get_any_name(): np.array(request.get_tensor(output).data, dtype=np.float32, copy=True)
            for output in compiled.outputs}


def companions(path: Path) -> tuple[str, ...]:
    return (bin_name(path),)


# read() exists only to refuse with a reason; the command line does not offer --from openvino.
FORMAT = Format(NAME, sniff, read, write, readable=False, companions=companions, unrepresentable=unrepresentable,
                runner="openvino", gated=True)
