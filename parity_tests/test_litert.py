"""LiteRT (.tflite) export and the ``litert`` parity runtime: the file run by plain ai-edge-litert in a process
that can import neither this package nor PyTorch nor TensorFlow, against the float64 PyTorch referee by the
parity rule; byte-identical exports; the metadata entry; and the trap of this path, float64 in the graph:
no DOUBLE tensor or op in any export made from the Keras reference, and the old float64 head is refused by the
converter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from convnextv2 import converters
from convnextv2.fixtures import make_checkpoint, write_fixture
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError, CheckFailedError

pytest.importorskip("tensorflow", reason="tensorflow is not installed (pip install 'convnextv2-toolkit[tf]')")
pytestmark = [pytest.mark.litert, pytest.mark.tf]

SMALL = "custom:depths=1,1,2,1;dims=8,16,32,64"
SIZES = ("tiny", "base", "large", "huge")

# Plain LiteRT, as a user on a device runs the file: no TensorFlow, no PyTorch, not this package.
_RUNNER = textwrap.dedent("""
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("convnextv2", "torch", "tensorflow", "keras"):
                raise ImportError("this process must not import " + name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    path, images = sys.argv[1], np.load(sys.argv[2])
    data = open(path, "rb").read()
    model = schema.Model.GetRootAs(data, 0)
    meta = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == b"convnextv2":
            meta = json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    out = runner(pixel_values=images)
    name, = out
    np.save(path + ".npy", out[name])
    ops = sorted({d["op_name"] for d in interpreter._get_ops_details()})
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("convnextv2", "torch", "tensorflow", "keras"))
    print(json.dumps({"meta": meta, "output": name, "signatures": interpreter.get_signature_list(),
                      "ops": ops, "leaked": leaked}))
""")


def _run_in_plain_litert(path: Path, images: np.ndarray) -> dict:
    """_RUNNER on the file: its report; the output lands in PATH.npy."""
    np.save(path.parent / "images.npy", images)
    # -I: no user site, no PYTHONPATH; the refusing finder covers the editable install's path hook.
    done = subprocess.run([sys.executable, "-I", "-c", _RUNNER, str(path), str(path.parent / "images.npy")],
                          capture_output=True, text=True, timeout=600, cwd=path.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def atto_tflite(tmp_path_factory):
    """atto through the command line, as a user converts it (224 px, the checkpoint's input size)."""
    work = tmp_path_factory.mktemp("litert")
    write_fixture(work / "atto.safetensors", "atto", "canonical", seed=0)
    done = run_cli("convert", str(work / "atto.safetensors"), "-o", str(work / "atto.tflite"), "--to", "litert",
                   cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, converters.load(work / "atto.safetensors")


@pytest.mark.torch
def test_tflite_runs_in_plain_litert_and_matches_the_referee(atto_tflite):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed (pip install "
                                                  "'convnextv2-toolkit[litert]')")
    work, ckpt = atto_tflite
    path = work / "atto.tflite"
    images = parity_rule.seeded_images(4, 224)
    report = _run_in_plain_litert(path, images)
    assert report["leaked"] == [] and report["output"] == "logits"
    assert report["signatures"] == {"serving_default": {"inputs": ["pixel_values"], "outputs": ["logits"]}}
    assert not [op for op in report["ops"] if "FLEX" in op.upper() or op == "CUSTOM"], report["ops"]
    assert json.loads(report["meta"]["config"]) == ckpt.config.to_json_dict()
    assert json.loads(report["meta"]["preprocessing"]) == ckpt.preprocessing.to_json_dict()
    assert json.loads(report["meta"]["export"])["weights"] == "float32"
    referee = parity_rule.referee_features(ckpt, images)["logits"]
    baseline = parity_rule.scale_aware_error(parity_rule.baseline_features(ckpt, images)["logits"], referee)
    served = np.load(f"{path}.npy")
    assert served.shape == referee.shape and served.dtype == np.float32
    assert parity_rule.judge("logits", served, referee, baseline).passed


@pytest.mark.torch
def test_weights_stored_after_the_flatbuffer_run_in_plain_litert(monkeypatch, tmp_path):
    """Past 2 GB (huge) a flatbuffer cannot hold the weights: they go after it, each buffer naming its offset,
    and our metadata entry is added without moving them out of place. Forced here at a small size; the plain
    runtime must run the file and agree with the float64 referee, and read the metadata."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    from convnextv2.converters import litert

    monkeypatch.setattr(litert, "BUFFER_OFFSET_BYTES", 0)
    ckpt = make_checkpoint("atto", seed=0, fmt="canonical")
    path = tmp_path / "offsets.tflite"
    converters.save(ckpt, path, "litert", gate=converters.GateOptions(batch=2), size=64)
    data = path.read_bytes()
    model = litert._schema().Model.GetRootAs(data, 0)
    start = litert._data_start(model)
    assert start is not None and start < len(data) // 10, "the weights were not stored after the flatbuffer"
    assert start % 16 == 0  # the converter aligns its buffers to 16 bytes; the shift keeps that
    images = parity_rule.seeded_images(2, 64)
    report = _run_in_plain_litert(path, images)
    assert json.loads(report["meta"]["config"]) == ckpt.config.to_json_dict()
    assert litert.read_metadata(path)["config"] == report["meta"]["config"]
    referee = parity_rule.referee_features(ckpt, images)["logits"]
    baseline = parity_rule.scale_aware_error(parity_rule.baseline_features(ckpt, images)["logits"], referee)
    assert parity_rule.judge("logits", np.load(f"{path}.npy"), referee, baseline).passed


@pytest.mark.torch
def test_same_checkpoint_gives_the_same_bytes(atto_tflite, tmp_path):
    work, ckpt = atto_tflite

    converters.save(make_checkpoint(SMALL, seed=3, fmt="canonical", num_classes=5), tmp_path / "small.tflite",
                    "litert", gate=converters.GateOptions(batch=1), size=64)
    converters.save(ckpt, tmp_path / "again.tflite", "litert")
    assert (tmp_path / "again.tflite").read_bytes() == (work / "atto.tflite").read_bytes()


def _no_double_in_tflite(data: bytes) -> list[str]:
    from convnextv2.converters.litert import _schema

    schema = _schema()
    model = schema.Model.GetRootAs(data, 0)
    found = []
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            if tensor.Type() == schema.TensorType.FLOAT64:
                found.append(tensor.Name().decode())
    return found


def test_tflite_has_no_float64_tensor(atto_tflite):
    work, _ = atto_tflite
    assert _no_double_in_tflite((work / "atto.tflite").read_bytes()) == []


def _double_in_graph_def(saved: Path) -> list[str]:
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved / "saved_model.pb").read_bytes())
    found = []
    for meta in proto.meta_graphs:
        nodes = [(None, n) for n in meta.graph_def.node]
        nodes += [(f.signature.name, n) for f in meta.graph_def.library.function for n in f.node_def]
        for function, node in nodes:
            for key, attr in node.attr.items():
                types = [attr.type] + list(attr.list.type) + ([attr.tensor.dtype] if attr.HasField("tensor") else [])
                if types_pb2.DT_DOUBLE in types:
                    found.append(f"{function}/{node.name} ({node.op}, {key})")
    return found


def test_no_float64_in_the_savedmodel_and_the_tf_onnx_export(tmp_path):
    """The Keras reference's graph is float32 end to end, so no export built from it carries a float64 op."""
    ckpt = make_checkpoint(SMALL, seed=3, fmt="canonical", num_classes=5)
    converters.save(ckpt, tmp_path / "saved", format="savedmodel")
    assert _double_in_graph_def(tmp_path / "saved") == []
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install 'convnextv2-toolkit[onnx]')")
    import onnx

    from convnextv2.converters.onnx import via_tensorflow as onnx_via_tensorflow

    proto = onnx_via_tensorflow.build(ckpt, 18, False, False, False, 64)
    double = onnx.TensorProto.DOUBLE
    graph = proto.graph
    typed = [v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)
             if v.type.tensor_type.elem_type == double]
    typed += [t.name for t in graph.initializer if t.data_type == double]
    typed += [n.name for n in graph.node for a in n.attribute if a.name == "to" and a.i == double]
    assert typed == []


