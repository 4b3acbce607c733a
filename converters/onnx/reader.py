"""ONNX files: written by exporting a reference (converters/onnx/export.py), read back by graph structure.

Reading never trusts initializer names (exporters fold, pre-transpose and rename them). It walks the
graph from its input in topological order, folds constant subgraphs (initializers, ``Constant`` nodes and
Transpose/Reshape/Cast/... of them), turns every node that touches a weight into an event (convolution,
linear, LayerNormalization, scale, shift) and parses the event stream with ConvNeXt V2's grammar:

    stem:       Conv 4x4/4 (3 -> C0), LayerNorm(C0)
    block:      depthwise Conv 7x7 (groups C), LayerNorm(C), linear C->4C, exact GELU (Erf or Gelu),
                GRN (L2 over H,W, as ReduceL2 or the square root of a sum of squares, possibly summed by a
                MatMul with a row of ones; scale gamma and shift beta), linear 4C->C, residual
    downsample: LayerNorm(C), Conv 2x2/2
    head:       global mean, LayerNorm(C3), linear C3->K      (either part may be absent in encoders)

A LayerNorm is either the fused op or its decomposition (mean, variance, divide, then a scale and a shift in
any order); a linear is MatMul (+ Add bias), Gemm, or a 1x1 Conv (timm's small models). The layout of the
activations does not matter (tf2onnx NHWC graphs work), because ONNX Conv weights are always OIHW and linear
weights are oriented by the operator's own semantics.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard, cast

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source, checkpoint_from_metadata
from convnextv2.converters.digests import sha256_of
from convnextv2.converters.format_limits import Change, dropped_extras
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, MissingDependencyError
from convnextv2.reference.variants import (
    GRN_EPS,
    LAYER_NORM_EPS,
    MLP_RATIO,
    NUM_STAGES,
    ModelConfig,
    check_variant,
)

NAME = "onnx"

# Ops whose output is computed from constants here, so weights reached through them count as constants.
_FOLDABLE = {"Identity", "Cast", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Concat"}
# Ops that move or relabel values without computing with them: a bias Add after one of these still adds to
# the output of the node before it.
_LAYOUT = {"Identity", "Cast", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Dropout"}
# Ops recorded between weight events so the parser can check GELU, GRN and pooling are where they belong.
_MARKERS = {"Erf", "Gelu", "Tanh", "ReduceL2", "ReduceSum", "ReduceSumSquare", "Sqrt", "Pow", "ReduceMean",
            "GlobalAveragePool", "Div", "Reciprocal"}
# Every other op on the path from the image to the output is one ConvNeXt V2 does not have; it becomes an
# "unexpected" event, which no rule of the grammar accepts, so the refusal names it where it stands.
# The ONNX operator set proper; every other domain is a runtime's or a vendor's extension.
_STANDARD_DOMAINS = ("", "ai.onnx")
# Element types of quantized weights (and of the activations of quantized graphs).
_QUANTIZED_TYPES = {"INT8", "UINT8", "INT4", "UINT4", "INT2", "UINT2", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
                    "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1"}
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                  "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
                  "QLinearLeakyRelu", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
                  "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QLinearLayerNormalization",
                  "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "MatMulNBits",
                  "MatMulBnb4", "GatherBlockQuantized", "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul",
                  "QOrderedLayerNormalization", "QOrderedGelu"}


# ------------------------------------------------------------------------------------------------ sniff


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def sniff(path: Path) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, varint) then a known field; cheap and never raises."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as handle:
            head = handle.read(64)
        if len(head) < 4 or head[0] != 0x08:
            return False
        ir_version, pos = _varint(head, 1)
        if not 3 <= ir_version <= 20 or pos >= len(head):
            return False
        # producer_name, producer_version, domain, model_version, doc_string, graph, opset_import
        return head[pos] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------- graph loading


def _import_onnx() -> Any:
    try:
        import onnx
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("reading ONNX files needs onnx: pip install 'convnextv2-toolkit[onnx]'") from exc
    return onnx


def _tensor_array(tensor: Any, base: Path, where: str) -> np.ndarray:
    """An initializer as numpy; external data is memory-mapped, and may not point outside the model's folder.
    Every declared size is checked against the bytes actually present before anything is allocated."""
    onnx = _import_onnx()
    from onnx import numpy_helper

    name = tensor.name
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"{where}: tensor {name!r} has an unsupported data type {tensor.data_type}") from None
    shape = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in shape):
        raise BadInputError(f"{where}: tensor {name!r} declares a negative dimension {list(shape)}")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        if tensor.HasField("raw_data"):
            present = len(tensor.raw_data)
        else:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
            # Typed fields hold one element per slot (float16 and int8 widened into int32_data), so the element
            # count times the item size is the payload either way.
            present = len(getattr(tensor, field)) * dtype.itemsize if field else 0
        if present != nbytes:
            raise BadInputError(f"{where}: tensor {name!r} declares shape {list(shape)} ({nbytes} bytes of {dtype}) "
                                f"but holds {present} bytes")
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError, KeyError) as exc:
            raise BadInputError(f"{where}: tensor {name!r} cannot be decoded: {exc}") from None
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    file = (base / location).resolve()
    if base.resolve() not in file.parents or not file.is_file():
        raise BadInputError(f"{where}: tensor {name!r} points to external data {location!r}, "
                            "which is not a file beside the model")
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", nbytes))
    except ValueError:
        raise BadInputError(f"{where}: external data of {name!r} has a non-integer offset or length") from None
    if offset < 0 or length != nbytes or offset + length > file.stat().st_size:
        raise BadInputError(f"{where}: external data of {name!r} has {length} bytes at offset {offset}, "
                            f"expected {nbytes} within {file.name}")
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)


def _int_list(value: Any) -> list[int] | None:
    """An attribute as a list of ints; None when a hostile or broken graph stores something else there."""
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None


def _attrs(node: Any) -> dict[str, Any]:
    onnx = _import_onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _fold(node: Any, inputs: list[np.ndarray]) -> np.ndarray:
    onnx = _import_onnx()
    attrs = _attrs(node)
    op = node.op_type
    x = inputs[0]
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op == "Reshape":
        shape = [int(s) for s in inputs[1]]
        shape = [x.shape[i] if s == 0 and not attrs.get("allowzero", 0) else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes: Any = attrs.get("axes", list(inputs[1]) if len(inputs) > 1 else None)
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)
        out = x
        rank = x.ndim + len(axes)
        for axis in sorted(int(a) % rank for a in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Flatten":
        axis = attrs.get("axis", 1) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Concat":
        return np.concatenate(inputs, axis=attrs["axis"])
    raise ValueError(op)


def _node_label(node: Any) -> str:
    """``domain:op_type node 'name'``: how every refusal names a node (the standard domain is left out)."""
    op = f"{node.domain}:{node.op_type}" if node.domain not in _STANDARD_DOMAINS else node.op_type
    return f"{op} node {node.name or (node.output[0] if node.output else '?')!r}"


@dataclasses.dataclass
class _Event:
    # conv, linear, ln, scale, shift, scalar_add, op (a marker), unsupported (a weight op in a form the reader
    # does not take), unexpected (an op ConvNeXt V2 does not have)
    kind: str
    node: Any
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The node (not a layout op) whose output this event's data input is; None for the graph input.
    after: Any = None

    @property
    def w(self) -> np.ndarray:
        """``weight``, typed for the kinds that always carry one (conv, linear, ln, scale, shift, scalar_add)."""
        return cast(np.ndarray, self.weight)

    def describe(self) -> str:
        node = _node_label(self.node)
        if self.kind == "conv":
            k = self.attrs.get("kernel_shape")
            return (f"{node} (weight {list(self.w.shape)}, kernel {k}, stride {self.attrs.get('strides')}, "
                    f"groups {self.attrs.get('group', 1)})")
        if self.kind == "unexpected":
            return f"{node}, an op ConvNeXt V2 does not have"
        if self.weight is not None:
            return f"{node} ({self.kind} with a constant of shape {list(self.weight.shape)})"
        if "approximate" in self.attrs:
            return f"{node} (approximate={_text(self.attrs['approximate'])!r})"
        return node


def _refuse_quantized(model: Any, where: str) -> None:
    """Quantized weights are not the float weights a checkpoint holds: refused before anything is decoded."""
    onnx = _import_onnx()
    for node in model.graph.node:
        if node.op_type in _QUANTIZED_OPS:
            raise BadInputError(f"{where}: a quantized graph ({_node_label(node)}); only float graphs are read: "
                                "convert the float model it was quantized from")
    tensors = [(t.name, t.data_type) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [(node.output[0], a.t.data_type) for a in node.attribute if a.name == "value"]
    for name, data_type in tensors:
        try:
            type_name = onnx.TensorProto.DataType.Name(data_type)
        except ValueError:
            continue  # an unknown type is refused, named, when the tensor is decoded
        if type_name in _QUANTIZED_TYPES:
            raise BadInputError(f"{where}: a quantized graph (tensor {name!r} is {type_name}); only float graphs "
                                "are read: convert the float model it was quantized from")


def _refuse_foreign(node: Any, where: str) -> None:
    """Ops outside the ONNX standard mean what their runtime says; the ones mapped exactly are in ``_event``."""
    if node.domain == "com.microsoft.nchwc":
        raise BadInputError(
            f"{where}: {_node_label(node)} is onnxruntime's NCHWc blocked layout (saved from a session at "
            "ORT_ENABLE_ALL), whose weights are reordered and padded for this machine's vector width, not a "
            "ConvNeXt V2 weight; read the graph as exported, or one saved at ORT_ENABLE_EXTENDED or below")
    raise BadInputError(f"{where}: {_node_label(node)} is outside the standard ONNX domain and the reader does not "
                        f"map {node.op_type!r} of {node.domain!r} exactly; read the graph as exported, before any "
                        "runtime-specific optimisation")


def _events(model: Any, where: str, base: Path) -> tuple[list[_Event], dict[str, Any]]:
    """Walk the nodes reachable from the graph input; every weight-touching node becomes an event."""
    graph = model.graph
    _refuse_quantized(model, where)
    const: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        const[tensor.name] = _tensor_array(tensor, base, where)
    inputs = [v for v in graph.input if v.name not in const]
    if len(inputs) != 1:
        raise BadInputError(f"{where}: expected one image input, found {len(inputs)} ({[v.name for v in inputs]})")
    dynamic = {inputs[0].name}
    # Values computed from the input's shape only (Shape -> Gather -> Concat -> Reshape's shape operand): they
    # carry no image data, so the ops computing them are neither weights nor part of the function.
    shape_only: set[str] = set()
    ones: set[str] = set()  # shape-only values that are all ones (an Expand of 1, a ConstantOfShape of 1)
    # For every data value: the node that computed it, looking through layout ops (None: the graph input).
    origin: dict[str, Any] = {inputs[0].name: None}
    events: list[_Event] = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS:
            onnx = _import_onnx()
            attrs = _attrs(node)
            if "value" in attrs:
                const[node.output[0]] = onnx.numpy_helper.to_array(attrs["value"])
            elif "value_float" in attrs or "value_int" in attrs:
                const[node.output[0]] = np.array(attrs.get("value_float", attrs.get("value_int")))
            elif "value_floats" in attrs or "value_ints" in attrs:
                const[node.output[0]] = np.array(attrs.get("value_floats", attrs.get("value_ints")))
            continue
        if node.domain not in _STANDARD_DOMAINS and node.op_type not in _MAPPED.get(node.domain, ()):
            _refuse_foreign(node, where)
        present = [name for name in node.input if name]
        if not any(name in dynamic for name in present):
            if node.op_type in _FOLDABLE and all(name in const for name in present):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    const[node.output[0]] = _fold(node, [const[name] for name in present])
            continue
        dynamic.update(node.output)
        data = [name for name in present if name in dynamic and name not in shape_only]
        if node.op_type in ("Shape", "Size") or not data:
            shape_only.update(node.output)
            if _fills_with_ones(node, const):
                ones.update(node.output)
            continue
        if node.op_type == "MatMul" and node.input[0] in ones:
            # A row of ones sized from the input's shape (a dynamic-size export) times the activation: a sum
            # over its rows, as with a constant row of ones.
            events.append(_Event("op", node, after=origin.get(data[0])))
            origin[node.output[0]] = node
            continue
        source = origin.get(data[0])
        if node.op_type in _LAYOUT or (node.op_type == "Gather" and _gather_keeps_order(node, const)):
            for out in node.output:
                origin[out] = source
            if node.op_type != "Dropout" or _dropout_is_identity(node, const):
                continue
        for out in node.output:
            origin[out] = node
        for event in _event(node, const, shape_only):
            event.after = source
            events.append(event)
    return events, {"input": inputs[0]}


def _fills_with_ones(node: Any, const: dict[str, np.ndarray]) -> bool:
    if node.op_type == "Expand":
        value = const.get(node.input[0])
        return _is_float(value) and bool(np.all(value == 1))
    if node.op_type == "ConstantOfShape":
        value = _attrs(node).get("value")
        if value is None:
            return False  # ONNX's default is a zero
        array = _import_onnx().numpy_helper.to_array(value)
        return _is_float(array) and bool(np.all(array == 1))
    return False


def _gather_keeps_order(node: Any, const: dict[str, np.ndarray]) -> bool:
    """A Gather of constant indices 0, 1, ..., n-1 (n > 1) moves values without choosing among them: torch's
    exporter writes a flatten of the pooled (B, C, 1, 1) map this way. One index is a selection, not a reshape."""
    indices = const.get(node.input[1]) if len(node.input) > 1 else None
    if indices is None or indices.size < 2 or not np.issubdtype(indices.dtype, np.integer):
        return False
    return bool(np.array_equal(indices.reshape(-1), np.arange(indices.size)))


def _dropout_is_identity(node: Any, const: dict[str, np.ndarray]) -> bool:
    """Dropout is the identity unless its training_mode input is a constant true (or unknown)."""
    if len(node.input) < 3 or not node.input[2]:
        return True
    mode = const.get(node.input[2])
    return mode is not None and not bool(np.asarray(mode).any())


def _const_arg(node: Any, const: dict[str, np.ndarray]) -> tuple[int | None, np.ndarray | None]:
    for index, name in enumerate(node.input[:2]):
        if name in const:
            return index, const[name]
    return None, None


def _is_float(array: np.ndarray | None) -> TypeGuard[np.ndarray]:
    return array is not None and np.issubdtype(array.dtype, np.floating)


def _linear_from_matmul(node: Any, const: dict[str, np.ndarray], trans_b: bool = False) -> _Event:
    index, weight = _const_arg(node, const)
    if weight is None:
        return _Event("unsupported", node)
    if index == 0 and weight.ndim == 2 and weight.shape[0] == 1 and bool(np.all(weight == 1)) and not trans_b:
        # A row of ones times the activation is a sum over its rows (our GRN's sum of squares).
        return _Event("op", node)
    if index != 1 or weight.ndim != 2:
        return _Event("unsupported", node, weight)
    return _Event("linear", node, weight if trans_b else weight.T)


def _microsoft_event(node: Any, const: dict[str, np.ndarray]) -> list[_Event]:
    """The com.microsoft fusions onnxruntime writes into a graph it saves at ORT_ENABLE_EXTENDED, mapped exactly
    onto what they replaced."""
    op = node.op_type
    attrs = _attrs(node)
    if op == "Gelu":  # onnxruntime's Gelu kernel is the erf form, 0.5 x (1 + erf(x / sqrt 2))
        return [_Event("op", node, attrs={"approximate": "none"})]
    if op == "BiasGelu":  # Gelu(A + B): B is the bias of the linear before it, added to the last axis
        bias = const.get(node.input[1]) if len(node.input) > 1 else None
        if not _is_float(bias) or bias.ndim != 1:
            return [_Event("unsupported", node, bias)]
        return [_Event("shift", node, bias), _Event("op", node, attrs={"approximate": "none"})]
    if op == "FusedMatMul":  # alpha * op(A) @ op(B): a linear when B is a constant matrix and nothing else is set
        if (attrs.get("transA", 0) or attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0)
                or float(attrs.get("alpha", 1.0)) != 1.0):
            return [_Event("unsupported", node)]
        return [_linear_from_matmul(node, const, trans_b=bool(attrs.get("transB", 0)))]
    raise AssertionError(op)  # _MAPPED lists exactly the ops above


# Ops outside the standard domain that the reader maps exactly (everything else there is refused by name).
_MAPPED: dict[str, tuple[str, ...]] = {"com.microsoft": ("Gelu", "BiasGelu", "FusedMatMul")}


def _event(node: Any, const: dict[str, np.ndarray], shape_only: set[str] | None = None) -> list[_Event]:
    op = node.op_type
    if node.domain not in _STANDARD_DOMAINS:
        return _microsoft_event(node, const)
    if op == "Conv":
        weight = const.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            return [_Event("unsupported", node)]
        attrs = _attrs(node)
        attrs.setdefault("kernel_shape", list(weight.shape[2:]))
        attrs.setdefault("strides", [1] * (weight.ndim - 2))
        attrs.setdefault("group", 1)
        bias = const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return [_Event("conv", node, weight, bias, attrs)]
    if op == "MatMul":
        return [_linear_from_matmul(node, const)]
    if op == "Gemm":
        attrs = _attrs(node)
        weight = const.get(node.input[1])
        if weight is None or attrs.get("transA", 0):
            return [_Event("unsupported", node, weight)]
        weight = weight if attrs.get("transB", 0) else weight.T
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, weight.dtype)
        bias = const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if bias is not None and beta != 1.0:
            bias = bias * np.asarray(beta, bias.dtype)
        return [_Event("linear", node, weight, bias)]
    if op == "LayerNormalization":
        scale = const.get(node.input[1]) if len(node.input) > 1 else None
        bias = const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            return [_Event("unsupported", node)]
        return [_Event("ln", node, scale, bias, _attrs(node))]
    if op in ("Mul", "Add", "Sub", "Div"):
        index, value = _const_arg(node, const)
        if not _is_float(value):
            return [_Event("op", node)] if op == "Div" else []
        if value.size == 1:
            if op == "Add":
                return [_Event("scalar_add", node, value.reshape(()))]
            # The erf GELU's 0.5 and 1/sqrt(2); kept as markers so nothing passes unseen after the head.
            return [_Event("op", node)]
        flat = value.reshape(-1)
        if op == "Mul":
            return [_Event("scale", node, flat)]
        if op == "Add":
            return [_Event("shift", node, flat)]
        if op == "Sub":  # x - c is a shift by -c; c - x negates x, which no ConvNeXt V2 graph does
            return [_Event("shift", node, -flat)] if index == 1 else [_Event("unsupported", node, value)]
        return [_Event("unsupported", node, value)]
    if op in _MARKERS:
        return [_Event("op", node, attrs=_attrs(node))]
    return [_Event("unexpected", node)]


# ------------------------------------------------------------------------------------------- grammar


class _Parser:
    """Recursive descent over the events; every refusal names the node, what was expected and what was found."""

    def __init__(self, events: list[_Event], where: str):
        self.events = events
        self.where = where
        self.pos = 0
        self.markers: list[_Event] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.forms: set[str] = set()
        # Parameters the graph does not hold because they were an identity (a zero bias or shift, a unit
        # scale) and an exporter or simplifier removed the operation: read as that identity.
        self.defaults: list[str] = []

    # ---- cursor
    def _skip_markers(self) -> None:
        while self.pos < len(self.events) and self.events[self.pos].kind in ("op", "scalar_add"):
            self.markers.append(self.events[self.pos])
            self.pos += 1

    def peek(self) -> _Event | None:
        self._skip_markers()
        return self.events[self.pos] if self.pos < len(self.events) else None

    def lookahead(self) -> _Event | None:
        """The next event that is not a marker, leaving the markers before it for the part that owns them."""
        pos = self.pos
        while pos < len(self.events) and self.events[pos].kind in ("op", "scalar_add"):
            pos += 1
        return self.events[pos] if pos < len(self.events) else None

    def take(self) -> _Event:
        event = self.peek()
        assert event is not None
        self.pos += 1
        return event

    def take_markers(self) -> list[_Event]:
        markers, self.markers = self.markers, []
        return markers

    def fail(self, expected: str, found: _Event | None) -> BadInputError:
        what = found.describe() if found is not None else "the end of the graph"
        return BadInputError(f"{self.where}: not a ConvNeXt V2 graph: expected {expected}; found {what}")

    def expect(self, expected: str, ok: Any) -> _Event:
        event = self.peek()
        if event is None or not ok(event):
            raise self.fail(expected, event)
        return self.take()

    # ---- pieces
    def bias_after(self, event: _Event, width: int, label: str) -> np.ndarray:
        """The operator's own bias, else an Add of a (width,) constant straight onto its output (through layout
        ops only), else zeros: exporters and simplifiers drop a bias that is all zeros, which is the same
        function. Anything else added later belongs to another part of the grammar, which checks it there."""
        if event.bias is not None:
            return event.bias.reshape(-1)
        nxt = self.lookahead()
        if nxt is not None and nxt.kind == "shift" and nxt.after is event.node:
            if nxt.w.size != width:
                raise self.fail(f"the bias of {label}: an Add of a ({width},) constant", nxt)
            return self.take().w
        return self.filled(label, "bias", np.zeros(width, dtype=np.float32))

    def filled(self, label: str, what: str, value: np.ndarray) -> np.ndarray:
        self.defaults.append(f"{label}: {what}")
        return value

    def conv(self, label: str, width_in: int | None, kernel: int, stride: int, groups_equal_width: bool) -> tuple[np.ndarray, np.ndarray]:
        def ok(e: _Event) -> bool:
            if e.kind != "conv" or e.w.ndim != 4:
                return False
            w = e.w
            group = e.attrs.get("group", 1)
            if not isinstance(group, int):
                return False
            shape_ok = (_int_list(e.attrs.get("kernel_shape")) == [kernel, kernel]
                        and _int_list(e.attrs.get("strides")) == [stride, stride])
            if groups_equal_width:
                return shape_ok and group == w.shape[0] and w.shape[1] == 1 and (width_in is None or group == width_in)
            return shape_ok and group == 1 and (width_in is None or w.shape[1] == width_in)

        groups = "groups = channels" if groups_equal_width else "groups 1"
        source = f"{width_in} input channels" if width_in else "any width"
        event = self.expect(f"{label}: Conv with kernel {kernel}x{kernel}, stride {stride}, {groups}, {source}", ok)
        self.check_pads(event, label, kernel)
        weight = event.w
        return weight, self.bias_after(event, weight.shape[0], label)

    def check_pads(self, event: _Event, label: str, kernel: int) -> None:
        pads = _int_list(event.attrs.get("pads", [0, 0, 0, 0]))
        auto = event.attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        want = [kernel // 2] * 4 if kernel == 7 else [0, 0, 0, 0]
        if auto in ("SAME_UPPER", "SAME_LOWER") and kernel == 7:
            return
        if pads != want and auto in ("NOTSET", ""):
            raise self.fail(f"{label} with padding {want}", event)

    def layer_norm(self, width: int, label: str) -> tuple[np.ndarray, np.ndarray, float]:
        """The fused op or its decomposition. A unit scale or a zero shift may have been removed by a
        simplifier (onnxsim, onnxslim, onnxruntime drop a multiply by ones and an add of zeros): read as 1 / 0."""
        event = self.peek()
        if event is not None and event.kind == "ln":
            if event.w.size != width or (event.bias is not None and event.bias.size != width):
                raise self.fail(f"{label}: LayerNormalization over {width} channels", event)
            epsilon = event.attrs.get("epsilon", 1e-5)
            # A hostile graph can give the attribute another type (get_attribute_value then returns None, a
            # graph, a list...): refuse it by name instead of failing inside float().
            if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
                raise self.fail(f"{label}: LayerNormalization with a number as its epsilon attribute", event)
            self.take()
            self.forms.add("LayerNormalization")
            self.take_markers()
            # The bias input is optional; an exporter may also add the shift as its own node.
            fused_shift = self.bias_after(event, width, f"{label}: shift") if event.bias is None else event.bias
            return event.w.reshape(-1), fused_shift.reshape(-1), float(epsilon)
        expected = (f"{label}: LayerNorm over {width} channels (LayerNormalization, or a mean over channels, "
                    f"the variance and its epsilon, then a ({width},) scale and shift)")
        ops = {m.node.op_type for m in self.markers}
        eps_markers = [m for m in self.markers if m.kind == "scalar_add"]
        if "ReduceMean" not in ops or not eps_markers or not {"Sqrt", "Reciprocal", "Pow"} & ops:
            raise self.fail(expected, event)
        eps = float(eps_markers[-1].w)
        self.take_markers()
        scale: np.ndarray | None = None
        shift: np.ndarray | None = None
        if event is not None and event.kind == "scale" and event.w.size == width:
            scale = self.take().w
            event = self.peek()
            if self.markers:  # the shift adds to the scaled value, with nothing computed in between
                raise self.fail(expected, event)
        if event is not None and event.kind == "shift" and event.w.size == width:
            shift = self.take().w
        if scale is None:
            scale = self.filled(label, "scale", np.ones(width, dtype=np.float32))
        if shift is None:
            shift = self.filled(label, "shift", np.zeros(width, dtype=np.float32))
        self.forms.add("decomposed LayerNorm")
        return scale, shift, eps

    def linear(self, width_in: int, width_out: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        def ok(e: _Event) -> bool:
            if e.kind == "linear":
                return e.w.shape == (width_out, width_in)
            if e.kind == "conv":
                return (e.w.shape == (width_out, width_in, 1, 1) and int(e.attrs.get("group", 1)) == 1
                        and list(e.attrs.get("strides", [1, 1])) == [1, 1])
            return False

        event = self.expect(f"{label}: a linear {width_in} -> {width_out} (MatMul, Gemm or 1x1 Conv)", ok)
        weight = event.w.reshape(width_out, width_in)
        return weight, self.bias_after(event, width_out, label)

    def grn(self, width: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        found = self.peek()  # collects the markers up to GRN's first weight
        gelu = [m for m in self.markers if m.node.op_type in ("Erf", "Gelu", "BiasGelu", "Tanh")]
        if not gelu or gelu[0].node.op_type == "Tanh" or (
                gelu[0].node.op_type in ("Gelu", "BiasGelu")
                and _text(gelu[0].attrs.get("approximate", "none")) != "none"):
            raise self.fail(f"{label}: the exact GELU (Erf or Gelu with approximate='none') after the first linear",
                            gelu[0] if gelu else found)
        # x + gamma * (x * N) + beta is one sum: an exporter may add beta to x before the gamma term. A shift
        # seen before gamma is beta only once the GELU is behind it (a linear's own bias comes before the GELU).
        beta: np.ndarray | None = None
        if found is not None and found.kind == "shift" and found.w.size == width:
            beta = self.take().w
        gamma = self.expect(f"{label}: GRN over {width} channels (L2 norm over H,W, channel mean, then a ({width},) "
                            "gamma scale and beta shift)", lambda e: e.kind == "scale" and e.w.size == width)
        markers = self.take_markers()
        ops = {m.node.op_type for m in markers}
        if not ({"ReduceL2", "Sqrt"} & ops and {"ReduceMean"} & ops and {"Div", "Reciprocal"} & ops):
            raise self.fail(f"{label}: GRN statistics (ReduceL2 or a square root of a sum of squares, "
                            "a channel mean, a division) before gamma", gamma)
        # The epsilon added to the channel mean is the last constant added before gamma (the erf GELU's "+ 1"
        # comes earlier).
        eps = [m for m in markers[markers.index(gelu[0]):] if m.kind == "scalar_add"]
        self.check_eps(float(eps[-1].w) if eps else float("nan"), GRN_EPS, f"{label}: the GRN denominator")
        nxt = self.peek()
        if beta is None and nxt is not None and nxt.kind == "shift" and nxt.w.size == width:
            beta = self.take().w
        elif beta is None:  # a zero beta (freshly initialised weights) is an Add of zeros, which simplifiers remove
            beta = self.filled(label, "beta", np.zeros(width, dtype=np.float32))
        self.take_markers()
        return gamma.w, beta

    def check_eps(self, eps: float, expected: float, label: str) -> None:
        if not np.isfinite(eps) or abs(eps - expected) > 1e-3 * expected:
            raise BadInputError(f"{self.where}: {label} uses eps {eps:g}; ConvNeXt V2 uses {expected:g}")

    # ---- the model
    def model(self) -> ModelConfig:
        t = self.tensors
        t["stem.conv.weight"], t["stem.conv.bias"] = self.conv("the stem", 3, 4, 4, False)
        width = t["stem.conv.weight"].shape[0]
        t["stem.norm.weight"], t["stem.norm.bias"], eps = self.layer_norm(width, "the stem LayerNorm")
        self.check_eps(eps, LAYER_NORM_EPS, "the stem LayerNorm")
        dims, depths = [width], []
        head_norm, num_classes, head_eps = False, 0, LAYER_NORM_EPS
        for stage in range(NUM_STAGES):
            if stage > 0:
                p = f"stages.{stage}.downsample"
                t[f"{p}.norm.weight"], t[f"{p}.norm.bias"], eps = self.layer_norm(width, f"the LayerNorm of downsample {stage}")
                self.check_eps(eps, LAYER_NORM_EPS, f"downsample {stage}")
                t[f"{p}.conv.weight"], t[f"{p}.conv.bias"] = self.conv(f"downsample {stage}", width, 2, 2, False)
                width = t[f"{p}.conv.weight"].shape[0]
                dims.append(width)
            block = 0
            while True:
                self.block(stage, block, width)
                block += 1
                nxt = self.peek()
                if nxt is not None and nxt.kind == "conv" and int(nxt.attrs.get("group", 1)) > 1:
                    continue
                break
            depths.append(block)
            if stage < NUM_STAGES - 1:
                continue
            nxt = self.peek()
            ops = {m.node.op_type for m in self.markers}
            # An encoder ends here (after its global mean, if it pools); a head LayerNorm whose scale and shift
            # were both removed leaves only its statistics, which an encoder does not have.
            if nxt is None and not ({"Sqrt", "Reciprocal", "Pow"} & ops):
                break
            if not {"ReduceMean", "GlobalAveragePool"} & ops:
                raise self.fail("the head: a global average over H,W after the last stage", nxt)
            t["head.norm.weight"], t["head.norm.bias"], head_eps = self.layer_norm(width, "the head LayerNorm")
            head_norm = True
            if self.peek() is not None:
                event = cast(_Event, self.peek())
                classes = event.weight.shape[0] if event.kind in ("linear", "conv") and event.weight is not None else 0
                if classes < 1:
                    raise self.fail(f"the classifier: a linear {width} -> classes", event)
                t["head.fc.weight"], t["head.fc.bias"] = self.linear(width, classes, "the classifier")
                num_classes = classes
        leftover = self.peek()
        if leftover is not None:
            raise self.fail("the end of the model after the head", leftover)
        # Nothing may be computed after the last weight but an encoder's global mean.
        trailing = [m for m in self.take_markers()
                    if head_norm or m.node.op_type not in ("ReduceMean", "GlobalAveragePool")]
        if trailing:
            raise self.fail("the end of the model after the head", trailing[0])
        if head_norm:
            head_eps = _clean_eps(head_eps)
        return ModelConfig(depths=tuple(depths), dims=tuple(dims), num_classes=num_classes, head_norm=head_norm,
                           head_norm_eps=head_eps if head_norm else LAYER_NORM_EPS)

    def block(self, stage: int, block: int, width: int) -> None:
        p = f"stages.{stage}.blocks.{block}"
        label = f"stage {stage} block {block}"
        t = self.tensors
        t[f"{p}.dwconv.weight"], t[f"{p}.dwconv.bias"] = self.conv(f"{label}: the depthwise convolution", width, 7, 1, True)
        t[f"{p}.norm.weight"], t[f"{p}.norm.bias"], eps = self.layer_norm(width, f"{label}: the LayerNorm")
        self.check_eps(eps, LAYER_NORM_EPS, f"{label}: the LayerNorm")
        hidden = MLP_RATIO * width
        t[f"{p}.pwconv1.weight"], t[f"{p}.pwconv1.bias"] = self.linear(width, hidden, f"{label}: pwconv1")
        t[f"{p}.grn.gamma"], t[f"{p}.grn.beta"] = self.grn(hidden, f"{label}: GRN")
        t[f"{p}.pwconv2.weight"], t[f"{p}.pwconv2.bias"] = self.linear(hidden, width, f"{label}: pwconv2")
        self.take_markers()


def _assumed_preprocessing(shape: list[Any], layout: str) -> Preprocessing:
    """A graph from another tool states its input size only through a static H = W; crop and interpolation
    are never in the graph. Both are marked assumed: the size is the graph's (a 384 input gets the released
    384 checkpoints' crop 1.0 / squash), the rest is the toolkit's default for that size."""
    if len(shape) == 4:
        height, width = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
        if isinstance(height, int) and height > 0 and height == width:
            return Preprocessing.for_resolution(height).with_origin("assumed")
    return Preprocessing().with_origin("assumed")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _clean_eps(eps: float) -> float:
    """fp32 attributes store 1e-6 as 9.99999997e-07: give back the decimal the exporter was given."""
    if not np.isfinite(eps):
        return LAYER_NORM_EPS
    return float(f"{float(np.float32(eps)):.6g}")


# ------------------------------------------------------------------------------------------ read/write


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    onnx = _import_onnx()
    where = str(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise BadInputError(f"{path}: not a readable ONNX file: {exc}") from None
    events, info = _events(model, where, path.parent)
    parser = _Parser(events, where)
    config = parser.model()
    # float16 files come back as float32 (exactly); transposed linears become contiguous, memmaps stay mapped.
    tensors = {name: np.ascontiguousarray(parser.tensors[name], dtype=np.float32)
               for name in schema.expected_shapes(config)}
    shape = [d.dim_value or d.dim_param for d in info["input"].type.tensor_type.shape.dim]
    layout = "NHWC" if len(shape) == 4 and shape[3] == 3 and shape[1] != 3 else "NCHW"
    meta = {p.key: p.value for p in model.metadata_props}
    preprocessing = Preprocessing()
    ckpt_info: dict[str, Any] = {}
    if meta.get("schema") == schema.SCHEMA_NAME:
        embedded = checkpoint_from_metadata(meta, {}, f"{where}: metadata_props")
        declared, preprocessing = embedded.config, embedded.preprocessing
        ckpt_info = dict(embedded.info)
        ckpt_info["exported_from"] = embedded.source.to_json_dict()
        if (declared.depths, declared.dims, declared.num_classes, declared.head_norm) != (
                config.depths, config.dims, config.num_classes, config.head_norm):
            raise BadInputError(f"{path}: the graph is {config.to_json_dict()} but its metadata declares "
                                f"{declared.to_json_dict()}")
        if config.head_norm:
            if abs(declared.head_norm_eps - config.head_norm_eps) > 1e-3 * declared.head_norm_eps:
                raise BadInputError(f"{path}: the head LayerNorm eps in the graph is {config.head_norm_eps:g} but "
                                    f"the metadata declares {declared.head_norm_eps:g}")
            config = config.with_(head_norm_eps=declared.head_norm_eps)  # the exact decimal, not fp32's
    else:
        preprocessing = _assumed_preprocessing(shape, layout)
    layout_info = {"producer": f"{model.producer_name} {model.producer_version}".strip(),
                   "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
                   "input_layout": layout, "layer_norm": sorted(parser.forms),
                   "external_data": any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)}
    if parser.defaults:  # parameters read as the identity the graph computes where their op was removed
        layout_info["identity_defaults"] = parser.defaults
    ckpt = Checkpoint(config=config, tensors=tensors, preprocessing=preprocessing,
                      source=Source(format=NAME, file_name=path.name, digest=sha256_of(path), layout=layout_info),
                      info=ckpt_info)
    ckpt.validate(where)
    check_variant(config, variant, where)
    return ckpt


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    found = dropped_extras(ckpt, "an ONNX graph")
    if options.get("fp16"):
        rounded = {name: np.asarray(value).astype(np.float16).astype(np.float32)
                   for name, value in ckpt.model_tensors().items()}
        found.append(Change("weights", "weights rounded to float16 (fp16 export)", ckpt.dtype, "float16",
                            functional=True, values=rounded))
    return found


__all__ = ["NAME", "GRN_EPS", "read", "sniff", "unrepresentable"]
