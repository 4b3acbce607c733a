"""Localisation on graphs made by the real tools: torch.onnx (TorchScript and dynamo exporters) from our reference
model and from timm's, openvino.convert_model from timm's module, TensorFlow's TFLiteConverter from our Keras model,
onnxconverter-common's float16 conversion. Each artifact is run by its own runtime (converters/runners/
intermediates.py), its tensors mapped onto the stages and compared with the float64 PyTorch referee; broken models
(tanh GELU in stage 3, a GRN removed, a GRN overflowing float16) are localised to their stage, block and op kind.

atto at 64 x 64, two images: every stage exists (stage4 is 2 x 2) and each export takes seconds.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest

from convnextv2 import converters, reference
from convnextv2.converters.runners.localise import (
    FLOAT16_MAX,
    Tensor,
    divergence_inside,
    first_non_finite,
    intermediate_tensors,
    locate_stages,
)
from convnextv2.fixtures.make import make_checkpoint
from convnextv2.reference import parity_rule
from convnextv2.reference.features import FEATURES
from convnextv2.reference.headroom import float16_headroom, over_float16

SIZE = 64
BATCH = 2


@pytest.fixture(scope="module")
def ckpt():
    return make_checkpoint("atto")


@pytest.fixture(scope="module")
def images():
    return parity_rule.seeded_images(BATCH, SIZE)


@pytest.fixture(scope="module")
def referee(ckpt, images):
    return parity_rule.referee_features(ckpt, images)


@pytest.fixture(scope="module")
def baseline(ckpt, images, referee):
    return parity_rule.baseline_errors(parity_rule.baseline_features(ckpt, images, "float32"), referee)


def torch_module(ckpt):
    from convnextv2.reference import torch_model

    return torch_model.contiguous_copy(reference.build(ckpt, "torch"))


def timm_module(ckpt, folder: Path):
    """timm's own convnextv2_atto (pretrained=False) with the checkpoint's weights, written in timm's layout by
    converters.save and loaded by timm's model."""
    import safetensors.torch

    from convnextv2.converters.runners.peers import import_timm

    path = folder / "timm.safetensors"
    converters.save(ckpt, path, format="timm", overwrite=True)
    model = import_timm().create_model("convnextv2_atto", pretrained=False)
    model.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    return model.eval()


def export_onnx(model, images, path: Path, dynamo: bool) -> Path:
    import torch

    torch.onnx.export(model, (torch.from_numpy(images),), str(path), dynamo=dynamo, input_names=["pixels"],
                      output_names=["logits"])
    return path


def first_failing(localisation, referee, baseline) -> str | None:
    """The first located stage the float32 parity rule fails (the artifact runner's job, done here by the rule)."""
    for name in FEATURES:
        if name in localisation.stages:
            verdict = parity_rule.judge(name, localisation.stages[name][1], referee[name][:BATCH], baseline[name])
            if not verdict.passed:
                return name
    return None


def assert_all_stages_agree(localisation, referee, baseline) -> None:
    assert set(localisation.stages) == set(FEATURES), localisation.found
    assert localisation.how == "matched 7 of 7 stages by shape, position and value", localisation.found
    assert_agree(localisation, referee, baseline, FEATURES)


def assert_agree(localisation, referee, baseline, names) -> None:
    for name in names:
        tensor, array = localisation.stages[name]
        assert array.shape == referee[name].shape, name
        verdict = parity_rule.judge(name, array, referee[name], baseline[name])
        assert verdict.passed, (name, tensor, verdict.message)


# ------------------------------------------------------------------ every stage found, every exporter

@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
def test_torch_onnx_export_of_the_reference_every_stage_located(tmp_path, ckpt, images, referee, baseline, dynamo):
    path = export_onnx(torch_module(ckpt), images, tmp_path / "model.onnx", dynamo)
    tensors = intermediate_tensors("onnx", path, {"pixels": images})
    localisation = locate_stages(tensors, referee, BATCH)
    assert_all_stages_agree(localisation, referee, baseline)
    # Structure, not just value: each stage output is a residual Add, the stem what the first block reads.
    for name in ("stage1", "stage2", "stage3", "stage4"):
        assert tensors[localisation.positions[name]].op == "Add"
        assert localisation.positions[name] == localisation.blocks[name][-1]
    assert [len(localisation.blocks[f"stage{i + 1}"]) for i in range(4)] == list(ckpt.config.depths)
    assert localisation.to_json_dict()["stages"]["logits"] == "logits"


