"""ONNX files: written by exporting a reference (converters/onnx/export.py), read back by graph structure.

Reading never trusts initializer names (exporters fold, pre-transpose and rename them). It walks the
graph from its input in topological order, folds constant subgraphs (initializers, ``Constant`` nodes and
Transpose/Reshape/Cast/... of them), turns every node that touches a weight into an event (convolution,
linear, LayerNormalization, scale, shift; converters/onnx/graph_events.py) and parses the event stream with
ConvNeXt V2's grammar (here):

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

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source, checkpoint_from_metadata
from convnextv2.converters.digests import sha256_of
from convnextv2.converters.format_limits import Change, dropped_extras
from convnextv2.converters.onnx.graph_events import Event, graph_events, import_onnx, int_list, text
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.variants import (
    GRN_EPS,
    LAYER_NORM_EPS,
    MLP_RATIO,
    NUM_STAGES,
    ModelConfig,
    check_variant,
)

NAME = "onnx"


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


# ------------------------------------------------------------------------------------------- grammar


class _Parser:
    """Recursive descent over the events; every refusal names the node, what was expected and what was found."""

    def __init__(self, events: list[Event], where: str):
        self.events = events
        self.where = where
        self.pos = 0
        self.markers: list[Event] = []
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

    def peek(self) -> Event | None:
        self._skip_markers()
        return self.events[self.pos] if self.pos < len(self.events) else None

    def lookahead(self) -> Event | None:
        """The next event that is not a marker, leaving the markers before it for the part that owns them."""
        pos = self.pos
        while pos < len(self.events) and self.events[pos].kind in ("op", "scalar_add"):
            pos += 1
        return self.events[pos] if pos < len(self.events) else None

    def take(self) -> Event:
        event = self.peek()
        assert event is not None
        self.pos += 1
        return event

    def take_markers(self) -> list[Event]:
        markers, self.markers = self.markers, []
        return markers

    def fail(self, expected: str, found: Event | None) -> BadInputError:
        what = found.describe() if found is not None else "the end of the graph"
        return BadInputError(f"{self.where}: not a ConvNeXt V2 graph: expected {expected}; found {what}")

    def expect(self, expected: str, ok: Any) -> Event:
        event = self.peek()
        if event is None or not ok(event):
            raise self.fail(expected, event)
        return self.take()

    # ---- pieces
    def bias_after(self, event: Event, width: int, label: str) -> np.ndarray:
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
        def ok(e: Event) -> bool:
            if e.kind != "conv" or e.w.ndim != 4:
                return False
            w = e.w
            group = e.attrs.get("group", 1)
            if not isinstance(group, int):
                return False
            shape_ok = (int_list(e.attrs.get("kernel_shape")) == [kernel, kernel]
                        and int_list(e.attrs.get("strides")) == [stride, stride])
            if groups_equal_width:
                return shape_ok and group == w.shape[0] and w.shape[1] == 1 and (width_in is None or group == width_in)
            return shape_ok and group == 1 and (width_in is None or w.shape[1] == width_in)

        groups = "groups = channels" if groups_equal_width else "groups 1"
        source = f"{width_in} input channels" if width_in else "any width"
        event = self.expect(f"{label}: Conv with kernel {kernel}x{kernel}, stride {stride}, {groups}, {source}", ok)
        self.check_pads(event, label, kernel)
        weight = event.w
        return weight, self.bias_after(event, weight.shape[0], label)

    def check_pads(self, event: Event, label: str, kernel: int) -> None:
        pads = int_list(event.attrs.get("pads", [0, 0, 0, 0]))
        auto = event.attrs.get("auto_pad", b"NOTSET")
        # A hostile graph's attribute bytes need not be UTF-8: undecodable ones are not a valid auto_pad either.
        auto = auto.decode(errors="replace") if isinstance(auto, bytes) else str(auto)
        if auto not in ("NOTSET", "", "SAME_UPPER", "SAME_LOWER", "VALID"):
            raise self.fail(f"{label} with auto_pad NOTSET, SAME_UPPER, SAME_LOWER or VALID", event)
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
        def ok(e: Event) -> bool:
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
                and text(gelu[0].attrs.get("approximate", "none")) != "none"):
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
                event = cast(Event, self.peek())
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


def _clean_eps(eps: float) -> float:
    """fp32 attributes store 1e-6 as 9.99999997e-07: give back the decimal the exporter was given."""
    if not np.isfinite(eps):
        return LAYER_NORM_EPS
    return float(f"{float(np.float32(eps)):.6g}")


# ------------------------------------------------------------------------------------------ read/write


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    onnx = import_onnx()
    where = str(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise BadInputError(f"{path}: not a readable ONNX file: {exc}") from None
    events, info = graph_events(model, where, path.parent)
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
