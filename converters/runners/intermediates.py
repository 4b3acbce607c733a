"""Every intermediate tensor of one run of a deployment artifact, as its own runtime computes it.

Each reader exposes what the file computes between its input and its outputs, in topological order, with the
type of the op that produced it as the file names it (``Erf``, ``ReduceL2``, ``MVN``, ``DEPTHWISE_CONV_2D``):

- ONNX: every node output made a graph output, run by onnxruntime with every graph optimisation off (the graph as
  written, not onnxruntime's fusion of it);
- OpenVINO IR: every op output added to the model's results, compiled on the CPU with INFERENCE_PRECISION_HINT f32
  (the plugin's default would run bfloat16 on some CPUs);
- LiteRT ``.tflite``: the interpreter with ``experimental_preserve_all_tensors``, every op output of the main
  subgraph; int8/int16 tensors dequantized with their scale and zero point.
- torch.export ``.pt2``: the program's graph module run node by node (``torch.fx.Interpreter``), every ATen op's
  output kept, in the program's own dtype (a float16 program's overflow is seen where it happens).

Constants and ops fed only by constants (weight dequantization, shape arithmetic) are left out: they are not
activations. converters/runners/localise.py maps the tensors onto the model's stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.reference.errors import MissingDependencyError

# Formats whose runtime cannot hand out what it computes inside: the reason, for "only the final output was judged".
_NO_INTERMEDIATES = {
    "executorch": "an ExecuTorch program returns only its outputs (its delegates keep what they compute inside)",
    "keras": "a Keras model is run through its outputs only (its layers are not re-run one by one here)",
    "savedmodel": "a SavedModel is run through its serving signature, which returns only its outputs",
    "tensorrt": "a TensorRT engine returns only its bindings (its layers are fused when it is built)",
    "coreml": "a Core ML model returns only its outputs",
}


@dataclasses.dataclass
class Tensor:
    """One intermediate of one run: its name in the file, the type of the op that produced it and its value.

    ``inputs``: the names of the activations the op read (constants left out), so graph structure (a residual
    Add of two activations) can be recognised."""

    name: str
    op: str
    array: np.ndarray
    inputs: tuple[str, ...] = ()


Keep = Callable[[str, np.ndarray], bool]


def activations_only(name: str, array: np.ndarray) -> bool:
    """The default filter: floating-point tensors of rank 2 to 4, what ConvNeXt V2's features and block
    intermediates are (shapes, indices and per-image scalars are left out, to keep memory bounded)."""
    return array.dtype.kind == "f" and 2 <= array.ndim <= 4


def intermediate_tensors(probe_format: str, path: Path, feed: Mapping[str, np.ndarray],
                         keep: Keep | None = None) -> list[Tensor] | str:
    """Every intermediate tensor of one run of the artifact at ``path`` on ``feed`` (its inputs by name, already
    in the artifact's own layout, range and dtype), in topological order; ``keep`` chooses which are held (default
    :func:`activations_only`). A str says why none can be read for this format."""
    keep = keep or activations_only
    readers = {"onnx": _onnx_tensors, "openvino": _openvino_tensors, "litert": _litert_tensors,
               "torch-export": _torch_export_tensors}
    if probe_format in readers:
        return readers[probe_format](Path(path), feed, keep)
    return _NO_INTERMEDIATES.get(probe_format, f"no intermediate tensor can be read from a {probe_format} artifact")


# ------------------------------------------------------------------ ONNX

_ONNX_FLOATS = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _onnx_tensors(path: Path, feed: Mapping[str, np.ndarray], keep: Keep) -> list[Tensor]:
    try:
        import onnx
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("reading an ONNX graph's tensors needs onnx: pip install "
                                     "'convnextv2-toolkit[onnx]'") from exc
    from convnextv2.converters.onnx.session import ort_session

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants.update(init.values.name for init in graph.sparse_initializer)
    known = _onnx_value_types(model)
    produced: list[tuple[str, str, tuple[str, ...]]] = []
    for node in graph.node:
        live = tuple(name for name in node.input if name and name not in constants)
        if node.op_type == "Constant" or not live and node.input:
            constants.update(name for name in node.output if name)
            continue
        for name in node.output:
            if name:
                produced.append((name, node.op_type, live))
    present = {output.name for output in graph.output}
    for name, _, _ in produced:
        if name in present:
            continue
        elem_type, rank = known.get(name, (None, None))
        if elem_type is not None and (elem_type not in _ONNX_FLOATS or rank is not None and not 1 < rank < 5):
            continue  # not an activation the filter would keep: never made an output, never computed into memory
        graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None) if elem_type
                            else onnx.helper.make_empty_tensor_value_info(name))
        present.add(name)
    # The rewritten graph is run from memory; its external data is read where it lies, beside the user's file.
    session = ort_session(model.SerializeToString(), optimise=False, external_data_folder=path.parent)
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(names, dict(feed)), strict=True))
    del session, model
    tensors = []
    for name, op, live in produced:
        array = values.pop(name, None)
        if isinstance(array, np.ndarray) and keep(name, array):
            tensors.append(Tensor(name, op, array, live))
    return tensors


def _onnx_value_types(model: Any) -> dict[str, tuple[int, int | None]]:
    """name -> (element type, rank or None) wherever the file or ONNX's shape inference knows it."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph shape inference cannot follow (custom domains): its own value_info only
        inferred = model
    types = {}
    for info in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
            types[info.name] = (tensor_type.elem_type, rank)
    return types


