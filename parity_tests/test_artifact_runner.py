"""Deployment artifacts made by the real tools (torch.onnx from timm, onnxconverter-common, OpenVINO, TensorFlow's
LiteRT converter, onnxruntime's quantizer, torch.export) run by converters/runners/artifact.py against the float64
PyTorch referee of the same weights read into our canonical checkpoint: each test asserts the status, the precision
found and how, the conventions found and how, and for a failing artifact where it first diverges.

The oracle is independent: timm's module (seeded, pretrained=False) makes the artifact, our reader turns timm's
state dict into the checkpoint whose referee judges it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

from convnextv2 import converters
from convnextv2.converters.runners import artifact, artifact_tensorrt, registry
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError

pytestmark = [pytest.mark.onnx, pytest.mark.torch]

SIZE = 64
CLASSES = 10


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """timm's atto (seeded), its state dict read by our timm reader, and the referee on two images."""
    import safetensors.torch
    import torch

    from convnextv2.converters.peer_imports import import_torchvision_guarded

    import_torchvision_guarded()
    import timm

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=CLASSES).eval()
    folder = tmp_path_factory.mktemp("artifacts")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "timm.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained_cfg: preprocessing assumed, said in a warning
        ckpt = converters.load(folder / "timm.safetensors")
    ckpt.preprocessing = dataclasses.replace(ckpt.preprocessing, input_size=SIZE)
    referee = parity_rule.Referee.build(ckpt, parity_rule.seeded_images(2, SIZE), ("float32", "float16"))
    return model, ckpt, referee, folder


def _export(module, path: Path, *, nhwc: bool = False, batch: int | None = None) -> Path:
    import torch

    shape = (batch or 2, SIZE, SIZE, 3) if nhwc else (batch or 2, 3, SIZE, SIZE)
    dynamic = None if batch else {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(module, (torch.zeros(shape),), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return path


class _Wrapped:
    """A timm module with something around it: a layout transpose, normalisation, a softmax."""

    @staticmethod
    def make(model, *, nhwc=False, normalise=None, softmax=False):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                if normalise is not None:
                    mean, std = normalise
                    self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
                    self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))

            def forward(self, x):
                if nhwc:
                    x = x.permute(0, 3, 1, 2)
                if normalise is not None:
                    x = (x - self.mean) / self.std
                y = self.model(x)
                return torch.softmax(y, dim=1) if softmax else y

        return Wrapped().eval()


def _check(path: Path, made, pins=None, **kwargs):
    _, ckpt, referee, _ = made
    found = artifact.probe(path, pins)
    return found, artifact.check(found, ckpt, referee, pins, **kwargs)


def _errors(entry: dict) -> dict[str, float]:
    return {c["value"]: c["scale_aware_error"] for c in entry["candidates"]}


# ------------------------------------------------------------------ ONNX as torch.onnx writes it

def test_torch_onnx_nchw_dynamic_batch_passes_with_every_stage_localised(made):
    model, _, referee, folder = made
    found, verdict = _check(_export(model, folder / "plain.onnx"), made)
    assert found.format == "onnx" and "graph optimisations off" in found.runtime
    assert found.precision == "float32" and "float32" in found.precision_how
    assert verdict.status == "pass", verdict.reason
    assert verdict.kind == "artifact" and verdict.dtype == "float32" and verdict.name == "plain.onnx"
    conventions = verdict.artifact["conventions"]
    assert conventions["layout"] == {"value": "NCHW", "how": "signature"}
    assert conventions["batch"]["value"] is None and conventions["image_size"]["value"] == SIZE
    ranges = conventions["input_range"]
    assert ranges["value"] == "normalized" and ranges["how"] == "tried"
    errors = _errors(ranges)
    assert set(errors) == {"normalized", "unit", "byte"} and errors["normalized"] < 1e-5 < errors["unit"]
    assert conventions["output"]["value"] == "logits" and conventions["classes"]["value"] == CLASSES
    # Every stage read from the graph's intermediate tensors and judged.
    assert [f.name for f in verdict.features] == list(referee.names)
    assert all(f.status == "pass" for f in verdict.features)
    assert verdict.artifact["first_divergence"] is None


def test_nhwc_batch_one_graph_runs_images_one_at_a_time(made):
    model, _, _, folder = made
    path = _export(_Wrapped.make(model, nhwc=True), folder / "nhwc1.onnx", nhwc=True, batch=1)
    found, verdict = _check(path, made)
    assert found.signature["inputs"][0]["shape"] == [1, SIZE, SIZE, 3]
    assert verdict.status == "pass", verdict.reason
    conventions = verdict.artifact["conventions"]
    assert conventions["layout"] == {"value": "NHWC", "how": "signature"}
    assert conventions["batch"]["value"] == 1 and "one at a time" in conventions["batch"]["note"]