def test_the_old_float64_head_is_refused_by_the_converter(monkeypatch, tmp_path):
    """The trap this head avoids: a float64 MatMul is no TFLite builtin, so the converter refuses the graph
    (with Flex ops it would convert, and then not run in plain LiteRT); nothing is written."""
    from convnextv2.reference import keras_model
    from convnextv2.reference.keras_model import ops

    def float64_head(self, inputs):
        wide = ops.matmul(ops.cast(inputs, "float64"), ops.cast(self.kernel, "float64"))
        return ops.cast(wide + ops.cast(self.bias, "float64"), self.compute_dtype)

    monkeypatch.setattr(keras_model.HeadDense, "call", float64_head)
    ckpt = make_checkpoint(SMALL, seed=3, fmt="canonical", num_classes=5)
    with pytest.raises(CheckFailedError, match="'tf.MatMul' op is neither a custom op nor a flex op"):
        converters.save(ckpt, tmp_path / "model.tflite", "litert", gate=converters.GateOptions(batch=1), size=64)
    assert list(tmp_path.iterdir()) == []


def test_tflite_is_recognised_and_refused_with_the_reason(atto_tflite):
    work, ckpt = atto_tflite
    from convnextv2.converters import litert

    assert converters.detect_format(work / "atto.tflite") == "litert"
    with pytest.raises(BadInputError, match="reading LiteRT"):
        converters.load(work / "atto.tflite")
    assert json.loads(litert.read_metadata(work / "atto.tflite")["source"]) == ckpt.source.to_json_dict()


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parity_runtime(dtype):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    from convnextv2.parity_tests.harness import run_parity

    report = run_parity(make_checkpoint("atto", seed=0), ["litert"], dtypes=[dtype], image_size=64, batch=2)
    row = report.result("litert", dtype)
    assert row.status == "pass", (row.reason, [(f.name, f.message) for f in row.features])
    assert [f.name for f in row.features if f.status == "pass"] == list(parity_rule.FEATURES)
    assert row.reason.startswith("ai_edge_litert interpreter")


@pytest.mark.slow
@pytest.mark.torch
# huge is `heavy` (the plugin marks every slow "huge" case): nox -s tests_slow runs it alone, after the rest.
@pytest.mark.parametrize("variant", SIZES)
def test_every_size_at_224(variant):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    from convnextv2.parity_tests.harness import run_parity

    report = run_parity(make_checkpoint(variant, seed=0), ["litert"], image_size=224, batch=2)
    row = report.result("litert")
    assert row.status == "pass", (row.reason, [(f.name, f.message) for f in row.features])


def test_litert_is_offered_by_convert():
    from convnextv2.converters.cli import choices

    assert "litert" in choices.writable_formats() and "litert" not in choices.readable_formats()