# ------------------------------------------------------------------ OpenVINO IR

_OV_SKIPPED = {"Parameter", "Result", "Constant"}


def _openvino_tensors(path: Path, feed: Mapping[str, np.ndarray], keep: Keep) -> list[Tensor]:
    try:
        import openvino as ov
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("running an OpenVINO IR needs openvino: pip install "
                                     "'convnextv2-toolkit[openvino]'") from exc
    from convnextv2.converters.openvino import PRECISION_HINTS

    core = ov.Core()
    model = core.read_model(str(path))
    constant: set[str] = set()
    ports: list[tuple[str, str, tuple[str, ...], Any]] = []
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant" or (kind not in _OV_SKIPPED and op.get_input_size()
                                  and all(_ov_node(i).get_friendly_name() in constant for i in op.inputs())):
            constant.add(op.get_friendly_name())  # weight decompression (Convert of f16), shape arithmetic
            continue
        if kind in _OV_SKIPPED:
            continue
        live = tuple(_ov_port_name(i.get_source_output()) for i in op.inputs()
                     if _ov_node(i).get_friendly_name() not in constant)
        for output in op.outputs():
            rank = output.get_partial_shape().rank
            if not output.get_element_type().is_real() or rank.is_static and not 1 < rank.get_length() < 5:
                continue
            ports.append((_ov_port_name(output), kind, live, output))
    model.add_outputs([output for _, _, _, output in ports])
    # The model's results (the original ones, then one per port added; a port already a result is not added twice)
    # by the port they read.
    result_of = {}
    for position, result in enumerate(model.outputs):
        source = result.get_node().input_value(0)
        result_of.setdefault((source.get_node().get_friendly_name(), source.get_index()), position)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS["float32"]})
    request = compiled.create_infer_request()
    request.infer(dict(feed))
    tensors = []
    for name, kind, live, output in ports:
        position = result_of.get((output.get_node().get_friendly_name(), output.get_index()))
        if position is None:
            continue
        array = np.array(request.get_output_tensor(position).data, copy=True)
        if keep(name, array):
            tensors.append(Tensor(name, kind, array, live))
    return tensors


def _ov_node(port: Any) -> Any:
    return port.get_source_output().get_node()


def _ov_port_name(output: Any) -> str:
    node = output.get_node()
    name = node.get_friendly_name()
    return name if node.get_output_size() == 1 else f"{name}:{output.get_index()}"


# ------------------------------------------------------------------ LiteRT

