"""ONNX files: written by exporting a reference (converters/onnx_export.py), read back by graph structure.

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
import os
from pathlib import Path
from typing import Any, TypeGuard, cast

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source, checkpoint_from_metadata
from convnextv2.converters.digests import sha256_of
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
SUFFIXES = (".onnx",)

# Ops whose output is computed from constants here, so weights reached through them count as constants.
_FOLDABLE = {"Identity", "Cast", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Concat"}
# Ops recorded between weight events so the parser can check GELU, GRN and pooling are where they belong.
_MARKERS = {"Erf", "Gelu", "Tanh", "ReduceL2", "ReduceSum", "ReduceSumSquare", "Sqrt", "Pow", "ReduceMean",
            "GlobalAveragePool", "Div", "Reciprocal", "Relu", "Sigmoid", "MaxPool", "AveragePool",
            "BatchNormalization", "Softmax"}


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


@dataclasses.dataclass
class _Event:
    kind: str  # conv, linear, ln, scale, shift, scalar_add, op
    node: Any
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def w(self) -> np.ndarray:
        """``weight``, typed for the kinds that always carry one (conv, linear, ln, scale, shift, scalar_add)."""
        return cast(np.ndarray, self.weight)

    def describe(self) -> str:
        node = f"{self.node.op_type} node {self.node.name or self.node.output[0]!r}"
        if self.kind == "conv":
            k = self.attrs.get("kernel_shape")
            return (f"{node} (weight {list(self.w.shape)}, kernel {k}, stride {self.attrs.get('strides')}, "
                    f"groups {self.attrs.get('group', 1)})")
        if self.weight is not None:
            return f"{node} ({self.kind} with a constant of shape {list(self.weight.shape)})"
        if "approximate" in self.attrs:
            return f"{node} (approximate={_text(self.attrs['approximate'])!r})"
        return node


def _events(model: Any, where: str, base: Path) -> tuple[list[_Event], dict[str, Any]]:
    """Walk the nodes reachable from the graph input; every weight-touching node becomes an event."""
    graph = model.graph
    const: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        const[tensor.name] = _tensor_array(tensor, base, where)
    inputs = [v for v in graph.input if v.name not in const]
    if len(inputs) != 1:
        raise BadInputError(f"{where}: expected one image input, found {len(inputs)} ({[v.name for v in inputs]})")
    dynamic = {inputs[0].name}
    events: list[_Event] = []
    for node in graph.node:
        if node.op_type == "Constant":
            onnx = _import_onnx()
            attrs = _attrs(node)
            if "value" in attrs:
                const[node.output[0]] = onnx.numpy_helper.to_array(attrs["value"])
            elif "value_float" in attrs or "value_int" in attrs:
                const[node.output[0]] = np.array(attrs.get("value_float", attrs.get("value_int")))
            elif "value_floats" in attrs or "value_ints" in attrs:
                const[node.output[0]] = np.array(attrs.get("value_floats", attrs.get("value_ints")))
            continue
        present = [name for name in node.input if name]
        if not any(name in dynamic for name in present):
            if node.op_type in _FOLDABLE and all(name in const for name in present):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    const[node.output[0]] = _fold(node, [const[name] for name in present])
            continue
        dynamic.update(node.output)
        event = _event(node, const)
        if event is not None:
            events.append(event)
    return events, {"input": inputs[0]}


def _const_arg(node: Any, const: dict[str, np.ndarray]) -> tuple[int | None, np.ndarray | None]:
    for index, name in enumerate(node.input[:2]):
        if name in const:
            return index, const[name]
    return None, None


def _is_float(array: np.ndarray | None) -> TypeGuard[np.ndarray]:
    return array is not None and np.issubdtype(array.dtype, np.floating)


def _event(node: Any, const: dict[str, np.ndarray]) -> _Event | None:
    op = node.op_type
    if op == "Conv":
        weight = const.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            return _Event("op", node)
        attrs = _attrs(node)
        attrs.setdefault("kernel_shape", list(weight.shape[2:]))
        attrs.setdefault("strides", [1] * (weight.ndim - 2))
        attrs.setdefault("group", 1)
        bias = const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return _Event("conv", node, weight, bias, attrs)
    if op == "MatMul":
        index, weight = _const_arg(node, const)
        if weight is None:
            return _Event("op", node)
        if index == 0 and weight.ndim == 2 and weight.shape[0] == 1 and bool(np.all(weight == 1)):
            # A row of ones times the activation is a sum over its rows (our GRN's sum of squares).
            return _Event("op", node)
        if index != 1 or weight.ndim != 2:
            return _Event("unsupported", node, weight)
        return _Event("linear", node, weight.T)
    if op == "Gemm":
        attrs = _attrs(node)
        weight = const.get(node.input[1])
        if weight is None or attrs.get("transA", 0):
            return _Event("unsupported", node, weight)
        weight = weight if attrs.get("transB", 0) else weight.T
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, weight.dtype)
        bias = const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if bias is not None and beta != 1.0:
            bias = bias * np.asarray(beta, bias.dtype)
        return _Event("linear", node, weight, bias)
    if op == "LayerNormalization":
        scale = const.get(node.input[1])
        bias = const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            return _Event("unsupported", node)
        return _Event("ln", node, scale, bias, _attrs(node))
    if op in ("Mul", "Add", "Sub", "Div"):
        index, value = _const_arg(node, const)
        if not _is_float(value):
            return _Event("op", node) if op == "Div" else None
        if value.size == 1:
            if op == "Add":
                return _Event("scalar_add", node, value.reshape(()))
            return _Event("op", node) if op == "Div" else None
        flat = value.reshape(-1)
        if op == "Mul":
            return _Event("scale", node, flat)
        if op == "Add":
            return _Event("shift", node, flat)
        if op == "Sub":
            return _Event("shift", node, flat if index == 0 else -flat)
        return _Event("unsupported", node, value)
    if op in ("ConvTranspose", "BatchNormalization", "InstanceNormalization", "GroupNormalization"):
        return _Event("unsupported", node)
    if op in _MARKERS:
        return _Event("op", node, attrs=_attrs(node))
    return None


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

    # ---- cursor
    def _skip_markers(self) -> None:
        while self.pos < len(self.events) and self.events[self.pos].kind in ("op", "scalar_add"):
            self.markers.append(self.events[self.pos])
            self.pos += 1

    def peek(self) -> _Event | None:
        self._skip_markers()
        return self.events[self.pos] if self.pos < len(self.events) else None

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
        if event.bias is not None:
            return event.bias.reshape(-1)
        shift = self.expect(f"the bias of {label}: an Add of a ({width},) constant",
                            lambda e: e.kind == "shift" and e.weight.size == width)
        return shift.w

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
        event = self.peek()
        if event is not None and event.kind == "ln":
            if event.w.size != width or event.bias is None or event.bias.size != width:
                raise self.fail(f"{label}: LayerNormalization over {width} channels with scale and bias", event)
            epsilon = event.attrs.get("epsilon", 1e-5)
            # A hostile graph can give the attribute another type (get_attribute_value then returns None, a
            # graph, a list...): refuse it by name instead of failing inside float().
            if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
                raise self.fail(f"{label}: LayerNormalization with a number as its epsilon attribute", event)
            self.take()
            self.forms.add("LayerNormalization")
            self.take_markers()
            return event.w.reshape(-1), event.bias.reshape(-1), float(epsilon)
        scale = shift = None
        for _ in range(2):
            e = self.expect(f"{label}: LayerNorm over {width} channels (LayerNormalization, or mean/variance "
                            f"then a ({width},) scale and shift)",
                            lambda e: e.kind in ("scale", "shift") and e.weight.size == width)
            if e.kind == "scale" and scale is None:
                scale = e.weight
                eps_markers = [m for m in self.markers if m.kind == "scalar_add"]
                ops = {m.node.op_type for m in self.markers}
                if "ReduceMean" not in ops:
                    raise self.fail(f"{label}: a mean over channels before the LayerNorm scale", e)
                eps = float(eps_markers[-1].w) if eps_markers else float("nan")
                self.take_markers()
            elif e.kind == "shift" and shift is None:
                shift = e.weight
            else:
                raise self.fail(f"{label}: one scale and one shift", e)
        self.forms.add("decomposed LayerNorm")
        return cast(np.ndarray, scale), cast(np.ndarray, shift), eps

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
        gelu = [m for m in self.markers if m.node.op_type in ("Erf", "Gelu", "Tanh")]
        if not gelu or gelu[0].node.op_type == "Tanh" or (
                gelu[0].node.op_type == "Gelu" and _text(gelu[0].attrs.get("approximate", "none")) != "none"):
            raise self.fail(f"{label}: the exact GELU (Erf or Gelu with approximate='none') after the first linear",
                            gelu[0] if gelu else found)
        gamma = beta = None
        for _ in range(2):
            e = self.expect(f"{label}: GRN over {width} channels (L2 norm over H,W, channel mean, then a ({width},) "
                            "gamma scale and beta shift)",
                            lambda e: e.kind in ("scale", "shift") and e.weight.size == width)
            if e.kind == "scale" and gamma is None:
                ops = {m.node.op_type for m in self.markers}
                if not ({"ReduceL2", "Sqrt"} & ops and {"ReduceMean"} & ops and {"Div", "Reciprocal"} & ops):
                    raise self.fail(f"{label}: GRN statistics (ReduceL2 or a square root of a sum of squares, "
                                    "a channel mean, a division) before gamma", e)
                gamma = e.weight
            elif e.kind == "shift" and beta is None:
                beta = e.weight
            else:
                raise self.fail(f"{label}: GRN gamma (a scale) and beta (a shift)", e)
        self.take_markers()
        return cast(np.ndarray, gamma), cast(np.ndarray, beta)

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
            if nxt is None:
                break
            ops = {m.node.op_type for m in self.markers}
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
    elif config.head_norm and shape and len(shape) == 4:
        size = shape[2] if layout == "NCHW" else shape[1]
        if isinstance(size, int) and size:
            preprocessing = Preprocessing.for_resolution(size)
    layout_info = {"producer": f"{model.producer_name} {model.producer_version}".strip(),
                   "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
                   "input_layout": layout, "layer_norm": sorted(parser.forms),
                   "external_data": any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)}
    ckpt = Checkpoint(config=config, tensors=tensors, preprocessing=preprocessing,
                      source=Source(format=NAME, file_name=path.name, digest=sha256_of(path), layout=layout_info),
                      info=ckpt_info)
    ckpt.validate(where)
    check_variant(config, variant, where)
    return ckpt


def write(ckpt: Checkpoint, path: Path, *, overwrite: bool = False, via: str = "torch", opset: int | None = None,
          dynamic_hw: bool = False, features: bool = False, fp16: bool = False, external_data: bool | None = None,
          check_size: int | None = None, check_batch: int = 4, source_path: str | os.PathLike[str] | None = None,
          log: Any = None) -> None:
    """Export through ``onnx_export.export`` (checked against the float64 referee before it is published)."""
    from convnextv2.converters import onnx_export

    onnx_export.export(ckpt, path, via=via, opset=opset, dynamic_hw=dynamic_hw, features=features, fp16=fp16,
                       external_data=external_data, overwrite=overwrite, check_size=check_size,
                       check_batch=check_batch, source_path=source_path, log=log)


__all__ = ["NAME", "SUFFIXES", "GRN_EPS", "read", "sniff", "write"]