def test_normalisation_inside_and_softmax_output_are_found(made):
    model, ckpt, _, folder = made
    pre = ckpt.preprocessing
    path = _export(_Wrapped.make(model, normalise=(pre.mean, pre.std), softmax=True), folder / "unit_softmax.onnx")
    _, verdict = _check(path, made)
    assert verdict.status == "pass", verdict.reason
    conventions = verdict.artifact["conventions"]
    ranges = conventions["input_range"]
    assert ranges["value"] == "unit" and ranges["how"] == "tried"
    errors = _errors(ranges)
    assert errors["unit"] < 1e-5 and errors["normalized"] > 1e-3 and errors["byte"] > 1e-3
    # Softmax is the op that makes the output: the signature says probabilities.
    assert conventions["output"]["value"] == "probabilities" and conventions["output"]["how"] == "signature"
    logits = verdict.feature("logits")
    assert logits.status == "pass" and "softmax" in logits.message


def test_a_pinned_convention_that_is_wrong_fails_and_says_pinned(made):
    model, _, _, folder = made
    path = folder / "plain.onnx"
    if not path.exists():
        _export(model, path)
    _, verdict = _check(path, made, artifact.Pins(input_range="unit"))
    assert verdict.status == "fail"
    assert verdict.artifact["conventions"]["input_range"] == {"value": "unit", "how": "pinned"}
    # Every stage fails from the stem on: the input itself is wrong.
    assert verdict.first_divergence == "stem" and verdict.artifact["first_divergence"]["feature"] == "stem"


def test_a_broken_grn_fails_and_names_the_stage_and_op(made):
    import torch

    model, _, _, folder = made
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.stages[2].blocks[1].mlp.grn.weight.add_(0.5)
    _, verdict = _check(_export(broken, folder / "broken.onnx"), made)
    assert verdict.status == "fail"
    where = verdict.artifact["first_divergence"]
    assert verdict.first_divergence == "stage3" and where["feature"] == "stage3"
    assert where["scale_aware_error"] > where["tolerance"]
    assert where["block"] == 1 and where["op"] == "GRN", where
    assert verdict.feature("stage2").status == "pass"


def test_static_size_that_is_neither_the_checkpoints_nor_the_referees_fails_naming_both(made):
    model, ckpt, _, folder = made
    path = _export(model, folder / "static64.onnx", batch=2)
    other = dataclasses.replace(ckpt, preprocessing=dataclasses.replace(ckpt.preprocessing, input_size=96))
    referee = parity_rule.Referee.build(other, parity_rule.seeded_images(2, 96), ("float32",), only=("logits",))
    verdict = artifact.check(artifact.probe(path), other, referee)
    assert verdict.status == "fail" and "64x64" in verdict.reason and "96x96" in verdict.reason


def test_float16_graph_from_onnxconverter_common_is_judged_at_float16(made):
    if importlib.util.find_spec("onnxconverter_common") is None:
        pytest.skip("onnxconverter-common is not installed (pip install onnxconverter-common==1.16.0)")
    import onnx
    from onnxconverter_common import float16

    model, _, _, folder = made
    plain = folder / "plain.onnx"
    if not plain.exists():
        _export(model, plain)
    half = folder / "fp16.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(plain)), keep_io_types=True), str(half))
    found, verdict = _check(half, made)
    assert found.precision == "float16" and "initializers" in found.precision_how
    assert verdict.dtype == "float16" and verdict.status == "pass", verdict.reason
    # The float32 rule would have failed it: its error is float16's, not float32's.
    assert verdict.feature("logits").scale_aware_error > 1e-5


def test_quantized_onnx_is_found_int8(made):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, _, _, folder = made
    plain = folder / "plain.onnx"
    if not plain.exists():
        _export(model, plain)
    quantized = folder / "dynamic_int8.onnx"
    quantize_dynamic(str(plain), str(quantized), weight_type=QuantType.QInt8)
    found = artifact.probe(quantized)
    assert found.precision == "int8" and ("integer ops" in found.precision_how or "QDQ" in found.precision_how)
    assert artifact.probe(quantized, artifact.Pins(precision="float32")).precision_how.startswith("pinned")


# ------------------------------------------------------------------ OpenVINO

@pytest.mark.parametrize("compress", [True, False], ids=["default-fp16-weights", "fp32-weights"])
def test_openvino_ir_from_convert_model(made, compress):
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed")
    import openvino as ov
    import torch

    model, _, _, folder = made
    xml = folder / f"ov_{compress}" / "model.xml"
    ir = ov.convert_model(model, example_input=torch.zeros(1, 3, SIZE, SIZE))
    ov.save_model(ir, str(xml), compress_to_fp16=compress)
    found, verdict = _check(xml, made)
    assert found.format == "openvino"
    assert found.precision == ("float16" if compress else "float32"), found.precision_how
    assert verdict.status == "pass", verdict.reason
    assert "INFERENCE_PRECISION_HINT=f32: ran at float32" in verdict.artifact["runtime"]
    assert verdict.artifact["localisation"]["stages"].keys() >= {"stem", "stage4"}


# ------------------------------------------------------------------ LiteRT