@pytest.mark.slow  # timm, two exports: about 30 s (a broken timm IR runs in the default set)
def test_timm_through_torch_onnx_and_openvino_every_stage_located(tmp_path, ckpt, images, referee, baseline):
    import openvino
    import torch

    model = timm_module(ckpt, tmp_path)
    onnx_path = export_onnx(model, images, tmp_path / "timm.onnx", dynamo=False)
    localisation = locate_stages(intermediate_tensors("onnx", onnx_path, {"pixels": images}), referee, BATCH)
    assert_all_stages_agree(localisation, referee, baseline)

    ir = openvino.convert_model(model, example_input=torch.from_numpy(images))
    openvino.save_model(ir, str(tmp_path / "timm.xml"), compress_to_fp16=False)
    tensors = intermediate_tensors("openvino", tmp_path / "timm.xml", {ir.inputs[0].get_any_name(): images})
    localisation = locate_stages(tensors, referee, BATCH)
    assert_all_stages_agree(localisation, referee, baseline)
    assert {tensors[localisation.positions[f"stage{i}"]].op for i in range(1, 5)} == {"Add"}


@pytest.mark.slow  # TensorFlow's import and conversion: about 30 s
def test_tflite_from_keras_nhwc_every_stage_located(tmp_path, ckpt, images, referee, baseline):
    from convnextv2.converters import litert

    # converters.litert.convert: the Keras reference through tf.lite.TFLiteConverter (builtin ops); NHWC inside.
    path = tmp_path / "model.tflite"
    path.write_bytes(litert.convert(ckpt, SIZE))
    tensors = intermediate_tensors("litert", path, {litert.INPUT_NAME: images})
    localisation = locate_stages(tensors, referee, BATCH)
    assert_all_stages_agree(localisation, referee, baseline)
    assert {localisation.layouts[f"stage{i}"] for i in range(1, 5)} == {"NHWC"}


def test_torch_export_program_every_stage_located(tmp_path, ckpt, images, referee, baseline):
    import torch

    program = torch.export.export(torch_module(ckpt), (torch.from_numpy(images),))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    tensors = intermediate_tensors("torch-export", tmp_path / "model.pt2", {"x": images})
    localisation = locate_stages(tensors, referee, BATCH)
    assert_all_stages_agree(localisation, referee, baseline)
    assert [len(localisation.blocks[f"stage{i + 1}"]) for i in range(4)] == list(ckpt.config.depths)


def test_formats_without_intermediates_say_why(tmp_path):
    for probe_format in ("executorch", "keras", "savedmodel", "tensorrt", "coreml"):
        reason = intermediate_tensors(probe_format, tmp_path / "whatever", {})
        assert isinstance(reason, str) and "only" in reason, probe_format


# ------------------------------------------------------------------ broken artifacts

def _tanh_gelu_forward(self, x):
    import torch.nn.functional as F

    y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
    y = F.gelu(self.pwconv1(y), approximate="tanh")
    y = self.pwconv2(self.grn(y))
    return x + y.permute(0, 3, 1, 2)


def test_tanh_gelu_in_stage3_is_localised(tmp_path, ckpt, images, referee, baseline):
    model = torch_module(ckpt)
    for block in model.stages[2].blocks:
        block.forward = types.MethodType(_tanh_gelu_forward, block)
    path = export_onnx(model, images, tmp_path / "tanh.onnx", dynamo=False)
    tensors = intermediate_tensors("onnx", path, {"pixels": images})
    localisation = locate_stages(tensors, referee, BATCH)
    assert set(localisation.stages) == set(FEATURES)
    assert first_failing(localisation, referee, baseline) == "stage3"
    inside = divergence_inside("stage3", tensors, ckpt, images, localisation=localisation)
    assert (inside["block"], inside["op"]) == (0, "GELU"), inside["how"]
    assert inside["artifact_op"] == "Gelu" and inside["non_finite_op"] is None
    assert max(inside["block_errors"][:1]) > inside["threshold"]


