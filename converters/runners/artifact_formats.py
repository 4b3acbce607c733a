"""Deployment artifacts made by any tool, one backend per format: recognised by content, opened in the format's
own runtime, their signature (inputs and outputs as the file declares them) and stored precision read from the
file, and run on one chunk of inputs exactly as the file asks for them.

converters/runners/artifact.py finds the conventions (layout, batch, input range, output kind) and judges the
outputs; nothing here decides what an input means. Every framework is imported inside the function that needs it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.reference.errors import BadInputError, MissingDependencyError

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass
class Port:
    """One input or output as the file declares it: shape with None for a dynamic dimension, numpy dtype name and,
    for a quantized tensor, its (scale, zero point)."""

    name: str
    shape: list[int | None] | None
    dtype: str
    quantization: tuple[float, int] | None = None
    op: str = ""  # the op that produces an output, as the file names it (Softmax says "probabilities")

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "shape": self.shape, "dtype": self.dtype}
        if self.quantization is not None:
            entry["quantization"] = {"scale": self.quantization[0], "zero_point": self.quantization[1]}
        if self.op:
            entry["op"] = self.op
        return entry


@dataclasses.dataclass
class Opened:
    """What a backend read from a file; ``run`` is set once the runtime session exists (``start``)."""

    format: str
    runtime: str
    inputs: list[Port]
    outputs: list[Port]
    precision: str = "float32"
    precision_how: str = ""
    unavailable: str | None = None
    run: Run | None = None


def _bad(path: Path, cause: object) -> BadInputError:
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return BadInputError(f"{path}: {text[:300]}")


def _missing(what: str, module: str, extra: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{what} needs {module}: pip install 'convnextv2-toolkit[{extra}]'"
    return None


def _dims(shape: Any) -> list[int | None]:
    return [int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None for d in shape]


def _share(counts: collections.Counter[str], names: tuple[str, ...]) -> str:
    total = sum(counts.values())
    return ", ".join(f"{counts[n]} of {total} {n}" for n in names if counts[n])


# ------------------------------------------------------------------ detection by content

def detect(path: Path) -> str:
    """The artifact format of ``path``, from its content (a folder from the files it holds)."""
    from convnextv2.converters.onnx.reader import sniff as onnx_sniff

    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        if path.suffix.lower() == ".mlpackage" or (path / "Manifest.json").is_file():
            return "coreml"
        raise BadInputError(f"{path}: a folder that is neither a SavedModel (saved_model.pb) nor a Core ML package")
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise _bad(path, exc.strerror or exc) from exc
    suffix = path.suffix.lower()
    if not head:
        raise BadInputError(f"{path}: empty file")
    if head[4:8] == b"TFL3":
        return "litert"
    if re.fullmatch(rb"ET\d\d", head[4:8]):
        return "executorch"
    if b"<net " in head and suffix == ".xml":
        return "openvino"
    if head[:4] == b"ftrt" or suffix in (".engine", ".plan", ".trt"):
        return "tensorrt"
    if suffix == ".mlmodel":
        return "coreml"
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if onnx_sniff(path) or suffix == ".onnx":
        return "onnx"
    raise BadInputError(f"{path}: not a deployment artifact this toolkit runs (ONNX, .tflite, OpenVINO .xml, .pte, "
                        ".keras, SavedModel folder, torch.export .pt2, TensorRT engine, Core ML)")


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise _bad(path, f"unreadable zip archive ({exc})") from exc
    if any(n.endswith("archive_format") for n in names) and any("/models/" in n for n in names):
        return "torch-export"
    if "config.json" in names and "metadata.json" in names:
        return "keras"
    raise BadInputError(f"{path}: a zip archive that is neither a .keras model (config.json, metadata.json) nor a "
                        "torch.export .pt2 (archive_format)")


# ------------------------------------------------------------------ ONNX

_ONNX_INT8_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")


def open_onnx(path: Path) -> Opened:
    reason = _missing("running an ONNX graph", "onnxruntime", "onnx") or _missing("reading an ONNX graph", "onnx",
                                                                                   "onnx")
    if reason:
        return Opened("onnx", "onnxruntime", [], [], unavailable=reason)
    import onnx
    import onnxruntime

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:
        raise _bad(path, f"not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    graph = model.graph
    if not graph.node:
        raise BadInputError(f"{path}: an ONNX model without a graph (truncated?)")
    kinds = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
    stored = collections.Counter(kinds.get(t.data_type, "other") for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            stored.update(kinds.get(a.t.data_type, "other") for a in node.attribute if a.name == "value")
    ops = collections.Counter(node.op_type for node in graph.node)
    producers = {out: node.op_type for node in graph.node for out in node.output}
    initialised = {t.name for t in graph.initializer}

    def port(value: Any) -> Port:
        kind = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim] if kind.HasField("shape") \
            else None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).name if kind.elem_type else "unknown"
        return Port(value.name, _dims(dims) if dims is not None else None, dtype, op=producers.get(value.name, ""))

    inputs = [port(v) for v in graph.input if v.name not in initialised]
    outputs = [port(v) for v in graph.output]
    opened = Opened("onnx", f"onnxruntime {onnxruntime.__version__} (graph optimisations off)", inputs, outputs)
    qdq = ops["QuantizeLinear"] + ops["DequantizeLinear"]
    qlinear = sum(n for op, n in ops.items() if op.startswith("QLinear"))
    integer = sum(ops[op] for op in _ONNX_INT8_OPS)
    floats = stored["float32"] + stored["float16"] + stored["bfloat16"]
    casts16 = sum(1 for n in graph.node if n.op_type == "Cast"
                  and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute))
    if qdq or qlinear or integer:
        found = [f"QDQ nodes: {qdq}" if qdq else "", f"QLinear ops: {qlinear}" if qlinear else "",
                 f"integer ops: {integer}" if integer else ""]
        opened.precision, opened.precision_how = "int8", "; ".join(f for f in found if f)
    elif stored["float16"] > stored["float32"]:
        opened.precision = "float16"
        opened.precision_how = f"weights stored in float16 ({stored['float16']} of {floats} float initializers)"
    elif stored["bfloat16"] > stored["float32"]:
        opened.precision = "bfloat16"
        opened.precision_how = f"weights stored in bfloat16 ({stored['bfloat16']} of {floats} float initializers)"
    elif any(p.dtype == "float16" for p in inputs) or casts16 > 1:
        opened.precision = "float16"
        opened.precision_how = f"computes in float16 ({casts16} Cast to float16, input {inputs[0].dtype})"
    else:
        opened.precision_how = f"weights stored in float32 ({stored['float32']} of {floats} float initializers)"
    return opened


def start_onnx(path: Path, opened: Opened) -> None:
    from convnextv2.converters.onnx.session import ort_session

    try:
        session = ort_session(path, optimise=False)
    except MissingDependencyError:
        raise
    except Exception as exc:
        raise _bad(path, f"onnxruntime cannot load it ({exc})") from exc
    names = [o.name for o in session.get_outputs()]
    opened.run = lambda feed: dict(zip(names, session.run(names, feed), strict=True))


# ------------------------------------------------------------------ LiteRT (.tflite)

# TFLite TensorType values (schema.fbs).
_TFLITE_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8",
                 16: "bfloat16"}


def open_litert(path: Path) -> Opened:
    from convnextv2.converters import litert

    try:
        runtime = litert.interpreter_name()
    except MissingDependencyError as exc:
        return Opened("litert", "LiteRT", [], [], unavailable=str(exc))
    try:
        data = path.read_bytes()
        schema = litert._schema()
        model = schema.Model.GetRootAs(data, 0)
        customs = [model.OperatorCodes(i).CustomCode() for i in range(model.OperatorCodesLength())]
        customs = [c.decode() if isinstance(c, bytes) else str(c) for c in customs if c]
        graph = model.Subgraphs(0)
        counts: collections.Counter[str] = collections.Counter()
        quantized = 0
        for i in range(graph.TensorsLength()):
            tensor = graph.Tensors(i)
            buffer = model.Buffers(tensor.Buffer())
            kind = _TFLITE_TYPES.get(tensor.Type(), "other")
            quant = tensor.Quantization()
            if kind in ("int8", "uint8", "int16") and quant is not None and quant.ScaleLength():
                quantized += 1
            if buffer.DataLength() or buffer.Offset() > 1:
                counts[kind] += 1
    except Exception as exc:
        raise _bad(path, f"not a readable .tflite flatbuffer ({type(exc).__name__}: {exc})") from exc
    version = _version("ai-edge-litert" if runtime == "ai_edge_litert" else "tensorflow")
    opened = Opened("litert", f"{runtime} {version}", [], [])
    flex = sorted({c for c in customs if c.startswith("Flex")})
    if flex:
        opened.unavailable = f"needs the Flex delegate: {', '.join(flex)} (select TensorFlow ops)"
    elif customs:
        opened.unavailable = f"needs custom ops this interpreter does not have: {', '.join(sorted(set(customs)))}"
    try:
        interp = litert.interpreter(path)
    except Exception as exc:
        raise _bad(path, f"the LiteRT interpreter cannot load it ({exc})") from exc
    opened.inputs = [_tflite_port(d) for d in interp.get_input_details()]
    opened.outputs = [_tflite_port(d) for d in interp.get_output_details()]
    floats = counts["float32"] + counts["float16"]
    if quantized:
        opened.precision, opened.precision_how = "int8", f"{quantized} quantized integer tensors"
    elif counts["float16"] > counts["float32"]:
        opened.precision = "float16"
        opened.precision_how = f"weights stored in float16 ({counts['float16']} of {floats} constant float tensors)"
    else:
        opened.precision_how = f"weights stored in float32 ({counts['float32']} of {floats} constant float tensors)"
    return opened


def _tflite_port(detail: dict[str, Any]) -> Port:
    shape = detail.get("shape_signature", detail["shape"])
    scale, zero = detail.get("quantization", (0.0, 0))
    quant = (float(scale), int(zero)) if scale else None
    return Port(detail["name"], _dims([d if d > 0 else None for d in shape]), np.dtype(detail["dtype"]).name, quant)


def start_litert(path: Path, opened: Opened) -> None:
    from convnextv2.converters import litert

    interp = litert.interpreter(path)
    inputs, outputs = interp.get_input_details(), interp.get_output_details()

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for detail in inputs:
            value = feed[detail["name"]]
            if list(detail["shape"]) != list(value.shape):
                interp.resize_tensor_input(detail["index"], list(value.shape))
        interp.allocate_tensors()
        for detail in inputs:
            interp.set_tensor(detail["index"], np.ascontiguousarray(feed[detail["name"]]))
        interp.invoke()
        return {d["name"]: np.array(interp.get_tensor(d["index"]), copy=True) for d in outputs}

    opened.run = run


# ------------------------------------------------------------------ OpenVINO IR

def open_openvino(path: Path) -> Opened:
    reason = _missing("running an OpenVINO IR", "openvino", "openvino")
    if reason:
        return Opened("openvino", "OpenVINO", [], [], unavailable=reason)
    import openvino as ov

    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise BadInputError(f"{path}: its weights file {weights.name} is not beside it")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise _bad(path, f"OpenVINO cannot read it ({exc})") from exc
    counts: collections.Counter[str] = collections.Counter()
    fake_quantize = 0
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            fake_quantize += 1
        elif kind == "Constant" and op.get_output_partial_shape(0).is_static \
                and int(np.prod(list(op.get_output_shape(0)))) > 1:
            counts[op.get_output_element_type(0).get_type_name()] += 1

    def port(value: Any, index: int, output: bool) -> Port:
        shape = value.get_partial_shape()
        dims = None if shape.rank.is_dynamic else [d.get_length() if d.is_static else None for d in shape]
        op = value.get_node().input_value(0).get_node().get_type_name() if output else ""
        # convert_model from a torch module leaves tensors unnamed: they are known by position.
        name = sorted(value.get_names())[0] if value.get_names() else f"{'output' if output else 'input'}{index}"
        return Port(name, dims, _OV_DTYPES.get(value.get_element_type().get_type_name(), "unknown"), op=op)

    opened = Opened("openvino", f"OpenVINO {ov.get_version().split('-')[0]} CPU",
                    [port(v, i, False) for i, v in enumerate(model.inputs)],
                    [port(v, i, True) for i, v in enumerate(model.outputs)])
    floats = counts["f32"] + counts["f16"] + counts["bf16"]
    integer = counts["i8"] + counts["u8"] + counts["i4"] + counts["u4"]
    if fake_quantize or integer > counts["f32"] + counts["f16"]:
        found = [f"FakeQuantize ops: {fake_quantize}" if fake_quantize else "",
                 f"{integer} integer weight constants" if integer else ""]
        opened.precision, opened.precision_how = "int8", "; ".join(f for f in found if f)
    elif counts["f16"] > counts["f32"]:
        opened.precision = "float16"
        opened.precision_how = f"weights stored in float16 ({counts['f16']} of {floats} float weight constants)"
    elif counts["bf16"] > counts["f32"]:
        opened.precision = "bfloat16"
        opened.precision_how = f"weights stored in bfloat16 ({counts['bf16']} of {floats} float weight constants)"
    else:
        opened.precision_how = f"weights stored in float32 ({counts['f32']} of {floats} float weight constants)"
    return opened


_OV_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "u8": "uint8", "i8": "int8", "i64": "int64",
              "i32": "int32", "f64": "float64"}


def start_openvino(path: Path, opened: Opened) -> None:
    from convnextv2.converters import openvino as openvino_format

    # float32 hint whatever the weights: a float16-weights IR is meant to compute in float32 (OpenVINO decompresses
    # its weights), and the CPU plugin would otherwise pick bfloat16 on a CPU with bfloat16 units.
    compiled, ran_at = openvino_format.compile_ir(path, "float32")
    opened.runtime += f", INFERENCE_PRECISION_HINT=f32: ran at {ran_at} (read back)"
    if ran_at != "float32":
        opened.unavailable = f"OpenVINO's CPU plugin runs {ran_at} here when asked for float32"
    request = compiled.create_infer_request()

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request.infer({i: np.ascontiguousarray(feed[p.name]) for i, p in enumerate(opened.inputs)})
        return {p.name: np.array(request.get_output_tensor(i).data, copy=True) for i, p in enumerate(opened.outputs)}

    opened.run = run


# ------------------------------------------------------------------ ExecuTorch (.pte)

_TORCH_DTYPES = {6: "float32", 5: "float16", 15: "bfloat16", 0: "uint8", 1: "int8", 7: "float64", 4: "int64"}


def _executorch_program(path: Path) -> Any:
    import torch  # noqa: F401  (the extension links against libtorch)
    from executorch.extension.pybindings import _C as runtime  # type: ignore[import-not-found]

    return runtime._load_program(str(path), enable_etdump=False, debug_buffer_size=0,
                                 program_verification=runtime.Verification.InternalConsistency, data_path=None)


def open_executorch(path: Path) -> Opened:
    reason = _missing("running a .pte program", "executorch", "executorch")
    if reason:
        return Opened("executorch", "ExecuTorch", [], [], unavailable=reason)
    try:
        program = _executorch_program(path)
        meta = program.method_meta("forward")
        inputs = [_et_port(f"input{i}", meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]
        outputs = [_et_port(f"output{i}", meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]
    except Exception as exc:
        raise _bad(path, f"the ExecuTorch runtime cannot load it ({type(exc).__name__}: {exc})") from exc
    opened = Opened("executorch", f"ExecuTorch {_version('executorch')} runtime", inputs, outputs)
    dtype = inputs[0].dtype if inputs else "float32"
    opened.precision = dtype if dtype in ("float16", "bfloat16") else "float32"
    opened.precision_how = f"the program's input is {dtype} (its delegated weights are not inspected)"
    return opened


def _et_port(name: str, meta: Any) -> Port:
    return Port(name, _dims(meta.sizes()), _TORCH_DTYPES.get(int(meta.dtype()), "unknown"))


def start_executorch(path: Path, opened: Opened) -> None:
    import torch

    program = _executorch_program(path)
    method = program.load_method("forward")
    names = [p.name for p in opened.outputs]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = method([torch.from_numpy(np.ascontiguousarray(feed[p.name]).copy()) for p in opened.inputs])
        return {name: np.ascontiguousarray(o.numpy()) for name, o in zip(names, outputs, strict=False)}

    opened.run = lambda feed: (program, run(feed))[1]  # the program must outlive its method


# ------------------------------------------------------------------ Keras, SavedModel, torch.export

def open_keras(path: Path) -> Opened:
    reason = _missing("running a .keras model", "keras", "tf")
    if reason:
        return Opened("keras", "Keras", [], [], unavailable=reason)
    import keras

    from convnextv2.reference import keras_model  # noqa: F401  (registers this toolkit's layers, if the file uses them)

    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise _bad(path, f"Keras cannot load it ({type(exc).__name__}: {exc})") from exc
    opened = Opened("keras", f"Keras {keras.__version__} ({keras.backend.backend()})",
                    [Port(t.name, _dims(t.shape), str(t.dtype)) for t in model.inputs],
                    [Port(t.name, _dims(t.shape), str(t.dtype)) for t in model.outputs])
    counts = collections.Counter(str(w.dtype) for w in model.weights)
    policy = model.dtype_policy.name
    if "float16" in policy or counts["float16"] > counts["float32"]:
        opened.precision = "float16"
    elif "bfloat16" in policy or counts["bfloat16"] > counts["float32"]:
        opened.precision = "bfloat16"
    opened.precision_how = f"dtype policy {policy}; weights {_share(counts, ('float32', 'float16', 'bfloat16'))}"
    names = [p.name for p in opened.outputs]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = model([feed[p.name] for p in opened.inputs] if len(opened.inputs) > 1
                       else feed[opened.inputs[0].name], training=False)
        values = list(values.values()) if isinstance(values, dict) else values
        values = values if isinstance(values, (list, tuple)) else [values]
        return {name: np.asarray(v) for name, v in zip(names, values, strict=False)}

    opened.run = run
    return opened


def open_savedmodel(path: Path) -> Opened:
    reason = _missing("running a SavedModel", "tensorflow", "tf")
    if reason:
        return Opened("savedmodel", "TensorFlow", [], [], unavailable=reason)
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise _bad(path, f"TensorFlow cannot load it ({type(exc).__name__}: {exc})") from exc
    if not loaded.signatures:
        raise BadInputError(f"{path}: a SavedModel without a serving signature")
    key = "serving_default" if "serving_default" in loaded.signatures else sorted(loaded.signatures)[0]
    function = loaded.signatures[key]
    specs = function.structured_input_signature[1]
    outputs = function.structured_outputs
    opened = Opened("savedmodel", f"TensorFlow {tf.__version__} SavedModel, signature {key}",
                    [Port(n, _dims(s.shape.as_list()), s.dtype.name) for n, s in sorted(specs.items())],
                    [Port(n, _dims(s.shape.as_list()), s.dtype.name) for n, s in sorted(outputs.items())])
    counts = collections.Counter(v.dtype.name for v in getattr(loaded, "variables", ()))
    if counts["float16"] > counts["float32"]:
        opened.precision = "float16"
    opened.precision_how = f"variables {_share(counts, ('float32', 'float16', 'bfloat16')) or 'none'}"

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = function(**{name: tf.constant(value) for name, value in feed.items()})
        return {name: np.asarray(value) for name, value in values.items()}

    opened.run = run
    return opened


def open_torch_export(path: Path) -> Opened:
    reason = _missing("running a torch.export program", "torch", "torch")
    if reason:
        return Opened("torch-export", "torch.export", [], [], unavailable=reason)
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise _bad(path, f"torch.export.load cannot load it ({type(exc).__name__}: {exc})") from exc
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}

    def port(name: str) -> Port:
        value = placeholders[name].meta.get("val")
        dims = [int(d) if isinstance(d, int) else None for d in value.shape] if value is not None else None
        return Port(name, dims, str(value.dtype).replace("torch.", "") if value is not None else "unknown")

    inputs = [port(name) for name in program.graph_signature.user_inputs]
    outputs = [Port(f"output{i}", None, "unknown") for i, _ in enumerate(program.graph_signature.user_outputs)]
    opened = Opened("torch-export", f"torch {torch.__version__} (torch.export.load)", inputs, outputs)
    counts = collections.Counter(str(v.dtype).replace("torch.", "") for v in program.state_dict.values())
    targets = " ".join(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    if "quantize_per" in targets or "quantized" in targets:
        opened.precision, opened.precision_how = "int8", "quantize/dequantize ops in the graph"
    elif counts["float16"] > counts["float32"] or counts["bfloat16"] > counts["float32"]:
        opened.precision = "float16" if counts["float16"] >= counts["bfloat16"] else "bfloat16"
    if opened.precision != "int8":
        opened.precision_how = f"weights {_share(counts, ('float32', 'float16', 'bfloat16'))}"
    module = program.module()

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            values = module(*[torch.from_numpy(np.ascontiguousarray(feed[p.name])) for p in inputs])
        values = values if isinstance(values, (list, tuple)) else [values]
        return {f"output{i}": v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
                for i, v in enumerate(values)}

    opened.run = run
    return opened


# ------------------------------------------------------------------ TensorRT, Core ML: where they can run

def open_tensorrt(path: Path) -> Opened:
    from convnextv2.converters.runners import artifact_tensorrt as tensorrt_engine

    opened = Opened("tensorrt", "TensorRT", [], [])
    opened.precision_how = "not inspected (an engine is opaque without its runtime)"
    opened.unavailable = tensorrt_engine.why_unavailable()
    if opened.unavailable is not None:
        return opened
    try:
        trt, engine = tensorrt_engine.load_engine(path)
    except RuntimeError as exc:
        opened.unavailable = str(exc)
        return opened
    inputs, outputs = tensorrt_engine.io_tensors(trt, engine)
    opened.runtime = f"TensorRT {trt.__version__}"
    opened.inputs = [Port(name, shape, dtype) for name, shape, dtype in inputs]
    opened.outputs = [Port(name, shape, dtype) for name, shape, dtype in outputs]
    # What an engine computes in is its builder's choice per layer; the I/O types are all it says. An engine built
    # with float16 layers and float32 I/O is judged by the float32 rule unless --artifact-precision says float16.
    if any(port.dtype == "float16" for port in opened.outputs):
        opened.precision, opened.precision_how = "float16", "float16 outputs (layer precisions are not readable)"
    else:
        opened.precision_how = ("float32 I/O; the builder's layer precisions are not readable: pin "
                                "--artifact-precision float16 for an engine built with float16 layers")
    opened.run = tensorrt_engine.runner(trt, engine)
    return opened


def open_coreml(path: Path) -> Opened:
    opened = Opened("coreml", "Core ML", [], [])
    if sys.platform != "darwin":
        opened.unavailable = "Core ML runs only on macOS (coremltools cannot run predictions on this platform)"
    else:
        opened.unavailable = (_missing("running a Core ML model", "coremltools", "coreml")
                              or "running Core ML models is not implemented by this toolkit yet")
    opened.precision_how = "not inspected (Core ML runs only on macOS)"
    return opened


OPENERS: dict[str, Callable[[Path], Opened]] = {
    "onnx": open_onnx, "litert": open_litert, "openvino": open_openvino, "executorch": open_executorch,
    "keras": open_keras, "savedmodel": open_savedmodel, "torch-export": open_torch_export,
    "tensorrt": open_tensorrt, "coreml": open_coreml,
}
# Formats whose opener reads the file only; their session is started when the artifact is run.
STARTERS: dict[str, Callable[[Path, Opened], None]] = {
    "onnx": start_onnx, "litert": start_litert, "openvino": start_openvino, "executorch": start_executorch,
}


def start(path: Path, opened: Opened) -> None:
    """The runtime session of an opened artifact (``opened.run``)."""
    if opened.run is None and opened.format in STARTERS:
        STARTERS[opened.format](path, opened)
    if opened.run is None:
        raise MissingDependencyError(opened.unavailable or f"{opened.format} artifacts cannot run here")


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