def test_flex_tflite_is_unavailable_never_a_pass(made, tmp_path):
    tf = pytest.importorskip("tensorflow")

    class Erf(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 3, SIZE, SIZE], tf.float32)])
        def serve(self, x):
            return {"logits": tf.math.erf(tf.reduce_mean(x, axis=[2, 3]))}

    module = Erf()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    path = tmp_path / "flex.tflite"
    path.write_bytes(converter.convert())
    found, verdict = _check(path, made)
    assert found.format == "litert" and "needs the Flex delegate: FlexErf" in found.unavailable
    assert verdict.status == "unavailable" and "FlexErf" in verdict.reason


@pytest.mark.slow
def test_tflite_from_tensorflows_converter_of_the_keras_model(made, tmp_path):
    tf = pytest.importorskip("tensorflow")
    from convnextv2 import reference

    _, ckpt, _, _ = made
    keras_model = reference.build(ckpt, "tensorflow")

    # As Keras and TensorFlow document it: Keras 3's SavedModel export, then the converter from that folder.
    keras_model.export(str(tmp_path / "saved"), format="tf_saved_model",
                       input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved"))
    path = tmp_path / "keras.tflite"
    path.write_bytes(converter.convert())
    found, verdict = _check(path, made)
    assert found.format == "litert" and found.precision == "float32" and found.unavailable is None
    assert verdict.status == "pass", verdict.reason
    assert verdict.artifact["conventions"]["layout"] == {"value": "NHWC", "how": "signature"}


# ------------------------------------------------------------------ torch.export

@pytest.mark.slow
def test_torch_export_program(made, tmp_path):
    import torch

    model, _, _, _ = made
    program = torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    found, verdict = _check(path, made)
    assert found.format == "torch-export" and found.precision == "float32"
    assert verdict.status == "pass", verdict.reason
    assert verdict.artifact["conventions"]["batch"]["value"] == 2


# ------------------------------------------------------------------ bad input, what cannot run here

def test_truncated_files_are_bad_input_naming_the_file(made, tmp_path):
    model, _, _, folder = made
    plain = folder / "plain.onnx"
    if not plain.exists():
        _export(model, plain)
    for name, data in (("cut.onnx", plain.read_bytes()[:5000]), ("cut.tflite", b"\x1c\0\0\0TFL3" + b"\0" * 40)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadInputError, match=f"^{path}: ") as caught:
            artifact.probe(path)
        assert "\n" not in str(caught.value)
    with pytest.raises(BadInputError, match="not a deployment artifact"):
        (tmp_path / "x.bin").write_bytes(b"hello world")
        artifact.probe(tmp_path / "x.bin")


def test_tensorrt_and_core_ml_say_why_they_cannot_run(made, tmp_path):
    # Neither runtime runs on this Linux CPU machine: no tool here can make these files, so their names decide.
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"ftrt" + b"\0" * 64)
    found, verdict = _check(engine, made)
    assert found.format == "tensorrt" and verdict.status == "unavailable"
    if not artifact_tensorrt.nvidia_gpu():
        assert "needs an NVIDIA GPU and TensorRT" in verdict.reason
    mlmodel = tmp_path / "model.mlmodel"
    mlmodel.write_bytes(b"\x08\x04" + b"\0" * 64)
    found, verdict = _check(mlmodel, made)
    assert found.format == "coreml" and verdict.status == "unavailable" and "macOS" in verdict.reason


@pytest.mark.skipif(artifact_tensorrt.why_unavailable() is not None,
                    reason="TensorRT engines run only on an NVIDIA GPU with tensorrt and a CUDA torch")
def test_tensorrt_engine_built_from_a_torch_onnx_graph(made, tmp_path):
    """Where a GPU is present: an engine built by TensorRT's own builder from the torch.onnx graph passes at
    float32 (TF32 off), and at float16 when pinned."""
    import tensorrt as trt

    model, _, _, _ = made
    graph = _export(model, tmp_path / "model.onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(graph.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    for fp16 in (False, True):
        config = builder.create_builder_config()
        config.clear_flag(trt.BuilderFlag.TF32)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape("input", (1, 3, SIZE, SIZE), (2, 3, SIZE, SIZE), (4, 3, SIZE, SIZE))
        config.add_optimization_profile(profile)
        engine = tmp_path / f"model-{fp16}.engine"
        engine.write_bytes(bytes(builder.build_serialized_network(network, config)))
        pins = artifact.Pins(precision="float16") if fp16 else None
        found, verdict = _check(engine, made, pins)
        assert found.format == "tensorrt" and found.unavailable is None
        assert verdict.status == "pass", verdict.reason
        assert verdict.dtype == ("float16" if fp16 else "float32")


def test_the_registry_runs_every_artifact_format_with_the_artifact_runner():
    for format in ("onnx", "litert", "openvino", "executorch", "savedmodel", "torch-export", "tensorrt", "coreml"):
        assert registry.for_format(format).name == "artifact"
    assert "onnxruntime-as-written" not in registry.names()
    with pytest.raises(BadInputError, match="layout must be one of"):
        artifact.Pins(layout="CHW")
    assert np.array_equal(artifact.LAYOUTS, ("NCHW", "NHWC"))