def test_grn_removed_is_localised_through_dynamo_onnx(tmp_path, ckpt, images, referee, baseline):
    import torch

    model = torch_module(ckpt)
    model.stages[1].blocks[1].grn = torch.nn.Identity()
    path = export_onnx(model, images, tmp_path / "nogrn.onnx", dynamo=True)
    tensors = intermediate_tensors("onnx", path, {"pixels": images})
    localisation = locate_stages(tensors, referee, BATCH)
    assert first_failing(localisation, referee, baseline) == "stage2"
    assert_agree(localisation, referee, baseline, ("stem", "stage1"))
    # The broken stage is still found by its place: the last residual Add of its shape.
    assert localisation.positions["stage2"] == localisation.blocks["stage2"][-1]
    inside = divergence_inside("stage2", tensors, ckpt, images, localisation=localisation)
    assert (inside["block"], inside["op"]) == (1, "GRN"), inside["how"]
    assert inside["block_errors"][0] <= inside["threshold"] < inside["block_errors"][1]


def test_grn_removed_from_timm_is_localised_through_openvino(tmp_path, ckpt, images, referee, baseline):
    import openvino
    import torch

    model = timm_module(ckpt, tmp_path)
    model.stages[3].blocks[0].mlp.grn = torch.nn.Identity()
    ir = openvino.convert_model(model, example_input=torch.from_numpy(images))
    openvino.save_model(ir, str(tmp_path / "nogrn.xml"), compress_to_fp16=False)
    tensors = intermediate_tensors("openvino", tmp_path / "nogrn.xml", {ir.inputs[0].get_any_name(): images})
    localisation = locate_stages(tensors, referee, BATCH)
    assert first_failing(localisation, referee, baseline) == "stage4"
    assert_agree(localisation, referee, baseline, ("stem", "stage1", "stage2", "stage3"))
    assert {tensors[localisation.positions[f"stage{i}"]].op for i in range(1, 5)} == {"Add"}
    inside = divergence_inside("stage4", tensors, ckpt, images, localisation=localisation)
    assert (inside["block"], inside["op"]) == (0, "GRN"), inside["how"]


# ------------------------------------------------------------------ float16 overflow and headroom

def overflowing(ckpt, factor: float = 400.0):
    """stage2's first block with pwconv1 scaled: its GELU output reaches ~290, so GRN's squares (and their sum over
    H x W) pass 65504 in float16, while the float64 model is fine."""
    tensors = dict(ckpt.tensors)
    for leaf in ("weight", "bias"):
        tensors[f"stages.1.blocks.0.pwconv1.{leaf}"] = tensors[f"stages.1.blocks.0.pwconv1.{leaf}"] * np.float32(factor)
    return dataclasses.replace(ckpt, tensors=tensors)


def test_float16_grn_overflow_names_the_first_non_finite_op(tmp_path, ckpt, images):
    import onnx
    from onnxconverter_common import float16

    big = overflowing(ckpt)
    referee = parity_rule.referee_features(big, images)
    path = export_onnx(torch_module(big), images, tmp_path / "f32.onnx", dynamo=False)
    half = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(half, str(tmp_path / "f16.onnx"))
    tensors = intermediate_tensors("onnx", tmp_path / "f16.onnx", {"pixels": images})
    assert not np.all(np.isfinite(tensors[-1].array))  # the float16 artifact's logits really are broken
    localisation = locate_stages(tensors, referee, BATCH)
    assert np.isfinite(localisation.errors["stage1"]) and not np.isfinite(localisation.errors["stage2"])
    bad = first_non_finite(tensors, localisation)
    assert bad is not None and (bad["stage"], bad["block"], bad["kind"]) == ("stage2", 0, "GRN"), bad
    assert tensors[bad["index"]].array.dtype == np.float16
    assert all(np.all(np.isfinite(t.array)) for t in tensors[:bad["index"]])
    inside = divergence_inside("stage2", tensors, big, images, localisation=localisation)
    assert (inside["block"], inside["op"]) == (0, "GRN") and inside["non_finite_op"] == bad

    headroom = float16_headroom(big, images)
    assert headroom["stage2"]["grn_sum_of_squares"] >= FLOAT16_MAX
    assert over_float16(headroom)[0].startswith("stage2 grn_sum_of_squares")
    assert all(not line.startswith(("stem", "stage1")) for line in over_float16(headroom))
    assert over_float16(float16_headroom(ckpt, images)) == []