def _litert_tensors(path: Path, feed: Mapping[str, np.ndarray], keep: Keep) -> list[Tensor]:
    from convnextv2.converters.litert import interpreter_name

    if interpreter_name() == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    else:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806  # the class, named as its module names it
        OpResolverType = tf.lite.experimental.OpResolverType  # noqa: N806
    # Without the default XNNPACK delegate: a delegated subgraph keeps its intermediate results to itself, so
    # the tensors the interpreter "preserves" inside it hold whatever the arena had (1e15 read as a stem).
    interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    indices = _litert_feed_indices(interpreter, feed)
    for index, array in indices.values():
        interpreter.resize_tensor_input(index, list(array.shape))
    interpreter.allocate_tensors()
    for index, array in indices.values():
        interpreter.set_tensor(index, np.ascontiguousarray(array))
    interpreter.invoke()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    # The model's own ops in their order (topological); a delegate node, should one still be applied, is left out.
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]
    produced = {out for op in ops for out in op["outputs"]}
    graph_inputs = {index for index, _ in indices.values()}
    constant = {index for index in details if index not in produced and index not in graph_inputs}
    tensors = []
    seen: set[int] = set()
    for op in ops:
        live = [i for i in op["inputs"] if i >= 0 and i not in constant]
        if not live:
            constant.update(op["outputs"])  # DEQUANTIZE of float16 / int8 weights
            continue
        names = tuple(details[i]["name"] for i in live)
        for index in op["outputs"]:
            if index < 0 or index in seen:
                continue
            seen.add(index)
            try:
                array = _dequantized(interpreter.get_tensor(index), details[index])
            except ValueError:  # a tensor the interpreter freed or never allocated
                continue
            if keep(details[index]["name"], array):
                tensors.append(Tensor(details[index]["name"], op["op_name"], array, names))
    return tensors


def _litert_feed_indices(interpreter: Any, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, np.ndarray]]:
    """Feed names -> (input tensor index, array): by tensor name, else by the signature's input name."""
    by_name = {d["name"]: d["index"] for d in interpreter.get_input_details()}
    by_signature: dict[str, int] = {}
    for signature in interpreter._get_full_signature_list().values():
        by_signature.update(signature.get("inputs", {}))
    found = {}
    for name, array in feed.items():
        index = by_name.get(name, by_signature.get(name))
        if index is None and len(feed) == len(by_name) == 1:
            index = next(iter(by_name.values()))
        if index is None:
            raise KeyError(f"the .tflite file has no input named {name!r} (inputs: {', '.join(by_name)})")
        found[name] = (index, np.asarray(array))
    return found


def _dequantized(array: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    array = np.array(array, copy=True)
    if array.dtype.kind not in "iu":
        return array
    quant = detail.get("quantization_parameters") or {}
    scales = np.asarray(quant.get("scales", ()), dtype=np.float32)
    if not scales.size:
        return array  # a true integer tensor (indices, shapes), not a quantized activation
    zero_points = np.asarray(quant.get("zero_points", ()), dtype=np.float32)
    if scales.size > 1:  # per-channel: along the quantized dimension
        shape = [1] * array.ndim
        shape[int(quant.get("quantized_dimension", 0))] = scales.size
        scales = scales.reshape(shape)
        zero_points = zero_points.reshape(shape) if zero_points.size == scales.size else zero_points
    return ((array.astype(np.float32) - zero_points) * scales).astype(np.float32)


# ------------------------------------------------------------------ torch.export

def _torch_export_tensors(path: Path, feed: Mapping[str, np.ndarray], keep: Keep) -> list[Tensor]:
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("running a torch.export program needs torch: pip install "
                                     "'convnextv2-toolkit[torch]'") from exc

    program = torch.export.load(str(path))
    names = list(program.graph_signature.user_inputs)
    arrays = [feed[name] for name in names] if all(name in feed for name in names) else list(feed.values())
    module = program.module()
    tensors: list[Tensor] = []
    # Parameters and buffers (get_attr) and what is computed from them alone are constants, not activations.
    constant: set[str] = set()

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            value = super().run_node(node)
            if node.op == "get_attr" or node.op == "call_function" and all(
                    n.name in constant for n in node.all_input_nodes):
                constant.add(node.name)
            elif node.op == "call_function" and isinstance(value, torch.Tensor) and value.is_floating_point():
                live = tuple(n.name for n in node.all_input_nodes if n.name not in constant)
                array = value.detach().float().numpy() if value.dtype == torch.bfloat16 else value.detach().numpy()
                if keep(node.name, array):
                    tensors.append(Tensor(node.name, _aten_name(node.target), array.copy(), live))
            return value

    with torch.inference_mode():
        Recorder(module).run(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
    return tensors


def _aten_name(target: Any) -> str:
    """``aten.linalg_vector_norm.default`` -> ``linalg_vector_norm``; ``operator.getitem`` -> ``getitem``."""
    text = str(target)
    parts = text.split(".")
    return parts[1] if text.startswith("aten.") and len(parts) > 1 else getattr(target, "__name__", text)