def test_headroom_agrees_with_onnxruntime(tmp_path, ckpt, images, referee):
    """Independent oracles: our export computes GRN's sum of squares as a MatMul with ones (its graph form), and
    every LayerNorm as one LayerNormalization node; onnxruntime's float32 values of those sums, and numpy's variance
    of those nodes' inputs, per stage, are what float16_headroom reports from its float64 hooks."""
    path = export_onnx(torch_module(ckpt), images, tmp_path / "model.onnx", dynamo=False)
    tensors = intermediate_tensors("onnx", path, {"pixels": images})
    by_name = {t.name: t.array.astype(np.float64) for t in tensors}
    headroom = float16_headroom(ckpt, images)
    assert set(headroom) == {"stem", "stage1", "stage2", "stage3", "stage4", "pooled", "logits"}
    for index, name in enumerate(("stem", "stage1", "stage2", "stage3", "stage4")):
        prefix = "/stem/" if name == "stem" else f"/stages.{index - 1}/"
        mine = [t for t in tensors if t.name.startswith(prefix)]
        sums = [t.array for t in mine if t.op == "MatMul" and "/grn/" in t.name]
        assert len(sums) == (0 if name == "stem" else ckpt.config.depths[index - 1])
        expected = max((float(np.max(s)) for s in sums), default=0.0)
        assert headroom[name]["grn_sum_of_squares"] == pytest.approx(expected, rel=1e-5)
        variances = [by_name[t.inputs[0]].var(axis=-1).max() for t in mine if t.op == "LayerNormalization"]
        assert variances, name
        assert headroom[name]["layernorm_variance"] == pytest.approx(max(variances), rel=1e-4)
        assert headroom[name]["peak_abs"] >= np.max(np.abs(referee[name]))
        assert headroom[name]["float16_max"] == FLOAT16_MAX


def test_saturation_is_named_in_float16_only():
    ramp = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 2, 2)
    tensors = [Tensor("a", "Conv", ramp.astype(np.float16)),
               Tensor("b", "Mul", (ramp * 70000).astype(np.float32)),
               Tensor("c", "Mul", np.full((1, 4, 2, 2), 65504, dtype=np.float16)),
               Tensor("d", "Div", np.full((1, 4), np.nan, dtype=np.float32))]
    found = first_non_finite(tensors)
    assert (found["tensor"], found["op"]) == ("c", "Mul") and "saturates" in found["what"]
    assert first_non_finite(tensors, float16=True)["tensor"] == "b"
    assert first_non_finite(tensors[:2] + tensors[3:])["what"].startswith("non-finite (4 of 4")


# ------------------------------------------------------------------ graph patterns, on synthetic tensor lists

def _decomposed_layernorm(x, name: str, gamma, beta, eps: float = 1e-6) -> list[Tensor]:
    """onnx2tf's / TensorFlow's LayerNorm over the last axis of an NHWC ``x`` (the tensor named ``name + 'in'``):
    ``x * scale + (beta - mean * scale)``, ``scale = gamma * rsqrt(var + eps)``; its last Add reads two
    activations of x's shape, neither computed from the other."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    scale = gamma / np.sqrt(var + eps)
    return [Tensor(f"{name}mean", "MEAN", mean, (f"{name}in",)),
            Tensor(f"{name}sqdiff", "SQUARED_DIFFERENCE", (x - mean) ** 2, (f"{name}in", f"{name}mean")),
            Tensor(f"{name}var", "MEAN", var, (f"{name}sqdiff",)),
            Tensor(f"{name}rsqrt", "RSQRT", 1 / np.sqrt(var + eps), (f"{name}var",)),
            Tensor(f"{name}scale", "MUL", scale * np.ones_like(x), (f"{name}rsqrt",)),
            Tensor(f"{name}mul_1", "MUL", x * scale, (f"{name}in", f"{name}scale")),
            Tensor(f"{name}mul_2", "MUL", mean * scale, (f"{name}mean", f"{name}scale")),
            Tensor(f"{name}sub", "SUB", beta - mean * scale, (f"{name}mul_2",)),
            Tensor(f"{name}add_1", "ADD", x * scale + beta - mean * scale, (f"{name}mul_1", f"{name}sub"))]


def _nhwc_stem_and_block(beta_error: float = 0.0) -> tuple[list[Tensor], dict[str, np.ndarray]]:
    """A stem (conv, decomposed LayerNorm) and one block (a branch from the stem output, the residual Add) as a
    .tflite made by onnx2tf lists them (NHWC), and the referee's stem and stage1 (NCHW, float64). ``beta_error``
    shifts the artifact's stem LayerNorm bias: a broken artifact."""
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(2, 3, 5, 4)) * 3 + 1
    gamma, beta = rng.normal(size=4) + 1, rng.normal(size=4)
    stem = [Tensor("stem/conv", "CONV_2D", conv, ("input",)),
            *_decomposed_layernorm(conv, "stem/ln/", gamma, beta + beta_error)[:-1]]
    norm = _decomposed_layernorm(conv, "stem/ln/", gamma, beta + beta_error)[-1]
    stem[0] = dataclasses.replace(stem[0], name="stem/ln/in")
    branch = np.tanh(norm.array) * 0.5
    tensors = [*stem, norm, Tensor("block/dw", "DEPTHWISE_CONV_2D", branch, (norm.name,)),
               Tensor("block/add", "ADD", norm.array + branch, (norm.name, "block/dw"))]
    reference_ln = _decomposed_layernorm(conv, "r", gamma, beta)[-1].array
    referee = {"stem": reference_ln.transpose(0, 3, 1, 2),
               "stage1": (reference_ln + np.tanh(reference_ln) * 0.5).transpose(0, 3, 1, 2)}
    return [dataclasses.replace(t, array=t.array.astype(np.float32)) for t in tensors], referee


def test_a_decomposed_layernorm_add_is_no_residual_and_the_stem_is_its_output():
    """onnx2tf's NHWC .tflite: the stem LayerNorm's last Add (x * scale + shifted bias) is not a block output; the
    stem is the first residual Add's skip input, not ``mul_1`` inside the LayerNorm (0.2 off: a good file failed)."""
    tensors, referee = _nhwc_stem_and_block()
    found = locate_stages(tensors, referee, 2)
    assert [tensors[i].name for i in found.blocks["stage1"]] == ["block/add"]
    assert found.stages["stem"][0] == "stem/ln/add_1", found.found
    assert found.stages["stage1"][0] == "block/add" and found.layouts["stem"] == "NHWC"
    assert max(found.errors.values()) < 1e-6 and "position" in found.found["stem"], found.found


def test_a_broken_decomposed_layernorm_keeps_its_structural_place():
    tensors, referee = _nhwc_stem_and_block(beta_error=5.0)  # another tensor is closer by value
    found = locate_stages(tensors, referee, 2)
    assert found.stages["stem"][0] == "stem/ln/add_1", found.found
    assert found.found["stem"].startswith("by shape and position"), found.found
    assert found.errors["stem"] > 1 and found.errors["stage1"] > 1
    assert "not exposed" not in found.how


def test_a_stage_fused_into_the_next_op_is_not_exposed():
    """A head LayerNorm whose gamma and beta are folded into the classifier: no tensor is ``pooled``, the one at
    its place (the normalised mean) is off while the logits computed from it match; ``pooled`` is not judged."""
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(2, 6))
    normalised = (mean - mean.mean(1, keepdims=True)) / mean.std(1, keepdims=True)
    gamma, beta, weight = rng.normal(size=6) + 1, rng.normal(size=6), rng.normal(size=(6, 3))
    logits = (normalised * gamma + beta) @ weight
    tensors = [Tensor("gap", "MEAN", mean), Tensor("norm", "MVN", normalised, ("gap",)),
               Tensor("fc", "FULLY_CONNECTED", normalised @ (gamma[:, None] * weight) + beta @ weight, ("norm",))]
    referee = {"pooled": normalised * gamma + beta, "logits": logits}
    found = locate_stages(tensors, referee, 2)
    assert list(found.stages) == ["logits"], found.found
    assert "not exposed (not judged): pooled" in found.how and "norm" in found.how, found.how
    # The same graph with the classifier wrong too: pooled keeps its place and fails, nothing is hidden.
    tensors[2] = dataclasses.replace(tensors[2], array=tensors[2].array + 1)
    found = locate_stages(tensors, referee, 2)
    assert found.stages["pooled"][0] == "norm" and "not exposed" not in found.how, found.how
